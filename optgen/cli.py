"""``optgen build | check | list``: a user's mistake is one readable line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from optgen.build import build_files, display_path, render
from optgen.errors import SpecError
from optgen.ir import lower
from optgen.spec import load_spec


def builtin_specs() -> list[Path]:
    """The spec files shipped with optgen (the repository's specs/ folder)."""
    folder = resources.files("optgen.specs")
    return sorted(Path(str(f)) for f in folder.iterdir() if f.name.endswith(".yaml"))


def _cmd_build(args: argparse.Namespace) -> None:
    for path, out in zip(args.specs, build_files(args.specs, args.output)):
        print(f"built {display_path(Path(path))} -> {out}")


def _cmd_check(args: argparse.Namespace) -> None:
    spec = load_spec(args.spec)
    ir = lower(spec)
    render(spec, display_path(Path(args.spec)))  # the whole pipeline must go through
    print(f"{spec.name} ({spec.class_name}): OK")
    print("lowered update (per element, fp32):")
    for st in ir.statements:
        print(f"  {st.target} = {st.expr}")
    print("host scalars (once per step):")
    for s in ir.scalars:
        if s.symbol != s.expr:
            print(f"  {s.symbol} = {s.expr}")
    print(f"bytes per parameter: {ir.bytes_per_param():.10g} (fp32 params/grads where native), "
          f"moved per step: {ir.bytes_moved_per_element():.10g}")


def _cmd_list(args: argparse.Namespace) -> None:
    rows = []
    for path in builtin_specs():
        spec = load_spec(path)
        ir = lower(spec)
        storage = ", ".join(f"{t.name}:{t.codec.name}" for t in ir.tensors)
        rows.append((spec.name, spec.class_name, f"{ir.bytes_per_param():.10g}", storage))
    header = ("spec", "class", "bytes/param", "storage")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optgen", description="Compile optimizer specs into PyTorch code.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="generate <name>.py for each spec")
    p_build.add_argument("specs", nargs="+")
    p_build.add_argument("-o", "--output", default="generated", help="output folder (default: generated/)")
    p_build.set_defaults(fn=_cmd_build)
    p_check = sub.add_parser("check", help="validate a spec and print its lowered update")
    p_check.add_argument("spec")
    p_check.set_defaults(fn=_cmd_check)
    p_list = sub.add_parser("list", help="built-in specs with bytes per parameter")
    p_list.set_defaults(fn=_cmd_list)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except SpecError as exc:
        print(f"optgen: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an output folder that cannot be created: one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"optgen: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
