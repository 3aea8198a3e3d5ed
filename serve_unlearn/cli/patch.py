"""``serve-unlearn patch create|inspect|verify|apply|revert|materialize``: weight patches and checkpoint folders."""

from __future__ import annotations

import json
from pathlib import Path


def _integrity(patch) -> str:
    if patch.verified:
        return (f"verified: format {patch.format_version}, the header and every tensor's stored bytes match "
                "their sha256 digests")
    return (f"UNVERIFIED: format {patch.format_version} carries no header or payload digests (each result is "
            "checked after it is written); recreate the patch to get a verified file")


def _summary(patch) -> dict:
    tensors = {n: {"shape": list(e.shape), "dtype": str(e.dtype).removeprefix("torch."), "form": e.form,
                   "nnz": e.nnz, "density": round(patch.density(n), 6)} for n, e in sorted(patch.entries.items())}
    return {"patch_id": patch.patch_id, "metadata": patch.metadata, "nbytes": patch.nbytes, "tensors": tensors,
            "format_version": patch.format_version, "verified": patch.verified, "integrity": _integrity(patch)}


def _patch_inspect(args) -> int:
    from ..patches import WeightPatch

    patch = WeightPatch.load(args.patch)
    info = _summary(patch)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    meta = info["metadata"]
    print(f"patch {info['patch_id']}  method={meta.get('method')}  mode={meta.get('mode')}  "
          f"tensors={len(info['tensors'])}  payload={info['nbytes']} bytes")
    print(f"base fingerprint {meta.get('base_fingerprint')}  created {meta.get('created_at')}")
    print(f"integrity: {info['integrity']}")
    for name, t in info["tensors"].items():
        print(f"  {name:60s} {tuple(t['shape'])!s:>16s} {t['dtype']:>9s} {t['form']:>5s} density={t['density']:.4f}")
    return 0


def _folder_tensors(folder: Path, names: set[str] | None = None):
    """Tensors of a checkpoint folder (all, or only ``names``)."""
    from safetensors import safe_open

    from ..patches.materialize import weight_shards

    found = {}
    for shard in weight_shards(folder):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                if names is None or key in names:
                    found[key] = f.get_tensor(key)
    return found


def _patch_verify(args) -> int:
    from ..errors import PatchMismatchError
    from ..patches import WeightPatch, tensor_digest

    patch = WeightPatch.load(args.patch)  # checks the file itself (format 2) before any digest is trusted
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


def _on_server(args, action: str) -> int:
    from ..serving.vllm.live_patch import change_on_server

    print(json.dumps(change_on_server(args.server, action, args.patch, api_key=args.api_key), sort_keys=True))
    return 0


def _patch_apply(args) -> int:
    from ..patches import WeightPatch
    from ..patches.materialize import patch_folder_in_place, undo_path

    if args.server:
        return _on_server(args, "apply")

    patch = WeightPatch.load(args.patch)
    folder = Path(args.model)
    undo = patch_folder_in_place(folder, patch)
    undo.save(undo_path(folder, patch))
    print(json.dumps({"applied": patch.patch_id, "model": str(folder), "undo": str(undo_path(folder, patch))}))
    return 0


def _patch_revert(args) -> int:
    from ..errors import PatchStateError
    from ..patches import WeightPatch
    from ..patches.materialize import patch_folder_in_place, undo_path

    if args.server:
        return _on_server(args, "revert")
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
    from ..patches import WeightPatch

    base = _folder_tensors(Path(args.base))
    edited = _folder_tensors(Path(args.edited))
    patch = WeightPatch.from_diff(base, edited, method=args.method, mode=args.mode,
                                  base_model=str(Path(args.base).resolve()), key_convention=args.key_convention)
    path = patch.save(args.out)
    print(json.dumps({"patch": str(path), "patch_id": patch.patch_id, "tensors": len(patch.tensor_names)}))
    return 0


def _patch_materialize(args) -> int:
    from ..patches import materialize

    out = materialize(args.base, args.patches, args.out, subfolder=args.subfolder, overlap=args.overlap)
    print(json.dumps({"materialized": str(out)}))
    return 0


def add_patch_parser(sub) -> None:
    """Register ``patch`` and its subcommands on the CLI's subparsers."""
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
    s = psub.add_parser("verify", help="is this checkpoint folder the patch's base (or patched)?")
    s.add_argument("patch")
    s.add_argument("--model", required=True, help="checkpoint folder")
    s.set_defaults(func=_patch_verify)
    for name, fn, helptext in (
        ("apply", _patch_apply, "apply to a checkpoint folder in place (undo kept inside), or live on a vLLM server"),
        ("revert", _patch_revert, "revert a patch applied with 'patch apply' (folder or server)"),
    ):
        s = psub.add_parser(name, help=helptext)
        s.add_argument("patch")
        where = s.add_mutually_exclusive_group(required=True)
        where.add_argument("--model", help="checkpoint folder")
        where.add_argument("--server", help="a running vLLM server started by serve-unlearn vllm (e.g. "
                           "http://127.0.0.1:8000): its loaded weights change without a restart; the admin token "
                           "comes from $SERVE_UNLEARN_ADMIN_TOKEN and the patch path must be readable by the server")
        s.add_argument("--api-key", help="vLLM's --api-key, when the server has one")
        s.set_defaults(func=fn)
    m = psub.add_parser("materialize", help="write a patched copy of a checkpoint folder")
    m.add_argument("patches", nargs="+")
    m.add_argument("--base", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--subfolder", help="component of a diffusers pipeline folder, e.g. unet")
    m.add_argument("--overlap", choices=["last", "error"], default="last")
    m.set_defaults(func=_patch_materialize)
