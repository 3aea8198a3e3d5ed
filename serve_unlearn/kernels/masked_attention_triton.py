"""Triton twin of :func:`serve_unlearn.kernels.masked_attention.masked_attention`: a FlashAttention-2-style
forward (inference only) over the kept keys, which skips key tiles with no kept key.

This module imports triton at the top, so it is importable only where triton is installed; callers import it
inside a function (see ``masked_attention._triton_backend``). On CPU tensors it runs only under the
interpreter: ``TRITON_INTERPRET=1`` must be in the environment when this module is first imported
(``is_interpreted()`` says which mode this process got).

One program owns BLOCK_M query rows of one (sample, head) and streams the keys in BLOCK_N tiles with the
online softmax (running max m_i and sum l_i, fp32 accumulators). The keep tile is loaded first: when it
keeps no key the K and V tiles are never read and the two dots never run. A tile is BLOCK_N consecutive keys
in raster order, so this pays off where the barred keys come in runs of whole tiles (a mask spanning full
token rows); a central square half the grid wide (64x64 tokens, 32 barred keys per token row) leaves no
64-key tile empty, and there only ``sdpa_gather``'s compaction saves FLOPs. A processed tile keeps at least
one key for every row (keep is per key, not per row), so m_i is finite after the first one and no row meets
exp(-inf - -inf); ``masked_attention`` refuses all-False keep rows before the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256  # the q, k, v and accumulator tiles of one program must fit in registers / shared memory
_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the kernel works in log2 units, exp2 is native


def block_sizes(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim: the FA2 tutorial's choice for D <= 64, halved
    tiles above it so the padded (BLOCK_D up to 256) tiles stay within an SM's shared memory."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d <= 64:
        return 128, 64, 4, 3
    if block_d == 128:
        return 64, 64, 4, 2
    return 64, 32, 8, 2


@triton.jit
def _masked_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,  # (B, H, N, D), any strides
    keep_ptr,  # uint8 (B, N_K), contiguous: nonzero = key may be attended
    qs_ptr,  # float32 (B, N_Q), contiguous: per-query logit scale (read only if HAS_QS)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, N_K, D,
    qk_scale,  # sm_scale * log2(e)
    HAS_QS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next_pow2(D) >= 16; columns past D are loaded as 0 and never stored
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (tf32 would miss the fp32 tolerance), else ignored
    DOT_FP32: tl.constexpr,  # widen q, k, v to fp32 before the dots: the interpreter's bf16 dot is wrong
):
    """o[b, h, i] = sum_j softmax_j(qs[b, i] * sm_scale * q[b, h, i] . k[b, h, j] + (0 if keep[b, j] else -inf))
    v[b, h, j] for the BLOCK_M rows i of this program.

    K and V rows of barred keys are not loaded (masked loads), so whatever they hold never reaches the output.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 bases: B*H*N*D can pass 2**31 elements
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    d_ok = offs_d < D

    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    row_scale = tl.full([BLOCK_M], qk_scale, tl.float32)
    if HAS_QS:
        row_scale *= tl.load(qs_ptr + b * N_Q + offs_m, mask=row_ok, other=1.0)

    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    keep_base = keep_ptr + b * N_K
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        keep = tl.load(keep_base + cols, mask=cols < N_K, other=0) != 0
        if tl.sum(keep.to(tl.int32), axis=0) > 0:  # a tile with no kept key adds nothing: skip its K, V loads
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=keep[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * row_scale[:, None]
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)  # 0 on the first processed tile (m_i = -inf)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=keep[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    out = acc / l_i[:, None]
    o_base = o_ptr + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def is_interpreted() -> bool:
    """Whether this module's kernel runs in the Triton interpreter (CPU tensors) rather than compiled (CUDA).

    Triton decides when ``@triton.jit`` runs, i.e. when this module is first imported, from
    ``TRITON_INTERPRET``.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_masked_attention_fwd_kernel, InterpretedFunction)


def masked_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    query_scale: torch.Tensor | None,
    sm_scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """The ``triton`` backend of ``masked_attention``, which validates the inputs (call that instead).

    ``keep`` is bool, int8 or uint8 (B, N_k); ``query_scale`` any float (B, N_q) or None. ``block_m`` /
    ``block_n`` override the tile sizes for the interpreter tests, where small tiles make a small input span
    several tiles (skipped and partial ones); leave them unset on a GPU.
    """
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must be float32, bfloat16 or float16, got {q.dtype}")
    B, H, N_q, D = q.shape
    N_k = k.shape[2]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"the triton backend supports head dims up to {MAX_HEAD_DIM}, got {D}; use sdpa_gather")
    bm, bn, num_warps, num_stages = block_sizes(D)
    bm, bn = block_m or bm, block_n or bn
    keep_u8 = keep.contiguous().view(torch.uint8) if keep.dtype == torch.bool else keep.contiguous()
    if keep_u8.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"keep must be bool, int8 or uint8, got {keep.dtype}")
    qs = query_scale.to(torch.float32).contiguous() if query_scale is not None else None
    out = torch.empty((B, H, N_q, D), dtype=q.dtype, device=q.device)
    # The interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584, Triton 3.9), so there
    # the bf16 dots run in fp32; compiled code keeps the native bf16 tensor-core dot.
    dot_fp32 = q.dtype == torch.bfloat16 and is_interpreted()
    grid = (triton.cdiv(N_q, bm), B * H)
    _masked_attention_fwd_kernel[grid](
        q, k, v, out, keep_u8, qs if qs is not None else q,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N_q, N_k, D, sm_scale * _LOG2E,
        HAS_QS=qs is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(D)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or dot_fp32 else "tf32",
        DOT_FP32=dot_fp32,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
