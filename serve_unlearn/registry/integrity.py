"""One integrity scheme for every forget-request artifact: a manifest of file digests in the registry row.

When a request becomes ready, the registry records the sha256 of every file in its folder (detector tensors and
JSON, tokenizer, adapter weights and config, the served concatenation) in its row, and, when
``$SERVE_UNLEARN_SIGNING_KEY`` is set, an HMAC-SHA256 over the row's identity and that manifest. Whoever loads an
artifact for serving (the gate, the adapter bank, the launcher) checks every file of it against the manifest
first: a changed, missing, added or linked file is an ``ArtifactError`` naming it, and the serving side does not
route the version. With the key set where artifacts are loaded, a row without a valid signature is refused too,
so a process that can write the artifact folder (or the database) but not the key cannot forge a request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path, PurePosixPath

from ..errors import ArtifactError

SIGNING_KEY_ENV = "SERVE_UNLEARN_SIGNING_KEY"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_manifest(folder: Path, prefix: str) -> dict[str, str]:
    """``{prefix/relpath: sha256}`` of every regular file under ``folder``; links are refused (an artifact must
    not point outside its folder)."""
    manifest = {}
    for parent, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(parent, name)
            if path.is_symlink():
                raise ArtifactError(f"{path} is a symbolic link; an artifact folder holds only its own files")
        for name in sorted(files):
            path = Path(parent, name)
            manifest[str(PurePosixPath(prefix, path.relative_to(folder).as_posix()))] = file_sha256(path)
    return manifest


def signing_key() -> bytes | None:
    key = os.environ.get(SIGNING_KEY_ENV)
    return key.encode() if key else None


def signature(key: bytes, request_id: str, name: str, data_digest: str, files: dict[str, str]) -> str:
    """HMAC-SHA256 over the canonical JSON of what identifies a request and its artifacts."""
    payload = json.dumps({"id": request_id, "name": name, "data_digest": data_digest, "files": files},
                         sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def verify_tree(root: Path, artifact: str, files: dict[str, str], what: str) -> None:
    """Every file under ``root/artifact`` (a file or a folder) matches ``files`` (paths relative to ``root``), and
    every recorded file under it is present. ``what`` names the request in messages."""
    base = PurePosixPath(artifact)
    if base.is_absolute() or ".." in base.parts:
        raise ArtifactError(f"{what}: artifact path {artifact!r} leaves the registry folder")
    target = root / artifact
    recorded = {p: d for p, d in files.items() if p == artifact or PurePosixPath(p).is_relative_to(base)}
    if target.is_symlink():
        raise ArtifactError(f"{what}: {target} is a symbolic link; artifacts hold only their own files")
    found = {artifact: file_sha256(target)} if target.is_file() else (
        folder_manifest(target, artifact) if target.is_dir() else {})
    for path in sorted(set(recorded) | set(found)):
        if path not in found:
            raise ArtifactError(f"{what}: {root / path} is missing; retire the request and register it again")
        if path not in recorded:
            raise ArtifactError(f"{what}: {root / path} was not part of the registered request (a file was added); "
                                "remove it, or retire the request and register it again")
        if not hmac.compare_digest(found[path], recorded[path]):
            raise ArtifactError(f"{what}: {root / path} differs from the registered file (its sha256 changed); "
                                "retire the request and register it again")
