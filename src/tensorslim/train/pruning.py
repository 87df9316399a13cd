"""Gradual unstructured pruning during training: schedules, global magnitude ranking,
prune-and-regrow, and the :class:`PruningHook` that runs GMP, RigL and RPG in any training loop.

Sparsity schedules (t the training step, pruning from step t₀ = ``start`` to ``end`` every ΔT =
``interval`` steps, s_i → s_f):

- cubic (Zhu & Gupta 2017): s_t = s_f + (s_i − s_f)·(1 − (t − t₀)/(end − t₀))³;
- exponential: the remaining density decays geometrically, d_t = d_i·(d_f/d_i)^((t − t₀)/(end −
  t₀)) with d = 1 − s (for s_i = 0 this is D^(step/N), D = d_f);
- constant: s_t = s_f from t₀ on (one-shot pruning, then RigL's constant-sparsity regrowth).

At every update step t ∈ {t₀, t₀ + ΔT, …} ∪ {end}:

1. **global magnitude ranking**: over all ranked layers together, keep the ⌊(1 − s_t)·N⌉ active
   weights of largest |w| (one threshold for the whole network; each layer's sparsity is read
   back from it). ``scope="layer"`` (or ``"uniform"``) applies s_t to every layer separately
   instead, ``scope="erk"`` gives each layer its Erdős–Rényi-kernel share
   (:mod:`tensorslim.train.sparsity_distribution`);
2. **prune and regrow** (RigL, Evci et al. 2020), if ``drop_fraction`` α > 0: in each layer drop
   the fraction α_t = α/2·(1 + cos(π·t/T_end)) of its active weights with the smallest |w| and
   regrow as many where the *dense* gradient |∂L/∂W| is largest among the inactive positions.
   Newly grown weights start at zero and their optimizer state (momentum, Adam moments) is
   cleared; a weight dropped and regrown in the same update keeps its value (as in the official
   RigL / RPG code). **The optimizer does not step on a regrowth step** (the official codes'
   ``if pruner(): optimizer.step()``): that step's gradient only scores the regrowth, so the
   parameters change there only through the new mask;
3. with a rank loss (RPG, Tian et al. 2023), the gradient that scores regrowth is that of
   task + λ·L_rank, so regrowth prefers positions that raise the rank of the sparse weight. As
   in the official code the rank loss covers every convolution (the first included, even when it
   is kept dense) and no Linear layer (``rank_loss_layers="conv"``; a model without convolutions
   falls back to its pruned layers with a warning; ``"pruned"`` = the ranked layers).

Under DistributedDataParallel the dense gradients are all-reduced (averaged) before scoring, so
every process computes the same mask from the same numbers.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tensorslim.analysis.delta_rank import DEFAULT_DELTA, average_delta_rank, layer_delta_ranks
from tensorslim.errors import TensorslimError
from tensorslim.layers.sparse import (
    PRUNABLE_TYPES,
    add_mask,
    mask_of,
    masked_modules,
    original_weight,
    prunable_modules,
)
from tensorslim.train.distributed import is_distributed, world_size
from tensorslim.train.hooks import TrainHook, unwrap
from tensorslim.train.rank_loss import adversarial_rank_loss
from tensorslim.train.sparsity_distribution import DISTRIBUTIONS, erk_densities, layer_sparsities

SCHEDULE_KINDS = ("cubic", "exponential", "constant")
SCOPES = DISTRIBUTIONS
RANK_LOSS_LAYERS = ("conv", "pruned")
# Number of mask updates aimed at when the interval ΔT is not given.
AUTO_UPDATES = 25


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """``value`` as a float in [0, 1), else a TensorslimError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise TensorslimError(
            f"{what} must be in [0, 1) (0.9 keeps 10 % of the weights), got {value!r}"
        )
    return float(value)


@dataclass(frozen=True)
class SparsitySchedule:
    """Target sparsity per step, in absolute training steps (see the module docstring)."""

    final_sparsity: float
    start: int
    end: int
    interval: int
    initial_sparsity: float = 0.0
    kind: str = "cubic"

    def __post_init__(self) -> None:
        check_sparsity(self.final_sparsity, "final sparsity")
        check_sparsity(self.initial_sparsity, "initial sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise TensorslimError(
                f"initial sparsity {self.initial_sparsity} exceeds the final {self.final_sparsity}"
            )
        if self.kind not in SCHEDULE_KINDS:
            raise TensorslimError(
                f"unknown sparsity schedule '{self.kind}': use {', '.join(SCHEDULE_KINDS)}"
            )
        if (
            isinstance(self.interval, bool)
            or not isinstance(self.interval, int)
            or (self.interval <= 0)
        ):
            raise TensorslimError(
                f"the update interval ΔT must be a positive number of steps, got {self.interval!r}"
            )
        if not isinstance(self.start, int) or not isinstance(self.end, int) or self.start < 0:
            raise TensorslimError(
                f"schedule start/end must be steps ≥ 0, got {self.start}, {self.end}"
            )
        if self.end < self.start:
            raise TensorslimError(
                f"the schedule ends (step {self.end}) before it starts ({self.start})"
            )

    def sparsity_at(self, step: int) -> float:
        """s_t: the target sparsity at training step ``step``."""
        if step < self.start:
            return self.initial_sparsity
        if self.kind == "constant" or step >= self.end:
            return self.final_sparsity
        progress = (step - self.start) / (self.end - self.start)
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        if self.kind == "cubic":
            # = s_f + (s_i − s_f)(1 − p)³, written to be exactly s_i at p = 0
            return s_i + (s_f - s_i) * (1.0 - (1.0 - progress) ** 3)
        d_i, d_f = 1.0 - s_i, 1.0 - s_f
        return 1.0 - d_i * (d_f / d_i) ** progress

    def is_update_step(self, step: int) -> bool:
        """True at t₀, t₀ + ΔT, … up to ``end``, and at ``end`` itself."""
        if step < self.start or step > self.end:
            return False
        return (step - self.start) % self.interval == 0 or step == self.end

    def update_steps(self) -> list[int]:
        steps = list(range(self.start, self.end + 1, self.interval))
        if steps[-1] != self.end:
            steps.append(self.end)
        return steps

    def check_fits(self, total_steps: int) -> None:
        """Raise if the schedule needs steps beyond the ``total_steps`` of the training run."""
        if self.end > total_steps - 1:
            raise TensorslimError(
                f"the pruning schedule ends at step {self.end} but training has only "
                f"{total_steps} steps (last step {total_steps - 1}): end earlier or train longer"
            )


def cosine_drop_fraction(step: int, alpha: float, t_end: int) -> float:
    """RigL's drop fraction α/2·(1 + cos(π·t/T_end)); 0 from T_end on."""
    if step >= t_end:
        return 0.0
    return 0.5 * alpha * (1.0 + math.cos(math.pi * step / t_end))


def global_magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    sparsity: float,
) -> dict[str, torch.Tensor]:
    """New 0/1 masks keeping the ⌊(1 − sparsity)·N⌉ largest |w| over all layers together.

    ``weights`` are the trained values (``original``), ``masks`` the current masks; an inactive
    position ranks below every active one, so pruning never revives a weight (unless the target
    asks for more weights than are active, when the earliest-listed inactive ones return).
    Returns masks with the masks' dtype.
    """
    check_sparsity(sparsity)
    names = list(weights)
    scores = []
    for name in names:
        w, m = weights[name].detach(), masks[name]
        scores.append(torch.where(m > 0, w.abs(), torch.full_like(w, -1.0)).reshape(-1))
    flat = torch.cat(scores)
    total = flat.numel()
    keep = total - round(sparsity * total)
    new_flat = torch.zeros(total, dtype=torch.bool, device=flat.device)
    if keep > 0:
        new_flat[torch.topk(flat, keep, sorted=False).indices] = True
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in names:
        n = masks[name].numel()
        out[name] = new_flat[offset : offset + n].reshape(masks[name].shape).to(masks[name].dtype)
        offset += n
    return out


def layer_magnitude_mask(weight: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The mask of one layer pruned to ``sparsity`` by magnitude on its own."""
    return global_magnitude_masks({"w": weight}, {"w": mask}, sparsity)["w"]


def drop_and_regrow(
    weight: torch.Tensor, mask: torch.Tensor, score: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RigL's update of one layer: (new mask, bool tensor of the regrown positions).

    Drops n = ⌊fraction·active⌋ active weights of smallest |weight|, then activates n positions of
    largest ``score`` (|dense gradient|) among those inactive after the drop (a just-dropped
    position may come back; it then restarts at zero like every regrown weight).
    """
    if not 0.0 <= fraction <= 1.0:
        raise TensorslimError(f"drop fraction must be in [0, 1], got {fraction}")
    active = (mask > 0).reshape(-1)
    n = int(fraction * int(active.sum()))
    grown = torch.zeros_like(active)
    if n == 0:
        return mask.clone(), grown.reshape(mask.shape)
    magnitude = torch.where(active, weight.detach().abs().reshape(-1), math.inf)
    dropped = torch.topk(magnitude, n, largest=False, sorted=False).indices
    kept = active.clone()
    kept[dropped] = False
    candidates = torch.where(kept, -math.inf, score.detach().abs().reshape(-1).to(magnitude.dtype))
    grown[torch.topk(candidates, n, largest=True, sorted=False).indices] = True
    new = (kept | grown).reshape(mask.shape).to(mask.dtype)
    return new, grown.reshape(mask.shape)


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer | None, param: torch.Tensor, positions: torch.Tensor
) -> None:
    """Zero each per-element optimizer state of ``param`` (momentum, Adam moments) at
    ``positions``."""
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(positions, 0)


def add_masks(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> list[str]:
    """Put an all-ones mask on every Linear / Conv2d of ``model`` (or the named ``layers``, or
    those ``filter_fn(module, fqn)`` accepts) that has none; returns the masked fqns.

    Call it before creating the optimizer and before wrapping the model in DDP, so both see the
    final parameter order and buffers (a resumed run then restores the optimizer state exactly).
    """
    named = dict(unwrap(model).named_modules())
    if layers is not None:
        missing = [n for n in layers if n not in named]
        if missing:
            raise TensorslimError(f"add_masks: the model has no layer named {missing[0]!r}")
        chosen = [(n, named[n]) for n in layers]
    else:
        chosen = list(prunable_modules(unwrap(model)))
    masked = []
    for name, module in chosen:
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if mask_of(module) is None:
            add_mask(module, name=name)
        masked.append(name)
    return masked


def _first_conv_and_classifier(
    modules: Sequence[tuple[str, nn.Module]],
) -> tuple[str | None, str | None]:
    first = next((n for n, m in modules if isinstance(m, nn.Conv2d)), None)
    last = next((n for n, m in reversed(modules) if isinstance(m, nn.Linear)), None)
    return first, last


def _check_choices(
    drop_fraction: float,
    rank_weight: float,
    partial_k: float,
    scope: str,
    rank_loss_layers: str,
    delta: float,
) -> None:
    """One-line errors for the regrowth, rank-loss and reporting settings of the hook."""
    if not 0.0 <= drop_fraction <= 1.0:
        raise TensorslimError(f"drop_fraction α must be in [0, 1], got {drop_fraction}")
    if rank_weight < 0:
        raise TensorslimError(f"rank_weight λ must be ≥ 0, got {rank_weight}")
    if not 0.0 <= partial_k <= 1.0:
        raise TensorslimError(f"partial_k must be in [0, 1], got {partial_k}")
    if scope not in SCOPES:
        raise TensorslimError(f"unknown pruning scope '{scope}': use {', '.join(SCOPES)}")
    if rank_loss_layers not in RANK_LOSS_LAYERS:
        raise TensorslimError(
            f"unknown rank_loss_layers '{rank_loss_layers}': use {', '.join(RANK_LOSS_LAYERS)}"
        )
    if not 0.0 <= delta < 1.0:
        raise TensorslimError(f"δ must be in [0, 1), got {delta}")


class PruningHook(TrainHook):
    """Gradual magnitude pruning with optional prune-and-regrow and adversarial rank loss.

    - GMP: ``schedule="cubic"``, ``drop_fraction=0``, ``rank_weight=0``;
    - RigL (from a trained model): ``schedule="constant"``, ``drop_fraction=0.3``;
    - RPG: ``schedule="cubic"``, ``drop_fraction=0.3``, ``rank_weight=λ > 0``.

    ``start``/``end`` are fractions of the training steps (resolved when training begins);
    ``steps`` gives an absolute :class:`SparsitySchedule` instead. ``interval`` is ΔT in steps
    (default: about :data:`AUTO_UPDATES` updates). The layers must carry masks already
    (:func:`add_masks`, or ``apply`` of a gmp/rigl/rpg plan); ``layers`` names the ones to prune
    (default: every masked layer). ``keep_first_dense`` leaves the first Conv2d and
    ``keep_last_dense`` the last Linear out of the ranking (their masks stay all ones).
    ``scope`` spreads the sparsity (global, layer/uniform, erk); ``rank_loss_layers`` picks the
    rank loss's layers ("conv": every masked Conv2d, as in RPG's code; "pruned").
    """

    def __init__(
        self,
        final_sparsity: float,
        *,
        schedule: str = "cubic",
        start: float = 0.0,
        end: float = 0.75,
        interval: int | None = None,
        initial_sparsity: float = 0.0,
        drop_fraction: float = 0.0,
        rank_weight: float = 0.0,
        partial_k: float = 0.1,
        rank_loss_every_step: bool = False,
        scope: str = "global",
        keep_first_dense: bool = True,
        keep_last_dense: bool = False,
        rank_loss_layers: str = "conv",
        layers: Sequence[str] | None = None,
        delta: float = DEFAULT_DELTA,
        track_delta_rank: bool = True,
        steps: SparsitySchedule | None = None,
    ) -> None:
        self.final_sparsity = check_sparsity(final_sparsity, "target sparsity")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial sparsity")
        if schedule not in SCHEDULE_KINDS:
            raise TensorslimError(
                f"unknown sparsity schedule '{schedule}': use {', '.join(SCHEDULE_KINDS)}"
            )
        if not 0.0 <= start <= end:
            raise TensorslimError(
                f"pruning start {start} and end {end} must satisfy 0 ≤ start ≤ end (fractions)"
            )
        if end > 1.0:
            raise TensorslimError(
                f"the pruning schedule ends at {end:g} of training, after training ends: use "
                "end ≤ 1"
            )
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0
        ):
            raise TensorslimError(
                f"the update interval ΔT must be a positive int, got {interval!r}"
            )
        _check_choices(drop_fraction, rank_weight, partial_k, scope, rank_loss_layers, delta)
        self.kind, self.start, self.end, self.interval = schedule, start, end, interval
        self.drop_fraction, self.rank_weight, self.partial_k = drop_fraction, rank_weight, partial_k
        self.rank_loss_every_step = rank_loss_every_step
        self.scope, self.rank_loss_layers = scope, rank_loss_layers
        self.keep_first_dense, self.keep_last_dense = keep_first_dense, keep_last_dense
        self.requested_layers = list(layers) if layers is not None else None
        self.delta, self.track_delta_rank = delta, track_delta_rank
        self._fixed_schedule = steps
        self.schedule: SparsitySchedule | None = None
        self.layers: list[tuple[str, nn.Module]] = []
        self.rank_layers: list[tuple[str, nn.Module]] = []
        self._erk_finals: list[float] | None = None
        self.kept_dense: list[str] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._next_step = 0
        self.rank_loss_seconds = 0.0
        self.update_seconds = 0.0
        self.updates = 0
        self.regrown_total = 0
        self._warned: set[str] = set()

    # ----- setup -------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    def resolve_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Choose (and mask, if needed) the layers to rank; called by ``on_train_begin``."""
        net = unwrap(model)
        named = dict(net.named_modules())
        if self.requested_layers is not None:
            chosen = []
            for name in self.requested_layers:
                if name not in named:
                    raise TensorslimError(f"pruning: the model has no layer named {name!r}")
                if not isinstance(named[name], PRUNABLE_TYPES):
                    raise TensorslimError(
                        f"pruning: {name} is a {type(named[name]).__name__}, not a Linear/Conv2d"
                    )
                if mask_of(named[name]) is None:
                    raise TensorslimError(
                        f"pruning: {name} has no mask; call add_masks(model) before creating "
                        "the optimizer"
                    )
                chosen.append((name, named[name]))
        else:
            chosen = list(masked_modules(net))
            if not chosen:
                raise TensorslimError(
                    "pruning: the model has no pruning masks; call "
                    "tensorslim.train.pruning.add_masks(model) before creating the optimizer "
                    "(or apply a gmp / rigl / rpg plan)"
                )
        first, last = _first_conv_and_classifier(chosen)
        self.kept_dense = [
            name
            for name, keep in ((first, self.keep_first_dense), (last, self.keep_last_dense))
            if keep and name is not None
        ]
        layers = [(n, m) for n, m in chosen if n not in self.kept_dense]
        if not layers:
            raise TensorslimError(
                "pruning: no layer left to prune (every masked layer is kept dense: set "
                "keep_first_dense / keep_last_dense to False)"
            )
        self.layers = layers
        self.rank_layers = self._rank_layers(chosen)
        self._erk_finals = None
        return layers

    def _rank_layers(self, chosen: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
        """The layers of the rank loss: every masked Conv2d (kept-dense ones too), as officially."""
        if self.rank_loss_layers == "pruned":
            return list(self.layers)
        convs = [(n, m) for n, m in chosen if isinstance(m, nn.Conv2d)]
        if not convs and self.rank_weight > 0:
            self._warn_once(
                "noconv",
                "pruning: the rank loss covers convolutions only (as in RPG's code) and the model "
                "has none; it covers the pruned Linear layers instead (rank_loss_layers='pruned')",
            )
            return list(self.layers)
        return convs

    def resolve_schedule(self, total_steps: int) -> SparsitySchedule:
        """The absolute-step schedule for a run of ``total_steps`` steps."""
        if total_steps < 1:
            raise TensorslimError(f"pruning needs at least one training step, got {total_steps}")
        if self._fixed_schedule is not None:
            self._fixed_schedule.check_fits(total_steps)
            return self._fixed_schedule
        last = total_steps - 1
        start, end = round(self.start * last), round(self.end * last)
        interval = self.interval or max(1, (end - start) // AUTO_UPDATES)
        return SparsitySchedule(
            self.final_sparsity, start, end, interval, self.initial_sparsity, self.kind
        )

    def on_train_begin(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int
    ) -> None:
        self._optimizer = optimizer
        self.resolve_layers(model)
        self.schedule = self.resolve_schedule(total_steps)
        self._prepare(self._next_step)

    # ----- per step ----------------------------------------------------------------------------
    def _schedule(self) -> SparsitySchedule:
        if self.schedule is None:
            raise TensorslimError("PruningHook used before on_train_begin")
        return self.schedule

    def _regrows_at(self, step: int) -> bool:
        schedule = self._schedule()
        return (
            self.drop_fraction > 0
            and schedule.is_update_step(step)
            and cosine_drop_fraction(step, self.drop_fraction, schedule.end) > 0
        )

    def _prepare(self, step: int) -> None:
        """Switch the dense-gradient capture on exactly for the steps that regrow."""
        capture = self._regrows_at(step)
        for _, module in self.layers:
            holder = mask_of(module)
            if holder is None:
                continue
            if capture:
                holder.start_capture()
            elif holder.capture or holder.dense_grad is not None:
                holder.stop_capture()

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        """λ·L_rank at update steps (every step with ``rank_loss_every_step``), else ``None``."""
        if self.rank_weight == 0:
            return None
        if not (self.rank_loss_every_step or self._schedule().is_update_step(step)):
            return None
        started = time.perf_counter()
        loss = adversarial_rank_loss(self.rank_layers, self.partial_k)
        self.rank_loss_seconds += time.perf_counter() - started
        return self.rank_weight * loss

    def skips_optimizer_step(self, step: int) -> bool:
        """True on regrowth steps: their gradient scores the regrowth and is not applied."""
        return self._regrows_at(step)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self._schedule().is_update_step(step):
            started = time.perf_counter()
            self.update_masks(step, optimizer)
            self.update_seconds += time.perf_counter() - started
        self._next_step = step + 1
        self._prepare(step + 1)

    # ----- the mask update ---------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _dense_gradients(self, step: int) -> dict[str, torch.Tensor | None]:
        """∂L/∂W per layer as captured this step, averaged over processes under DDP."""
        grads: dict[str, torch.Tensor | None] = {}
        for name, module in self.layers:
            holder = mask_of(module)
            grad = holder.dense_grad if holder is not None else None
            if grad is None:
                self._warn_once(
                    f"nograd:{name}",
                    f"pruning: {name} got no gradient at step {step} (is it used in the "
                    "forward pass?); it is not regrown",
                )
            grads[name] = grad
        if is_distributed():
            # One flat all-reduce; a layer without a local gradient contributes zeros.
            parts = [
                (g if g is not None else torch.zeros_like(m.weight)).reshape(-1)
                for (_, m), g in zip(self.layers, grads.values(), strict=True)
            ]
            flat = torch.cat(parts).float()
            dist.all_reduce(flat)
            flat /= world_size()
            offset = 0
            for name, module in self.layers:
                n = module.weight.numel()
                grads[name] = flat[offset : offset + n].reshape(module.weight.shape)
                offset += n
        for name, grad in grads.items():
            if grad is not None and not bool(torch.isfinite(grad).all()):
                raise TensorslimError(
                    f"pruning: the gradient of {name} has NaN/Inf at step {step}; no mask is "
                    "computed from it — lower the learning rate or the rank-loss weight"
                )
        return grads

    @torch.no_grad()
    def update_masks(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Prune to s_t by magnitude, then drop and regrow (see the module docstring)."""
        schedule = self._schedule()
        target = schedule.sparsity_at(step)  # the overall target (named in the warnings)
        weights: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        for name, module in self.layers:
            w = original_weight(module).detach()
            if not bool(torch.isfinite(w).all()):
                raise TensorslimError(
                    f"pruning: {name} has NaN/Inf weights at step {step}; cannot rank them"
                )
            holder = mask_of(module)
            assert holder is not None
            weights[name], masks[name] = w, holder.mask
            if not bool((w * holder.mask).any()):
                self._warn_once(
                    f"zero:{name}",
                    f"pruning: {name} has all weights zero at step {step}; the magnitude "
                    "ranking removes it entirely",
                )
        new_masks = self._magnitude_masks(weights, masks, step)
        fraction = 0.0
        grown: dict[str, torch.Tensor] = {}
        if self._regrows_at(step):
            fraction = cosine_drop_fraction(step, self.drop_fraction, schedule.end)
            grads = self._dense_gradients(step)
            for name in weights:
                grad = grads[name]
                if grad is None or not bool(grad.any()):
                    continue
                pruned = new_masks[name] > 0
                new_masks[name], regrown = drop_and_regrow(
                    weights[name], new_masks[name], grad, fraction
                )
                # only positions inactive before the drop start afresh (official RigL/RPG)
                grown[name] = regrown & ~pruned
        for name, module in self.layers:
            holder = mask_of(module)
            assert holder is not None
            old, new = holder.mask > 0, new_masks[name] > 0
            reset = old ^ new
            if name in grown:
                reset |= grown[name]
                self.regrown_total += int(grown[name].sum())
            param = original_weight(module)
            # Pruned weights are zeroed so that a later regrowth starts them at zero; regrown
            # ones start at zero by definition; both lose their optimizer history.
            param.masked_fill_(reset, 0.0)
            reset_optimizer_state(optimizer, param, reset)
            holder.mask.copy_(new_masks[name])
            if not bool(new.any()):
                self._warn_once(
                    f"empty:{name}",
                    f"pruning: {name} has no weight left at sparsity {target:.3f} (global "
                    "ranking); keep it dense (keep_first_dense / layers=...) or lower the target",
                )
        self.updates += 1

    def _magnitude_masks(
        self, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], step: int
    ) -> dict[str, torch.Tensor]:
        """The masks after magnitude pruning to this step's target, per the ``scope``."""
        schedule = self._schedule()
        if self.scope == "global":
            return global_magnitude_masks(weights, masks, schedule.sparsity_at(step))
        if self.scope == "erk":
            if self._erk_finals is None:
                shapes = [tuple(weights[n].shape) for n in weights]
                densities = erk_densities(shapes, 1.0 - schedule.final_sparsity)
                self._erk_finals = [max(0.0, 1.0 - d) for d in densities]
            finals = self._erk_finals
        else:
            finals = [schedule.final_sparsity] * len(weights)
        targets = layer_sparsities(self.scope, schedule, step, finals)
        return {
            n: layer_magnitude_mask(weights[n], masks[n], t)
            for n, t in zip(weights, targets, strict=True)
        }

    # ----- reporting and checkpoints -------------------------------------------------------
    def current_sparsity(self) -> float:
        """Sparsity of the ranked layers' effective weights right now."""
        zeros = total = 0
        for _, module in self.layers:
            w = module.weight.detach()
            zeros += int((w == 0).sum())
            total += w.numel()
        return zeros / max(1, total)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        record = {
            "sparsity": self.current_sparsity(),
            "target_sparsity": self._schedule().sparsity_at(max(0, self._next_step - 1)),
            "rank_loss_seconds": self.rank_loss_seconds,
            "mask_update_seconds": self.update_seconds,
        }
        if self.track_delta_rank:
            ranks = average_delta_rank(unwrap(model), self.delta, self.layer_names, self.partial_k)
            record.update({k: float(v) for k, v in ranks.items()})
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            "next_step": self._next_step,
            "rank_loss_seconds": self.rank_loss_seconds,
            "update_seconds": self.update_seconds,
            "updates": self.updates,
            "regrown_total": self.regrown_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next_step = int(state.get("next_step", 0))
        self.rank_loss_seconds = float(state.get("rank_loss_seconds", 0.0))
        self.update_seconds = float(state.get("update_seconds", 0.0))
        self.updates = int(state.get("updates", 0))
        self.regrown_total = int(state.get("regrown_total", 0))


def pruning_summary(
    model: nn.Module,
    delta: float = DEFAULT_DELTA,
    layers: Sequence[str] | None = None,
    partial_k: float | None = None,
) -> dict[str, Any]:
    """Sparsity reached and δ-ranks, JSON-ready.

    ``layers``: the pruned layers (default: the masked ones, else every Linear/Conv2d). Returns
    ``sparsity`` (zeros / weights over those layers), ``all_layers_sparsity`` (over every
    Linear/Conv2d), ``nonzero_weights``, ``pruned_layer_weights``, ``avg_delta_rank``,
    ``avg_relative_delta_rank``, ``delta`` and per-layer ``layers`` {sparsity, nonzero, weights,
    delta_rank, full_rank}; with ``partial_k`` also the RPG code's own rank measure
    (``avg_energy_rank``, per layer ``energy_rank``: the k its rank loss keeps).
    """
    net = unwrap(model)
    named = dict(net.named_modules())
    if layers is None:
        layers = [n for n, _ in masked_modules(net)] or [n for n, _ in prunable_modules(net)]
    missing = [n for n in layers if n not in named]
    if missing:
        raise TensorslimError(f"pruning summary: the model has no layer named {missing[0]!r}")
    ranks = layer_delta_ranks(net, delta, layers, partial_k)
    per_layer: dict[str, dict[str, float]] = {}
    zeros = total = 0
    for name in layers:
        w = named[name].weight.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        per_layer[name] = {
            "sparsity": z / max(1, w.numel()),
            "nonzero": w.numel() - z,
            "weights": w.numel(),
            "delta_rank": ranks[name]["delta_rank"],
            "full_rank": ranks[name]["full_rank"],
        }
        if partial_k is not None:
            per_layer[name]["energy_rank"] = ranks[name]["energy_rank"]
    all_zeros = all_total = 0
    for _, module in prunable_modules(net):
        w = module.weight.detach()
        all_zeros += int((w == 0).sum())
        all_total += w.numel()
    averages = average_delta_rank(net, delta, layers, partial_k)
    return {
        "sparsity": zeros / max(1, total),
        "all_layers_sparsity": all_zeros / max(1, all_total),
        "nonzero_weights": total - zeros,
        "pruned_layer_weights": total,
        "delta": delta,
        **averages,
        "layers": per_layer,
    }
