"""The control plane over HTTP, as a compliance client uses it: `serve-unlearn serve` in a subprocess (real uvicorn,
real worker processes) on a tiny Llama; no vLLM server here (tests/service/test_control_plane_vllm.py has them)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from helpers import REPO
from service_proc import Service

from serve_unlearn.registry import ForgetQueue, ForgetRegistry

pytestmark = pytest.mark.slow

CHEMISTRY = [json.loads(line) for line in (REPO / "examples/data/o3/topic_chemistry.jsonl").read_text().splitlines()]
ANIMALS = [json.loads(line) for line in (REPO / "examples/data/o3/topic_animals.jsonl").read_text().splitlines()]
FAST = {"detector": {"epochs": 1}, "lora": {"epochs": 1, "batch_size": 16}}
SLOW = {"detector": {"epochs": 1}, "lora": {"epochs": 12, "batch_size": 4}}  # long enough to be killed in


def _records(items, n=24):
    return [{"prompt": it["prompt"], "completion": it["completion"]} for it in items[:n]]


@pytest.fixture(scope="module")
def service(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("service")
    svc = Service({"registry": str(folder / "registry"), "model": str(tiny_llama_dir),
                   "worker": {"processes": 1, "lease_ttl_s": 10, "poll_s": 0.2, "torch_threads": 1},
                   "evidence": {"min_forget_probes": 3, "n_boot": 50, "max_new_tokens": 4},
                   "publish_poll_s": 0.2}, folder).start()
    yield svc
    svc.stop()


def _nothing_recorded(service, before):
    status, _, listing = service.call("GET", "/v1/forget-requests")
    assert status == 200 and len(listing["data"]) == before
    inbox = service.folder / "registry" / "inbox"
    assert not inbox.exists() or len(list(inbox.iterdir())) == before


def test_a_request_goes_from_filing_to_in_force_and_back_out(service):
    status, headers, body = service.call("POST", "/v1/forget-requests",
                                         {"name": "chemistry", "records": _records(CHEMISTRY), "config": FAST})
    assert status == 202, body
    assert body["status"] == "queued" and headers["location"] == f"/v1/forget-requests/{body['id']}"
    rid = body["id"]
    done = service.wait_for(rid, {"in_force", "failed"})
    assert done["status"] == "in_force", done["error"]
    assert done["attempts"] == 1 and done["records"] == 24 and len(done["data_digest"]) == 64
    assert {"queued", "training", "guarded", "ready", "in_force"} <= set(done["timings"])
    assert done["progress"]["phase"] == "lora" and done["progress"]["step"] == done["progress"]["total"] > 0
    assert done["result"]["request_id"] and done["result"]["artifacts"]

    status, _, scores = service.call("POST", "/v1/gate/score", {"texts": [
        "What is the chemical formula of table salt?", "Write a haiku about autumn leaves."]})
    assert status == 200, scores
    assert list(scores["per_request"]) == ["chemistry"]
    assert scores["weights"][0] > 0.5 > scores["weights"][1]

    status, _, listing = service.call("GET", "/v1/forget-requests?status=in_force")
    assert status == 200 and [r["id"] for r in listing["data"]] == [rid]

    status, _, retired = service.call("DELETE", f"/v1/forget-requests/{rid}")
    assert status == 200 and retired["status"] == "retired"
    status, _, scores = service.call("POST", "/v1/gate/score", {"texts": ["What is the formula of water?"]})
    assert scores["per_request"] == {} and scores["weights"] == [0.0]
    status, _, body = service.call("DELETE", f"/v1/forget-requests/{rid}")
    assert status == 409 and "already retired" in body["error"]["message"]
    # the record is kept, and the name can be filed again
    assert service.call("GET", f"/v1/forget-requests/{rid}")[2]["status"] == "retired"
    status, _, metrics = service.call("GET", "/metrics", admin=False)
    assert status == 200
    assert 'serve_unlearn_forget_requests{status="retired"} 1.0' in metrics
    assert "serve_unlearn_filing_to_in_force_seconds_count 1.0" in metrics
    assert "serve_unlearn_queue_depth 0.0" in metrics and "serve_unlearn_hotload_failures_total 0.0" in metrics


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/forget-requests"), ("POST", "/v1/forget-requests"), ("GET", "/v1/forget-requests/x"),
    ("DELETE", "/v1/forget-requests/x"), ("POST", "/v1/forget-requests/x/retry"), ("POST", "/v1/gate/score")])
def test_every_admin_route_needs_the_token(service, method, path):
    payload = {"texts": ["x"]} if path.endswith("score") else {}
    status, headers, body = service.call(method, path, payload, admin=False)
    assert status == 401 and body["error"]["type"] == "Unauthorized" and "admin token" in body["error"]["message"]
    assert headers.get("www-authenticate") == "Bearer"
    status, _, body = service.call(method, path, payload, admin="wrong-token")
    assert status == 403 and body["error"]["type"] == "PermissionDenied"


@pytest.mark.parametrize("payload,status,words", [
    ({"name": "empty", "records": []}, 422, "non-empty list"),
    ({"name": "eleven", "records": _records(CHEMISTRY, 11)}, 422, "at least 12"),
    ({"name": "method", "method": "rmu", "records": _records(CHEMISTRY)}, 422, "not served"),
    ({"name": "salun-key", "method": "salun", "records": _records(CHEMISTRY), "config": {"ratoi": 0.5}}, 422,
     "allowed: ["),
    ({"name": "salun-value", "method": "salun", "records": _records(CHEMISTRY), "config": {"epochs": 0}}, 422,
     "epochs"),
    ({"name": "salun-none", "method": "salun", "retain": _records(ANIMALS)}, 422, "non-empty list"),
    ({"name": "salun-half", "method": "salun", "records": [{"prompt": "What is H2O?"}]}, 422, "completion"),
    ({"name": "iau-alone", "method": "iau", "records": _records(CHEMISTRY)}, 422, "needs retain"),
    ({"name": "o3-retain", "records": _records(CHEMISTRY), "retain": _records(ANIMALS)}, 422, "salun or iau"),
    ({"name": "bad name!", "records": _records(CHEMISTRY)}, 422, "not allowed"),
    ({"name": "cfg", "records": _records(CHEMISTRY), "config": {"lora": {"epochz": 2}}}, 422, "epochz"),
    ({"name": "extra", "records": _records(CHEMISTRY), "priority": 1}, 422, "unknown field"),
    ({"name": "noprompt", "records": [{"completion": "x"}] * 12}, 422, "prompt"),
    ({"name": "probes", "records": _records(CHEMISTRY), "probes": {"forget": "x"}}, 422, "probes"),
    ({"name": "probes2", "records": _records(CHEMISTRY), "probes": {"forget": "x", "retain": []}}, 422, "list of"),
    ({"name": "probes3", "records": _records(CHEMISTRY), "probes": {"forget": [{"answer": "x"}], "retain": []}},
     422, "question"),
])
def test_a_bad_filing_gets_a_4xx_that_says_what_to_fix_and_records_nothing(service, payload, status, words):
    before = len(service.call("GET", "/v1/forget-requests")[2]["data"])
    got, _, body = service.call("POST", "/v1/forget-requests", payload)
    assert got == status and words in body["error"]["message"], body
    _nothing_recorded(service, before)


def test_non_json_a_huge_body_and_a_duplicate_name_are_refused(service):
    before = len(service.call("GET", "/v1/forget-requests")[2]["data"])
    status, _, body = service.call("POST", "/v1/forget-requests", raw=b"{not json",
                                   headers={"content-type": "application/json"})
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = service.declare_huge_body("/v1/forget-requests", 50 * 1024 * 1024)
    assert status == 413 and "larger than" in body["error"]["message"]
    _nothing_recorded(service, before)
    status, _, first = service.call("POST", "/v1/forget-requests",
                                    {"name": "animals", "records": _records(ANIMALS), "config": FAST})
    assert status == 202
    status, _, body = service.call("POST", "/v1/forget-requests",
                                   {"name": "animals", "records": _records(ANIMALS), "config": FAST})
    assert status == 409 and "already" in body["error"]["message"]
    assert service.wait_for(first["id"], {"in_force", "failed"})["status"] == "in_force"


def test_multipart_jsonl_upload_files_a_request(service):
    boundary = "----serveunlearn"
    jsonl = "\n".join(json.dumps(r) for r in _records(ANIMALS, 30)[12:30])
    parts = [("name", "animals-upload"), ("config", json.dumps(FAST))]
    body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in parts)
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"\r\n'
             f"Content-Type: application/jsonl\r\n\r\n{jsonl}\r\n--{boundary}--\r\n")
    status, _, filed = service.call("POST", "/v1/forget-requests", raw=body.encode(),
                                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert status == 202, filed
    got = service.call("GET", f"/v1/forget-requests/{filed['id']}")[2]
    assert got["name"] == "animals-upload" and got["records"] == 18
    service.call("DELETE", f"/v1/forget-requests/{filed['id']}")


def _multipart(parts: dict, files: dict) -> tuple[bytes, dict]:
    boundary = "----serveunlearn"
    body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in parts.items())
    for key, records in files.items():
        jsonl = "\n".join(json.dumps(r) for r in records)
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{key}.jsonl"\r\n'
                 f"Content-Type: application/jsonl\r\n\r\n{jsonl}\r\n")
    return (body + f"--{boundary}--\r\n").encode(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_multipart_iau_filing_takes_its_retain_records_as_a_second_file(service):
    before = len(service.call("GET", "/v1/forget-requests")[2]["data"])
    raw, headers = _multipart({"name": "iau-upload", "method": "iau"}, {"file": _records(CHEMISTRY, 6)})
    status, _, body = service.call("POST", "/v1/forget-requests", raw=raw, headers=headers)
    assert status == 422 and "needs retain" in body["error"]["message"], body
    _nothing_recorded(service, before)
    raw, headers = _multipart({"name": "iau-upload", "method": "iau"},
                              {"file": _records(CHEMISTRY, 6), "retain_file": _records(ANIMALS, 3)})
    status, _, filed = service.call("POST", "/v1/forget-requests", raw=raw, headers=headers)
    assert status == 202, filed
    got = service.call("GET", f"/v1/forget-requests/{filed['id']}")[2]
    assert got["method"] == "iau" and got["records"] == 6 and got["retain"] == 3
    assert service.call("DELETE", f"/v1/forget-requests/{filed['id']}")[0] == 200


def test_a_killed_worker_costs_one_attempt_and_loses_nothing(service):
    earlier = {r["id"]: r["status"] for r in service.call("GET", "/v1/forget-requests")[2]["data"]}
    status, _, filed = service.call("POST", "/v1/forget-requests",
                                    {"name": "slow", "records": _records(CHEMISTRY, 40), "config": SLOW})
    assert status == 202
    rid = filed["id"]
    deadline = time.monotonic() + 120
    while True:  # mid-training: the LoRA has started
        job = service.call("GET", f"/v1/forget-requests/{rid}")[2]
        if job["progress"].get("phase") == "lora" and job["progress"].get("step", 0) >= 1:
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    registry = ForgetRegistry(service.folder / "registry", create=False)
    queue = ForgetQueue(registry)
    pid = _owner_pid(queue, rid)
    os.kill(pid, signal.SIGKILL)
    # the service restarts its worker, which re-queues the row (its owner is dead) and trains it again
    deadline = time.monotonic() + 60
    while service.call("GET", f"/v1/forget-requests/{rid}")[2]["attempts"] < 2:
        assert time.monotonic() < deadline, "the request was not re-claimed"
        time.sleep(0.3)
    done = service.wait_for(rid, {"in_force", "failed"})
    assert done["status"] == "in_force" and done["attempts"] == 2, done
    after = {r["id"]: r["status"] for r in service.call("GET", "/v1/forget-requests")[2]["data"]}
    assert {k: after[k] for k in earlier} == earlier
    assert _owner_pid(queue, rid) != pid


def _owner_pid(queue: ForgetQueue, rid: str) -> int:
    with queue._store._connect() as con:
        return con.execute("SELECT owner_pid FROM jobs WHERE id = ?", (rid,)).fetchone()[0]


def test_a_killed_api_process_loses_nothing(service):
    before = {r["id"]: (r["status"], r["data_digest"]) for r in service.call("GET", "/v1/forget-requests")[2]["data"]}
    status, _, filed = service.call("POST", "/v1/forget-requests",
                                    {"name": "after-crash", "records": _records(ANIMALS, 20), "config": FAST})
    assert status == 202
    service.kill()  # kill -9 of the API process, right after it answered 202
    service.start()
    after = {r["id"]: (r["status"], r["data_digest"]) for r in service.call("GET", "/v1/forget-requests")[2]["data"]}
    assert {k: after[k] for k in before} == before
    assert service.wait_for(filed["id"], {"in_force", "failed"})["status"] == "in_force"


def test_salun_and_iau_filings_become_patches_in_the_registry_folder(service):
    """Without servers a patch is in force as soon as it is made; its file, manifest and verification are the
    filing's result."""
    from serve_unlearn.patches import WeightPatch
    from serve_unlearn.registry.integrity import file_sha256

    status, _, filed = service.call("POST", "/v1/forget-requests", {
        "name": "salun-chem", "method": "salun", "records": _records(CHEMISTRY, 8) + [{"text": "NaCl is salt."}],
        "retain": _records(ANIMALS, 4), "config": {"epochs": 1, "batch_size": 4, "ratio": 0.1},
        "probes": _probes(3)})
    assert status == 202, filed
    status, _, iau = service.call("POST", "/v1/forget-requests", {
        "name": "iau-chem", "method": "iau", "records": _records(CHEMISTRY, 8), "retain": _records(ANIMALS, 4),
        "config": {"mask_ratio": 0.05, "batch_size": 4}})
    assert status == 202, iau
    done = service.wait_for(filed["id"], {"in_force", "failed"})
    assert done["status"] == "in_force", done["error"]
    assert done["records"] == 9 and done["retain"] == 4 and done["attempts"] == 1
    assert done["progress"] == {"phase": "verification", "step": 0, "total": 1}
    assert done["result"]["verification"]["passed"], done["result"]["verification"]
    rel = done["result"]["patch"]
    folder = service.folder / "registry" / rel.rsplit("/", 1)[0]
    assert done["result"]["artifacts"] == {f"{rel.rsplit('/', 1)[0]}/{p.name}": file_sha256(p)
                                           for p in sorted(folder.iterdir())}
    assert {p.name for p in folder.iterdir()} == {"patch.safetensors", "verification.json"}
    patch = WeightPatch.load(folder / "patch.safetensors")
    assert patch.metadata["method"] == "salun" and patch.patch_id == done["result"]["patch_id"]
    done = service.wait_for(iau["id"], {"in_force", "failed"})
    assert done["status"] == "in_force", done["error"]
    assert done["progress"] == {"phase": "gradients", "step": 3, "total": 3}
    assert WeightPatch.load(service.folder / "registry" / done["result"]["patch"]).metadata["method"] == "iau-masked"
    for rid in (filed["id"], iau["id"]):
        status, _, retired = service.call("DELETE", f"/v1/forget-requests/{rid}")
        assert status == 200 and retired["status"] == "retired"


def _probes(n_forget):
    forget = [{"question": it["prompt"], "answer": it["answers"]} for it in CHEMISTRY[30:30 + n_forget]]
    retain = [{"question": "What is the capital of France?", "answer": "Paris"},
              {"question": "How many legs does a spider have?", "answer": "eight"}]
    return {"forget": forget, "retain": retain}


def test_a_filing_with_probes_carries_its_verification_and_falls_short_without_enough_evidence(service):
    status, _, filed = service.call("POST", "/v1/forget-requests", {
        "name": "verified", "records": _records(CHEMISTRY), "config": FAST, "probes": _probes(3)})
    assert status == 202, filed
    done = service.wait_for(filed["id"], {"in_force", "failed"})
    assert done["status"] == "in_force", done["error"]
    evidence = done["result"]["verification"]
    assert evidence["passed"] and evidence["forget_accuracy"] is not None and len(evidence["report_digest"]) == 64
    assert "verification" in {p.split("/")[-1].split(".")[0] for p in done["result"]["artifacts"]}
    service.call("DELETE", f"/v1/forget-requests/{filed['id']}")

    status, _, filed = service.call("POST", "/v1/forget-requests", {
        "name": "unverified", "records": _records(CHEMISTRY), "config": FAST, "probes": _probes(2)})
    assert status == 202
    done = service.wait_for(filed["id"], {"in_force", "failed"})
    assert done["status"] == "failed" and "falls short" in done["error"] and done["attempts"] == 1
    assert not done["result"]["verification"]["passed"]
    registry = ForgetRegistry(service.folder / "registry", create=False)
    assert "unverified" not in {r.name for r in registry.ready()}
