"""Under DDP every process computes the same mask: the regrowth scores are all-reduced.

Two processes on the gloo backend train a tiny model on *different* data (so their local dense
gradients differ) with RigL-style regrowth at every step. DDP's buffer broadcast is switched off,
so nothing but the hook's all-reduce can make the masks agree. As a control, the same run with
the all-reduce disabled must give different masks — otherwise the test could not fail.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import tensorslim.train.pruning as pruning
from tensorslim.layers.sparse import mask_of
from tensorslim.train.loop import fit
from tensorslim.train.pruning import PruningHook, add_masks

WORLD = 2


def _run(rank: int, out: Path, all_reduce: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )
    add_masks(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers' renaming
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
    g = torch.Generator().manual_seed(100 + rank)  # different data per process
    x = torch.randn(32, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    hook = PruningHook(
        0.7,
        schedule="constant",
        drop_fraction=0.5,
        interval=1,
        end=1.0,
        rank_weight=0.5,
        keep_first_dense=False,
        track_delta_rank=False,
    )
    original = pruning.is_distributed
    if not all_reduce:
        pruning.is_distributed = lambda: False  # type: ignore[assignment]
    try:
        # ddp=False: the loop must not wrap again (its own wrapper broadcasts buffers).
        fit(ddp, loader, epochs=1, lr=0.05, hooks=[hook], progress=False, ddp=False)
    finally:
        pruning.is_distributed = original  # type: ignore[assignment]
    return {name: mask_of(m).mask.clone() for name, m in hook.layers} | {
        "regrown": torch.tensor(hook.regrown_total)
    }


def _worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for all_reduce in (True, False):
            masks = _run(rank, Path(out), all_reduce)
            torch.save(masks, Path(out) / f"masks_{all_reduce}_{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not dist.is_gloo_available(), reason="gloo backend not built")
def test_masks_agree_across_processes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    def load(all_reduce: bool, rank: int) -> dict[str, torch.Tensor]:
        return torch.load(tmp_path / f"masks_{all_reduce}_{rank}.pt", weights_only=True)

    synced = [load(True, r) for r in range(WORLD)]
    assert int(synced[0]["regrown"]) > 0
    assert set(synced[0]) == {"0", "3", "regrown"}
    for name in ("0", "3"):
        assert torch.equal(synced[0][name], synced[1][name]), name
    kept = sum(int(synced[0][n].sum()) for n in ("0", "3"))
    total = sum(synced[0][n].numel() for n in ("0", "3"))
    assert kept == total - round(0.7 * total)
    # Control: without the all-reduce the local gradients give different masks.
    local = [load(False, r) for r in range(WORLD)]
    assert any(not torch.equal(local[0][n], local[1][n]) for n in ("0", "3"))
