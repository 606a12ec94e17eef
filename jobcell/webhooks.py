"""For applications that receive jobcell's webhooks: check that a request came from your dispatcher."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dispatcher.signing import EVENT_HEADER, SIGNATURE_HEADER, BadSignature, verify


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: float = 300.0) -> dict[str, Any]:
    """The event (parsed JSON) if `body` was signed with `secret` in the last `tolerance_s` seconds; BadSignature
    otherwise. Pass the raw body, before any JSON parsing: the signature covers its exact bytes. Deliveries are
    at least once: dedupe on the event's "id" (also in the Jobcell-Event-Id header)."""
    header = next((v for k, v in headers.items() if k.lower() == SIGNATURE_HEADER.lower()), None)
    verify(secret, header, body, tolerance_s)
    event: dict[str, Any] = json.loads(body)
    return event


__all__ = ["EVENT_HEADER", "SIGNATURE_HEADER", "BadSignature", "verify_webhook"]
