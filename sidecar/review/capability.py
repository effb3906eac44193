"""Capability tokens for the status URL a caller gets when its answer was escalated.

A token is `<review id>.<HMAC-SHA256 of the id>` under a secret kept in the state directory
(`status-url.key`, created once with mode 0600), so whoever holds the URL may read the item's
status and decision without a reviewer token, and nobody can forge one for another item. The
secret is per state directory: replicas sharing a queue share it through that directory.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

__all__ = ["KEY_NAME", "CapabilitySigner"]

KEY_NAME = "status-url.key"
_SIG_BYTES = 20


class CapabilitySigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a capability secret needs at least 16 bytes")
        self._secret = secret

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> CapabilitySigner:
        """Read the directory's secret, creating it (atomically, owner-only) on first use."""
        path = state_dir / KEY_NAME
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            pass
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        secret = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            # Another process created it between our read and our create: use theirs.
            return cls(path.read_bytes())
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        return cls(secret)

    def _sig(self, review_id: str) -> str:
        mac = hmac.new(self._secret, b"review-status:" + review_id.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:_SIG_BYTES]).decode().rstrip("=")

    def token(self, review_id: str) -> str:
        return f"{review_id}.{self._sig(review_id)}"

    def verify(self, token: str) -> str | None:
        """The review id a token grants, or None for a forged or mangled token."""
        review_id, _, sig = token.rpartition(".")
        if not review_id or not sig:
            return None
        if not hmac.compare_digest(sig.encode(), self._sig(review_id).encode()):
            return None
        return review_id
