"""Recovery by distillation on unlabeled data: the compressed model learns the original's outputs.

``distill(student, teacher, loader, ...)`` is :func:`tensorslim.train.loop.fit` with the
teacher's outputs as the only target (``kd_alpha = 1``: batches need no labels), a distillation
loss chosen by name — ``"hidden"`` (token hidden states, MSE + cosine over real tokens),
``"layers"`` (the same on every layer's hidden states, the models run with
``output_hidden_states=True``), ``"pooled"`` (mean-pooled sentence embeddings, MSE + cosine),
``"relational"`` (the batch's pairwise cosine-similarity matrix of the pooled embeddings, MSE,
plus their cosine) or ``"kl"`` (logits), several joined by ``+`` summed
(``"layers+relational"``) — or given as a function, AdamW and a cosine schedule after an optional
linear warm-up. It keeps the loop's atomic per-epoch checkpoints and ``resume``. The teacher
is never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.inputs import ForwardFn
from tensorslim.layers.base import StructuredLayer
from tensorslim.train.hooks import TrainHook
from tensorslim.train.loop import History, fit
from tensorslim.train.losses import DistillFn, hidden_states_forward, named_distillation


def distill(
    student: nn.Module,
    teacher: nn.Module,
    loader: Iterable,
    *,
    epochs: int = 1,
    loss: str | DistillFn = "hidden",
    lr: float = 1e-4,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    temperature: float = 4.0,
    max_steps_per_epoch: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    only_structured: bool = False,
    warmup: float = 0.0,
    hooks: Sequence[TrainHook] = (),
) -> History:
    """Train ``student`` in place to reproduce ``teacher``'s outputs on ``loader``'s batches.

    Batches are whatever both models take (a tokenizer's ``BatchEncoding``, tensors, …);
    labels, if present, are ignored. ``only_structured=True`` trains only the parameters of the
    structured layers (the factors the compression made; embeddings, norms and dense layers stay
    as they were). The learning rate rises linearly from ``lr``/steps to ``lr`` over the first
    ``warmup`` epochs (a float: 0.1 is a tenth of the first epoch), then decays to 0 by a
    cosine over the remaining steps. ``hooks`` are the loop's (e.g. a held-out score per epoch
    in ``on_epoch_end``, which lands in the history). Returns the per-epoch history
    (``train_distill_loss`` and the hooks' records).
    """
    if student is teacher:
        raise TensorslimError("distill: the student and the teacher are the same module")
    distill_fn = named_distillation(loss, temperature) if isinstance(loss, str) else loss
    if isinstance(loss, str) and "layers" in loss.split("+") and forward_fn is None:
        forward_fn = hidden_states_forward
    if not 0.0 <= warmup <= epochs:
        raise TensorslimError(f"distill warmup must be in [0, epochs={epochs}], got {warmup}")
    frozen = _freeze_unstructured(student) if only_structured else []
    try:
        return fit(
            student,
            loader,
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            warmup_epochs=warmup,
            hooks=hooks,
            teacher=teacher,
            kd_alpha=1.0,
            distill_fn=distill_fn,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=progress,
            log=log,
            max_steps_per_epoch=max_steps_per_epoch,
            description="distill",
            forward_fn=forward_fn,
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _freeze_unstructured(model: nn.Module) -> list[nn.Parameter]:
    """Turn off gradients outside structured layers; the parameters turned off."""
    inside = {
        id(p) for m in model.modules() if isinstance(m, StructuredLayer) for p in m.parameters()
    }
    if not inside:
        raise TensorslimError("only_structured: the student has no structured layer")
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in inside]
    for p in frozen:
        p.requires_grad_(False)
    return frozen
