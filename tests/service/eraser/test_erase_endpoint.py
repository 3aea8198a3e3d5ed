"""``POST /v1/images/erase`` through ``create_app`` on real uvicorn (tiny SD pipeline, 2 steps): the answer's size
and pixels, determinism, batching equal to single runs, the bounded queue under 32 concurrent clients, deadlines,
each bad input's status and message, and the metrics."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import box_mask, encode, erase, photo, pixels, serve

from serve_unlearn.pipelines import AE_PRESET_SD
from serve_unlearn.pipelines.attentive_eraser.masks import dilate_mask, paste_back_weights


@pytest.fixture(scope="module")
def url(tiny_sd_dir):
    with serve(tiny_sd_dir, max_batch_size=4, batch_wait_ms=300, max_queue=16, max_pixels=200_000,
               max_upload_bytes=2_000_000) as base:
        yield base


def test_a_valid_request_returns_a_png_of_the_input_size(url):
    r = erase(url, photo(61, 45), box_mask(61, 45), {"seed": 7})
    assert r.headers["content-type"] == "image/png"
    out = PIL.Image.open(io.BytesIO(r.content))
    assert out.format == "PNG" and out.size == (61, 45) and out.mode == "RGB"
    assert r.headers["x-seed"] == "7" and r.headers["x-steps"] == "2"
    assert float(r.headers["x-server-time-ms"]) > 0 and r.headers["x-mask-empty"] == "false"
    inside = np.asarray(out).astype(int)[10:30, 12:36] - np.asarray(photo(61, 45)).astype(int)[10:30, 12:36]
    assert np.abs(inside).mean() > 5  # the masked object was redrawn


def test_paste_back_keeps_every_pixel_outside_the_dilated_feathered_mask(url):
    image, mask = photo(), box_mask()
    out = pixels(erase(url, image, mask, {"seed": 1, "paste_back": True, "paste_back_blur_radius": 2}))
    m = torch.from_numpy(np.asarray(mask) >= 128).float()[None, None]
    dilated = dilate_mask(m, AE_PRESET_SD.blur_kernel_for(48, 64))
    outside = (paste_back_weights(dilated, 2.0) == 0)[0, 0].numpy()
    assert outside.mean() > 0.4
    np.testing.assert_array_equal(out[outside], np.asarray(image)[outside])
    assert (out[~outside] != np.asarray(image)[~outside]).any()


def test_same_seed_same_bytes_and_json_in_and_out(url):
    a = erase(url, fields={"seed": 123})
    b = erase(url, fields={"seed": 123})
    assert a.content == b.content
    assert erase(url, fields={"seed": 124}).content != a.content
    body = {"image": base64.b64encode(encode(photo())).decode(),
            "mask": "data:image/png;base64," + base64.b64encode(encode(box_mask())).decode(), "seed": 123}
    j = httpx.post(url + "/v1/images/erase", json=body, headers={"Accept": "application/json"}, timeout=120)
    assert j.status_code == 200 and j.headers["content-type"] == "application/json"
    data = j.json()
    assert (data["width"], data["height"], data["seed"], data["steps"]) == (64, 48, 123, 2)
    assert base64.b64decode(data["image"]) == a.content


def test_a_batched_result_equals_the_unbatched_one(url):
    """Three concurrent requests run as one pipeline call; each equals its request run alone."""
    jobs = [(photo(seed=s), box_mask(box=(4 + 8 * s, 6, 30 + 8 * s, 40)), 100 + s) for s in range(3)]
    with ThreadPoolExecutor(3) as pool:
        batched = list(pool.map(lambda j: erase(url, j[0], j[1], {"seed": j[2]}), jobs))
    assert [r.headers["x-batch-size"] for r in batched] == ["3"] * 3
    for (image, mask, seed), together in zip(jobs, batched):
        alone = erase(url, image, mask, {"seed": seed})
        assert alone.headers["x-batch-size"] == "1"
        a, b = pixels(together).astype(int), pixels(alone).astype(int)
        # equal up to float rounding: batched matrix products may round differently (1/255 on a few values)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.005


def test_requests_with_other_settings_do_not_share_a_batch(url):
    with ThreadPoolExecutor(2) as pool:
        rs = list(pool.map(lambda steps: erase(url, fields={"num_inference_steps": steps}), (2, 3)))
    assert [r.headers["x-batch-size"] for r in rs] == ["1", "1"]


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header says w x h and whose pixel data is garbage: decoding it would fail (422)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"not deflate data") + chunk(b"IEND", b""))


def _truncated_png() -> bytes:
    data = encode(photo())
    return data[: len(data) // 2]


BAD = [
    ("10000x10000 upload", {"image": _png_header_only(10000, 10000)}, 413, "10000x10000 = 100000000 pixels"),
    ("10000x10000 mask", {"mask": _png_header_only(10000, 10000)}, 413, "`mask` has 10000x10000"),
    ("not an image", {"image": b"%PDF-1.4 this is not a photo"}, 415, "not an image this service reads"),
    ("truncated PNG", {"image": _truncated_png()}, 422, "could not be decoded"),
    ("empty file", {"image": b""}, 422, "`image` is empty"),
    ("tiny image", {"image": photo(8, 8), "mask": box_mask(8, 8, (1, 1, 4, 4))}, 422, "at least 16 pixels"),
    ("zero steps", {"fields": {"num_inference_steps": 0}}, 422, "num_inference_steps"),
    ("too many steps", {"fields": {"num_inference_steps": 101}}, 422, "max_steps 100"),
    ("strength", {"fields": {"strength": 1.5}}, 422, "strength"),
    ("no step runs", {"fields": {"strength": 0.1}}, 422, "runs no step"),
    ("mode", {"fields": {"inpaint_mode": "magic"}}, 422, "inpaint_mode"),
    ("seed", {"fields": {"seed": -1}}, 422, "seed"),
    ("typo", {"fields": {"num_steps": 4}}, 422, "num_steps"),
    ("not a number", {"fields": {"rm_guidance_scale": "lots"}}, 422, "rm_guidance_scale"),
]


@pytest.mark.parametrize(("name", "kw", "status", "message"), BAD, ids=[b[0] for b in BAD])
def test_each_bad_input_gets_its_status_and_message(url, name, kw, status, message):
    r = erase(url, kw.get("image"), kw.get("mask"), kw.get("fields"))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and set(err) == {"message", "type", "code"}


def test_bad_bodies(url):
    r = httpx.post(url + "/v1/images/erase", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/images/erase", files={"image": ("a.png", encode(photo()), "image/png")})
    assert r.status_code == 422 and "`mask` is missing" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/images/erase", json={"image": "@@@not base64@@@", "mask": "AAAA"})
    assert r.status_code == 422 and "not valid base64" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/images/erase", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]
    r = erase(url, image=b"\x00" * 2_100_000)
    assert r.status_code == 413 and "max_upload_bytes" in r.json()["error"]["message"]


def test_user_images_mask_resizing_and_empty_masks(url):
    for mode in ("RGBA", "P", "L", "CMYK", "LA"):
        image = photo(mode=mode)
        data = encode(image, "JPEG" if mode in ("CMYK", "L") else "PNG")
        r = erase(url, data)
        assert r.status_code == 200 and PIL.Image.open(io.BytesIO(r.content)).size == (64, 48), (mode, r.text)
    r = erase(url, photo(), box_mask(32, 24, (6, 5, 18, 15)), {"seed": 3})
    assert r.headers["x-mask-resized"] == "32x24->64x48"
    np.testing.assert_array_equal(pixels(r), pixels(erase(url, photo(), box_mask(), {"seed": 3})))
    r = erase(url, photo(), box_mask(box=(0, 0, 0, 0)))
    assert r.headers["x-mask-empty"] == "true" and r.headers["x-batch-size"] == "0"
    np.testing.assert_array_equal(pixels(r), np.asarray(photo()))  # nothing to remove: the upload unchanged


def test_metrics_count_outcomes_batches_latency_and_rate(url):
    erase(url, image=b"not an image")
    text = httpx.get(url + "/metrics").text
    assert re.search(r'serve_unlearn_eraser_requests_total\{status="200"\} [1-9]', text)
    assert re.search(r'serve_unlearn_eraser_requests_total\{status="415"\} [1-9]', text)
    assert re.search(r'serve_unlearn_eraser_batch_size_bucket\{le="3.0"\} [1-9]', text)
    assert re.search(r'serve_unlearn_eraser_request_seconds_count\{status="200"\} [1-9]', text)
    assert "serve_unlearn_eraser_queue_depth 0.0" in text
    assert float(re.search(r"\nserve_unlearn_eraser_images_per_second (\S+)", text).group(1)) > 0
    assert httpx.get(url + "/readyz").json()["checks"]["eraser"] == "ok"


def test_32_concurrent_clients_against_a_queue_of_4_get_only_200_and_429(tiny_sd_dir):
    with serve(tiny_sd_dir, max_batch_size=2, batch_wait_ms=0, max_queue=4) as base:
        with ThreadPoolExecutor(32) as pool:
            rs = list(pool.map(lambda s: erase(base, fields={"seed": s, "num_inference_steps": 4}), range(32)))
        codes = sorted({r.status_code for r in rs})
        assert codes == [200, 429], [r.text for r in rs if r.status_code not in (200, 429)]
        for r in rs:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        assert httpx.get(base + "/healthz").status_code == 200
        assert httpx.get(base + "/readyz").status_code == 200
        assert erase(base).status_code == 200
        assert "serve_unlearn_eraser_queue_depth 0.0" in httpx.get(base + "/metrics").text


def test_a_request_past_its_deadline_gets_504_and_frees_its_slot(tiny_sd_dir):
    with serve(tiny_sd_dir, timeout_s=0.2, max_queue=2, max_batch_size=1) as base:
        with ThreadPoolExecutor(2) as pool:
            rs = list(pool.map(lambda s: erase(base, photo(256, 256), box_mask(256, 256, (40, 40, 200, 200)),
                                               {"seed": s, "num_inference_steps": 100}), range(2)))
        assert [r.status_code for r in rs] == [504, 504]
        assert rs[0].json()["error"]["code"] == "deadline_exceeded" and "0.2 s deadline" in rs[0].text
        metrics = httpx.get(base + "/metrics").text
        assert 'serve_unlearn_eraser_requests_total{status="504"} 2.0' in metrics
        assert "serve_unlearn_eraser_queue_depth 0.0" in metrics
        # the interrupted batch frees the pipeline: two more requests are admitted, not refused as a full queue
        with ThreadPoolExecutor(2) as pool:
            again = list(pool.map(lambda s: erase(base, fields={"seed": s}), range(2)))
        assert {r.status_code for r in again} <= {200, 504}
