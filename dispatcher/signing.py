"""Webhook signatures, one scheme for the dispatcher that signs and the applications that verify: an HMAC-SHA256
of "<unix time>.<body>" under the deployment's secret, sent as `Jobcell-Signature: t=<unix time>,v1=<hex>`.
The time is signed too, so a captured request cannot be replayed after the tolerance."""

from __future__ import annotations

import hashlib
import hmac
import time

from .errors import JobcellError

SIGNATURE_HEADER = "Jobcell-Signature"
EVENT_HEADER = "Jobcell-Event-Id"


class BadSignature(JobcellError):
    """A webhook request that was not signed with this secret, or not recently."""


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The Jobcell-Signature header value for this body."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_mac(secret, t, body)}"


def verify(secret: str, header: str | None, body: bytes, tolerance_s: float = 300.0,
           now: float | None = None) -> None:
    """Raise BadSignature unless `header` signs exactly `body` under `secret`, within tolerance_s of now."""
    if not header:
        raise BadSignature(f"no {SIGNATURE_HEADER} header")
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        raise BadSignature(f"{SIGNATURE_HEADER} has no timestamp") from None
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        raise BadSignature(f"{SIGNATURE_HEADER} is older than {tolerance_s:.0f} s (or from the future): a replay?")
    if not hmac.compare_digest(parts.get("v1", ""), _mac(secret, t, body)):
        raise BadSignature("the signature does not match this body and secret")
