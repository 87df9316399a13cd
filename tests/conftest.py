"""Shared test helpers: FLOP counting with torch's counter, tiny models, a seeded RNG."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tensorslim.models import BasicBlock

# On a shared 2-core machine a second intra-op thread spins against other processes and makes
# LAPACK calls (svdvals) up to 500× slower; the tests check results, not speed.
torch.set_num_threads(1)


def counted_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of ``module(*inputs)`` as ``torch.utils.flop_counter`` counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


class TinyCNN(nn.Module):
    """conv(1→8) → conv(8→16, stride 2) → Linear(16·7·7 → 32) → Linear(32 → 10), on 1×14×14."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16 * 7 * 7, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TinyResNet(nn.Module):
    """stem conv(3→8) + BN + ReLU → stage of 2 blocks (8) → stage of 1 block (16, stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.relu(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def conv_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, bool]:
    """fqn of each conv → whether its output is channels_last (and not also NCHW)."""
    seen: dict[str, bool] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            channels_last = out.is_contiguous(memory_format=torch.channels_last)
            seen.setdefault(name, channels_last and not out.is_contiguous())

        return hook

    handles = [
        m.register_forward_hook(record(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def tiny_input() -> torch.Tensor:
    return torch.randn(4, 1, 14, 14, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session", autouse=True)
def _plans_skip_latency() -> Iterator[None]:
    """Tests check the FLOPs/params allocation on tiny models, whose factorized layers are often
    slower than dense at batch 4: they plan as with ``allow_slower=True`` (no timing, the same
    choice every run), module and session fixtures included. Tests of the measured-latency
    default are marked ``measured_latency``; recipes run in a subprocess say
    ``allow_slower: true``."""
    import tensorslim.planner.pipeline as planner

    saved = planner.ALLOW_SLOWER_BY_DEFAULT
    planner.ALLOW_SLOWER_BY_DEFAULT = True
    yield
    planner.ALLOW_SLOWER_BY_DEFAULT = saved


@pytest.fixture(autouse=True)
def _measured_latency_marker(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if request.node.get_closest_marker("measured_latency") is not None:
        monkeypatch.setattr("tensorslim.planner.pipeline.ALLOW_SLOWER_BY_DEFAULT", False)
