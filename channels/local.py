"""Local channels that need no credentials: ``console`` prints, ``outbox`` appends JSON lines to a file."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from pathlib import Path
from typing import IO

from channels.base import Channel, Found, InDoubt, Outcome, OutgoingMessage, Reconciled, SendResult

log = logging.getLogger(__name__)

_JSON = json.JSONEncoder(ensure_ascii=False)  # what json.dumps(..., ensure_ascii=False) builds on every call
# Every outbox line starts with its id (see _line): reconcile reads ids at the start of lines, in bytes, and parses
# the JSON of a line only when its id is one it looks for.
_LINE_ID = re.compile(rb'\n\{"id": (-?[0-9]+)')
_CHUNK = 4 << 20  # bytes read at once by reconcile: its memory is this plus the longest line
_TAIL = 64 << 10  # bytes read at once, backwards, looking for the end of the last whole line


def _text(value: str | None) -> str:
    return "null" if value is None else str(encode_basestring(value))


def _record(m: OutgoingMessage) -> dict[str, object]:
    return {"id": m.id, "channel": m.channel, "to": m.recipient, "member_id": m.member_id, "journey": m.journey,
            "step": m.step, "subject": m.subject, "text": m.text, "html": m.html, "headers": m.headers}


def _line(m: OutgoingMessage) -> str:
    """json.dumps(_record(m), ensure_ascii=False), written out: the same text, a few times faster per message.

    Each string goes through the encode_basestring json.dumps itself uses; anything that is not a string or
    None (encode_basestring refuses it) goes back to json.dumps.
    """
    if type(m.id) is not int:
        return _JSON.encode(_record(m))
    try:
        headers = ", ".join(f"{encode_basestring(k)}: {encode_basestring(v)}" for k, v in m.headers.items())
        return (f'{{"id": {m.id}, "channel": {_text(m.channel)}, "to": {_text(m.recipient)}, '
                f'"member_id": {_text(m.member_id)}, "journey": {_text(m.journey)}, "step": {_text(m.step)}, '
                f'"subject": {_text(m.subject)}, "text": {_text(m.text)}, "html": {_text(m.html)}, '
                f'"headers": {{{headers}}}}}')
    except TypeError:
        return _JSON.encode(_record(m))


def _lock(descriptor: int, exclusive: bool) -> None:
    """Take (EXCLUSIVE) or release an advisory lock on the whole file."""
    fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_UN)


class ConsoleChannel(Channel):
    provider = "console"

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        for m in messages:
            head = f"--- {m.channel} #{m.id} to {m.recipient} ({m.journey}/{m.step})"
            lines = [head] + ([f"Subject: {m.subject}"] if m.subject else []) + [m.text, ""]
            self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        return [SendResult(Outcome.SENT, f"console-{m.id}") for m in messages]


class OutboxChannel(Channel):
    """Appends one JSON object per message to a JSONL file, one write and fsync per batch.

    Each batch is written under an exclusive ``flock`` on the file, so several daemons sharing one outbox
    (PostgreSQL deployments) never interleave parts of their lines. A write cut short (kill -9, a full disk)
    leaves a last line without its newline: the next batch first cuts it off, so that its own lines start clean,
    and reconcile never counts such a line as sent.
    """

    provider = "outbox"

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Bytes (each line is encoded once, on its own: see send_batch), appending; readable for the one-byte
        # pread that checks the file ends with a newline.
        self._handle = path.open("a+b")

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        if not messages:
            return []
        # Each line encoded to UTF-8 on its own, then joined as bytes: joining the str lines first and encoding
        # the whole took nearly twice as long for the mostly-CJK bodies of a batch (6.4 vs 3.7 us a message).
        data = b"\n".join([_line(m).encode() for m in messages]) + b"\n"
        descriptor = self._handle.fileno()
        _lock(descriptor, exclusive=True)
        try:
            _cut_torn_line(descriptor, self.path)
            self._handle.write(data)
            self._handle.flush()
            os.fsync(descriptor)
        finally:
            _lock(descriptor, exclusive=False)
        return [SendResult(Outcome.SENT, f"outbox-{m.id}") for m in messages]

    def position(self) -> str:
        """The file's length up to the end of its last whole line (its length, but after a torn write): the next
        batch's lines start there or later."""
        descriptor = self._handle.fileno()
        return str(_whole_length(descriptor, os.fstat(descriptor).st_size))

    def reconcile(self, messages: Sequence[InDoubt]) -> list[Reconciled]:
        """Read the file from the smallest position given (from its start when a message has none) and look for a
        whole line with each message's id: found = SENT, not found = ABSENT, file gone or shorter than a position
        (rotated, truncated) = UNKNOWN."""
        if not messages:
            return []
        try:
            with self.path.open("rb") as file:
                size = os.fstat(file.fileno()).st_size
                starts = [_offset(m.position) for m in messages]
                readable = [(m, start) for m, start in zip(messages, starts, strict=True) if start <= size]
                wanted = {str(m.id).encode() for m, _ in readable}
                found = _scan(file, min(start for _, start in readable), wanted) if readable else {}
        except FileNotFoundError:
            return [Reconciled(Found.UNKNOWN, detail=f"outbox {self.path} does not exist (moved or deleted?): "
                               "cannot tell whether it was written") for _ in messages]
        except (OSError, ValueError) as exc:
            detail = f"outbox {self.path} could not be read: {exc}"
            return [Reconciled(Found.UNKNOWN, detail=detail) for _ in messages]
        answers = []
        for message, start in zip(messages, starts, strict=True):
            at = found.get(str(message.id).encode())
            if start > size:
                answers.append(Reconciled(Found.UNKNOWN, detail=(
                    f"outbox {self.path} is {size} bytes, shorter than the {start} it had before the hand-over "
                    "(rotated or truncated?): cannot tell whether it was written")))
            elif at is not None:
                answers.append(Reconciled(Found.SENT, f"outbox-{message.id}",
                                          detail=f"found in outbox {self.path} at byte {at}"))
            else:
                answers.append(Reconciled(Found.ABSENT, detail=(
                    f"no whole line with id {message.id} in outbox {self.path} from byte {start}")))
        return answers

    def forget(self, member_id: str) -> int:
        """Blank the address, subject, text, html and headers of MEMBER_ID's lines, in place and under the file's
        lock. Each line keeps its length (padded with spaces, which JSON allows), so the byte positions recorded
        for reconciliation stay true and no line moves."""
        needle = b'"member_id": ' + encode_basestring(member_id).encode()
        erased = 0
        try:
            file = self.path.open("r+b")
        except FileNotFoundError:
            return 0
        with file:
            descriptor = file.fileno()
            _lock(descriptor, exclusive=True)
            try:
                offset = 0
                for line in file:
                    if needle in line and line.endswith(b"\n"):
                        blank = _blanked(line, member_id)
                        if blank is not None:
                            os.pwrite(descriptor, blank, offset)
                            erased += 1
                    offset += len(line)
                os.fsync(descriptor)
            finally:
                _lock(descriptor, exclusive=False)
        return erased

    def close(self) -> None:
        self._handle.close()


_ERASED = ("to", "subject", "text", "html")


def _blanked(line: bytes, member_id: str) -> bytes | None:
    """LINE (one whole outbox line, with its newline) with the member's data erased, padded to the same length;
    None when it is not that member's, not valid or already erased."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("member_id") != member_id or record.get("redacted"):
        return None
    for key in _ERASED:
        if record.get(key) is not None:
            record[key] = ""
    record["headers"] = {}
    record["redacted"] = True
    text = _JSON.encode(record).encode()
    if len(text) > len(line) - 1:  # a line too short for the marker: erased all the same
        del record["redacted"]
        text = _JSON.encode(record).encode()
    return text + b" " * (len(line) - 1 - len(text)) + b"\n"


def _offset(position: str | None) -> int:
    """A position() value back as a byte offset; None (never taken) = the start of the file."""
    if position is None:
        return 0
    if not position.isdigit():
        raise ValueError(f"an outbox position must be a byte offset, got: {position!r}")
    return int(position)


def _whole_length(descriptor: int, size: int) -> int:
    """SIZE if the file ends with a newline (one small pread), else where its last whole line ends."""
    if size == 0 or os.pread(descriptor, 1, size - 1) == b"\n":
        return size
    end = size
    while end > 0:  # rare: only after a torn write
        start = max(0, end - _TAIL)
        newline = os.pread(descriptor, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _cut_torn_line(descriptor: int, path: Path) -> None:
    """Drop a last line left without its newline by a write cut short (kill -9): the next line starts clean.
    The caller holds the file's lock."""
    size = os.fstat(descriptor).st_size
    whole = _whole_length(descriptor, size)
    if whole < size:
        log.warning("outbox %s ended with %d bytes of a line cut short (a write interrupted by a crash?): "
                    "dropped them before appending", path, size - whole)
        os.ftruncate(descriptor, whole)


def _scan(file: IO[bytes], start: int, wanted: set[bytes]) -> dict[bytes, int]:
    """{id: offset of its line} for the WANTED ids (as bytes) with a whole, valid line from START on."""
    found: dict[bytes, int] = {}
    for base, block in _blocks(file, start):
        for number in wanted.intersection(_LINE_ID.findall(block)):
            offset = _valid_line(block, number)
            if offset is not None and number not in found:
                found[number] = base + offset
        if len(found) == len(wanted):
            break
    return found


def _blocks(file: IO[bytes], start: int) -> Iterator[tuple[int, bytes]]:
    """Whole lines from START on, a few megabytes at a time, each block preceded by a newline (so that every
    line in it follows one); BASE + an offset in the block is the offset in the file. A last line without its
    newline is never given. START is a line's start (see position()); were it inside a line, the rest of that
    line would never be counted: it is not valid JSON on its own (quotes inside strings are escaped, and a nested
    object is followed by its parent's closing brace)."""
    file.seek(start)
    carry = b""
    base = start
    while chunk := file.read(_CHUNK):
        cut = chunk.rfind(b"\n")
        if cut < 0:
            carry += chunk
            continue
        block = b"\n" + carry + chunk[: cut + 1]
        yield base - 1, block
        base += len(block) - 1
        carry = chunk[cut + 1 :]


def _valid_line(block: bytes, number: bytes) -> int | None:
    """Offset in BLOCK of the first whole line that starts with id NUMBER (and not a longer one: the comma) and
    is valid JSON, or None."""
    needle = b'\n{"id": ' + number + b", "
    at = block.find(needle)
    while at >= 0:
        end = block.index(b"\n", at + 1)
        try:
            if isinstance(json.loads(block[at + 1 : end]), dict):
                return at + 1
        except ValueError:
            pass  # cut or damaged: not a line we wrote whole
        at = block.find(needle, end)
    return None
