"""The compose worker never outlives its daemon, and no wait on it is unbounded (issue 13, items 5 and 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.audit import chain as audit
from engine.testing import REPO, Harness

CLOCK = "2026-06-15T04:00:00Z"  # 12:00 in Shanghai

pytestmark = pytest.mark.slow  # the slow tier: kills and hangs compose worker processes

# A daemon-like process: an App whose compose worker is started, then waits to be killed.
DAEMON = """
import json, sys, time
from engine.app import App
from engine.config import load_config
app = App(load_config(sys.argv[1]))
worker = app.runner._worker()
worker.start()
while not worker.pids():
    time.sleep(0.02)
print(json.dumps(worker.pids()), flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: only its exit status waits for a parent to collect it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_compose_worker_exits_when_its_daemon_dies(tmp_path: Path, how: signal.Signals) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"database": {"url": f"sqlite:///{tmp_path / 'engine.db'}"},
                                  "rules_dir": str(REPO / "rules"), "templates_dir": str(REPO / "templates"),
                                  "var_dir": str(tmp_path / "var"), "scheduler": {"compose_worker": "on"}}),
                      encoding="utf-8")
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, str(config)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert daemon.stdout is not None
        [worker] = json.loads(daemon.stdout.readline())
        helpers = [p for p in _children(daemon.pid) if p != worker]  # multiprocessing's resource tracker
        assert _alive(worker)
        os.kill(daemon.pid, how)
        daemon.wait(timeout=10)
        started = time.monotonic()
        while (_alive(worker) or any(_alive(p) for p in helpers)) and time.monotonic() - started < 20:
            time.sleep(0.05)
        left = [p for p in (worker, *helpers) if _alive(p)]
        assert left == [], f"still running {time.monotonic() - started:.1f}s after the daemon died: {left}"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if daemon.stdout is not None:
            daemon.stdout.close()


def test_a_compose_worker_that_hangs_is_given_up_and_the_batch_composed_here(tmp_path: Path, db_url: str) -> None:
    """The worker stops answering (SIGSTOP: alive, holding its batch). The runner waits half a lease, not for good,
    then composes the claimed batches itself: every member gets one message."""
    shutil_rules = tmp_path / "rules"
    import shutil

    shutil.copytree(REPO / "rules", shutil_rules)
    for path in (shutil_rules / "journeys").glob("*.yaml"):
        if path.name != "winback.yaml":
            path.unlink()
    h = Harness(tmp_path, db_url, rules=shutil_rules, config={
        "scheduler": {"batch_size": 5, "compose_worker": "on", "lease_seconds": 20}, "frequency_caps": []})
    h.members(*({"id": f"P{i:02d}", "email": f"p{i}@example.com", "email_opt_in": True, "timezone": "Asia/Shanghai",
                 "locale": "en", "last_order_at": "2026-01-01T00:00:00Z"} for i in range(12)))
    worker = h.app.runner._worker()
    assert worker is not None
    worker.start()
    deadline = time.monotonic() + 30
    while not worker.pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    [pid] = worker.pids()
    time.sleep(1.0)  # let it finish starting up, so that it is stopped with jobs to come, not mid-import
    os.kill(pid, signal.SIGSTOP)
    try:
        h.tick(CLOCK)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert sorted(m.member_id for m in h.sent()) == [f"P{i:02d}" for i in range(12)]
    assert h.app.runner.compose_worker is None  # given up, for this App's life
    with h.app.store.connect() as conn:
        assert audit.verify(conn).ok
    h.close()
