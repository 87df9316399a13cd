"""Shared pieces of the benchmarks: trained base models (cached), machine facts, writing results."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from tensorslim.data import load_dataset, make_loaders
from tensorslim.models import create_model
from tensorslim.pipeline import machine_facts
from tensorslim.report.tables import markdown_table
from tensorslim.train.loop import evaluate, fit

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = RESULTS / "weights"


def facts() -> dict[str, Any]:
    """Machine facts plus the load average (other work on the machine skews latency)."""
    out = machine_facts()
    out["loadavg"] = os.getloadavg()
    out["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return out


def fashion_loaders(limit_train: int | None, batch_size: int = 128, seed: int = 0):
    bundle = load_dataset("fashion-mnist", seed=seed, limit_train=limit_train)
    train, test = make_loaders(bundle, batch_size, seed=seed)
    return bundle, train, test


def paired_loader(bundle, seed: int, batch_size: int = 128):
    """A fresh training loader for one arm of a seed's comparison.

    Every call with the same ``seed`` yields the same batches in the same order, so arms that
    start from a shared model differ by their settings, not by where they joined one shuffling
    stream (a reused loader's generator advances with every epoch).
    """
    return make_loaders(bundle, batch_size, seed=seed + 1000)[0]


def pretrained_resnet20(bundle, seed: int, epochs: int, lr: float):
    """resnet20 (1 input channel) initialised and trained ``epochs`` with ``seed``'s init and batch
    order: the shared start of a seed's arms. Returns (model, evaluation loader of ``bundle``)."""
    pretrain, evaluation = make_loaders(bundle, 128, seed=seed)
    torch.manual_seed(seed)
    model = create_model("resnet20", in_channels=1, num_classes=10)
    fit(model, pretrain, epochs=epochs, lr=lr, progress=False)
    return model, evaluation


def map_seeds(
    run_seed: Callable[[tuple[int, dict[str, Any]]], list[dict[str, Any]]],
    seeds: list[int],
    cfg: dict[str, Any],
    workers: int,
) -> list[dict[str, Any]]:
    """``run_seed((seed, cfg))`` for every seed in ``workers`` processes; their rows, in order."""
    runs: list[dict[str, Any]] = []
    with ProcessPoolExecutor(workers) as pool:
        for rows in pool.map(run_seed, [(s, cfg) for s in seeds]):
            runs.extend(rows)
    return runs


def trained_model(
    name: str, train_loader, test_loader, *, epochs: int, tag: str, lr: float = 0.05
) -> tuple[nn.Module, dict[str, Any]]:
    """A zoo model trained on Fashion-MNIST, cached as safetensors under bench/results/weights."""
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    path = WEIGHTS / f"{name}-{tag}.safetensors"
    meta_path = path.with_suffix(".json")
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10)
    if path.is_file() and meta_path.is_file():
        safetensors.torch.load_model(model, str(path))
        return model, json.loads(meta_path.read_text())
    started = time.perf_counter()
    history = fit(
        model,
        train_loader,
        epochs=epochs,
        lr=lr,
        test_loader=test_loader,
        progress=False,
        log=print,
        description=f"train {name}",
    ).epochs
    meta = {
        "epochs": epochs,
        "seconds": time.perf_counter() - started,
        "accuracy": evaluate(model, test_loader)["accuracy"],
        "history": history,
    }
    safetensors.torch.save_model(model, str(path))
    meta_path.write_text(json.dumps(meta, indent=2))
    return model, meta


def write_results(
    name: str,
    payload: dict[str, Any],
    tables: list[tuple[str, list[str], list[dict]]],
    notes: list[str],
) -> None:
    """bench/results/NAME.json and NAME.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    lines = [f"# {name}", ""]
    for note in notes:
        lines += [note, ""]
    for title, columns, rows in tables:
        lines += [f"## {title}", "", markdown_table(columns, rows), ""]
    m = payload.get("machine", {})
    lines += [
        f"Machine: torch {m.get('torch')}, {m.get('threads')} threads, {m.get('cpus')} CPUs, "
        f"load average {m.get('loadavg')}, {m.get('date')}."
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
