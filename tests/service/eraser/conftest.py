"""A tiny SD pipeline folder and the service (``create_app``) served by real uvicorn on 127.0.0.1, in a thread."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time

import httpx
import numpy as np
import PIL.Image
import pytest
import uvicorn

from serve_unlearn.service.app import create_app
from serve_unlearn.service.config import ServeConfig
from serve_unlearn.testing.tiny_sd import save_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model, **eraser):
    """``create_app`` with an ``eraser:`` section, on uvicorn at 127.0.0.1:<free port>; yields the base URL."""
    config = ServeConfig.validate_dict({"eraser": {"model": str(model), "default_steps": 2, **eraser}})
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=_free_port(),
                                           log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the service did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def photo(w=64, h=48, seed=0, mode="RGB") -> PIL.Image.Image:
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    return PIL.Image.fromarray(arr).convert(mode)


def box_mask(w=64, h=48, box=(12, 10, 36, 30)) -> PIL.Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[box[1] : box[3], box[0] : box[2]] = 255
    return PIL.Image.fromarray(m)


def encode(img: PIL.Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def erase(url, image=None, mask=None, fields=None, timeout=120, headers=None, **kw) -> httpx.Response:
    """POST a multipart erase; ``image``/``mask`` are PIL images or raw bytes."""
    image = photo() if image is None else image
    mask = box_mask() if mask is None else mask
    files = {"image": ("image.png", image if isinstance(image, bytes) else encode(image), "image/png"),
             "mask": ("mask.png", mask if isinstance(mask, bytes) else encode(mask), "image/png")}
    data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (fields or {}).items()}
    return httpx.post(url + "/v1/images/erase", files=files, data=data, timeout=timeout, headers=headers, **kw)


def pixels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(PIL.Image.open(io.BytesIO(response.content)))
