"""The relational distillation loss: the batch's pairwise-similarity matrix and the cosine of the
mean-pooled embeddings, checked against a direct computation, at zero and through gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tensorslim.errors import TensorslimError
from tensorslim.train.losses import named_distillation, relational_distillation


def states(seed: int, n: int = 5, tokens: int = 4, width: int = 6) -> torch.Tensor:
    return torch.randn(n, tokens, width, generator=torch.Generator().manual_seed(seed))


MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])


def by_hand(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, a: float, b: float) -> float:
    """The loss from its definition, pair by pair, in float64."""

    def pooled(h: torch.Tensor) -> list[torch.Tensor]:
        return [h[i, mask[i].bool()].double().mean(0) for i in range(h.shape[0])]

    ps, pt = pooled(s), pooled(t)
    n = len(ps)
    pairs = [
        (F.cosine_similarity(ps[i], ps[j], dim=0) - F.cosine_similarity(pt[i], pt[j], dim=0)) ** 2
        for i in range(n) for j in range(n) if i != j
    ]  # fmt: skip
    cos = [1 - F.cosine_similarity(ps[i], pt[i], dim=0) for i in range(n)]
    return float(a * sum(pairs) / len(pairs) + b * sum(cos) / n)


def test_the_loss_is_its_definition() -> None:
    s, t = states(0), states(1)
    batch = {"attention_mask": MASK}
    got = relational_distillation(2.0, 0.5)(s, t, batch)
    assert float(got) == pytest.approx(by_hand(s, t, MASK, 2.0, 0.5), rel=1e-5)


def test_zero_for_the_same_embeddings_and_positive_otherwise() -> None:
    t = states(1)
    batch = {"attention_mask": MASK}
    loss = relational_distillation()
    assert float(loss(t.clone(), t, batch)) == pytest.approx(0.0, abs=1e-6)
    # a uniform rescale changes no cosine: still zero (the loss reads directions only)
    assert float(loss(3.0 * t, t, batch)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(states(2), t, batch)) > 1e-3
    # the matrix term alone: a rotation of every embedding by the same orthogonal map keeps
    # every pairwise similarity, so only the cosine term sees it
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3)))
    assert float(relational_distillation(1.0, 0.0)(t @ q, t, batch)) == pytest.approx(0, abs=1e-6)
    assert float(relational_distillation(0.0, 1.0)(t @ q, t, batch)) > 1e-3


def test_gradient_reaches_the_student_only() -> None:
    s, t = states(0).requires_grad_(), states(1).requires_grad_()
    relational_distillation()(s, t, {"attention_mask": MASK}).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    assert float(s.grad[1, 2:].abs().sum()) == 0.0  # padding tokens get no gradient
    assert t.grad is None  # the teacher is a constant


def test_named_and_summed() -> None:
    s, t = states(0), states(1)
    batch = {"attention_mask": MASK}
    alone = named_distillation("relational")(s, t, batch)
    torch.testing.assert_close(alone, relational_distillation()(s, t, batch))
    both = named_distillation("pooled+relational")(s, t, batch)
    torch.testing.assert_close(both, named_distillation("pooled")(s, t, batch) + alone)
    with pytest.raises(TensorslimError, match="unknown distillation loss 'nope'"):
        named_distillation("relational+nope")
    with pytest.raises(TensorslimError, match="attention_mask"):
        relational_distillation()(s, t, None)
