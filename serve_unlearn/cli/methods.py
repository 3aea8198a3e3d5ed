"""``serve-unlearn salun|iau``: compute a SalUn or IAU weight patch for a checkpoint folder.

    serve-unlearn salun --model DIR --forget F [--retain F] --out P.patch.safetensors [--config YAML]
    serve-unlearn iau   --model DIR --forget F --retain F --out P.patch.safetensors [--config YAML]

Flags override the YAML config; torch, transformers and the methods are imported only when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ServeUnlearnError


def _run_method(args, method: str) -> int:
    from ..data import load_data
    from ..patches.compute import METHODS, compute_patch, load_for_patch, method_config

    forget = load_data(args.forget)
    retain = load_data(args.retain) if args.retain else None
    fields = METHODS[method].model_fields
    overrides = {k: getattr(args, k, None) for k in fields if getattr(args, k, None) is not None}
    config = method_config(method, overrides, yaml_path=args.config, where="command line")
    if method == "iau" and retain is None:
        raise ServeUnlearnError("iau needs --retain: its gradient correction uses the retain data")
    y_max = int(forget[1].max()) if isinstance(forget, tuple) else None
    model, task, patch_dtype, keys = load_for_patch(
        args.model, getattr(config, "forget_target", "refusal"), y_max,
        trusted_classes=args.trusted_class, trust_module_code=args.trust_module_code)
    patch = compute_patch(method, model, task, forget, retain, config, patch_dtype=patch_dtype,
                          base_model=str(Path(args.model).resolve()), key_convention=keys)
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
