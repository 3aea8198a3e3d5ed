"""The forget-request registry on PostgreSQL: the SQLite suite's behaviour against a real server, racing
registrations on both stores, leases across hosts, and bad databases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import test_forget_registry as sqlite_suite
from pg_server import free_port

from serve_unlearn.errors import RegistryError, UnlearnConfigError
from serve_unlearn.registry import DATABASE_ENV, ForgetRegistry

_register = sqlite_suite._register


@pytest.fixture(params=["sqlite", "postgres"])
def database(request):
    """Both stores: None (SQLite in the registry folder) or a PostgreSQL DSN."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_dsn")


@pytest.mark.parametrize("body", [
    sqlite_suite.test_lifecycle,
    sqlite_suite.test_exception_inside_register_fails_and_can_be_retried,
    sqlite_suite.test_declared_artifact_must_exist,
    sqlite_suite.test_artifact_errors,
    sqlite_suite.test_names_and_duplicates,
    sqlite_suite.test_concurrent_register_of_one_name,
    sqlite_suite.test_sigkill_inside_register_leaves_it_failed_and_earlier_intact,
    sqlite_suite.test_crash_between_rename_and_commit_is_reaped,
], ids=lambda body: body.__name__.removeprefix("test_"))
def test_sqlite_suite_on_postgres(body, pg_dsn, tmp_path, monkeypatch):
    """The SQLite tests' bodies, unchanged, with the environment variable pointing every registry they open (and
    the subprocess they start) at PostgreSQL."""
    monkeypatch.setenv(DATABASE_ENV, pg_dsn)
    body(tmp_path)


def test_racing_registrations_from_several_registries(database, tmp_path):
    n = 4
    registries = [ForgetRegistry(tmp_path, database=database) for _ in range(n)]
    start = threading.Barrier(n)

    def attempt(registry, name):
        start.wait()
        try:
            _register(registry, name)
            return "ok"
        except RegistryError as exc:
            return str(exc)

    with ThreadPoolExecutor(n) as pool:
        same = list(pool.map(attempt, registries, ["topic"] * n))
        distinct = list(pool.map(attempt, registries, [f"topic-{i}" for i in range(n)]))
    assert same.count("ok") == 1, same
    assert all("being registered" in r or "retire it first" in r for r in same if r != "ok"), same
    assert distinct == ["ok"] * n
    assert sorted(r.version for r in registries[0].ready()) == list(range(1, n + 2))
    assert [r.status for r in registries[-1].list()] == ["ready"] * (n + 1)  # the refused attempts left no rows
    assert registries[-1].generation == n + 1


STALLED_ON_ANOTHER_HOST = """
import pathlib, socket, sys, time
socket.gethostname = lambda: "replica-on-another-host"  # the test's host cannot check this owner's pid
from serve_unlearn.registry import ForgetRegistry
root, dsn, ttl, inside, go = sys.argv[1:]
registry = ForgetRegistry(root, database=dsn, lease_ttl=float(ttl))
with registry.register("stalled", "d", {}) as staging:
    pathlib.Path(inside).write_text(staging.request_id)
    while not pathlib.Path(go).exists():
        time.sleep(0.05)
"""


def test_a_lapsed_lease_is_reaped_from_any_host(pg_dsn, tmp_path):
    """A replica on "another host" renews its lease while it trains, then hangs (SIGSTOP): after the TTL this
    host fails its row and removes its folder; when it wakes up, its registration fails instead of going ready."""
    ttl = 1.5
    root, inside, go = tmp_path / "reg", tmp_path / "inside", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_ON_ANOTHER_HOST, str(root), pg_dsn, str(ttl),
                             str(inside), str(go)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not inside.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the subprocess never got inside register"
            time.sleep(0.05)
        registry = ForgetRegistry(root, database=pg_dsn)
        time.sleep(ttl + 1)
        assert registry.get("stalled").status == "training"  # renewed all along

        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        while registry.get("stalled").status == "training":
            assert time.monotonic() < stopped + ttl + 10, "the lapsed lease was never reaped"
            time.sleep(0.1)
        failed = registry.get("stalled")
        assert failed.error == (f"interrupted (process {proc.pid} on replica-on-another-host stopped renewing its "
                                "lease during training); register it again")
        assert not (root / "staging" / failed.id).exists()

        os.kill(proc.pid, signal.SIGCONT)
        go.touch()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "lost its staging folder" in err, err
    finally:
        proc.kill()
        proc.wait()
    assert registry.get("stalled") == failed and registry.generation == 0
    assert _register(registry, "stalled").status == "ready"


def test_bad_postgres_databases(pg_server, pg_dsn, tmp_path, monkeypatch):
    import psycopg

    for dsn, message in [
        (f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/x", "unavailable.*server runs"),
        (pg_server.dsn("absent"), 'database "absent" does not exist.*createdb'),
        ("not a dsn", "does not parse as a PostgreSQL connection string"),
    ]:
        with pytest.raises(RegistryError, match=message) as raised:
            ForgetRegistry(tmp_path, database=dsn)
        assert "hunter2" not in str(raised.value)

    with pytest.raises(RegistryError, match="tables are missing"):
        ForgetRegistry(tmp_path, database=pg_dsn, create=False)

    foreign = pg_server.create_database("another_program")
    with psycopg.connect(foreign, autocommit=True) as con:
        con.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(RegistryError, match="not a serve-unlearn registry .*users.*database of its own"):
        ForgetRegistry(tmp_path, database=foreign)

    ForgetRegistry(tmp_path, database=pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as con:
        con.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RegistryError, match="newer serve-unlearn"):
        ForgetRegistry(tmp_path, database=pg_dsn)

    with pytest.raises(UnlearnConfigError, match="lease_ttl"):
        ForgetRegistry(tmp_path, database=pg_dsn, lease_ttl=0)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the driver were not installed
    with pytest.raises(RegistryError, match=r"pip install 'serve-unlearn\[postgres\]'"):
        ForgetRegistry(tmp_path, database=pg_dsn)
