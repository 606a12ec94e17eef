"""Webhook delivery: on a thread of its own in every dispatcher, from the outbox the job's final state change
wrote in the same transaction (migration 0007). Signed (dispatcher/signing.py), retried with backoff and
jitter, at least once (receivers dedupe on the event id); a slow or dead receiver never delays dispatch.

The payload says what happened to which job, never what the document says: no OCR text, no file name (names
of medical scans are often patients' names). Applications fetch results through the client."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib import error, request
from urllib.parse import urlsplit

from .background import Periodic
from .database import Database, Row
from .signing import EVENT_HEADER, SIGNATURE_HEADER, sign

log = logging.getLogger("jobcell.webhooks")


@dataclass(frozen=True)
class WebhookOptions:
    url: str | None  # the deployment's; jobs may name their own
    secret: str | None  # without one nothing is sent: an unsigned webhook could be forged by anyone
    timeout_s: float = 10.0
    max_tries: int = 10  # about 4 hours with the default backoff
    backoff_s: float = 5.0  # the first retry's delay; doubled each time, jittered, at most an hour
    every_s: float = 1.0


def payload(row: Row) -> dict[str, Any]:
    def iso(t: datetime | None) -> str | None:
        return None if t is None else t.isoformat()
    return {
        "id": str(row["event_id"]), "type": f"job.{row['state']}", "created_at": iso(row["created_at"]),
        "job": {"id": row["job_id"], "state": row["state"], "attempts": row["attempt"], "tier": row["tier"],
                "size_class": row["size_class"], "reason": row["reason"], "pages": row["pages"],
                "metadata": row["metadata"] or {}, "submitted_at": iso(row["submitted_at"]),
                "finished_at": iso(row["finished_at"])},
    }


class WebhookDeliverer(Periodic):
    name = "webhooks"

    def __init__(self, db: Database, options: WebhookOptions) -> None:
        super().__init__(options.every_s)
        self.db, self.options = db, options
        self.http = request.build_opener(_NoRedirects)  # a webhook answers where it is asked, or fails
        self._unsigned_warned = False

    def round(self, limit: int = 16) -> bool:
        """Deliver what is due; True if there may be more."""
        lease_s = self.options.timeout_s * 3 + 30  # past it, an event being delivered is due again
        rows = self.db.fetch_all("webhooks_claim", lease_s=lease_s, limit=limit)
        for row in rows:
            if self.stopping.is_set():
                break
            self.one(row)
        return len(rows) == limit

    def one(self, row: Row) -> None:
        url = row["url"] or self.options.url
        if url is None:  # no deployment URL, and this was the deployment's copy of the event
            self.db.fetch_one("webhook_delivered", id=row["id"])
            return
        if not self.options.secret:
            if not self._unsigned_warned:
                log.warning("job %s asked for a webhook, but JOBCELL_WEBHOOK_SECRET is not set: webhooks are only "
                            "sent signed; dropping it (set the secret to send them)", row["job_id"])
                self._unsigned_warned = True
            self.db.fetch_one("webhook_delivered", id=row["id"])
            return
        body = json.dumps(payload(row), separators=(",", ":")).encode()
        error = self._post(url, body, str(row["event_id"]))
        if error is None:
            self.db.fetch_one("webhook_delivered", id=row["id"])
            log.info("job %s: webhook %s delivered (try %d)", row["job_id"], row["state"], row["tries"])
        elif row["tries"] >= self.options.max_tries:
            self.db.fetch_one("webhook_delivered", id=row["id"])
            log.warning("job %s: webhook %s to %s given up after %d tries: %s", row["job_id"], row["state"],
                        _origin(url), row["tries"], error)
        else:
            delay = min(3600.0, self.options.backoff_s * 2 ** (row["tries"] - 1)) * random.uniform(0.8, 1.2)
            self.db.fetch_one("webhook_failed", id=row["id"], delay_s=delay, error=error[:500])
            log.info("job %s: webhook %s to %s failed (%s); try %d in %.0f s", row["job_id"], row["state"],
                     _origin(url), error, row["tries"] + 1, delay)

    def _post(self, url: str, body: bytes, event_id: str) -> str | None:
        """None when the receiver took it (2xx); else what went wrong, in one line."""
        assert self.options.secret is not None
        if urlsplit(url).scheme not in ("http", "https"):  # checked at submit too: never file:// or ftp://
            return f"not an http(s) URL: {urlsplit(url).scheme}://"
        headers = {"Content-Type": "application/json", "User-Agent": "jobcell-webhooks", EVENT_HEADER: event_id,
                   SIGNATURE_HEADER: sign(self.options.secret, body)}
        try:
            with self.http.open(request.Request(url, data=body, headers=headers, method="POST"),
                                timeout=self.options.timeout_s) as response:
                status = response.status
        except error.HTTPError as e:
            status = e.code
        except (OSError, ValueError) as e:  # refused, unreachable, timed out, TLS
            return f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
        return None if 200 <= status < 300 else f"HTTP {status}"


class _NoRedirects(request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx itself becomes an HTTPError: a failed delivery, retried


def _origin(url: str) -> str:
    """scheme://host:port of a URL: its path or query may carry a token, and logs must not."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}" + (f":{u.port}" if u.port else "")
