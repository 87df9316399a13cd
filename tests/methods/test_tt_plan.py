"""TT through the planner: full ranks reproduce the model, and a timed params budget offers the
allocator the TT ranks it can take (the small_cnn collapse, issue 17).

small_cnn's TT row fell to chance accuracy. Under ``params=0.5`` (FLOPs capped at 1.0) the
planner timed 6 of the hidden Linear's 13 TT ranks, spread evenly in FLOPs over all of them;
only rank 1-1 had no more FLOPs than the dense layer, so after the cap it was the only option
(weight error 0.998): the hidden pre-activations were the bias alone, every ReLU after it was
off for every input, and no gradient reached anything (fine-tuning stayed at loss 2.302). The
options are now narrowed to those the budget can take before the ones to time are spread. A
scripted latency cache stands in for the stopwatch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorslim as ts
from tensorslim.analysis.deployment import Deployment
from tensorslim.analysis.timing import LatencyCache
from tensorslim.decompose.tt import tt_to_matrix
from tensorslim.layers.tt import TTLinear

REST_MS = 100.0  # the rest of the model (small_cnn: its convolutions) dominates the time


class ScriptedTT(LatencyCache):
    """Dense Linear(i, o): i·o/1000 ms; a TT layer 0.5 ms + 0.01 ms per unit of TT rank (the
    lowest ranks fastest, all faster than dense); a whole model REST_MS + its layers."""

    def cost(self, module: nn.Module) -> float:
        if isinstance(module, TTLinear):
            return 0.5 + 0.01 * sum(module.ranks)
        if isinstance(module, nn.Linear):
            return module.in_features * module.out_features / 1000
        return REST_MS + sum(self._in_model(m) for m in module.children())

    def _in_model(self, module: nn.Module) -> float:
        if isinstance(module, (TTLinear, nn.Linear)):
            return self.cost(module)
        return sum(self._in_model(m) for m in module.children())

    def key(self, module: nn.Module, shape: tuple[int, ...], deployment: Deployment) -> str:
        return repr(self.cost(module))

    def get(self, key: str) -> float | None:
        return float(key)


def head() -> nn.Module:
    """A classifier head like small_cnn's: Linear(256, 64) → ReLU → Linear(64, 10), the
    hidden weight a TT-matrix of ranks (1, 3, 3, 1) over its default modes plus 5 % noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    shapes = [(1, 4, 8, 3), (3, 4, 8, 3), (3, 4, 4, 1)]  # (r, m_k, n_k, r') for 64×256
    weight = tt_to_matrix([torch.randn(shape) for shape in shapes])
    weight = weight + 0.05 * weight.std() * torch.randn_like(weight)
    with torch.no_grad():
        model[0].weight.copy_(weight / weight.std() / 256**0.5)
    return model


def test_full_rank_tt_reproduces_the_model_and_its_gradients() -> None:
    model, x = head(), torch.rand(8, 256)
    # a full-rank TT is no cheaper than dense, so the planner keeps it dense: build it directly
    small = nn.Sequential(TTLinear.from_dense(model[0]), nn.ReLU(), TTLinear.from_dense(model[2]))
    assert small[0].ranks == (1, 32, 16, 1)  # exact: no truncation
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    # the gradient reaching the input is the dense model's too (the layer trains like it)
    grads = []
    for net in (model, small):
        inp = x.clone().requires_grad_()
        net(inp).square().sum().backward()
        grads.append(inp.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


@pytest.mark.measured_latency
@pytest.mark.parametrize("objective", ["latency", "balanced", "error"])
def test_a_timed_params_budget_times_the_tt_ranks_it_can_take(objective: str) -> None:
    model, x = head(), torch.randn(8, 256)
    plan = ts.plan(model, "tt", "params=0.5", x, latency_cache=ScriptedTT(), objective=objective)
    hidden = plan.layer("0")
    # ranks 3 and 4 fit the FLOPs cap (17k, 27k ≤ 33k dense FLOPs per row) and reach the
    # weight's TT rank; timed over all the ranks' FLOPs, only 1-1 was left
    assert hidden.method == "tt" and hidden.config["ranks"] in ([1, 3, 3, 1], [1, 4, 4, 1])
    assert hidden.error < 0.1 and hidden.flops_after <= hidden.flops_before
    assert plan.estimated_params <= 0.5 * plan.model_params  # the budget is met
    assert plan.latency["objective"] == objective


def test_the_default_tt_plan_of_a_relu_head_trains() -> None:
    model, x = head(), torch.rand(128, 256)  # non-negative inputs, as after a ReLU/pool
    labels = model(x).argmax(1)
    small = ts.apply(model, ts.plan(model, "tt", "params=0.5", x))
    optimizer = torch.optim.SGD(small.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(small(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
