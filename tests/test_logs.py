"""harness.logs: who writes where, and a report that reaches the files even when the console blocks."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

from harness import logs


def test_a_console_nobody_reads_does_not_stop_a_report(tmp_path: Path) -> None:
    """The watchdog logs its report this way and then leaves: a full pipe on stdout (a parent that
    stopped reading) must cost it at most a second, and the rank's own log file gets the line first."""
    read_end, write_end = os.pipe()
    flags = fcntl.fcntl(write_end, fcntl.F_GETFL)
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            os.write(write_end, b"x" * 65536)
    except BlockingIOError:
        pass
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags)  # blocking again, and full
    log = logs.setup_console(0)
    log.handlers[0].setStream(os.fdopen(write_end, "w"))  # type: ignore[attr-defined]
    try:
        logs.setup_files(tmp_path, 0)
        t0 = time.monotonic()
        logs.emit_unblocked(logging.ERROR, "rank 1 (pid 7 on h) lost at step 3: no heartbeat for 5.0 s")
        assert time.monotonic() - t0 < 3
        assert "rank 1 (pid 7 on h) lost at step 3" in (tmp_path / "logs" / "rank0.log").read_text()
        assert "lost at step 3" in (tmp_path / "train.log").read_text()
    finally:
        os.close(read_end)  # the console thread's write now fails (EPIPE) and it ends
        time.sleep(0.2)
        for h in list(log.handlers):
            log.removeHandler(h)
        logs.close()
