"""Signals -> a flag -> the same stopping step on every rank.

Owns: the handlers (the preemption signal, SIGUSR2 by default, and SIGTERM), the agreement (every
`check_every` steps the ranks all-reduce their flags over a CPU group, so all stop at the SAME step
and an NCCL job makes no device sync for it), the PREEMPTED marker, and the exit codes.

Preemption (e.g. Slurm's `--signal=USR2@90`): save at the step boundary, write PREEMPTED in the run
directory, exit 0 so the elastic agent does not restart the workers; the launcher turns the marker
into exit code 3 and a batch script into `scontrol requeue`. SIGTERM (scancel, a requeue by the
admin, the elastic agent shutting down): save, exit 143, never requeue. If any rank saw SIGTERM,
every rank terminates. SIGINT (Ctrl-C; the agent passes it on) is the same with exit 130: one
line, no KeyboardInterrupt per rank, and a rerun with the same run id resumes.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from harness import atomic
from harness.failures import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_TERMINATED  # noqa: F401 (re-exported)

NONE, PREEMPT, TERMINATE, INTERRUPT = 0, 1, 2, 3  # the all-reduce takes the max: Ctrl-C, then terminate win
STOPPED = {PREEMPT: "preempted", TERMINATE: "terminated", INTERRUPT: "interrupted"}  # FitResult.stopped
MARKER = "PREEMPTED"


class SignalWatch:
    """Installs the handlers for the duration of training; `agreed(step)` is the rank-wide decision."""

    def __init__(self, preempt_signal: str = "SIGUSR2", check_every: int = 10) -> None:
        self.flag = NONE
        self.check_every = check_every
        # SIGINT too: the elastic agent passes a terminal's Ctrl-C on to every worker, and a
        # KeyboardInterrupt raised mid-collective would leave a traceback per rank and no checkpoint
        self._signals = {getattr(signal, preempt_signal): PREEMPT, signal.SIGTERM: TERMINATE,
                         signal.SIGINT: INTERRUPT}
        self._previous: dict[int, Any] = {}
        self._work: Any = None  # the all-reduce in flight since the last check
        self._sent = torch.zeros(1, dtype=torch.int32)
        self._group = None
        self._alone = not (dist.is_initialized() and dist.get_world_size() > 1)  # asked once, not every check
        if not self._alone:
            # NCCL would need a CUDA tensor (and a device sync); a gloo group agrees on the CPU
            gloo = "gloo" in str(dist.get_backend())
            self._group = None if gloo else dist.new_group(backend="gloo")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.flag = max(self.flag, self._signals[signum])  # only a flag: the loop acts at a step boundary

    def __enter__(self) -> SignalWatch:
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._work is not None:  # every rank has the same one in flight: finish it together
            self._work.wait()
            self._work = None

    def agreed(self, step: int) -> int:
        """The highest flag over all ranks, decided every `check_every` steps, the same on every rank.

        Pipelined so the step loop never waits for it: each check collects the all-reduce the previous
        check started and starts the next one. A signal therefore stops training within two checks.
        """
        if step % self.check_every:
            return NONE
        if self._alone:
            return self.flag
        decided = NONE
        if self._work is not None:
            self._work.wait()
            decided = int(self._sent.item())
            self._work = None
        if decided == NONE:
            self._sent.fill_(self.flag)  # the tensor the last all-reduce has finished with
            self._work = dist.all_reduce(self._sent, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return decided

    def barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier(group=self._group)


def write_marker(run_dir: Path, text: str) -> None:
    atomic.write_text(run_dir / MARKER, text)


def clear_marker(run_dir: Path) -> None:
    (run_dir / MARKER).unlink(missing_ok=True)


def was_preempted(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file()
