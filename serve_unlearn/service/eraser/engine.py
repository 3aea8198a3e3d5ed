"""The pipeline behind the endpoint: loaded once, warmed, and run on a batch of compatible jobs.

``run_batch`` is synchronous (it runs on the service's one pipeline thread): one pipeline call for all jobs, a
generator per job (so a job's result does not depend on its companions), results cropped to each upload's size.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...errors import UnsupportedModelError
from .config import EraserConfig
from .requests import EraseParams, Job

logger = logging.getLogger(__name__)
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class EraserEngine:
    """One Attentive Eraser pipeline (SD or SDXL) and the call the batcher makes."""

    def __init__(self, config: EraserConfig, pipe=None, call_kwargs: dict | None = None):
        """``pipe``: an already built eraser pipeline (``config.model`` is then not read); ``call_kwargs``: fixed
        extra call arguments (e.g. ``prompt_embeds`` for a pipeline without a text encoder)."""
        self.config = config
        self.pipe = pipe
        self.call_kwargs = dict(call_kwargs or {})
        self.preset: str | None = None if pipe is None else pipe._ae_preset.name
        self.factor = 8 if pipe is None else pipe.vae_scale_factor

    def load(self) -> None:
        if self.pipe is not None:
            self.pipe.ae_max_pixels = math.ceil(self.config.max_pixels * 81 / 64)
            return
        import torch
        from diffusers import DDIMScheduler

        from ...pipelines.attentive_eraser import (
            PRESETS,
            StableDiffusionAttentiveEraserPipeline,
            StableDiffusionXLAttentiveEraserPipeline,
        )

        folder = Path(self.config.model)
        index = folder / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"eraser.model {str(folder)!r} has no model_index.json: give a diffusers SD or "
                                    "SDXL pipeline folder")
        components = json.loads(index.read_text())
        if "unet" not in components:
            raise UnsupportedModelError(f"eraser.model {str(folder)!r} is a {components.get('_class_name')} without a "
                                        "UNet: Attentive Eraser needs Stable Diffusion 1.x/2.x or SDXL")
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.preset = self.config.preset or ("sdxl" if "text_encoder_2" in components else "sd")
        cls = (StableDiffusionXLAttentiveEraserPipeline if self.preset == "sdxl"
               else StableDiffusionAttentiveEraserPipeline)
        scheduler = PRESETS[self.preset].scheduler(DDIMScheduler.load_config(str(folder), subfolder="scheduler"))
        dtype = getattr(torch, _DTYPES[self.config.dtype])
        pipe = cls.from_pretrained(str(folder), scheduler=scheduler, dtype=dtype).to(self.config.device)
        pipe.set_progress_bar_config(disable=True)
        # uploads are bounded by max_pixels and have sides >= 8 factors, so padding adds at most (9/8)^2
        pipe.ae_max_pixels = math.ceil(self.config.max_pixels * 81 / 64)
        self.pipe, self.factor = pipe, pipe.vae_scale_factor

    def warmup(self) -> None:
        """One small erase through every branch the requests use (allocations, kernels, lazy imports)."""
        side = self.factor * 8
        image = np.full((side, side, 3), 128, np.uint8)
        mask = np.zeros((side, side), bool)
        mask[side // 4 : side // 2, side // 4 : side // 2] = True
        params = EraseParams(num_inference_steps=2, strength=1.0, seed=0)
        self.run_batch([Job(params, image, mask, (side, side), 0, deadline=0.0)], lambda: False)

    def run_batch(self, jobs: list[Job], cancelled: Callable[[], bool]) -> list[np.ndarray]:
        """One pipeline call for ``jobs`` (same ``batch_key``); (h, w, 3) uint8 per job. Stops early (and returns
        whatever the interrupted call decodes) when ``cancelled()`` turns true, i.e. every caller has gone."""
        import torch

        p = jobs[0].params
        device = self.config.device
        images = torch.from_numpy(np.stack([j.image for j in jobs])).permute(0, 3, 1, 2).float() / 255
        masks = torch.from_numpy(np.stack([j.mask for j in jobs]))[:, None].float()
        generators = [torch.Generator(device).manual_seed(j.seed) for j in jobs]

        def check(pipe, step, timestep, kwargs):
            if cancelled():
                pipe._interrupt = True
            return {}

        out = self.pipe(images, masks, num_inference_steps=p.num_inference_steps, strength=p.strength,
                        rm_guidance_scale=p.rm_guidance_scale, ss_scale=p.ss_scale, ss_steps=p.ss_steps,
                        inpaint_mode=p.inpaint_mode, paste_back=p.paste_back,
                        paste_back_blur_radius=p.paste_back_blur_radius, generator=generators,
                        attention_backend=self.config.attention_backend, output_type="np",
                        callback_on_step_end=check, **self.call_kwargs).images
        results = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        return [results[i, : j.size[0], : j.size[1]] for i, j in enumerate(jobs)]
