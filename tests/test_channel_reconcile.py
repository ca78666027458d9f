"""Reconciliation, channel side: what became of a message handed over whose answer never came (Channel.reconcile).

Twilio through the real ``twilio`` client against the Twilio stand-in, which keeps what it accepted and answers
look-ups as Twilio does (paged, newest first); the outbox against real files, torn by hand the way a kill -9 tears
them. The rule that matters most: ABSENT makes the engine send again, so it is answered only when the channel
really has no record of the message.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from channels import local
from channels.base import Found, InDoubt, Outcome, OutgoingMessage, Reconciled
from channels.local import OutboxChannel
from channels.twilio import TwilioSMS
from engine.testing.standins import Faults, TwilioSandbox

PUBLIC_URL = "https://crm.example.com"
FROM = "+15005550006"
TO = "+8613800138000"


def sms(message_id: int, text: str = "【会员中心】生日快乐！回T退订", to: str = TO) -> OutgoingMessage:
    return OutgoingMessage(id=message_id, channel="sms", recipient=to, text=text, member_id=f"m{message_id}",
                           journey="birthday", step="birthday_sms")


def doubt(message: OutgoingMessage, handed_at: datetime, position: str | None = None) -> InDoubt:
    return InDoubt(message.id, message.recipient, message.text, message.subject, handed_at, position)


def summary(answers: list[Reconciled]) -> list[tuple[Found, str | None]]:
    return [(a.found, a.provider_id) for a in answers]


@pytest.fixture
def sandbox() -> Iterator[TwilioSandbox]:
    with TwilioSandbox(faults=Faults(slow_seconds=2.0)) as running:
        yield running


@pytest.fixture
def twilio(sandbox: TwilioSandbox) -> Iterator[TwilioSMS]:
    channel = TwilioSMS(sandbox.account_sid, sandbox.auth_token, public_url=PUBLIC_URL, sender=FROM,
                        base_url=sandbox.url, rate_per_second=0, concurrency=1, timeout=0.5)
    yield channel
    channel.close()


def send_in_doubt(twilio: TwilioSMS, sandbox: TwilioSandbox, kind: str, message: OutgoingMessage) -> InDoubt:
    """Send MESSAGE through fault KIND; it must come back UNCERTAIN. What the engine would then hold."""
    handed_at = datetime.now(UTC)
    sandbox.fail_next(kind)
    [result] = twilio.send_batch([message])
    assert result.outcome is Outcome.UNCERTAIN, result
    return doubt(message, handed_at)


# ---------------------------------------------------------------------- Twilio: send, lose the answer, look it up


@pytest.mark.slow  # waits for real socket timeouts or a second process
@pytest.mark.parametrize("kind", ["slow", "lost"])
def test_a_message_twilio_created_before_the_answer_was_lost_is_found(twilio: TwilioSMS, sandbox: TwilioSandbox,
                                                                      kind: str) -> None:
    in_doubt = send_in_doubt(twilio, sandbox, kind, sms(41))
    [created] = sandbox.messages()
    assert created["status"] == "queued" and created["date_sent"] is None  # a DateSent filter would miss it
    [answer] = twilio.reconcile([in_doubt])
    assert (answer.found, answer.provider_id, answer.retry_after) == (Found.SENT, created["sid"], None)
    assert created["sid"] in answer.detail and TO not in answer.detail  # numbers stay out of logs
    assert sandbox.duplicates() == {}


def test_a_dropped_request_is_absent_so_it_can_be_sent_again(twilio: TwilioSMS, sandbox: TwilioSandbox) -> None:
    """drop: closed before processing. The client could not tell (UNCERTAIN); the look-up can: ABSENT."""
    in_doubt = send_in_doubt(twilio, sandbox, "drop", sms(42))
    [answer] = twilio.reconcile([in_doubt])
    assert answer.found is Found.ABSENT
    assert answer.detail.startswith("twilio has no message to this number since ")
    [again] = twilio.send_batch([sms(42)])  # what the engine does with ABSENT
    assert again.sent and sandbox.duplicates() == {}


def test_nothing_at_all_to_the_number_is_absent(twilio: TwilioSMS, sandbox: TwilioSandbox) -> None:
    twilio.send_batch([sms(1, to="+8613900139000")])  # another member's message does not count
    [answer] = twilio.reconcile([doubt(sms(2), datetime.now(UTC))])
    assert (answer.found, answer.provider_id) == (Found.ABSENT, None)


def test_the_same_number_with_another_body_is_unknown(twilio: TwilioSMS, sandbox: TwilioSandbox) -> None:
    """Twilio may have re-encoded the body: a message to the number that does not match is not proof of absence."""
    twilio.send_batch([sms(1, text="【会员中心】积分即将过期")])
    [answer] = twilio.reconcile([doubt(sms(2), datetime.now(UTC))])
    assert (answer.found, answer.retry_after) == (Found.UNKNOWN, None)
    assert "none with this exact body" in answer.detail


def test_a_message_created_long_before_the_hand_over_is_not_this_one(twilio: TwilioSMS,
                                                                     sandbox: TwilioSandbox) -> None:
    [earlier] = twilio.send_batch([sms(1)])
    [record] = sandbox.messages()
    record["date_created"] = format_datetime(datetime.now(UTC) - timedelta(hours=2), usegmt=True)
    [answer] = twilio.reconcile([doubt(sms(2), datetime.now(UTC))])
    assert earlier.sent and answer.found is Found.ABSENT


def test_two_identical_messages_in_doubt_and_one_accepted_give_exactly_one_sent(twilio: TwilioSMS,
                                                                                sandbox: TwilioSandbox) -> None:
    first = send_in_doubt(twilio, sandbox, "lost", sms(7))
    second = send_in_doubt(twilio, sandbox, "drop", sms(8))
    [created] = sandbox.messages()
    answers = twilio.reconcile([first, second])
    assert summary(answers) == [(Found.SENT, created["sid"]), (Found.UNKNOWN, None)]
    assert "matched other messages in doubt" in answers[1].detail
    assert answers[1].retry_after is None


@pytest.mark.slow  # waits for real socket timeouts or a second process
def test_a_sid_is_matched_to_one_message_only(twilio: TwilioSMS, sandbox: TwilioSandbox) -> None:
    first = send_in_doubt(twilio, sandbox, "lost", sms(7))
    second = send_in_doubt(twilio, sandbox, "slow", sms(8))
    sids = [r["sid"] for r in sandbox.messages()]
    answers = twilio.reconcile([second, first])  # in any order: the earlier hand-over claims the older message
    assert summary(answers) == [(Found.SENT, sids[1]), (Found.SENT, sids[0])]


def test_the_look_up_pages_through_twilios_list(twilio: TwilioSMS, sandbox: TwilioSandbox) -> None:
    in_doubt = send_in_doubt(twilio, sandbox, "lost", sms(1, text="the oldest"))
    twilio.send_batch([sms(i, text=f"later {i}") for i in range(2, 9)])  # 7 newer messages to the same number
    twilio.lookup_page_size = 2
    before = sandbox.attempts
    [answer] = twilio.reconcile([in_doubt])
    assert (answer.found, answer.provider_id) == (Found.SENT, sandbox.messages()[0]["sid"])
    assert sandbox.attempts - before == 4  # 8 messages, 2 a page


def test_the_look_up_reads_a_bounded_number_of_pages(twilio: TwilioSMS, sandbox: TwilioSandbox) -> None:
    in_doubt = send_in_doubt(twilio, sandbox, "drop", sms(1, text="never created"))
    twilio.send_batch([sms(i, text=f"other {i}") for i in range(2, 9)])
    twilio.lookup_page_size, twilio.lookup_max_pages = 2, 3
    before = sandbox.attempts
    [answer] = twilio.reconcile([in_doubt])
    assert (answer.found, answer.retry_after) == (Found.UNKNOWN, None)
    assert "not all were read" in answer.detail
    assert sandbox.attempts - before == 3


def test_paging_stops_once_it_reaches_back_past_the_hand_over(twilio: TwilioSMS, sandbox: TwilioSandbox) -> None:
    twilio.send_batch([sms(i, text=f"old {i}") for i in range(1, 7)])
    for record in sandbox.messages():
        record["date_created"] = format_datetime(datetime.now(UTC) - timedelta(days=3), usegmt=True)
    twilio.send_batch([sms(7, text="new")])
    twilio.lookup_page_size = 2
    before = sandbox.attempts
    [answer] = twilio.reconcile([doubt(sms(8, text="in doubt"), datetime.now(UTC))])
    assert answer.found is Found.UNKNOWN  # "new" is in the window, with another body
    assert sandbox.attempts - before == 1  # the first page already reached back past the window


@pytest.mark.slow  # waits for real socket timeouts or a second process
@pytest.mark.parametrize(("kind", "retry_after"), [("500", 300.0), ("429", 900.0), ("drop", 300.0),
                                                   ("slow", 300.0)])
def test_a_look_up_that_fails_is_unknown_and_asked_again_later(twilio: TwilioSMS, sandbox: TwilioSandbox, kind: str,
                                                               retry_after: float) -> None:
    sandbox.faults = Faults(retry_after=900, slow_seconds=2.0)  # a 429 asking for longer than our 300 s is obeyed
    twilio.send_batch([sms(1)])
    sandbox.fail_next(kind)
    before = sandbox.attempts
    now = datetime.now(UTC)
    answers = twilio.reconcile([doubt(sms(1), now), doubt(sms(2, to="+8613900139000"), now)])
    assert [(a.found, a.retry_after) for a in answers] == [(Found.UNKNOWN, retry_after)] * 2
    assert answers[0].detail.startswith("twilio look-up failed (")
    assert answers[1].detail.startswith("not looked up: an earlier twilio look-up failed")
    assert sandbox.attempts - before == 1  # no hammering a provider that is down or limiting us


def test_an_unreachable_provider_during_look_up_is_unknown(twilio: TwilioSMS, sandbox: TwilioSandbox) -> None:
    sandbox.stop()
    [answer] = twilio.reconcile([doubt(sms(1), datetime.now(UTC))])
    assert (answer.found, answer.retry_after) == (Found.UNKNOWN, 300.0)
    assert "Connection refused" in answer.detail


def test_a_hand_over_stamped_ahead_of_the_real_clock_is_not_looked_up_by_time(twilio: TwilioSMS,
                                                                              sandbox: TwilioSandbox) -> None:
    """A virtual clock (tick --now in the future): Twilio's date_created is real time, so a window that starts
    at the virtual hand-over would miss the message and answer ABSENT: a second send."""
    twilio.send_batch([sms(1)])
    [answer] = twilio.reconcile([doubt(sms(2, text="other"), datetime.now(UTC) + timedelta(days=30))])
    assert (answer.found, answer.retry_after) == (Found.UNKNOWN, None)
    assert "later than this machine's clock" in answer.detail


def test_each_number_is_listed_once(twilio: TwilioSMS, sandbox: TwilioSandbox) -> None:
    now = datetime.now(UTC)
    twilio.send_batch([sms(1, text="a"), sms(2, text="b"), sms(3, text="c", to="+8613900139000")])
    before = sandbox.attempts
    answers = twilio.reconcile([doubt(sms(1, text="a"), now), doubt(sms(3, text="c", to="+8613900139000"), now),
                                doubt(sms(2, text="b"), now)])
    assert [a.found for a in answers] == [Found.SENT] * 3
    assert sandbox.attempts - before == 2


# ---------------------------------------------------------------------- the outbox file


def mail(message_id: int, text: str = "生日快乐！") -> OutgoingMessage:
    return OutgoingMessage(id=message_id, channel="email", recipient=f"m{message_id}@example.com", text=text,
                           member_id=f"m{message_id}", journey="birthday", step="birthday_email", subject="生日快乐")


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[OutboxChannel]:
    channel = OutboxChannel(tmp_path / "outbox" / "email.jsonl")
    yield channel
    channel.close()


def at(*ids: int, position: str | None = None) -> list[InDoubt]:
    return [doubt(mail(i), datetime.now(UTC), position) for i in ids]


def test_the_outbox_position_is_the_files_length(outbox: OutboxChannel) -> None:
    assert outbox.position() == "0"
    outbox.send_batch([mail(1), mail(2)])
    assert outbox.position() == str(outbox.path.stat().st_size)


def test_an_outbox_line_is_found_and_a_missing_one_is_absent(outbox: OutboxChannel) -> None:
    outbox.send_batch([mail(1)])
    position = outbox.position()
    [result] = outbox.send_batch([mail(2)])
    answers = outbox.reconcile(at(2, 3, position=position) + at(1))
    assert summary(answers) == [(Found.SENT, result.provider_id), (Found.ABSENT, None), (Found.SENT, "outbox-1")]
    assert answers[1].detail == f"no whole line with id 3 in outbox {outbox.path} from byte {position}"


def test_an_id_is_matched_whole_not_by_its_first_digits(outbox: OutboxChannel) -> None:
    outbox.send_batch([mail(50), mail(5000)])
    assert [a.found for a in outbox.reconcile(at(5, 500))] == [Found.ABSENT, Found.ABSENT]
    outbox.send_batch([mail(5)])
    [answer] = outbox.reconcile(at(5))
    offset = outbox.path.read_bytes().index(b'{"id": 5, ')
    assert (answer.found, answer.detail) == (Found.SENT, f"found in outbox {outbox.path} at byte {offset}")


def test_a_line_that_only_starts_like_ours_is_not_counted(outbox: OutboxChannel) -> None:
    with outbox.path.open("ab") as file:  # someone else's garbage, with our id prefix
        file.write(b'{"id": 9, "channel": garbage\n')
    [answer] = outbox.reconcile(at(9))
    assert answer.found is Found.ABSENT


def test_a_shorter_outbox_than_the_position_was_rotated(outbox: OutboxChannel) -> None:
    outbox.send_batch([mail(1), mail(2)])
    position = outbox.position()
    outbox.send_batch([mail(3)])
    outbox.path.rename(outbox.path.with_suffix(".1"))  # logrotate: the file is moved, a new one started
    outbox.path.write_bytes(b"")
    [answer] = outbox.reconcile(at(3, position=position))
    assert (answer.found, answer.retry_after) == (Found.UNKNOWN, None)
    assert "shorter than" in answer.detail and "rotated or truncated" in answer.detail


def test_a_missing_outbox_is_unknown(outbox: OutboxChannel) -> None:
    outbox.send_batch([mail(1)])
    outbox.path.unlink()
    [answer] = outbox.reconcile(at(1, position="0"))
    assert answer.found is Found.UNKNOWN and "does not exist" in answer.detail


def torn(outbox: OutboxChannel, message: OutgoingMessage, keep: int) -> None:
    """What a kill -9 in the middle of send_batch's write leaves: the first KEEP bytes of MESSAGE's line."""
    with outbox.path.open("ab") as file:
        file.write(local._line(message).encode()[:keep])


@pytest.mark.parametrize("keep", [40, len(local._line(mail(2)).encode())])  # cut mid-line; all but the newline
def test_a_torn_last_line_is_absent_and_cut_before_the_next_append(outbox: OutboxChannel, keep: int,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A line without its newline is not counted, even when its JSON is whole: the next append cuts it off, so
    counting it as sent would lose the message."""
    outbox.send_batch([mail(1)])
    whole = outbox.path.read_bytes()
    torn(outbox, mail(2), keep=keep)
    assert outbox.position() == str(len(whole))  # the next lines start where the whole ones end
    answers = outbox.reconcile(at(2, position=outbox.position()) + at(2))
    assert [a.found for a in answers] == [Found.ABSENT] * 2  # both ways: from the position, and from the start
    with caplog.at_level(logging.WARNING, logger="channels.local"):
        outbox.send_batch([mail(2)])  # the engine sends it again
    assert f"{keep} bytes of a line cut short" in caplog.text
    lines = outbox.path.read_bytes().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1, 2]  # the torn bytes are gone, the new line is clean
    assert summary(outbox.reconcile(at(2))) == [(Found.SENT, "outbox-2")]


def test_a_torn_line_longer_than_a_read_is_cut_back_to_the_last_newline(outbox: OutboxChannel,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_TAIL", 16)  # the backwards search reads several blocks
    outbox.send_batch([mail(1)])
    torn(outbox, mail(2, text="长" * 200), keep=300)
    outbox.send_batch([mail(3)])
    assert [json.loads(line)["id"] for line in outbox.path.read_bytes().splitlines()] == [1, 3]


def test_a_file_that_is_all_torn_is_emptied(outbox: OutboxChannel) -> None:
    torn(outbox, mail(1), keep=25)
    assert outbox.position() == "0"
    outbox.send_batch([mail(2)])
    assert [json.loads(line)["id"] for line in outbox.path.read_bytes().splitlines()] == [2]


def test_lines_across_read_blocks_are_all_found(outbox: OutboxChannel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_CHUNK", 97)  # blocks end in the middle of lines
    outbox.send_batch([mail(i, text="会员" * (i % 7)) for i in range(1, 201)])
    answers = outbox.reconcile(at(*range(1, 202)))
    assert [a.found for a in answers] == [Found.SENT] * 200 + [Found.ABSENT]
    offsets = [int(a.detail.rsplit(" ", 1)[1]) for a in answers[:200]]
    data = outbox.path.read_bytes()
    assert all(json.loads(data[o:data.index(b"\n", o)])["id"] == i for i, o in enumerate(offsets, 1))


def test_a_position_inside_a_line_starts_at_the_next_line(outbox: OutboxChannel) -> None:
    outbox.send_batch([mail(1), mail(2)])
    middle = str(len(local._line(mail(1)).encode()) // 2)
    assert summary(outbox.reconcile(at(1, 2, position=middle))) == [(Found.ABSENT, None),
                                                                           (Found.SENT, "outbox-2")]


def test_the_outbox_reads_from_the_position_not_from_the_start(outbox: OutboxChannel) -> None:
    outbox.send_batch([mail(1)])
    position = outbox.position()
    outbox.send_batch([mail(2)])
    assert summary(outbox.reconcile(at(1, 2, position=position))) == [(Found.ABSENT, None),
                                                                      (Found.SENT, "outbox-2")]
    assert summary(outbox.reconcile(at(1))) == [(Found.SENT, "outbox-1")]  # no position: from the start


def test_local_channels_keep_their_whole_chunk_window(outbox: OutboxChannel) -> None:
    assert (outbox.in_flight, outbox.reconcile_after) == (None, 0)


def test_two_outboxes_on_one_file_reconcile_each_others_lines(tmp_path: Path) -> None:
    """Two daemons share an outbox: each one's position is taken before the other writes."""
    path = tmp_path / "email.jsonl"
    first, second = OutboxChannel(path), OutboxChannel(path)
    try:
        before = first.position()
        second.send_batch([mail(1)])
        first.send_batch([mail(2)])
        assert summary(first.reconcile(at(2, 1, position=before))) == [
            (Found.SENT, "outbox-2"), (Found.SENT, "outbox-1")]
        assert os.path.getsize(path) == int(first.position())
    finally:
        first.close()
        second.close()


def test_the_outbox_reconcile_answers_nothing_for_nothing(outbox: OutboxChannel) -> None:
    assert outbox.reconcile([]) == []
