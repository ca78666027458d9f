"""HMAC-signed unsubscribe links (one per member and channel) and the RFC 8058 headers that carry them."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from functools import lru_cache
from pathlib import Path

from engine.exceptions import ConfigError


def load_secret(var_dir: Path, configured: str | None, name: str = "secret.key",
                variable: str = "ENGINE_UNSUBSCRIBE_SECRET") -> bytes:
    """A key: CONFIGURED (from the environment VARIABLE), else generated once into var/NAME (kept private). The
    unsubscribe links' signing key is var/secret.key; the message log's audit key var/audit.key.

    Daemons starting together on a fresh var/ all end up with the same key: each writes a candidate to a file
    of its own and links it into place, which only the first can do; the others read the winner's, which is
    complete by then. (Where the file system has no hard links, the first to create the file wins, and the
    others wait until its key is written.)
    """
    if configured:
        return configured.encode()
    path = var_dir / name
    if not path.exists():
        var_dir.mkdir(parents=True, exist_ok=True)
        candidate = var_dir / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
        _write_private(candidate, secrets.token_hex(32))
        try:
            os.link(candidate, path)
        except FileExistsError:
            pass  # another daemon's key won
        except OSError:  # no hard links here
            with contextlib.suppress(FileExistsError):
                _write_private(path, candidate.read_text())
        finally:
            candidate.unlink()
        _sync_directory(var_dir)  # the name survives a power cut: links already sent stay valid
    for _ in range(100):
        key = path.read_text().strip()
        if key:
            return key.encode()
        time.sleep(0.05)  # created by another daemon a moment ago, not yet written
    raise ConfigError(f"{path} is empty (a crash while it was being created?): delete it and start again to "
                      f"generate a new key, or set {variable}")


def _write_private(path: Path, text: str) -> None:
    """Create PATH (failing if it exists), readable by its owner only, with TEXT written and synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@lru_cache(maxsize=8)
def _keyed(secret: bytes) -> hmac.HMAC:
    """HMAC-SHA256 with SECRET's key schedule done once: a copy of it signs a token in two thirds of the time."""
    return hmac.new(secret, digestmod=hashlib.sha256)


def make_token(secret: bytes, member_id: str, channel: str) -> str:
    payload = f"{member_id}\x1f{channel}".encode()
    mac = _keyed(secret).copy()
    mac.update(payload)
    signature = mac.digest()[:16]
    return f"{_b64(payload)}.{_b64(signature)}"


def read_token(secret: bytes, token: str) -> tuple[str, str] | None:
    """(member id, channel) if the token is genuine, else None."""
    try:
        payload_text, signature_text = token.split(".", 1)
        payload, signature = _unb64(payload_text), _unb64(signature_text)
    except (ValueError, TypeError):
        return None
    expected = hmac.new(secret, payload, hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(expected, signature):
        return None
    member_id, _, channel = payload.decode(errors="replace").partition("\x1f")
    return member_id, channel


def url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/unsubscribe/{token}"


def headers(link: str) -> dict[str, str]:
    return {"List-Unsubscribe": f"<{link}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
