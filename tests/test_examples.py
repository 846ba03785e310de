"""The examples and benchmarks/convergence.py run end to end on the CPU at tiny sizes and write their plots and
tables (skipped without sklearn / matplotlib)."""

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_train_digits_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("train_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    spec_file = Path(__file__).resolve().parent.parent / "examples" / "specs" / "adan.yaml"  # --spec: any spec
    results = module.main(["--optimizer", "AdamW,FlashAdamW", "--spec", str(spec_file), "--steps", "40",
                           "--out", str(tmp_path)])
    assert [r["name"] for r in results] == ["AdamW", "FlashAdamW", "Adan"]
    assert (tmp_path / "digits_loss.png").stat().st_size > 0
    assert "| FlashAdamW |" in (tmp_path / "digits.md").read_text()
    by_name = {r["name"]: r for r in results}  # measured from the tensors: 2 or 4 fp32 states + a step count each
    assert 8 < by_name["AdamW"]["state B/param"] < 8.01 and 16 < by_name["Adan"]["state B/param"] < 16.01
    assert by_name["FlashAdamW"]["state B/param"] < 4
    for r in results:  # both learn: the last losses are well below the first (ln 10 = 2.30 at chance)
        assert sum(r["losses"][-10:]) / 10 < 0.5 * sum(r["losses"][:3]) / 3, r["name"]
        assert r["test accuracy"] > 0.5, (r["name"], r["test accuracy"])


def test_train_lm_smoke(tmp_path):
    import importlib.util
    import math
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "train_lm.py"
    spec = importlib.util.spec_from_file_location("train_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--optimizer", "AdamW,FlashAdamW", "--steps", "40", "--corpus-bytes", "300000",
                           "--batch-size", "16", "--context", "64", "--out", str(tmp_path)])
    assert (tmp_path / "lm_loss.png").stat().st_size > 0 and "| FlashAdamW |" in (tmp_path / "lm.md").read_text()
    for r in results:  # uniform bytes cost ln 256 = 5.55 nats; 40 steps learn at least the byte frequencies
        assert r["validation loss"] < math.log(256) - 0.75, (r["name"], r["validation loss"])


def test_convergence_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "convergence.py"
    spec = importlib.util.spec_from_file_location("convergence", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.main(["--smoke", "--seeds", "2", "--tasks", "digits,lm,lamb16_clip", "--out", str(tmp_path)])
    assert "of the stored momentum sits at" in (tmp_path / "convergence_smoke_lamb16_clip.md").read_text()
    for task in ("digits", "lm"):
        text = (tmp_path / f"convergence_smoke_{task}.md").read_text()
        assert text == written[task] and (tmp_path / f"convergence_smoke_{task}.png").stat().st_size > 0
        rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert [(r[0][2:], r[1]) for r in rows] == [(v, module.lookup(r).__name__) for v, r in module.PAIRS]
        for row in rows:  # "mean ± std" of 2 seeds, and measured memory: every variant holds less than its reference
            assert "±" in row[3] and "±" in row[4]
            variant_bytes, reference_bytes = (float(x) for x in row[-3].split(" / "))
            assert 0 < variant_bytes < reference_bytes, row
