"""A crash loses at most the hand-over in progress, and reconciliation settles it (issue 13, items 3 and 4).

The provider here is a small stand-in that, like a real one, keeps what it accepted and can be asked about it
later; the engine's delivery, recovery and reconciliation are the real ones.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from support import Crash, Provider

from channels.base import Channel, Outcome, OutgoingMessage, SendResult
from channels.local import OutboxChannel
from engine.store import handovers
from engine.testing import Harness

pytestmark = pytest.mark.slow  # the slow tier: kills daemons and replays crashes

LAPSED = [
    {"id": f"w{i:02d}", "name": f"Member {i}", "email": f"w{i}@example.com", "timezone": "Asia/Shanghai",
     "locale": "en", "email_opt_in": True, "last_order_at": "2025-06-01T00:00:00Z", "total_spend": 800}
    for i in range(10)
]
NOON = "2026-03-02T04:00:00Z"  # 12:00 in Shanghai


def crashed_run(tmp_path: Path, db_url: str, provider: Provider) -> None:
    first = Harness(tmp_path, db_url)
    first.app._channels["email"] = provider
    first.members(*LAPSED)
    with pytest.raises(Crash):
        first.tick(NOON)
    first.app.store.close()  # the process is gone: no clean-up ran


def restarted(tmp_path: Path, db_url: str, provider: Provider) -> Harness:
    second = Harness(tmp_path, db_url)
    second.app._channels["email"] = provider
    return second


@pytest.mark.parametrize("reached_the_provider", [True, False])
def test_a_crash_mid_delivery_leaves_only_the_hand_over_in_doubt(tmp_path: Path, db_url: str,
                                                                  reached_the_provider: bool) -> None:
    """Ten messages go out in hand-overs of three; the engine dies during the second. The first three were
    answered and recorded; the second three are in doubt; the last four were never handed over."""
    provider = Provider(in_flight=3)
    provider.crash_on_call, provider.crash_before_accepting = 2, not reached_the_provider
    crashed_run(tmp_path, db_url, provider)

    h = restarted(tmp_path, db_url, provider)
    with h.app.store.connect() as conn:
        stranded = handovers.stranded_messages(conn, h.at(NOON) + timedelta(minutes=10))
    assert len(stranded) == 7
    in_doubt = [s for s in stranded if s.handed_at is not None]
    assert [s.id for s in in_doubt] == [4, 5, 6]  # the hand-over in progress, no more

    report = h.tick(h.at(NOON) + timedelta(minutes=10))  # after the crashed worker's lease ran out
    assert (report.counts["requeued"], report.counts["unknown"]) == (4, 3)
    assert report.counts["reconciled"] == 3
    assert provider.accepted == Counter({i: 1 for i in range(1, 11)})  # every message once, none twice
    rows = {r["id"]: r for r in h.log()}
    assert {r["status"] for r in rows.values()} == {"sent"}
    if reached_the_provider:  # the provider had them: recorded as sent, with its id, and why
        assert [(rows[i]["reason"], rows[i]["provider_id"]) for i in (4, 5, 6)] == [("reconciled", f"P-{i}")
                                                                                    for i in (4, 5, 6)]
    else:  # the provider never got them: sent again, once
        assert [(rows[i]["reason"], rows[i]["provider_id"]) for i in (4, 5, 6)] == [("retry", f"P-{i}")
                                                                                    for i in (4, 5, 6)]
    h.close()


def test_what_a_channel_cannot_look_up_stays_unknown_with_a_true_reason(tmp_path: Path, db_url: str) -> None:
    """A channel without look-ups (the test recorder, SendGrid) leaves the hand-over in doubt as unknown, and the
    stored text says what happened: handed over, answer never recorded, not re-sent."""
    provider = Provider(in_flight=3)
    provider.crash_on_call = 1
    provider.reconcile = Channel.reconcile.__get__(provider)  # type: ignore[method-assign]
    crashed_run(tmp_path, db_url, provider)
    h = restarted(tmp_path, db_url, provider)
    h.tick(h.at(NOON) + timedelta(minutes=10))
    rows = h.log()
    unknown = [r for r in rows if r["status"] == "unknown"]
    assert len(unknown) == 3  # the hand-over, not the batch of ten
    assert "handed to the channel" in unknown[0]["error"] and "not re-sent" in unknown[0]["error"]
    assert "cannot look messages up" in unknown[0]["error"]
    assert sum(1 for r in rows if r["status"] == "sent") == 7
    assert provider.accepted == Counter({i: 1 for i in range(1, 11)})
    h.close()


def test_an_answer_that_never_came_is_reconciled_before_any_retry(tmp_path: Path, db_url: str) -> None:
    """A timeout after the request was written (UNCERTAIN) is not retried blindly: the row is unknown until
    reconcile_after has passed, then the provider is asked; it had it, so it is never sent twice."""
    provider = Provider(in_flight=100)
    provider.answer = Outcome.UNCERTAIN
    h = Harness(tmp_path, db_url)
    h.app._channels["email"] = provider
    h.members(*LAPSED[:2])
    h.tick(NOON)
    assert [(r["status"], r["attempts"]) for r in h.log()] == [("unknown", 1)] * 2
    h.tick(h.at(NOON) + timedelta(seconds=30))  # too early: the request may still be completing
    assert {r["status"] for r in h.log()} == {"unknown"}
    report = h.tick(h.at(NOON) + timedelta(seconds=61))
    assert report.counts["reconciled"] == 2
    assert [(r["status"], r["provider_id"]) for r in h.log()] == [("sent", "P-1"), ("sent", "P-2")]
    assert provider.accepted == Counter({1: 1, 2: 1})
    h.close()


def test_an_answer_that_never_came_and_never_arrived_is_sent_again_once(tmp_path: Path, db_url: str) -> None:
    provider = Provider(in_flight=100)

    class Lost(Provider):
        def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
            self.calls += 1
            if self.calls == 1:  # the request never reached the provider, but the client cannot tell
                return [SendResult(Outcome.UNCERTAIN, error="connection reset") for _ in messages]
            return super().send_batch(messages)

    provider = Lost(in_flight=100)
    h = Harness(tmp_path, db_url)
    h.app._channels["email"] = provider
    h.members(LAPSED[0])
    h.tick(NOON)
    h.tick(h.at(NOON) + timedelta(seconds=61))
    [row] = h.log()
    assert (row["status"], row["attempts"], row["provider_id"]) == ("sent", 2, "P-1")
    assert provider.accepted == Counter({1: 1})
    h.close()


def test_on_sqlite_the_only_engine_process_recovers_at_once(tmp_path: Path) -> None:
    """With the SQLite lock held, no other engine process can be running: a dead worker's rows are recovered at
    the next tick, without waiting for its lease to run out."""
    url = f"sqlite:///{tmp_path / 'engine.db'}"
    provider = Provider(in_flight=3)
    provider.crash_on_call = 2
    crashed_run(tmp_path, url, provider)
    h = restarted(tmp_path, url, provider)
    h.app.store.acquire_process_lock("tick")
    report = h.tick(h.at(NOON) + timedelta(seconds=5))  # long before the 300 s lease ends
    assert (report.counts["requeued"], report.counts["unknown"]) == (4, 3)
    # The never-handed ones went at once; the hand-over in doubt waits until a request still in progress at the
    # provider would have finished (reconcile_after), then is asked about.
    assert Counter(r["status"] for r in h.log()) == Counter(sent=7, unknown=3)
    h.tick(h.at(NOON) + timedelta(seconds=61))
    assert {r["status"] for r in h.log()} == {"sent"}
    assert provider.accepted == Counter({i: 1 for i in range(1, 11)})
    h.close()


class CrashingOutbox(OutboxChannel):
    """The real outbox file channel, with the process dying just before or just after its write."""

    def __init__(self, path: Path, after_write: bool) -> None:
        super().__init__(path)
        self.after_write = after_write
        self.armed = True

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        if self.armed and not self.after_write:
            self.armed = False
            raise Crash()
        results = super().send_batch(messages)
        if self.armed:
            self.armed = False
            raise Crash()
        return results


@pytest.mark.parametrize("after_write", [True, False])
def test_the_outbox_is_reconciled_exactly_whatever_the_moment_of_the_crash(tmp_path: Path, db_url: str,
                                                                          after_write: bool) -> None:
    """The outbox file is its own record: every message in doubt is found in it (sent) or not (sent again), so
    none stays unknown and none is written twice."""
    outbox = tmp_path / "var" / "outbox" / "email.jsonl"
    first = Harness(tmp_path, db_url, channels="config")
    crashing = first.app._channels["email"] = CrashingOutbox(outbox, after_write)
    first.members(*LAPSED)
    with pytest.raises(Crash):
        first.tick(NOON)
    crashing.close()  # what the OS does with a dead process's files
    first.app.store.close()
    second = Harness(tmp_path, db_url, channels="config")
    report = second.tick(second.at(NOON) + timedelta(minutes=10))
    assert report.counts["unknown"] == 10  # the outbox takes a whole batch in one write: all of it in doubt
    assert report.counts["reconciled"] == 10
    lines = [json.loads(line) for line in outbox.read_text(encoding="utf-8").splitlines()]
    assert sorted(Counter(line["id"] for line in lines).items()) == [(i, 1) for i in range(1, 11)]
    rows = second.log()
    assert {r["status"] for r in rows} == {"sent"}
    assert {r["reason"] for r in rows} == {"reconciled" if after_write else "retry"}
    second.close()


def test_run_py_reconcile_settles_the_outbox_and_says_what_it_did(tmp_path: Path) -> None:
    """An operator's `run.py reconcile` after a crash (no daemon running): the batch the outbox was writing is
    looked up in its file, and the output says so, in figures; the members not reached yet go at the next tick."""
    from click.testing import CliRunner

    from engine.cli.main import main

    url = f"sqlite:///{tmp_path / 'engine.db'}"
    outbox = tmp_path / "var" / "outbox" / "email.jsonl"
    first = Harness(tmp_path, url, channels="config", config={"scheduler": {"batch_size": 4}})
    crashing = first.app._channels["email"] = CrashingOutbox(outbox, after_write=True)
    first.members(*LAPSED)
    with pytest.raises(Crash):
        first.tick(NOON)
    crashing.close()
    first.app.store.close()
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "config.yaml"), "reconcile"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "after a crash: 0 message(s) never handed to a channel were queued again; 4 handed over" in result.output
    assert "email: 4 sent (the channel has them: logged sent)" in result.output
    assert "4 settled, 0 still unknown" in result.output
    second = Harness(tmp_path, url, channels="config")
    assert [r["status"] for r in second.log()] == ["sent"] * 4
    second.tick(second.at(NOON) + timedelta(minutes=1))
    assert [r["status"] for r in second.log()] == ["sent"] * 10
    lines = [json.loads(line)["id"] for line in outbox.read_text(encoding="utf-8").splitlines()]
    assert sorted(lines) == list(range(1, 11))
    second.close()


def test_a_slow_provider_never_gets_two_copies(tmp_path: Path, db_url: str) -> None:
    """Issue 13, item 4: answers slower than the client's timeout (the provider did accept), resets after the
    request was written, and refusals, through the real twilio client against the stand-in. Timeouts and resets
    are reconciled by looking the message up, never retried blindly: the provider gets each SMS once."""
    from engine.testing.standins import Faults, TwilioSandbox

    faults = Faults(slow=0.2, lost=0.1, too_many=0.1, slow_seconds=1.5)
    with TwilioSandbox(faults=faults, seed=11) as box:
        h = Harness(tmp_path, db_url, config={"channels": {"sms": {
            "provider": "twilio", "account_sid": box.account_sid, "auth_token": box.auth_token,
            "from": "+15005550006", "base_url": box.url, "rate_per_second": 0, "timeout": 1,
            "reconcile_after": 2, "concurrency": 4}}})
        h.app._channels.pop("sms")  # the real adapter, built from the config
        h.members(*({"id": f"b{i}", "phone": f"+86138001380{i:02d}", "birthday": "1990-05-20",
                     "timezone": "Asia/Shanghai", "locale": "en", "sms_opt_in": True} for i in range(30)))
        now = h.at("2026-05-20T10:01:00+08:00")
        for _ in range(12):
            h.tick(now)
            if not h.log(status="queued") and not h.log(status="unknown"):
                break
            now += timedelta(minutes=2)
        rows = [r for r in h.log() if r["channel"] == "sms"]
        h.close()
    assert len(rows) == 30 and {r["status"] for r in rows} == {"sent"}
    assert box.duplicates() == {}
    assert sorted(Counter(m["to"] for m in box.messages()).values()) == [1] * 30
    reconciled = [r for r in rows if r["reason"] == "reconciled"]
    assert reconciled  # some answers never came and were settled by a look-up, with the provider's id
    assert {r["provider_id"] for r in rows} == {m["sid"] for m in box.messages()}


def test_answers_that_could_not_be_recorded_are_recovered_at_the_next_tick(tmp_path: Path, db_url: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The process lives on but recording a chunk's answers fails (a bug, the database refusing): the next tick
    finds its own rows still `sending`, and its hand-over says which reached the channel: those are reconciled,
    the rest sent once. Never re-sent blindly: the next delivery's hand-over must not hide the failed one."""
    from engine.tick.delivery import Delivery

    provider = Provider(in_flight=3)
    h = Harness(tmp_path, db_url)
    h.app._channels["email"] = provider
    h.members(*LAPSED)
    real = Delivery.save_results
    calls = {"n": 0}

    def fails_on_the_second_chunk(self: Delivery, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("the database refused the answers")
        real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Delivery, "save_results", fails_on_the_second_chunk)
    first = h.tick(NOON)
    assert first.errors and "refused the answers" in first.errors[0]
    report = h.tick(h.at(NOON) + timedelta(seconds=61))
    assert (report.counts["requeued"], report.counts["unknown"], report.counts["reconciled"]) == (4, 3, 3)
    assert {r["status"] for r in h.log()} == {"sent"}
    assert provider.accepted == Counter({i: 1 for i in range(1, 11)})
    h.close()
