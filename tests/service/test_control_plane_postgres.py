"""Several workers share one queue in PostgreSQL (as on several hosts): an API replica with no workers of its own,
two `serve-unlearn worker` processes; every filing is trained exactly once and put in force."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from helpers import REPO
from service_proc import Service

from serve_unlearn.registry import ForgetQueue, ForgetRegistry

pytestmark = pytest.mark.slow

FAST = {"detector": {"epochs": 1}, "lora": {"epochs": 1, "batch_size": 16}}


def _records(name: str) -> list[dict]:
    lines = (REPO / f"examples/data/o3/{name}.jsonl").read_text().splitlines()
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in map(json.loads, lines[:20])]


def test_two_worker_processes_share_the_queue(tiny_llama_dir, pg_dsn, tmp_path):
    config = {"registry": str(tmp_path / "registry"), "model": str(tiny_llama_dir), "registry_database": pg_dsn,
              "worker": {"processes": 0, "poll_s": 0.2, "torch_threads": 1}, "publish_poll_s": 0.2}
    service = Service(config, tmp_path).start()
    workers = []
    try:
        ids = []
        for name in ("topic_chemistry", "topic_animals", "retain"):
            status, _, filed = service.call("POST", "/v1/forget-requests",
                                            {"name": name.replace("_", "-"), "records": _records(name), "config": FAST})
            assert status == 202, filed
            ids.append(filed["id"])
        assert service.call("GET", "/readyz", admin=False)[0] == 200  # no workers here is a valid deployment
        worker_config = tmp_path / "worker.yaml"
        worker_config.write_text(yaml.safe_dump(config))
        for i in range(2):
            with open(tmp_path / f"worker-{i}.log", "w") as log:
                workers.append(subprocess.Popen([sys.executable, "-m", "serve_unlearn.cli", "worker", "--config",
                                                 str(worker_config)], env=service.env, stdout=log,
                                                stderr=subprocess.STDOUT))
        done = [service.wait_for(rid, {"in_force", "failed"}, timeout=600) for rid in ids]
        assert [d["status"] for d in done] == ["in_force"] * 3, [d["error"] for d in done]
        assert all(d["attempts"] == 1 for d in done)
        queue = ForgetQueue(ForgetRegistry(tmp_path / "registry", create=False, database=pg_dsn))
        with queue._store._connect() as con:
            owners = {row[0] for row in con.execute("SELECT owner_pid FROM jobs")}
        assert owners <= {w.pid for w in workers}
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        service.stop()
