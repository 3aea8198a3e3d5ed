"""Plain-torch twins of the patch kernels: the test oracle and the CPU path.

A mask is bit-packed little-endian (bit ``i % 8`` of byte ``i // 8`` is element ``i`` of the row-major flatten,
``numpy.packbits(bitorder="little")``), so it costs n/8 bytes and never exists as an int64 tensor.
Work is chunked so the temporaries (an unpacked bool chunk, its indices) stay bounded whatever the tensor size.
"""

from __future__ import annotations

import torch

# 8M elements per chunk: bool chunk 8 MiB, index temporaries at most 64 MiB.
CHUNK_ELEMS = 1 << 23
_SHIFTS = torch.arange(8, dtype=torch.uint8)
# popcount of every byte value, for counting set bits without unpacking
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape) -> uint8 tensor of ceil(n/8) bytes."""
    flat = mask.reshape(-1).to(torch.bool)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8) << _SHIFTS.to(flat.device)
    out = bits[:, 0].clone()
    for i in range(1, 8):
        out |= bits[:, i]
    return out


def unpack_mask(packed: torch.Tensor, numel: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """uint8 bytes -> bool tensor of the elements [start, stop) (default: all ``numel``); start is a multiple of 8."""
    stop = numel if stop is None else stop
    if start % 8:
        raise ValueError(f"start must be a multiple of 8, got {start}")
    chunk = packed[start // 8 : (stop + 7) // 8]
    bits = (chunk.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[: stop - start].to(torch.bool)


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits in a packed mask (padding bits are always zero)."""
    return int(_POPCOUNT.to(packed.device)[packed.long()].sum(dtype=torch.int64)) if packed.numel() else 0


def _chunks(numel: int):
    for start in range(0, numel, CHUNK_ELEMS):
        yield start, min(start + CHUNK_ELEMS, numel)


def masked_apply_(weight: torch.Tensor, packed: torch.Tensor, values: torch.Tensor, mode: str = "replace") -> torch.Tensor:
    """Write ``values`` (flat order) into the masked positions of ``weight``, in place.

    ``replace``: w[m] = values (bit-exact when ``values`` has the weight's dtype).
    ``add``: w[m] = (float32(w[m]) + float32(values)) cast back, so low-precision weights round once.
    """
    if mode not in ("replace", "add"):
        raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}")
    flat = weight.view(-1)
    offset = 0
    for start, stop in _chunks(flat.numel()):
        m = unpack_mask(packed, flat.numel(), start, stop)
        k = int(m.sum())
        if k == 0:
            continue
        seg = flat[start:stop]
        v = values[offset : offset + k]
        if mode == "replace":
            seg.masked_scatter_(m, v.to(weight.dtype))
        else:
            cur = seg[m].to(torch.float32)
            seg.masked_scatter_(m, (cur + v.to(torch.float32)).to(weight.dtype))
        offset += k
    if offset != values.numel():
        raise ValueError(f"mask selects {offset} elements but {values.numel()} values were given")
    return weight


def masked_gather(weight: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """The elements of ``weight`` at the masked positions, in flat order (what ``replace`` overwrites)."""
    flat = weight.reshape(-1)
    parts = [flat[start:stop][unpack_mask(packed, flat.numel(), start, stop)] for start, stop in _chunks(flat.numel())]
    return torch.cat(parts) if parts else flat.new_empty(0)
