"""A thin Postgres connection: named queries, one transaction per call, reconnects with backoff while the server
is away, and driver errors translated into jobcell's own (a DatabaseUnavailable that names the server, never
the password)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from tenacity import Retrying, retry_if_exception, stop_after_delay, stop_never, wait_exponential_jitter

from .errors import DatabaseUnavailable
from .sql import query

log = logging.getLogger("jobcell.queue")
T = TypeVar("T")
Row = dict[str, Any]
Conn = psycopg.Connection[Row]

_PERMANENT = ("28P01", "28000", "3D000")  # bad password, no such role or pg_hba entry, no such database


def _transient(e: BaseException) -> bool:
    """Worth retrying: the server is down or restarting. A wrong password or database name is not."""
    if not isinstance(e, psycopg.OperationalError):
        return False
    text = str(e)
    return getattr(e, "sqlstate", None) not in _PERMANENT and not any(
        m in text for m in ("authentication failed", "does not exist", "no pg_hba.conf entry"))


def where(dsn: str) -> str:
    """host:port/db of a connection string, never its password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the configured database"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def _log_retry(state: Any) -> None:
    log.warning("database unavailable (%s); retrying in %.1f s",
                state.outcome.exception() if state.outcome else "?", state.next_action.sleep)


class Database:
    """One connection, one statement at a time; `give_up_after_s` None waits an outage out (the dispatcher)."""

    def __init__(self, dsn: str, give_up_after_s: float | None = None) -> None:
        self.dsn = dsn
        self._conn: Conn | None = None
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self._retry = Retrying(
            retry=retry_if_exception(_transient),
            wait=wait_exponential_jitter(multiplier=0.5, max=30),
            stop=stop_never if give_up_after_s is None else stop_after_delay(give_up_after_s),
            before_sleep=_log_retry, reraise=True)

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row, connect_timeout=10)
        return self._conn

    def run(self, fn: Callable[[Conn], T]) -> T:
        """Run fn in one transaction, reconnecting with backoff while the database is unreachable; what
        cannot be retried (or no longer) becomes a DatabaseUnavailable that names the server, not the password."""
        try:
            for attempt in self._retry:
                with attempt, self._lock:
                    conn = self._connection()
                    try:
                        with conn.transaction():
                            return fn(conn)
                    except psycopg.OperationalError:
                        conn.close()
                        raise
        except psycopg.OperationalError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
            raise DatabaseUnavailable(f"cannot use the database at {where(self.dsn)}: {first}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.closed.set()
        if self._conn is not None:
            self._conn.close()

    @staticmethod
    def one(conn: Conn, name: str, **params: Any) -> Row | None:
        cur = conn.execute(query(name), params)
        return cur.fetchone() if cur.description else None

    @staticmethod
    def all(conn: Conn, name: str, **params: Any) -> list[Row]:
        return conn.execute(query(name), params).fetchall()

    def fetch_one(self, name: str, **params: Any) -> Row | None:
        """One named query in a transaction of its own: its first row, if any."""
        return self.run(lambda c: self.one(c, name, **params))

    def fetch_all(self, name: str, **params: Any) -> list[Row]:
        return self.run(lambda c: self.all(c, name, **params))
