"""HMAC-signed unsubscribe links (one per member and channel) and the RFC 8058 headers that carry them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path


def load_secret(var_dir: Path, configured: str | None) -> bytes:
    """The signing key: from config, else generated once into var/secret.key (kept private)."""
    if configured:
        return configured.encode()
    path = var_dir / "secret.key"
    if not path.exists():
        var_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(secret: bytes, member_id: str, channel: str) -> str:
    payload = f"{member_id}\x1f{channel}".encode()
    signature = hmac.digest(secret, payload, "sha256")[:16]
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
