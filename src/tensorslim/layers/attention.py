"""Low-rank multi-head attention: ``nn.MultiheadAttention`` with factorized q/k/v/out projections.

``nn.MultiheadAttention`` keeps its input projection as one parameter ``in_proj_weight``
(3E × E, or ``q/k/v_proj_weight`` when kdim/vdim differ) and reads ``out_proj.weight`` directly
inside ``F.multi_head_attention_forward``, so none of its matrices is a layer that can be
swapped. :class:`LowRankMultiheadAttention` holds the four projections as modules —
W_q (E × E), W_k (E × kdim), W_v (E × vdim), W_o (E × E), each a rank-r truncated SVD or kept
dense where that would not pay (:mod:`tensorslim.layers.factor`) — and computes what torch
computes after the projections: per head h (head size d = E / heads),
softmax(Q_h K_hᵀ / √d + mask) V_h, heads concatenated, then W_o. The call signature and the
outputs are ``nn.MultiheadAttention``'s (query, key, value, key_padding_mask, need_weights,
attn_mask, average_attn_weights, is_causal; batch_first, bias_k/bias_v, add_zero_attn,
dropout), so a ``TransformerEncoderLayer`` or user code calls it unchanged.

FLOPs: 2 per multiply-add of the projections, 2·rows·r·(in + out) per factorized projection
(rows = B·L for queries and outputs, B·S for keys and values). The attention products Q Kᵀ and
A V are the same before and after compression and are not included (torch's counter does not
see them inside scaled-dot-product attention either).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.decompose.svd import SvdDriver
from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.factor import (
    factor_flops_per_row,
    factor_from_weight,
    factor_skeleton,
    factor_weight,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def attention_projections(
    mha: nn.MultiheadAttention,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(W, b) of the q, k, v and out projections of a torch attention module (views)."""
    if mha._qkv_same_embed_dim:
        weights = list(mha.in_proj_weight.chunk(3))
    else:
        weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
    biases = list(mha.in_proj_bias.chunk(3)) if mha.in_proj_bias is not None else [None] * 3
    return [*zip(weights, biases, strict=True), (mha.out_proj.weight, mha.out_proj.bias)]


def projection_rows(
    input_shape: tuple[int, ...], other_shapes: tuple[tuple[int, ...], ...] = ()
) -> list[int]:
    """Rows the q, k, v, out projections multiply for a query of ``input_shape`` and key/value
    of ``other_shapes`` (self-attention when they are not given)."""
    queries = math.prod(input_shape[:-1])
    keys = math.prod(other_shapes[0][:-1]) if other_shapes else queries
    values = math.prod(other_shapes[1][:-1]) if len(other_shapes) > 1 else keys
    return [queries, keys, values, queries]


class LowRankMultiheadAttention(StructuredLayer):
    """Multi-head attention whose four projections are rank-r factorizations (module docstring)."""

    # no packed in-projection exists; torch's fused encoder path tests these and stays unfused
    in_proj_weight = None
    in_proj_bias = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        rank: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.rank = embed_dim, num_heads, rank
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        widths = (embed_dim, self.kdim, self.vdim, embed_dim)
        for name, width in zip(PROJECTIONS, widths, strict=True):
            setattr(self, name, factor_skeleton(width, embed_dim, rank, bias, **factory))
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    def like(cls, mha: nn.MultiheadAttention, rank: int) -> LowRankMultiheadAttention:
        """An uninitialized layer with ``mha``'s configuration, device and dtype at ``rank``."""
        return cls(
            mha.embed_dim,
            mha.num_heads,
            rank,
            mha.dropout,
            mha.in_proj_bias is not None,
            mha.bias_k is not None,
            mha.add_zero_attn,
            mha.kdim,
            mha.vdim,
            mha.batch_first,
            device=mha.out_proj.weight.device,
            dtype=mha.out_proj.weight.dtype,
        )

    @classmethod
    def from_dense(
        cls, mha: nn.MultiheadAttention, rank: int, driver: SvdDriver = "auto"
    ) -> LowRankMultiheadAttention:
        """Truncated SVD of each projection of ``mha`` at ``rank`` (capped per matrix)."""
        new = cls.like(mha, rank)
        for name, (w, b) in zip(PROJECTIONS, attention_projections(mha), strict=True):
            setattr(new, name, factor_from_weight(w.detach(), b, rank, driver))
        if mha.bias_k is not None:
            with torch.no_grad():
                new.bias_k.copy_(mha.bias_k)
                new.bias_v.copy_(mha.bias_v)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        key_padding_mask, attn_mask, is_causal = _canonical_masks(
            key_padding_mask, attn_mask, is_causal, need_weights, query.dtype
        )
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        out, weights = self._attend(
            q, k, v, key_padding_mask, attn_mask, need_weights, average_attn_weights, is_causal
        )
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        need_weights: bool,
        average: bool,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of projected (L, B, E) queries on (S, B, E) keys/values, then W_o."""
        tgt_len, bsz, _ = q.shape
        heads, dim = self.num_heads, self.head_dim
        attn_mask = _batched_mask(attn_mask, bsz * heads, tgt_len, k.shape[0])
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        q = q.reshape(tgt_len, bsz * heads, dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, dim).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz * heads, 1, dim)], dim=1)
            v = torch.cat([v, v.new_zeros(bsz * heads, 1, dim)], dim=1)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        src_len = k.shape[1]
        if key_padding_mask is not None:
            expanded = key_padding_mask.reshape(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            expanded = expanded.reshape(bsz * heads, 1, src_len)
            attn_mask = expanded if attn_mask is None else attn_mask + expanded
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            if is_causal and attn_mask is None:
                raise RuntimeError("is_causal with need_weights needs the causal attn_mask")
            scores = torch.bmm(q * math.sqrt(1.0 / dim), k.transpose(1, 2))
            weights = torch.softmax(scores if attn_mask is None else scores + attn_mask, dim=-1)
            if dropout > 0:
                weights = F.dropout(weights, dropout)  # torch returns the dropped-out weights
            out = torch.bmm(weights, v)
            out = self.out_proj(out.transpose(0, 1).reshape(tgt_len, bsz, self.embed_dim))
            weights = weights.reshape(bsz, heads, tgt_len, src_len)
            return out, (weights.mean(dim=1) if average else weights)
        if attn_mask is not None:  # (1, L, S) broadcasts; (B·heads, L or 1, S) splits per head
            attn_mask = (
                attn_mask.unsqueeze(0)
                if attn_mask.shape[0] == 1
                else attn_mask.reshape(bsz, heads, -1, src_len)
            )
        out = F.scaled_dot_product_attention(
            q.reshape(bsz, heads, tgt_len, dim),
            k.reshape(bsz, heads, src_len, dim),
            v.reshape(bsz, heads, src_len, dim),
            attn_mask,
            dropout,
            is_causal,
        )
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim)
        return self.out_proj(out), None

    def to_dense(self) -> nn.MultiheadAttention:
        """The torch module with every projection multiplied out."""
        weight = next(self.parameters())
        dense = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            self.dropout,
            self.bias,
            self.bias_k is not None,
            self.add_zero_attn,
            self.kdim,
            self.vdim,
            self.batch_first,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            for (w, b), name in zip(attention_projections(dense), PROJECTIONS, strict=True):
                part = getattr(self, name)
                w.copy_(factor_weight(part))
                if b is not None:
                    b.copy_(part.up.bias if hasattr(part, "up") else part.bias)
            if self.bias_k is not None:
                dense.bias_k.copy_(self.bias_k)
                dense.bias_v.copy_(self.bias_v)
        return dense

    def analytic_flops(
        self, input_shape: tuple[int, ...], other_shapes: tuple[tuple[int, ...], ...] = ()
    ) -> int:
        rows = projection_rows(input_shape, other_shapes)
        parts = [getattr(self, name) for name in PROJECTIONS]
        return sum(n * factor_flops_per_row(p) for n, p in zip(rows, parts, strict=True))

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def extra_repr(self) -> str:
        return f"{self.embed_dim}, heads={self.num_heads}, rank ≤ {self.rank}"


def _canonical_masks(
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    need_weights: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """Masks as additive floats, with torch's rules for the ``is_causal`` hint."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("is_causal is a hint: pass the causal attn_mask as well")
    if is_causal and key_padding_mask is None and not need_weights:
        return None, None, True  # scaled-dot-product attention applies the causal mask itself
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=dtype,
        check_other=False,
    )
    return key_padding_mask, attn_mask, is_causal and key_padding_mask is None


def _batched_mask(
    mask: torch.Tensor | None, batch_heads: int, tgt_len: int, src_len: int
) -> torch.Tensor | None:
    """A 2-D (L, S) mask as (1, L, S); a 3-D mask must be (B·heads, L, S)."""
    if mask is None:
        return None
    expected = (tgt_len, src_len) if mask.dim() == 2 else (batch_heads, tgt_len, src_len)
    if mask.dim() not in (2, 3) or tuple(mask.shape) != expected:
        raise RuntimeError(f"attn_mask has shape {tuple(mask.shape)}, expected {expected}")
    return mask.unsqueeze(0) if mask.dim() == 2 else mask


def _pad_masks(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both masks widened by one attendable key (bias_k/v or the zero attention)."""
    return (
        F.pad(attn_mask, (0, 1)) if attn_mask is not None else None,
        F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None,
    )
