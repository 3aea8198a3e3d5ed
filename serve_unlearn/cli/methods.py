"""``serve-unlearn salun|iau``: compute a SalUn or IAU weight patch for a checkpoint folder.

    serve-unlearn salun --model DIR --forget F [--retain F] --out P.patch.safetensors [--config YAML]
    serve-unlearn iau   --model DIR --forget F --retain F --out P.patch.safetensors [--config YAML]

Flags override the YAML config; torch, transformers and the methods are imported only when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ServeUnlearnError


def _load_model_and_task(model_dir: str, forget_target: str, y_max: int | None, *,
                         trusted_classes: list[str] | None = None, trust_module_code: bool = False):
    import torch

    from ..patches.inputs import checkpoint_dtype, is_module_folder, load_module_folder
    from ..patches.tasks import CausalLMTask, ClassifierTask

    if is_module_folder(model_dir):
        model, spec = load_module_folder(model_dir, trusted_classes=trusted_classes or (),
                                         trust_module_code=trust_module_code)
        num_classes = spec.get("num_classes") or spec["kwargs"].get("num_classes") or (y_max or 0) + 1
        return model, ClassifierTask(int(num_classes)), None, "torch-state-dict"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise ServeUnlearnError(f"{model_dir!r} is neither an HF checkpoint folder nor a serve-unlearn module folder")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # train in float32 whatever the checkpoint holds; the patch is cast back to the checkpoint's dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, CausalLMTask(tok, forget_target=forget_target), checkpoint_dtype(model_dir), "hf-transformers"


def _run_method(args, method: str) -> int:
    from ..data import load_data
    from ..patches.config import IAUConfig, SalUnConfig

    forget = load_data(args.forget)
    retain = load_data(args.retain) if args.retain else None
    cfg_cls = SalUnConfig if method == "salun" else IAUConfig
    overrides = {k: getattr(args, k, None) for k in cfg_cls.model_fields if getattr(args, k, None) is not None}
    config = (cfg_cls.from_yaml(args.config, **overrides) if args.config
              else cfg_cls.validate_dict(overrides, where="command line"))
    y_max = int(forget[1].max()) if isinstance(forget, tuple) else None
    model, task, patch_dtype, keys = _load_model_and_task(
        args.model, getattr(config, "forget_target", "refusal"), y_max,
        trusted_classes=args.trusted_class, trust_module_code=args.trust_module_code)
    meta = {"base_model": str(Path(args.model).resolve()), "key_convention": keys}
    if method == "salun":
        from ..patches.salun import salun

        patch = salun(model, task, forget, retain, config, patch_dtype=patch_dtype, **meta)
    else:
        from ..patches.iau import iau

        if retain is None:
            raise ServeUnlearnError("iau needs --retain: its gradient correction uses the retain data")
        patch = iau(model, task, forget, retain, config, patch_dtype=patch_dtype, **meta)
    path = patch.save(args.out)
    print(json.dumps({"patch": str(path), "patch_id": patch.patch_id, "tensors": len(patch.tensor_names),
                      "bytes": path.stat().st_size, "seconds": patch.metadata.get("seconds")}))
    return 0


def add_method_parsers(sub) -> None:
    """Register ``salun`` and ``iau`` on the CLI's subparsers."""
    for name, helptext in (("salun", "compute a SalUn weight patch"), ("iau", "compute an IAU weight patch")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--model", required=True, help="HF checkpoint folder, or a serve-unlearn module folder")
        s.add_argument("--trusted-class", dest="trusted_class", action="append", metavar="MODULE:CLASS",
                       help="a class a module folder may name (repeatable); serve-unlearn's own are always allowed")
        s.add_argument("--trust-module-code", dest="trust_module_code", action="store_true",
                       help="let a module folder name any class (imports its module: only for folders you trust)")
        s.add_argument("--forget", required=True, help="forget data: .jsonl (LMs) or .npz (classifiers)")
        s.add_argument("--retain", help="retain data, same format")
        s.add_argument("--out", required=True, help="output patch file (.patch.safetensors)")
        s.add_argument("--config", help="YAML file of hyperparameters (flags override it)")
        s.add_argument("--lr", type=float)
        s.add_argument("--batch-size", dest="batch_size", type=int)
        s.add_argument("--include", action="append", help="regex over parameter names (repeatable)")
        s.add_argument("--exclude", action="append", help="regex over parameter names (repeatable)")
        s.add_argument("--seed", type=int)
        if name == "salun":
            s.add_argument("--ratio", type=float, help="mask ratio in (0, 1] (default 0.5)")
            s.add_argument("--scope", choices=["global", "per_tensor"])
            s.add_argument("--epochs", type=int)
            s.add_argument("--forget-target", dest="forget_target", choices=["refusal", "random-answer"])
            s.add_argument("--forget-loss", dest="forget_loss", choices=["swap", "ga", "npo", "simnpo"],
                           help="what the masked training minimises on the forget data (default swap)")
            s.add_argument("--retain-loss", dest="retain_loss", choices=["nll", "kl"],
                           help="retain term: NLL, or KL to the base model's outputs (default nll)")
            s.add_argument("--holdout", type=float,
                           help="fraction of forget and retain data held out for early stopping (0: off)")
        else:
            s.add_argument("--step", choices=["adam1", "sgd"])
            s.add_argument("--mask-ratio", dest="mask_ratio", type=float, help="sparse iau-masked patch")
        s.set_defaults(func=lambda a, m=name: _run_method(a, m))
