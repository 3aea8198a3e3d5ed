"""Triton twin of :func:`serve_unlearn.kernels.masked_apply_torch.masked_apply_`: one pass over the weight, in
place.

This module imports triton at the top, so it is importable only where triton is installed; callers import it
inside a function (see ``serve_unlearn.kernels.dispatch``), which keeps ``import serve_unlearn.kernels``
free of triton. On CPU tensors it runs only under the interpreter: ``TRITON_INTERPRET=1`` must be in the
environment when this module is first imported, because Triton picks interpreted or compiled as
``@triton.jit`` runs (``is_interpreted()`` says which one this process got).

How the sparse values find their slots without unpacking the mask in memory: each program owns ``BLOCK``
consecutive elements (``BLOCK // 8`` mask bytes). The host computes the popcount of every block from the
packed bytes and an exclusive prefix sum of those counts, which is where the block's run of ``values`` starts.
Inside the kernel exclusive cumsums over the block's bits give each set element its rank within the block, so
element ``i`` reads ``values[block_start[pid] + rank(i)]``. The host work touches n/8 bytes, small next to the
weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 1024 elements = 128 mask bytes per program: big enough to keep a GPU busy per launch slot, small enough that
# the in-block cumsum stays cheap. Must be a multiple of 8 so a block never splits a mask byte.
BLOCK = 1024
_SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _to_float32(x):
    """Exact widening to float32 (bf16 via its bits: the interpreter mis-converts bf16 subnormals)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _from_float32(x, dtype: tl.constexpr):
    """float32 -> ``dtype`` rounding to nearest even, as torch does.

    bfloat16 is rounded by hand on the bits (torch's c10 algorithm, NaN kept as NaN) because the interpreter
    truncates fp32 -> bf16 while compiled code rounds; this way CPU-interpreted tests and GPU runs agree with
    torch bit for bit. The few integer ops are free in a memory-bound kernel.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)  # noqa: PLR0124 (x != x is the NaN test)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _masked_apply_kernel(
    w_ptr,  # weight, contiguous, n elements; written in place
    packed_ptr,  # uint8 mask, ceil(n / 8) bytes, little-endian bit order
    values_ptr,  # nnz values in flat index order, any float dtype
    block_start_ptr,  # int64 [num_blocks]: exclusive prefix sum of per-block popcounts
    n,
    BLOCK: tl.constexpr,
    ADD: tl.constexpr,  # constexpr so the unused branch is compiled out
):
    """w[m] = values (ADD=False) or w[m] = cast(float32(w[m]) + float32(values)) (ADD=True) for one block.

    The block is viewed as [BLOCK // 8, 8]: row r is mask byte r, column c its bit c, so each byte is loaded
    once and each row covers 8 consecutive weight elements. The rank of a set element within the block is (set
    bits in earlier rows) + (set bits earlier in its row), two exclusive cumsums. Replace never reads the
    weight; only masked elements are loaded (add) and stored.
    """
    ROWS: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    # int64 offsets: weights past 2**31 elements (large embeddings) must not wrap
    row = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # global mask byte index
    col = tl.arange(0, 8)
    offs = row[:, None] * 8 + col[None, :]
    in_range = offs < n
    byte = tl.load(packed_ptr + row, mask=row * 8 < n, other=0).to(tl.int32)
    bit = (byte[:, None] >> col[None, :]) & 1
    bit = tl.where(in_range, bit, 0)  # padding bits past n are zero by the format; this makes it certain
    row_count = tl.sum(bit, axis=1)
    rank = (tl.cumsum(row_count, axis=0) - row_count)[:, None] + (tl.cumsum(bit, axis=1) - bit)
    selected = bit != 0
    base = tl.load(block_start_ptr + pid)
    v = tl.load(values_ptr + base + rank, mask=selected, other=0.0)
    w_dtype: tl.constexpr = w_ptr.dtype.element_ty
    if ADD:
        w = tl.load(w_ptr + offs, mask=selected, other=0.0)
        out = _from_float32(_to_float32(w) + _to_float32(v), w_dtype)
    elif v.dtype == w_dtype:
        out = v  # replace with the weight's dtype: a plain copy, bit-exact
    else:
        out = _from_float32(_to_float32(v), w_dtype)
    tl.store(w_ptr + offs, out, mask=selected)


def is_interpreted() -> bool:
    """Whether this module's kernel runs in the Triton interpreter (CPU tensors) rather than compiled (CUDA).

    Triton decides when ``@triton.jit`` runs, i.e. when this module is first imported, from
    ``TRITON_INTERPRET``.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_masked_apply_kernel, InterpretedFunction)


def _block_popcounts(packed: torch.Tensor, num_blocks: int, block: int) -> torch.Tensor:
    """int32 set-bit count of each ``block``-element slice of the mask, from the packed bytes only.

    Byte-wise SWAR popcount (no 256-entry table gather, whose int64 index would be 8x the mask size).
    """
    bytes_per_block = block // 8
    pad = num_blocks * bytes_per_block - packed.numel()
    x = torch.nn.functional.pad(packed, (0, pad)) if pad else packed
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    x = (x + (x >> 4)) & 0x0F
    return x.view(num_blocks, bytes_per_block).sum(dim=1, dtype=torch.int32)


def masked_apply_triton_(
    weight: torch.Tensor,
    packed: torch.Tensor,
    values: torch.Tensor,
    mode: str = "replace",
    *,
    block: int = BLOCK,
) -> torch.Tensor:
    """Triton version of ``masked_apply_torch.masked_apply_`` (same arguments, same result, same errors).

    ``block`` is exposed for the interpreter tests, where a small block keeps odd sizes spanning several
    programs; leave it at the default on a GPU.
    """
    if mode not in ("replace", "add"):
        raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}")
    if not weight.is_contiguous():
        raise ValueError(
            "masked_apply_triton_ writes the row-major flatten of the weight in place, so it needs a "
            "contiguous tensor; patches are applied to contiguous checkpoint tensors (call .contiguous() and "
            "copy back)"
        )
    if weight.dtype not in _SUPPORTED_WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be float32, bfloat16 or float16, got {weight.dtype}")
    if not values.is_floating_point():
        raise ValueError(f"values must be a float tensor, got {values.dtype}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed mask must be uint8, got {packed.dtype}")
    if block <= 0 or block % 8 or block & (block - 1):
        raise ValueError(f"block must be a power of two and a multiple of 8, got {block}")
    n = weight.numel()
    if packed.numel() != (n + 7) // 8:
        raise ValueError(f"packed mask has {packed.numel()} bytes; {n} elements need {(n + 7) // 8}")
    if n % 8 and int(packed[-1]) >> (n % 8):  # block counts include them, the kernel would not write them
        raise ValueError("packed mask has bits set past the last element (padding bits must be zero)")
    packed = packed.to(weight.device).contiguous()
    values = values.to(weight.device).reshape(-1).contiguous()
    num_blocks = triton.cdiv(n, block)
    if num_blocks == 0:
        if values.numel():
            raise ValueError(f"mask selects 0 elements but {values.numel()} values were given")
        return weight
    counts = _block_popcounts(packed, num_blocks, block)
    block_start = torch.cumsum(counts, dim=0, dtype=torch.int64)
    nnz = int(block_start[-1])  # one host sync, needed to validate before writing anything
    if nnz != values.numel():
        raise ValueError(f"mask selects {nnz} elements but {values.numel()} values were given")
    if nnz == 0:
        return weight
    block_start -= counts
    grid = (num_blocks,)
    _masked_apply_kernel[grid](weight, packed, values, block_start, n, BLOCK=block, ADD=mode == "add")
    return weight
