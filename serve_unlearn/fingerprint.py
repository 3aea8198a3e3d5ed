"""Fingerprints: how a patch (or an adapter) recognises the exact base tensors it was made for.

A tensor's digest is a sha256 over its shape, dtype and bytes (the name is the key it is filed under); a base
fingerprint is a sha256 over the sorted ``name:digest`` lines of the tensors a patch touches. Hashing only the
touched tensors keeps verification proportional to the edit, not to the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

__all__ = ["base_fingerprint", "tensor_digest"]


def tensor_digest(tensor: torch.Tensor) -> str:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = hashlib.sha256()
    h.update(f"{tuple(t.shape)}|{str(t.dtype).removeprefix('torch.')}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def base_fingerprint(digests: Mapping[str, str]) -> str:
    lines = "\n".join(f"{name}:{digest}" for name, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()

