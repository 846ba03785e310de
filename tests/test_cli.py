"""``optgen build | check | list``, in-process (``optgen.cli.main``) and once as ``python -m optgen.cli``."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import torch

from optgen.cli import main

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


def _import_file(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def test_build_in_process_writes_a_working_module(tmp_path, capsys):
    """Build a renamed copy of adamw.yaml (its own op name), import the output, compare with torch."""
    text = (SPECS / "adamw.yaml").read_text()
    spec = tmp_path / "cli_adamw.yaml"
    spec.write_text(
        text.replace("name: adamw\n", "name: cli_adamw\n").replace("class: AdamW\n", "class: CliAdamW\n")
    )
    out = tmp_path / "out"
    assert main(["build", str(spec), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.strip() == f"built {spec} -> {out / 'cli_adamw.py'}"
    module = _import_file(out / "cli_adamw.py", "optgen_test_cli_adamw")
    cls = module.CliAdamW
    assert cls.op._opoverload._name == "optgen::cli_adamw_step"

    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(4, 3, generator=gen).requires_grad_(),
        torch.randn((), generator=gen).add(2).requires_grad_(),
    ]
    refs = [p.detach().clone().requires_grad_() for p in params]
    opt = cls(params, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(refs, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(10):
        for p, r in zip(params, refs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, r in zip(params, refs):
        assert torch.isfinite(p).all()
        err = (p.detach() - r.detach()).abs().max().item()
        assert err <= 1e-6 * r.detach().abs().max().item()


def test_build_several_specs(tmp_path, capsys):
    specs = [SPECS / "sgd.yaml", SPECS / "lion.yaml"]
    assert main(["build", *map(str, specs), "--output", str(tmp_path)]) == 0
    out_lines = capsys.readouterr().out.strip().splitlines()
    assert out_lines == [f"built specs/{s.name} -> {tmp_path / (s.stem + '.py')}" for s in specs]
    for s in specs:
        compile((tmp_path / f"{s.stem}.py").read_text(), s.name, "exec")


def test_a_build_of_several_specs_writes_nothing_if_one_fails(tmp_path, capsys):
    """Every spec is compiled before any file is written: a bad one, or two of one name (the second would
    overwrite the first's module), leaves the output folder as it was."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    twin = tmp_path / "twin.yaml"
    twin.write_text((SPECS / "sgd.yaml").read_text())
    out = tmp_path / "out"
    for later, fragment in ((bad, "unknown name 'gg'"), (twin, f"name 'sgd' is also the name of {SPECS / 'sgd.yaml'}")):
        assert main(["build", str(SPECS / "sgd.yaml"), str(later), "-o", str(out)]) == 1
        assert fragment in capsys.readouterr().err
        assert not out.exists()


def test_build_as_a_subprocess_matches_in_process(tmp_path):
    out_sub, out_in = tmp_path / "sub", tmp_path / "in"
    result = subprocess.run(
        [sys.executable, "-m", "optgen.cli", "build", str(SPECS / "sgd.yaml"), "-o", str(out_sub)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() == f"built specs/sgd.yaml -> {out_sub / 'sgd.py'}"
    assert main(["build", str(SPECS / "sgd.yaml"), "-o", str(out_in)]) == 0
    assert (out_sub / "sgd.py").read_text() == (out_in / "sgd.py").read_text()


def test_check_prints_lowered_update_and_bytes(capsys):
    assert main(["check", str(SPECS / "adamw.yaml")]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0] == "adamw (AdamW): OK"
    assert "lowered update (per element, fp32):" in lines
    start = lines.index("lowered update (per element, fp32):") + 1
    assigned = []
    for line in lines[start:]:
        m = re.match(r"^  ([A-Za-z_]\w*) = (.+)$", line)
        if not m:
            break
        assigned.append(m.group(1))
    # AdamW writes p twice (decay, then the Adam step), m and v once: SSA names p_1, m_1, v_1, p_2
    assert [re.sub(r"_\d+$", "", a) for a in assigned] == ["p", "m", "v", "p"]
    assert "host scalars (once per step):" in lines
    bytes_line = [ln for ln in lines if ln.startswith("bytes per parameter:")]
    assert len(bytes_line) == 1
    # fp32 param + fp32 grad + fp32 m + fp32 v; a step reads all four and writes p, m, v
    assert bytes_line[0].startswith("bytes per parameter: 16 ")
    assert "moved per step: 28" in bytes_line[0]


def test_list_shows_each_builtin_with_bytes_per_param(capsys):
    assert main(["list"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0].split()[:3] == ["spec", "class", "bytes/param"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    expected = {
        "adamw": ("AdamW", "16"),
        "sgd": ("SGD", "12"),
        "lion": ("Lion", "12"),
        "adam": ("Adam", "16"),
    }
    for name, (cls, nbytes) in expected.items():
        assert rows[name][1:3] == [cls, nbytes], rows[name]
    assert set(rows) >= {p.stem for p in SPECS.glob("*.yaml")}


BAD = """\
name: bad
class: Bad
hyperparams:
  lr: {default: 0.1}
param: {storage: native}
update: |
  p = p - lr*gg
"""


def test_error_is_one_line_on_stderr_in_process(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(BAD)
    for argv in (["check", str(spec)], ["build", str(spec), "-o", str(tmp_path / "out")]):
        assert main(argv) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert (
            captured.err == f"optgen: error: {spec}:7: update: unknown name 'gg' "
            f"(known: g, lr, numel, p, t; a temporary must be assigned before it is read)\n"
        )
    assert not (tmp_path / "out" / "bad.py").exists()


def test_missing_file_and_unwritable_output_are_one_line(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"optgen: error: {tmp_path / 'nope.yaml'}: ")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["build", str(SPECS / "sgd.yaml"), "-o", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("optgen: error: ") and "Traceback" not in err


def test_a_spec_that_is_not_utf8_is_one_line(tmp_path, capsys):
    spec = tmp_path / "binary.yaml"
    spec.write_bytes(b"name: x\n\xff\xfe")
    assert main(["check", str(spec)]) == 1
    assert capsys.readouterr().err == f"optgen: error: {spec}: cannot read spec: not UTF-8 text (byte 8)\n"


def test_error_as_a_subprocess_has_no_traceback(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(BAD.replace("gg", "sqrt(g, g)"))
    result = subprocess.run(
        [sys.executable, "-m", "optgen.cli", "check", str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"optgen: error: {spec}:7: update: sqrt() takes 1 arguments")
