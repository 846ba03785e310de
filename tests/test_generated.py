"""generated/ must be exactly what `optgen build` writes today, for every spec in specs/."""

from pathlib import Path

import pytest

from optgen.build import build_files, formats_aligned, formats_register_cap
from optgen.codecs import get_codec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def test_every_spec_has_a_generated_module():
    built = {p.stem for p in (ROOT / "generated").glob("*.py") if p.name != "__init__.py"}
    assert built == {p.stem for p in SPECS}


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_generated_module_is_up_to_date(spec, tmp_path):
    (out,) = build_files([spec], tmp_path)
    committed = ROOT / "generated" / out.name
    assert committed.read_text() == out.read_text(), f"generated/{out.name} is stale: run `optgen build specs/*.yaml`"


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_generated_module_is_valid_python(spec):
    source = (ROOT / "generated" / f"{spec.stem}.py").read_text()
    compile(source, spec.stem, "exec")


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_every_name_of_the_generated_code_is_reserved_or_the_specs_own(spec):
    """A spec symbol named like a local of the template (the kernel's slice loop ``k`` overwrote a hyper-parameter
    ``k``) must be refused: every identifier in a generated module is either reserved (``optgen.ir``) or made
    from this spec (its symbols, SSA temporaries, host scalars, reductions, buffers, functions, class)."""
    import ast

    from optgen.ir import _reserved, lower
    from optgen.spec import load_spec

    loaded = load_spec(spec)
    own = {loaded.class_name}
    for ir in (lower(loaded), lower(loaded, fp32_states=True), lower(loaded, fp32_states=True, native_param=True)):
        own |= {n for h in ir.spec.hyperparams for n in (h.name, *h.names)} | {"p", "g", "t"}
        own |= {st.target.name for st in ir.statements} | {st.name for st in ir.statements}
        own |= {s.symbol.name for s in ir.scalars} | {r.symbol.name for r in ir.reductions}
        own |= {t.input.name for t in ir.tensors} | {sym.name for t in ir.tensors for _, sym, _ in t.side}
        buffers = {a for t in ir.tensors for a in t.arg_names} | {c for t in ir.tensors for c, _ in t.codec.constants}
        own |= buffers | {b + "_ptrs" for b in buffers}
    names = set()
    for node in ast.walk(ast.parse((ROOT / "generated" / f"{spec.stem}.py").read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    unexplained = sorted(n for n in names - own if not (_reserved(n) or n.startswith(("_", f"{loaded.name}_step"))))
    assert not unexplained, f"add these to optgen.ir.GENERATED_NAMES: {unexplained}"


def _codecs(*names_options):
    return [get_codec(name, options, "state", ValueError) for name, options in names_options]


def test_register_cap_only_where_the_formats_agree():
    """A kernel takes a register cap only when all its grouped and stochastic-rounding formats declare the same one:
    q8 groups of any size and q4 declare none, and a mix of q8_dynamic (56) and q4 runs uncapped."""
    assert formats_register_cap(_codecs(("q8_dynamic", {}), ("q8_dynamic", {"signed": False}), ("fp32", {}))) == 56
    assert formats_register_cap(_codecs(("q4_dynamic", {}), ("q4_linear", {}))) is None  # measured faster uncapped
    assert formats_register_cap(_codecs(("q8_softsign", {"group": 256}), ("q8_sqrt", {"group": 128}))) is None
    assert formats_register_cap(_codecs(("q8_dynamic", {}), ("q4_linear", {}))) is None
    assert formats_register_cap(_codecs(("q8_dynamic", {}), ("q8_softsign", {}))) is None
    assert formats_register_cap(_codecs(("fp32", {}), ("bf16", {}))) is None


def test_aligned_hint_only_where_every_grouped_format_takes_it():
    """Vector loads (the ``aligned`` hint) for q4, q8_dynamic and q8 groups below 128, not with larger q8 groups
    in the kernel."""
    assert formats_aligned(_codecs(("q4_dynamic", {}), ("q4_linear", {}), ("fp32", {})))
    assert formats_aligned(_codecs(("q8_softsign", {}), ("q8_sqrt", {"group": 64})))
    assert formats_aligned(_codecs(("q8_dynamic", {}), ("q8_dynamic", {"signed": False})))
    assert not formats_aligned(_codecs(("q8_softsign", {"group": 128})))
    assert not formats_aligned(_codecs(("q8_dynamic", {}), ("q8_sqrt", {"group": 256})))
