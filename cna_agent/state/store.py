"""The embedded SQLite database that lets the agent survive restarts.

One file (``<state.dir>/agent.db``) in WAL mode: readers never block the writer, and a
``kill -9`` loses at most the transaction in flight. All access goes through one connection
guarded by a lock; callers on the event loop use :meth:`StateStore.run` so a slow fsync never
stalls gRPC handling. It runs them in a one-thread BlockingPool named "sqlite" (SQLite
serialises writers anyway, and one thread keeps them in the order they were asked for) with a
generous deadline (``TIMEOUT_S``): a call that gets no answer in time fails with
DEADLINE_EXCEEDED; one already running may still complete after that, one still queued never
runs.

Schema changes are numbered migrations applied in order and recorded in
``PRAGMA user_version``, so an older database is upgraded in place on start.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

from cna_agent.blocking import BlockingPool

T = TypeVar("T")

#: Deadline (seconds) of one StateStore.run call, queueing included; well above SQLite's own
#: 30 s busy timeout, so only a wedged disk reaches it.
TIMEOUT_S = 60.0

_MIGRATIONS: tuple[str, ...] = (
    # 1: operation journal and event log
    """
    CREATE TABLE operations (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        target TEXT NOT NULL DEFAULT '',
        request_id TEXT,
        fingerprint TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,
        percent INTEGER NOT NULL DEFAULT -1,
        stage TEXT NOT NULL DEFAULT '',
        bytes_done INTEGER NOT NULL DEFAULT 0,
        bytes_total INTEGER NOT NULL DEFAULT 0,
        create_time REAL NOT NULL,
        update_time REAL NOT NULL,
        end_time REAL,
        error_code INTEGER,
        error_message TEXT,
        error_fields TEXT,
        response_type TEXT,
        response BLOB,
        metadata TEXT NOT NULL DEFAULT '{}'
    );
    CREATE UNIQUE INDEX operations_request_id ON operations(request_id) WHERE request_id IS NOT NULL;
    CREATE INDEX operations_active ON operations(state) WHERE end_time IS NULL;
    CREATE INDEX operations_create_time ON operations(create_time);
    CREATE TABLE events (
        sequence INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        type TEXT NOT NULL,
        severity TEXT NOT NULL,
        resource_kind TEXT NOT NULL DEFAULT '',
        resource_id TEXT NOT NULL DEFAULT '',
        resource_name TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        attributes TEXT NOT NULL DEFAULT '{}',
        operation_id TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_resource ON events(resource_id, sequence);
    CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: CPU/NUMA placements of VMs (host/placement.py), restored on start
    """
    CREATE TABLE placements (vm_uuid TEXT PRIMARY KEY, placement TEXT NOT NULL, update_time REAL NOT NULL);
    """,
)


class StateStore:
    """Owns the database connection and the one thread that touches it from async code."""

    def __init__(self, path: str | os.PathLike[str], *, timeout_s: float = TIMEOUT_S) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = not self.path.exists()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        if fresh:
            os.chmod(self.path, 0o600)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        # One worker: SQLite serialises writers anyway, and a single thread keeps ordering simple.
        self.pool = BlockingPool("sqlite", 1, timeout_s)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_MIGRATIONS):
            raise RuntimeError(
                f"{self.path}: schema version {version} is newer than this agent knows "
                f"({len(_MIGRATIONS)}); refusing to touch it (downgrade?)"
            )
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            self._conn.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, params)

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` inside BEGIN IMMEDIATE ... COMMIT (rolled back if it raises)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call off the event loop, in order with the others."""
        name = getattr(fn, "__name__", "")
        what = f"state database call {name}" if name and name != "<lambda>" else "state database call"
        return await self.pool.run(lambda: fn(*args), what=what)

    def get_value(self, key: str, default: str | None = None) -> str | None:
        rows = self.query("SELECT value FROM kv WHERE key = ?", (key,))
        return rows[0]["value"] if rows else default

    def set_value(self, key: str, value: str) -> None:
        self.execute("INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def close(self) -> None:
        # Calls already asked for still run (a journal "done" must not be lost); new ones fail.
        self.pool.shutdown(wait=True, cancel_queued=False)
        with self._lock:
            self._conn.close()
