"""The control plane's web page in headless Chromium (Debian's package, driven by Playwright), and its OpenAPI
document fuzzed with schemathesis: no input gets a 5xx."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO
from service_proc import ADMIN, Service

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "outputs" / "test-artifacts"
CHEMISTRY = [json.loads(line) for line in (REPO / "examples/data/o3/topic_chemistry.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def service(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("service-web")
    forget_config = folder / "fast.yaml"
    forget_config.write_text("detector: {epochs: 1}\nlora: {epochs: 1, batch_size: 16}\n")
    svc = Service({"registry": str(folder / "registry"), "model": str(tiny_llama_dir),
                   "forget_config": str(forget_config),
                   "worker": {"processes": 1, "poll_s": 0.2, "torch_threads": 1}, "publish_poll_s": 0.2},
                  folder).start()
    yield svc
    svc.stop()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium package is not installed")
def test_file_watch_and_retire_a_request_from_the_page(service, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    jsonl = tmp_path / "chemistry.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]})
                               for r in CHEMISTRY[:24]))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(service.url + "/")
            page.fill("#token", "wrong")
            page.click("#token-form button")
            expect(page.locator("#message")).to_contain_text("admin token")
            page.fill("#token", ADMIN)
            page.click("#token-form button")
            page.fill("#name", "chemistry-page")
            page.set_input_files("#file", str(jsonl))
            page.click("#file-button")
            expect(page.locator("#message")).to_contain_text("filed")
            row = page.locator("tr[data-name='chemistry-page']")
            expect(row).to_have_attribute("data-status", "in_force", timeout=180_000)
            page.screenshot(path=str(ARTIFACTS / "control_plane_page.png"), full_page=True)
            row.locator("button.retire").click()
            expect(row).to_have_attribute("data-status", "retired", timeout=60_000)
        finally:
            browser.close()
    listing = service.call("GET", "/v1/forget-requests")[2]["data"]
    assert [(r["name"], r["status"]) for r in listing] == [("chemistry-page", "retired")]


def test_openapi_fuzzing_finds_no_server_error(service):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
    failures, statuses = [], []

    def fuzz(op):
        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            case.headers = {**(case.headers or {}), "x-serve-unlearn-admin": ADMIN}
            response = case.call(base_url=service.url, timeout=60)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{op.method.upper()} {op.path}: {response.status_code} {response.text[:200]}")

        check()

    operations = [operation.ok() for operation in schema.get_all_operations()]
    assert len(operations) >= 8
    for op in operations:
        fuzz(op)
    assert len(statuses) >= 5 * len(operations) and not failures, failures
    assert {200, 202} & set(statuses) and {404, 422} <= set(statuses)  # valid and invalid inputs were both sent
