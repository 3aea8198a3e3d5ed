"""The ``eraser:`` section of the service config: object removal with Attentive Eraser over HTTP.

Imports pydantic and the standard library only (the service config imports it before torch is needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ...config import StrictConfig


class EraserRayConfig(StrictConfig):
    """How ``serve-unlearn serve --engine ray`` deploys the endpoint on Ray Serve (ignored by the embedded server)."""

    num_replicas: int = Field(1, ge=1, description="replicas, each with its own pipeline (ignored with autoscaling)")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Ray Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...); "
        "null: a fixed num_replicas")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share one GPU); set device: cuda")
    max_ongoing_requests: int = Field(64, ge=1, description="requests Ray routes to one replica at once")
    ray_address: str | None = Field(None, description="an existing Ray cluster (ray.init address); null: start a "
                                    "local one")


class EraserConfig(StrictConfig):
    """Object removal (``POST /v1/images/erase`` and the ``/erase`` page), one pipeline loaded once per process."""

    model: Path = Field(description="a diffusers SD 1.x/2.x or SDXL pipeline folder (model_index.json), base not "
                        "inpainting; loaded once at start and warmed")
    preset: Literal["sd", "sdxl"] | None = Field(
        None, description="the reference settings (scheduler, mask blur); null: from the folder (sdxl when it has "
        "text_encoder_2)")
    device: str = Field("cpu", description="torch device of the pipeline (cpu, cuda, cuda:1, ...)")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="weights dtype")
    attention_backend: str = Field("auto", description="masked-attention backend (auto, sdpa_gather, sdpa_mask, "
                                   "triton, reference)")
    max_batch_size: int = Field(4, ge=1, le=64, description="requests with the same settings and size run as one "
                                "pipeline call, up to this many")
    batch_wait_ms: float = Field(10.0, ge=0, le=10_000, description="how long the first request of a batch waits "
                                 "for companions (0: no waiting; requests arriving while a batch runs still batch)")
    max_queue: int = Field(32, ge=1, description="requests waiting for the pipeline; beyond it 429 with Retry-After")
    timeout_s: float = Field(120.0, gt=0, description="per-request deadline from arrival; past it 504 and the "
                             "request's batch slot is freed")
    max_pixels: int = Field(1024 * 1024, ge=64, description="width x height of an image or mask (read from the "
                            "file header, before decoding); beyond it 413")
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="request body bytes; beyond them 413")
    default_steps: int = Field(50, ge=1, description="num_inference_steps when a request does not say (the "
                               "reference's 50)")
    max_steps: int = Field(100, ge=1, le=1000, description="the largest num_inference_steps a request may ask")
    warmup: bool = Field(True, description="run one small erase at start, before /readyz says ready")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (null: torch's default)")
    ray: EraserRayConfig = Field(default_factory=EraserRayConfig)
