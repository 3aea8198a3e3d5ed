"""The forget-request queue on SQLite and on PostgreSQL: atomic claims by many workers, dead workers' rows re-queued
until their attempts are spent, conditional moves, and an upgrade of a version-1 registry."""

from __future__ import annotations

import concurrent.futures
import sqlite3
import subprocess
import sys
import threading

import pytest

from serve_unlearn.errors import ConflictError, UnknownRequestError
from serve_unlearn.registry import ForgetQueue, ForgetRegistry, Owner

RECORDS = [{"prompt": f"question {i}?"} for i in range(12)]


@pytest.fixture(params=["sqlite", "postgres"])
def queue(request, tmp_path):
    database = request.getfixturevalue("pg_dsn") if request.param == "postgres" else None
    return ForgetQueue(ForgetRegistry(tmp_path / "registry", database=database), lease_ttl=30)


def _dead_owner() -> Owner:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = Owner(proc.pid, None, Owner.current().host)
    proc.wait()
    return owner


def test_each_queued_filing_is_claimed_by_exactly_one_of_many_workers(queue):
    ids = {queue.file(f"r{i}", "o3", RECORDS, config={}).id for i in range(12)}
    barrier = threading.Barrier(6)

    def worker():
        barrier.wait()
        got = []
        while (job := queue.claim()) is not None:
            got.append(job.id)
        return got

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        claimed = [jid for part in pool.map(lambda _: worker(), range(6)) for jid in part]
    assert sorted(claimed) == sorted(ids)  # none twice, none lost
    assert queue.counts()["training"] == 12 and all(j.attempts == 1 for j in queue.list())


def test_filing_order_is_claim_order_and_the_data_is_kept(queue):
    first = queue.file("first", "o3", RECORDS, config={"lora": {"epochs": 1}}, probes={"forget": [{"question": "q"}]})
    queue.file("second", "o3", RECORDS, config={})
    job = queue.claim()
    assert job.id == first.id and job.status == "training"
    assert queue.submission(job) == {"records": RECORDS, "probes": {"forget": [{"question": "q"}]}}
    assert job.spec["records"] == 12 and job.spec["config"] == {"lora": {"epochs": 1}}


def test_a_dead_workers_filing_is_requeued_then_failed_when_its_attempts_are_spent(queue):
    job = queue.file("fragile", "o3", RECORDS, config={}, max_attempts=2)
    for attempt in (1, 2):
        claimed = queue.claim(_dead_owner())
        assert claimed.id == job.id and claimed.attempts == attempt
        assert queue.reap() == [job.id]
    final = queue.get(job.id)
    assert final.status == "failed" and "2 attempts spent" in final.error
    assert queue.claim() is None
    again = queue.retry(job.id)
    assert again.status == "queued" and again.attempts == 0 and again.error is None


def test_a_live_workers_filing_is_left_alone(queue):
    job = queue.file("alive", "o3", RECORDS, config={})
    queue.claim()
    assert queue.reap() == [] and queue.get(job.id).status == "training"
    assert queue.beat(job.id, {"phase": "lora", "step": 3, "total": 9})
    assert queue.get(job.id).progress == {"phase": "lora", "step": 3, "total": 9}


def test_moves_are_conditional_and_names_stay_unique_while_live(queue):
    job = queue.file("topic", "o3", RECORDS, config={})
    with pytest.raises(ConflictError, match="already queued"):
        queue.file("topic", "o3", RECORDS, config={})
    assert not queue.move(job.id, "in_force", expect=("ready",))  # not ready: nothing changes
    assert queue.get(job.id).status == "queued"
    assert queue.move(job.id, "retired", expect=("queued",))
    assert not queue.beat(job.id)  # a worker holding it would stop
    assert queue.file("topic", "o3", RECORDS, config={}).status == "queued"  # a retired name is free
    with pytest.raises(ConflictError, match="only a failed request"):
        queue.retry(job.id)
    with pytest.raises(UnknownRequestError):
        queue.get("nope")


def test_a_version_1_registry_gains_the_queue_and_keeps_its_rows(tmp_path):
    root = tmp_path / "registry"
    ForgetRegistry(root)
    con = sqlite3.connect(root / "registry.sqlite")
    con.executescript("DROP TABLE jobs; UPDATE schema_version SET version = 1;")
    con.execute("INSERT INTO meta (key, value) VALUES ('kept', 'yes')")
    con.commit()
    con.close()
    registry = ForgetRegistry(root, create=False)
    assert registry.get_meta("kept") == "yes"
    assert ForgetQueue(registry).file("after-upgrade", "o3", RECORDS, config={}).status == "queued"


def test_one_publication_at_a_time_across_processes_sharing_the_registry(queue):
    registry = queue.registry
    order = []
    held = threading.Event()

    def first():
        with registry.exclusive("publish"):
            held.set()
            order.append("first in")
            threading.Event().wait(0.5)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    held.wait(10)
    other = ForgetRegistry(registry.root, create=False, database=getattr(registry._store, "_conninfo", None))
    with other.exclusive("publish"):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]
