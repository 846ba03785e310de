"""A non-editable `pip install .` into a fresh venv finds its templates, specs and built-in optimizers."""

import os
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_non_editable_install(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # torch, sympy, ... come from the environment running the tests; optgen itself must not.
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "outer_env.pth").write_text("\n".join(sorted(outer)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True, env=env,
                   cwd=tmp_path)
    (tmp_path / "my.yaml").write_text((ROOT / "specs" / "sgd.yaml").read_text().replace("name: sgd", "name: my_sgd"))
    script = (
        "import optgen, optgen.optim, torch\n"
        "assert 'site-packages' in optgen.__file__, optgen.__file__\n"
        "from optgen.optim import AdamW, SGD, Lion, Adam\n"
        "Cls = optgen.load('my.yaml')\n"
        "p = torch.nn.Parameter(torch.randn(4))\n"
        "opt = Cls([p], lr=0.1, momentum=0.9)\n"
        "p.grad = torch.ones(4); before = p.detach().clone(); opt.step()\n"
        "assert torch.allclose(p.detach(), before - 0.1)\n"
        "print('ok', optgen.__file__)\n"
    )
    out = subprocess.run([python, "-c", script], check=False, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
    listing = subprocess.run([env_dir / "bin" / "optgen", "list"], check=False, capture_output=True, text=True, env=env,
                             cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "adamw" in listing.stdout and "lion" in listing.stdout
    built = subprocess.run([env_dir / "bin" / "optgen", "build", "my.yaml", "-o", "out"], check=False, capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "out" / "my_sgd.py").exists()
