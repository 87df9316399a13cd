"""Atomic files and checkpoints: a failed write never leaves a half file or a temp behind."""

from __future__ import annotations

import pickle

import pytest
import torch

import tensorslim.train.checkpoint as checkpoint
from tensorslim.train.checkpoint import (
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)


def test_atomic_write_creates_parents_and_replaces(tmp_path) -> None:
    target = tmp_path / "a" / "b" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "sécond")
    assert target.read_text(encoding="utf-8") == "sécond"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch) -> None:
    target = tmp_path / "file.txt"
    atomic_write_text(target, "good")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "bad")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path) -> None:
    state = {
        "epoch": 3,
        "model": {"w": torch.arange(6.0).reshape(2, 3)},
        "history": [{"epoch": 1, "loss": 0.5}],
        "rng": torch.get_rng_state(),
        "name": "run",
    }
    save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["epoch"] == 3 and loaded["name"] == "run"
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["history"] == state["history"]
    assert torch.equal(loaded["rng"], state["rng"])


def test_interrupted_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save({"epoch": "partial"}, f)
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_loading_refuses_pickled_objects(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"payload": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
