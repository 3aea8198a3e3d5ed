"""One way to compute a SalUn or IAU patch for a checkpoint folder, shared by ``serve-unlearn salun|iau`` and the
control plane's workers, so a patch filed over HTTP is made exactly as the CLI makes it: the model is trained in
float32 whatever the checkpoint holds, and the patch is cast back to the checkpoint's dtype (what a server loading
that checkpoint checks it against).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ServeUnlearnError, UnlearnDataError
from .config import IAUConfig, SalUnConfig

METHODS = {"salun": SalUnConfig, "iau": IAUConfig}
OnStep = Callable[[str, int, int], None]

__all__ = ["METHODS", "OnStep", "compute_patch", "lm_task", "load_for_patch", "method_config"]


def method_config(method: str, overrides: dict | None = None, *, yaml_path: str | None = None,
                  where: str = "config") -> SalUnConfig | IAUConfig:
    """The method's validated config: ``yaml_path`` (if any) with ``overrides`` on top; an unknown key or a bad
    value is an UnlearnConfigError naming it."""
    cls = METHODS[method]
    overrides = dict(overrides or {})
    return cls.from_yaml(yaml_path, **overrides) if yaml_path else cls.validate_dict(overrides, where=where)


def lm_task(model_dir: str | Path, forget_target: str = "refusal", *, tokenizer=None):
    """The causal-LM task of a checkpoint folder, its tokenizer padded with EOS when it has no pad token."""
    from transformers import AutoTokenizer

    from .tasks import CausalLMTask

    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return CausalLMTask(tok, forget_target=forget_target)


def load_for_patch(model_dir: str, forget_target: str, y_max: int | None, *,
                   trusted_classes: list[str] | None = None, trust_module_code: bool = False):
    """``(model, task, patch_dtype, key_convention)`` for an HF checkpoint folder (trained in float32) or a
    serve-unlearn module folder (a plain torch classifier)."""
    import torch

    from .inputs import checkpoint_dtype, is_module_folder, load_module_folder
    from .tasks import ClassifierTask

    if is_module_folder(model_dir):
        model, spec = load_module_folder(model_dir, trusted_classes=trusted_classes or (),
                                         trust_module_code=trust_module_code)
        num_classes = spec.get("num_classes") or spec["kwargs"].get("num_classes") or (y_max or 0) + 1
        return model, ClassifierTask(int(num_classes)), None, "torch-state-dict"
    from transformers import AutoModelForCausalLM

    if not (Path(model_dir) / "config.json").is_file():
        raise ServeUnlearnError(f"{model_dir!r} is neither an HF checkpoint folder nor a serve-unlearn module folder")
    # train in float32 whatever the checkpoint holds; the patch is cast back to the checkpoint's dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, lm_task(model_dir, forget_target), checkpoint_dtype(model_dir), "hf-transformers"


def compute_patch(method: str, model, task, forget: Any, retain: Any | None, config: SalUnConfig | IAUConfig, *,
                  patch_dtype=None, progress: bool = True, on_step: OnStep | None = None, **meta: Any):
    """The method's :class:`WeightPatch` (``model`` is left as it was, ``requires_grad`` flags included: a model
    that was frozen elsewhere, e.g. by peft for an adapter, gets its gradients here). ``on_step(phase, step,
    total)`` is called as the work advances (it may raise to stop it; the model is restored then too)."""
    if method not in METHODS:
        raise ServeUnlearnError(f"unknown patch method {method!r}; one of {sorted(METHODS)}")
    if method == "iau" and retain is None:
        raise UnlearnDataError("iau needs retain data: its gradient correction uses it (CLI --retain; a filing's "
                               "\"retain\" records)")
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        if p.is_floating_point():
            p.requires_grad_(True)
    try:
        if method == "salun":
            from .salun import salun

            return salun(model, task, forget, retain, config, patch_dtype=patch_dtype, progress=progress,
                         on_step=on_step, **meta)
        from .iau import iau

        return iau(model, task, forget, retain, config, patch_dtype=patch_dtype, progress=progress,
                   on_step=on_step, **meta)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
