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

The rows live in a store (:mod:`~serve_unlearn.registry.store`: every SQL statement, written once for both
databases; :mod:`~serve_unlearn.registry.sqlite`, :mod:`~serve_unlearn.registry.postgres`: connecting and locking).
The registry writes only rows and folders; artifacts are safetensors and JSON written by others. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from ..errors import ArtifactError, RegistryError, UnknownRequestError, UnlearnDataError
from .integrity import SIGNING_KEY_ENV, folder_manifest, signature, signing_key, verify_tree
from .sqlite import SQLiteStore
from .store import GENERATION_KEY, ForgetRequest, Owner, SQLStore

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DATABASE_ENV = "SERVE_UNLEARN_REGISTRY_DATABASE"


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


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UnlearnDataError(f"forget request name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' "
                               "or '-', starting with a letter or digit")


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
            from .postgres import PostgresStore  # its driver is optional

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
        placed = self._requests / staging.request_id
        files = folder_manifest(placed, str(prefix))
        request = self._store.by_id(staging.request_id)
        key = signing_key()
        sig = None if key is None else signature(key, request.id, request.name, request.data_digest, files)
        self._store.mark_ready(staging.request_id, {k: str(prefix / rel) for k, rel in staging.artifacts.items()},
                               files, sig)

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

    def verified_path(self, request: ForgetRequest, key: str) -> Path:
        """``artifact_path``, after checking every file of that artifact against the manifest recorded when the
        request became ready (and its signature, when ``$SERVE_UNLEARN_SIGNING_KEY`` is set here): what serving
        loads. ArtifactError names the first file that differs."""
        path = self.artifact_path(request, key)
        what = f"forget request {request.name!r} ({request.id[:8]})"
        sign_key = signing_key()
        if request.files is None:
            if sign_key is not None:
                raise ArtifactError(f"{what} has no file manifest (registered before manifests), so its signature "
                                    f"cannot be checked; register it again with ${SIGNING_KEY_ENV} set")
            logger.warning("%s was registered before file manifests: its artifacts are not verified", what)
            return path
        if sign_key is not None:
            expected = signature(sign_key, request.id, request.name, request.data_digest, request.files)
            if request.signature is None or not hmac.compare_digest(expected, request.signature):
                raise ArtifactError(f"{what}: its signature is {'missing' if request.signature is None else 'wrong'}"
                                    f" for the signing key in ${SIGNING_KEY_ENV}; it was not registered with this "
                                    "key, or its record was changed")
        verify_tree(self.root, request.artifacts[key], request.files, what)
        return path

    def retire(self, name_or_id: str) -> ForgetRequest:
        """Take a ready request out of force (its row and artifacts stay); the name can then be reused."""
        request = self.get(name_or_id)
        if request.status != "ready":
            raise RegistryError(f"forget request {request.name!r} is {request.status}; only a ready request can "
                                "be retired")
        self._store.retire(request.id)
        return self._store.by_id(request.id)

    def exclusive(self, name: str) -> contextlib.AbstractContextManager[None]:
        """A lock every process sharing this registry (replicas on any host, with PostgreSQL) takes for ``name``:
        one publication to the servers at a time."""
        return self._store.exclusive(name)

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
