"""The package's public names stay what they are, however the submodules get imported."""

from __future__ import annotations

import subprocess
import sys


def test_public_names_are_the_functions_every_time() -> None:
    code = (
        "import harness\n"
        "first = [harness.session, harness.fit]\n"
        "import harness.job, harness.runtime, harness.engine\n"
        "assert [harness.session, harness.fit] == first and all(map(callable, first)), first\n"
        "assert sorted(harness.__all__) == harness.__all__\n"
        "for name in harness.__all__: getattr(harness, name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_importing_the_env_readers_does_not_import_torch() -> None:
    code = "import sys, harness.env, harness.devices, harness.batching; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
