"""The registry's rows in SQLite (``<root>/registry.sqlite``, WAL): the default, for the processes of one host."""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from ..errors import RegistryError
from .store import SQLStore, schema


class SQLiteStore(SQLStore):
    """The registry in ``registry.sqlite`` (WAL); writes take SQLite's write lock up front (BEGIN IMMEDIATE)."""

    _SEQ_COLUMN = "INTEGER PRIMARY KEY AUTOINCREMENT"

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
                self._open_schema(con, tables, create, schema(self._SEQ_COLUMN))
                con.execute("COMMIT")
        finally:
            con.close()

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """An flock on ``<registry>/<name>.lock``: the processes of one host (SQLite's reach)."""
        with open(self.path.parent / f"{name}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

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
