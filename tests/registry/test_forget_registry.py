"""The forget-request registry: lifecycle, failed and interrupted training, and bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from serve_unlearn.errors import ArtifactError, RegistryError, UnknownRequestError, UnlearnDataError
from serve_unlearn.registry import ForgetRegistry, ForgetRequest, Owner


def _register(registry, name, payload="{}"):
    with registry.register(name, f"sha256:{name}", {"lr": 1e-4}) as staging:
        (staging.dir / "detector").mkdir()
        (staging.dir / "detector" / "config.json").write_text(payload)
        staging.add_artifact("detector", "detector")
    return registry.get(name)


def test_lifecycle(tmp_path):
    registry = ForgetRegistry(tmp_path / "reg")
    assert registry.generation == 0 and registry.latest() is None and registry.list() == []

    a = _register(registry, "chemistry", '{"a": 1}')
    b = _register(registry, "football")
    assert (a.status, a.version, b.version, registry.generation) == ("ready", 1, 2, 2)
    assert a.artifacts == {"detector": f"requests/{a.id}/detector"} and a.config == {"lr": 1e-4}
    assert json.loads((registry.artifact_path(a, "detector") / "config.json").read_text()) == {"a": 1}
    assert registry.get(a.id) == a and registry.latest() == b
    assert [r.name for r in registry.ready()] == ["chemistry", "football"]
    assert not list((tmp_path / "reg" / "staging").iterdir())

    retired = registry.retire("chemistry")
    assert (retired.status, retired.version, registry.generation) == ("retired", 1, 3)
    assert registry.artifact_path(retired, "detector").is_dir()  # kept for the record
    again = _register(registry, "chemistry")
    assert again.id != a.id and again.version == 4 and registry.get("chemistry") == again
    assert [r.name for r in registry.ready()] == ["football", "chemistry"]
    assert [r.id for r in registry.list()] == [a.id, b.id, again.id]

    reopened = ForgetRegistry(tmp_path / "reg", create=False)
    assert reopened.list() == registry.list() and reopened.generation == 4

    registry.set_meta("vllm.published", '{"version": 4}')
    assert reopened.get_meta("vllm.published") == '{"version": 4}' and reopened.get_meta("other") is None
    with pytest.raises(RegistryError):
        registry.set_meta("generation", "0")


def test_exception_inside_register_fails_and_can_be_retried(tmp_path):
    registry = ForgetRegistry(tmp_path)
    with pytest.raises(ValueError, match="diverged"), registry.register("topic", "d", {}) as staging:
        (staging.dir / "half.safetensors").write_bytes(b"x")
        raise ValueError("loss diverged")
    failed = registry.get("topic")
    assert (failed.status, failed.version, failed.error, failed.artifacts) == \
        ("failed", None, "ValueError: loss diverged", {})
    assert not staging.dir.exists() and not (tmp_path / "requests" / failed.id).exists()
    assert registry.generation == 0 and registry.ready() == []

    retry = _register(registry, "topic")
    assert retry.status == "ready" and retry.id != failed.id and registry.get("topic") == retry
    assert [r.status for r in registry.list()] == ["failed", "ready"]
    assert registry.list(include_failed=False) == [retry]
    with pytest.raises(RegistryError, match="only a ready request"):
        registry.retire(failed.id)


def test_declared_artifact_must_exist(tmp_path):
    registry = ForgetRegistry(tmp_path)
    with pytest.raises(ArtifactError, match="adapter"), registry.register("topic", "d", {}) as staging:
        staging.add_artifact("adapter", "adapter")
    assert registry.get("topic").status == "failed"
    with pytest.raises(ArtifactError):
        staging.add_artifact("x", "../outside")


def test_artifact_errors(tmp_path):
    registry = ForgetRegistry(tmp_path)
    request = _register(registry, "topic")
    with pytest.raises(ArtifactError, match="no artifact 'adapter'"):
        registry.artifact_path(request, "adapter")
    (registry.artifact_path(request, "detector") / "config.json").unlink()
    (registry.artifact_path(request, "detector")).rmdir()
    with pytest.raises(ArtifactError, match="missing"):
        registry.artifact_path(request, "detector")


def test_names_and_duplicates(tmp_path):
    registry = ForgetRegistry(tmp_path)
    for bad in ["", "-lead", "has space", "a/b", "x" * 65, "é"]:
        with pytest.raises(UnlearnDataError), registry.register(bad, "d", {}):
            pass
    _register(registry, "Topic_1.v-2")
    with pytest.raises(RegistryError, match="retire it first or choose another name"):
        _register(registry, "Topic_1.v-2")
    with pytest.raises(UnknownRequestError, match="Topic_1.v-2"):
        registry.get("nope")
    assert [r.status for r in registry.list()] == ["ready"]  # the refused attempts left no rows


def test_concurrent_register_of_one_name(tmp_path):
    first, second = ForgetRegistry(tmp_path), ForgetRegistry(tmp_path)
    with first.register("topic", "d", {}), pytest.raises(RegistryError, match="being registered"), \
            second.register("topic", "d", {}):
        pass
    assert first.get("topic").status == "ready"


KILLED_INSIDE_REGISTER = """
import pathlib, sys, time
from serve_unlearn.registry import ForgetRegistry
registry = ForgetRegistry(sys.argv[1])
with registry.register("first", "d1", {"lr": 1}) as staging:
    (staging.dir / "adapter_config.json").write_text('{"r": 8}')
    staging.add_artifact("adapter", "adapter_config.json")
with registry.register("second", "d2", {}) as staging:
    (staging.dir / "half.safetensors").write_bytes(b"x" * 1000)
    pathlib.Path(sys.argv[2]).write_text(staging.request_id)
    time.sleep(120)
"""


def test_sigkill_inside_register_leaves_it_failed_and_earlier_intact(tmp_path):
    root, flag = tmp_path / "reg", tmp_path / "inside"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_INSIDE_REGISTER, str(root), str(flag)])
    try:
        deadline = time.monotonic() + 25
        while not flag.exists():
            assert proc.poll() is None, "the subprocess ended before it got inside register"
            assert time.monotonic() < deadline, "the subprocess never got inside register"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    staged = root / "staging" / flag.read_text()
    assert staged.is_dir()

    registry = ForgetRegistry(root)
    first, second = registry.list()
    assert (first.name, first.status, first.version) == ("first", "ready", 1)
    assert json.loads(registry.artifact_path(first, "adapter").read_text()) == {"r": 8}
    assert (second.name, second.status) == ("second", "failed")
    assert second.error == f"interrupted (process {proc.pid} died during training); register it again"
    assert not staged.exists() and registry.generation == 1
    assert _register(registry, "second").status == "ready"


def test_crash_between_rename_and_commit_is_reaped(tmp_path):
    """A row still 'training' whose folder already sits in requests/ (killed between the two steps), owned by a
    pid that now belongs to another process: the reaper fails it and removes the folder."""
    registry = ForgetRegistry(tmp_path)
    kept = _register(registry, "kept")
    stale = Owner(os.getpid(), "another-boot/0", socket.gethostname())
    registry._store.insert(ForgetRequest("f" * 32, "crashed", "2020-01-01T00:00:00+00:00", "d", "training", None,
                                         {}, {}, None), stale)
    (tmp_path / "requests" / ("f" * 32)).mkdir()
    assert registry.get("crashed").status == "failed"
    assert not (tmp_path / "requests" / ("f" * 32)).exists()
    assert registry.get("kept") == kept and registry.artifact_path(kept, "detector").is_dir()


def test_owner_liveness():
    me = Owner.current()
    assert not me.is_gone()
    assert Owner(me.pid, "another-boot/0", me.host).is_gone()  # pid reused
    assert not Owner(me.pid, "another-boot/0", "some-other-host").is_gone()  # cannot tell: left alone


def test_bad_registries(tmp_path):
    with pytest.raises(RegistryError, match="missing"):
        ForgetRegistry(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()

    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "registry.sqlite").write_bytes(b"this is not sqlite" * 200)
    with pytest.raises(RegistryError, match="corrupt"):
        ForgetRegistry(tmp_path / "corrupt")

    (tmp_path / "foreign").mkdir()
    with sqlite3.connect(tmp_path / "foreign" / "registry.sqlite") as con:
        con.execute("CREATE TABLE t (x)")
    with pytest.raises(RegistryError, match="not a serve-unlearn registry"):
        ForgetRegistry(tmp_path / "foreign")

    ForgetRegistry(tmp_path / "newer")
    con = sqlite3.connect(tmp_path / "newer" / "registry.sqlite")
    with con:
        con.execute("UPDATE schema_version SET version = 99")
    con.close()
    with pytest.raises(RegistryError, match="newer serve-unlearn"):
        ForgetRegistry(tmp_path / "newer")
