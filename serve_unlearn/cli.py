"""``serve-unlearn``: one command, a subcommand per job.

    serve-unlearn salun --model DIR --forget F [--retain F] --out P.patch.safetensors [--config YAML]
    serve-unlearn iau   --model DIR --forget F --retain F --out P.patch.safetensors [--config YAML]
    serve-unlearn patch create|inspect|verify|apply|revert|materialize ...

Errors a user can cause print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .adapters.cli import add_o3_parser
from .errors import ServeUnlearnError
from .pipelines.cli import add_erase_parser
from .serving.vllm.cli import add_vllm_parser


# -- offline methods -------------------------------------------------------------------------------------------
def _load_model_and_task(model_dir: str, forget_target: str, y_max: int | None):
    import torch

    from .patches.inputs import checkpoint_dtype, is_module_folder, load_module_folder
    from .patches.tasks import CausalLMTask, ClassifierTask

    if is_module_folder(model_dir):
        model, spec = load_module_folder(model_dir)
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
    from .data import load_data
    from .patches.config import IAUConfig, SalUnConfig

    forget = load_data(args.forget)
    retain = load_data(args.retain) if args.retain else None
    cfg_cls = SalUnConfig if method == "salun" else IAUConfig
    overrides = {k: getattr(args, k, None) for k in cfg_cls.model_fields if getattr(args, k, None) is not None}
    config = (cfg_cls.from_yaml(args.config, **overrides) if args.config
              else cfg_cls.validate_dict(overrides, where="command line"))
    y_max = int(forget[1].max()) if isinstance(forget, tuple) else None
    model, task, patch_dtype, keys = _load_model_and_task(args.model, getattr(config, "forget_target", "refusal"), y_max)
    meta = {"base_model": str(Path(args.model).resolve()), "key_convention": keys}
    if method == "salun":
        from .patches.salun import salun

        patch = salun(model, task, forget, retain, config, patch_dtype=patch_dtype, **meta)
    else:
        from .patches.iau import iau

        if retain is None:
            raise ServeUnlearnError("iau needs --retain: its gradient correction uses the retain data")
        patch = iau(model, task, forget, retain, config, patch_dtype=patch_dtype, **meta)
    path = patch.save(args.out)
    print(json.dumps({"patch": str(path), "patch_id": patch.patch_id, "tensors": len(patch.tensor_names),
                      "bytes": path.stat().st_size, "seconds": patch.metadata.get("seconds")}))
    return 0


# -- patch operations ------------------------------------------------------------------------------------------
def _summary(patch) -> dict:
    tensors = {n: {"shape": list(e.shape), "dtype": str(e.dtype).removeprefix("torch."), "form": e.form,
                   "nnz": e.nnz, "density": round(patch.density(n), 6)} for n, e in sorted(patch.entries.items())}
    return {"patch_id": patch.patch_id, "metadata": patch.metadata, "nbytes": patch.nbytes, "tensors": tensors}


def _patch_inspect(args) -> int:
    from .patches import WeightPatch

    patch = WeightPatch.load(args.patch)
    info = _summary(patch)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    meta = info["metadata"]
    print(f"patch {info['patch_id']}  method={meta.get('method')}  mode={meta.get('mode')}  "
          f"tensors={len(info['tensors'])}  payload={info['nbytes']} bytes")
    print(f"base fingerprint {meta.get('base_fingerprint')}  created {meta.get('created_at')}")
    for name, t in info["tensors"].items():
        print(f"  {name:60s} {tuple(t['shape'])!s:>16s} {t['dtype']:>9s} {t['form']:>5s} density={t['density']:.4f}")
    return 0


def _folder_tensors(folder: Path, names: set[str] | None = None):
    """Tensors of a checkpoint folder (all, or only ``names``)."""
    from safetensors import safe_open

    from .patches.materialize import weight_shards

    found = {}
    for shard in weight_shards(folder):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                if names is None or key in names:
                    found[key] = f.get_tensor(key)
    return found


def _patch_verify(args) -> int:
    from .errors import PatchMismatchError
    from .patches import WeightPatch, tensor_digest

    patch = WeightPatch.load(args.patch)
    tensors = _folder_tensors(Path(args.model), set(patch.tensor_names))
    states = {}
    for name in patch.tensor_names:
        if name not in tensors:
            raise PatchMismatchError(f"patch tensor {name!r} is not in {args.model!r}")
        d = tensor_digest(tensors[name])
        e = patch.entries[name]
        states[name] = "base" if d == e.base_digest else "patched" if d == e.patched_digest else "different"
    kinds = set(states.values())
    verdict = "base" if kinds == {"base"} else "patched" if kinds == {"patched"} else "mismatch"
    print(json.dumps({"patch_id": patch.patch_id, "model": args.model, "state": verdict}))
    if verdict == "mismatch":
        first = next(n for n, s in states.items() if s == "different")
        raise PatchMismatchError(f"{args.model!r} is not the base of this patch: tensor {first!r} differs")
    return 0


def _patch_apply(args) -> int:
    from .patches import WeightPatch
    from .patches.materialize import patch_folder_in_place, undo_path

    patch = WeightPatch.load(args.patch)
    folder = Path(args.model)
    undo = patch_folder_in_place(folder, patch)
    undo.save(undo_path(folder, patch))
    print(json.dumps({"applied": patch.patch_id, "model": str(folder), "undo": str(undo_path(folder, patch))}))
    return 0


def _patch_revert(args) -> int:
    from .errors import PatchStateError
    from .patches import WeightPatch
    from .patches.materialize import patch_folder_in_place, undo_path

    patch = WeightPatch.load(args.patch)
    folder = Path(args.model)
    path = undo_path(folder, patch)
    if not path.is_file():
        raise PatchStateError(f"{str(folder)!r} has no undo record for patch {patch.patch_id}: it was not applied "
                              "there with serve-unlearn patch apply/materialize")
    patch_folder_in_place(folder, WeightPatch.load(path))
    path.unlink()
    print(json.dumps({"reverted": patch.patch_id, "model": str(folder)}))
    return 0


def _patch_create(args) -> int:
    from .patches import WeightPatch

    base = _folder_tensors(Path(args.base))
    edited = _folder_tensors(Path(args.edited))
    patch = WeightPatch.from_diff(base, edited, method=args.method, mode=args.mode,
                                  base_model=str(Path(args.base).resolve()), key_convention=args.key_convention)
    path = patch.save(args.out)
    print(json.dumps({"patch": str(path), "patch_id": patch.patch_id, "tensors": len(patch.tensor_names)}))
    return 0


def _patch_materialize(args) -> int:
    from .patches import materialize

    out = materialize(args.base, args.patches, args.out, subfolder=args.subfolder, overlap=args.overlap)
    print(json.dumps({"materialized": str(out)}))
    return 0


# -- parser ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve-unlearn", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    for name, helptext in (("salun", "compute a SalUn weight patch"), ("iau", "compute an IAU weight patch")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--model", required=True, help="HF checkpoint folder, or a serve-unlearn module folder")
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
        else:
            s.add_argument("--step", choices=["adam1", "sgd"])
            s.add_argument("--mask-ratio", dest="mask_ratio", type=float, help="sparse iau-masked patch")
        s.set_defaults(func=lambda a, m=name: _run_method(a, m))

    patch = sub.add_parser("patch", help="inspect, verify, apply, revert, create or materialize weight patches")
    psub = patch.add_subparsers(dest="patch_command", required=True)
    c = psub.add_parser("create", help="patch from two checkpoint folders (base and edited)")
    c.add_argument("--base", required=True)
    c.add_argument("--edited", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--method", default="diff")
    c.add_argument("--mode", choices=["replace", "add"], default="replace")
    c.add_argument("--key-convention", dest="key_convention", default="hf-transformers")
    c.set_defaults(func=_patch_create)
    i = psub.add_parser("inspect", help="print metadata and per-tensor density")
    i.add_argument("patch")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_patch_inspect)
    for name, fn, helptext in (("verify", _patch_verify, "is this checkpoint folder the patch's base (or patched)?"),
                               ("apply", _patch_apply, "apply to a checkpoint folder in place (undo kept inside)"),
                               ("revert", _patch_revert, "revert a patch applied with 'patch apply'")):
        s = psub.add_parser(name, help=helptext)
        s.add_argument("patch")
        s.add_argument("--model", required=True, help="checkpoint folder")
        s.set_defaults(func=fn)
    m = psub.add_parser("materialize", help="write a patched copy of a checkpoint folder")
    m.add_argument("patches", nargs="+")
    m.add_argument("--base", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--subfolder", help="component of a diffusers pipeline folder, e.g. unet")
    m.add_argument("--overlap", choices=["last", "error"], default="last")
    m.set_defaults(func=_patch_materialize)
    add_o3_parser(sub)
    add_erase_parser(sub)
    add_vllm_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ServeUnlearnError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
