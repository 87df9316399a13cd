"""transformers' Conv1D (weight stored (in, out)) is a Linear-like layer: one adapter, every
Linear method, exact against the same method on the equivalent nn.Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.calibration import input_rows
from tensorslim.analysis.flops import dense_layer_flops
from tensorslim.analysis.output_error import weight_rows_matrix
from tensorslim.analysis.profile import COMPRESSIBLE
from tensorslim.facts import LayerInfo
from tensorslim.layers.linear_like import (
    LinearLike,
    as_linear,
    is_linear_like,
    linear_features,
    linear_weight,
)

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")


def conv1d(nx: int = 12, nf: int = 20, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = pytorch_utils.Conv1D(nf, nx)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def test_adapter_views_conv1d_as_the_linear_it_computes() -> None:
    layer = conv1d()
    assert is_linear_like(layer) and isinstance(layer, LinearLike)
    assert isinstance(layer, COMPRESSIBLE) and issubclass(type(layer), LinearLike)
    assert not is_linear_like(nn.Conv2d(3, 4, 3)) and not isinstance(nn.Embedding(3, 4), LinearLike)
    assert linear_features(layer) == (12, 20)
    assert linear_weight(layer).shape == (20, 12)
    assert linear_weight(layer).data_ptr() == layer.weight.data_ptr()  # a view, no copy
    x = torch.randn(3, 5, 12)
    linear = as_linear(layer)
    assert isinstance(linear, nn.Linear) and linear.weight.is_contiguous()
    torch.testing.assert_close(linear(x), layer(x), rtol=0, atol=1e-6)
    plain = nn.Linear(4, 5)
    assert as_linear(plain) is plain and as_linear(linear) is linear
    view = as_linear(layer, copy=False)  # for planning: the same storage and version counter
    assert view.weight.data_ptr() == layer.weight.data_ptr()
    torch.testing.assert_close(view(x), layer(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert view.weight._version == layer.weight._version
    torch.testing.assert_close(view.weight, layer.weight.t(), rtol=0, atol=0)


def test_planning_a_conv1d_model_keeps_no_copy_of_its_weights() -> None:
    """The planning store (the factorizations apply reuses) holds views of the Conv1D weights:
    a copy per layer was a second GPT-2 in memory while planning (issue 15's peak memory)."""
    model = nn.Sequential(conv1d(12, 20), nn.ReLU(), conv1d(20, 12, seed=1)).eval()
    plan = ts.plan(model, "svd", "params=0.6", torch.randn(2, 12), allow_slower=True)
    store = plan.__dict__["_planner"].factorizations
    assert len(store) >= 1
    weights = {m.weight.untyped_storage().data_ptr() for m in model if hasattr(m, "weight")}
    for entry in store.entries.values():
        assert entry.weight.untyped_storage().data_ptr() in weights
    small = ts.apply(model, plan)  # the stored factorizations still serve apply
    x = torch.randn(3, 12)
    assert torch.isfinite(small(x)).all() and len(store) == 0


def test_flops_calibration_rows_and_error_matrix_use_the_out_in_orientation() -> None:
    layer = conv1d()
    assert dense_layer_flops(layer, (2, 7, 12)) == 2 * 14 * 12 * 20
    torch.testing.assert_close(weight_rows_matrix(layer), layer.weight.detach().double().T)
    x = torch.randn(2, 7, 12)
    rows = torch.cat(list(input_rows(layer, x)))
    assert rows.shape == (14, 12)
    # output = M · row for every row, as for a Linear
    out = rows @ weight_rows_matrix(layer).T + layer.bias.double()
    torch.testing.assert_close(out.float(), layer(x).reshape(14, 20), rtol=1e-5, atol=1e-5)


CONFIGS = [
    ("svd", {}, {"rank": 16, "scheme": "channel"}),
    ("svd_train", {"linear": True}, {"scheme": "channel"}),
    ("tt", {}, None),
    ("debut", {}, None),
    ("rpg", {}, {"sparsity": 0.5}),
    ("gmp", {}, {"sparsity": 0.5}),
    ("rigl", {}, {"sparsity": 0.5}),
]


@pytest.mark.parametrize(("name", "settings", "config"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_linear_method_builds_conv1d_exactly_as_the_equivalent_linear(
    name: str, settings: dict, config: dict | None
) -> None:
    layer = conv1d(nx=16, nf=16)
    linear = as_linear(layer)
    method = ts.get_method(name, **settings)
    info = LayerInfo("fc", "Conv1D", (1, 3, 16), (1, 3, 16), 16 * 17, 2 * 3 * 16 * 16)
    assert method.supports(layer, "fc") is None
    options = method.candidates(layer, info)
    reference = method.candidates(linear, info)
    assert [(o.config, o.params, o.flops) for o in options] == [
        (o.config, o.params, o.flops) for o in reference
    ]
    for o, r in zip(options, reference, strict=True):
        assert o.error == pytest.approx(r.error, rel=1e-5, abs=1e-7)
    chosen = config or options[-1].config
    x = torch.randn(2, 3, 16)
    torch.manual_seed(1)
    built = method.build(layer, chosen, info)
    torch.manual_seed(1)
    expected = method.build(linear, chosen, info)
    torch.testing.assert_close(built(x), expected(x), rtol=1e-5, atol=1e-5)
    if name in ("svd", "svd_train") or name in ("rpg", "gmp", "rigl"):
        # full rank / an all-ones mask: the dense map itself
        torch.testing.assert_close(built(x), layer(x), rtol=1e-4, atol=1e-5)
    skeleton = method.build(layer, chosen, info, init=False)
    assert skeleton(x).shape == (2, 3, 16)


def test_calibration_fisher_of_a_conv1d_is_in_the_linear_orientation() -> None:
    from tensorslim.analysis.calibration import collect_statistics

    layer = conv1d(nx=6, nf=4)
    linear = as_linear(layer)
    x = torch.randn(5, 6)
    loader = [(x, torch.zeros(5))]

    def loss_fn(out: torch.Tensor, batch: object) -> torch.Tensor:
        return (out**2).sum()

    needs = {"fisher", "gram"}
    got = collect_statistics(layer, loader, {"": layer}, needs, loss_fn=loss_fn, progress=False)
    want = collect_statistics(linear, loader, {"": linear}, needs, loss_fn=loss_fn, progress=False)
    assert got[""].fisher.shape == (4, 6)
    torch.testing.assert_close(got[""].fisher, want[""].fisher, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[""].gram, want[""].gram)
