"""The reference training loop: SGD/Adam, cosine schedule, optional distillation, hooks,
atomic per-epoch checkpoints and resume.

Methods plug in through :class:`tensorslim.train.hooks.TrainHook`; the loop knows none of them.
A run interrupted at any point loses at most the epoch in progress: the checkpoint
``checkpoint_dir/last.pt`` is replaced atomically after every finished epoch.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from tensorslim.errors import TensorslimError
from tensorslim.inputs import ForwardFn, batch_size, call_on_batch, model_device, to_device
from tensorslim.train.checkpoint import load_checkpoint, save_checkpoint
from tensorslim.train.distributed import barrier, is_distributed, is_main_process
from tensorslim.train.hooks import TrainHook
from tensorslim.train.losses import (
    DistillFn,
    LossFn,
    MetricFn,
    cross_entropy_loss,
    kl_distillation,
    top1_accuracy,
)
from tensorslim.train.seeding import loader_generators

CHECKPOINT_NAME = "last.pt"


@dataclass
class History:
    """Per-epoch metrics of one ``fit`` call (a list of dicts, JSON-ready)."""

    epochs: list[dict[str, float]] = field(default_factory=list)

    def last(self) -> dict[str, float]:
        return self.epochs[-1] if self.epochs else {}


class NonFiniteLossError(TensorslimError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    loss_fn: LossFn | None = None,
    metric_fn: MetricFn | None = None,
    forward_fn: ForwardFn | None = None,
) -> dict[str, float]:
    """Mean loss and metrics of ``model`` over ``loader``, weighted by batch size.

    Defaults: top-1 ``accuracy`` (in [0, 1]) and cross-entropy ``loss`` — a loader of
    ``(inputs, targets)``. With ``loss_fn(output, batch)`` / ``metric_fn(output, batch)`` any
    model and batch structure works (see :mod:`tensorslim.train.losses`); a custom loss without
    a metric reports the loss only, a custom metric without a loss the metric only.
    """
    device = torch.device(device) if device is not None else model_device(model)
    objective = Objective(loss_fn=loss_fn, metric_fn=metric_fn, forward_fn=forward_fn)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    total = 0
    try:
        with torch.inference_mode():
            for batch in loader:
                batch = to_device(batch, device)
                output = call_on_batch(model, batch, forward_fn)
                size = batch_size(batch)
                values = objective.evaluation(output, batch)
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value * size
                total += size
    finally:
        model.train(was_training)
    if total == 0:
        raise TensorslimError("evaluation loader is empty: check the dataset and --limit options")
    return {key: value / total for key, value in sums.items()}


@dataclass
class Objective:
    """What a step optimises: task loss, metrics, and the distillation term with its weight.

    ``alpha`` weighs distillation: loss = (1 − α)·task + α·distill (α = 0 without a teacher; at
    α = 1 the task loss is not computed, so unlabeled batches work).
    """

    loss_fn: LossFn | None = None
    metric_fn: MetricFn | None = None
    distill_fn: DistillFn | None = None
    forward_fn: ForwardFn | None = None
    teacher: nn.Module | None = None
    alpha: float = 0.0

    def task_loss(self, output: Any, batch: Any) -> torch.Tensor:
        return (self.loss_fn or cross_entropy_loss)(output, batch)

    def evaluation(self, output: Any, batch: Any) -> dict[str, float]:
        """Loss (unless only a metric was given: data may be unlabeled) and metrics."""
        values = {}
        if self.loss_fn is not None or self.metric_fn is None:
            values["loss"] = float(self.task_loss(output, batch))
        values.update(self.metrics(output, batch))
        return values

    def metrics(self, output: Any, batch: Any) -> dict[str, float]:
        if self.metric_fn is None:
            return top1_accuracy(output, batch) if self.loss_fn is None else {}
        value = self.metric_fn(output, batch)
        return dict(value) if isinstance(value, Mapping) else {"metric": float(value)}

    def step(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to back-propagate and the numbers to log for one batch."""
        output = call_on_batch(net, batch, self.forward_fn)
        logged: dict[str, float] = {}
        loss = None
        if self.alpha < 1:
            task = self.task_loss(output, batch)
            logged["loss"] = float(task.detach())
            loss = task if self.alpha == 0 else (1 - self.alpha) * task
        if self.alpha > 0:
            assert self.teacher is not None and self.distill_fn is not None
            with torch.no_grad():
                teacher_output = call_on_batch(self.teacher, batch, self.forward_fn)
            distill = self.distill_fn(output, teacher_output, batch)
            logged["distill_loss"] = float(distill.detach())
            loss = self.alpha * distill if loss is None else loss + self.alpha * distill
        if self.alpha < 1:
            logged.update(self.metrics(output, batch))
        assert loss is not None
        return loss, logged


def make_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or Adam(W) over the parameters that require gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0
        )
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise TensorslimError(f"unknown optimizer '{name}': use 'sgd' or 'adam'")


SCHEDULES = ("cosine", "constant", "step")
# "step": ×0.1 at these fractions of the steps — the CIFAR ResNet schedule (epochs 81 and 122 of
# 164) that the official SVD-training code trains with (yanghr/SVD_Prune_EDLCV, --schedule)
STEP_MILESTONES = (81 / 164, 122 / 164)


def lr_schedule(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Factor of the base learning rate at each step: linear warm-up, then cosine to 0,
    constant 1, or ``step`` (×0.1 at each of :data:`STEP_MILESTONES` of the steps after it)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress_frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "step":
            return 0.1 ** sum(progress_frac >= m for m in STEP_MILESTONES)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_frac)))

    return factor


@dataclass
class _Run:
    """Everything one ``fit`` call trains with (the loop's state between its helpers)."""

    model: nn.Module
    net: nn.Module
    opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    hooks: Sequence[TrainHook]
    objective: Objective
    loader: Iterable
    steps_per_epoch: int
    epochs: int
    device: torch.device
    description: str
    progress: bool
    ckpt_path: Path | None
    history: History = field(default_factory=History)


def fit(
    model: nn.Module,
    train_loader: Iterable,
    *,
    epochs: int,
    lr: float = 0.05,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    hooks: Sequence[TrainHook] = (),
    test_loader: Iterable | None = None,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.5,
    kd_temperature: float = 4.0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    max_steps_per_epoch: int | None = None,
    description: str = "train",
    ddp: bool | None = None,
    loss_fn: LossFn | None = None,
    metric_fn: MetricFn | None = None,
    distill_fn: DistillFn | None = None,
    forward_fn: ForwardFn | None = None,
) -> History:
    """Train ``model`` in place for ``epochs`` epochs and return the per-epoch history.

    Loss = (1 − α)·task + α·distill (α = ``kd_alpha`` with a ``teacher``, else 0) + Σ hook extra
    losses. task = ``loss_fn(output, batch)`` (default: cross-entropy of the logits against the
    targets of ``(inputs, targets)`` batches); distill = ``distill_fn(student_output,
    teacher_output, batch)`` (default: Hinton's KL on logits at ``kd_temperature``; see
    :mod:`tensorslim.train.losses` for hidden-state MSE + cosine); at α = 1 batches need no
    targets. Batches take any structure :mod:`tensorslim.inputs` accepts (``forward_fn(model,
    batch)`` for the rest). The learning rate follows a cosine decay from ``lr`` to 0 over all
    steps (``schedule="constant"`` keeps it fixed, ``"step"`` divides it by 10 at 81/164 and
    122/164 of the steps), after an optional linear warm-up.
    With ``checkpoint_dir`` the state after each epoch is saved atomically to ``last.pt``;
    ``resume=True`` continues from it (model, optimizer, schedule, hooks, history, RNG).
    Inside an initialised ``torch.distributed`` process group (``ddp=None`` → automatic) the model
    is wrapped in DistributedDataParallel for the steps; hooks receive the wrapped model and only
    rank 0 logs, shows progress and writes the checkpoint. A loss that becomes NaN or Inf stops
    training with the epoch and step (:class:`NonFiniteLossError`).
    """
    _check_fit_arguments(epochs, lr, schedule, kd_alpha if teacher is not None else 0.0)
    wrapped = model if isinstance(model, DistributedDataParallel) else None
    # a caller's DDP wrapper trains (never a second one); checkpoints, hooks' bookkeeping and
    # the returned weights stay on the plain module
    model = wrapped.module if wrapped is not None else model
    steps_per_epoch = _steps_per_epoch(train_loader, max_steps_per_epoch)
    total_steps = max(1, epochs * steps_per_epoch)
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    factor = lr_schedule(schedule, int(warmup_epochs * steps_per_epoch), total_steps)
    objective = Objective(
        loss_fn=loss_fn,
        metric_fn=metric_fn,
        distill_fn=distill_fn or kl_distillation(kd_temperature),
        forward_fn=forward_fn,
        teacher=teacher.eval() if teacher is not None else None,
        alpha=kd_alpha if teacher is not None else 0.0,
    )
    run = _Run(
        model=model,
        net=model,
        opt=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, factor),
        hooks=hooks,
        objective=objective,
        loader=train_loader,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        device=model_device(model),
        description=description,
        progress=progress,
        ckpt_path=Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None,
    )
    start_epoch = _restore(run, log) if resume else 0
    run.net = _training_net(model, wrapped, ddp)
    for hook in hooks:
        hook.on_train_begin(run.net, opt, total_steps)
    for epoch in range(start_epoch, epochs):
        record = _train_epoch(run, epoch)
        for hook in hooks:
            record.update(hook.on_epoch_end(run.net, epoch))
        if test_loader is not None:
            metrics = evaluate(
                model,
                test_loader,
                device=run.device,
                loss_fn=loss_fn,
                metric_fn=metric_fn,
                forward_fn=forward_fn,
            )
            record.update({f"test_{key}": value for key, value in metrics.items()})
        run.history.epochs.append(record)
        _say(log, _format_record(description, epochs, record))
        _save(run, epoch)
    return run.history


def _check_fit_arguments(epochs: int, lr: float, schedule: str, alpha: float) -> None:
    if epochs < 0:
        raise TensorslimError(f"epochs must be ≥ 0, got {epochs}")
    if lr <= 0:
        raise TensorslimError(f"learning rate must be > 0, got {lr}")
    if schedule not in SCHEDULES:
        raise TensorslimError(f"unknown schedule '{schedule}': use {', '.join(SCHEDULES)}")
    if not 0 <= alpha <= 1:
        raise TensorslimError(f"kd_alpha must be in [0, 1], got {alpha}")


def _training_net(
    model: nn.Module, wrapped: DistributedDataParallel | None, ddp: bool | None
) -> nn.Module:
    if wrapped is not None:
        return wrapped
    if is_distributed() if ddp is None else ddp:
        # every rank starts from rank 0's weights, so all hold the same model
        return DistributedDataParallel(model)
    return model


def _restore(run: _Run, log: Callable[[str], None] | None) -> int:
    """Load ``last.pt`` into the run (if it exists) and return the epoch to continue from."""
    if run.ckpt_path is None or not run.ckpt_path.exists():
        return 0
    state = load_checkpoint(run.ckpt_path)
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    for hook, hook_state in zip(run.hooks, state.get("hooks", []), strict=False):
        hook.load_state_dict(hook_state)
    run.history.epochs = list(state.get("history", []))
    torch.set_rng_state(state["rng"])
    # the loader's own generator decides the shuffle order: without it a resumed run would see
    # other batches than an uninterrupted one
    for generator, rng in zip(
        loader_generators(run.loader), state.get("loader_rng", []), strict=False
    ):
        generator.set_state(rng)
    _say(log, f"resumed from {run.ckpt_path} after epoch {int(state['epoch'])}")
    return int(state["epoch"])


def _train_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """One pass over the loader (at most ``steps_per_epoch`` batches); the epoch's record."""
    _set_sampler_epoch(run.loader, epoch)
    run.model.train()
    started = time.perf_counter()
    sums: dict[str, float] = {}
    seen = 0
    bar = tqdm(
        total=run.steps_per_epoch,
        desc=f"{run.description} {epoch + 1}/{run.epochs}",
        disable=not (run.progress and is_main_process()),
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for batch_index, batch in enumerate(run.loader):
        if batch_index >= run.steps_per_epoch:
            break
        batch = to_device(batch, run.device)
        logged = _train_step(run, batch, epoch, batch_index)
        size = batch_size(batch)
        seen += size
        for key, value in logged.items():
            sums[key] = sums.get(key, 0.0) + value * size
        bar.update(1)
        bar.set_postfix({k: f"{v / seen:.4g}" for k, v in sums.items()})
    bar.close()
    record: dict[str, float] = {"epoch": epoch + 1}
    record.update({f"train_{key}": value / max(1, seen) for key, value in sums.items()})
    record["lr"] = run.opt.param_groups[0]["lr"]
    record["seconds"] = time.perf_counter() - started
    return record


def _train_step(run: _Run, batch: Any, epoch: int, batch_index: int) -> dict[str, float]:
    step = epoch * run.steps_per_epoch + batch_index
    loss, logged = run.objective.step(run.net, batch)
    for hook in run.hooks:
        extra = hook.extra_loss(run.net, step)
        if extra is not None:
            loss = loss + extra
    if not torch.isfinite(loss):
        where = f" (last good checkpoint kept at {run.ckpt_path})" if run.ckpt_path else ""
        raise NonFiniteLossError(
            f"loss became {float(loss.detach())} at epoch {epoch + 1}, step {batch_index}: "
            f"lower the learning rate or the regularizer weights{where}"
        )
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    for hook in run.hooks:
        hook.after_backward(run.net, run.opt, step)
    if any(hook.skips_optimizer_step(step) for hook in run.hooks):
        # the learning-rate schedule still advances (it is a function of the step, as in the
        # official RigL/RPG loops); torch warns when the very first step is such a step
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            run.scheduler.step()
    else:
        run.opt.step()
        run.scheduler.step()
    for hook in run.hooks:
        hook.after_step(run.net, run.opt, step)
    return logged


def _save(run: _Run, epoch: int) -> None:
    """The atomic end-of-epoch checkpoint (rank 0 writes; every rank waits)."""
    if run.ckpt_path is None:
        return
    if is_main_process():
        save_checkpoint(
            run.ckpt_path,
            {
                "epoch": epoch + 1,
                "model": run.model.state_dict(),
                "optimizer": run.opt.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "hooks": [hook.state_dict() for hook in run.hooks],
                "history": run.history.epochs,
                "rng": torch.get_rng_state(),
                "loader_rng": [g.get_state() for g in loader_generators(run.loader)],
            },
        )
    barrier()


def _format_record(description: str, epochs: int, record: dict[str, Any]) -> str:
    parts = [f"{description} epoch {int(record['epoch'])}/{epochs}"]
    for key, value in record.items():
        if key != "epoch":
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _say(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None and is_main_process():
        log(message)


def _steps_per_epoch(loader: Iterable, cap: int | None) -> int:
    try:
        steps = len(loader)  # type: ignore[arg-type]
    except TypeError as exc:
        if cap is None:
            raise TensorslimError(
                "the training loader has no length: pass max_steps_per_epoch"
            ) from exc
        steps = cap
    if cap is not None:
        steps = min(steps, cap)
    if steps == 0:
        raise TensorslimError("the training loader is empty: check the dataset and batch size")
    return steps


def _set_sampler_epoch(loader: Iterable, epoch: int) -> None:
    # DistributedSampler reshuffles per epoch only when told the epoch.
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
