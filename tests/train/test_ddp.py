"""Process-group helpers: the ranks' final weights are compared, and a mismatch is loud."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.train.ddp import check_same_state, state_digest
from tensorslim.train.distributed import is_peer_failure


def _worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
        agreed = check_same_state(model) == state_digest(model)
        if rank == 1:
            model[1].running_mean.add_(1e-3)  # one rank drifts in one buffer
        try:
            check_same_state(model)
            outcome = "passed"
        except TensorslimError as exc:
            outcome = str(exc)
        Path(out, f"rank{rank}.txt").write_text(f"{agreed}\n{outcome}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_gloo_available(), reason="gloo backend not built")
def test_different_weights_on_the_ranks_fail_loudly_on_every_rank(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        agreed, outcome = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
        assert agreed == "True"
        assert "different weights in 1 of 7 tensors (first: 1.running_mean)" in outcome


def test_check_same_state_outside_a_group_is_the_digest() -> None:
    model = nn.Linear(2, 2)
    assert check_same_state(model) == state_digest(model)


def test_peer_failures_are_recognised() -> None:
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [::1]:1")
    assert is_peer_failure(gone)
    assert not is_peer_failure(RuntimeError("shape mismatch"))
    assert not is_peer_failure(ValueError("Connection closed by peer"))
