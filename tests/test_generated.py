"""generated/ must be exactly what `optgen build` writes today, for every spec in specs/."""

from pathlib import Path

import pytest

from optgen.build import build_file, formats_aligned, formats_register_cap
from optgen.codecs import get_codec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def test_every_spec_has_a_generated_module():
    built = {p.stem for p in (ROOT / "generated").glob("*.py") if p.name != "__init__.py"}
    assert built == {p.stem for p in SPECS}


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_generated_module_is_up_to_date(spec, tmp_path):
    out = build_file(spec, tmp_path)
    committed = ROOT / "generated" / out.name
    assert committed.read_text() == out.read_text(), f"generated/{out.name} is stale: run `optgen build specs/*.yaml`"


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_generated_module_is_valid_python(spec):
    source = (ROOT / "generated" / f"{spec.stem}.py").read_text()
    compile(source, spec.stem, "exec")


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
