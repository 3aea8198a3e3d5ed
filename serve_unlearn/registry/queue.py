"""The queue of forget requests filed over HTTP: a ``jobs`` table in the registry's own database.

A filing is one row that moves ``queued`` -> ``training`` -> ``guarded`` (its detector refuses what it flags) ->
``ready`` (its artifacts are a ready ``requests`` row) -> ``in_force`` (every server routes with it), or ends
``failed`` / ``retired``. The submitted records are written to ``root/inbox/<id>.json`` (fsynced) before the row,
so a queued row always has its data. Workers claim rows atomically (SQLite: its write lock, one worker per host;
PostgreSQL: ``FOR UPDATE SKIP LOCKED``, any number of workers on any host) and renew a heartbeat while they
train; a row whose worker died (same host: its pid; any host: a heartbeat older than ``lease_ttl``) goes back to
``queued`` until ``max_attempts`` is spent, then ``failed``. Every status change is one conditional UPDATE, so two
processes never move the same row twice.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..data import data_digest
from ..errors import ConflictError, UnknownRequestError
from .forget_registry import ForgetRegistry, check_name
from .store import Owner

STATUSES = ("queued", "training", "guarded", "ready", "in_force", "failed", "retired")
WORKING = ("training", "guarded")  # a worker owns the row
GUARDING = ("guarded", "ready")  # the detector refuses what it flags until the adapter is in force
_COLUMNS = ("id, name, method, status, created_at, spec, attempts, max_attempts, progress, timings, result, "
            "error")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Job:
    id: str
    name: str
    method: str
    status: str
    created_at: str
    spec: dict  # config, data digest, counts (records, retain, probes), inbox file
    attempts: int
    max_attempts: int
    progress: dict  # phase, step, total
    timings: dict  # status -> ISO time it was entered
    result: dict  # request_id (O3) or patch (SalUn/IAU), artifacts' digests, guard, verification
    error: str | None

    def to_dict(self) -> dict:
        return asdict(self)


class ForgetQueue:
    """The filings of one registry. ``lease_ttl``: seconds without a heartbeat after which any process may
    re-queue a row (workers beat every few seconds)."""

    def __init__(self, registry: ForgetRegistry, *, lease_ttl: float = 60.0):
        self.registry = registry
        self.lease_ttl = lease_ttl
        self._store = registry._store
        self.inbox = registry.root / "inbox"

    # -- filing -----------------------------------------------------------------------------------------------
    def file(self, name: str, method: str, records: list[dict], *, config: dict, probes: dict | None = None,
             retain: list[dict] | None = None, max_attempts: int = 3) -> Job:
        """Queue a validated filing (``retain``: the retain records of a weight-patch method); ConflictError when
        the name is live here or in the registry."""
        check_name(name)
        job_id = uuid.uuid4().hex
        submission = {"records": records, "probes": probes or {}, **({"retain": retain} if retain else {})}
        self.inbox.mkdir(parents=True, exist_ok=True)
        path = self.inbox / f"{job_id}.json"
        _write_durably(path, json.dumps(submission).encode())
        spec = {"config": config, "data_digest": data_digest(records), "records": len(records),
                "probes": {k: len(v) for k, v in (probes or {}).items()}, "inbox": f"inbox/{job_id}.json",
                **({"retain": len(retain), "retain_digest": data_digest(retain)} if retain else {})}
        created = now_iso()
        try:
            with self._store._connect(write=True) as con:
                self._check_free(con, name)
                con.execute("INSERT INTO jobs (id, name, method, status, created_at, spec, max_attempts, timings) "
                            "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                            (job_id, name, method, created, json.dumps(spec), max_attempts,
                             json.dumps({"queued": created})))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return self.get(job_id)

    @staticmethod
    def _check_free(con, name: str) -> None:
        live = con.execute("SELECT id, status FROM jobs WHERE name = ? AND status NOT IN ('failed', 'retired')",
                           (name,)).fetchone()
        if live is not None:
            raise ConflictError(f"a forget request named {name!r} is already {live[1]} (id {live[0]}); retire it "
                                "first (DELETE /v1/forget-requests/{id}) or choose another name")
        registered = con.execute("SELECT status FROM requests WHERE name = ? AND status IN ('training', 'ready')",
                                 (name,)).fetchone()
        if registered is not None:
            raise ConflictError(f"the registry already has a {registered[0]} request named {name!r} (filed with the "
                                "CLI); retire it with `serve-unlearn o3 retire` or choose another name")

    def submission(self, job: Job) -> dict:
        """The records and probes a filing was made with."""
        return json.loads((self.registry.root / job.spec["inbox"]).read_text())

    # -- reading ----------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        with self._store._connect() as con:
            row = con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownRequestError(f"no forget request with id {job_id!r}; GET /v1/forget-requests lists them")
        return _job(row)

    def list(self, status: str | None = None) -> list[Job]:
        sql, params = f"SELECT {_COLUMNS} FROM jobs", ()
        if status is not None:
            sql, params = sql + " WHERE status = ?", (status,)
        with self._store._connect() as con:
            return [_job(r) for r in con.execute(sql + " ORDER BY seq", params)]

    def counts(self) -> dict[str, int]:
        with self._store._connect() as con:
            found = dict(con.execute("SELECT status, count(*) FROM jobs GROUP BY status"))
        return {s: int(found.get(s, 0)) for s in STATUSES}

    def guards(self) -> list[Job]:
        """Filings whose detector is out and whose adapter is not yet in force: the middlewares refuse what
        their detectors flag."""
        with self._store._connect() as con:
            rows = con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status IN ('guarded', 'ready') ORDER BY seq")
            return [j for j in map(_job, rows) if j.result.get("guard")]

    # -- workers ----------------------------------------------------------------------------------------------
    def claim(self, owner: Owner | None = None) -> Job | None:
        """The oldest queued filing, now ``training`` and owned by ``owner``; None when the queue is empty."""
        self.reap()
        owner = owner or Owner.current()
        with self._store._transaction() as con:
            row = con.execute(f"SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
                              f"{self._store._SKIP_LOCKED}").fetchone()
            if row is None:
                return None
            timings = json.loads(con.execute("SELECT timings FROM jobs WHERE id = ?", row).fetchone()[0])
            timings["training"] = now_iso()
            con.execute("UPDATE jobs SET status = 'training', attempts = attempts + 1, owner_pid = ?, owner_start = "
                        "?, owner_host = ?, heartbeat = ?, progress = ?, timings = ?, error = NULL WHERE id = ?",
                        (owner.pid, owner.start, owner.host, time.time(),
                         json.dumps({"phase": "starting", "step": 0, "total": 0}), json.dumps(timings), row[0]))
        return self.get(row[0])

    def beat(self, job_id: str, progress: dict | None = None) -> bool:
        """Renew the worker's heartbeat (and record progress); False when the row is no longer the worker's
        (retired or re-queued meanwhile): the worker stops."""
        sets, params = "heartbeat = ?", [time.time()]
        if progress is not None:
            sets, params = sets + ", progress = ?", [*params, json.dumps(progress)]
        with self._store._connect() as con:
            cur = con.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND status IN ('training', 'guarded')",
                              (*params, job_id))
            return cur.rowcount == 1

    def move(self, job_id: str, status: str, *, expect: tuple[str, ...], result: dict | None = None,
             error: str | None = None) -> bool:
        """Set ``status`` if the row is in one of ``expect`` (merging ``result``, stamping the time); False
        otherwise, changing nothing."""
        with self._store._connect(write=True) as con:
            row = con.execute("SELECT status, timings, result FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in expect:
                return False
            timings, merged = json.loads(row[1]), json.loads(row[2])
            timings[status] = now_iso()
            merged.update(result or {})
            con.execute("UPDATE jobs SET status = ?, timings = ?, result = ?, error = ? WHERE id = ?",
                        (status, json.dumps(timings), json.dumps(merged), error, job_id))
            return True

    def retry(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.status != "failed":
            raise ConflictError(f"forget request {job.name!r} is {job.status}; only a failed request can be retried")
        with self._store._connect(write=True) as con:
            self._check_free(con, job.name)
            con.execute("UPDATE jobs SET status = 'queued', attempts = 0, error = NULL, result = '{}', progress = "
                        "'{}' WHERE id = ? AND status = 'failed'", (job_id,))
        return self.get(job_id)

    def reap(self) -> list[str]:
        """Re-queue (or fail, once its attempts are spent) each working row whose worker is gone."""
        stale = time.time() - self.lease_ttl
        with self._store._connect() as con:
            rows = con.execute("SELECT id, attempts, max_attempts, owner_pid, owner_start, owner_host, heartbeat "
                               "FROM jobs WHERE status IN ('training', 'guarded')").fetchall()
        moved = []
        for jid, attempts, max_attempts, pid, start, host, beat in rows:
            owner = Owner(pid, start, host)
            if not (owner.is_gone() or (beat or 0) < stale):
                continue
            why = f"worker process {pid} on {host} stopped during attempt {attempts}"
            if attempts < max_attempts:
                done = self.move(jid, "queued", expect=WORKING, result={"guard": None}, error=why + "; re-queued")
            else:
                done = self.move(jid, "failed", expect=WORKING, result={"guard": None},
                                 error=why + f"; {max_attempts} attempts spent (POST .../retry to try again)")
            if done:
                moved.append(jid)
        return moved


def _job(row) -> Job:
    jid, name, method, status, created, spec, attempts, max_attempts, progress, timings, result, error = row
    return Job(jid, name, method, status, created, json.loads(spec), int(attempts), int(max_attempts),
               json.loads(progress), json.loads(timings), json.loads(result), error)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
