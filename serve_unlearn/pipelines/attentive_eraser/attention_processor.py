"""Self-attention processors for Attentive Eraser's ASS (attention activation and suppression).

The UNet runs the guidance branches as one batch, ``[plain chunks | redirected chunk]``: ``[original |
redirected]`` without CFG, ``[uncond, cond | redirected]`` with it, ``[redirected]`` alone when SARG's scale is 1.
Plain chunks get ordinary attention. In the redirected chunk (while the state says ASS is active), no query may
attend a foreground key, and during the similarity-suppression steps the foreground queries' logits are scaled by
lambda. That is the reference's two-softmax-and-select computed as one attention call (``masked_attention``),
since (lambda q_i) . k_j = lambda (q_i . k_j) and a -inf key bias is attention over the kept keys.

A sample whose token grid is entirely foreground at some level has no key left; there it gets plain attention
(the reference would attend uniformly or produce NaN), with one warning per call.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ...errors import UnsupportedModelError
from ...kernels import masked_attention
from .state import AttentionRedirectionState

logger = logging.getLogger(__name__)


class AttentiveEraserSelfAttnProcessor:
    """ASS for a self-attention (``attn1``) whose batch is ``n_plain`` plain chunks followed by a redirected one.

    ``n_plain`` is 1 for SARG without CFG (``[original | redirected]``) and 0 for the redirected branch alone.
    Every processor of one pipeline call shares ``state``; the pipeline advances it each step.
    """

    n_plain = 1

    def __init__(self, state: AttentionRedirectionState, n_plain: int | None = None):
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError("Attentive Eraser processors need PyTorch 2.0 or newer (scaled_dot_product_attention)")
        self.state = state
        if n_plain is not None:
            self.n_plain = n_plain

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise UnsupportedModelError(
                f"{type(self).__name__} is for mask-free self-attention (attn1); it was given "
                f"{'encoder_hidden_states' if encoder_hidden_states is not None else 'an attention_mask'}: "
                "select only self-attention layers (ae_applied_layers)"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        # one projection GEMM each for the whole batch; heads split as (B, H, N, D), which CPU SDPA needs
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.state.active:
            hidden_states = self._redirect(query, key, value, tokens)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _redirect(self, query, key, value, tokens: int) -> torch.Tensor:
        """Plain attention on the plain chunks, ASS on the redirected (last) chunk."""
        chunk = query.shape[0] // (self.n_plain + 1)
        if chunk * (self.n_plain + 1) != query.shape[0]:
            raise UnsupportedModelError(
                f"batch {query.shape[0]} is not {self.n_plain + 1} equal guidance branches; run this processor "
                "through an Attentive Eraser pipeline"
            )
        level = self.state.level(tokens, query.device, chunk)
        split = self.n_plain * chunk
        q_r, k_r, v_r = query[split:], key[split:], value[split:]
        parts = []
        if split:
            parts.append(F.scaled_dot_product_attention(query[:split], key[:split], value[:split]))
        if level.all_empty:
            parts.append(F.scaled_dot_product_attention(q_r, k_r, v_r))
        elif level.any_empty:  # the samples with no background key at this level attend normally
            out = F.scaled_dot_product_attention(q_r, k_r, v_r)
            ok = level.ok
            out[ok] = masked_attention(q_r[ok], k_r[ok], v_r[ok], level.keep[ok], _rows(level.query_scale, ok),
                                       backend=self.state.backend)
            parts.append(out)
        else:
            parts.append(masked_attention(q_r, k_r, v_r, level.keep, level.query_scale, backend=self.state.backend))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _rows(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[rows]


class AttentiveEraserCFGSelfAttnProcessor(AttentiveEraserSelfAttnProcessor):
    """ASS with classifier-free guidance: the batch is ``[uncond, cond | redirected]``."""

    n_plain = 2
