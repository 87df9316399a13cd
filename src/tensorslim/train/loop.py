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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from tensorslim.errors import TensorslimError
from tensorslim.train.checkpoint import load_checkpoint, save_checkpoint
from tensorslim.train.distributed import barrier, is_distributed, is_main_process
from tensorslim.train.hooks import TrainHook

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
    model: nn.Module, loader: Iterable, *, device: torch.device | str | None = None
) -> dict[str, float]:
    """Top-1 accuracy (in [0, 1]) and mean cross-entropy of ``model`` over ``loader``."""
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    loss_sum = 0.0
    with torch.inference_mode():
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(dim=1) == targets).sum())
            total += targets.numel()
    model.train(was_training)
    if total == 0:
        raise TensorslimError("evaluation loader is empty: check the dataset and --limit options")
    return {"accuracy": correct / total, "loss": loss_sum / total}


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


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al. KD term: T² · KL(softmax(t/T) ‖ softmax(s/T)), batch-mean."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)


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
) -> History:
    """Train ``model`` in place for ``epochs`` epochs and return the per-epoch history.

    Loss = (1 − α)·CE(y, ŷ) + α·KD(teacher) (α = 0 without a teacher) + Σ hook extra losses.
    The learning rate follows a cosine decay from ``lr`` to 0 over all steps (``schedule=
    "constant"`` keeps it fixed), after an optional linear warm-up.
    With ``checkpoint_dir`` the state after each epoch is saved atomically to ``last.pt``;
    ``resume=True`` continues from it (model, optimizer, schedule, hooks, history, RNG).
    Inside an initialised ``torch.distributed`` process group (``ddp=None`` → automatic) the model
    is wrapped in DistributedDataParallel for the steps; hooks receive the wrapped model and only
    rank 0 logs, shows progress and writes the checkpoint.
    """
    if epochs < 0:
        raise TensorslimError(f"epochs must be ≥ 0, got {epochs}")
    if lr <= 0:
        raise TensorslimError(f"learning rate must be > 0, got {lr}")
    if schedule not in {"cosine", "constant"}:
        raise TensorslimError(f"unknown schedule '{schedule}': use 'cosine' or 'constant'")
    wrapped = None
    if isinstance(model, DistributedDataParallel):
        # the caller wrapped it already: train through their wrapper (never a second one) and
        # keep checkpoints, hooks' bookkeeping and the returned weights on the plain module
        wrapped, model = model, model.module
    device = _model_device(model)
    steps_per_epoch = _steps_per_epoch(train_loader, max_steps_per_epoch)
    total_steps = max(1, epochs * steps_per_epoch)
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    warmup_steps = int(warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress_frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_frac)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    history = History()
    start_epoch = 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for hook, hook_state in zip(hooks, state.get("hooks", []), strict=False):
            hook.load_state_dict(hook_state)
        history.epochs = list(state.get("history", []))
        start_epoch = int(state["epoch"])
        torch.set_rng_state(state["rng"])
        # the loader's own generator decides the shuffle order: without it a resumed run
        # would see other batches than an uninterrupted one
        for generator, rng in zip(
            _loader_generators(train_loader), state.get("loader_rng", []), strict=False
        ):
            generator.set_state(rng)
        _say(log, f"resumed from {ckpt_path} after epoch {start_epoch}")
    use_ddp = is_distributed() if ddp is None else ddp
    if wrapped is not None:
        net: nn.Module = wrapped
    elif use_ddp:
        # every rank starts from rank 0's weights, so all hold the same model
        net = DistributedDataParallel(model)
    else:
        net = model
    for hook in hooks:
        hook.on_train_begin(net, opt, total_steps)
    if teacher is not None:
        teacher.eval()
    alpha = kd_alpha if teacher is not None else 0.0

    for epoch in range(start_epoch, epochs):
        _set_sampler_epoch(train_loader, epoch)
        model.train()
        started = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"{description} {epoch + 1}/{epochs}",
            disable=not (progress and is_main_process()),
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for batch_index, (inputs, targets) in enumerate(train_loader):
            if batch_index >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + batch_index
            inputs, targets = inputs.to(device), targets.to(device)
            logits = net(inputs)
            task = F.cross_entropy(logits, targets)
            loss = task
            if alpha > 0:
                with torch.no_grad():
                    teacher_logits = teacher(inputs)
                kd = distillation_loss(logits, teacher_logits, kd_temperature)
                loss = (1 - alpha) * task + alpha * kd
            for hook in hooks:
                extra = hook.extra_loss(net, step)
                if extra is not None:
                    loss = loss + extra
            if not torch.isfinite(loss):
                where = f" (last good checkpoint kept at {ckpt_path})" if ckpt_path else ""
                raise NonFiniteLossError(
                    f"loss became {float(loss.detach())} at epoch {epoch + 1}, step {batch_index}: "
                    f"lower the learning rate or the regularizer weights{where}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for hook in hooks:
                hook.after_backward(net, opt, step)
            opt.step()
            scheduler.step()
            for hook in hooks:
                hook.after_step(net, opt, step)
            batch = targets.numel()
            seen += batch
            loss_sum += float(task.detach()) * batch
            correct += int((logits.detach().argmax(dim=1) == targets).sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        record: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "lr": opt.param_groups[0]["lr"],
        }
        for hook in hooks:
            record.update(hook.on_epoch_end(net, epoch))
        if test_loader is not None:
            metrics = evaluate(model, test_loader, device=device)
            record["test_accuracy"] = metrics["accuracy"]
            record["test_loss"] = metrics["loss"]
        record["seconds"] = time.perf_counter() - started
        history.epochs.append(record)
        _say(log, _format_record(description, epochs, record))
        if ckpt_path is not None:
            if is_main_process():
                save_checkpoint(
                    ckpt_path,
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "hooks": [hook.state_dict() for hook in hooks],
                        "history": history.epochs,
                        "rng": torch.get_rng_state(),
                        "loader_rng": [g.get_state() for g in _loader_generators(train_loader)],
                    },
                )
            barrier()
    return history


def _format_record(description: str, epochs: int, record: dict[str, Any]) -> str:
    parts = [f"{description} epoch {int(record['epoch'])}/{epochs}"]
    for key, value in record.items():
        if key != "epoch":
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _say(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None and is_main_process():
        log(message)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


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


def _loader_generators(loader: Iterable) -> list[torch.Generator]:
    """The random generators a DataLoader (or its sampler) shuffles with, each once."""
    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    for owner in (loader, sampler, batch_sampler):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _set_sampler_epoch(loader: Iterable, epoch: int) -> None:
    # DistributedSampler reshuffles per epoch only when told the epoch.
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
