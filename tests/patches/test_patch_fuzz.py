"""Seeded, bounded fuzz of patch files: every damaged file is refused with a typed error naming it, and the model
is bit-identical afterwards; nothing is ever applied wrong.

Families: truncations, byte flips in the header and in the data, the header keys the review named (every byte of
``base_fingerprint``'s name, the mode, the version), JSON header fields edited (with and without a recomputed
header digest: a careless writer, and one that knows the header rule), mask bits moved with the same popcount,
NaN/inf values (raw, and in a file whose digests agree). Each case runs through ``apply_patch`` and through the
vLLM loader's path (``stack_patches`` on the file, then ``apply_to_tensor`` per streamed tensor).
``pytest -s`` prints the counts.
"""

from __future__ import annotations

import json
import random
import struct
import warnings
from collections import Counter

import pytest
import torch
from helpers import as_version_1, bits
from safetensors import safe_open
from safetensors.torch import save_file

from serve_unlearn.patches import (
    PatchFormatError,
    UnverifiedPatchWarning,
    WeightPatch,
    apply_patch,
    stack_patches,
)
from serve_unlearn.patches.apply import apply_to_tensor
from serve_unlearn.patches.integrity import HEADER_DIGEST_KEY, PAYLOAD_DIGEST_KEY, header_digest

# header fields that say where a patch came from and cannot change what it writes: a writer that recomputes the
# header digest after editing one of them makes a file that applies exactly as before
INFORMATIONAL = {"method", "hparams", "created_at", "key_convention", "forget_digest", "base_model"}
CREATED = "2026-01-01T00:00:00+00:00"  # fixed, so the files (and the cases drawn from them) are the same every run


def _base():
    g = torch.Generator().manual_seed(7)
    return {"a.weight": torch.randn(32, 24, generator=g), "a.bias": torch.randn(32, generator=g),
            "b.weight": torch.randn(16, 20, generator=g).to(torch.bfloat16),
            "c.weight": torch.randn(9, 7, generator=g).half()}  # 63 elements: the mask has padding bits


def _edited(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in base.items()}
    for name in ("a.weight", "b.weight", "c.weight"):
        m = torch.rand(out[name].shape, generator=g) < 0.15
        out[name][m] = torch.randn(int(m.sum()), generator=g).to(out[name].dtype)
    out["a.bias"] += 1  # dense form
    return out


def _clone(sd):
    return {k: v.clone() for k, v in sd.items()}


def _same(a, b):
    return all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 - a safetensors handle is not a dict


def _write(path, meta, tensors, redigest=False):
    meta = dict(meta)
    if redigest:
        meta[HEADER_DIGEST_KEY] = header_digest(meta)
    save_file(tensors, str(path), metadata=meta)


def _run(path, base, expected) -> str:
    """'refused' (PatchFormatError naming the file, model bit-identical), 'exact' (applied bit-exactly) or 'wrong'.

    The base is right in every case, so a damaged file must never pass for another model's patch
    (PatchMismatchError): that would send its user looking for the wrong problem.
    """
    outcomes = []
    target = _clone(base)
    try:
        apply_patch(target, WeightPatch.load(path))
    except PatchFormatError as exc:
        assert str(path) in str(exc), exc
        assert _same(target, base), f"model changed by a refused patch: {exc}"
        outcomes.append("refused")
    else:
        outcomes.append("exact" if _same(target, expected) else "wrong")
    # the vLLM loader: stack the files, then patch each tensor as it streams out of the checkpoint
    streamed = _clone(base)
    try:
        patch = stack_patches([path])
        for name in patch.tensor_names:
            t = streamed[name].clone()
            try:
                apply_to_tensor(name, t, patch)
            except PatchFormatError:
                assert torch.equal(bits(t), bits(base[name])), "a refused tensor was not put back"
                raise
            streamed[name] = t
    except PatchFormatError as exc:
        assert str(path) in str(exc), exc
        outcomes.append("refused")
    else:
        outcomes.append("exact" if _same(streamed, expected) else "wrong")
    assert outcomes[0] == outcomes[1], f"apply_patch and the loader path disagree: {outcomes}"
    return outcomes[0]


def _flip_cases(data, rng, n_header, n_data, n_trunc):
    (n,) = struct.unpack("<Q", data[:8])
    end = 8 + n
    cases = []
    for _ in range(n_trunc):
        cases.append(("truncate", data[: rng.randrange(0, len(data))]))
    cases.append(("extend", data + b"\0"))
    for family, lo, hi, count in (("header-flip", 0, end, n_header), ("data-flip", end, len(data), n_data)):
        for _ in range(count):
            i = rng.randrange(lo, hi)
            mutated = bytearray(data)
            mutated[i] ^= rng.randrange(1, 256)
            cases.append((family, bytes(mutated)))
    # the keys the review named: every byte of base_fingerprint's name, the mode, the version
    for key in (b'"base_fingerprint"', b'"mode"', b'"format_version"'):
        at = data.index(key)
        for i in range(at + 1, at + len(key) - 1):
            mutated = bytearray(data)
            mutated[i] ^= 0x01
            cases.append(("named-key-flip", bytes(mutated)))
    for value in (b'"replace"', b'"add"', b'"2"'):
        at = data.find(b":" + value)
        if at >= 0:
            for i in range(at + 2, at + len(value)):
                mutated = bytearray(data)
                mutated[i] ^= 0x03  # "2" -> "1": a version-2 file passed off as an unverified version 1
                cases.append(("named-value-flip", bytes(mutated)))
    return cases


def _header_edits(meta):
    """(label, edit) pairs over the metadata: every key removed and renamed, values changed, tensor table edits."""
    edits = []
    for key in meta:
        edits.append((f"drop {key}", lambda m, k=key: m.pop(k)))
        edits.append((f"rename {key}", lambda m, k=key: m.update({k + "_": m.pop(k)})))
    flip = {"0": "1", "1": "0"}

    def hexflip(v):
        return (flip.get(v[0], "0")) + v[1:]

    edits += [
        ("mode", lambda m: m.update(mode="add" if m["mode"] == "replace" else "replace")),
        ("method", lambda m: m.update(method="other")),
        ("hparams", lambda m: m.update(hparams=json.dumps({"lr": 0.5}))),
        ("created_at", lambda m: m.update(created_at="1999-01-01T00:00:00+00:00")),
        ("key_convention", lambda m: m.update(key_convention="other")),
        ("base_fingerprint", lambda m: m.update(base_fingerprint=hexflip(m["base_fingerprint"]))),
        ("format_version 1", lambda m: m.update(format_version="1")),
        ("format_version 3", lambda m: m.update(format_version="3")),
        (HEADER_DIGEST_KEY, lambda m: m.update({HEADER_DIGEST_KEY: hexflip(m[HEADER_DIGEST_KEY])})),
    ]
    table = json.loads(meta["tensors"])
    other_dtype = {"float32": "float16", "float16": "bfloat16", "bfloat16": "float32"}
    for name, info in table.items():
        field_edits = {
            "dtype": lambda e: e.update(dtype=other_dtype[e["dtype"]]),
            "shape": lambda e: e.update(shape=e["shape"][::-1] if len(e["shape"]) > 1 else [e["shape"][0] + 1]),
            "nnz": lambda e: e.update(nnz=e["nnz"] - 1),
            "form": lambda e: e.update(form="dense" if e["form"] == "mask" else "mask"),
            "base_sha256": lambda e: e.update(base_sha256=hexflip(e["base_sha256"])),
            "patched_sha256": lambda e: e.update(patched_sha256=hexflip(e["patched_sha256"])),
            "patched_sha256 null": lambda e: e.update(patched_sha256=None),
            PAYLOAD_DIGEST_KEY: lambda e: e.update({PAYLOAD_DIGEST_KEY: hexflip(e[PAYLOAD_DIGEST_KEY])}),
            "unknown field": lambda e: e.update(extra=1),
        }
        for field in info:
            field_edits[f"drop {field}"] = lambda e, f=field: e.pop(f)
        for label, fn in field_edits.items():
            def edit(m, n=name, fn=fn):
                t = json.loads(m["tensors"])
                fn(t[n])
                m["tensors"] = json.dumps(t, sort_keys=True)
            edits.append((f"{name}: {label}", edit))
    names = sorted(table)
    edits.append(("drop a table entry", lambda m: m.update(tensors=json.dumps(
        {k: v for k, v in json.loads(m["tensors"]).items() if k != names[0]}, sort_keys=True))))
    edits.append(("swap two entries", lambda m: m.update(tensors=json.dumps(
        {**json.loads(m["tensors"]), names[0]: json.loads(m["tensors"])[names[1]],
         names[1]: json.loads(m["tensors"])[names[0]]}, sort_keys=True))))
    return edits


def _move_mask_bit(tensors, rng):
    """Move one set bit of a mask to an unset position: the same popcount, so every count still agrees."""
    masks = sorted(k for k in tensors if k.endswith("::mask"))
    key = rng.choice(masks)
    name = key.removesuffix("::mask")
    numel = {"a.weight": 32 * 24, "b.weight": 16 * 20, "c.weight": 63}[name]
    packed = tensors[key]
    flat = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:numel].bool()
    on, off = flat.nonzero().squeeze(1).tolist(), (~flat).nonzero().squeeze(1).tolist()
    flat[rng.choice(on)], flat[rng.choice(off)] = False, True
    from serve_unlearn.kernels import pack_mask

    tensors[key] = pack_mask(flat)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_fuzz_patch_files(tmp_path, mode, capsys):
    base = _base()
    patch = WeightPatch.from_diff(base, _edited(base), method="fuzz", mode=mode, hparams={"lr": 1e-3},
                                  created_at=CREATED)
    expected = _clone(base)
    apply_patch(expected, patch)
    good = patch.save(tmp_path / "good.patch.safetensors")
    data = good.read_bytes()
    meta, tensors = _read(good)
    rng = random.Random(1234 if mode == "replace" else 4321)
    counts: Counter = Counter()
    accepted = []
    path = tmp_path / "case.patch.safetensors"

    def record(family, outcome, label=""):
        counts[(family, outcome)] += 1
        if outcome == "exact":
            accepted.append((family, label))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedPatchWarning)
        for family, blob in _flip_cases(data, rng, n_header=120, n_data=120, n_trunc=25):
            path.write_bytes(blob)
            record(family, _run(path, base, expected))
        for label, edit in _header_edits(meta):
            for redigest in (False, True):
                m = dict(meta)
                edit(m)
                _write(path, m, tensors, redigest=redigest)
                record("header-edit+redigest" if redigest else "header-edit", _run(path, base, expected), label)
        for _ in range(20):
            t = _clone(tensors)
            _move_mask_bit(t, rng)
            _write(path, meta, t)
            record("mask-bit-move", _run(path, base, expected))
        for value in (float("nan"), float("inf"), float("-inf")):
            for key in sorted(k for k in tensors if not k.endswith("::mask")):
                t = _clone(tensors)
                flat = t[key].view(-1)
                flat[rng.randrange(flat.numel())] = value
                _write(path, meta, t)  # the payload digest no longer agrees
                record("nonfinite-raw", _run(path, base, expected))
                # the same values in a file whose digests all agree (a diverged run, saved as it is)
                bad = WeightPatch.load(good)
                entry = bad.entries[key.split("::")[0]]
                entry.values = entry.values.clone()
                entry.values.view(-1)[rng.randrange(entry.values.numel())] = value
                bad.save(path)
                record("nonfinite-signed", _run(path, base, expected))

    wrong = {k: v for k, v in counts.items() if k[1] == "wrong"}
    families = sorted({f for f, _ in counts})
    table = {f: {o: counts[(f, o)] for o in ("refused", "exact", "wrong")} for f in families}
    with capsys.disabled():
        print(f"\npatch fuzz ({mode}): tried {sum(counts.values())}, refused "
              f"{sum(v for (f, o), v in counts.items() if o == 'refused')}, applied bit-exactly "
              f"{len(accepted)}, applied wrong {sum(wrong.values())}")
        for f, row in table.items():
            print(f"  {f:22s} {row}")
        print(f"  applied bit-exactly: {[label for _, label in accepted]}")
    assert not wrong, f"silently wrong: {wrong}"
    # every damaged byte is refused; only a consistent edit of a field that cannot change the result applies
    assert all(f == "header-edit+redigest" and _edited_key(label) in INFORMATIONAL | {HEADER_DIGEST_KEY}
               for f, label in accepted), accepted


def _edited_key(label: str) -> str:
    """The header key an edit label touches ("drop hparams" -> "hparams"; renaming the header digest and then
    recomputing it only adds an unknown key)."""
    return label.removeprefix("drop ").removeprefix("rename ")


def test_fuzz_version_1_files(tmp_path, capsys):
    """Version-1 files (no digests): each result is checked after the write, so a damaged data byte is refused and
    the model put back; header flips in fields that cannot change the result may pass (the warning says so)."""
    base = _base()
    patch = WeightPatch.from_diff(base, _edited(base, seed=3), method="fuzz", created_at=CREATED)
    expected = _clone(base)
    apply_patch(expected, patch)
    good = patch.save(tmp_path / "v2.patch.safetensors")
    v1 = as_version_1(good, tmp_path / "v1.patch.safetensors")
    with pytest.warns(UnverifiedPatchWarning, match="version-1"):
        assert _run(v1, base, expected) == "exact"
    rng = random.Random(99)
    counts: Counter = Counter()
    path = tmp_path / "case.patch.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedPatchWarning)
        for family, blob in _flip_cases(v1.read_bytes(), rng, n_header=60, n_data=80, n_trunc=10):
            path.write_bytes(blob)
            counts[(family, _run(path, base, expected))] += 1
    with capsys.disabled():
        print(f"\nversion-1 fuzz: {dict(counts)}")
    assert not [k for k in counts if k[1] == "wrong"], counts
    assert not [k for k in counts if k[0] == "data-flip" and k[1] != "refused"], counts
