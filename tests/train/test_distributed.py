"""Decisions made on rank 0 only reach every rank (a timed plan differs between processes)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tensorslim.pipeline as pipeline
from tensorslim.errors import TensorslimError
from tensorslim.rank.budget import Budget
from tensorslim.train.distributed import from_main_process


def _worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        lines = [from_main_process(lambda: f"made on rank {rank}", str.upper, str.lower)]
        try:
            from_main_process(lambda: _fail(rank), str, str)
        except TensorslimError as exc:
            lines.append(str(exc))
        real_plan = pipeline.plan
        # as if the timed choices differed between the processes: each rank its own budget
        pipeline.plan = lambda model, method, budget, *a, **k: real_plan(
            model, method, Budget(params=0.3 + 0.4 * rank), *a, **k
        )
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
        the_plan, _, small = pipeline._plan_and_apply(
            model, "svd", None, torch.randn(4, 32), None, {}, timing={"allow_slower": True}
        )
        lines.append(str([lp.label for lp in the_plan.layers]))
        lines.append(str(sum(p.numel() for p in small.parameters())))
        Path(out, f"rank{rank}.txt").write_text("\n".join(lines))
    finally:
        dist.destroy_process_group()


def _fail(rank: int) -> str:
    raise TensorslimError(f"bad input seen by rank {rank}")


@pytest.mark.skipif(not dist.is_gloo_available(), reason="gloo backend not built")
def test_rank_zero_decides_for_every_rank(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    zero, one = ((tmp_path / f"rank{r}.txt").read_text().split("\n") for r in range(2))
    assert zero[0] == "made on rank 0"  # rank 0 keeps its own object
    assert one[0] == "made on rank 0"  # the others decode rank 0's text
    assert zero[1] == "bad input seen by rank 0"
    assert one[1].startswith("rank 1 stops: rank 0 failed (bad input seen by rank 0")
    assert one[2:] == zero[2:]  # the same plan, the same model on both ranks


def test_outside_a_group_the_object_is_returned_as_made() -> None:
    made = object()
    assert from_main_process(lambda: made, lambda _: "", lambda _: None) is made
