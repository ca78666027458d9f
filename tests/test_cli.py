"""The command line as an operator and an auditor use it: tick, simulate, log, audit, member, serve."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text

from engine.audit.messagelog import FIELDS
from engine.cli.main import main
from engine.testing import REPO

MEMBERS = """id,name,email,phone,timezone,locale,total_spend,last_order_at,email_opt_in,sms_opt_in
c1,王芳,wang@example.com,13900139000,Asia/Shanghai,zh-CN,1200,2025-12-01T00:00:00Z,true,true
c2,Tom,tom@example.com,,Europe/London,en,300,2025-11-01T00:00:00Z,false,false
c3,李雷,li@example.com,13700137000,Asia/Shanghai,zh-CN,4900,2026-02-20T00:00:00Z,true,true
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "config.yaml").write_text(
        f"database: {{url: 'sqlite:///var/engine.db'}}\nrules_dir: {REPO / 'rules'}\n"
        f"templates_dir: {REPO / 'templates'}\n", encoding="utf-8")
    (tmp_path / "members.csv").write_text(MEMBERS, encoding="utf-8")
    return tmp_path


def cli(project: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(project / "config.yaml"), *args], catch_exceptions=False)


def test_import_tick_and_log_as_jsonl_with_the_contract_fields(project: Path) -> None:
    assert cli(project, "import", "members", str(project / "members.csv")).exit_code == 0
    result = cli(project, "tick", "--now", "2026-03-02T12:00:00+08:00")
    assert result.exit_code == 0, result.output
    assert "enrolled=2" in result.output  # c1 and c2 are lapsed; c3 ordered 10 days ago
    rows = [json.loads(line) for line in cli(project, "log", "--format", "jsonl").output.splitlines()]
    rows.sort(key=lambda r: r["member_id"])
    assert [(r["member_id"], r["status"]) for r in rows] == [("c1", "sent"), ("c2", "suppressed")]
    assert set(FIELDS) <= set(rows[0])
    assert rows[1]["error"] == "member has not opted in to email" and rows[1]["reason"] == "consent"
    assert rows[0]["created_at"].startswith("2026-03-02T04:00:00")  # the --now clock, recorded in UTC

    suppressed = cli(project, "log", "--status", "suppressed", "--format", "csv").output
    parsed = list(csv.DictReader(io.StringIO(suppressed)))
    assert [r["member_id"] for r in parsed] == ["c2"]
    assert "c2" in cli(project, "log", "--member", "c2").output


def test_a_purchase_event_from_the_command_line_raises_the_tier_and_the_next_tick_congratulates(
        project: Path) -> None:
    cli(project, "import", "members", str(project / "members.csv"))
    result = cli(project, "event", "c3", "purchase", "--prop", "amount=150", "--prop", "order_id=X1",
                 "--at", "2026-03-02T10:00:00+08:00")
    assert result.exit_code == 0 and "tier" in result.output
    cli(project, "tick", "--now", "2026-03-02T10:05:00+08:00")
    rows = [json.loads(x) for x in cli(project, "log", "--member", "c3", "--format", "jsonl").output.splitlines()]
    assert [r["step"] for r in rows] == ["congrats_email", "congrats_sms"]
    assert "银卡会员" in rows[0]["subject"]
    shown = cli(project, "member", "show", "c3").output
    assert "银卡会员 (silver)" in shown and "tier_upgrade v1" in shown


def test_bad_input_gets_one_clear_line_and_exit_1(project: Path) -> None:
    bad = project / "bad.csv"
    bad.write_text("id,email\nok1,ok1@example.com\nbad1,not-an-email\n", encoding="utf-8")
    result = cli(project, "import", "members", str(bad))
    assert result.exit_code == 1
    assert f"{bad}:3: email 'not-an-email' is not a valid address" in result.output
    assert "1 loaded, 1 skipped" in result.output
    result = cli(project, "event", "nobody", "login")
    assert result.exit_code == 1 and "member 'nobody' does not exist" in result.output
    assert "Traceback" not in result.output
    assert cli(project, "tick", "--now", "yesterday").exit_code == 2  # usage error
    assert cli(project, "log", "--status", "lost").exit_code == 2


@pytest.mark.slow
def test_simulate_records_virtual_time_and_reports_what_happened(project: Path) -> None:
    cli(project, "import", "members", str(project / "members.csv"))
    result = cli(project, "simulate", "--from", "2026-03-02T00:00:00Z", "--to", "2026-03-12T00:00:00Z",
                 "--every", "6h")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in cli(project, "log", "--member", "c1", "--format", "jsonl").output.splitlines()]
    assert [r["step"] for r in rows] == ["first_touch", "sms_offer"]
    sms_sent = rows[1]["sent_at"]
    assert sms_sent.startswith("2026-03-09") or sms_sent.startswith("2026-03-10")  # 7 days later, virtual time


@pytest.mark.slow
def test_audit_verify_passes_then_names_the_first_altered_row(project: Path) -> None:
    cli(project, "import", "members", str(project / "members.csv"))
    cli(project, "simulate", "--from", "2026-03-02T00:00:00Z", "--to", "2026-03-12T00:00:00Z", "--every", "6h")
    ok = cli(project, "audit", "verify")
    assert ok.exit_code == 0 and "hash chain intact" in ok.output
    engine = create_engine(f"sqlite:///{project / 'var' / 'engine.db'}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE messages SET body = 'altered' WHERE id = 2"))
    engine.dispose()
    bad = cli(project, "audit", "verify")
    assert bad.exit_code == 1 and "row 2" in bad.output and "changed" in bad.output


def test_audit_verify_finds_a_points_balance_edited_behind_the_ledger(project: Path) -> None:
    cli(project, "import", "members", str(project / "members.csv"))
    ok = cli(project, "audit", "verify")
    assert ok.exit_code == 0 and "points balances equal their ledgers" in ok.output
    engine = create_engine(f"sqlite:///{project / 'var' / 'engine.db'}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE members SET points = points + 500 WHERE id = 'c1'"))
    engine.dispose()
    bad = cli(project, "audit", "verify")
    assert bad.exit_code == 1 and "member c1 shows" in bad.output and "the ledger sums to" in bad.output


def test_forgetting_a_member_erases_personal_data_and_the_chain_still_verifies(project: Path) -> None:
    cli(project, "import", "members", str(project / "members.csv"))
    cli(project, "tick", "--now", "2026-03-02T12:00:00+08:00")
    result = cli(project, "member", "forget", "c1", "--yes")
    assert result.exit_code == 0 and "1 log rows redacted" in result.output
    rows = [json.loads(x) for x in cli(project, "log", "--member", "c1", "--format", "jsonl").output.splitlines()]
    assert rows[0]["recipient"] is None and rows[0]["body"] is None and rows[0]["hash"]
    verified = cli(project, "audit", "verify")
    assert verified.exit_code == 0 and "1 erased" in verified.output
    assert "wang@example.com" not in cli(project, "member", "show", "c1").output


def test_forgetting_a_member_erases_their_lines_in_the_outbox_and_keeps_every_position(project: Path) -> None:
    """The outbox is a copy of every message: the member's address and text go from it too, the other members'
    lines stay byte for byte, and no line moves (reconciliation reads the file by byte position)."""
    cli(project, "import", "members", str(project / "members.csv"))
    (project / "more.csv").write_text(MEMBERS.splitlines()[0] + "\nc4,Ann,ann@example.com,,Asia/Shanghai,en,"
                                      "900,2025-12-01T00:00:00Z,true,false\n", encoding="utf-8")
    cli(project, "import", "members", str(project / "more.csv"))
    cli(project, "tick", "--now", "2026-03-02T12:00:00+08:00")
    outbox = project / "var" / "outbox" / "email.jsonl"
    before = outbox.read_bytes()
    assert b"wang@example.com" in before and b"ann@example.com" in before
    result = cli(project, "member", "forget", "c1", "--yes")
    assert result.exit_code == 0 and "1 outbox lines erased" in result.output, result.output
    after = outbox.read_bytes()
    assert len(after) == len(before) and b"wang@example.com" not in after and "王芳".encode() not in after
    old_lines, new_lines = before.splitlines(keepends=True), after.splitlines(keepends=True)
    for old, new in zip(old_lines, new_lines, strict=True):
        assert len(old) == len(new)
        record = json.loads(new)
        if record["member_id"] == "c1":
            assert (record["to"], record["text"], record["redacted"]) == ("", "", True)
        else:
            assert old == new
    again = cli(project, "member", "forget", "c1", "--yes")
    assert "0 outbox lines erased" in again.output and outbox.read_bytes() == after


@pytest.mark.slow
def test_serve_ticks_on_its_interval_and_stops_gracefully_on_sigterm(project: Path) -> None:
    config = project / "config.yaml"
    config.write_text(config.read_text() + "scheduler: {interval: 1}\nweb: {listen: \"127.0.0.1:0\"}\n",
                      encoding="utf-8")
    assert cli(project, "import", "members", str(project / "members.csv")).exit_code == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "--config", str(config), "serve"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline() if proc.stderr else ""
            lines.append(line)
            if sum("tick " in x for x in lines) >= 2:
                break
        second = subprocess.run([sys.executable, str(REPO / "run.py"), "--config", str(config), "tick"],
                                capture_output=True, text=True)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert sum("tick " in x for x in lines) >= 2, output
    assert proc.returncode == 0, output
    assert "finishing the batch in hand" in output and "stopped after" in output
    assert second.returncode == 1 and "only one may run" in second.stderr


def test_application_logs_mask_phone_numbers_and_email_addresses() -> None:
    from engine.logs import mask

    masked = mask("sent to wang.fang@example.com and +8613900139000")
    assert "wang.fang" not in masked and "13900139000" not in masked
    assert "w***@example.com" in masked and "****00" in masked


@pytest.mark.slow
def test_the_demo_builds_a_database_that_verifies_and_shows_the_programme(project: Path) -> None:
    """A small demo (the README's first command, scaled down): it runs, prints the summary a newcomer needs,
    and leaves a database whose log verifies and whose balances equal their ledgers."""
    result = cli(project, "demo", "--members", "120", "--days", "20", "--seed", "3")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "journey         entered" in out and "programme: regular" in out and "points held" in out
    assert "try next:" in out and "report --programme" in out
    verified = cli(project, "audit", "verify")
    assert verified.exit_code == 0, verified.output
    assert "120 points balances equal their ledgers" in verified.output
    report = json.loads(cli(project, "report", "--programme", "--format", "json").output)
    assert report["members"] == 120 and sum(report["tiers"].values()) == 120
    assert report["points_expired"] > 0  # balances brought into the demo were earned over the past year
    # The purchase the demo suggests really takes that member to the next tier, and the next tick congratulates.
    suggested = next(line.split("python run.py ", 1)[1] for line in out.splitlines()
                     if " purchase --prop amount=" in line)
    event_args = suggested.split(" && ")[0].split()
    recorded = cli(project, *event_args)
    assert recorded.exit_code == 0 and "raised the member's tier" in recorded.output, recorded.output
    ticked = cli(project, "tick")
    assert ticked.exit_code == 0, ticked.output
    member_id = event_args[event_args.index("event") + 1]
    rows = [json.loads(x) for x in cli(project, "log", "--member", member_id, "--format", "jsonl").output.splitlines()]
    assert ("tier_upgrade", "congrats_email") in {(r["journey"], r["step"]) for r in rows}
