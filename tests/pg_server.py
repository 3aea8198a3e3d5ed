"""A throwaway PostgreSQL server for tests: initdb into a temporary folder, ``postgres`` on a free 127.0.0.1 port
with its unix socket in that folder, trust authentication, durability off (nothing outlives the test session).

Debian's ``postgresql`` package keeps initdb and postgres in ``/usr/lib/postgresql/<version>/bin`` (off PATH), and
both refuse to run as root: as root the server runs as the ``postgres`` user the package creates.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "postgres"


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: PATH first, else the newest Debian version."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: [int(part) for part in p.parent.parent.name.split(".") if part.isdigit()])
    return versions[-1].parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self._as_user: list[str] = []
        uid = None
        if os.geteuid() == 0:
            try:
                uid = pwd.getpwnam("postgres").pw_uid
            except KeyError:
                raise RuntimeError("running as root, and there is no 'postgres' user to run PostgreSQL as") from None
            self._as_user = ["runuser", "-u", "postgres", "--"]
        # Not pytest's tmp_path: its parent is private to the current user, and the server may run as another.
        self.dir = Path(tempfile.mkdtemp(prefix="serve-unlearn-pg-"))
        if uid is not None:
            os.chown(self.dir, uid, -1)
        self.data = self.dir / "data"
        self.port = 0

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run([*self._as_user, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=120, check=False)
        if proc.returncode:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{log}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        for attempt in range(3):  # a free port can be taken by someone else before the server binds it
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options, "-w", "-t",
                          "60", "start")
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its DSN."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)
