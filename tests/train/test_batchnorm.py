"""BatchNorm statistics re-estimated after the layers before them changed."""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.train.batchnorm import recalibrate_batchnorm


def test_recalibrate_batchnorm_matches_the_batch_statistics() -> None:
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.3)
    model = nn.Sequential(conv, norm).eval()
    with torch.no_grad():
        norm.running_mean.fill_(5.0)
        norm.running_var.fill_(9.0)
    x = torch.randn(16, 1, 8, 8)
    loader = [(x[:8], None), (x[8:], None), (x, None)]
    assert recalibrate_batchnorm(model, loader, batches=2) == 2
    with torch.no_grad():
        h = conv(x)
    # the cumulative average of the two half-batch means is the full-batch mean
    torch.testing.assert_close(norm.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert norm.momentum == 0.3 and not model.training
    assert recalibrate_batchnorm(nn.Linear(2, 2), loader) == 0


def _recalibrate_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same model on both ranks, different shards of data
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
        x = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        shard = x[:16] if rank == 0 else x[16:]  # rank 0 has two batches, rank 1 one
        loader = [(shard[i : i + 8], None) for i in range(0, len(shard), 8)]
        used = recalibrate_batchnorm(model, loader, batches=10)
        torch.save({"used": used, **model[1].state_dict()}, f"{out}/bn{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_recalibration_under_torch_distributed_averages_the_ranks(tmp_path) -> None:
    """Each rank sees its own shard; all end with the statistics of every batch together."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_recalibrate_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in range(2)]
    assert [r["used"] for r in ranks] == [2, 1]
    for key in ("running_mean", "running_var"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # the same three batches in one process: the batch-weighted average of the ranks
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    x = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    recalibrate_batchnorm(model, [(x[i : i + 8], None) for i in range(0, 24, 8)], batches=10)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(ranks[0][key], getattr(model[1], key), rtol=1e-5, atol=1e-6)
