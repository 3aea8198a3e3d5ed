"""Attentive Eraser for Stable Diffusion XL: object removal with the base SDXL checkpoint, no training.

Subclasses diffusers' ``StableDiffusionXLInpaintPipeline`` for its components, loaders, dual-encoder prompt
encoding, micro-conditioning and VAE handling, and replaces ``__call__`` with the eraser loop of
``AttentiveEraserMixin``. Differences from SD: ``text_embeds`` and ``time_ids`` ride along with every guidance
branch, the VAE decodes in float32 when it would overflow in fp16, and the mask blur is tuned at 1024 px.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from .ae_utils import AttentiveEraserMixin
from .layers import check_unet
from .presets import AE_PRESET_SDXL


class StableDiffusionXLAttentiveEraserPipeline(AttentiveEraserMixin, StableDiffusionXLInpaintPipeline):
    r"""Remove the masked object from a photo with Attentive Eraser (ASS + SARG) on a base SDXL checkpoint.

    Example:

        >>> pipe = StableDiffusionXLAttentiveEraserPipeline.from_pretrained(path, scheduler=AE_PRESET_SDXL.scheduler())
        >>> out = pipe(image, mask_image, generator=torch.Generator().manual_seed(123)).images[0]

    The call takes the SD pipeline's arguments (see ``StableDiffusionAttentiveEraserPipeline.__call__``) plus
    SDXL's ``prompt_2``, ``negative_prompt_2``, pooled embeddings, ``crops_coords_top_left`` and the aesthetic
    scores of refiner-style UNets.
    """

    _ae_preset = AE_PRESET_SDXL

    def __init__(self, vae: AutoencoderKL, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                 unet: UNet2DConditionModel, scheduler, image_encoder=None, feature_extractor=None,
                 requires_aesthetics_score: bool = False, force_zeros_for_empty_prompt: bool = True,
                 add_watermarker: bool | None = None, ae_applied_layers="up"):
        check_unet(unet, type(self).__name__)
        super().__init__(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
                         feature_extractor=feature_extractor, requires_aesthetics_score=requires_aesthetics_score,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker)
        self.set_ae_applied_layers(ae_applied_layers)

    def _encode_conditioning(self, height, width, prompt, prompt_2, negative_prompt, negative_prompt_2, embeds,
                             crops_coords_top_left, aesthetic_score, negative_aesthetic_score, clip_skip):
        """(cond, uncond or None): prompt embeddings, pooled embeddings and micro-conditioning per prompt."""
        cfg = self.do_classifier_free_guidance
        pe, npe, pooled, npooled = self.encode_prompt(
            prompt=prompt if embeds["prompt_embeds"] is None else None, prompt_2=prompt_2,
            device=self._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            lora_scale=(self.cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip, **embeds,
        )
        projection_dim = (int(pooled.shape[-1]) if self.text_encoder_2 is None
                          else self.text_encoder_2.config.projection_dim)
        size = (height, width)
        time_ids, negative_time_ids = self._get_add_time_ids(
            size, tuple(crops_coords_top_left), size, aesthetic_score, negative_aesthetic_score, size,
            tuple(crops_coords_top_left), size, dtype=pe.dtype, text_encoder_projection_dim=projection_dim,
        )
        n = pe.shape[0]
        cond = {"encoder_hidden_states": pe, "text_embeds": pooled, "time_ids": time_ids.repeat(n, 1)}
        if not cfg:
            return cond, None
        return cond, {"encoder_hidden_states": npe, "text_embeds": npooled, "time_ids": negative_time_ids.repeat(n, 1)}

    def _decode_latents(self, latents: torch.Tensor, generator) -> torch.Tensor:
        """Decode in float32 if the fp16 VAE would overflow (``force_upcast``), with the latent mean/std if set."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        latents = latents.to(self.vae.dtype)
        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        try:
            return self.vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)

    @torch.no_grad()
    def __call__(
        self,
        image: Any = None,
        mask_image: Any = None,
        prompt: str | list[str] | None = "",
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        rm_guidance_scale: float = 9.0,
        ss_scale: float = 0.3,
        ss_steps: int = 10,
        ae_start_step: int = 0,
        ae_end_step: int | None = None,
        guidance_scale: float = 1.0,
        inpaint_mode: str = "sip",
        mask_dilation: int | str = "ae",
        paste_back: bool = False,
        paste_back_blur_radius: float = 15.0,
        attention_backend: str = "auto",
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        r"""Erase the masked object and redraw the background there (arguments as the SD pipeline's; the mask
        blur of ``mask_dilation="ae"`` is kernel 77 at 1024 px, scaled to the image).

        Returns:
            ``StableDiffusionXLPipelineOutput`` (or a tuple when ``return_dict=False``).
        """
        self._denoising_end = None
        self._denoising_start = None
        if prompt is None and prompt_embeds is None:
            prompt = ""
        embeds = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
                  "pooled_prompt_embeds": pooled_prompt_embeds,
                  "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds}
        return self._ae_call(locals(), lambda h, w: self._encode_conditioning(
            h, w, prompt, prompt_2, negative_prompt, negative_prompt_2, embeds, crops_coords_top_left,
            aesthetic_score, negative_aesthetic_score, clip_skip))

    def _ae_output(self, image, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Watermark, post-processing and SDXL's output class."""
        if output_type != "latent":
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
            image = self.image_processor.postprocess(image, output_type=output_type)
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)
