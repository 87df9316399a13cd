"""Mask parametrization, finalize, compact sparse storage and the sparse inference modules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.layers.sparse import (
    SparseConv2d,
    SparseLinear,
    WeightMask,
    add_mask,
    baked_state_dict,
    finalize,
    load_sparse,
    mask_of,
    masked_modules,
    original_weight,
    save_sparse,
    set_mask,
    sparse_state,
    to_sparse_inference,
    unpack_sparse_state,
    weight_sparsity,
)


def random_mask(shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < density).float()


def test_mask_parametrization_keeps_parameter_and_masks_forward() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    param = layer.weight
    mask = random_mask((4, 6), 0.5)
    add_mask(layer, mask)
    holder = mask_of(layer)
    assert isinstance(holder, WeightMask)
    # The trained tensor is the same Parameter object (an optimizer made before keeps working).
    assert original_weight(layer) is param
    assert isinstance(param, nn.Parameter)
    assert torch.equal(layer.weight, param.detach() * mask)
    x = torch.randn(3, 6)
    expected = x @ (param.detach() * mask).T + layer.bias.detach()
    torch.testing.assert_close(layer(x), expected)
    keys = set(layer.state_dict())
    assert {"parametrizations.weight.original", "parametrizations.weight.0.mask", "bias"} == keys
    # Gradient reaching the parameter is masked.
    layer(x).sum().backward()
    assert torch.all(param.grad[mask == 0] == 0)


def test_dense_gradient_capture_matches_unmasked_gradient() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(5, 3)
    masked = nn.Linear(5, 3)
    masked.load_state_dict(dense.state_dict())
    mask = random_mask((3, 5), 0.4, seed=1)
    add_mask(masked, mask)
    with torch.no_grad():
        # Same effective weight in both: the dense one holds the masked values.
        dense.weight.mul_(mask)
    holder = mask_of(masked)
    holder.start_capture()
    x = torch.randn(7, 5)
    # Two reads of the weight in one step (forward + a regularizer): the hooks must sum.
    loss = masked(x).pow(2).sum() + masked.weight.pow(2).sum()
    loss.backward()
    ref_loss = dense(x).pow(2).sum() + dense.weight.pow(2).sum()
    ref_loss.backward()
    torch.testing.assert_close(holder.dense_grad, dense.weight.grad)
    # The dense gradient is nonzero at pruned positions, the parameter's is zero there.
    assert holder.dense_grad[mask == 0].abs().sum() > 0
    assert torch.all(original_weight(masked).grad[mask == 0] == 0)
    holder.stop_capture()
    assert holder.dense_grad is None
    masked(x).sum().backward()
    assert holder.dense_grad is None


def test_finalize_bakes_zeros_and_removes_parametrization() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    add_mask(model[0], random_mask((4, 1, 3, 3), 0.3))
    add_mask(model[2], random_mask((3, 64), 0.2))
    x = torch.randn(2, 2, 6, 6)
    before = model(x)
    finalize(model)
    assert list(masked_modules(model)) == []
    assert isinstance(model[0].weight, nn.Parameter)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(model(x), before)
    assert weight_sparsity(model[2]) > 0.6


def test_mask_errors_are_clear() -> None:
    layer = nn.Linear(3, 2)
    with pytest.raises(TensorslimError, match="shape"):
        add_mask(layer, torch.ones(3, 2), name="fc")
    with pytest.raises(TensorslimError, match="only 0 and 1"):
        add_mask(layer, torch.full((2, 3), 0.5), name="fc")
    with pytest.raises(TensorslimError, match="no pruning mask"):
        set_mask(layer, torch.ones(2, 3), name="fc")
    add_mask(layer, name="fc")
    with pytest.raises(TensorslimError, match="already has"):
        add_mask(layer, name="fc")
    with pytest.raises(TensorslimError, match="BatchNorm"):
        add_mask(nn.BatchNorm2d(3), name="bn")


def test_masked_model_state_dict_round_trip_into_fresh_skeleton() -> None:
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    add_mask(trained[0], random_mask((6, 8), 0.3))
    add_mask(trained[2], random_mask((2, 6), 0.5))
    skeleton = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    add_mask(skeleton[0])
    add_mask(skeleton[2])
    skeleton.load_state_dict(trained.state_dict())
    x = torch.randn(4, 8)
    torch.testing.assert_close(skeleton(x), trained(x))
    assert torch.equal(mask_of(skeleton[0]).mask, mask_of(trained[0]).mask)


def test_baked_state_dict_matches_finalized_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    add_mask(model[0], random_mask((6, 8), 0.3))
    baked = baked_state_dict(model)
    assert "parametrizations.weight.original" not in "".join(baked)
    finalized = finalize(model).state_dict()
    assert set(baked) == set(finalized)
    for key in baked:
        assert torch.equal(baked[key], finalized[key])


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_sparse_state_round_trip_is_exact(rows: int, cols: int, density: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    state = {"w": weight, "b": torch.randn(rows, generator=g), "n": torch.tensor(3)}
    packed = sparse_state(state)
    restored = unpack_sparse_state(packed)
    assert set(restored) == set(state)
    for key in state:
        assert restored[key].dtype == state[key].dtype
        assert torch.equal(restored[key], state[key])
    stored = sum(t.numel() * t.element_size() for t in packed.values())
    dense = sum(t.numel() * t.element_size() for t in state.values())
    assert stored <= dense + 2 * 8  # at worst the shape vector of one tensor is added


def test_sparse_state_picks_compact_encodings() -> None:
    torch.manual_seed(0)
    n = 100_000
    very = torch.randn(n) * random_mask((n,), 0.01)  # 99 % sparse: indices pay best
    mid = torch.randn(n) * random_mask((n,), 0.3, seed=1)  # 70 % sparse: the bitmap pays best
    dense = torch.randn(n)
    packed = sparse_state({"very": very, "mid": mid, "dense": dense})
    assert "very@sparse.indices" in packed and "very@sparse.bitmap" not in packed
    assert "mid@sparse.bitmap" in packed and "mid@sparse.indices" not in packed
    assert "dense" in packed and torch.equal(packed["dense"], dense)
    very_bytes = sum(
        t.numel() * t.element_size() for k, t in packed.items() if k.startswith("very@")
    )
    assert very_bytes < 0.03 * n * 4


def test_save_and_load_sparse_safetensors(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    add_mask(model[0], random_mask((8, 3, 3, 3), 0.1))
    add_mask(model[2], random_mask((10, 288), 0.05))
    size = save_sparse(model, tmp_path / "w.safetensors")
    dense_bytes = sum(t.numel() * 4 for t in baked_state_dict(model).values())
    assert size < 0.4 * dense_bytes
    state = load_sparse(tmp_path / "w.safetensors")
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), model(x))
    with pytest.raises(TensorslimError, match="does not exist"):
        load_sparse(tmp_path / "missing.safetensors")


def test_unpack_rejects_incomplete_files() -> None:
    packed = sparse_state({"w": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0])})
    assert "w@sparse.values" in packed
    broken = {k: v for k, v in packed.items() if not k.endswith("shape")}
    with pytest.raises(TensorslimError, match="incomplete"):
        unpack_sparse_state(broken)


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_dense(bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(20, 7, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(random_mask((7, 20), 0.2))
    sparse = SparseLinear.from_dense(layer)
    x = torch.randn(2, 3, 20)
    torch.testing.assert_close(sparse(x), layer(x), atol=1e-5, rtol=1e-5)
    nnz = int((layer.weight != 0).sum())
    assert sparse.nnz() == nnz
    assert sparse.analytic_flops((2, 3, 20)) == 2 * 6 * nnz
    assert sparse.nonzero_params() == nnz + (7 if bias else 0)
    torch.testing.assert_close(sparse.to_dense().weight, layer.weight)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": (3, 1), "stride": 2, "padding": (1, 0), "bias": False},
        {"kernel_size": 3, "dilation": 2, "padding": "same"},
        {"kernel_size": 1},
        {"kernel_size": 3, "padding": "valid", "stride": (1, 2)},
    ],
)
def test_sparse_conv_matches_dense(kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **kwargs)
    with torch.no_grad():
        conv.weight.mul_(random_mask(tuple(conv.weight.shape), 0.3))
    sparse = SparseConv2d.from_dense(conv)
    x = torch.randn(2, 4, 9, 8)
    torch.testing.assert_close(sparse(x), conv(x), atol=1e-5, rtol=1e-5)
    out = conv(x)
    nnz = int((conv.weight != 0).sum())
    assert sparse.analytic_flops(tuple(x.shape)) == 2 * 2 * out.shape[2] * out.shape[3] * nnz
    torch.testing.assert_close(sparse.to_dense()(x), out, atol=1e-5, rtol=1e-5)


def test_sparse_flops_agree_with_counter_on_the_dense_equivalent() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    sparse = SparseConv2d.from_dense(conv)  # fully dense weight: nnz = all weights
    x = torch.randn(2, 3, 7, 7)
    with FlopCounterMode(display=False) as counter:
        conv(x)
    assert sparse.analytic_flops(tuple(x.shape)) == counter.get_total_flops()


def test_sparse_conv_refuses_what_it_cannot_reproduce() -> None:
    with pytest.raises(TensorslimError, match="grouped"):
        SparseConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TensorslimError, match="padding_mode"):
        SparseConv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    masked = nn.Linear(3, 3)
    add_mask(masked)
    with pytest.raises(TensorslimError, match="finalize"):
        SparseLinear(masked)


def test_to_sparse_inference_converts_sparse_layers_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 10),
    )
    add_mask(model[0], random_mask((8, 3, 3, 3), 0.1))
    add_mask(model[2], random_mask((8, 4, 3, 3), 0.1, seed=2))
    add_mask(model[4], random_mask((10, 200), 0.1, seed=3))
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(UserWarning, match="grouped"):
        fast = to_sparse_inference(model, min_sparsity=0.5)
    assert isinstance(fast[0], SparseConv2d)
    assert isinstance(fast[2], nn.Conv2d)  # grouped: stays dense (masks baked)
    assert isinstance(fast[4], SparseLinear)
    assert mask_of(model[0]) is not None  # the original model is untouched
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
    linear_only = to_sparse_inference(model, min_sparsity=0.5, convs=False)
    assert isinstance(linear_only[0], nn.Conv2d) and isinstance(linear_only[4], SparseLinear)
    assert not isinstance(to_sparse_inference(model, min_sparsity=0.95)[4], SparseLinear)
    with pytest.raises(TensorslimError, match="min_sparsity"):
        to_sparse_inference(model, min_sparsity=1.5)


def test_finalizing_a_deep_copy_leaves_the_original_intact() -> None:
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    add_mask(model[0], random_mask((3, 4), 0.5))
    clone = finalize(copy.deepcopy(model))
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), clone(x))
    assert mask_of(model[0]) is not None and mask_of(clone[0]) is None
