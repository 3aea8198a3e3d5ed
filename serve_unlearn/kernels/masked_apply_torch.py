"""The torch side of ``masked_apply_``: the bit-packed mask format and the reference (test oracle, CPU path).

A mask is bit-packed little-endian (bit ``i % 8`` of byte ``i // 8`` is element ``i`` of the row-major flatten,
``numpy.packbits(bitorder="little")``), so it costs n/8 bytes and never exists as an int64 tensor.
Work is chunked so the temporaries (an unpacked bool chunk, its indices) stay bounded whatever the tensor size.

Speed notes (CPU; the figures are in the README, ``benchmarks/patch_apply.py``): a reduction of bool/uint8 with
an int64 accumulator (``mask.sum()``, ``x.sum(dtype=torch.int64)``) takes a slow path, far slower than
accumulating in int32, so counts are taken on the packed bytes in int32 per chunk; unpacking is one 256-entry
table lookup per byte instead of a broadcast shift over n elements. Writing is then the cost: ``masked_scatter_``
and ``nonzero`` walk the mask serially with one branch per element, which mispredicts at mid densities (as does
``torch.where`` with a bool condition), so dense chunks take a branch-free path instead.
"""

from __future__ import annotations

import torch

# 1M elements per chunk: the dense path's temporaries (bool chunk 1 MiB, int32 ranks, gathered values, the bit
# blend) stay near 16 MiB and cache-friendly; bigger chunks measured slower, smaller ones pay per-op overhead.
CHUNK_ELEMS = 1 << 20
# chunks at least this full take the branch-free dense path (the measured crossover is in the README)
_DENSE_FRACTION = 0.25
_SHIFTS = torch.arange(8, dtype=torch.uint8)
# byte value -> its 8 bits as 8 bytes of 0/1, held as one int64 so a single index_select unpacks 8 elements;
# built through a uint8 view, so the layout follows the machine's byte order
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.uint8).view(torch.int64)[:, 0]
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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
    words = _BYTE_BITS.to(packed.device).index_select(0, chunk.to(torch.int32))
    # 0/1 bytes are valid bools, so the view needs no conversion pass
    return words.view(torch.uint8)[: stop - start].view(torch.bool)


def _byte_popcounts(packed: torch.Tensor) -> torch.Tensor:
    """Set bits of every byte (uint8), SWAR on the bytes: no table gather and its int64 index."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits in a packed mask (padding bits are always zero)."""
    step = 1 << 28  # bytes per int32 sum, which then cannot overflow
    parts = (packed[i : i + step] for i in range(0, packed.numel(), step))
    return sum(int(_byte_popcounts(part).sum(dtype=torch.int32)) for part in parts)


def _chunk_popcounts(packed: torch.Tensor) -> list[int]:
    """Set bits in each ``CHUNK_ELEMS`` chunk, in one pass over the bytes (a few ops, not a few per chunk)."""
    per = CHUNK_ELEMS // 8
    num = -(-packed.numel() // per)
    counts = torch.nn.functional.pad(_byte_popcounts(packed), (0, num * per - packed.numel()))
    return counts.view(num, per).sum(dim=1, dtype=torch.int32).tolist()


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
    _check_packed(packed, flat.numel())
    spans = list(_chunks(flat.numel()))
    counts = _chunk_popcounts(packed)
    if sum(counts) != values.numel():  # checked before anything is written
        raise ValueError(f"mask selects {sum(counts)} elements but {values.numel()} values were given")
    offset = 0
    for (start, stop), k in zip(spans, counts):
        if k:
            v = values[offset : offset + k]
            _apply_chunk(flat[start:stop], packed, flat.numel(), start, stop, v, mode)
        offset += k
    return weight


def _check_packed(packed: torch.Tensor, numel: int) -> None:
    """Length ceil(numel/8) and zero padding bits: chunk counts include the last byte's padding bits."""
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask has {packed.numel()} bytes; {numel} elements need {(numel + 7) // 8}")
    if numel % 8 and int(packed[-1]) >> (numel % 8):
        raise ValueError("packed mask has bits set past the last element (padding bits must be zero)")


def _apply_chunk(seg, packed, numel, start, stop, v, mode):
    """One chunk of ``masked_apply_``; ``v`` holds exactly the chunk's values (k >= 1)."""
    k = v.numel()
    if k == seg.numel():  # full chunk: a plain copy
        new = v if mode == "replace" else seg.to(torch.float32) + v.to(torch.float32)
        seg.copy_(new.to(seg.dtype))
        return
    m = unpack_mask(packed, numel, start, stop)
    bits_dtype = _BITS_DTYPE.get(seg.element_size())
    if bits_dtype is not None and k >= _DENSE_FRACTION * seg.numel():
        # dense and branch-free: spread the values to their slots by rank (cumsum), compute every slot, then
        # blend bit patterns under the mask (bitwise ops, so bit-exact, and NaN/-0.0 outside it untouched)
        rank = torch.cumsum(m, 0, dtype=torch.int32).sub_(1).clamp_(min=0)
        spread = v.index_select(0, rank)
        if mode == "replace":
            new = spread.to(seg.dtype)
        else:
            new = (seg.to(torch.float32) + spread.to(torch.float32)).to(seg.dtype)
        old_bits = seg.view(bits_dtype)
        diff = old_bits.bitwise_xor(new.view(bits_dtype)).bitwise_and_(m.to(bits_dtype).neg_())
        old_bits.bitwise_xor_(diff)
    elif mode == "replace":
        seg.masked_scatter_(m, v.to(seg.dtype))
    else:
        # nonzero + index_select/index_copy_ beat seg[m] + masked_scatter_ (two serial mask walks; README)
        idx = m.nonzero().squeeze(1)
        cur = seg.index_select(0, idx).to(torch.float32)
        seg.index_copy_(0, idx, (cur + v.to(torch.float32)).to(seg.dtype))


def masked_gather(weight: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """The elements of ``weight`` at the masked positions, in flat order (what ``replace`` overwrites)."""
    flat = weight.reshape(-1)
    parts = [flat[start:stop][unpack_mask(packed, flat.numel(), start, stop)] for start, stop in _chunks(flat.numel())]
    return torch.cat(parts) if parts else flat.new_empty(0)
