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


def test_a_second_session_in_the_same_process_starts_clean(tmp_path) -> None:
    """A notebook or a script that calls harness.session twice: deterministic mode, the process
    group (here a one-rank one, as fsdp makes), the environment and the log handlers are the first
    session's only while it lasts."""
    import logging

    import torch

    import harness
    from harness import dist as hdist

    handlers = list(logging.getLogger("harness").handlers)
    environ = {"PATH": "/usr/bin"}  # no RANK or SLURM_* variables: one process
    with harness.session(device="cpu", run_root=tmp_path, run_id_override="one", deterministic=True,
                         environ=environ) as s:
        assert torch.are_deterministic_algorithms_enabled() and s.world_size == 1
        hdist.ensure_group(s.device)  # what trainer.strategy=fsdp does at one process
        assert torch.distributed.is_initialized()
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.distributed.is_initialized() and hdist.env().mode == "launcher"
    assert list(logging.getLogger("harness").handlers) == handlers
    with harness.session(device="cpu", run_root=tmp_path, run_id_override="two", environ=environ) as s:
        assert not torch.are_deterministic_algorithms_enabled() and s.run_dir == tmp_path / "two"
