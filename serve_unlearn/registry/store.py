"""The registry's rows: the request record, the owner of a training row, and every SQL statement.

Every SQL statement lives in :class:`SQLStore`, written once in the SQL both databases accept;
:class:`~serve_unlearn.registry.sqlite.SQLiteStore` and :class:`~serve_unlearn.registry.postgres.PostgresStore`
only connect, lock and create the schema.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import RegistryError

SCHEMA_VERSION = 2  # 2: the forget-request queue (jobs), added to a version-1 registry on open
GENERATION_KEY = "generation"
# reserved keys of the artifacts JSON: the file manifest and its signature (not artifact names)
FILES_KEY, SIGNATURE_KEY = "__files__", "__signature__"


def schema(seq_column: str, extra_columns: str = "") -> tuple[str, ...]:
    """The registry's tables in either database's dialect: only the ``seq`` key and extra columns differ."""
    return (
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"""CREATE TABLE requests (
            seq {seq_column},
            id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            created_at TEXT NOT NULL,
            data_digest TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('training', 'ready', 'failed', 'retired')),
            version INTEGER UNIQUE,
            artifacts TEXT NOT NULL DEFAULT '{{}}',
            config TEXT NOT NULL,
            error TEXT,
            owner_pid INTEGER NOT NULL,
            owner_start TEXT,
            owner_host TEXT NOT NULL{extra_columns})""",
        # At most one live (training or ready) request per name, even if two processes race past the check.
        "CREATE UNIQUE INDEX requests_live_name ON requests (name) WHERE status IN ('training', 'ready')",
        "CREATE INDEX requests_status ON requests (status)",
        *jobs_schema(seq_column),
    )


def jobs_schema(seq_column: str) -> tuple[str, ...]:
    """The queue of forget requests filed over HTTP (:mod:`~serve_unlearn.registry.queue`): one row per filing,
    from ``queued`` to ``in_force`` / ``retired`` / ``failed``; the trained artifacts are a ``requests`` row."""
    return (
        f"""CREATE TABLE jobs (
            seq {seq_column},
            id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            method TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('queued', 'training', 'guarded', 'ready', 'in_force',
                                                   'failed', 'retired')),
            created_at TEXT NOT NULL,
            spec TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            progress TEXT NOT NULL DEFAULT '{{}}',
            timings TEXT NOT NULL DEFAULT '{{}}',
            result TEXT NOT NULL DEFAULT '{{}}',
            error TEXT,
            owner_pid INTEGER,
            owner_start TEXT,
            owner_host TEXT,
            heartbeat DOUBLE PRECISION)""",
        # one live filing per name, even if two API replicas race past the check
        "CREATE UNIQUE INDEX jobs_live_name ON jobs (name) WHERE status NOT IN ('failed', 'retired')",
        "CREATE INDEX jobs_status ON jobs (status)",
    )


_COLUMNS = "id, name, created_at, data_digest, status, version, artifacts, config, error"


@dataclass(frozen=True)
class ForgetRequest:
    id: str  # uuid4 hex
    name: str
    created_at: str  # ISO-8601 UTC
    data_digest: str
    status: str  # "training" | "ready" | "failed" | "retired"
    version: int | None  # registry generation at which it became ready; None unless ready or retired
    artifacts: dict[str, str]  # key -> path relative to the registry root
    config: dict
    error: str | None
    # sha256 of every file of the request's folder (paths relative to the registry root), recorded when it became
    # ready, and an HMAC over them when a signing key was set (integrity.py); None in rows older than manifests
    files: dict[str, str] | None = None
    signature: str | None = None


@dataclass(frozen=True)
class Owner:
    """The process training a request: enough for a later process on the same host to tell that it died."""

    pid: int
    start: str | None  # "<boot id>/<start time in clock ticks>" from /proc; None where there is no /proc
    host: str

    @classmethod
    def current(cls) -> Owner:
        return cls(os.getpid(), _process_start(os.getpid()), socket.gethostname())

    def is_gone(self) -> bool:
        """True only when certain: same host, and the pid is dead, a zombie, or reused by another process."""
        if self.host != socket.gethostname():
            return False  # another host's process cannot be checked from here
        if self.start is not None:
            return _process_start(self.pid) != self.start
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def _process_start(pid: int) -> str | None:
    """Boot id and start time of a running process: a pid reused later, or after a reboot, gives another value."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None  # killed but not yet reaped by its parent: dead for our purpose
    return f"{boot}/{fields[19]}"


class Connection(Protocol):
    """What :class:`SQLStore` needs of a connection: sqlite3's ``execute``, with ``?`` placeholders."""

    def execute(self, sql: str, params: tuple = ..., /) -> Any: ...


class SQLStore(abc.ABC):
    """Every SQL statement of the registry, in the SQL SQLite and PostgreSQL share (``?`` placeholders).

    A subclass supplies :meth:`_connect` (a short-lived connection per operation: safe across threads and across
    processes forked by servers; with ``write``, one transaction holding the registry's write lock, so a check and
    the write it guards cannot interleave with another writer), the schema, and ``_LEASE_EXPIRED``, the SQL that
    tells whether a training row's lease ran out.
    """

    where: str  # the database, as error messages name it
    _SEQ_COLUMN: str  # the dialect's auto-increment key
    _SKIP_LOCKED = ""  # PostgreSQL: claim a queued row without waiting for rows other workers hold
    _LEASE_EXPIRED = "0"  # stores without leases rely on the same-host pid check alone

    @abc.abstractmethod
    def _connect(self, *, write: bool = False) -> contextlib.AbstractContextManager[Connection]:
        """A connection for one operation; with ``write``, in a transaction holding the write lock."""

    def _open_schema(self, con: Connection, tables: set[str], create: bool, schema_sql: tuple[str, ...]) -> None:
        """Create the schema in an empty database, or check the one there; ``con`` holds the write lock."""
        if "schema_version" in tables:
            row = con.execute("SELECT max(version) FROM schema_version").fetchone()
            if row[0] is None or {"meta", "requests"} - tables:
                raise RegistryError(f"registry database {self.where} is incomplete (corrupt); move it aside")
            if row[0] > SCHEMA_VERSION:
                raise RegistryError(f"registry {self.where} has schema version {row[0]}, written by a newer "
                                    f"serve-unlearn (this one reads up to {SCHEMA_VERSION}); upgrade serve-unlearn")
            if row[0] == 1:  # additive: a version-1 registry gains the queue table, its rows stay as they are
                for statement in jobs_schema(self._SEQ_COLUMN):
                    con.execute(statement)
                con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif tables:
            raise RegistryError(f"{self.where} is not a serve-unlearn registry (it holds other tables: "
                                f"{', '.join(sorted(tables))}); give the registry a database of its own")
        elif not create:
            raise RegistryError(f"no forget-request registry in {self.where} (its tables are missing); "
                                "`serve-unlearn o3 forget --registry DIR` creates one")
        else:
            for statement in schema_sql:
                con.execute(statement)
            con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            con.execute("INSERT INTO meta (key, value) VALUES (?, '0')", (GENERATION_KEY,))

    @staticmethod
    def _request(row: tuple) -> ForgetRequest:
        """A row as a ForgetRequest; the manifest and signature travel inside the artifacts JSON (reserved keys),
        so rows of every schema version read the same way."""
        rid, name, created_at, digest, status, version, artifacts, config, error = row
        try:
            recorded = json.loads(artifacts)
            files = recorded.pop(FILES_KEY, None)
            sig = recorded.pop(SIGNATURE_KEY, None)
            if not (isinstance(recorded, dict) and all(isinstance(v, str) for v in recorded.values())
                    and (files is None or isinstance(files, dict)) and (sig is None or isinstance(sig, str))):
                raise TypeError("unexpected types")
        except (ValueError, TypeError, AttributeError) as exc:
            raise RegistryError(f"forget request {rid} ({name}) has a damaged artifacts record ({exc}); retire it "
                                "and register it again") from exc
        try:
            parsed_config = json.loads(config)
        except ValueError as exc:
            raise RegistryError(f"forget request {rid} ({name}) has a damaged config record ({exc}); retire it "
                                "and register it again") from exc
        return ForgetRequest(rid, name, created_at, digest, status, version, recorded, parsed_config, error,
                             files, sig)

    def _bump_generation(self, con: Connection) -> int:
        con.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = ?",
                    (GENERATION_KEY,))
        return int(con.execute("SELECT value FROM meta WHERE key = ?", (GENERATION_KEY,)).fetchone()[0])

    def _transaction(self) -> contextlib.AbstractContextManager[Connection]:
        """One transaction for a row-level operation (claiming a queued job): SQLite has only its write lock;
        PostgreSQL overrides this with a transaction that does not take the registry-wide lock."""
        return self._connect(write=True)

    def exclusive(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Held by one process at a time (of all sharing this registry) while it does ``name`` (e.g. publishing a
        version to the servers); a subclass decides how."""
        raise NotImplementedError

    def lease(self, request_id: str) -> contextlib.AbstractContextManager:
        """Keeps the owner's lease on a training row alive while the block runs (a no-op without leases)."""
        return contextlib.nullcontext()

    def insert(self, request: ForgetRequest, owner: Owner) -> None:
        """Add a ``training`` row; RegistryError when the name already has a ready or training request."""
        with self._connect(write=True) as con:
            self._insert(con, request, owner)

    def _insert(self, con: Connection, request: ForgetRequest, owner: Owner) -> None:
        live = con.execute("SELECT status, owner_pid, owner_host FROM requests WHERE name = ? AND status IN "
                           "('training', 'ready')", (request.name,)).fetchone()
        if live is not None and live[0] == "ready":
            raise RegistryError(f"forget request {request.name!r} is already registered and ready; retire "
                                "it first or choose another name")
        if live is not None:
            raise RegistryError(f"forget request {request.name!r} is being registered right now (process "
                                f"{live[1]} on {live[2]}); wait for it or choose another name")
        con.execute("INSERT INTO requests (id, name, created_at, data_digest, status, config, owner_pid, "
                    "owner_start, owner_host) VALUES (?, ?, ?, ?, 'training', ?, ?, ?, ?)",
                    (request.id, request.name, request.created_at, request.data_digest,
                     json.dumps(request.config), owner.pid, owner.start, owner.host))

    def mark_ready(self, request_id: str, artifacts: dict[str, str], files: dict[str, str] | None = None,
                   signature: str | None = None) -> None:
        record = dict(artifacts)
        if files is not None:
            record[FILES_KEY] = files
        if signature is not None:
            record[SIGNATURE_KEY] = signature
        with self._connect(write=True) as con:
            version = self._bump_generation(con)
            cur = con.execute("UPDATE requests SET status = 'ready', version = ?, artifacts = ? WHERE id = ? AND "
                              "status = 'training'", (version, json.dumps(record), request_id))
            if cur.rowcount != 1:
                raise RegistryError(f"forget request {request_id} is no longer training (another process marked "
                                    "it failed); register it again")

    def mark_failed(self, request_id: str, error: str) -> bool:
        """Fail a training row; False when it is not training (any more)."""
        with self._connect(write=True) as con:
            cur = con.execute("UPDATE requests SET status = 'failed', error = ? WHERE id = ? AND status = "
                              "'training'", (error, request_id))
            return cur.rowcount == 1

    def retire(self, request_id: str) -> None:
        with self._connect(write=True) as con:
            self._bump_generation(con)
            cur = con.execute("UPDATE requests SET status = 'retired' WHERE id = ? AND status = 'ready'",
                              (request_id,))
            if cur.rowcount != 1:
                raise RegistryError(f"forget request {request_id} is not ready (any more); nothing to retire")

    def all(self) -> list[ForgetRequest]:
        with self._connect() as con:
            return [self._request(r) for r in con.execute(f"SELECT {_COLUMNS} FROM requests ORDER BY seq")]

    def ready(self) -> list[ForgetRequest]:
        with self._connect() as con:
            return [self._request(r) for r in con.execute(
                f"SELECT {_COLUMNS} FROM requests WHERE status = 'ready' ORDER BY version")]

    def by_id(self, request_id: str) -> ForgetRequest | None:
        with self._connect() as con:
            row = con.execute(f"SELECT {_COLUMNS} FROM requests WHERE id = ?", (request_id,)).fetchone()
        return None if row is None else self._request(row)

    def by_name(self, name: str) -> list[ForgetRequest]:
        with self._connect() as con:
            return [self._request(r) for r in con.execute(
                f"SELECT {_COLUMNS} FROM requests WHERE name = ? ORDER BY seq", (name,))]

    def statuses(self) -> dict[str, str]:
        with self._connect() as con:
            return dict(con.execute("SELECT id, status FROM requests"))

    def training(self) -> list[tuple[str, Owner, bool]]:
        """The training rows: id, owner, and whether the owner's lease ran out."""
        with self._connect() as con:
            rows = con.execute(f"SELECT id, owner_pid, owner_start, owner_host, {self._LEASE_EXPIRED} FROM "
                               "requests WHERE status = 'training'").fetchall()
        return [(rid, Owner(pid, start, host), bool(expired)) for rid, pid, start, host, expired in rows]

    def get_meta(self, key: str) -> str | None:
        with self._connect() as con:
            row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._connect(write=True) as con:
            con.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                        "excluded.value", (key, value))
