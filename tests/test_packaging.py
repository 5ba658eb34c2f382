"""An installed (non-editable) wheel carries conf/ and the shipped dataset, and runs the default job."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env

pytestmark = pytest.mark.slow


def test_wheel_runs_the_default_job_from_anywhere(tmp_path: Path, cache_dir: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("harness-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"harness/conf/config.yaml", "harness/conf/data/digits.yaml", "harness/data/assets/digits.npz"} <= names
        z.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = clean_env(PYTHONPATH=str(site))
    code = "import harness, sys; print(harness.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stdout
    proc = subprocess.run([sys.executable, "-m", "harness.train", "trainer.epochs=1", "model=mlp"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert f"{site}/harness/data/assets/digits.npz" in proc.stdout
    assert (work / "runs").is_dir()
