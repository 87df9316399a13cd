"""Calibration: streaming statistics of the activations each layer sees on real batches.

``collect_statistics(model, loader, layers, needs)`` runs up to ``batches`` loader batches once,
with a forward hook on every requested layer, and accumulates in float64 what the methods asked
for (see :class:`tensorslim.facts.LayerStats` for the definitions): the input Gram XᵀX, the mean
|x| and mean x² per input column, the output energy, and — when a ``loss_fn`` is given — the
squared gradient of each layer's weight (the Fisher diagonal, one squared gradient per batch) and
the squared gradient of the loss with respect to each layer's output (its sensitivity).

Memory is bounded by the layers, not by the data: nothing keeps an activation after its hook
returns, and a conv's unfolded patches are processed a slice of the batch at a time. Without the
Fisher request the pass runs under ``torch.no_grad``.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tensorslim.errors import TensorslimError
from tensorslim.facts import LayerStats
from tensorslim.inputs import ForwardFn, call_on_batch, model_device, to_device
from tensorslim.layers.linear_like import is_linear_like, is_transposed_linear

GRAM = "gram"
ABS_MEAN = "abs_mean"
SQ_MEAN = "sq_mean"
OUTPUT_ENERGY = "output_energy"
FISHER = "fisher"
SENSITIVITY = "sensitivity"
STATISTICS = frozenset({GRAM, ABS_MEAN, SQ_MEAN, OUTPUT_ENERGY, FISHER, SENSITIVITY})
# statistics that need a loss and a backward pass per batch
GRADIENT_STATISTICS = frozenset({FISHER, SENSITIVITY})
# rows × columns of float64 handled at once: bounds the transient unfold of a conv input (32 MB)
CHUNK_ELEMENTS = 1 << 22

LossFn = Callable[[Any, Any], torch.Tensor]


def check_needs(needs: Collection[str]) -> frozenset[str]:
    """``needs`` as a frozenset, or a clear error naming the unknown statistic."""
    unknown = sorted(set(needs) - STATISTICS)
    if unknown:
        known = ", ".join(sorted(STATISTICS))
        raise TensorslimError(f"unknown calibration statistic {unknown[0]!r}: known are {known}")
    return frozenset(needs)


def input_rows(module: nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The rows the layer's weight matrix multiplies, in float64 chunks of (rows, d).

    Linear: every token of ``x`` (…, in). Conv2d: every unfolded patch (c·kh·kw), with the
    conv's own padding (mode included), stride and dilation, so that output = M · row. Conv1d:
    the same with a height-1 patch (c·k), unfolded as a (1 × k) kernel over (B, c, 1, L).
    """
    if is_linear_like(module):
        flat = x.detach().reshape(-1, x.shape[-1])
        step = max(1, CHUNK_ELEMENTS // flat.shape[1])
        for start in range(0, flat.shape[0], step):
            yield flat[start : start + step].double()
        return
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        x = _padded_conv_input(module, x.detach())
        one_d = isinstance(module, nn.Conv1d)
        if one_d:  # a 1-D conv is a 2-D conv of height 1
            x = x.unsqueeze(-2)
        kernel, stride, dilation = (
            ((1, *module.kernel_size), (1, *module.stride), (1, *module.dilation))
            if one_d
            else (module.kernel_size, module.stride, module.dilation)
        )
        positions = _positions(module, x.shape[-len(module.kernel_size) :])
        per_sample = module.in_channels * math.prod(kernel) * positions
        step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
        for start in range(0, x.shape[0], step):
            patches = F.unfold(
                x[start : start + step].double(), kernel, dilation=dilation, stride=stride
            )  # (b, c·kh·kw, L)
            yield patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return
    raise TensorslimError(
        f"calibration covers Linear, Conv1d and Conv2d layers, not {type(module).__name__}"
    )


def has_input_rows(module: nn.Module) -> bool:
    """Whether :func:`input_rows` defines the rows ``module``'s weight multiplies.

    Composite layers (attention, recurrent) multiply several matrices by inputs that partly
    arise inside them (the hidden state, the attention output), so they have no single Gram.
    """
    return is_linear_like(module) or isinstance(module, (nn.Conv1d, nn.Conv2d))


def _padded_conv_input(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded exactly as ``conv`` pads it (zeros, reflect, …; 'same' and 'valid' too)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x
        pads: list[int] = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, pads, mode=mode)
    if not any(conv.padding):
        return x
    pads = [p for p in reversed(conv.padding) for _ in range(2)]  # (left, right) last dim first
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode)


def _positions(conv: nn.Conv1d | nn.Conv2d, hw: torch.Size) -> int:
    out = 1
    for size, k, s, d in zip(hw, conv.kernel_size, conv.stride, conv.dilation, strict=True):
        out *= (size - d * (k - 1) - 1) // s + 1
    return out


class _Accumulator:
    """Running sums for one layer (all calls of a shared layer add up)."""

    def __init__(self, module: nn.Module, needs: frozenset[str]) -> None:
        self.module, self.needs = module, needs
        self.stats = LayerStats()
        self._abs: torch.Tensor | None = None
        self._sq: torch.Tensor | None = None

    def add_call(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if SENSITIVITY in self.needs and y.requires_grad:
            y.register_hook(self._add_output_gradient)
        if self.needs & {GRAM, ABS_MEAN, SQ_MEAN}:
            for rows in input_rows(self.module, x):
                self._add_rows(rows)
        if OUTPUT_ENERGY in self.needs:
            energy = float(y.detach().double().pow(2).sum())
            self.stats.output_energy = (self.stats.output_energy or 0.0) + energy

    def _add_rows(self, rows: torch.Tensor) -> None:
        s = self.stats
        s.rows += rows.shape[0]
        if GRAM in self.needs:
            gram = rows.T @ rows
            s.gram = gram if s.gram is None else s.gram.add_(gram)
        if ABS_MEAN in self.needs:
            part = rows.abs().sum(0)
            self._abs = part if self._abs is None else self._abs.add_(part)
        if SQ_MEAN in self.needs:
            part = rows.pow(2).sum(0)
            self._sq = part if self._sq is None else self._sq.add_(part)

    def _add_output_gradient(self, grad: torch.Tensor) -> None:
        """Σ ‖∂loss/∂y‖² over the layer's calls and batches (``LayerStats.sensitivity``)."""
        energy = float(grad.detach().double().pow(2).sum())
        self.stats.sensitivity = (self.stats.sensitivity or 0.0) + energy

    def add_fisher(self) -> None:
        grad = getattr(self.module, "weight", None)
        grad = grad.grad if grad is not None else None
        if grad is None:
            return
        if is_transposed_linear(self.module):
            grad = grad.t()  # the (out, in) orientation of linear_weight, like every Linear
        square = grad.detach().double().pow(2)
        s = self.stats
        s.fisher = square if s.fisher is None else s.fisher.add_(square)

    def finish(self) -> LayerStats:
        s = self.stats
        rows = max(1, s.rows)
        if self._abs is not None:
            s.abs_mean = self._abs / rows
        if self._sq is not None:
            s.sq_mean = self._sq / rows
        return s


def collect_statistics(
    model: nn.Module,
    loader: Iterable,
    layers: Mapping[str, nn.Module],
    needs: Collection[str],
    *,
    batches: int | None = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Statistics per fqn of ``layers`` over the first ``batches`` batches of ``loader``.

    ``loss_fn(output, batch)`` is required for the ``"fisher"`` and ``"sensitivity"``
    statistics. Batches take any structure :mod:`tensorslim.inputs` accepts; ``forward_fn(model,
    batch)`` covers the rest. The model is run in eval mode and left in the mode it had.
    """
    needs = check_needs(needs)
    if needs & GRADIENT_STATISTICS and loss_fn is None:
        which = "Fisher" if FISHER in needs else "sensitivity"
        raise TensorslimError(f"the {which} statistic needs a loss: pass loss_fn(output, batch)")
    if batches is not None and batches < 1:
        raise TensorslimError(f"calibration_batches must be ≥ 1, got {batches}")
    accumulators = _attach(layers, needs)
    handles = [
        acc.module.register_forward_hook(_hook(acc))
        for acc in {id(a): a for a in accumulators.values()}.values()
    ]
    was_training = model.training
    model.eval()
    try:
        used = _run_batches(
            model, loader, accumulators, needs, batches, loss_fn, forward_fn, progress
        )
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
        if needs & GRADIENT_STATISTICS:
            model.zero_grad(set_to_none=True)
    if used == 0:
        raise TensorslimError("the calibration loader yielded no batch")
    results = {fqn: acc.finish() for fqn, acc in accumulators.items()}
    for stats in results.values():
        stats.batches = used
    return results


def _attach(layers: Mapping[str, nn.Module], needs: frozenset[str]) -> dict[str, _Accumulator]:
    """One accumulator per distinct module; a shared module's names share its accumulator."""
    by_module: dict[int, _Accumulator] = {}
    result = {}
    for fqn, module in layers.items():
        if id(module) not in by_module:
            by_module[id(module)] = _Accumulator(module, needs)
        result[fqn] = by_module[id(module)]
    return result


def _hook(acc: _Accumulator):  # type: ignore[no-untyped-def]
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            with torch.no_grad():
                acc.add_call(args[0], output)

    return hook


def _run_batches(
    model: nn.Module,
    loader: Iterable,
    accumulators: dict[str, _Accumulator],
    needs: frozenset[str],
    batches: int | None,
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
    progress: bool,
) -> int:
    device = model_device(model)
    total = batches if batches is not None else _length(loader)
    bar = tqdm(total=total, desc="calibrate", disable=not progress, leave=False, file=sys.stderr)
    distinct = list({id(a): a for a in accumulators.values()}.values())
    used = 0
    for batch in itertools.islice(loader, batches):
        batch = to_device(batch, device)
        if needs & GRADIENT_STATISTICS:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(call_on_batch(model, batch, forward_fn), batch)  # type: ignore[misc]
                _check_loss(loss, used)
                loss.backward()
            for acc in distinct if FISHER in needs else ():
                acc.add_fisher()
        else:
            with torch.no_grad():
                call_on_batch(model, batch, forward_fn)
        used += 1
        bar.update(1)
    bar.close()
    return used


def _check_loss(loss: Any, index: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TensorslimError("loss_fn(output, batch) must return a scalar tensor")
    if not math.isfinite(float(loss.detach())):
        raise TensorslimError(f"the calibration loss is {float(loss.detach())} on batch {index}")


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
