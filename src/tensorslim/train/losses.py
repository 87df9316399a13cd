"""Task losses, metrics and distillation losses for ``fit`` and ``evaluate``.

Signatures (so encoders and language models are first-class, not only classifiers):

- ``loss_fn(output, batch) -> scalar tensor``;
- ``metric_fn(output, batch) -> float | dict[str, float]`` (a batch mean; ``evaluate`` averages
  over batches weighted by batch size);
- ``distill_fn(student_output, teacher_output, batch) -> scalar tensor``.

``output`` is whatever the model returns (a tensor, a tuple, a dataclass, a ``ModelOutput``);
:func:`tensorslim.inputs.output_tensor` finds the logits or hidden states in it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from tensorslim.errors import TensorslimError
from tensorslim.inputs import batch_inputs, batch_targets, output_tensor

LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], "float | dict[str, float]"]
DistillFn = Callable[[Any, Any, Any], torch.Tensor]


def cross_entropy_loss(output: Any, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of the output's logits against the batch's targets."""
    logits = output_tensor(output)
    targets = batch_targets(batch).to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def top1_accuracy(output: Any, batch: Any) -> dict[str, float]:
    """``{"accuracy": fraction of argmax(logits) == targets}`` over the batch."""
    logits = output_tensor(output).detach()
    targets = batch_targets(batch).to(logits.device)
    correct = (logits.reshape(-1, logits.shape[-1]).argmax(dim=1) == targets.reshape(-1)).sum()
    return {"accuracy": float(correct) / max(1, targets.numel())}


def kl_distillation(temperature: float = 4.0) -> DistillFn:
    """Hinton et al.: T² · KL(softmax(t/T) ‖ softmax(s/T)) on the logits, batch mean."""
    if temperature <= 0:
        raise TensorslimError(f"the distillation temperature must be > 0, got {temperature}")

    def distill(student: Any, teacher: Any, batch: Any) -> torch.Tensor:
        return distillation_loss(output_tensor(student), output_tensor(teacher), temperature)

    return distill


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) over the last dimension, mean over the rest."""
    t = temperature
    s = student_logits.reshape(-1, student_logits.shape[-1])
    q = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    return F.kl_div(
        F.log_softmax(s / t, dim=1),
        F.log_softmax(q / t, dim=1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)


def hidden_state_distillation(cosine_weight: float = 1.0, what: str = "hidden") -> DistillFn:
    """MSE + ``cosine_weight`` · (1 − cos) between student and teacher hidden states.

    ``what="hidden"`` reads ``last_hidden_state`` (or a tensor output); ``"logits"`` the logits.
    Both terms are means over tokens — over the real tokens only when the batch is a mapping
    with an ``attention_mask`` (padding carries nothing to learn); the MSE is per element, so it
    is scale-aware while the cosine term keeps directions (what similarity search reads) aligned.
    """

    def distill(student: Any, teacher: Any, batch: Any) -> torch.Tensor:
        s, t = output_tensor(student, what), output_tensor(teacher, what).detach()
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        mask = _token_mask(batch, s.shape[0])
        if mask is not None:
            s, t = s[mask], t[mask]
        mse = F.mse_loss(s, t)
        return mse + cosine_weight * (1.0 - F.cosine_similarity(s, t, dim=1)).mean()

    return distill


def layer_distillation(cosine_weight: float = 1.0) -> DistillFn:
    """Mean over the encoder layers ℓ = 1…L of MSE + ``cosine_weight`` · (1 − cos) between the
    student's and the teacher's hidden states after layer ℓ (real tokens only, as
    :func:`hidden_state_distillation`).

    Outputs must carry ``hidden_states`` (the embedding output first, as Hugging Face models
    return them with ``output_hidden_states=True``; :func:`hidden_states_forward` asks for
    them). Every layer gets its own target, so an early layer's error is corrected where it
    arises instead of through the layers above it.
    """

    def distill(student: Any, teacher: Any, batch: Any) -> torch.Tensor:
        ours, theirs = _hidden_states(student), _hidden_states(teacher)
        if len(ours) != len(theirs) or len(ours) < 2:
            raise TensorslimError(
                f"layer distillation needs hidden states of as many layers in both models "
                f"(student {len(ours)}, teacher {len(theirs)})"
            )
        terms = []
        for s, t in zip(ours[1:], theirs[1:], strict=True):
            s, t = s.reshape(-1, s.shape[-1]), t.detach().reshape(-1, t.shape[-1])
            mask = _token_mask(batch, s.shape[0])
            if mask is not None:
                s, t = s[mask], t[mask]
            cos = (1.0 - F.cosine_similarity(s, t, dim=1)).mean()
            terms.append(F.mse_loss(s, t) + cosine_weight * cos)
        return torch.stack(terms).mean()

    return distill


def hidden_states_forward(model: Any, batch: Any) -> Any:
    """``model(**inputs, output_hidden_states=True)``: a forward that returns every layer's
    hidden states (for :func:`layer_distillation`)."""
    inputs = batch_inputs(batch)
    return model(*inputs.args, **{**inputs.kwargs, "output_hidden_states": True})


def _hidden_states(output: Any) -> tuple[torch.Tensor, ...]:
    states = (
        output.get("hidden_states")
        if isinstance(output, Mapping)
        else getattr(output, "hidden_states", None)
    )
    if not isinstance(states, tuple | list) or not all(isinstance(h, torch.Tensor) for h in states):
        raise TensorslimError(
            "layer distillation needs outputs with hidden_states: call the models with "
            "output_hidden_states=True (forward_fn=hidden_states_forward)"
        )
    return tuple(states)


def pooled_embedding_distillation(cosine_weight: float = 1.0) -> DistillFn:
    """MSE + ``cosine_weight`` · (1 − cos) between mean-pooled sentence embeddings.

    The embedding is sentence-transformers' mean pooling, Σ_t m_t h_t / Σ_t m_t over the
    ``attention_mask`` m of the batch (a mapping) and the last hidden states h.
    """

    def distill(student: Any, teacher: Any, batch: Any) -> torch.Tensor:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if mask is None:
            raise TensorslimError("pooled distillation needs batches with an attention_mask")
        s = _mean_pool(output_tensor(student, "hidden"), mask)
        t = _mean_pool(output_tensor(teacher, "hidden").detach(), mask)
        mse = F.mse_loss(s, t)
        return mse + cosine_weight * (1.0 - F.cosine_similarity(s, t, dim=1)).mean()

    return distill


def relational_distillation(matrix_weight: float = 1.0, cosine_weight: float = 1.0) -> DistillFn:
    """The batch's similarity structure: ``matrix_weight`` · mean_{i≠j} (S_ij − T_ij)² +
    ``cosine_weight`` · mean_i (1 − cos(s_i, t_i)).

    s_i, t_i (n × h) are the student's and the teacher's mean-pooled sentence embeddings of the
    batch (as :func:`pooled_embedding_distillation`), S = ŝŝᵀ and T = t̂t̂ᵀ (n × n) their
    pairwise cosine similarities (rows normalised to unit length). The first term is what a
    semantic-search ranking reads (the relative similarities of sentences, as in relational
    knowledge distillation), the second keeps each embedding on its original's direction. A
    batch of one sentence has no pair: the first term is then 0.
    """

    def distill(student: Any, teacher: Any, batch: Any) -> torch.Tensor:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if mask is None:
            raise TensorslimError("relational distillation needs batches with an attention_mask")
        s = F.normalize(_mean_pool(output_tensor(student, "hidden"), mask), dim=1)
        t = F.normalize(_mean_pool(output_tensor(teacher, "hidden").detach(), mask), dim=1)
        n = s.shape[0]
        off = ~torch.eye(n, dtype=torch.bool, device=s.device)
        gap = (s @ s.T - t @ t.T)[off]
        matrix = gap.pow(2).mean() if n > 1 else s.new_zeros(())
        return matrix_weight * matrix + cosine_weight * (1.0 - (s * t).sum(1)).mean()

    return distill


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def _token_mask(batch: Any, tokens: int) -> torch.Tensor | None:
    """The batch's attention mask flattened to (tokens,) booleans, if it has a matching one."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.numel() != tokens:
        return None
    return mask.reshape(-1).bool()


def sampled_gaussian_loss(seed: int = 0) -> LossFn:
    """A label-free loss whose squared gradients estimate the Fisher information of the output.

    For the output model y ~ N(f(x), I) with y drawn from the model itself, ½‖f(x) − y‖² has
    gradient −εᵀ ∂f/∂θ (ε = y − f(x) ~ N(0, I)), so E[grad²] is the diagonal of JᵀJ, the
    Fisher of f. f is the mean-pooled last hidden state when the batch is a mapping with an
    ``attention_mask`` (a sentence embedding), else the output's main tensor. One fresh ε per
    call, from a generator seeded by ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)

    def loss(output: Any, batch: Any) -> torch.Tensor:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if isinstance(mask, torch.Tensor):
            f = _mean_pool(
                output_tensor(output, "hidden"), mask.to(output_tensor(output, "hidden").device)
            )
        else:
            f = output_tensor(output)
        noise = torch.randn(f.shape, generator=generator, dtype=f.dtype).to(f.device)
        return 0.5 * (f - (f.detach() + noise)).pow(2).sum()

    return loss


def named_distillation(name: str, temperature: float = 4.0) -> DistillFn:
    """A distillation loss by name: ``"kl"`` (logits), ``"hidden"`` (token hidden states),
    ``"layers"`` (every layer's hidden states), ``"pooled"`` (mean-pooled embeddings), the last
    three MSE + cosine, or ``"relational"`` (:func:`relational_distillation`: the batch's
    pairwise-similarity matrix + cosine of the pooled embeddings). Names joined by ``+``
    (``"layers+relational"``) are the sum of those losses."""
    parts = name.split("+")
    if len(parts) > 1:
        losses = [named_distillation(part, temperature) for part in parts]

        def total(student: Any, teacher: Any, batch: Any) -> torch.Tensor:
            return torch.stack([fn(student, teacher, batch) for fn in losses]).sum()

        return total
    if name == "kl":
        return kl_distillation(temperature)
    if name == "hidden":
        return hidden_state_distillation()
    if name == "layers":
        return layer_distillation()
    if name == "pooled":
        return pooled_embedding_distillation()
    if name == "relational":
        return relational_distillation()
    raise TensorslimError(
        f"unknown distillation loss '{name}': use kl, hidden, layers, pooled or relational "
        "(or several joined by +)"
    )
