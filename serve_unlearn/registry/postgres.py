"""The forget-request registry's rows in PostgreSQL, for replicas (on one host or several) sharing one registry.

The SQL is :class:`~serve_unlearn.registry.store.SQLStore`'s; this store connects (psycopg 3, imported only here
so SQLite users need no driver), serializes writers with a row lock where SQLite takes BEGIN IMMEDIATE, and keeps a
lease on each training row: its process renews ``heartbeat_at`` from a daemon thread, and any replica, on any host,
fails a row whose lease ran out (a process that hangs, or a host that is gone, cannot be asked by pid). Lease times
are the server's ``now()``, so the replicas' clocks need not agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator

from ..errors import RegistryError, UnlearnConfigError
from .store import GENERATION_KEY, ForgetRequest, Owner, SQLStore, schema

logger = logging.getLogger(__name__)

_EXTRA_COLUMNS = """,
            heartbeat_at TIMESTAMPTZ,
            lease_s DOUBLE PRECISION"""
# Two replicas opening an empty database at once take turns creating the schema (the key is arbitrary).
_SCHEMA_LOCK = 0x5E_0E_C0DE
# The owner renews its lease this many times per TTL, so a few late or failed renewals do not lose it.
RENEWALS_PER_TTL = 6


def _driver():
    try:
        import psycopg
    except ImportError as exc:
        raise RegistryError("a registry in PostgreSQL needs the psycopg driver: "
                            "pip install 'serve-unlearn[postgres]'") from exc
    return psycopg


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())  # libpq's messages span lines with tabs


class _Connection:
    """A psycopg connection that takes SQLStore's ``?`` placeholders (psycopg's are ``%s``)."""

    def __init__(self, con):
        self._con = con

    def execute(self, sql: str, params: tuple | None = None):
        return self._con.execute(sql.replace("?", "%s"), params)


class PostgresStore(SQLStore):
    """The registry in a PostgreSQL database (``dsn``: a URL or ``key=value`` string); one connection per
    operation, like the SQLite store, so it is safe across threads and forked server processes."""

    _LEASE_EXPIRED = "heartbeat_at < now() - lease_s * interval '1 second'"
    _SEQ_COLUMN = "BIGSERIAL PRIMARY KEY"
    _SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"

    def __init__(self, dsn: str, *, create: bool, lease_ttl: float = 60.0):
        if not lease_ttl > 0:
            raise UnlearnConfigError(f"lease_ttl must be a positive number of seconds, not {lease_ttl!r}")
        self.lease_ttl = float(lease_ttl)
        self._pg = _driver()
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        try:
            params = conninfo_to_dict(dsn)
        except self._pg.Error as exc:  # neither the DSN nor libpq's complaint (which quotes it) is echoed: it
            # may hold a password
            raise RegistryError("the registry database's DSN does not parse as a PostgreSQL connection string; "
                                "use a URL such as postgresql://user@host:5432/serve_unlearn") from exc
        named = {k: params[k] for k in ("host", "port", "dbname", "user") if k in params}
        self.where = f"PostgreSQL ({make_conninfo('', **named) or 'the libpq defaults'})"
        params.setdefault("connect_timeout", "10")  # an unreachable server fails in seconds, not minutes
        params.setdefault("application_name", "serve-unlearn")
        self._conninfo = make_conninfo("", **params)
        with self._session(autocommit=False) as con:
            con.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables WHERE "
                                                "table_schema = current_schema()")}
            self._open_schema(con, tables, create, schema(self._SEQ_COLUMN, _EXTRA_COLUMNS))

    @contextlib.contextmanager
    def _session(self, *, autocommit: bool) -> Iterator[_Connection]:
        """A connection; without ``autocommit``, one transaction committed on a clean exit, else rolled back."""
        try:
            with self._pg.connect(self._conninfo, autocommit=autocommit) as con:
                yield _Connection(con)
        except self._pg.OperationalError as exc:
            raise RegistryError(f"registry database {self.where} is unavailable: {_one_line(exc)}; check that "
                                "the server runs, that the DSN (host, port, user, password, database) is right "
                                "and that the database exists (createdb NAME)") from exc
        except self._pg.Error as exc:
            raise RegistryError(f"registry database {self.where} refused an operation: {_one_line(exc)}; check "
                                "that it holds a serve-unlearn registry and that its user may write it") from exc

    @contextlib.contextmanager
    def _connect(self, *, write: bool = False) -> Iterator[_Connection]:
        with self._session(autocommit=not write) as con:
            if write:  # the registry's write lock: one writer at a time, as BEGIN IMMEDIATE gives on SQLite
                con.execute("SELECT value FROM meta WHERE key = ? FOR UPDATE", (GENERATION_KEY,))
            yield con

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """A session-level advisory lock keyed by ``name``, held on its own connection: every replica on every
        host waits for it (a lock file on a shared filesystem would not be reliable)."""
        key = int.from_bytes(hashlib.sha256(f"serve-unlearn:{name}".encode()).digest()[:8], "big", signed=True)
        with self._session(autocommit=True) as con:
            con.execute("SELECT pg_advisory_lock(?)", (key,))
            try:
                yield
            finally:
                con.execute("SELECT pg_advisory_unlock(?)", (key,))

    def _transaction(self) -> contextlib.AbstractContextManager[_Connection]:
        return self._session(autocommit=False)

    def insert(self, request: ForgetRequest, owner: Owner) -> None:
        """The shared insert, with the owner's first lease in the same transaction."""
        with self._connect(write=True) as con:
            self._insert(con, request, owner)
            con.execute("UPDATE requests SET heartbeat_at = now(), lease_s = ? WHERE id = ?",
                        (self.lease_ttl, request.id))

    def renew(self, request_id: str) -> bool:
        """Renew a training row's lease; False once another process failed the row (the lease was lost). A row
        its owner already made ready counts as kept: renewals may race with the end of ``register``."""
        with self._connect() as con:
            return con.execute("UPDATE requests SET heartbeat_at = now() WHERE id = ? AND status <> 'failed'",
                               (request_id,)).rowcount == 1

    @contextlib.contextmanager
    def lease(self, request_id: str) -> Iterator[None]:
        """Renew the lease from a daemon thread every ``lease_ttl / RENEWALS_PER_TTL`` s while the block runs."""
        stop = threading.Event()
        thread = threading.Thread(target=self._keep, args=(request_id, stop), daemon=True,
                                  name=f"serve-unlearn-lease-{request_id[:8]}")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _keep(self, request_id: str, stop: threading.Event) -> None:
        interval = self.lease_ttl / RENEWALS_PER_TTL
        while not stop.wait(interval):
            try:
                if not self.renew(request_id):
                    logger.error("forget request %s lost its lease (another process marked it failed); its "
                                 "registration will fail", request_id)
                    return
            except RegistryError as exc:  # a blip: the lease outlives several missed renewals
                logger.warning("forget request %s: cannot renew its lease, retrying in %.1f s: %s", request_id,
                               interval, exc)
