"""Attentive Eraser's mixin: the eraser loop that the SD and SDXL pipelines both run.

Modelled on diffusers' ``PAGMixin``: a mixin on the pipeline selects self-attention layers (PAG's regex semantics,
or the reference's execution-order block numbers), installs processors that share one state object for the call,
runs the guidance branches as one batch, and combines them. Unlike PAG, the processors are restored in a
``finally`` block, so an exception (in a callback, say) never leaves the UNet patched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...errors import EraserInputError
from ...kernels import MASKED_ATTENTION_BACKENDS
from .attention_processor import AttentiveEraserCFGSelfAttnProcessor, AttentiveEraserSelfAttnProcessor
from .inputs import DEFAULT_MAX_PIXELS, as_processor_input, check_pixels, expand_batch, input_size
from .layers import BLOCK_INDEX, check_unet, resolve_applied_layers
from .masks import build_mask_pyramid, dilate_mask, latent_mask, paste_back_weights
from .state import AttentionRedirectionState

logger = logging.getLogger(__name__)

INPAINT_MODES = ("sip", "dip")
# the ``__call__`` arguments that ``AttentiveEraserMixin._erase`` takes as they are
_ERASE_ARGS = ("image", "mask_image", "height", "width", "strength", "num_inference_steps", "rm_guidance_scale",
               "ss_scale", "ss_steps", "ae_start_step", "ae_end_step", "inpaint_mode", "mask_dilation",
               "attention_backend", "num_images_per_prompt", "eta", "generator", "callback_on_step_end")


class AttentiveEraserMixin:
    """Attentive Eraser (ASS + SARG) for diffusers UNet pipelines, in the shape of diffusers' ``PAGMixin``.

    A pipeline class lists it first among its bases (its ``from_pipe``/``from_pretrained`` refuse unsupported
    denoisers before diffusers' generic errors) and implements ``_encode_conditioning``, ``_decode_latents`` and
    ``_ae_output`` (post-processing and the output class); its ``__call__`` hands its arguments to ``_ae_call``.
    """

    _ae_preset = None  # an EraserPreset, set by each pipeline class
    # the largest working size (height x width per image) a call accepts; None lifts the bound
    ae_max_pixels: int | None = DEFAULT_MAX_PIXELS
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "noise_pred", "image_latents", "mask_latents"]

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        check_unet(kwargs.get("unet", getattr(pipeline, "unet", None)), type(pipeline).__name__)
        return super().from_pipe(pipeline, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        index = Path(str(pretrained_model_name_or_path)) / "model_index.json"
        if "unet" not in kwargs and index.is_file():
            components = cls.load_config(str(index.parent))
            if "unet" not in components:
                check_unet(None, f"{pretrained_model_name_or_path} ({components.get('_class_name')})")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def set_ae_applied_layers(self, ae_applied_layers: str | Sequence[str] | tuple[str, Iterable[int]]) -> None:
        """Choose the self-attentions ASS runs in.

        Args:
            ae_applied_layers: a regex over module names as in PAG (``"up"``, the default and the reference's
                choice; ``"mid"``; ``"up_blocks.1"``; ``"blocks.(1|2)"``), a list of them, or
                ``("block_index", range(a, b))`` with the reference's execution-order transformer-block numbers
                (SD: ``range(7, 16)`` == ``"up"``; SDXL: ``range(34, 70)`` == ``"up"``).
        """
        if isinstance(ae_applied_layers, str):
            ae_applied_layers = [ae_applied_layers]
        if isinstance(ae_applied_layers, tuple) and ae_applied_layers and ae_applied_layers[0] == BLOCK_INDEX:
            if len(ae_applied_layers) != 2 or not all(isinstance(i, int) for i in ae_applied_layers[1]):
                raise EraserInputError("a block-index selector is ('block_index', range(a, b)) or a list of ints")
            ae_applied_layers = (BLOCK_INDEX, tuple(ae_applied_layers[1]))
        elif not all(isinstance(x, str) for x in ae_applied_layers):
            raise EraserInputError(f"ae_applied_layers must be a regex, a list of regexes or ('block_index', "
                                   f"indices); got {ae_applied_layers!r}")
        else:
            ae_applied_layers = list(ae_applied_layers)
        resolve_applied_layers(self.unet, ae_applied_layers)  # fail now, not mid-call
        self.ae_applied_layers = ae_applied_layers

    # -- properties (as PAG's) ---------------------------------------------------------------------------------
    @property
    def rm_guidance_scale(self) -> float:
        return self._rm_guidance_scale

    @property
    def do_self_attention_redirection_guidance(self) -> bool:
        """SARG is on for any positive scale (unlike the reference's ``> 1``: a scale in (0, 1) interpolates)."""
        return self._rm_guidance_scale > 0 and len(self.ae_applied_layers) > 0

    @property
    def ae_attn_processors(self) -> dict:
        """{layer name: processor} for the Attentive Eraser processors installed now (only during a call)."""
        return {n: p for n, p in self.unet.attn_processors.items()
                if isinstance(p, AttentiveEraserSelfAttnProcessor)}

    # -- guidance ----------------------------------------------------------------------------------------------
    def _ae_branches(self) -> tuple[str, ...]:
        """The guidance branches of one UNet call, in batch order."""
        cfg = self.do_classifier_free_guidance
        if not self.do_self_attention_redirection_guidance:
            return ("uncond", "cond") if cfg else ("cond",)
        if not cfg and self._rm_guidance_scale == 1:
            return ("redirected",)  # eps = eps_o + 1 * (eps_r - eps_o) = eps_r: one pass
        return ("uncond", "cond", "redirected") if cfg else ("cond", "redirected")

    def _apply_sarg(self, noise_pred: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
        """eps = eps_o + s (eps_r - eps_o) (SARG); with CFG eps = eps_u + w (eps_c - eps_u) + s (eps_r - eps_c)."""
        pred = dict(zip(branches, noise_pred.chunk(len(branches))))
        if "cond" not in pred:
            return pred["redirected"]
        eps = pred["cond"]
        if "uncond" in pred:
            eps = pred["uncond"] + self.guidance_scale * (pred["cond"] - pred["uncond"])
        if "redirected" in pred:
            eps = eps + self._rm_guidance_scale * (pred["redirected"] - pred["cond"])
        return eps

    @contextmanager
    def _ae_attn_processors(self, state: AttentionRedirectionState, n_plain: int):
        """Install ASS processors sharing ``state`` on the selected layers; restore the originals on exit."""
        processor = (AttentiveEraserCFGSelfAttnProcessor(state) if n_plain == 2
                     else AttentiveEraserSelfAttnProcessor(state, n_plain=n_plain))
        modules = dict(self.unet.named_modules())
        originals = {}
        try:
            for name in resolve_applied_layers(self.unet, self.ae_applied_layers):
                originals[name] = modules[name].processor
                modules[name].set_processor(processor)
            yield processor
        finally:
            for name, original in originals.items():
                modules[name].set_processor(original)

    # -- inputs ------------------------------------------------------------------------------------------------
    def _ae_dilation_kernel(self, mask_dilation: int | str, height: int, width: int) -> int:
        if mask_dilation == "ae":
            return self._ae_preset.blur_kernel_for(height, width)
        if isinstance(mask_dilation, bool) or not isinstance(mask_dilation, int) or mask_dilation < 0:
            raise EraserInputError(f"mask_dilation must be 'ae', 0 (none) or an odd blur kernel size; got "
                                   f"{mask_dilation!r}")
        return mask_dilation

    def _prepare_image_and_mask(self, image, mask_image, height, width, mask_dilation):
        """(images (n, 3, H, W) in [-1, 1], masks (m, 1, H, W) in {0, 1} after binarising and dilation, H, W).

        The working size is checked against ``ae_max_pixels`` before the inputs are converted or encoded.
        """
        if image is None or mask_image is None:
            raise EraserInputError("both image and mask_image are required (mask: white/1 = remove)")
        image_hw, mask_hw = input_size(image, "image"), input_size(mask_image, "mask_image")
        f = self.vae_scale_factor
        height = (height or image_hw[0]) // f * f
        width = (width or image_hw[1]) // f * f
        check_pixels(height, width, self.ae_max_pixels)
        if height < f or width < f:
            raise EraserInputError(f"{height}x{width} is too small: give at least {f}x{f} pixels")
        image = as_processor_input(image, "image", is_mask=False)
        mask_image = as_processor_input(mask_image, "mask_image", is_mask=True)
        if tuple(image_hw) != tuple(mask_hw):
            logger.warning("mask_image is %dx%d but image is %dx%d: the mask is resized to the image and "
                           "binarised at 0.5", *mask_hw, *image_hw)
        init_image = self.image_processor.preprocess(image, height=height, width=width).float()
        mask = self.mask_processor.preprocess(mask_image, height=height, width=width).float()  # binarised at 0.5
        empty = mask.flatten(1).amax(dim=1) == 0
        if bool(empty.any()):
            logger.warning("mask %s is empty: nothing is erased there (the output is the image through the VAE)",
                           empty.nonzero().flatten().tolist())
        mask = dilate_mask(mask, self._ae_dilation_kernel(mask_dilation, height, width))
        return init_image, mask, height, width

    def _check_call_args(self, strength, rm_guidance_scale, ss_scale, ss_steps, ae_start_step, ae_end_step,
                         inpaint_mode, attention_backend, callback_on_step_end_tensor_inputs):
        problems = []
        if not 0 < strength <= 1:
            problems.append(f"strength must be in (0, 1], got {strength}")
        if rm_guidance_scale < 0:
            problems.append(f"rm_guidance_scale must be >= 0 (0 disables SARG), got {rm_guidance_scale}")
        if ss_scale <= 0:
            problems.append(f"ss_scale (lambda) must be > 0, got {ss_scale}")
        if ss_steps < 0 or ae_start_step < 0 or (ae_end_step is not None and ae_end_step < ae_start_step):
            problems.append(f"step windows must be non-negative and ordered: ss_steps={ss_steps}, "
                            f"ae_start_step={ae_start_step}, ae_end_step={ae_end_step}")
        if inpaint_mode not in INPAINT_MODES:
            problems.append(f"inpaint_mode must be one of {INPAINT_MODES}, got {inpaint_mode!r}")
        if attention_backend not in MASKED_ATTENTION_BACKENDS:
            problems.append(f"attention_backend must be one of {MASKED_ATTENTION_BACKENDS}, got {attention_backend!r}")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            problems.append(f"callback_on_step_end_tensor_inputs {bad} are not in {self._callback_tensor_inputs}")
        if inpaint_mode == "dip":
            from diffusers import DDIMScheduler

            if not isinstance(self.scheduler, DDIMScheduler):
                problems.append(f"inpaint_mode='dip' inverts with DDIM but the scheduler is "
                                f"{type(self.scheduler).__name__}: set pipe.scheduler = "
                                "DDIMScheduler.from_config(pipe.scheduler.config)")
        if problems:
            raise EraserInputError("; ".join(problems))

    # -- the loop ----------------------------------------------------------------------------------------------
    def _unet(self, latents, t, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {k: v for k, v in inputs.items() if k != "encoder_hidden_states"}
        return self.unet(latents, t, encoder_hidden_states=inputs["encoder_hidden_states"],
                         added_cond_kwargs=added or None, cross_attention_kwargs=self.cross_attention_kwargs,
                         return_dict=False)[0]

    def _ddim_invert(self, z0: torch.Tensor, timesteps: torch.Tensor, inputs: dict[str, torch.Tensor]):
        """DDIM inversion of z0 through ``timesteps`` (the reference's ``next_step``): the latent at each
        timestep, in the order of ``timesteps`` (descending)."""
        sched = self.scheduler
        ratio = sched.config.num_train_timesteps // sched.num_inference_steps
        alphas = sched.alphas_cumprod.to(z0.device)
        final = torch.as_tensor(sched.final_alpha_cumprod).to(z0.device)
        z, trajectory = z0, []
        for t in timesteps.flip(0):
            eps = self._unet(sched.scale_model_input(z, t), t, inputs)
            prev = int(t) - ratio
            a_prev, a_t = (alphas[prev] if prev >= 0 else final), alphas[int(t)]
            x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            z = (a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps).to(z0.dtype)
            trajectory.append(z)
        return trajectory[::-1]

    def _erase(self, *, image, mask_image, conditioning: Callable[[int, int], tuple[dict, dict | None]],
               height, width, strength, num_inference_steps, rm_guidance_scale, ss_scale, ss_steps, ae_start_step,
               ae_end_step, inpaint_mode, mask_dilation, attention_backend, num_images_per_prompt, eta, generator,
               callback_on_step_end, callback_on_step_end_tensor_inputs):
        """Run SIP or DIP with ASS + SARG; returns (final latents, images (B, 3, H, W) in [-1, 1], masks).

        ``conditioning(height, width)`` returns (cond, uncond or None): the UNet's conditioning per prompt
        (``encoder_hidden_states`` and, for SDXL, ``text_embeds`` and ``time_ids``), leading dimension = number of
        prompts.
        """
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor

        device, dtype = self._execution_device, self.unet.dtype
        init_image, mask, height, width = self._prepare_image_and_mask(image, mask_image, height, width,
                                                                       mask_dilation)
        cond, uncond = conditioning(height, width)
        n = max(init_image.shape[0], mask.shape[0], cond["encoder_hidden_states"].shape[0])
        per = num_images_per_prompt
        init_image = expand_batch(init_image, n, per, "images").to(device)
        mask = expand_batch(mask, n, per, "masks").to(device)
        cond = {k: expand_batch(v, n, per, "prompts").to(device) for k, v in cond.items()}
        uncond = None if uncond is None else {k: expand_batch(v, n, per, "prompts").to(device) for k, v in uncond.items()}
        batch = n * per
        if isinstance(generator, list) and len(generator) != batch:
            raise EraserInputError(f"{len(generator)} generators for a batch of {batch}: give one or {batch}")

        retrieve_timesteps(self.scheduler, num_inference_steps, device)
        timesteps, n_steps = self.get_timesteps(num_inference_steps, strength, device)
        if n_steps < 1:
            raise EraserInputError(f"strength {strength} x {num_inference_steps} steps leaves no step to run")
        self._num_timesteps = n_steps

        z0 = self._encode_vae_image(init_image.to(dtype), generator)
        m_lat = latent_mask(mask, self.vae_scale_factor).to(dtype)
        if m_lat.shape[-2:] != z0.shape[-2:]:
            raise EraserInputError(f"{height}x{width} does not map onto the {tuple(z0.shape[-2:])} latent grid")
        if inpaint_mode == "sip":
            noise = randn_tensor(z0.shape, generator=generator, device=device, dtype=dtype)
            latents = self.scheduler.add_noise(z0, noise, timesteps[:1].repeat(batch))
        else:
            trajectory = self._ddim_invert(z0, timesteps, cond)
            latents = trajectory[0]

        branches = self._ae_branches()
        state = AttentionRedirectionState(build_mask_pyramid(mask, self.vae_scale_factor, len(self.unet.down_blocks)),
                                          ss_scale=ss_scale, backend=attention_backend)
        inputs = {k: torch.cat([(uncond if b == "uncond" else cond)[k] for b in branches]) for k in cond}
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        end = n_steps if ae_end_step is None else ae_end_step
        redirect = "redirected" in branches
        attn_ctx = self._ae_attn_processors(state, len(branches) - 1) if redirect else nullcontext()
        with attn_ctx, self.progress_bar(total=n_steps) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if inpaint_mode == "dip":
                    latents = m_lat * latents + (1 - m_lat) * trajectory[i]
                state.set_step(i, active=ae_start_step <= i < end, ss_active=i < ss_steps)
                model_in = self.scheduler.scale_model_input(torch.cat([latents] * len(branches)), t)
                noise_pred = self._apply_sarg(self._unet(model_in, t, inputs), branches)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if inpaint_mode == "sip":  # blended latent diffusion: the background follows the image
                    proper = (z0 if i == n_steps - 1
                              else self.scheduler.add_noise(z0, noise, timesteps[i + 1 : i + 2]))
                    latents = (1 - m_lat) * proper + m_lat * latents
                if callback_on_step_end is not None:
                    values = {"latents": latents, "noise_pred": noise_pred, "image_latents": z0, "mask_latents": m_lat}
                    out = callback_on_step_end(self, i, t, {k: values[k] for k in callback_on_step_end_tensor_inputs})
                    latents = out.pop("latents", latents)
                progress.update()
        if inpaint_mode == "dip":
            latents = m_lat * latents + (1 - m_lat) * z0
        return latents, init_image, mask

    def _ae_call(self, args: dict[str, Any], conditioning: Callable[[int, int], tuple[dict, dict | None]]):
        """The body of both pipelines' ``__call__``: check the arguments, set the call state, erase, decode, and
        hand over to ``_ae_output``. ``args`` is the caller's ``locals()``, so the shared arguments are written
        out once, in each public signature, rather than again in every call to here."""
        cb_inputs = list(args["callback_on_step_end_tensor_inputs"])
        self._check_call_args(args["strength"], args["rm_guidance_scale"], args["ss_scale"], args["ss_steps"],
                              args["ae_start_step"], args["ae_end_step"], args["inpaint_mode"],
                              args["attention_backend"], cb_inputs)
        self._guidance_scale = args["guidance_scale"]
        self._rm_guidance_scale = args["rm_guidance_scale"]
        self._clip_skip = args["clip_skip"]
        self._cross_attention_kwargs = args["cross_attention_kwargs"]
        self._interrupt = False
        latents, init_image, mask = self._erase(conditioning=conditioning, callback_on_step_end_tensor_inputs=cb_inputs,
                                                **{k: args[k] for k in _ERASE_ARGS})
        output_type = args["output_type"]
        image = self._finish(latents, init_image, mask, output_type=output_type, paste_back=args["paste_back"],
                             paste_back_blur_radius=args["paste_back_blur_radius"], generator=args["generator"])
        output = self._ae_output(image, latents, output_type, args["return_dict"])
        self.maybe_free_model_hooks()
        return output

    def _finish(self, latents, init_image, mask, *, output_type, paste_back, paste_back_blur_radius, generator):
        """Decode (unless ``output_type='latent'``) and optionally paste the original back outside the mask."""
        if output_type == "latent":
            return latents
        image = self._decode_latents(latents, generator)
        if paste_back:
            weight = paste_back_weights(mask, paste_back_blur_radius).to(image.dtype)
            image = weight * image + (1 - weight) * init_image.to(image.dtype)
        return image
