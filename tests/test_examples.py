"""The digits example runs end to end on the CPU and writes its plot and table (skipped without sklearn)."""

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
    results = module.main(["--optimizer", "AdamW,FlashAdamW", "--steps", "40", "--out", str(tmp_path)])
    assert (tmp_path / "digits_loss.png").stat().st_size > 0
    assert "| FlashAdamW |" in (tmp_path / "digits.md").read_text()
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
