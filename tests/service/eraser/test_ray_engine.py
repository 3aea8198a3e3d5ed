"""The app on Ray Serve (``run_on_ray``) with two replicas on a local Ray (2 CPUs): both replicas answer erase
requests (``X-Replica``), the answers equal the embedded server's, and ``@serve.batch`` batches concurrent ones."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import _free_port, erase, pixels, serve

from serve_unlearn.service.config import ServeConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_url(tiny_sd_dir):
    ray = pytest.importorskip("ray")
    from ray import serve as ray_serve

    from serve_unlearn.service.ray_engine import run_on_ray

    config = ServeConfig.validate_dict({"eraser": {
        "model": str(tiny_sd_dir), "default_steps": 2, "torch_threads": 1, "max_batch_size": 4, "batch_wait_ms": 200,
        "ray": {"num_replicas": 2, "num_cpus": 0.5}}})
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=80 * 1024**2)
    try:
        run_on_ray(config, "127.0.0.1", port, blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the Ray Serve app did not become ready in 240 s")
        yield url
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def test_two_replicas_both_answer_and_match_the_embedded_server(ray_url, tiny_sd_dir):
    seen, answers = set(), {}
    deadline = time.monotonic() + 120
    while len(seen) < 2 and time.monotonic() < deadline:
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda s: erase(ray_url, fields={"seed": s}), range(4)))
        for seed, r in enumerate(rs):
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-replica"])
            answers[seed] = pixels(r)
    assert len(seen) == 2, f"only replica(s) {seen} answered"
    with serve(tiny_sd_dir) as base:
        for seed, got in answers.items():
            want = pixels(erase(base, fields={"seed": seed})).astype(int)
            assert np.abs(got.astype(int) - want).max() <= 1


def test_serve_batch_batches_concurrent_requests_and_bad_input_is_still_4xx(ray_url):
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda s: erase(ray_url, fields={"seed": s}), range(8)))
    assert all(r.status_code == 200 for r in rs)
    assert max(int(r.headers["x-batch-size"]) for r in rs) >= 2
    bad = erase(ray_url, image=b"not an image")
    assert bad.status_code == 415 and "x-replica" in bad.headers
