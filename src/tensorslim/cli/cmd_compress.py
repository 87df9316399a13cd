"""``tensorslim compress``: plan → apply → fine-tune/train → report, for any registered method."""

from __future__ import annotations

from pathlib import Path

import typer

from tensorslim.analysis.deployment import Deployment
from tensorslim.analysis.timing import LatencyCache
from tensorslim.cli.common import (
    BASE_PHASE,
    RunArgs,
    option,
    parse_method,
    print_result_table,
    run_command,
    save_run_model,
    say,
)
from tensorslim.cli.hf_setup import text_agreement, text_objectives, text_training
from tensorslim.errors import TensorslimError
from tensorslim.pipeline import compress_model
from tensorslim.rank.budget import Budget
from tensorslim.report.run import LAYER_COLUMNS, chosen_ranks, model_spectra, write_report
from tensorslim.report.tables import print_table
from tensorslim.train.seeding import derive_seed


def register(app: typer.Typer) -> None:
    @run_command(app, "compress", out=Path("runs/compress"), base=True)
    def compress(
        ctx: typer.Context,
        run: RunArgs,
        method: str = option("method"),
        budget: str = option("budget"),
        setting: list[str] = option("setting"),
        preset: str = option("preset"),
        finetune_epochs: int = typer.Option(
            1,
            min=0,
            help="Epochs of training after the layers are replaced (with the method's own "
            "regularizers or pruning schedule, if it has any).",
        ),
        post_finalize_epochs: int = typer.Option(
            None,
            min=0,
            help="Fine-tune epochs after the method finalizes (default: the method's own; "
            "1 for svd_train, whose truncation needs a low-rank fine-tune, else 0).",
        ),
        recalibrate_bn: int = typer.Option(
            10,
            min=0,
            help="Re-estimate BatchNorm statistics on this many training batches after the "
            "layers are replaced (before fine-tuning).",
        ),
        lr: float = typer.Option(
            None, min=0.0, help="Fine-tune learning rate (default: the preset's, else 0.01)."
        ),
        distill: bool = typer.Option(
            False,
            help="Distil from the uncompressed model while fine-tuning (hf:PATH models on text: "
            "on unlabeled sentences, against the original's hidden states).",
        ),
        deployment: str = typer.Option(
            None,
            help="Where latency is measured, e.g. batch=1,threads=1,format=channels_last,"
            "backend=onnxruntime or backend=compile (torch.compile; needs a C++ compiler) "
            "(default: the evaluation batch, current threads, format=auto, eager).",
        ),
        allow_slower: bool = typer.Option(
            None,
            "--allow-slower/--never-slower",
            help="Allow structured layers measured slower than dense at the deployment "
            "(FLOPs/params regardless); by default such layers stay dense.",
        ),
        latency_cache: Path = typer.Option(
            None, help="JSON file of measured layer latencies, read and updated (reuse timings)."
        ),
        objective: str = typer.Option(
            None,
            help="What a timed flops/params budget is met for: latency (least predicted time; "
            "the default), balanced (least error within 5% of the fastest) or error.",
        ),
    ) -> None:
        """Compress a model with one method at one budget.

        Plans, replaces the layers, fine-tunes, measures and writes the report and the model.
        """
        chosen = parse_method(method, budget, setting, preset)  # bad input fails before any work
        plan_budget = _with_objective(chosen.budget, objective)
        Deployment.coerce(deployment)
        cache = LatencyCache(latency_cache)
        if post_finalize_epochs is None:
            post_finalize_epochs = chosen.method.post_finalize_epochs
        with run.open(ctx):
            s = run.setup()
            base_history, original = run.prepare_base(s)
            training = text_training(s.text, finetune_epochs, lr, distill)
            small, results = compress_model(
                s.model,
                method=method,
                budget=plan_budget,
                settings=chosen.settings,
                **s.data(),
                post_finalize_epochs=post_finalize_epochs,
                bn_recalibration_batches=recalibrate_bn,
                distill=distill,
                **training,
                checkpoint_dir=run.out / "checkpoints",
                resume=run.resume,
                progress=run.progress,
                log=say,
                measure_original=original,
                seed=run.seed,
                deployment=deployment,
                allow_slower=allow_slower,
                latency_cache=cache,
                objectives=text_objectives(s.text),
            )
            cache.save()
            if s.text is not None:  # unlabeled text: how close the embeddings stay
                results["embedding_agreement"] = text_agreement(s.model, small, s.text)
                results["sentences"] = s.text.sentences
                say(f"embedding agreement: {results['embedding_agreement']}")
            if (
                run.weights is None and s.text is None
            ):  # the base was trained by this run (now or before a resume)
                base_seed = derive_seed(run.seed, BASE_PHASE)
                results["seeds"] = {BASE_PHASE: base_seed, **results["seeds"]}
            results["chosen_ranks"] = chosen_ranks(small)
            save_run_model(small, run.out)
            write_report(
                run.out,
                [results],
                title=f"{run.model} on {run.data}: {method}",
                original=original,
                spectra=model_spectra(s.model),
                base_history=base_history,
            )
        print_table("layers", LAYER_COLUMNS, results["layers"])
        if results.get("plan_summary"):  # (a run resumed from an older results.json has none)
            typer.echo(f"plan: {results['plan_summary']}")
        print_result_table(original, results)
        check = results.get("latency_check")
        if check:
            typer.echo(
                f"latency at {Deployment(**check['deployment']).key}: "
                f"{check['original_ms']:.3g} → {check['compressed_ms']:.3g} ms "
                f"(×{check['speedup']:.2f}); predicted {check['predicted_fraction']:.3f} of dense, "
                f"measured {check['measured_fraction']:.3f}"
            )
        typer.echo(f"wrote {run.out}/results.json, report.md, plan.json, model/")


def _with_objective(budget: Budget | None, objective: str | None) -> Budget | None:
    """``--objective`` applied to ``--budget`` (a one-line error without a budget)."""
    if objective is None:
        return budget
    if budget is None:
        raise TensorslimError(f"--objective {objective} needs a --budget (e.g. flops=0.5)")
    return budget.with_objective(objective)
