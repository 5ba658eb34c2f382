"""harness.fencing: a process named by host, pid and start time is killed only if it is that process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil

from harness import fencing


def test_only_the_named_process_on_this_host_is_killed_and_then_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        me = {"rank": 1, "host": host, "pid": proc.pid, "start": psutil.Process(proc.pid).create_time()}
        assert not fencing.gone(me, host)
        assert not fencing.kill({**me, "start": me["start"] - 10}, host)  # the pid now names another process
        assert not fencing.kill(me, "another-host")  # emulated hosts share pids: the host decides
        assert not fencing.gone(me, "another-host")
        assert not fencing.kill(me, host, only_if_stopped=True)  # running: slow is not frozen
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fencing.kill(me, host, only_if_stopped=True)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert fencing.gone(me, host)
    finally:
        proc.kill()
        proc.wait()
