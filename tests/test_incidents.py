"""harness.incidents: the stacks a report carries, and the incidents file the launcher reads."""

from __future__ import annotations

import json
from pathlib import Path

from harness import incidents
from harness.health import Verdict

SUBJECT = {"rank": 1, "host": "h", "pid": 7, "start": 1.0, "step": 3, "phase": "data"}


def test_the_main_threads_stack_is_found_among_all_threads() -> None:
    everything, main = incidents.thread_stacks()
    assert "test_the_main_threads_stack_is_found_among_all_threads" in main
    assert main in everything and "Current thread" in everything


def test_incidents_are_appended_once_each_and_read_since_a_time(tmp_path: Path) -> None:
    lost = Verdict("dead", SUBJECT, 5.0, "no heartbeat for 5.0 s", 0, "a1", time=100.0)
    store = Verdict("store", {"rank": None}, 5.0, "lost contact with the store at h:1", 1, "a1", time=200.0)
    incidents.append(tmp_path, lost)
    for _ in range(3):  # every rank that lost the store appends; once per attempt is kept
        incidents.append(tmp_path, store)
    incidents.append(None, lost)  # no run directory yet: nowhere
    rows = incidents.read(tmp_path)
    assert [r["kind"] for r in rows] == ["dead", "store"]
    assert rows[0]["line"] == lost.line() and Verdict.from_json(json.dumps({k: v for k, v in rows[0].items()
                                                                            if k != "line"})) == lost
    assert [r["kind"] for r in incidents.read(tmp_path, since=150.0)] == ["store"]
    assert incidents.read(tmp_path / "nothing") == []


def test_the_error_file_names_the_cause_dated_when_the_peer_was_lost(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    incidents.write_error_file(Verdict("dead", SUBJECT, 15.0, "no heartbeat for 15.0 s", 0, "a", time=1000.0))
    data = json.loads(path.read_text())["message"]
    assert data["message"].startswith("PeerLostError: rank 1 (pid 7 on h) lost at step 3")
    assert data["extraInfo"]["timestamp"] == "985"
    incidents.write_error_file(Verdict("failed", SUBJECT, 0.0, "x", 1, "a", time=2000.0))  # the first one stays
    assert json.loads(path.read_text())["message"]["extraInfo"]["timestamp"] == "985"
