"""Local stand-ins for Twilio's Messages API and SendGrid's mail/send: same wire format, no network, faults on demand.

Tests point the real adapters (and so the real ``twilio`` and ``sendgrid`` clients) at them; ops can point
config.yaml at them with ``python -m engine.testing.standins``. Each runs a threaded HTTP server on 127.0.0.1,
records what it accepted (and counts what it accepted twice: duplicates()), can fail on purpose (a seeded share
of 429 / 500 / slow answers / dropped or lost connections, or permanent errors for chosen recipients) and can
post signed delivery callbacks the way the providers do: Twilio's form posts signed with X-Twilio-Signature,
SendGrid's event batches signed with ECDSA. The Twilio one also answers look-ups (GET Messages.json, paged as
Twilio pages, and GET Messages/{Sid}.json), which is how the adapter reconciles a message in doubt.

Faults, and what the client sees:

    429, 500  refused before any processing: an error answer
    drop      closed without processing and without an answer (the client reads "connection closed")
    slow      processed (accepted and recorded) at once, answered only after slow_seconds: a client that times
              out first leaves behind a message that exists at the provider
    lost      processed, then the connection is reset without an answer (the client reads "connection reset")

A client cannot tell drop from lost, nor a slow answer from one that never comes: all three are "the request
was written and no answer came", and only a look-up (or a callback) says whether the provider has the message.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

from engine.testing.sendgrid_standin import SendGridSandbox
from engine.testing.standin_base import (
    SENDGRID_EVENTS_PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    TWILIO_STATUS_PATH,
    Faults,
    Hangup,
    Reply,
    Sandbox,
)
from engine.testing.twilio_standin import TwilioSandbox

# The stand-ins' public face: tests, benches and ``python -m engine.testing.standins`` import from here.
__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "Faults", "Hangup", "Reply", "Sandbox", "SendGridSandbox",
           "TwilioSandbox", "config_snippet", "main", "unanswered_port"]


@contextlib.contextmanager
def unanswered_port() -> Iterator[str]:
    """The URL of a port whose listen queue is full: the kernel drops further SYNs, so a client's connect times
    out without a byte of its request written (a provider that is down behind a black-holing network)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = []
        try:
            for _ in range(8):  # the queue holds backlog + 1 connections; the other SYNs go unanswered
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(listener.getsockname())
                fillers.append(filler)
            yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            for filler in fillers:
                filler.close()


def config_snippet(twilio: TwilioSandbox, sendgrid: SendGridSandbox, public_url: str | None) -> str:
    lines = ["channels:", "  sms:", "    provider: twilio", f"    account_sid: {twilio.account_sid}",
             f"    auth_token: {twilio.auth_token}", '    from: "+15005550006"', f"    base_url: {twilio.url}",
             "    rate_per_second: 0", "  email:", "    provider: sendgrid", f"    api_key: {sendgrid.api_key}",
             '    from: "会员中心 <members@example.com>"', f"    base_url: {sendgrid.url}",
             f"    webhook_public_key: {sendgrid.public_key}", "    rate_per_second: 0"]
    if public_url:
        lines += ["web:", f"  public_url: {public_url}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.testing.standins",
                                     description="Run local Twilio and SendGrid stand-ins until Ctrl-C.")
    parser.add_argument("--twilio-port", type=int, default=8901)
    parser.add_argument("--sendgrid-port", type=int, default=8902)
    parser.add_argument("--callback-url", help="the engine's web base URL; delivered callbacks go to "
                        f"URL{TWILIO_STATUS_PATH} and URL{SENDGRID_EVENTS_PATH}")
    parser.add_argument("--deliver-after", type=float, default=3.0, metavar="SECONDS")
    parser.add_argument("--transient", type=float, default=0.0, metavar="SHARE",
                        help="share of requests answered 429 or 500 (half each), e.g. 0.3")
    parser.add_argument("--slow", type=float, default=0.0, metavar="SHARE",
                        help="share of requests processed at once but answered only after --slow-seconds")
    parser.add_argument("--slow-seconds", type=float, default=2.0, metavar="S",
                        help="how late a slow answer comes (default 2; make it longer than the client's timeout)")
    parser.add_argument("--drop", type=float, default=0.0, metavar="SHARE",
                        help="share of requests closed without processing and without an answer")
    parser.add_argument("--lost", type=float, default=0.0, metavar="SHARE",
                        help="share of requests processed, then reset without an answer")
    args = parser.parse_args(argv)
    shares = {"--transient": args.transient, "--slow": args.slow, "--drop": args.drop, "--lost": args.lost}
    if any(not 0 <= share <= 1 for share in shares.values()) or sum(shares.values()) > 1:
        parser.error("--transient, --slow, --drop and --lost must each be within 0..1 and add up to at most 1, "
                     "got: " + ", ".join(f"{name} {share:g}" for name, share in shares.items()))
    for name, seconds in (("--deliver-after", args.deliver_after), ("--slow-seconds", args.slow_seconds)):
        if seconds < 0:
            parser.error(f"{name} must be 0 or more seconds, got: {seconds:g}")
    faults = Faults(too_many=args.transient / 2, server_error=args.transient / 2, slow=args.slow,
                    drop=args.drop, lost=args.lost, slow_seconds=args.slow_seconds)
    options: dict[str, Any] = {"faults": faults, "callback_url": args.callback_url,
                               "deliver_after": args.deliver_after if args.callback_url else None}
    # Ctrl-C (or a SIGTERM) stops it even when it was started with SIGINT ignored, as a shell does for a
    # background job: Python then installs no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    twilio = TwilioSandbox(port=args.twilio_port, **options)
    sendgrid = SendGridSandbox(port=args.sendgrid_port, **options)
    with twilio, sendgrid:
        try:
            print(f"Twilio sandbox on {twilio.url}, SendGrid sandbox on {sendgrid.url}. In config.yaml:\n")
            print(config_snippet(twilio, sendgrid, args.callback_url), flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(f"\nstopped: {len(twilio.received)} SMS and {len(sendgrid.received)} emails accepted")
            for box in (twilio, sendgrid):
                if box.duplicates():
                    print(f"{box.name}: accepted more than once: {box.duplicates()} (our message id: times)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
