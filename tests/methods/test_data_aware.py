"""ASVD, SVD-LLM and FWSVD: the math of the weighted truncations, and plan → apply → save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.calibration import collect_statistics
from tensorslim.analysis.output_error import relative_output_error
from tensorslim.analysis.profile import collect_layer_info
from tensorslim.errors import TensorslimError
from tensorslim.methods.registry import builder_of

DATA_AWARE = ("asvd", "svd_llm", "fwsvd")


class TwoLayer(nn.Module):
    """Linear(12 → 10) → tanh → Linear(10 → 6) on inputs with very unequal channel scales."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, 12)  # outlier channels, as in transformer activations
    return [torch.randn(16, 12, generator=g) * scale for _ in range(n)]


def square_loss(output: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return output.pow(2).mean()


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return TwoLayer().eval()


def layer_stats(model: nn.Module, name: str) -> dict:
    needs = ts.get_method(name).calibration_needs
    loss = square_loss if "fisher" in needs else None
    layers = {"fc1": model.fc1, "fc2": model.fc2}
    return collect_statistics(model, batches(), layers, needs, loss_fn=loss, progress=False)


@pytest.mark.parametrize("name", DATA_AWARE)
def test_full_rank_reproduces_the_layer(model, name: str) -> None:
    stats = layer_stats(model, name)
    infos, _ = collect_layer_info(model, batches()[0][:1])
    method = ts.get_method(name)
    x = batches(1, seed=5)[0]
    for fqn in ("fc1", "fc2"):
        layer = model.get_submodule(fqn)
        full = min(layer.weight.shape)
        built = method.build(layer, {"rank": full}, infos[fqn], init=True, stats=stats[fqn])
        inputs = x if fqn == "fc1" else torch.randn(16, 10)
        torch.testing.assert_close(built(inputs), layer(inputs), rtol=1e-5, atol=1e-5)
        assert builder_of(built) == "svd"  # the structure read back is plain low rank


@pytest.mark.parametrize("name", DATA_AWARE)
def test_candidate_errors_are_the_measured_output_errors(model, name: str) -> None:
    stats = layer_stats(model, name)["fc1"]
    info = collect_layer_info(model, batches()[0][:1])[0]["fc1"]
    method = ts.get_method(name)
    options = method.candidates(model.fc1, info, stats)
    x = torch.cat(batches())
    for option in options:
        built = method.build(model.fc1, option.config, info, init=True, stats=stats)
        # the built layer is float32: its factors carry ~1e-7 relative rounding
        w_hat = built.to_dense().weight.detach().double()
        w = model.fc1.weight.detach().double()
        measured = (x.double() @ (w - w_hat).T).norm() / (x.double() @ w.T).norm()
        assert option.error_space == "output"
        assert option.error == pytest.approx(float(measured), rel=1e-4, abs=1e-6)
        assert option.error == pytest.approx(
            relative_output_error(w, w_hat, stats.gram), rel=1e-4, abs=1e-6
        )


def test_svd_llm_truncation_error_is_the_dropped_singular_values(model) -> None:
    from tensorslim.decompose.weighted_svd import weighted_svd, whitening

    stats = layer_stats(model, "svd_llm")["fc1"]
    weighting = whitening(stats.gram)
    assert weighting.ridge == 0.0  # 64 rows of 12 channels: the Gram is positive definite
    _, s, _ = weighted_svd(model.fc1.weight.detach(), weighting)
    info = collect_layer_info(model, batches()[0][:1])[0]["fc1"]
    options = ts.get_method("svd_llm").candidates(model.fc1, info, stats)
    for option in options:
        r = option.config["rank"]
        expected = (s[r:].pow(2).sum() / s.pow(2).sum()).sqrt()
        assert option.error == pytest.approx(float(expected), rel=1e-6, abs=1e-9)


def test_svd_llm_beats_plain_svd_in_output_space(model) -> None:
    stats = layer_stats(model, "svd_llm")["fc1"]
    info = collect_layer_info(model, batches()[0][:1])[0]["fc1"]
    options = ts.get_method("svd_llm").candidates(model.fc1, info, stats)
    llm = {o.config["rank"]: o.error for o in options}
    plain = ts.get_method("svd").output_errors(
        model.fc1, info, ts.get_method("svd").candidates(model.fc1, info), stats
    )
    for option in plain:
        # whitening is optimal in output space: never worse than the weight-space truncation
        assert llm[option.config["rank"]] <= option.error + 1e-9


def test_asvd_with_alpha_zero_is_plain_svd(model) -> None:
    stats = layer_stats(model, "asvd")["fc1"]
    info = collect_layer_info(model, batches()[0][:1])[0]["fc1"]
    built = ts.get_method("asvd", alpha=0.0).build(model.fc1, {"rank": 4}, info, stats=stats)
    plain = ts.get_method("svd").build(model.fc1, {"rank": 4, "scheme": "channel"}, info)
    torch.testing.assert_close(
        built.to_dense().weight, plain.to_dense().weight, rtol=1e-5, atol=1e-6
    )


def test_whitening_adds_a_ridge_only_when_the_gram_is_singular() -> None:
    from tensorslim.decompose.weighted_svd import weighted_factors, whitening

    x = torch.randn(3, 8, dtype=torch.float64)  # 3 rows of 8 channels: rank-3 Gram
    weighting = whitening(x.T @ x)
    assert weighting.ridge > 0
    w = torch.randn(5, 8, dtype=torch.float64)
    a, b = weighted_factors(w, weighting, 5)
    torch.testing.assert_close(a @ b.T, w)  # full rank is still exact


@pytest.mark.parametrize("name", DATA_AWARE)
def test_plan_apply_save_load_with_calibration(model, name: str, tmp_path) -> None:
    loss = square_loss if name == "fwsvd" else None
    plan = ts.plan(model, name, "params=0.6", calibration=batches(), loss_fn=loss)
    assert plan.error_space == "output" and plan.compressed_layers
    small = ts.apply(model, plan)
    x = batches(1, seed=9)[0]
    ts.save(small, tmp_path)
    again = ts.load(tmp_path, TwoLayer())
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)
    # a plan read from disk has no statistics: apply recomputes them from calibration=
    reread = ts.CompressionPlan.from_text(plan.to_json())
    with pytest.raises(TensorslimError, match="calibration="):
        ts.apply(model, reread)
    rebuilt = ts.apply(model, reread, calibration=batches(), loss_fn=loss)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), small(x))


def test_without_calibration_the_error_says_what_to_pass(model) -> None:
    with pytest.raises(TensorslimError, match="needs calibration data"):
        ts.plan(model, "svd_llm", "params=0.5", batches()[0])
    with pytest.raises(TensorslimError, match="loss_fn"):
        ts.plan(model, "fwsvd", "params=0.5", calibration=batches())


def test_asvd_rejects_a_negative_alpha() -> None:
    with pytest.raises(TensorslimError, match="alpha"):
        ts.get_method("asvd", alpha=-1.0)


def test_refit_keeps_the_first_svd_llm_layer_and_improves_the_next(model) -> None:
    from tensorslim.refit import refit_right_factors

    data = batches()
    plan = ts.plan(model, "svd_llm", "params=0.5", calibration=data, layers=["fc1", "fc2"])
    small = ts.apply(model, plan)
    first = small.fc1.down.weight.detach().clone()
    report = refit_right_factors(model, small, data, batches=len(data), ridge=0.0)
    # fc1 sees the original inputs: SVD-LLM's factor is already the least-squares optimum
    torch.testing.assert_close(small.fc1.down.weight, first, rtol=1e-4, atol=1e-5)
    assert report["fc1"]["after"] == pytest.approx(report["fc1"]["before"], rel=1e-6, abs=1e-8)
    # fc2 sees fc1's approximate outputs: the update lowers its error on those inputs
    assert report["fc2"]["after"] < report["fc2"]["before"]


def test_refit_of_both_factors_is_the_best_rank_r_fit_to_the_compressed_inputs(model) -> None:
    from tensorslim.refit import refit_factors, refit_right_factors

    data = batches()
    plan = ts.plan(model, "svd_llm", "params=0.5", calibration=data, layers=["fc1", "fc2"])
    right, both = ts.apply(model, plan), ts.apply(model, plan)
    product = (both.fc1.up.weight @ both.fc1.down.weight).detach().clone()
    got_right = refit_right_factors(model, right, data, batches=len(data), ridge=0.0)
    got_both = refit_factors(model, both, data, factors="both", batches=len(data), ridge=0.0)
    # fc1 sees the original inputs: re-whitening gives back SVD-LLM's layer
    torch.testing.assert_close(both.fc1.up.weight @ both.fc1.down.weight, product,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    # fc2: the optimum over both factors beats the right factor's, which beats none
    assert got_both["fc2"]["after"] < got_right["fc2"]["after"] < got_right["fc2"]["before"]
    # and it is optimal: perturbed factors of the same rank fit the compressed inputs worse
    x = torch.cat([torch.tanh(model.fc1(b)) for b in data]).detach().double()
    x_tilde = torch.cat([torch.tanh(both.fc1(b)) for b in data]).detach().double()
    target = x @ model.fc2.weight.detach().double().T
    u, v = both.fc2.up.weight.detach().double(), both.fc2.down.weight.detach().double()
    best = float((target - x_tilde @ (u @ v).T).norm())
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        du, dv = (1e-2 * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (u, v))
        assert best < float((target - x_tilde @ ((u + du) @ (v + dv)).T).norm())
    with pytest.raises(TensorslimError, match="factors"):
        refit_factors(model, both, data, factors="left")


@pytest.mark.parametrize("name", DATA_AWARE)
def test_hf_conv1d_layers_are_factorized_like_linears(name: str) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is absent")
    conv1d = transformers.pytorch_utils.Conv1D

    class Gpt2Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc, self.c_proj = conv1d(10, 12), conv1d(6, 10)  # Conv1D(nf=out, nx=in)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_proj(torch.tanh(self.c_fc(x)))

    torch.manual_seed(0)
    mlp = Gpt2Mlp().eval()
    loss = square_loss if name == "fwsvd" else None
    plan = ts.plan(mlp, name, "params=0.99", calibration=batches(), loss_fn=loss)
    full = {lp.fqn: lp for lp in plan.compressed_layers}
    assert full, [lp.reason for lp in plan.layers]
    for lp in full.values():
        lp.config = {"rank": min(lp.input_shape[-1], lp.output_shape[-1])}
    small = ts.apply(mlp, plan)
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), mlp(x), rtol=1e-4, atol=1e-5)


class AttentionAndRecurrent(nn.Module):
    """x → MultiheadAttention (self) → LSTM → Linear: two composite layers and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.lstm(y)[0])


@pytest.mark.parametrize("name", ["asvd", "svd_llm"])
def test_attention_and_recurrent_layers_state_the_missing_statistics(name: str) -> None:
    """The plan says per layer which inputs' statistics a data-aware method lacks there."""
    torch.manual_seed(0)
    net = AttentionAndRecurrent().eval()
    data = [torch.randn(4, 5, 8) for _ in range(2)]
    plan = ts.plan(net, name, "params=0.9", calibration=data)
    attn, lstm = plan.layer("attn"), plan.layer("lstm")
    assert attn.method is None and "query/key/value inputs" in attn.reason
    assert lstm.method is None and "h_{t-1}" in lstm.reason
    assert name in attn.reason and "plain svd" in lstm.reason
