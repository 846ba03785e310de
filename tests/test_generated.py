"""generated/ must be exactly what `optgen build` writes today, for every spec in specs/."""

from pathlib import Path

import pytest

from optgen.build import build_file

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
