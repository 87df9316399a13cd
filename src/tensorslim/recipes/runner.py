"""Run a recipe: stages in order, each saved when done, so ``--resume`` continues after the last
finished stage (and, inside a stage, from its last finished epoch).

Run directory::

    recipe.yaml            the resolved recipe (defaults filled in)
    original/              the model before the first structure stage (safetensors + plan)
    stages/NN-KIND/        model/ and done.json (that stage's results) once the stage finished;
                           checkpoints/ while it runs
    results.json report.md report.html *.png
    ranks/rankR.json       per-rank digests of the final weights (distributed runs)

Every stage starts from a random state of its own, ``derive_seed(recipe.seed, "stage", index,
kind)``, recorded as the stage's ``seed`` in done.json and results.json: torch's, numpy's and
Python's generators and the loaders' shuffling restart from it, so a stage started fresh, after a
``--resume`` or under torchrun draws what it would have drawn in one uninterrupted run. Inside a
stage the epoch checkpoint restores the state of the epoch it continues.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DistributedSampler

from tensorslim.cli.common import load_weights
from tensorslim.cli.hf_setup import text_agreement, text_objectives
from tensorslim.cli.rundir import discarded_on_failure, prepare_run_dir
from tensorslim.data import load_dataset, make_loaders
from tensorslim.errors import TensorslimError
from tensorslim.export import export_onnx, export_torchscript, merge_slow_layers
from tensorslim.io import WEIGHTS_FILE, is_saved, load, save
from tensorslim.models import create_model
from tensorslim.models.huggingface import hf_path
from tensorslim.pipeline import compress_model, machine_facts, measure
from tensorslim.plan import plans_of, set_plans
from tensorslim.rank.budget import Budget
from tensorslim.recipes.schema import STRUCTURE_STAGES, Recipe, load_recipe
from tensorslim.report.run import model_spectra, write_json, write_report
from tensorslim.train.checkpoint import atomic_write_text
from tensorslim.train.ddp import broadcast_model, check_same_state, init_from_env, state_digest
from tensorslim.train.distributed import (
    barrier,
    is_main_process,
    on_main_process,
    rank,
    world_size,
)
from tensorslim.train.loop import fit
from tensorslim.train.seeding import seed_phase


class RecipeRun:
    """State shared by the stages of one run."""

    def __init__(self, recipe: Recipe, out: Path, *, resume: bool, progress: bool, log) -> None:
        self.recipe, self.out, self.resume, self.progress, self.log = (
            recipe,
            out,
            resume,
            progress,
            log,
        )
        spec = recipe.data
        self.text = None
        if hf_path(recipe.model.name) is not None:
            self._setup_text()
            return
        # data first: a missing dataset is an error before any work starts
        self.bundle = load_dataset(
            spec.name,
            spec.data_dir,
            seed=recipe.seed,
            limit_train=spec.limit_train,
            limit_test=spec.limit_test,
        )
        world = world_size()
        if spec.batch_size % world:
            raise TensorslimError(
                f"data.batch_size {spec.batch_size} must be divisible by the {world} processes"
            )
        sampler = (
            DistributedSampler(self.bundle.train, shuffle=spec.shuffle, seed=recipe.seed)
            if world > 1
            else None
        )
        self.train_loader, self.test_loader = make_loaders(
            self.bundle,
            spec.batch_size // world,
            shuffle=spec.shuffle,
            seed=recipe.seed,
            sampler=sampler,
        )
        count = min(32, len(self.bundle.test))
        self.example = torch.stack([self.bundle.test[i][0] for i in range(count)])
        self.model = self.fresh_model()
        if recipe.model.weights:
            load_weights(self.model, Path(recipe.model.weights))
        self.reference: nn.Module | None = None

    def _setup_text(self) -> None:
        """A pretrained ``hf:PATH`` model on fortunes (:mod:`tensorslim.cli.hf_setup`)."""
        from tensorslim.cli.hf_setup import setup_hf

        spec = self.recipe.data
        s = setup_hf(self.recipe.model.name, spec.name, self.recipe.seed, spec.batch_size,
                     spec.limit_train, spec.limit_test)  # fmt: skip
        self.bundle, self.text = None, s.text
        self.train_loader, self.test_loader, self.example = s.train_loader, None, s.example_batch
        self.model = s.model
        if self.recipe.model.weights:
            load_weights(self.model, Path(self.recipe.model.weights))
        self.reference = None

    def fresh_model(self) -> nn.Module:
        torch.manual_seed(self.recipe.seed)
        spec = self.recipe.model
        if self.text is not None:
            return create_model(spec.name)
        return create_model(
            spec.name,
            in_channels=int(self.bundle.input_shape[0]),
            num_classes=self.bundle.num_classes,
            **spec.kwargs,
        )

    def reload(self, directory: Path) -> nn.Module:
        return load(directory, self.fresh_model())

    def fit(self, model: nn.Module, stage: Any, checkpoints: Path, teacher=None) -> list[dict]:
        objectives = text_objectives(self.text)
        if objectives is not None and teacher is None:
            raise TensorslimError(
                f"stage '{stage.stage}' on unlabeled text needs a teacher: use a finetune stage "
                "with distill: true"
            )
        text = {} if objectives is None else {"kd_alpha": 1.0, "distill_fn": objectives.distill_fn}
        return fit(
            model,
            self.train_loader,
            epochs=stage.epochs,
            lr=stage.lr,
            optimizer=stage.optimizer,
            weight_decay=stage.weight_decay,
            test_loader=self.test_loader,
            teacher=teacher,
            kd_temperature=getattr(stage, "kd_temperature", 4.0),
            **{"kd_alpha": getattr(stage, "kd_alpha", 0.5), **text},
            checkpoint_dir=checkpoints,
            resume=self.resume,
            progress=self.progress,
            log=self.log,
            description=stage.stage,
        ).epochs

    def start_stage(self, index: int, kind: str) -> int:
        """Seed everything stage ``index`` draws from (see the module docstring); its seed."""
        return self.seed_phase(self.recipe.seed, "stage", index, kind)

    def seed_phase(self, base_seed: int, *names: object) -> int:
        """:func:`~tensorslim.train.seeding.seed_phase` with this run's train and test loaders."""
        return seed_phase(base_seed, *names, loaders=(self.train_loader, self.test_loader))

    def capture_reference(self) -> None:
        """Keep the model as it was before the first structure stage (teacher, comparison)."""
        if self.reference is not None:
            return
        original_dir = self.out / "original"
        if self.resume and is_saved(original_dir):
            self.reference = self.reload(original_dir)
            return
        self.reference = copy.deepcopy(self.model)
        if is_main_process():
            save(self.reference, original_dir)
        barrier()


def _filter(layers: list[str] | None, exclude: list[str] | None):
    if layers is None and not exclude:
        return None
    chosen = set(layers) if layers is not None else None
    skipped = set(exclude or [])
    return lambda module, fqn: (chosen is None or fqn in chosen) and fqn not in skipped


def _written(stage: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The training values the recipe sets in ``stage`` itself (not pydantic defaults)."""
    return {key: getattr(stage, key) for key in keys if key in stage.model_fields_set}


def _structure_stage(run: RecipeRun, stage: Any, sdir: Path, seed: int) -> dict[str, Any]:
    run.capture_reference()
    method = stage.method if stage.stage in {"compress", "prune"} else "svd_train"
    epochs = getattr(stage, "epochs", 0) if stage.stage != "compress" else 0
    small, result = compress_model(
        run.model,
        method=method,
        budget=Budget.parse(stage.budget) if stage.budget else None,
        settings=stage.settings,
        preset=stage.preset,
        train_loader=run.train_loader,
        test_loader=run.test_loader,
        example_batch=run.example,
        finetune_epochs=epochs,
        bn_recalibration_batches=getattr(stage, "recalibrate_bn", 0),
        # what the recipe wrote wins; unwritten values come from the preset, else the defaults
        **_written(stage, ("lr", "optimizer", "weight_decay")),
        checkpoint_dir=sdir / "checkpoints",
        resume=run.resume,
        progress=run.progress,
        log=run.log,
        seed=seed,
        filter_fn=_filter(getattr(stage, "layers", None), getattr(stage, "exclude", None)),
        objectives=text_objectives(run.text),
        deployment=getattr(stage, "deployment", None),
        allow_slower=getattr(stage, "allow_slower", None),
    )
    broadcast_model(small)
    if stage.stage == "svd_train" and stage.finetune_epochs > 0:
        tune = stage.model_copy(update={"epochs": stage.finetune_epochs, "stage": "svd_train"})
        run.seed_phase(seed, "post-finalize")  # as compress_model names its third phase
        result["finetune_history"] = run.fit(small, tune, sdir / "finetune")
        result["compressed"] = measure(small, run.example, run.test_loader)
    run.model = small
    return result


def _run_stage(run: RecipeRun, index: int, stage: Any, sdir: Path, seed: int) -> dict[str, Any]:
    kind = stage.stage
    if kind in STRUCTURE_STAGES:
        return _structure_stage(run, stage, sdir, seed)
    if kind == "train":
        history = run.fit(run.model, stage, sdir / "checkpoints")
        return {"history": history, **measure(run.model, run.example, run.test_loader)}
    if kind == "finetune":
        teacher = None
        if stage.distill:
            if run.reference is None:
                raise TensorslimError(
                    f"stage {index} (finetune) distils, but nothing was compressed"
                )
            teacher = run.reference.eval()
        history = run.fit(run.model, stage, sdir / "checkpoints", teacher=teacher)
        return {"history": history, **measure(run.model, run.example, run.test_loader)}
    if kind == "evaluate":
        measured = measure(run.model, run.example, run.test_loader, latency=stage.latency)
        if run.text is not None and run.reference is not None:
            measured["embedding_agreement"] = text_agreement(run.reference, run.model, run.text)
        return measured
    if kind == "export":
        result: dict[str, Any] = {"files": {}}
        model = run.model
        if stage.merge_slow:
            model = copy.deepcopy(run.model)
            set_plans(model, plans_of(run.model))
            result["merge"] = merge_slow_layers(model, run.example)
        target = sdir / "export"
        if is_main_process():
            for fmt in stage.formats:
                if fmt == "safetensors":
                    save(model, target / "safetensors")
                    result["files"][fmt] = str(target / "safetensors")
                elif fmt == "onnx":
                    info = export_onnx(model, run.example[:4], target / "model.onnx")
                    result["files"][fmt] = {"path": str(target / "model.onnx"), **info}
                else:
                    info = export_torchscript(model, run.example[:4], target / "model.pt")
                    result["files"][fmt] = {"path": str(target / "model.pt"), **info}
        run.model = model
        return result
    raise TensorslimError(f"unknown stage '{kind}'")


def run_recipe(
    recipe_path: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run every stage of the recipe into ``out``; returns the final results dict.

    ``stop_after=i`` stops once stage ``i`` is saved, leaving ``out`` as a kill at that moment
    would (no results.json yet), to inspect a stage's model before the rest runs or to check
    that ``resume=True`` continues exactly; it returns ``{"stopped_after": i, "stages": [...]}``.
    """
    recipe = load_recipe(recipe_path)
    last = _last_stage(recipe, stop_after)
    out = Path(out)
    distributed = init_from_env()
    if not is_main_process():
        log = _silent
    existed = out.is_dir() and any(out.iterdir())
    on_main_process(lambda: prepare_run_dir(out, resume=resume, overwrite=overwrite))
    # nothing done yet: a failure here (no dataset, a bad model) takes the directory with it
    with discarded_on_failure(out, keep=resume and existed, ignore=("recipe.yaml",)):
        run = RecipeRun(recipe, out, resume=resume, progress=progress, log=log)
    if is_main_process():
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.model_dump(), sort_keys=False))
    stage_results: list[dict[str, Any]] = []
    for index, stage in enumerate(recipe.stages[: last + 1]):
        sdir = out / "stages" / f"{index:02d}-{stage.stage}"
        done = sdir / "done.json"
        if resume and done.is_file() and is_saved(sdir / "model"):
            stage_results.append(json.loads(done.read_text()))
            if stage.stage in STRUCTURE_STAGES and run.reference is None:
                run.capture_reference()
            run.model = run.reload(sdir / "model")
            log(f"stage {index} ({stage.stage}) already done: skipped")
            continue
        log(f"stage {index}: {stage.stage}")
        seed = run.start_stage(index, stage.stage)
        result = {"stage": stage.stage, "index": index, "seed": seed}
        result.update(_run_stage(run, index, stage, sdir, seed))
        # DDP's last training step updates BatchNorm statistics on each rank's own batch:
        # every rank continues with rank 0's model, the one that is saved
        broadcast_model(run.model)
        if is_main_process():
            save(run.model, sdir / "model")
            write_json(done, result)
        barrier()
        stage_results.append(result)
    if last < len(recipe.stages) - 1:
        log(f"stopped after stage {last} ({recipe.stages[last].stage}): resume to continue")
        return {"stopped_after": last, "stages": stage_results}
    summary = _finish(run, recipe, stage_results, distributed)
    # every rank leaves together: a rank that tore its process group down while rank 0 was
    # still measuring aborted once ("terminate called without an active exception", gloo);
    # if rank 0 fails instead, torchrun stops the waiting ranks
    barrier()
    return summary


def _last_stage(recipe: Recipe, stop_after: int | None) -> int:
    """Index of the last stage to run: ``stop_after`` if given (checked), else the last one."""
    count = len(recipe.stages)
    if stop_after is None:
        return count - 1
    if (
        isinstance(stop_after, bool)
        or not isinstance(stop_after, int)
        or not 0 <= stop_after < count
    ):
        raise TensorslimError(
            f"stop_after={stop_after!r} is not a stage index of recipe '{recipe.name}' "
            f"(0..{count - 1})"
        )
    return stop_after


def _finish(run: RecipeRun, recipe: Recipe, stages: list[dict[str, Any]], distributed: bool):
    out = run.out
    if distributed:
        (out / "ranks").mkdir(exist_ok=True)
        write_json(out / "ranks" / f"rank{rank()}.json", state_digest(run.model))
        check_same_state(run.model)  # fail loudly rather than report one model of several
    if not is_main_process():
        return {}
    reference = run.reference or run.model
    original = measure(reference, run.example, run.test_loader)
    final = measure(run.model, run.example, run.test_loader)
    original["disk_mb"] = _disk_mb(out / "original") if run.reference is not None else None
    last_stage_dir = out / "stages" / f"{len(recipe.stages) - 1:02d}-{recipe.stages[-1].stage}"
    final["disk_mb"] = _disk_mb(last_stage_dir / "model")
    structure = [s for s in stages if s["stage"] in STRUCTURE_STAGES]
    methods = "+".join(s["method"] for s in structure) or "none"
    summary = {
        "method": methods,
        "budget": structure[-1].get("budget") if structure else None,
        "original": original,
        "compressed": final,
        "accuracy_before_finetune": structure[0].get("accuracy_before_finetune")
        if structure
        else None,
        "flops_fraction": final["flops"] / original["flops"],
        "latency_speedup": original["latency_ms"] / final["latency_ms"],
        "layers": structure[-1]["layers"] if structure else [],
        "history": _cumulative_history(stages),
        "plan_notes": [n for s in structure for n in s.get("plan_notes", [])],
    }
    write_report(
        out,
        [summary],
        title=f"{recipe.name}: {recipe.model.name} on {recipe.data.name}",
        original=original,
        spectra=model_spectra(reference),
        extra_json={
            "recipe": recipe.name,
            "stages": stages,
            "machine": machine_facts(),
            "world_size": world_size(),
        },
    )
    return summary


def _cumulative_history(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All stages' epochs on one axis (epoch numbers continue across stages)."""
    merged: list[dict[str, Any]] = []
    for stage in stages:
        for record in stage.get("history", []):
            merged.append({**record, "epoch": len(merged) + 1, "stage": stage["stage"]})
    return merged


def _silent(message: str) -> None:
    """Log sink of ranks other than 0."""


def _disk_mb(directory: Path) -> float | None:
    path = directory / WEIGHTS_FILE
    return path.stat().st_size / 1e6 if path.is_file() else None
