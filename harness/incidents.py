"""What a rank records about an incident: stacks, `<run dir>/incidents.jsonl`, torchrun's error file.

Owns the incidents file (one JSON line per incident: the one-line report and the verdict it came
from; the watchdog's first reporter appends, the launcher reads) and the two ways an incident's
story leaves the process besides the log: the threads' stacks (faulthandler, which needs no GIL)
and the error file torchrun's agent reads to name a failed worker's cause.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import atomic
from harness.health import Verdict

FILE = "incidents.jsonl"


def thread_stacks() -> tuple[str, str]:
    """All threads' Python stacks (faulthandler's dump), and the main thread's alone."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        text = f.read()
    main = threading.main_thread().ident
    for block in text.split("\n\n"):
        m = re.match(r"(?:Current thread|Thread) (0x[0-9a-f]+)", block)
        if m and int(m.group(1), 16) == main:
            return text, block.strip()
    return text, ""


def append(run_dir: Path | None, verdict: Verdict) -> None:
    """Append the incident (without a run directory yet: nowhere). A lost store has no first reporter:
    every rank that lost it appends, and the lock makes that once per attempt."""
    if run_dir is None:
        return
    path = run_dir / FILE
    with contextlib.suppress(OSError), open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if verdict.kind == "store" and path.stat().st_size:
            for line in path.read_text().splitlines():
                seen = json.loads(line)
                if seen["attempt"] == verdict.attempt and seen["kind"] == "store":
                    return
        f.write(json.dumps({"line": verdict.line(), **json.loads(verdict.to_json())}) + "\n")


def read(run_dir: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """The incidents recorded in `run_dir` at or after wall time `since`, oldest first."""
    path = run_dir / FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("time", 0.0) >= since]


def write_error_file(verdict: Verdict) -> None:
    """torchrun's agent prints the failed worker with the earliest error-file timestamp as the root
    cause: date ours when the peer was lost (its last sign of life), so a fenced peer's own failure,
    seen later, does not take the place of the reason."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    text = f"PeerLostError: {verdict.line()}" + (f"\n{verdict.stack}" if verdict.stack else "")
    lost_at = (verdict.time or time.time()) - verdict.seconds
    data = {"message": {"message": f"PeerLostError: {verdict.line()}",
                        "extraInfo": {"py_callstack": text, "timestamp": str(int(lost_at))}}}
    with contextlib.suppress(OSError):  # torchrun reads it as JSON: whole or absent, never half
        atomic.write_text(Path(path), json.dumps(data), sync_dir=False)
