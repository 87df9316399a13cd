"""Low-rank recurrent layers: ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` with factorized gate matrices.

Every layer k and direction of a torch recurrent module holds two gate matrices,
W_ih (G·H × in_k) and W_hh (G·H × H), with G = 1 (RNN), 4 (LSTM: gates i, f, g, o) or 3 (GRU:
r, z, n), H the hidden size and in_k the input size (layer 0) or D·H (D = 2 when
bidirectional). As the SVD-training authors' SVD_LSTM does, both are factorized by a truncated
SVD, W ≈ U Vᵀ at rank r, each matrix through :mod:`tensorslim.layers.factor` (a matrix whose
factorization would not pay stays dense). The cell math is torch's:

- RNN: h' = tanh(W_ih x + b_ih + W_hh h + b_hh) (or relu);
- LSTM: (i, f, g, o) = W_ih x + b_ih + W_hh h + b_hh; c' = σ(f)c + σ(i)tanh(g); h' = σ(o)tanh(c');
- GRU: (x_r, x_z, x_n) = W_ih x + b_ih, (h_r, h_z, h_n) = W_hh h + b_hh; r = σ(x_r + h_r),
  z = σ(x_z + h_z), n = tanh(x_n + r·h_n); h' = (1 − z)·n + z·h.

The input projections of a whole sequence are one pair of matrix products; the hidden
projection runs per time step. Padded input (T, B, in) / (B, T, in) with ``batch_first``,
unbatched (T, in) and ``PackedSequence`` input are taken, with optional initial states, and the
outputs are torch's (output, h_n) or (output, (h_n, c_n)). FLOPs per input token (row):
Σ over layers and directions of 2·r·(in_k + G·H) + 2·r·(H + G·H) (dense matrices: 2·G·H·in_k,
2·G·H·H); elementwise gate math is not counted. At full rank every matrix is dense and the
layer reproduces the torch module to float tolerance.

Speed: the step loop runs in Python with separate elementwise ops, where torch's CPU LSTM is one
fused kernel. On the shared 2-core machine (load ≈ 15), for a 256 → 512 LSTM on 16 × 32 tokens,
one thread: torch 43 ms; this layer with every matrix dense 119 ms, at rank 64 37 ms. So it pays
only at low ranks; ``export --merge`` (``merge_slow_layers``) folds a slower layer back to dense.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from tensorslim.decompose.svd import SvdDriver
from tensorslim.errors import TensorslimError
from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.factor import (
    factor_flops_per_row,
    factor_from_weight,
    factor_skeleton,
    factor_weight,
)

GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}
RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)


def unsupported_rnn_reason(module: nn.RNNBase) -> str | None:
    """Why a recurrent module cannot be factorized, or None if it can."""
    if module.mode not in GATES:
        return f"recurrent mode {module.mode} is unknown: kept dense"
    if getattr(module, "proj_size", 0):
        return "LSTM with proj_size > 0 is kept dense (its projection is not factorized yet)"
    return None


def gate_matrices(module: nn.RNNBase) -> list[torch.Tensor]:
    """W_ih and W_hh of every layer and direction, in torch's order (l0, l0_reverse, l1, …)."""
    return [w for name, w in module.named_parameters() if name.startswith("weight_")]


def dense_rnn_flops(module: nn.RNNBase, input_shape: tuple[int, ...]) -> int:
    """FLOPs of a torch recurrent module: every weight matrix multiplies one row per token."""
    tokens = math.prod(input_shape[:-1])
    return 2 * tokens * sum(w.shape[0] * w.shape[1] for w in gate_matrices(module))


class GateMatrices(nn.Module):
    """The two (possibly factorized) gate matrices of one layer and direction."""

    def __init__(self, ih: nn.Module, hh: nn.Module) -> None:
        super().__init__()
        self.ih, self.hh = ih, hh


class LowRankRNN(StructuredLayer):
    """A recurrent module (``mode`` RNN_TANH, RNN_RELU, LSTM or GRU) with rank-r gate matrices.

    It keeps the torch module's public attributes (``input_size``, ``hidden_size``,
    ``num_layers``, ``batch_first``, ``bidirectional``, ``dropout``, ``proj_size``) and accepts
    ``flatten_parameters()``, so code written against the torch module keeps working.
    """

    proj_size = 0  # an LSTM with a projection stays dense (unsupported_rnn_reason)

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        rank: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in GATES:
            raise TensorslimError(f"unknown recurrent mode {mode!r}: use {', '.join(GATES)}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise TensorslimError(f"rank {rank!r} of a recurrent layer must be a positive integer")
        self.mode, self.rank = mode, rank
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.bias, self.batch_first = num_layers, bias, batch_first
        self.dropout, self.bidirectional = float(dropout), bidirectional
        self.directions = 2 if bidirectional else 1
        gates = GATES[mode] * hidden_size
        factory = {"device": device, "dtype": dtype}
        self.cells = nn.ModuleList()
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * self.directions
            for _ in range(self.directions):
                ih = factor_skeleton(width, gates, rank, bias, **factory)
                hh = factor_skeleton(hidden_size, gates, rank, bias, **factory)
                self.cells.append(GateMatrices(ih, hh))

    @classmethod
    def like(cls, module: nn.RNNBase, rank: int) -> LowRankRNN:
        """An uninitialized layer with ``module``'s configuration, device and dtype at ``rank``."""
        weight = gate_matrices(module)[0]
        return cls(
            module.mode,
            module.input_size,
            module.hidden_size,
            rank,
            module.num_layers,
            module.bias,
            module.batch_first,
            module.dropout,
            module.bidirectional,
            device=weight.device,
            dtype=weight.dtype,
        )

    @classmethod
    def from_dense(cls, module: nn.RNNBase, rank: int, driver: SvdDriver = "auto") -> LowRankRNN:
        """Truncated SVD of every gate matrix of ``module`` at ``rank`` (capped per matrix)."""
        reason = unsupported_rnn_reason(module)
        if reason is not None:
            raise TensorslimError(f"cannot factorize this {type(module).__name__}: {reason}")
        new = cls.like(module, rank)
        for index, cell in enumerate(new.cells):
            suffix = _suffix(index, new.directions)
            for kind in ("ih", "hh"):
                w = getattr(module, f"weight_{kind}{suffix}")
                b = getattr(module, f"bias_{kind}{suffix}") if module.bias else None
                setattr(cell, kind, factor_from_weight(w, b, rank, driver))
        return new

    def forward(
        self, input: torch.Tensor | PackedSequence, hx: Any = None
    ) -> tuple[torch.Tensor | PackedSequence, Any]:
        rows, steps, layout = self._rows(input)
        h0, c0 = self._initial_state(hx, steps[0] if steps else 0, rows, layout)
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                index = layer * self.directions + direction
                state = (h0[index], c0[index] if c0 is not None else None)
                out, (h, c) = self._run(self.cells[index], rows, steps, state, direction == 1)
                outputs.append(out)
                finals_h.append(h)
                finals_c.append(c)
            rows = torch.cat(outputs, dim=1) if self.directions == 2 else outputs[0]
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                rows = F.dropout(rows, self.dropout, training=True)
        h_n = torch.stack(finals_h)
        c_n = torch.stack(finals_c) if self.mode == "LSTM" else None
        return self._outputs(rows, h_n, c_n, layout)

    def flatten_parameters(self) -> None:
        """No-op: there is no fused weight buffer to compact (torch modules need it for cuDNN)."""

    def _rows(self, input: torch.Tensor | PackedSequence) -> tuple[torch.Tensor, list[int], dict]:
        """Time-major rows (Σ_t B_t, in) and the batch size B_t of every step."""
        if isinstance(input, PackedSequence):
            layout = {"packed": input}
            return input.data, input.batch_sizes.tolist(), layout
        if input.dim() not in (2, 3):
            raise TensorslimError(
                f"a recurrent layer takes (T, B, in), (B, T, in) or (T, in) input, got "
                f"{tuple(input.shape)}"
            )
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if self.batch_first and batched:
            x = x.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        layout = {"batched": batched, "steps": steps, "batch": batch}
        return x.reshape(steps * batch, x.shape[2]), [batch] * steps, layout

    def _initial_state(
        self, hx: Any, batch: int, rows: torch.Tensor, layout: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h0, c0) as (L·D, B, H) in the rows' batch order (c0 only for an LSTM)."""
        shape = (self.num_layers * self.directions, batch, self.hidden_size)
        if hx is None:
            zeros = torch.zeros(shape, dtype=rows.dtype, device=rows.device)
            return zeros, (zeros if self.mode == "LSTM" else None)
        h0, c0 = hx if self.mode == "LSTM" else (hx, None)
        if not layout.get("batched", True):
            h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
        packed = layout.get("packed")
        if packed is not None and packed.sorted_indices is not None:
            order = packed.sorted_indices
            h0 = h0.index_select(1, order)
            c0 = c0.index_select(1, order) if c0 is not None else None
        if tuple(h0.shape) != shape:
            raise TensorslimError(
                f"initial hidden state has shape {tuple(h0.shape)}, expected {shape}"
            )
        return h0, c0

    def _run(
        self,
        cell: GateMatrices,
        rows: torch.Tensor,
        steps: list[int],
        state: tuple[torch.Tensor, torch.Tensor | None],
        reverse: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
        """One direction over all steps; step t updates the first B_t sequences (packed order)."""
        projected = cell.ih(rows)  # the whole sequence's input projection at once
        starts = [0]
        for size in steps[:-1]:
            starts.append(starts[-1] + size)
        h, c = state
        outputs: list[torch.Tensor] = [rows.new_empty(0)] * len(steps)
        for t in reversed(range(len(steps))) if reverse else range(len(steps)):
            size = steps[t]
            x_part = projected[starts[t] : starts[t] + size]
            c_part = c[:size] if c is not None else None
            h_new, c_new = self._cell(x_part, cell.hh(h[:size]), h[:size], c_part)
            h = h_new if size == h.shape[0] else torch.cat([h_new, h[size:]])
            if c is not None and c_new is not None:
                c = c_new if size == c.shape[0] else torch.cat([c_new, c[size:]])
            outputs[t] = h_new
        return torch.cat(outputs), (h, c)

    def _cell(
        self, gx: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step of torch's cell math (module docstring) from the two gate projections."""
        if self.mode == "LSTM":
            i, f, g, o = (gx + gh).chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c_new), c_new
        if self.mode == "GRU":
            xr, xz, xn = gx.chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return (1 - z) * n + z * h, None
        act = torch.tanh if self.mode == "RNN_TANH" else torch.relu
        return act(gx + gh), None

    def _outputs(
        self, rows: torch.Tensor, h_n: torch.Tensor, c_n: torch.Tensor | None, layout: dict
    ) -> tuple[torch.Tensor | PackedSequence, Any]:
        """torch's output structure: output in the input's layout, states in the input order."""
        packed = layout.get("packed")
        if packed is not None:
            output: torch.Tensor | PackedSequence = PackedSequence(
                rows, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
            )
            if packed.unsorted_indices is not None:
                h_n = h_n.index_select(1, packed.unsorted_indices)
                c_n = c_n.index_select(1, packed.unsorted_indices) if c_n is not None else None
        else:
            output = rows.reshape(layout["steps"], layout["batch"], rows.shape[1])
            if not layout["batched"]:
                output, h_n = output.squeeze(1), h_n.squeeze(1)
                c_n = c_n.squeeze(1) if c_n is not None else None
            elif self.batch_first:
                output = output.transpose(0, 1)
        return output, ((h_n, c_n) if self.mode == "LSTM" else h_n)

    def to_dense(self) -> nn.RNNBase:
        """The torch module with every gate matrix multiplied out."""
        weight = next(self.parameters())
        kind = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(self.mode, nn.RNN)
        extra = {}
        if kind is nn.RNN:
            extra["nonlinearity"] = "relu" if self.mode == "RNN_RELU" else "tanh"
        dense = kind(
            self.input_size,
            self.hidden_size,
            self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            device=weight.device,
            dtype=weight.dtype,
            **extra,
        )
        with torch.no_grad():
            for index, cell in enumerate(self.cells):
                suffix = _suffix(index, self.directions)
                for name in ("ih", "hh"):
                    part = getattr(cell, name)
                    getattr(dense, f"weight_{name}{suffix}").copy_(factor_weight(part))
                    bias = part.up.bias if hasattr(part, "up") else part.bias
                    if self.bias:
                        getattr(dense, f"bias_{name}{suffix}").copy_(bias)
        return dense

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        tokens = math.prod(input_shape[:-1])
        per_row = sum(factor_flops_per_row(c.ih) + factor_flops_per_row(c.hh) for c in self.cells)
        return tokens * per_row

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def extra_repr(self) -> str:
        layers = f", {self.num_layers} layers" if self.num_layers > 1 else ""
        both = ", bidirectional" if self.bidirectional else ""
        sizes = f"{self.input_size} → {self.hidden_size}"
        return f"{self.mode} {sizes}, rank ≤ {self.rank}{layers}{both}"


def _suffix(index: int, directions: int) -> str:
    """torch's parameter suffix of cell ``index``: _l{layer} and _reverse for direction 1."""
    layer, direction = divmod(index, directions)
    return f"_l{layer}" + ("_reverse" if direction else "")
