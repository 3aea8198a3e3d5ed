"""Masked attention: every backend against ``reference``, the reference against Attentive Eraser's own
two-softmax-and-select formulation, the errors, the dispatch, and the Triton kernel (interpreted on CPU,
compiled for sm_90 without a GPU, run on CUDA where there is one).

The ``test_interp_*`` tests (marker ``interp``) need a process started with ``TRITON_INTERPRET=1`` (why:
test_masked_apply.py's docstring); ``make test`` runs them as their own pytest, ``TRITON_INTERPRET=1 pytest
tests/kernels -m interp``, and every other run deselects them.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import compile_sm90, compiled_only, interp_only, kernel_module, needs_triton

from serve_unlearn import kernels
from serve_unlearn.kernels import MASKED_ATTENTION_BACKENDS, dispatch, empty_keep_rows, masked_attention

# the package's ``masked_attention`` attribute is the function, which shadows the module of the same name
ma = importlib.import_module("serve_unlearn.kernels.masked_attention")

TORCH_BACKENDS = ["sdpa_mask", "sdpa_gather", "auto"]  # auto is sdpa_gather on CPU
# (dtype, atol, rtol) against the reference on the same inputs (which computes in fp32 and rounds once)
TOLS = {
    "fp32": (torch.float32, 1e-5, 1e-5),
    "fp16": (torch.float16, 5e-3, 5e-3),
    "bf16": (torch.bfloat16, 4e-2, 2e-2),
}
CASES = ["shared", "per_sample", "query_scale", "nq_ne_nk", "empty_tiles", "strided"]
HEAD_DIMS = [40, 64]
LAMBDA = 0.3  # AE's ss_scale


def _center_fg(side: int) -> torch.Tensor:
    """bool (side*side,): the central square over 25% of a side x side token grid (AE's test mask)."""
    fg = torch.zeros(side, side, dtype=torch.bool)
    fg[side // 4 : side // 4 + side // 2, side // 4 : side // 4 + side // 2] = True
    return fg.flatten()


def _case(name: str, dtype: torch.dtype, head_dim: int, seed: int = 0):
    """(q, k, v, keep, query_scale) for a named case; B=2, H=2, 8x8 tokens unless the case says otherwise.

    ``empty_tiles`` bars keys 0..31 and 48..63 of 80, so 16-key tiles 0, 1 and 3 keep nothing; ``strided``
    gives the (B, N, H, D).transpose(1, 2) views that diffusers' processors pass.
    """
    g = torch.Generator().manual_seed(seed)
    B, H, n_q, n_k = 2, 2, 64, 64
    fg = torch.stack([_center_fg(8), torch.rand(n_k, generator=g) < 0.3])  # per-sample foreground keys
    qs = None
    if name == "shared":
        fg = _center_fg(8).expand(B, -1)
    elif name == "query_scale":
        qs = 1 + (LAMBDA - 1) * fg.float()  # lambda on foreground queries, as AE's similarity suppression
    elif name == "nq_ne_nk":
        n_q, n_k = 40, 72
        fg = torch.rand(B, n_k, generator=g) < 0.4
        qs = torch.rand(B, n_q, generator=g) + 0.2
    elif name == "empty_tiles":
        n_k = 80
        fg = torch.rand(B, n_k, generator=g) < 0.3
        fg[:, :32] = fg[:, 48:64] = True
        qs = torch.where(torch.rand(B, n_q, generator=g) < 0.5, LAMBDA, 1.0)
    elif name == "strided":
        qs = 1 + (LAMBDA - 1) * fg.float()

    def heads(n):
        x = torch.randn(B, n, H, head_dim, generator=g).to(dtype)
        return x.transpose(1, 2) if name == "strided" else x.transpose(1, 2).contiguous()

    q, k, v = heads(n_q), heads(n_k), heads(n_k)
    keep = ~fg.contiguous()
    assert keep.any(dim=1).all()
    return q, k, v, keep, qs


def _two_softmax_select(q, k, v, fg, lam):
    """Attentive Eraser's ASS with similarity suppression as its code computes it (AAS.py), in fp32: two full
    softmaxes with a finfo.min key bias, then a per-row select. Independent of masked_attention."""
    q, k, v = q.float(), k.float(), v.float()
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    bias = torch.zeros(fg.shape).masked_fill(fg, torch.finfo(torch.float32).min)[:, None, None, :]
    out_fg = torch.einsum("bhij,bhjd->bhid", (lam * sim + bias).softmax(-1), v)
    out_bg = torch.einsum("bhij,bhjd->bhid", (sim + bias).softmax(-1), v)
    m = fg.float()[:, None, :, None]  # self-attention: query i is foreground when key i is
    return out_fg * m + out_bg * (1 - m)


def _assert_matches_reference(actual, q, k, v, keep, qs, tol):
    _, atol, rtol = TOLS[tol]
    expected = masked_attention(q, k, v, keep, qs, backend="reference")
    assert actual.dtype == q.dtype and actual.shape == q.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------- torch backends


@pytest.mark.parametrize("tol", list(TOLS))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_backend_matches_reference(backend, case, head_dim, tol):
    q, k, v, keep, qs = _case(case, TOLS[tol][0], head_dim)
    _assert_matches_reference(masked_attention(q, k, v, keep, qs, backend=backend), q, k, v, keep, qs, tol)


@pytest.mark.parametrize("backend", ["reference", *TORCH_BACKENDS])
def test_equals_two_softmax_and_select(backend):
    """One call with queries scaled by 1 + (lambda - 1) m equals AE's two softmaxes and row select."""
    q, k, v, keep, _ = _case("per_sample", torch.float32, 40)
    fg = ~keep
    actual = masked_attention(q, k, v, keep, 1 + (LAMBDA - 1) * fg.float(), backend=backend)
    torch.testing.assert_close(actual, _two_softmax_select(q, k, v, fg, LAMBDA), atol=1e-5, rtol=1e-5)


def test_all_kept_and_no_query_scale_is_plain_attention():
    q, k, v, keep, _ = _case("shared", torch.float32, 64)
    keep = torch.ones_like(keep)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for backend in ["reference", *TORCH_BACKENDS]:
        torch.testing.assert_close(masked_attention(q, k, v, keep, backend=backend), plain)


def test_scale_argument():
    q, k, v, keep, qs = _case("query_scale", torch.float32, 40)
    expected = masked_attention(q * 0.5 * 40**0.5, k, v, keep, qs, backend="reference")  # scale 0.5 folded in
    for backend in ["reference", *TORCH_BACKENDS]:
        actual = masked_attention(q, k, v, keep, qs, backend=backend, scale=0.5)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- errors


def test_empty_keep_rows():
    keep = torch.tensor([[True, False], [False, False], [False, True]])
    assert empty_keep_rows(keep).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="bool"):
        empty_keep_rows(keep.to(torch.uint8))


@pytest.mark.parametrize("backend", list(MASKED_ATTENTION_BACKENDS))
def test_empty_keep_row_raises_naming_the_sample(backend):
    q, k, v, keep, qs = _case("per_sample", torch.float32, 40)
    keep[1] = False
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\].*empty_keep_rows"):
        masked_attention(q, k, v, keep, qs, backend=backend)


def _bad_inputs():
    """(name, mutate(q, k, v, keep, qs) -> args, error match)."""
    return [
        ("3-D q", lambda q, k, v, keep, qs: (q.flatten(0, 1), k, v, keep, qs), "4-D"),
        ("int q", lambda q, k, v, keep, qs: (q.long(), k, v, keep, qs), "float32, float16 or bfloat16"),
        ("dtype mix", lambda q, k, v, keep, qs: (q, k.half(), v, keep, qs), "share dtype"),
        ("batch", lambda q, k, v, keep, qs: (q, k[:1], v[:1], keep, qs), r"k must be \(B, H, N_k, D\)"),
        ("heads", lambda q, k, v, keep, qs: (q, k[:, :1], v[:, :1], keep, qs), r"k must be \(B, H, N_k, D\)"),
        ("head dim", lambda q, k, v, keep, qs: (q, k[..., :8], v[..., :8], keep, qs), r"k must be"),
        ("v", lambda q, k, v, keep, qs: (q, k, v[:, :, :9], keep, qs), "v must have k's shape"),
        ("keep dtype", lambda q, k, v, keep, qs: (q, k, v, keep.to(torch.uint8), qs), "keep must be a bool"),
        ("keep over queries", lambda q, k, v, keep, qs: (q, k, v, keep[:, :40], qs), r"keep must be .*\(2, 72\)"),
        ("keep 3-D", lambda q, k, v, keep, qs: (q, k, v, keep[:, None], qs), "keep must be a bool"),
        ("qs shape", lambda q, k, v, keep, qs: (q, k, v, keep, qs[:, :7]), r"query_scale must be .*\(2, 40\)"),
        ("qs int", lambda q, k, v, keep, qs: (q, k, v, keep, qs.long()), "query_scale must be a float"),
        ("qs float", lambda q, k, v, keep, qs: (q, k, v, keep, 0.3), "got float; .* pass scale="),
    ]


@pytest.mark.parametrize("backend", ["reference", "sdpa_gather", "triton"])
@pytest.mark.parametrize("mutate,match", [b[1:] for b in _bad_inputs()], ids=[b[0] for b in _bad_inputs()])
def test_bad_inputs_raise(backend, mutate, match):
    args = mutate(*_case("nq_ne_nk", torch.float32, 40))
    with pytest.raises(ValueError, match=match):
        masked_attention(*args, backend=backend)


def test_unknown_backend_raises():
    q, k, v, keep, qs = _case("shared", torch.float32, 40)
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_attention(q, k, v, keep, qs, backend="flash")


# --------------------------------------------------------------------------------------------------- dispatch


def test_exports():
    assert ma.masked_attention is masked_attention and ma.empty_keep_rows is empty_keep_rows
    assert ma.MASKED_ATTENTION_BACKENDS is MASKED_ATTENTION_BACKENDS
    assert MASKED_ATTENTION_BACKENDS == ("auto", "reference", "sdpa_mask", "sdpa_gather", "triton")


def test_auto_on_cpu_is_sdpa_gather(monkeypatch):
    calls = []
    real = ma._TORCH_BACKENDS["sdpa_gather"]
    monkeypatch.setitem(ma._TORCH_BACKENDS, "sdpa_gather", lambda *a: calls.append(1) or real(*a))
    q, k, v, keep, qs = _case("per_sample", torch.float32, 40)
    masked_attention(q, k, v, keep, qs)
    assert calls == [1]


def test_explicit_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "is_triton_available", lambda: False)
    q, k, v, keep, qs = _case("shared", torch.float32, 40)
    with pytest.raises(RuntimeError, match="not installed"):
        masked_attention(q, k, v, keep, qs, backend="triton")


@compiled_only
def test_explicit_triton_on_cpu_without_interpreter_raises():
    q, k, v, keep, qs = _case("shared", torch.float32, 40)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|not installed"):
        masked_attention(q, k, v, keep, qs, backend="triton")


# ------------------------------------------------------------------------------------ triton, interpreted


@pytest.fixture(scope="module")
def tri():
    """The kernel module as this process imports it: interpreted under TRITON_INTERPRET=1, else compiled."""
    return kernel_module("masked_attention_triton")


def _tri_small(tri, q, k, v, keep, qs):
    """The kernel with 16 x 16 tiles: 8x8-token inputs span several query and key tiles, some skipped."""
    return tri.masked_attention_triton(q, k, v, keep, qs, q.shape[-1] ** -0.5, block_m=16, block_n=16)


@interp_only
@pytest.mark.parametrize("tol", list(TOLS))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES)
def test_interp_matches_reference(tri, case, head_dim, tol):
    q, k, v, keep, qs = _case(case, TOLS[tol][0], head_dim)
    _assert_matches_reference(_tri_small(tri, q, k, v, keep, qs), q, k, v, keep, qs, tol)


@interp_only
@pytest.mark.parametrize("head_dim", [80, 160])
def test_interp_wide_head_dims(tri, head_dim):
    """SD 1.5's other head dims: BLOCK_D pads 80 -> 128 and 160 -> 256 with masked loads."""
    q, k, v, keep, qs = _case("query_scale", torch.float16, head_dim)
    _assert_matches_reference(_tri_small(tri, q, k, v, keep, qs), q, k, v, keep, qs, "fp16")


@interp_only
def test_interp_equals_two_softmax_and_select(tri):
    q, k, v, keep, _ = _case("per_sample", torch.float32, 40)
    fg = ~keep
    actual = _tri_small(tri, q, k, v, keep, 1 + (LAMBDA - 1) * fg.float())
    torch.testing.assert_close(actual, _two_softmax_select(q, k, v, fg, LAMBDA), atol=1e-5, rtol=1e-5)


@interp_only
def test_interp_never_reads_barred_keys(tri):
    """NaN in every barred key and value (whole skipped tiles and barred keys of partial tiles) stays out of
    the output: the kernel neither loads them nor lets them into the dots."""
    q, k, v, keep, qs = _case("empty_tiles", torch.float32, 40)
    expected = masked_attention(q, k, v, keep, qs, backend="reference")
    poison = (~keep)[:, None, :, None].expand_as(k)
    k_nan, v_nan = k.masked_fill(poison, float("nan")), v.masked_fill(poison, float("nan"))
    torch.testing.assert_close(_tri_small(tri, q, k_nan, v_nan, keep, qs), expected, atol=1e-5, rtol=1e-5)


@interp_only
def test_interp_dispatch_explicit_triton_on_cpu(tri, monkeypatch):
    calls = []
    real = tri.masked_attention_triton
    monkeypatch.setattr(tri, "masked_attention_triton", lambda *a: calls.append(1) or real(*a))
    q, k, v, keep, qs = _case("nq_ne_nk", torch.bfloat16, 40)
    actual = masked_attention(q, k, v, keep, qs, backend="triton")
    assert calls == [1]
    _assert_matches_reference(actual, q, k, v, keep, qs, "bf16")
    masked_attention(q, k, v, keep, qs)  # auto keeps CPU tensors on SDPA, interpreter or not
    assert calls == [1]


@interp_only
def test_interp_explicit_triton_rejects_head_dims_above_256(tri):
    q, k, v, keep, qs = _case("shared", torch.float32, 288)
    with pytest.raises(RuntimeError, match="head dim 288"):
        masked_attention(q, k, v, keep, qs, backend="triton")



# ------------------------------------------------------------------------------------------ triton, compiled


@compiled_only
@needs_triton
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
@pytest.mark.parametrize(
    "dtype,head_dim", [("fp16", 40), ("bf16", 64), ("fp16", 80), ("bf16", 160), ("fp32", 64)], ids=str
)
def test_kernel_compiles_for_sm90(tri, dtype, head_dim):
    """The interpreter accepts code the compiler rejects: build the real kernel for an H100, no GPU needed,
    with the tile sizes the host picks, and check they fit its shared memory (227 KiB per block)."""
    import triton

    block_m, block_n, num_warps, num_stages = tri.block_sizes(head_dim)
    constants = {
        "HAS_QS": True,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
        "DOT_FP32": False,
    }
    signature = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    signature |= {"keep_ptr": "*u8", "qs_ptr": "*fp32"}
    signature |= {f"stride_{t}{d}": "i32" for t in "qkvo" for d in ("b", "h", "m" if t in "qo" else "n", "d")}
    signature |= {"H": "i32", "N_Q": "i32", "N_K": "i32", "D": "i32", "qk_scale": "fp32"}
    signature |= dict.fromkeys(constants, "constexpr")
    compiled = compile_sm90(tri._masked_attention_fwd_kernel, signature, constants, num_warps=num_warps,
                                num_stages=num_stages)
    assert compiled.metadata.shared <= 227 * 1024


@pytest.mark.gpu
@pytest.mark.parametrize("tol", list(TOLS))
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
@pytest.mark.parametrize("backend", ["sdpa_mask", "sdpa_gather", "triton"])
def test_cuda_backends_match_reference(backend, head_dim, tol):
    """SD-sized inputs (64x64 tokens, central 25% barred, lambda on the foreground queries) on the GPU."""
    if backend == "triton" and not kernels.is_triton_available():
        pytest.skip("triton is not installed")
    dtype = TOLS[tol][0]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 4096, head_dim, generator=g).to(dtype).cuda() for _ in range(3))
    fg = torch.stack([_center_fg(64), torch.rand(4096, generator=g) < 0.3]).cuda()
    keep, qs = ~fg, 1 + (LAMBDA - 1) * fg.float()
    _assert_matches_reference(masked_attention(q, k, v, keep, qs, backend=backend), q, k, v, keep, qs, tol)


@pytest.mark.gpu
@needs_triton
def test_auto_on_cuda_is_triton(tri, monkeypatch):
    calls = []
    real = tri.masked_attention_triton
    monkeypatch.setattr(tri, "masked_attention_triton", lambda *a: calls.append(1) or real(*a))
    q, k, v, keep, qs = (t.cuda() if t is not None else t for t in _case("per_sample", torch.float16, 64))
    masked_attention(q, k, v, keep, qs)
    assert calls == [1]
