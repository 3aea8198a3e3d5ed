"""``serve-unlearn erase``: remove an object from a photo with Attentive Eraser (an SD or SDXL folder, no training).

    serve-unlearn erase --model DIR --image IN.png --mask MASK.png --out OUT.png [--preset sd|sdxl]

The mask is white (or 1) where the object is. The preset (the reference's defaults: DDIM, 50 steps at strength
0.8, SARG 9, lambda 0.3 for 10 steps, "up" layers, mask blur) is picked from the folder when not given: SDXL if
it has a second text encoder. Diffusers and torch are imported only when the command runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import UnsupportedModelError

_DTYPES = ("fp32", "fp16", "bf16")


def add_erase_parser(subparsers) -> None:
    """Register ``erase`` on the CLI's subparsers."""
    e = subparsers.add_parser("erase", help="remove the masked object from an image (Attentive Eraser, SD/SDXL)")
    e.add_argument("--model", required=True, help="diffusers SD 1.x/2.x or SDXL pipeline folder (base, not inpaint)")
    e.add_argument("--image", required=True, help="input image")
    e.add_argument("--mask", required=True, help="mask image: white = remove")
    e.add_argument("--out", required=True, help="output image (PNG, JPEG, ...)")
    e.add_argument("--preset", choices=["sd", "sdxl"], help="default: from the folder (sdxl with text_encoder_2)")
    e.add_argument("--steps", type=int, help="denoising steps (preset: 50)")
    e.add_argument("--strength", type=float, help="img2img strength (preset: 0.8)")
    e.add_argument("--rm-guidance-scale", dest="rm_guidance_scale", type=float, help="SARG scale (preset: 9)")
    e.add_argument("--ss-scale", dest="ss_scale", type=float, help="similarity suppression lambda (preset: 0.3)")
    e.add_argument("--ss-steps", dest="ss_steps", type=int, help="steps with suppression (preset: 10)")
    e.add_argument("--mode", choices=["sip", "dip"], help="blended latents (sip) or DDIM inversion (dip)")
    e.add_argument("--paste-back", dest="paste_back", action="store_true", help="keep original pixels outside")
    e.add_argument("--seed", type=int, default=123, help="the reference's seed (default 123)")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")
    e.add_argument("--dtype", choices=_DTYPES, default="fp32")
    e.add_argument("--backend", default="auto", help="masked-attention backend (auto, sdpa_gather, ...)")
    e.set_defaults(func=run_erase)


def run_erase(args) -> int:
    folder = Path(args.model)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"no model_index.json in {str(folder)!r}: --model must be a diffusers pipeline folder")
    components = json.loads(index.read_text())
    if "unet" not in components:
        raise UnsupportedModelError(
            f"{str(folder)!r} is a {components.get('_class_name')} without a UNet: Attentive Eraser needs a "
            "UNet2DConditionModel (Stable Diffusion 1.x/2.x or SDXL); transformer (DiT) pipelines are not supported"
        )
    import PIL.Image
    import torch
    from diffusers import DDIMScheduler

    from ..pipelines.attentive_eraser import (
        PRESETS,
        StableDiffusionAttentiveEraserPipeline,
        StableDiffusionXLAttentiveEraserPipeline,
    )

    preset = args.preset or ("sdxl" if "text_encoder_2" in components else "sd")
    cls = StableDiffusionXLAttentiveEraserPipeline if preset == "sdxl" else StableDiffusionAttentiveEraserPipeline
    image = PIL.Image.open(args.image).convert("RGB")
    mask = PIL.Image.open(args.mask).convert("L")
    start = time.perf_counter()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    scheduler = PRESETS[preset].scheduler(DDIMScheduler.load_config(str(folder), subfolder="scheduler"))
    pipe = cls.from_pretrained(str(folder), scheduler=scheduler, dtype=dtype).to(args.device)
    call = {**PRESETS[preset].call_kwargs}
    overrides = {"num_inference_steps": args.steps, "strength": args.strength, "ss_scale": args.ss_scale,
                 "rm_guidance_scale": args.rm_guidance_scale, "ss_steps": args.ss_steps, "inpaint_mode": args.mode}
    call.update({k: v for k, v in overrides.items() if v is not None})
    generator = torch.Generator(args.device).manual_seed(args.seed)
    out = pipe(image, mask, generator=generator, paste_back=args.paste_back, attention_backend=args.backend,
               **call).images[0]
    out.save(args.out)
    print(json.dumps({"out": args.out, "preset": preset, "size": list(out.size),
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0
