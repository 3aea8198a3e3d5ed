"""What makes a patch file trustworthy byte for byte (format version 2), and the checks every apply makes.

- ``header_sha256``: sha256 over the canonical JSON of every other header entry (sorted keys, no whitespace), so a
  changed hyperparameter, dtype string, mode, digest or key name is caught, and a renamed key is a missing key.
- ``payload_sha256`` per tensor: sha256 over the tensor's name, the patch mode, its header entry and the stored
  bytes (dtype, shape, data) of its mask and values (or dense tensor). It binds the data to its meaning, so a
  flipped data byte, a mask bit moved to another element, or values swapped between tensors are all caught,
  before anything is written, for the cost of hashing the payload (not the model).
- The safetensors header itself must be in the canonical form ``save_file`` writes (compact JSON, space
  padding): a flip that leaves it valid JSON (a space turned into a tab) cannot change the result, but is
  refused like any other damage.

sha256 because it is in the standard library, the fastest hash there on CPUs with SHA extensions (x86 since Zen /
Ice Lake, Arm v8), and what the base digests already use. Version-1 files carry neither digest: they load with an
:class:`UnverifiedPatchWarning`, and their results are checked after each write against the patched digest.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import PatchFormatError

HEADER_DIGEST_KEY = "header_sha256"
PAYLOAD_DIGEST_KEY = "payload_sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class UnverifiedPatchWarning(UserWarning):
    """A version-1 patch file: its header and stored bytes carry no digests (results are checked after writing)."""


def damaged(where: str, what: str) -> PatchFormatError:
    return PatchFormatError(
        f"{where!r}: {what}; the file is damaged or was changed after it was written: copy it again or recreate "
        "the patch (the model was not changed)"
    )


def is_hex_digest(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def header_digest(metadata: Mapping[str, str]) -> str:
    """sha256 of the canonical form of every header entry except the digest itself."""
    body = {k: v for k, v in metadata.items() if k != HEADER_DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _update_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h.update(f"|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def payload_digest(name: str, mode: str, info: Mapping[str, Any], parts: Sequence[torch.Tensor]) -> str:
    """sha256 binding a tensor's stored data (``parts``: mask then values, or dense) to its name, mode and entry."""
    h = hashlib.sha256(b"serve-unlearn-patch payload 2\0")
    entry = {k: v for k, v in info.items() if k != PAYLOAD_DIGEST_KEY}
    h.update(json.dumps({"name": name, "mode": mode, "entry": entry}, sort_keys=True, separators=(",", ":")).encode())
    for t in parts:
        _update_tensor(h, t)
    return h.hexdigest()


def check_canonical_header(path: str, metadata: Mapping[str, str]) -> None:
    """The file's safetensors header is exactly what ``save_file`` writes, and its metadata is ``metadata``."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            raw = f.read(n) if 0 <= n <= _MAX_HEADER else b""
    except OSError as exc:
        raise damaged(path, f"the file cannot be read again ({exc})") from exc
    if not 0 <= n <= _MAX_HEADER:
        raise damaged(path, "the safetensors header length is out of range")
    text = raw.rstrip(b" ")
    try:
        parsed = json.loads(text)
        canonical = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()
    except (UnicodeDecodeError, ValueError) as exc:
        raise damaged(path, f"the safetensors header is not valid JSON ({exc})") from exc
    if len(raw) != n or canonical != text or len(raw) - len(text) >= 8:
        raise damaged(path, "the safetensors header is not in the canonical form save_file writes")
    if not isinstance(parsed, dict) or parsed.get("__metadata__") != dict(metadata):
        raise damaged(path, "the safetensors header changed while it was read")


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or inf; may say False for finite values whose sum overflows (then ask
    ``isfinite``). A NaN or inf anywhere makes the sum non-finite (NaN propagates, inf + -inf is NaN), and a sum
    costs ~1 ms per 8M elements on CPU, 20-45x less than ``isfinite().all()`` (a bool reduction)."""
    return t.numel() == 0 or bool(torch.isfinite(t.sum()))


def check_finite(where: str, name: str, new: torch.Tensor, old: torch.Tensor) -> None:
    """Refuse to write NaN/inf where the base does not hold the same kind of value (NaN for NaN, the same inf).

    ``new`` and ``old`` are the values after and before the write at the written positions. A patch never
    creates a non-finite weight: a diverged unlearning run is refused here rather than served. A non-finite value
    the base already held there (a -inf mask buffer carried whole by a dense entry) is left as it is.
    """
    if all_finite(new):
        return
    bad = ~torch.isfinite(new)
    if not bool(bad.any()):
        return
    n = new[bad].cpu()
    o = old.to(new.device)[bad].cpu()
    same = (torch.isnan(n) & torch.isnan(o)) | (n == o)
    if not bool(same.all()):
        count = int((~same).sum())
        raise PatchFormatError(
            f"{where!r}: the patch would write {count} NaN/inf value(s) into tensor {name!r} where the base holds "
            "other values; a patch must not create non-finite weights (did the unlearning run diverge?): "
            "recreate it with a smaller learning rate (the model was not changed)"
        )
