"""Phase seeds: derived deterministically, seeding every global generator and the loaders, so a
phase's draws do not depend on what ran before it."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tensorslim.train import seeding
from tensorslim.train.loop import fit
from tensorslim.train.seeding import (
    PhaseSeeds,
    derive_seed,
    reseed_loader,
    seed_everything,
    seed_phase,
)


def _draws() -> tuple[list[float], list[float], list[float]]:
    """A few numbers from each global generator: torch, numpy, Python."""
    return (
        torch.rand(4).tolist(),
        np.random.rand(4).tolist(),
        [random.random() for _ in range(4)],
    )


def _loader(n: int = 40, batch: int = 8, **kwargs) -> DataLoader:
    data = TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) % 2)
    return DataLoader(data, batch_size=batch, **kwargs)


def _order(loader: DataLoader) -> list[int]:
    return [int(x) for inputs, _ in loader for x in inputs[:, 0]]


def test_derive_seed_is_deterministic_distinct_and_63_bit() -> None:
    seeds = {derive_seed(0, "stage", i, kind) for i in range(8) for kind in ("train", "finetune")}
    assert len(seeds) == 16
    assert derive_seed(0, "stage", 1, "compress") == derive_seed(0, "stage", 1, "compress")
    assert derive_seed(0, "stage", 1, "compress") != derive_seed(1, "stage", 1, "compress")
    assert derive_seed(0, "a", "b") != derive_seed(0, "ab")  # names are separated
    assert all(0 <= s < 2**63 for s in seeds)
    torch.manual_seed(max(seeds))  # fits torch's seed range


def test_derive_seed_is_the_same_in_another_process() -> None:
    """Not Python's salted hash(): another interpreter with another hash seed agrees."""
    # the module file alone (no torch import): only hashlib decides the seed
    code = (
        "import importlib.util as u, sys; spec = u.spec_from_file_location('s', sys.argv[1]);"
        " m = u.module_from_spec(spec); spec.loader.exec_module(m);"
        " print(m.derive_seed(7, 'stage', 2))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, seeding.__file__],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(out.stdout) == derive_seed(7, "stage", 2)


def test_seed_everything_fixes_torch_numpy_and_python() -> None:
    seed = derive_seed(3, "phase")  # 63 bits: numpy takes it modulo 2**32
    seed_everything(seed)
    first = _draws()
    _draws()  # move every generator on
    seed_everything(seed)
    assert _draws() == first
    seed_everything(seed + 1)
    assert all(a != b for a, b in zip(_draws(), first, strict=True))


def test_reseed_loader_restarts_the_shuffle_of_a_used_loader() -> None:
    used = _loader(shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        _order(used)  # an earlier stage drew three epochs from it
    fresh = _loader(shuffle=True, generator=torch.Generator().manual_seed(99))
    reseed_loader(used, 5)
    reseed_loader(fresh, 5)
    assert _order(used) == _order(fresh)
    assert _order(used) == _order(fresh)  # and the epochs after
    assert sorted(_order(used)) == list(range(40))


def test_reseed_loader_sets_a_distributed_sampler_seed() -> None:
    data = _loader().dataset
    sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    before = _order(loader)
    reseed_loader(loader, 11)
    assert sampler.seed == 11
    reference = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=11)
    assert _order(loader) == list(map(int, reference)) != before


def test_seed_phase_ignores_what_ran_before() -> None:
    loader = _loader(shuffle=True, generator=torch.Generator().manual_seed(0))
    seed = seed_phase(0, "stage", 1, "finetune", loaders=[loader])
    first = (_draws(), _order(loader))
    torch.randn(1000)
    np.random.rand(17)
    _order(loader)
    assert seed_phase(0, "stage", 1, "finetune", loaders=[loader]) == seed
    assert (_draws(), _order(loader)) == first
    seed_phase(0, "stage", 2, "finetune", loaders=[loader])
    assert _order(loader) != first[1]


def test_seed_phase_gives_loaders_a_stream_of_their_own() -> None:
    """The shuffle is not the model's dropout stream: loader i gets derive_seed(seed, loader, i)."""
    a, b = (_loader(shuffle=True, generator=torch.Generator()) for _ in range(2))
    seed = seed_phase(4, "fine-tune", loaders=[a, b])
    assert a.generator.initial_seed() == derive_seed(seed, "loader", 0)
    assert b.generator.initial_seed() == derive_seed(seed, "loader", 1)
    assert torch.initial_seed() == seed


def test_phase_seeds_record_and_none_leaves_the_state_alone() -> None:
    phases = PhaseSeeds(9, loaders=[_loader(shuffle=True, generator=torch.Generator())])
    assert phases.start("compress") == derive_seed(9, "compress")
    phases.start("fine-tune")
    assert phases.seeds == {
        "compress": derive_seed(9, "compress"),
        "fine-tune": derive_seed(9, "fine-tune"),
    }
    torch.manual_seed(123)
    state = torch.get_rng_state()
    off = PhaseSeeds(None)
    assert off.start("compress") is None and off.seeds == {}
    assert torch.equal(torch.get_rng_state(), state)


def _dropout_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))


def test_epoch_checkpoint_still_overrides_the_phase_seed(tmp_path) -> None:
    """Resuming inside a phase: the checkpoint's RNG and loader state win over seed_phase."""
    loader = _loader(shuffle=True, generator=torch.Generator())
    options = {"lr": 0.01, "schedule": "constant", "progress": False}
    full = _dropout_net()
    seed_phase(0, "fine-tune", loaders=[loader])
    fit(full, loader, epochs=2, checkpoint_dir=tmp_path / "full", **options)
    cut = _dropout_net()
    seed_phase(0, "fine-tune", loaders=[loader])
    fit(cut, loader, epochs=1, checkpoint_dir=tmp_path / "cut", **options)  # then a kill
    cut = _dropout_net()
    seed_phase(0, "fine-tune", loaders=[loader])
    fit(cut, loader, epochs=2, checkpoint_dir=tmp_path / "cut", resume=True, **options)
    assert all(torch.equal(cut.state_dict()[k], v) for k, v in full.state_dict().items())
