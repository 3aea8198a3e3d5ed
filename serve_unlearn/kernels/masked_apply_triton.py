"""Triton twin of :func:`serve_unlearn.kernels.masked_apply_torch.masked_apply_`: one pass over the weight, in
place.

This module imports triton at the top, so it is importable only where triton is installed; callers import it
inside a function (see ``serve_unlearn.kernels.dispatch``), which keeps ``import serve_unlearn.kernels``
free of triton. On CPU tensors it runs only under the interpreter: ``TRITON_INTERPRET=1`` must be in the
environment when this module is first imported, because Triton picks interpreted or compiled as
``@triton.jit`` runs (``is_interpreted()`` says which one this process got).

How the sparse values find their slots without unpacking the mask in memory: each program owns ``BLOCK``
consecutive elements (``BLOCK // 8`` mask bytes). A first kernel counts the set bits of every block from the
packed bytes (one read of n/8 bytes); an exclusive prefix sum of those counts is where each block's run of
``values`` starts. Inside the apply kernel an element's rank within its block is the set bits of the earlier
mask bytes (one cumsum over the block's bytes) plus the set bits below it in its own byte (a popcount), so
element ``i`` reads ``values[block_start[pid] + rank(i)]``. Popcounts are SWAR bit tricks on int32, which the
interpreter runs too. On an H200 the counting pass made with torch's elementwise ops cost as much as the apply
kernel itself, hence its own kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 4096 elements = 512 mask bytes per program, with 4 warps: the best of block 1024-8192 x 2-16 warps measured on an
# H200 (benchmarks/patch_apply.py --table blocks). Must be a multiple of 8 so a block never splits a mask byte.
BLOCK = 4096
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
def _popcount8(x):
    """Set bits of each int32 in 0..255 (SWAR: three shifts and masks, no table)."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


@triton.jit
def _block_count_kernel(packed_ptr, counts_ptr, nbytes, ROWS: tl.constexpr):
    """counts[pid] = set bits in mask bytes [pid * ROWS, (pid + 1) * ROWS)."""
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    byte = tl.load(packed_ptr + row, mask=row < nbytes, other=0).to(tl.int32)
    tl.store(counts_ptr + pid, tl.sum(_popcount8(byte), axis=0))


@triton.jit
def _block_slots(packed_ptr, block_start_ptr, n, BLOCK: tl.constexpr):
    """For this program's ``BLOCK`` elements, viewed as [BLOCK // 8, 8]: their flat offsets, the index of each
    one's value in the packed values (meaningful where selected), and which are selected by the mask."""
    ROWS: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    # int64 offsets: weights past 2**31 elements (large embeddings) must not wrap
    row = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # global mask byte index
    col = tl.arange(0, 8)
    offs = row[:, None] * 8 + col[None, :]
    byte = tl.load(packed_ptr + row, mask=row * 8 < n, other=0).to(tl.int32)
    row_count = _popcount8(byte)
    rank = (tl.cumsum(row_count, axis=0) - row_count)[:, None] + _popcount8(byte[:, None] & ((1 << col[None, :]) - 1))
    # padding bits past n are zero by the format (checked on the host); offs < n makes it certain
    selected = (((byte[:, None] >> col[None, :]) & 1) != 0) & (offs < n)
    return offs, tl.load(block_start_ptr + pid) + rank, selected


@triton.jit
def _masked_gather_kernel(w_ptr, packed_ptr, out_ptr, block_start_ptr, n, BLOCK: tl.constexpr):
    """out[rank of each masked element] = w[element]: the read twin of the apply."""
    offs, slot, selected = _block_slots(packed_ptr, block_start_ptr, n, BLOCK)
    tl.store(out_ptr + slot, tl.load(w_ptr + offs, mask=selected), mask=selected)


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
    bits in earlier rows: an exclusive cumsum of the rows' popcounts) + (set bits below it in its row: the
    popcount of the byte masked below bit c). Replace never reads the weight; only masked elements are loaded
    (add) and stored.
    """
    offs, slot, selected = _block_slots(packed_ptr, block_start_ptr, n, BLOCK)
    v = tl.load(values_ptr + slot, mask=selected, other=0.0)
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
    """int32 set-bit count of each ``block``-element slice of the mask, from the packed bytes only."""
    counts = torch.empty(num_blocks, dtype=torch.int32, device=packed.device)
    _block_count_kernel[(num_blocks,)](packed, counts, packed.numel(), ROWS=block // 8)
    return counts


def _block_starts(packed: torch.Tensor, num_blocks: int, block: int) -> tuple[torch.Tensor, int]:
    """Where each block's run of values starts (exclusive prefix sum of its set bits), and the total (one host
    sync: callers validate it before writing anything)."""
    counts = _block_popcounts(packed, num_blocks, block)
    block_start = torch.cumsum(counts, dim=0, dtype=torch.int64)
    nnz = int(block_start[-1])
    return block_start.sub_(counts), nnz


def _check_mask(weight: torch.Tensor, packed: torch.Tensor, block: int) -> torch.Tensor:
    """The packed mask on the weight's device, after the checks both kernels need."""
    if not weight.is_contiguous():
        raise ValueError(
            "the Triton masked kernels address the row-major flatten of the weight, so they need a contiguous "
            "tensor; patches are applied to contiguous checkpoint tensors (call .contiguous() and copy back)"
        )
    if weight.dtype not in _SUPPORTED_WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be float32, bfloat16 or float16, got {weight.dtype}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed mask must be uint8, got {packed.dtype}")
    if block <= 0 or block % 8 or block & (block - 1):
        raise ValueError(f"block must be a power of two and a multiple of 8, got {block}")
    n = weight.numel()
    if packed.numel() != (n + 7) // 8:
        raise ValueError(f"packed mask has {packed.numel()} bytes; {n} elements need {(n + 7) // 8}")
    if n % 8 and int(packed[-1]) >> (n % 8):  # block counts include them, the kernels would not touch them
        raise ValueError("packed mask has bits set past the last element (padding bits must be zero)")
    return packed.to(weight.device).contiguous()


def masked_gather_triton(weight: torch.Tensor, packed: torch.Tensor, *, block: int = BLOCK) -> torch.Tensor:
    """Triton version of ``masked_apply_torch.masked_gather``: the masked elements in flat order, as a new
    tensor (what an apply must keep to be undone)."""
    packed = _check_mask(weight, packed, block)
    num_blocks = triton.cdiv(weight.numel(), block)
    if num_blocks == 0:
        return weight.new_empty(0)
    block_start, nnz = _block_starts(packed, num_blocks, block)
    out = weight.new_empty(nnz)
    if nnz:
        _masked_gather_kernel[(num_blocks,)](weight, packed, out, block_start, weight.numel(), BLOCK=block)
    return out


def masked_apply_triton_(
    weight: torch.Tensor,
    packed: torch.Tensor,
    values: torch.Tensor,
    mode: str = "replace",
    *,
    block: int = BLOCK,
    num_warps: int = 4,
) -> torch.Tensor:
    """Triton version of ``masked_apply_torch.masked_apply_`` (same arguments, same result, same errors).

    ``block`` is exposed for the interpreter tests, where a small block keeps odd sizes spanning several
    programs, and with ``num_warps`` for tuning on a GPU.
    """
    if mode not in ("replace", "add"):
        raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}")
    if not values.is_floating_point():
        raise ValueError(f"values must be a float tensor, got {values.dtype}")
    packed = _check_mask(weight, packed, block)
    n = weight.numel()
    values = values.to(weight.device).reshape(-1).contiguous()
    num_blocks = triton.cdiv(n, block)
    if num_blocks == 0:
        if values.numel():
            raise ValueError(f"mask selects 0 elements but {values.numel()} values were given")
        return weight
    block_start, nnz = _block_starts(packed, num_blocks, block)
    if nnz != values.numel():
        raise ValueError(f"mask selects {nnz} elements but {values.numel()} values were given")
    if nnz == 0:
        return weight
    grid = (num_blocks,)
    _masked_apply_kernel[grid](weight, packed, values, block_start, n, BLOCK=block, ADD=mode == "add",
                                 num_warps=num_warps)
    return weight
