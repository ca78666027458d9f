"""Benchmark, not a test: OutboxChannel.reconcile over a large outbox file, and the send path it must not slow.

    python bench/outbox_reconcile.py [--lines N] [--in-doubt K] [--batch B] [--dir PATH]

Builds an outbox of N lines (default 1,000,000) through OutboxChannel.send_batch, B messages a batch (default
1,000, one write and fsync each, as the engine writes them), with bodies like the engine's (mostly CJK). Then
times reconcile() for K messages in doubt (default 100: the default in_flight window), half of them in the last
batch and half never written:

- from the start of the file (no position: every line is read, the worst case);
- from the position taken just before the last batch (the usual case after a crash or a timeout).

Figures printed: the send path's messages per second, the file's size, each reconcile's seconds and MB/s, and
the process's peak RSS before and after the scans (reconcile streams the file in blocks of a few MB: its
memory does not grow with the file). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from channels.base import Found, InDoubt, OutgoingMessage  # noqa: E402
from channels.local import OutboxChannel  # noqa: E402

BODY = "【会员中心】{name}，您的 {points} 积分将于本月底过期，立即兑换好礼：https://crm.example.com/r/{id} 回T退订"


def message(i: int) -> OutgoingMessage:
    return OutgoingMessage(id=i, channel="email", recipient=f"member{i}@example.com",
                           text=BODY.format(name=f"会员{i}", points=i % 5000, id=i), member_id=f"m{i}",
                           journey="points_expiry", step="reminder", subject="您的积分即将过期",
                           html=f"<p>{BODY.format(name=f'会员{i}', points=i % 5000, id=i)}</p>",
                           headers={"List-Unsubscribe": f"<https://crm.example.com/unsubscribe/{i}>"})


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/outbox_reconcile.py", description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--in-doubt", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the file (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.lines < args.batch or args.in_doubt < 2 or args.batch < args.in_doubt // 2:
        parser.error("--lines must be at least --batch, --in-doubt at least 2 and at most twice --batch")

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        channel = OutboxChannel(Path(folder) / "email.jsonl")
        sent = time.perf_counter()
        last_position = "0"
        for start in range(1, args.lines + 1, args.batch):
            if start + args.batch > args.lines:
                last_position = channel.position()
            channel.send_batch([message(i) for i in range(start, min(start + args.batch, args.lines + 1))])
        sent = time.perf_counter() - sent
        size = channel.path.stat().st_size
        print(f"outbox: {args.lines:,} lines, {size / 1e6:,.0f} MB, written in {sent:.1f} s "
              f"({args.lines / sent:,.0f} messages/s through send_batch, batches of {args.batch:,})")

        present = range(args.lines - args.in_doubt // 2 + 1, args.lines + 1)
        absent = range(args.lines + 1, args.lines + 1 + args.in_doubt - len(present))
        now = datetime.now(UTC)
        before = peak_mb()
        for label, position in (("from the start (no position)", None),
                                (f"from the last batch's position ({int(last_position):,})", last_position)):
            doubts = [InDoubt(m.id, m.recipient, m.text, m.subject, now, position)
                      for m in map(message, [*present, *absent])]
            started = time.perf_counter()
            answers = channel.reconcile(doubts)
            took = time.perf_counter() - started
            read = size - int(position or 0)
            found = sum(1 for a in answers if a.found is Found.SENT)
            missing = sum(1 for a in answers if a.found is Found.ABSENT)
            print(f"reconcile {len(doubts)} in doubt {label}: {took:.3f} s, {read / 1e6 / took:,.0f} MB/s "
                  f"({found} found, {missing} absent)")
        print(f"peak RSS: {before:.0f} MB before the scans, {peak_mb():.0f} MB after")
        channel.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
