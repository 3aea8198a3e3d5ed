"""The forget-request registry: which requests exist, which are in force, and where their artifacts lie.

Layout: ``root/requests/<id>/`` (artifacts, written by the trainers) and the rows, in ``root/registry.sqlite``
(WAL) by default, or in a PostgreSQL database when several servers (replicas, possibly on several hosts) share one
registry; they then mount ``root`` from a shared filesystem. A request trains into a private ``root/staging/<id>/``
folder and becomes ``ready`` in one step (the folder is renamed into ``requests/``, then one transaction sets the
status and the version), so a reader never sees a ready request without its artifacts. A process killed while
training leaves a ``training`` row whose owner is gone; every open (and ``list``/``get``/``ready``) turns such rows
into ``failed`` and removes their folders, so the name can be registered again and nothing else is touched. A dead
owner is recognised by its pid on the same host, and on PostgreSQL also from any host by a lease its process stops
renewing.

Every SQL statement lives in :class:`SQLStore`, written once in the SQL both databases accept; :class:`SQLiteStore`
and :class:`~serve_unlearn.adapters.registry_postgres.PostgresStore` only connect, lock and create the schema. The
registry writes only rows and folders; artifacts are safetensors and JSON written by others. Nothing is pickled.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from ..errors import ArtifactError, RegistryError, UnknownRequestError, UnlearnDataError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
GENERATION_KEY = "generation"

DATABASE_ENV = "SERVE_UNLEARN_REGISTRY_DATABASE"


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


@dataclass
class Staging:
    """A request's private folder while it trains; only artifacts declared with :meth:`add_artifact` are recorded."""

    request_id: str
    dir: Path
    artifacts: dict[str, str] = field(default_factory=dict)

    def add_artifact(self, key: str, relpath: str | os.PathLike) -> None:
        """Record ``dir/relpath`` under ``key``; it must exist when ``register`` ends, or the request fails."""
        rel = PurePosixPath(Path(relpath).as_posix())
        if not key or rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ArtifactError(f"artifact {key!r} -> {str(relpath)!r}: need a key and a path inside the staging "
                                "folder")
        self.artifacts[key] = str(rel)


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


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UnlearnDataError(f"forget request name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' "
                               "or '-', starting with a letter or digit")


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
        rid, name, created_at, digest, status, version, artifacts, config, error = row
        return ForgetRequest(rid, name, created_at, digest, status, version, json.loads(artifacts),
                             json.loads(config), error)

    def _bump_generation(self, con: Connection) -> int:
        con.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = ?",
                    (GENERATION_KEY,))
        return int(con.execute("SELECT value FROM meta WHERE key = ?", (GENERATION_KEY,)).fetchone()[0])

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

    def mark_ready(self, request_id: str, artifacts: dict[str, str]) -> None:
        with self._connect(write=True) as con:
            version = self._bump_generation(con)
            cur = con.execute("UPDATE requests SET status = 'ready', version = ?, artifacts = ? WHERE id = ? AND "
                              "status = 'training'", (version, json.dumps(artifacts), request_id))
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


class SQLiteStore(SQLStore):
    """The registry in ``registry.sqlite`` (WAL); writes take SQLite's write lock up front (BEGIN IMMEDIATE)."""

    def __init__(self, path: Path, *, create: bool):
        self.path = path
        self.where = str(path)
        self._uri = path.resolve().as_uri() + "?mode=rw"
        with self._errors():
            con = sqlite3.connect(path.resolve().as_uri() + ("?mode=rwc" if create else "?mode=rw"), uri=True,
                                  timeout=30, isolation_level=None)
        try:
            with self._errors():
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("BEGIN IMMEDIATE")
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND "
                                                    "name NOT LIKE 'sqlite_%'")}
                self._open_schema(con, tables, create, schema("INTEGER PRIMARY KEY AUTOINCREMENT"))
                con.execute("COMMIT")
        finally:
            con.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise RegistryError(f"registry database {self.path} is unavailable: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"registry database {self.path} is corrupt or not a registry ({exc}); move it "
                                "aside and register the requests again") from exc

    @contextlib.contextmanager
    def _connect(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection, in one write transaction when ``write``; an exception rolls it back."""
        with self._errors():
            con = sqlite3.connect(self._uri, uri=True, timeout=30, isolation_level=None)
            try:
                if write:
                    con.execute("PRAGMA synchronous=FULL")  # a ready row survives power loss, like its files
                    con.execute("BEGIN IMMEDIATE")
                yield con
                if write:
                    con.execute("COMMIT")
            finally:
                con.close()


class ForgetRegistry:
    """Forget requests and their artifacts under one folder.

    The rows live in ``root/registry.sqlite`` (safe to share between processes on one host) unless ``database``,
    or else ``$SERVE_UNLEARN_REGISTRY_DATABASE``, names a PostgreSQL database (a DSN or URL such as
    ``postgresql://user@host/serve_unlearn``): then replicas on several hosts share the registry, and each must
    mount the same ``root`` (a shared filesystem), because the artifacts stay there. ``lease_ttl`` (PostgreSQL
    only, seconds) is how long a training request survives without its process renewing its lease (every
    ``lease_ttl / 6`` s) before any replica marks it failed.
    """

    def __init__(self, root: str | os.PathLike, *, create: bool = True, database: str | None = None,
                 lease_ttl: float = 60.0):
        self.root = Path(root)
        database = database or os.environ.get(DATABASE_ENV) or None
        db = self.root / "registry.sqlite"
        if database is None and not create and not db.is_file():
            raise RegistryError(f"no forget-request registry at {self.root} (registry.sqlite is missing); "
                                "`serve-unlearn o3 forget --registry DIR` creates one")
        self._staging = self.root / "staging"
        self._requests = self.root / "requests"
        if create:
            try:
                self._staging.mkdir(parents=True, exist_ok=True)
                self._requests.mkdir(exist_ok=True)
            except OSError as exc:
                raise RegistryError(f"cannot create a registry at {self.root}: {exc}") from exc
        if database is None:
            self._store: SQLStore = SQLiteStore(db, create=create)
        else:
            from .registry_postgres import PostgresStore  # its driver is optional

            self._store = PostgresStore(database, create=create, lease_ttl=lease_ttl)
            if db.exists():
                logger.warning("%s is ignored: this registry's rows live in %s", db, self._store.where)
        self._reap(sweep=True)

    def __repr__(self) -> str:
        if isinstance(self._store, SQLiteStore):
            return f"ForgetRegistry({str(self.root)!r})"
        return f"ForgetRegistry({str(self.root)!r}, database={self._store.where!r})"

    @contextlib.contextmanager
    def register(self, name: str, data_digest: str, config: dict) -> Iterator[Staging]:
        """Record a request as ``training`` and yield its staging folder; on a clean exit it becomes ``ready``
        with a new version, on an exception ``failed`` (staging removed, exception re-raised)."""
        check_name(name)
        self._reap()  # a dead earlier attempt must not block the name
        request_id = uuid.uuid4().hex
        created_at = datetime.now(UTC).isoformat(timespec="microseconds")
        self._store.insert(ForgetRequest(request_id, name, created_at, data_digest, "training", None, {}, config,
                                         None), Owner.current())
        staging = Staging(request_id, self._staging / request_id)
        try:
            with self._store.lease(request_id):
                staging.dir.mkdir(parents=True)
                yield staging
                self._make_ready(staging)
        except BaseException as exc:
            self._abort(request_id, ": ".join(filter(None, (type(exc).__name__, str(exc)))))
            raise

    def _make_ready(self, staging: Staging) -> None:
        """Files durable, then the folder in place, then the row: a crash at any point leaves no ready row
        pointing at missing files, and the reaper cleans what is left."""
        if not staging.dir.is_dir():
            raise RegistryError(f"forget request {staging.request_id} lost its staging folder {staging.dir}: "
                                "another process marked it failed (its owner looked dead or its lease ran out); "
                                "register it again")
        missing = sorted(k for k, rel in staging.artifacts.items() if not (staging.dir / rel).exists())
        if missing:
            raise ArtifactError(f"artifacts {missing} were declared but not written into {staging.dir}")
        _fsync_tree(staging.dir)
        staging.dir.rename(self._requests / staging.request_id)
        _fsync(self._requests)
        prefix = PurePosixPath("requests", staging.request_id)
        self._store.mark_ready(staging.request_id, {k: str(prefix / rel) for k, rel in staging.artifacts.items()})

    def _abort(self, request_id: str, error: str) -> None:
        try:
            self._store.mark_failed(request_id, error)
        except RegistryError:
            logger.exception("could not mark forget request %s failed; it is reaped once this process exits",
                             request_id)
        for folder in (self._staging / request_id, self._requests / request_id):
            shutil.rmtree(folder, ignore_errors=True)

    def _reap(self, *, sweep: bool = False) -> None:
        """Fail ``training`` rows whose process is gone or whose lease ran out, then drop folders that no live
        request owns."""
        dead = []
        for rid, owner, lease_expired in self._store.training():
            if owner.is_gone():
                dead.append((rid, f"process {owner.pid} died during training"))
            elif lease_expired:
                dead.append((rid, f"process {owner.pid} on {owner.host} stopped renewing its lease during training"))
        for rid, why in dead:
            if self._store.mark_failed(rid, f"interrupted ({why}); register it again"):
                logger.warning("forget request %s: %s; marked failed", rid, why)
        if dead or sweep:
            self._sweep()

    def _sweep(self) -> None:
        # List the folders before reading the rows: a folder is created only after its row is committed, so a
        # folder seen here always has its row in the read below, and a registration in progress is never removed.
        staged, placed = _entries(self._staging), _entries(self._requests)
        status = self._store.statuses()
        for rid in staged:
            if status.get(rid) != "training":
                shutil.rmtree(self._staging / rid, ignore_errors=True)
        for rid in placed:
            if status.get(rid) == "failed":
                shutil.rmtree(self._requests / rid, ignore_errors=True)

    def get(self, name_or_id: str) -> ForgetRequest:
        """The request with this id, else the ready one with this name, else that name's latest attempt."""
        self._reap()
        found = self._store.by_id(name_or_id)
        if found is not None:
            return found
        attempts = self._store.by_name(name_or_id)
        if attempts:
            return next((r for r in attempts if r.status == "ready"), attempts[-1])
        names = sorted({r.name for r in self._store.all()})
        raise UnknownRequestError(f"no forget request named {name_or_id!r} in {self.root}; known: "
                                  f"{', '.join(names) or 'none'}")

    def list(self, *, include_failed: bool = True) -> list[ForgetRequest]:
        """Every request in creation order (failed attempts too, unless ``include_failed`` is False)."""
        self._reap()
        return [r for r in self._store.all() if include_failed or r.status != "failed"]

    def ready(self) -> list[ForgetRequest]:
        """The requests in force, in the order they became ready (the order their adapters were trained in)."""
        self._reap()
        return self._store.ready()

    def latest(self) -> ForgetRequest | None:
        ready = self._store.ready()
        return ready[-1] if ready else None

    @property
    def generation(self) -> int:
        """Bumped whenever a request becomes ready or is retired: one read, for servers polling for changes."""
        return int(self._store.get_meta(GENERATION_KEY))

    def artifact_path(self, request: ForgetRequest, key: str) -> Path:
        rel = request.artifacts.get(key)
        if rel is None:
            raise ArtifactError(f"forget request {request.name!r} ({request.status}) has no artifact {key!r}; "
                                f"it has {sorted(request.artifacts) or 'none'}")
        path = self.root / rel
        if not path.exists():
            raise ArtifactError(f"artifact {key!r} of forget request {request.name!r} is missing at {path}; "
                                "retire the request and register it again")
        return path

    def retire(self, name_or_id: str) -> ForgetRequest:
        """Take a ready request out of force (its row and artifacts stay); the name can then be reused."""
        request = self.get(name_or_id)
        if request.status != "ready":
            raise RegistryError(f"forget request {request.name!r} is {request.status}; only a ready request can "
                                "be retired")
        self._store.retire(request.id)
        return self._store.by_id(request.id)

    def get_meta(self, key: str) -> str | None:
        """A small shared value other components keep with the registry (e.g. the vLLM routing pointer)."""
        return self._store.get_meta(key)

    def set_meta(self, key: str, value: str) -> None:
        if key == GENERATION_KEY:
            raise RegistryError(f"meta key {GENERATION_KEY!r} belongs to the registry")
        self._store.set_meta(key, value)


def _entries(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for parent, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(parent, name))
        _fsync(Path(parent))
