"""Calibration statistics equal a direct computation over the same batches, in bounded memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.analysis.calibration import collect_statistics, input_rows
from tensorslim.errors import TensorslimError

ALL = ("gram", "abs_mean", "sq_mean", "output_energy")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(6, 2, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g))
        for _ in range(n)
    ]


@torch.no_grad()
def test_statistics_equal_a_direct_computation() -> None:
    torch.manual_seed(0)
    net = Net().double().eval()
    data = [(x.double(), y) for x, y in batches()]
    stats = collect_statistics(net, data, {"conv": net.conv, "fc": net.fc}, ALL, progress=False)
    # direct: every patch of every batch, and every input row of fc, stacked
    patches = torch.cat(
        [F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18) for x, _ in data]
    )
    hidden = torch.cat([torch.relu(net.conv(x)).flatten(1) for x, _ in data])
    for name, rows, out in (
        ("conv", patches, torch.cat([net.conv(x) for x, _ in data])),
        ("fc", hidden, net.fc(hidden)),
    ):
        s = stats[name]
        assert s.rows == rows.shape[0] and s.batches == 3
        torch.testing.assert_close(s.gram, rows.T @ rows)
        torch.testing.assert_close(s.abs_mean, rows.abs().mean(0))
        torch.testing.assert_close(s.sq_mean, rows.pow(2).mean(0))
        assert s.output_energy == pytest.approx(float(out.pow(2).sum()), rel=1e-10)


def test_fisher_is_the_sum_of_squared_batch_gradients() -> None:
    torch.manual_seed(0)
    net = Net().double().eval()
    data = [(x.double(), y) for x, y in batches()]
    loss_fn = lambda out, batch: F.cross_entropy(out, batch[1])  # noqa: E731
    stats = collect_statistics(
        net, data, {"fc": net.fc}, ["fisher"], loss_fn=loss_fn, progress=False
    )
    want = torch.zeros_like(net.fc.weight)
    for x, y in data:
        grad = torch.autograd.grad(F.cross_entropy(net(x), y), net.fc.weight)[0]
        want += grad.pow(2)
    torch.testing.assert_close(stats["fc"].fisher, want)
    assert net.fc.weight.grad is None, "calibration leaves no gradients behind"
    with pytest.raises(TensorslimError, match="needs a loss"):
        collect_statistics(net, data, {"fc": net.fc}, ["fisher"])


def test_sensitivity_is_the_summed_squared_gradient_of_the_layer_output() -> None:
    torch.manual_seed(0)
    net = Net().double().eval()
    data = [(x.double(), y) for x, y in batches()]
    loss_fn = lambda out, batch: F.cross_entropy(out, batch[1])  # noqa: E731
    layers = {"conv": net.conv, "fc": net.fc}
    stats = collect_statistics(net, data, layers, ["sensitivity"], loss_fn=loss_fn, progress=False)
    want = {"conv": 0.0, "fc": 0.0}
    for x, y in data:
        hidden = net.conv(x)
        logits = net.fc(torch.relu(hidden).flatten(1))
        grads = torch.autograd.grad(F.cross_entropy(logits, y), [hidden, logits])
        want["conv"] += float(grads[0].pow(2).sum())
        want["fc"] += float(grads[1].pow(2).sum())
    for name in layers:
        assert stats[name].sensitivity == pytest.approx(want[name], rel=1e-10)
    assert net.fc.weight.grad is None and net.conv.weight.grad is None
    with pytest.raises(TensorslimError, match="sensitivity statistic needs a loss"):
        collect_statistics(net, data, layers, ["sensitivity"])


def test_padding_modes_and_same_padding_match_the_conv_itself() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.double)
    for conv in (
        nn.Conv2d(3, 4, (3, 2), padding="same", dilation=(2, 1)),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(3, 4, 3, padding="valid", stride=2),
    ):
        conv = conv.double()
        rows = torch.cat(list(input_rows(conv, x)))
        out = rows @ conv.weight.reshape(4, -1).T + conv.bias
        want = conv(x).permute(0, 2, 3, 1).reshape(-1, 4)
        torch.testing.assert_close(out, want)


def test_a_shared_layer_accumulates_every_call_under_each_name() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    data = [torch.randn(4, 3) for _ in range(2)]
    stats = collect_statistics(model, data, {"0": shared, "2": shared}, ["gram"], progress=False)
    assert stats["0"] is stats["2"] and stats["0"].rows == 2 * 2 * 4


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_memory_stays_bounded_over_200_batches() -> None:
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))

    def loader(n: int):
        g = torch.Generator().manual_seed(0)
        for _ in range(n):
            yield torch.randn(512, 256, generator=g)  # 0.5 MB per batch, 100 MB for 200

    layers = {"0": net[0], "2": net[2]}
    collect_statistics(net, loader(5), layers, ALL, progress=False)  # warm allocator caches
    before = _rss_mb()
    stats = collect_statistics(net, loader(200), layers, ALL, progress=False)
    grown = _rss_mb() - before
    assert stats["0"].rows == 200 * 512
    assert grown < 40, f"calibration kept {grown:.0f} MB: activations must not be stored"


def test_bad_requests_are_clear_errors() -> None:
    net = Net()
    with pytest.raises(TensorslimError, match="unknown calibration statistic 'hessian'"):
        collect_statistics(net, batches(), {"fc": net.fc}, ["hessian"])
    with pytest.raises(TensorslimError, match="no batch"):
        collect_statistics(net, [], {"fc": net.fc}, ["gram"], progress=False)
