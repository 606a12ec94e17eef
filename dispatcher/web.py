"""`jobcell web`: a read-mostly dashboard of the queue, the memory budget and each job's attempts.

Server-rendered HTML with inline SVG charts, no JavaScript and nothing from a CDN. It reads through the same
read models as the CLI (PostgresQueue, jobcell.Client), so it shows what `jobcell status` / `show` print.

Why the standard library (wsgiref) and no web framework: the dashboard is a handful of GET pages and two POST
forms on loopback; a WSGI callable keeps it mountable behind any WSGI server, and escaping is done here by
construction (`tag()` escapes every value it is given; only markup it built itself passes through), which is
what a template engine's autoescape would have bought.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import math
import os
import re
import secrets
from base64 import b64decode
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs, quote, urlencode
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from jobcell import Client

from .classes import format_bytes, parse_seconds
from .errors import ConfigError, DatabaseUnavailable, NotFound, StateError
from .models import Job, JobState
from .queue import PostgresQueue
from .settings import Settings
from .views import NO_RESULT, Attempt, MemorySpan, Timing
from .wiring import build_queue

log = logging.getLogger("jobcell.web")

COOKIE = "jobcell_session"
COOKIE_MAX_AGE_S = 8 * 3600
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
LIVE_DISPATCHER_S = 60.0  # as `jobcell status`: seen within four heartbeats of the default lease
WINDOWS = ("10min", "1h", "6h", "24h")  # of the memory-over-time chart (any ?window= from 1min to 7d works)
MAX_WINDOW_S = 7 * 86400.0
MAX_TEXT_PAGES = 200  # the OCR text shown on a job page; `jobcell show --text` / export give all of it
MAX_FORM_BYTES = 4096


# -- HTML that escapes by construction ---------------------------------------------------------------------

class Safe(str):
    """Markup built here (by tag() or esc()); every other value put into a page is escaped."""

    __slots__ = ()


def esc(value: object) -> Safe:
    return value if isinstance(value, Safe) else Safe(html.escape(str(value), quote=True))


def _join(children: Iterable[object]) -> str:
    out: list[str] = []
    for c in children:
        if c is None or c is False:
            continue
        if isinstance(c, str | int | float):
            out.append(esc(c))
        elif isinstance(c, Iterable):
            out.append(_join(c))
        else:
            out.append(esc(c))
    return "".join(out)


VOID = {"meta", "link", "input", "br", "hr", "img"}


def tag(name: str, attrs: dict[str, object] | None = None, *children: object) -> Safe:
    """<name attrs>children</name>: attribute values and text are escaped; None / False leave an attribute out,
    True writes it bare. Names (of tags and attributes) are code, never data."""
    a = "".join(f" {k}" if v is True else f' {k}="{esc(v)}"'
                for k, v in (attrs or {}).items() if v is not None and v is not False)
    if name in VOID:
        return Safe(f"<{name}{a}>")
    return Safe(f"<{name}{a}>{_join(children)}</{name}>")


def _n(x: float) -> str:
    """A coordinate for SVG."""
    return f"{x:.1f}"


# -- formatting --------------------------------------------------------------------------------------------

def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _ago(t: datetime | None, now: datetime) -> Safe:
    if t is None:
        return esc("-")
    return tag("time", {"datetime": t.isoformat(), "title": t.isoformat(timespec="seconds")},
               _dur(max(0.0, (now - t).total_seconds())) + " ago")


def _pages(done: int, total: int | None) -> str:
    return f"{done}/{total}" if total is not None else (str(done) if done else "-")


def _badge(word: str | None) -> Safe:
    w = word or "running"
    return tag("span", {"class": f"badge b-{_css(w)}"}, w)


def _css(word: str) -> str:
    """A class-name-safe form of a state / outcome word (they are fixed words, but a class name is markup)."""
    return re.sub(r"[^a-z0-9_-]", "", word.lower()) or "x"


# -- charts (inline SVG, drawn here; colours come from the stylesheet's classes) ---------------------------

def progress_bar(done: int, total: int | None, width: int = 140) -> Safe:
    label = _pages(done, total) + " pages"
    if not total:
        return tag("span", {"class": "muted"}, label)
    share = min(1.0, done / total)
    return tag("span", {"class": "progress"},
               tag("svg", {"width": width, "height": 12, "viewBox": f"0 0 {width} 12", "role": "img",
                           "aria-label": label},
                   tag("title", None, label),
                   tag("rect", {"class": "track", "x": 0, "y": 0, "width": width, "height": 12, "rx": 3}),
                   tag("rect", {"class": "fill-done", "x": 0, "y": 0, "width": _n(width * share), "height": 12,
                                "rx": 3})),
               " ", label)


def gauge(used: int, budget: int | None, title: str) -> Safe:
    """A half-circle gauge of memory limits in use against the budget."""
    share = used / budget if budget else 0.0
    cls = "g-ok" if share < 0.75 else "g-warn" if share < 0.9 else "g-full"
    r, cx, cy = 50.0, 60.0, 60.0
    angle = math.pi * (1 - min(share, 1.0))
    x, y = cx + r * math.cos(angle), cy - r * math.sin(angle)
    arc = f"M {_n(cx - r)} {_n(cy)} A {_n(r)} {_n(r)} 0 0 1 {_n(x)} {_n(y)}"
    label = f"{share:.0%}" if budget else "?"
    what = (f"{format_bytes(used)} of the {format_bytes(budget)} budget" if budget
            else f"{format_bytes(used)} in use (budget unknown)")
    return tag("figure", {"class": "gauge"},
               tag("svg", {"width": 120, "height": 72, "viewBox": "0 0 120 72", "role": "img", "aria-label": what},
                   tag("title", None, f"{title}: {what}"),
                   tag("path", {"class": "g-track", "d": f"M {_n(cx - r)} {_n(cy)} A {_n(r)} {_n(r)} 0 0 1 "
                                                         f"{_n(cx + r)} {_n(cy)}"}),
                   tag("path", {"class": f"g-value {cls}", "d": arc}) if used and budget else None,
                   tag("text", {"x": _n(cx), "y": _n(cy - 6), "class": "g-label", "text-anchor": "middle"}, label)),
               tag("figcaption", None, tag("strong", None, title), tag("br"), what))


Steps = list[tuple[datetime, int]]
PALETTE = 6  # series colours in the stylesheet: .series-0 ... .series-5


def held_over_time(attempts: list[MemorySpan], since: datetime, now: datetime) -> dict[str, Steps]:
    """Per pool, the memory limits held as a step function: (time, bytes from then on), exact to each claim and
    end (sampling would miss the short jobs that are most of a queue's life)."""
    events: dict[str, dict[datetime, int]] = {}
    for a in attempts:
        start, end = max(a.claimed_at, since), min(a.finished_at or now, now)
        if end <= start and a.finished_at is not None:
            continue
        by_time = events.setdefault(a.pool, {})
        by_time[start] = by_time.get(start, 0) + int(a.memory_limit_bytes)
        if a.finished_at is not None:  # one still running holds its limit to the end of the chart
            by_time[end] = by_time.get(end, 0) - int(a.memory_limit_bytes)
    out: dict[str, list[tuple[datetime, int]]] = {}
    for pool, by_time in events.items():
        level, steps = 0, [(since, 0)]
        for t in sorted(by_time):
            level += by_time[t]
            steps.append((t, level))
        out[pool] = steps
    return out


def budget_chart(attempts: list[MemorySpan], budget: int | None, since: datetime, now: datetime) -> Safe:
    """Memory limits held per pool over the window, as step lines, against the budget (dashed)."""
    series = held_over_time(attempts, since, now)
    pools = sorted(series)
    peaks = {p: max(b for _, b in series[p]) for p in pools}
    w, h, left, bottom = 640.0, 150.0, 64.0, 20.0
    top = max([budget or 0, *peaks.values(), 1])
    span = max((now - since).total_seconds(), 1.0)

    def x(t: datetime) -> float:
        return left + (w - left - 8) * (t - since).total_seconds() / span

    def y(b: float) -> float:
        return 8 + (h - bottom - 8) * (1 - b / top)

    parts: list[object] = [tag("title", None, f"memory limits held per pool over the last {_dur(span)}")]
    for frac in (0.0, 0.5, 1.0):
        parts.append(tag("line", {"class": "grid", "x1": _n(left), "x2": _n(w - 8), "y1": _n(y(top * frac)),
                                  "y2": _n(y(top * frac))}))
        parts.append(tag("text", {"class": "axis", "x": _n(left - 6), "y": _n(y(top * frac) + 4),
                                  "text-anchor": "end"}, format_bytes(int(top * frac))))
    parts.append(tag("text", {"class": "axis", "x": _n(left), "y": _n(h - 4)}, f"-{_dur(span)}"))
    parts.append(tag("text", {"class": "axis", "x": _n(w - 8), "y": _n(h - 4), "text-anchor": "end"}, "now"))
    if budget:
        parts.append(tag("line", {"class": "budget-line", "x1": _n(left), "x2": _n(w - 8), "y1": _n(y(budget)),
                                  "y2": _n(y(budget))}))
    legend: list[object] = []
    for i, pool in enumerate(pools):
        d = [f"M {_n(x(since))} {_n(y(0))}"]
        for t, b in series[pool][1:]:
            d.append(f"H {_n(x(t))} V {_n(y(b))}")
        d.append(f"H {_n(x(now))}")
        parts.append(tag("path", {"class": f"series series-{i % PALETTE}", "d": " ".join(d)},
                         tag("title", None, f"pool {pool}: at most {format_bytes(peaks[pool])}")))
        legend.append(tag("span", {"class": f"key key-{i % PALETTE}"},
                          f"pool {pool} (at most {format_bytes(peaks[pool])})"))
    if not pools:
        legend.append(tag("span", {"class": "key-none muted"}, "no memory held in this window"))
    if budget:
        legend.append(tag("span", {"class": "key key-budget"}, f"budget {format_bytes(budget)}"))
    return tag("figure", {"class": "chart", "id": "budget-history"},
               tag("svg", {"width": int(w), "height": int(h), "viewBox": f"0 0 {int(w)} {int(h)}", "role": "img"},
                   parts),
               tag("figcaption", None, legend))


def timings_chart(rows: list[Timing]) -> Safe:
    """The latest jobs: time waiting (queued, backing off, starting) and time running, as stacked bars."""
    if not rows:
        return tag("p", {"class": "muted"}, "no job has run yet")
    row_h, left, w = 16.0, 56.0, 640.0
    top = max(max(float(r.total_s or 0), float(r.run_s or 0)) for r in rows) or 1.0
    scale = (w - left - 90) / top
    h = row_h * len(rows) + 22
    parts: list[object] = [tag("title", None, "queue wait and run time of the latest jobs")]
    for i, r in enumerate(rows):
        run = float(r.run_s or 0)
        wait = max(0.0, float(r.total_s or 0) - run)
        yy = 4 + i * row_h
        tip = f"job {r.id} ({r.state}): waited {_dur(wait)}, ran {_dur(run)}"
        parts.append(tag("a", {"href": f"/jobs/{int(r.id)}"},
                         tag("text", {"class": "axis", "x": _n(left - 6), "y": _n(yy + 11), "text-anchor": "end"},
                             f"#{r.id}"),
                         tag("rect", {"class": "seg-wait", "x": _n(left), "y": _n(yy), "width": _n(wait * scale),
                                      "height": _n(row_h - 4)}, tag("title", None, tip)),
                         tag("rect", {"class": f"seg-{_css(str(r.state))}", "x": _n(left + wait * scale),
                                      "y": _n(yy), "width": _n(max(run * scale, 1.0)), "height": _n(row_h - 4)},
                             tag("title", None, tip)),
                         tag("text", {"class": "axis", "x": _n(left + (wait + run) * scale + 6),
                                      "y": _n(yy + 11)}, f"{_dur(wait)} + {_dur(run)}")))
    parts.append(tag("text", {"class": "axis", "x": _n(left), "y": _n(h - 4)},
                     f"0 to {_dur(top)}; grey: waiting (queued, backoff, starting); colour: running, by state"))
    return tag("figure", {"class": "chart"},
               tag("svg", {"width": int(w), "height": int(h), "viewBox": f"0 0 {int(w)} {int(h)}", "role": "img"},
                   parts))


def attempts_timeline(job: Job, attempts: list[Attempt], now: datetime) -> Safe:
    """Each attempt on one time axis from submit: waiting (grey), starting (light), running (its outcome)."""
    if not attempts:
        return tag("p", {"class": "muted"}, "no attempt yet")
    t0 = job.created_at
    ends = [a.finished_at or now for a in attempts]
    t1 = max([job.finished_at or now, *ends])
    span = max((t1 - t0).total_seconds(), 0.5)
    row_h, left, w = 28.0, 190.0, 720.0
    h = row_h * len(attempts) + 24

    def x(t: datetime) -> float:
        return left + (w - left - 10) * max(0.0, (t - t0).total_seconds()) / span

    parts: list[object] = [tag("title", None, "attempts over time, from submit")]
    prev_end = t0
    for i, a in enumerate(attempts):
        yy = 4 + i * row_h
        claimed, started, end = a.claimed_at, a.started_at or a.claimed_at, a.finished_at or now
        outcome = a.outcome or "running"
        parts.append(tag("text", {"class": "axis", "x": _n(left - 8), "y": _n(yy + 15), "text-anchor": "end"},
                         f"#{a.attempt} {a.tier} · {outcome}"))
        segments = [("seg-wait", prev_end, claimed, "waiting"), ("seg-start", claimed, started, "starting"),
                    (f"seg-{_css(outcome)}", started, end, outcome)]
        for cls, s, e, what in segments:
            if e <= s and what in ("waiting", "starting"):
                continue
            parts.append(tag("rect", {"class": cls, "x": _n(x(s)), "y": _n(yy), "height": _n(row_h - 8),
                                      "width": _n(max(x(e) - x(s), 1.5))},
                             tag("title", None, f"attempt {a.attempt}: {what} {_dur((e - s).total_seconds())}")))
        prev_end = end
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        xx = left + (w - left - 10) * frac
        parts.append(tag("text", {"class": "axis", "x": _n(xx), "y": _n(h - 4),
                                  "text-anchor": "start" if frac == 0 else "end" if frac == 1 else "middle"},
                         _dur(span * frac)))
    legend = [tag("span", {"class": "key key-wait"}, "waiting (queued, backoff)"),
              tag("span", {"class": "key key-start"}, "starting its cell"),
              tag("span", {"class": "key-none"}, "then running, coloured by outcome")]
    return tag("figure", {"class": "chart"},
               tag("svg", {"width": int(w), "height": int(h), "viewBox": f"0 0 {int(w)} {int(h)}", "role": "img",
                           "id": "timeline"}, parts),
               tag("figcaption", None, legend))


def memory_bar(now: int | None, limit: int) -> Safe:
    """A running unit's memory in use against its limit, as its runtime last measured it."""
    if now is None:
        return tag("span", {"class": "muted"}, "not measured")
    return tag("span", {"class": "memory-now", "title": f"{format_bytes(now)} of {format_bytes(limit)}"},
               peak_bar(now, limit, limit, None, width=120), " ", format_bytes(now))


def peak_bar(peak: int | None, limit: int, scale: int, outcome: str | None, width: int = 220) -> Safe:
    """One attempt's peak memory inside its limit; every bar of a job on the same scale (its largest limit)."""
    lw = width * limit / max(scale, 1)
    pw = lw * min(1.0, (peak or 0) / max(limit, 1))
    label = (f"peak {format_bytes(peak)} of {format_bytes(limit)} ({(peak or 0) / max(limit, 1):.0%})"
             if peak is not None else f"limit {format_bytes(limit)}, no peak measured")
    return tag("svg", {"width": width + 2, "height": 16, "viewBox": f"0 0 {width + 2} 16", "role": "img",
                       "aria-label": label, "class": "peak"},
               tag("title", None, label),
               tag("rect", {"class": "bar-limit", "x": 1, "y": 1, "width": _n(lw), "height": 14}),
               tag("rect", {"class": "bar-peak-oom" if outcome == "oom" else "bar-peak", "x": 1, "y": 1,
                            "width": _n(pw), "height": 14}) if peak else None)


def _attempt_reason(a: Attempt) -> str:
    """What the cell said (its last stderr line), else why the dispatcher ended it, else what the outcome means."""
    if a.error:
        return str(a.error)
    if a.outcome == "oom":
        return f"killed at its {format_bytes(a.memory_limit_bytes)} memory cap"
    if a.kill_reason:
        return {"deadline": "killed at the class deadline", "cancel": "killed: cancel requested",
                "orphan": "killed: its job had moved on", "refused": "killed: its output broke the contract"
                }.get(a.kill_reason, str(a.kill_reason))
    return ""


# -- authentication ----------------------------------------------------------------------------------------

def _digest(value: str) -> bytes:
    """Fixed-length digests are compared, so that compare_digest leaks neither content nor length."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(_digest(given), _digest(expected))


class BadRequest(Exception):
    """A filter or parameter the dashboard cannot use: 400 with this message."""


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


class Auth:
    """A bearer token (or ?token= once, then a cookie), or HTTP basic auth; at least one must be configured."""

    def __init__(self, token: str | None, user: str | None, password: str | None) -> None:
        if (user is None) != (password is None):
            raise ConfigError("set both JOBCELL_WEB_USER and JOBCELL_WEB_PASSWORD for basic auth, or neither")
        if token is None and user is None:
            raise ConfigError("the dashboard needs authentication: set JOBCELL_WEB_TOKEN (at least 16 characters, "
                              "e.g. `openssl rand -hex 24`) or JOBCELL_WEB_USER and JOBCELL_WEB_PASSWORD")
        self._token, self._user, self._password = token, user, password
        # The cookie holds a value derived from the token, not the token itself
        self._session = (hmac.new(token.encode(), b"jobcell-web-session", hashlib.sha256).hexdigest()
                         if token else None)

    @classmethod
    def from_settings(cls, s: Settings) -> Auth:
        return cls(s.web.token.get_secret_value() if s.web.token else None, s.web.user,
                   s.web.password.get_secret_value() if s.web.password else None)

    def check(self, environ: WSGIEnvironment) -> Response | None:
        """None when the request is authenticated; otherwise the response to send: the redirect that turns a
        ?token= into the cookie, or 401."""
        query = parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
        given = query.pop("token", [None])[0]
        if self._token and self._session and given is not None and environ.get("REQUEST_METHOD") == "GET" \
                and _same(given, self._token):
            # Once: the token leaves the address bar (and the history) for an HttpOnly, SameSite=Strict cookie.
            rest = urlencode([(k, v) for k, vs in query.items() for v in vs])
            location = "/" + quote(str(environ.get("PATH_INFO") or "/")).lstrip("/") + (f"?{rest}" if rest else "")
            secure = "; Secure" if environ.get("wsgi.url_scheme") == "https" else ""
            return Response(HTTPStatus.SEE_OTHER, b"", "text/plain; charset=utf-8", [
                ("Location", location),
                ("Set-Cookie", f"{COOKIE}={self._session}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly; "
                               f"SameSite=Strict{secure}")])
        header = str(environ.get("HTTP_AUTHORIZATION", ""))
        scheme, _, value = header.partition(" ")
        if self._token and scheme.lower() == "bearer" and _same(value.strip(), self._token):
            return None
        if self._user and self._password and scheme.lower() == "basic":
            try:
                user, _, password = b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            ok_user, ok_password = _same(user, self._user), _same(password, self._password)  # both, always
            if ok_user and ok_password:
                return None
        if self._session:
            for part in str(environ.get("HTTP_COOKIE", "")).split(";"):
                name, _, v = part.strip().partition("=")
                if name == COOKIE and _same(v, self._session):
                    return None
        challenge = 'Basic realm="jobcell", charset="UTF-8"' if self._user else 'Bearer realm="jobcell"'
        return Response(HTTPStatus.UNAUTHORIZED,
                        b"authentication required: a bearer token (Authorization: Bearer ..., or open /?token=... "
                        b"once), or the dashboard's user and password\n",
                        "text/plain; charset=utf-8", [("WWW-Authenticate", challenge)])


# -- the application ---------------------------------------------------------------------------------------

class Dashboard:
    """The WSGI application. Thread-safe: PostgresQueue runs one statement at a time on its connection."""

    def __init__(self, settings: Settings, queue: PostgresQueue, auth: Auth, budget: int | None) -> None:
        self.s, self.q, self.auth, self.budget = settings, queue, auth, budget
        self.client = Client(settings, queue=queue)
        self.classes = [c.name for c in settings.table().classes]
        # Forms carry this token; a page from another site cannot read it (SameSite=Strict does the rest)
        self._csrf = secrets.token_hex(32)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            resp = self._handle(environ)
        except BadRequest as e:
            resp = self._error(HTTPStatus.BAD_REQUEST, str(e))
        except NotFound as e:
            resp = self._error(HTTPStatus.NOT_FOUND, str(e))
        except StateError as e:
            resp = self._error(HTTPStatus.CONFLICT, str(e))
        except DatabaseUnavailable as e:
            resp = self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(e))
        except Exception:
            log.exception("dashboard request failed: %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            resp = self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (logged by the server)")
        headers = [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body))),
                   ("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
                   ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"),
                   ("Cache-Control", "no-store"), *resp.headers]
        start_response(f"{resp.status} {HTTPStatus(resp.status).phrase}", headers)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else resp.body]

    def _handle(self, environ: WSGIEnvironment) -> Response:
        path = str(environ.get("PATH_INFO") or "/")
        method = str(environ.get("REQUEST_METHOD", "GET"))
        if path == "/static/jobcell.css" and method in ("GET", "HEAD"):  # no data in it: served to anyone
            return Response(HTTPStatus.OK, STYLESHEET.encode(), "text/css; charset=utf-8",
                            [("Cache-Control", "max-age=3600")])
        denied = self.auth.check(environ)
        if denied is not None:
            return denied
        query = {k: v[0] for k, v in parse_qs(str(environ.get("QUERY_STRING", ""))).items()}
        if method in ("GET", "HEAD"):
            if path == "/":
                return self._page("Overview", self.overview(query.get("window") or "1h"), refresh=5)
            if path == "/jobs":
                return self._page("Jobs", self.job_list(query))
            m = re.fullmatch(r"/jobs/(\d{1,18})", path)
            if m:
                job_id = int(m.group(1))
                body, final = self.job_page(job_id)
                return self._page(f"Job {job_id}", body, refresh=None if final else 3)
            return self._error(HTTPStatus.NOT_FOUND, "no such page")
        if method == "POST":
            m = re.fullmatch(r"/jobs/(\d{1,18})/(cancel|retry)", path)
            if m:
                return self.action(environ, int(m.group(1)), m.group(2))
            return self._error(HTTPStatus.NOT_FOUND, "no such action")
        return self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not served here")

    # -- layout ------------------------------------------------------------------------------------------

    def _page(self, title: str, body: Safe, refresh: int | None = None, status: int = HTTPStatus.OK) -> Response:
        doc = Safe("<!doctype html>") + tag(
            "html", {"lang": "en"},
            tag("head", None,
                tag("meta", {"charset": "utf-8"}),
                tag("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
                # Live without JavaScript: the page reloads itself while there is something to watch
                tag("meta", {"http-equiv": "refresh", "content": str(refresh)}) if refresh else None,
                tag("title", None, f"{title} · jobcell"),
                tag("link", {"rel": "stylesheet", "href": "/static/jobcell.css"})),
            tag("body", None,
                tag("header", None,
                    tag("nav", None,
                        tag("a", {"href": "/", "class": "brand"}, "jobcell"),
                        tag("a", {"href": "/"}, "Overview"),
                        tag("a", {"href": "/jobs"}, "Jobs"),
                        tag("a", {"href": "/jobs?state=running"}, "Running"),
                        tag("a", {"href": "/jobs?state=failed"}, "Failed")),
                    tag("span", {"class": "muted"},
                        "actions on" if self.s.web.actions else "read-only")),
                tag("main", None, body)))
        return Response(status, doc.encode())

    def _error(self, status: int, message: str) -> Response:
        body = Safe(tag("h1", None, f"{status} {HTTPStatus(status).phrase}") + tag("p", {"class": "error"}, message))
        return self._page(f"{status}", body, status=status)

    # -- pages -------------------------------------------------------------------------------------------

    def overview(self, window: str) -> Safe:
        try:
            window_s = min(max(parse_seconds(window), 60.0), MAX_WINDOW_S)
        except ValueError as e:
            raise BadRequest(f"window: {e}") from None
        now = self.q.now()
        counts = self.q.counts()
        running = self.q.running_jobs()
        sources = {j.id: j for j in self.q.jobs([r.id for r in running])}
        live = [d for d in self.q.dispatchers() if float(d.silent_s) < LIVE_DISPATCHER_S]
        history = self.q.budget_history(window_s)
        timings = self.q.recent_timings(30)

        classes = self.classes + sorted({r.size_class for r in counts} - set(self.classes))
        grid = {(r.state, r.size_class): int(r.n) for r in counts}

        def cell(state: str | None, cls: str | None) -> Safe:
            n = sum(v for (st, c), v in grid.items() if state in (None, st) and cls in (None, c))
            if not n:
                return tag("td", {"class": "num muted"}, 0)
            q = urlencode({k: v for k, v in (("state", state), ("class", cls)) if v})
            return tag("td", {"class": "num"}, tag("a", {"href": f"/jobs?{q}"}, n))

        counts_table = tag(
            "table", {"id": "counts"},
            tag("thead", None, tag("tr", None, tag("th", None, "state"), [tag("th", {"class": "num"}, c)
                                                                          for c in classes],
                                   tag("th", {"class": "num"}, "all"))),
            tag("tbody", None, [tag("tr", None, tag("th", None, _badge(st.value)),
                                    [cell(st.value, c) for c in classes], cell(st.value, None))
                                for st in JobState]))

        used: dict[str, int] = {}
        for r in running:
            used[r.pool] = used.get(r.pool, 0) + int(r.memory_limit_bytes or 0)
        pools = sorted({self.s.pool, *used, *(d.pool for d in live)})
        gauges = tag("div", {"class": "gauges", "id": "budget"},
                     [gauge(used.get(p, 0), self.budget, f"pool {p}") for p in pools])

        running_rows = []
        for r in running:
            j = sources.get(r.id)
            name = os.path.basename((j.source if j and j.source else None) or r.document_uri) or r.document_uri
            running_rows.append(tag(
                "tr", None, tag("td", None, tag("a", {"href": f"/jobs/{int(r.id)}"}, r.id)),
                tag("td", {"class": "doc"}, name), tag("td", None, r.tier),
                tag("td", {"class": "num"}, r.attempt),
                tag("td", {"class": "num"}, format_bytes(r.memory_limit_bytes)),
                tag("td", None, memory_bar(r.memory_now, int(r.memory_limit_bytes or 0))),
                tag("td", None, progress_bar(int(r.pages_stored), r.pages_total)),
                tag("td", None, r.pool), tag("td", None, r.lease_owner),
                tag("td", None, _ago(r.started_at, now))))
        running_table = tag(
            "table", {"id": "running"},
            tag("thead", None, tag("tr", None, [tag("th", None, h) for h in (
                "job", "document", "tier", "attempt", "limit", "memory now", "pages", "pool", "dispatcher",
                "started")])),
            tag("tbody", None, running_rows)) if running_rows else tag("p", {"class": "muted"}, "no job running")

        dispatchers = (tag("ul", {"class": "inline"},
                           [tag("li", None, tag("strong", None, d.id), f" · pool {d.pool} · {d.runtime}"
                                f" · seen {_dur(float(d.silent_s))} ago") for d in live])
                       if live else tag("p", {"class": "warn"}, "no dispatcher has been seen in the last minute: is "
                                        "`jobcell run` running for this database? (jobs wait queued until one is)"))
        budget_note = ("budget: " + (format_bytes(self.budget) if self.budget else "unknown")
                       + f" per pool (JOBCELL_MEMORY_BUDGET={self.s.memory_budget}, as this host resolves it)")
        return Safe(_join([
            tag("h1", None, "Overview"),
            tag("section", None, tag("h2", None, "Jobs by state and class"), counts_table),
            tag("section", None, tag("h2", None, "Memory budget per pool"),
                tag("p", {"class": "muted"}, budget_note), gauges,
                tag("h3", None, f"Memory limits held, last {_dur(window_s)} ",
                    tag("span", {"class": "windows"},
                        [tag("a", {"href": f"/?window={w}", "class": "current" if w == window else None}, w)
                         for w in WINDOWS])),
                budget_chart(history, self.budget, now - timedelta(seconds=window_s), now)),
            tag("section", None, tag("h2", None, f"Running ({len(running)})"), running_table),
            tag("section", None, tag("h2", None, "Queue wait and run time, latest jobs"), timings_chart(timings)),
            tag("section", None, tag("h2", None, "Dispatchers"), dispatchers),
        ]))

    def job_list(self, query: dict[str, str]) -> Safe:
        state = query.get("state") or None
        cls = query.get("class") or None
        since = query.get("since") or None
        if state is not None and state not in {st.value for st in JobState}:
            raise BadRequest(f"no state {state!r}: one of {', '.join(st.value for st in JobState)}")
        try:
            since_s = parse_seconds(since) if since else None
            limit = int(query.get("limit") or 100)
        except ValueError as e:
            raise BadRequest(f"bad filter: {e}") from None
        limit = min(max(limit, 1), 1000)
        jobs = self.q.list_jobs(state, cls, since_s, limit)
        progress = self.q.progress([j.id for j in jobs])
        now = self.q.now()

        def select(name: str, options: Sequence[str], current: str | None) -> Safe:
            return tag("label", None, name, " ",
                       tag("select", {"name": name},
                           tag("option", {"value": ""}, "any"),
                           [tag("option", {"value": o, "selected": o == current}, o) for o in options]))

        classes = self.classes if cls is None or cls in self.classes else [*self.classes, cls]
        form = tag("form", {"method": "get", "action": "/jobs", "class": "filters"},
                   select("state", [st.value for st in JobState], state),
                   select("class", classes, cls),
                   select("since", ["1h", "24h", "7d", "30d"], since),
                   tag("button", {"type": "submit"}, "Filter"))
        rows = [tag("tr", {"class": f"row-{_css(j.state.value)}"},
                    tag("td", None, tag("a", {"href": f"/jobs/{j.id}"}, j.id)),
                    tag("td", None, _badge(j.state.value)), tag("td", None, j.size_class), tag("td", None, j.tier),
                    tag("td", {"class": "num"}, f"{j.attempt}/{j.max_attempts}"),
                    tag("td", {"class": "num"}, _pages(*progress.get(j.id, (0, None)))),
                    tag("td", {"class": "doc"}, os.path.basename(j.source or j.document_uri) or j.document_uri),
                    tag("td", None, _ago(j.created_at, now)),
                    tag("td", {"class": "reason"}, (j.reason or "")[:160]))
                for j in jobs]
        table = tag("table", {"id": "jobs"},
                    tag("thead", None, tag("tr", None, [tag("th", None, h) for h in (
                        "job", "state", "class", "tier", "attempts", "pages", "document", "submitted", "reason")])),
                    tag("tbody", None, rows)) if rows else tag("p", {"class": "muted"}, "no job matches")
        shown = f"{len(jobs)} job(s), newest first" + (f" (the first {limit})" if len(jobs) == limit else "")
        return Safe(_join([tag("h1", None, "Jobs"), form, tag("p", {"class": "muted"}, shown), table]))

    def job_page(self, job_id: int) -> tuple[Safe, bool]:
        job = self.q.get(job_id)
        now = self.q.now()
        attempts = self.q.attempts(job_id)
        done, declared = self.q.progress([job_id]).get(job_id, (0, None))
        result = self.q.result(job_id) or NO_RESULT
        total = result.page_count or declared
        texts = self.q.page_texts(job_id)

        facts: list[tuple[str, object]] = [
            ("document", job.source or job.document_uri),
            ("stored as", job.document_uri if job.source and job.source != job.document_uri else None),
            ("size", format_bytes(job.document_bytes)),
            ("workload", job.workload),
            ("class / tier", f"{job.size_class} / {job.tier}"),
            ("attempts", f"{job.attempt} of at most {job.max_attempts}"),
            ("priority", job.priority),
            ("submitted", _ago(job.created_at, now)),
            ("finished", _ago(job.finished_at, now) if job.finished_at else None),
            ("options", json.dumps(job.params, sort_keys=True) if job.params else None),
            ("metadata", json.dumps(job.metadata, sort_keys=True) if job.metadata else None),
            ("media type", result.media_type),
            ("manifest", result.manifest_status),
        ]
        facts_dl = tag("section", {"id": "facts"},
                       tag("dl", {"class": "facts"},
                           [(tag("dt", None, k), tag("dd", None, v)) for k, v in facts if v is not None]))
        reason = tag("p", {"class": f"reason-box r-{_css(job.state.value)}", "id": "reason"},
                     tag("strong", None, "reason: "), job.reason) if job.reason else None
        pages = tag("section", {"id": "pages"},
                    tag("h2", None, "Pages"),
                    tag("p", None, tag("span", {"id": "pages-done"}, done), " / ",
                        tag("span", {"id": "pages-total"}, "?" if total is None else total), " pages stored"),
                    progress_bar(done, total, width=320) if total else None)

        scale = max([int(a.memory_limit_bytes) for a in attempts] or [1])
        attempt_rows = [tag(
            "tr", {"class": f"attempt row-{_css(a.outcome or 'running')}"},
            tag("td", {"class": "num"}, a.attempt), tag("td", None, a.tier),
            tag("td", {"class": "num"}, format_bytes(a.memory_limit_bytes)),
            tag("td", {"class": "peak-cell"},
                peak_bar(a.peak_memory_bytes, int(a.memory_limit_bytes), scale, a.outcome), " ",
                format_bytes(a.peak_memory_bytes)),
            tag("td", None, _badge(a.outcome)),
            tag("td", {"class": "num"}, "-" if a.exit_code is None else a.exit_code),
            tag("td", {"class": "num"}, _dur(a.duration_s)),
            tag("td", {"class": "reason"}, _attempt_reason(a),
                tag("details", None, tag("summary", None, "stderr"), tag("pre", None, a.log_tail))
                if a.log_tail else None))
            for a in attempts]
        attempts_section = tag(
            "section", {"id": "attempts"},
            tag("h2", None, f"Attempts ({len(attempts)})"),
            attempts_timeline(job, attempts, now),
            tag("table", None,
                tag("thead", None, tag("tr", None, [tag("th", None, h) for h in (
                    "#", "tier", "limit", "peak vs limit", "outcome", "exit", "duration", "reason")])),
                tag("tbody", None, attempt_rows)) if attempt_rows else None)

        shown = texts[:MAX_TEXT_PAGES]
        text_section = tag(
            "section", {"id": "text"},
            tag("h2", None, "OCR text"),
            [tag("article", {"class": "page-text", "id": f"page-{int(p)}"},
                 tag("h3", None, f"Page {p}"), tag("pre", None, t)) for p, t in shown]
            if shown else tag("p", {"class": "muted"}, "no page stored yet"),
            tag("p", {"class": "muted"}, f"the first {MAX_TEXT_PAGES} of {len(texts)} pages; `jobcell show "
                                         f"{job_id} --text` prints them all") if len(texts) > len(shown) else None)
        return Safe(_join([tag("h1", None, f"Job {job_id} ", _badge(job.state.value)), reason,
                           self._actions(job), facts_dl, pages, attempts_section, text_section])), job.state.final

    def _actions(self, job: Job) -> Safe | None:
        if not self.s.web.actions:
            return None
        forms = []
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            if job.cancel_requested:
                forms.append(tag("span", {"class": "muted"}, "cancel requested"))
            else:
                forms.append(self._form(job.id, "cancel", "Cancel job"))
        if job.state in (JobState.FAILED, JobState.CANCELLED):
            forms.append(self._form(job.id, "retry", f"Retry ({self.s.max_attempts} more attempts)"))
        return tag("div", {"class": "actions"}, forms) if forms else None

    def _form(self, job_id: int, action: str, label: str) -> Safe:
        return tag("form", {"method": "post", "action": f"/jobs/{job_id}/{action}"},
                   tag("input", {"type": "hidden", "name": "csrf", "value": self._csrf}),
                   tag("button", {"type": "submit", "class": f"btn-{action}", "id": f"{action}-button"}, label))

    def action(self, environ: WSGIEnvironment, job_id: int, what: str) -> Response:
        if not self.s.web.actions:
            return self._error(HTTPStatus.FORBIDDEN, "actions are off: set JOBCELL_WEB_ACTIONS=true to allow them")
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and origin != "null" and origin.split("://", 1)[-1] != environ.get("HTTP_HOST"):
            return self._error(HTTPStatus.FORBIDDEN, "cross-site request refused")
        try:
            length = max(0, int(environ.get("CONTENT_LENGTH") or 0))
        except ValueError:
            length = 0
        if length > MAX_FORM_BYTES:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "form too large")
        form = parse_qs(environ["wsgi.input"].read(length).decode("utf-8", "replace"))
        if not _same(form.get("csrf", [""])[0], self._csrf):
            return self._error(HTTPStatus.FORBIDDEN, "the form is stale or forged (reload the page and try again)")
        if what == "cancel":
            state = self.client.cancel(job_id)
            log.info("dashboard: cancel job %d (%s)", job_id, state)
        else:
            self.client.retry(job_id)
            log.info("dashboard: retry job %d", job_id)
        return Response(HTTPStatus.SEE_OTHER, b"", "text/plain; charset=utf-8", [("Location", f"/jobs/{job_id}")])


# -- serving -----------------------------------------------------------------------------------------------

class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow client never holds up Ctrl-C


class _Handler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Never the query string: it may carry ?token=
        log.info("%s %s %s", self.command, self.path.split("?", 1)[0], code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def serve(s: Settings, budget: int | None) -> int:
    """Serve the dashboard until interrupted; ConfigError (one line) when it cannot start."""
    auth = Auth.from_settings(s)  # before anything else: no auth, no start
    queue = build_queue(s, give_up_after_s=10.0)  # a page waits at most this long for a database that is away
    queue.queue_id()  # no schema: refused now, with what to run
    app = Dashboard(s, queue, auth, budget)
    try:
        httpd = make_server(s.web.host, s.web.port, app, server_class=_Server, handler_class=_Handler)
    except OSError as e:
        raise ConfigError(f"cannot listen on {s.web.host}:{s.web.port} ({e.strerror}): set JOBCELL_WEB_PORT "
                          "or JOBCELL_WEB_HOST") from None
    if s.web.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the dashboard listens on %s, beyond loopback, over plain HTTP: put a TLS proxy in front",
                    s.web.host)
    log.info("dashboard on http://%s:%d/ (%s)", s.web.host, httpd.server_port,
             "cancel and retry on" if s.web.actions else "read-only")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        queue.close()
    return 0


STYLESHEET = """
:root { --fg: #1d232a; --muted: #6b7480; --line: #dde1e6; --bg: #f7f8fa; --ok: #2e8b57; --fail: #c0392b;
  --run: #2f6fdf; --wait: #b8bec6; --warn: #d98c1a; --oom: #d0453a; --bad: #8e44ad; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  background: var(--bg); }
header { display: flex; justify-content: space-between; align-items: center; padding: 8px 20px;
  background: #1d232a; color: #fff; }
header nav a { color: #dfe6ee; margin-right: 16px; text-decoration: none; }
header nav a.brand { font-weight: 700; color: #fff; }
header .muted { color: #aab3bd; }
main { padding: 12px 20px 40px; max-width: 1200px; }
h1 { font-size: 22px; margin: 8px 0 12px; } h2 { font-size: 17px; margin: 22px 0 8px; }
h3 { font-size: 14px; margin: 14px 0 6px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 4px 14px 12px;
  margin-bottom: 14px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: #39424c; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.doc { max-width: 260px; overflow-wrap: anywhere; }
td.reason { max-width: 420px; overflow-wrap: anywhere; }
.muted { color: var(--muted); }
.warn { color: var(--warn); font-weight: 600; }
.error { color: var(--fail); }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; color: #fff;
  background: var(--muted); }
.b-succeeded { background: var(--ok); } .b-failed { background: var(--fail); } .b-running { background: var(--run); }
.b-queued { background: #7d8793; } .b-cancelled { background: #a0a6ad; } .b-oom { background: var(--oom); }
.b-bad_input { background: var(--bad); } .b-timeout { background: var(--warn); } .b-error { background: #b7612a; }
.b-lost { background: #6c757d; }
.reason-box { padding: 8px 12px; border-radius: 6px; background: #fff; border-left: 4px solid var(--muted);
  overflow-wrap: anywhere; }
.r-failed { border-left-color: var(--fail); } .r-succeeded { border-left-color: var(--ok); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 12px 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: var(--bg); padding: 8px; border-radius: 4px;
  max-height: 480px; overflow: auto; margin: 4px 0; }
.filters label { margin-right: 12px; }
.actions form { display: inline-block; margin-right: 8px; }
button { font: inherit; padding: 4px 12px; border-radius: 4px; border: 1px solid #9aa3ad; background: #fff;
  cursor: pointer; }
.btn-cancel { border-color: var(--fail); color: var(--fail); }
.btn-retry { border-color: var(--run); color: var(--run); }
ul.inline { list-style: none; padding: 0; } ul.inline li { margin: 2px 0; }
.gauges { display: flex; flex-wrap: wrap; gap: 24px; }
figure { margin: 6px 0; } figcaption { font-size: 12px; color: var(--muted); }
.gauge figcaption { text-align: center; }
.g-track { fill: none; stroke: #e6e9ed; stroke-width: 12; }
.g-value { fill: none; stroke-width: 12; } .g-ok { stroke: var(--ok); } .g-warn { stroke: var(--warn); }
.g-full { stroke: var(--fail); }
.windows a { font-weight: 400; margin-left: 8px; font-size: 12px; } .windows a.current { font-weight: 700; }
.actions { margin: 0 0 12px; }
td.peak-cell { white-space: nowrap; }
.g-label { font-size: 18px; font-weight: 700; fill: var(--fg); }
.progress svg { vertical-align: middle; }
.track { fill: #e6e9ed; } .fill-done { fill: var(--run); }
.axis { font-size: 11px; fill: var(--muted); }
.grid { stroke: #eceff2; } .budget-line { stroke: var(--fail); stroke-dasharray: 5 4; }
.series { fill: none; stroke-width: 2; }
.series-0 { stroke: #2f6fdf; } .series-1 { stroke: #2e8b57; } .series-2 { stroke: #d98c1a; }
.series-3 { stroke: #8e44ad; } .series-4 { stroke: #16a2b8; } .series-5 { stroke: #6c757d; }
.key, .key-none { margin-right: 14px; } .key::before { content: ""; display: inline-block; width: 12px; height: 3px;
  margin-right: 4px; vertical-align: middle; background: currentColor; }
.key-0 { color: #2f6fdf; } .key-1 { color: #2e8b57; } .key-2 { color: #d98c1a; } .key-3 { color: #8e44ad; }
.key-4 { color: #16a2b8; } .key-5 { color: #6c757d; } .key-budget { color: var(--fail); }
.key-wait { color: var(--wait); } .key-start { color: #c9cfd6; }
.seg-wait { fill: var(--wait); } .seg-start { fill: #d6dbe0; } .seg-running { fill: var(--run); }
.seg-succeeded { fill: var(--ok); } .seg-failed { fill: var(--fail); } .seg-cancelled { fill: #a0a6ad; }
.seg-queued { fill: #7d8793; } .seg-oom { fill: var(--oom); } .seg-bad_input { fill: var(--bad); }
.seg-timeout { fill: var(--warn); } .seg-error { fill: #b7612a; } .seg-lost { fill: #6c757d; }
.bar-limit { fill: #eef1f4; stroke: #9aa3ad; } .bar-peak { fill: var(--run); } .bar-peak-oom { fill: var(--oom); }
svg.peak { vertical-align: middle; }
"""


__all__ = ["Auth", "Dashboard", "Safe", "esc", "serve", "tag"]
