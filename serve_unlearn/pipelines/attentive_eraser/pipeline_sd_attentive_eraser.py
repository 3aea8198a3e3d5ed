"""Attentive Eraser for Stable Diffusion 1.x / 2.x: object removal with a base checkpoint, no training.

Subclasses diffusers' ``StableDiffusionInpaintPipeline`` for its components, loaders, prompt encoding and image
processors (so ``from_pretrained`` and ``from_pipe`` work on any SD folder or pipeline) and replaces ``__call__``
with the eraser loop of ``AttentiveEraserMixin``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AsymmetricAutoencoderKL,
    AutoencoderKL,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from .ae_utils import AttentiveEraserMixin
from .layers import check_unet
from .presets import AE_PRESET_SD


class StableDiffusionAttentiveEraserPipeline(AttentiveEraserMixin, StableDiffusionInpaintPipeline):
    r"""Remove the masked object from a photo with Attentive Eraser (ASS + SARG) on a base SD checkpoint.

    Example:

        >>> pipe = StableDiffusionAttentiveEraserPipeline.from_pretrained(path, scheduler=AE_PRESET_SD.scheduler())
        >>> out = pipe(image, mask_image, generator=torch.Generator().manual_seed(123)).images[0]

    Args (constructor, beyond ``StableDiffusionInpaintPipeline``'s):
        ae_applied_layers: the self-attentions ASS runs in (see ``set_ae_applied_layers``); default ``"up"``.
    """

    _ae_preset = AE_PRESET_SD

    def __init__(self, vae: AutoencoderKL | AsymmetricAutoencoderKL, text_encoder, tokenizer,
                 unet: UNet2DConditionModel, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False, ae_applied_layers="up"):
        check_unet(unet, type(self).__name__)
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         safety_checker=safety_checker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        self.set_ae_applied_layers(ae_applied_layers)

    def _encode_conditioning(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip):
        """(cond, uncond or None): the UNet's conditioning per prompt."""
        device = self._execution_device
        lora_scale = (self.cross_attention_kwargs or {}).get("scale")
        embeds, negative = self.encode_prompt(
            prompt if prompt_embeds is None else None, device, 1, self.do_classifier_free_guidance,
            negative_prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale, clip_skip=clip_skip,
        )
        uncond = {"encoder_hidden_states": negative} if self.do_classifier_free_guidance else None
        return {"encoder_hidden_states": embeds}, uncond

    def _decode_latents(self, latents: torch.Tensor, generator) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]

    @torch.no_grad()
    def __call__(
        self,
        image: Any = None,
        mask_image: Any = None,
        prompt: str | list[str] | None = "",
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
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
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        r"""Erase the masked object and redraw the background there.

        Args:
            image: the photo (PIL of any mode, numpy channels-last, or a [0, 1] channels-first tensor; or a list
                for a batch; see ``inputs`` for the layouts). Alpha is composited over white. At most
                ``pipe.ae_max_pixels`` (default 2048 x 2048) pixels per image at the working size.
            mask_image: what to remove, white / 1 = remove; one mask per image or one for all. A mask with a
                not fully opaque alpha channel uses the alpha; other masks their luminance. A mask of another
                size is resized (warning); grey levels are binarised at 0.5; an empty mask erases nothing (the
                output is the image through the VAE, warning). NaN/inf or values outside the range are refused.
            prompt: usually "" as in the reference; with ``guidance_scale > 1`` a prompt steers the fill (CFG).
            height, width: default the image's size, rounded down to a multiple of the VAE factor.
            strength, num_inference_steps: as img2img; ``int(strength * steps)`` steps are executed.
            rm_guidance_scale: SARG scale s, eps = eps_o + s (eps_r - eps_o); 0 turns ASS and SARG off (plain
                blended inpainting), 1 runs the redirected branch alone (one pass per step).
            ss_scale, ss_steps: similarity suppression lambda on foreground queries for the first ``ss_steps``
                executed steps (a count: the reference's inclusive ``ss_steps=9`` is 10 here).
            ae_start_step, ae_end_step: the executed-step window in which ASS is on (default: all).
            guidance_scale: CFG weight w; > 1 runs the batch [uncond, cond, redirected] with
                eps = eps_u + w (eps_c - eps_u) + s (eps_r - eps_c). The reference uses 1 (off).
            inpaint_mode: "sip" (blended latents, the default) or "dip" (DDIM inversion of the image, its
                trajectory written into the background before each step; needs a DDIMScheduler).
            mask_dilation: "ae" (the reference's blur-and-threshold, kernel 13 at 512 px, scaled to the image),
                an odd kernel size, or 0 for none.
            paste_back, paste_back_blur_radius: composite the generated pixels over the original with a mask
                feathered by a Gaussian of this radius (the reference's optional "tile" step).
            attention_backend: "auto", "sdpa_gather", "sdpa_mask", "triton" or "reference" (identical results).
            callback_on_step_end: ``f(pipe, step, timestep, kwargs) -> dict``; may replace "latents".

        Returns:
            ``StableDiffusionPipelineOutput`` (or a tuple when ``return_dict=False``).
        """
        if prompt is None and prompt_embeds is None:
            prompt = ""
        return self._ae_call(locals(), lambda h, w: self._encode_conditioning(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip))

    def _ae_output(self, image, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Safety checker, post-processing and SD's output class."""
        has_nsfw = None
        if output_type != "latent":
            image, has_nsfw = self.run_safety_checker(image, self._execution_device, latents.dtype)
            denormalize = [True] * image.shape[0] if has_nsfw is None else [not x for x in has_nsfw]
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        if not return_dict:
            return image, has_nsfw
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw)
