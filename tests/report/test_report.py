"""Run reports: numbers for humans, JSON that is always valid, report.md, plots, pipeline rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tensorslim.analysis.flops import count_flops
from tensorslim.analysis.profile import count_params
from tensorslim.pipeline import compress_model, layer_rows, measure
from tensorslim.rank.budget import Budget
from tensorslim.report.plots import (
    CONTEXT_POINTS,
    accuracy_limits,
    pareto_figure,
    pareto_plot,
    spectra_figure,
    spectra_plot,
    training_curves_figure,
)
from tensorslim.report.run import (
    LAYER_COLUMNS,
    SUMMARY_COLUMNS,
    chosen_ranks,
    epoch_axis,
    model_spectra,
    original_row,
    pareto_points,
    summary_row,
    write_json,
    write_report,
)
from tensorslim.report.tables import human, markdown_table, print_table

PNG = b"\x89PNG\r\n\x1a\n"


def test_human_numbers() -> None:
    assert human(None) == "–"
    assert human(True) == "True"
    assert human(999) == "999"
    assert human(1234) == "1.23k"
    assert human(44_398_592) == "44.4M"
    assert human(2_500_000_000) == "2.5G"
    assert human(0.123456) == "0.1235"
    assert human("spatial") == "spatial"


def test_markdown_and_terminal_tables(capsys) -> None:
    rows = [{"layer": "fc|1", "flops": 1500, "error": 0.5}, {"layer": "fc2"}]
    text = markdown_table(["layer", "flops", "error"], rows)
    assert text.splitlines() == [
        "| layer | flops | error |",
        "|---|---|---|",
        "| fc/1 | 1.5k | 0.5 |",
        "| fc2 | – | – |",
    ]
    print_table("title here", ["layer", "flops"], rows)
    out = capsys.readouterr().out
    assert "title here" in out and "1.5k" in out and "fc2" in out


def test_write_json_cleans_tensors_nan_and_tuples(tmp_path) -> None:
    write_json(
        tmp_path / "x.json",
        {"t": torch.tensor([1.0, 2.0]), "nan": float("nan"), "inf": math.inf, "shape": (1, 2)},
    )
    data = json.loads((tmp_path / "x.json").read_text())  # strict JSON: no NaN tokens
    assert data == {"t": [1.0, 2.0], "nan": None, "inf": None, "shape": [1, 2]}


@pytest.fixture(scope="module")
def run_result(tmp_path_factory):
    """A real compress_model result on a tiny CNN (one fine-tune epoch on 64 samples)."""
    from conftest import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 14, 14, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    original = measure(model, x[:8], loader, min_run_time=0.05)
    small, result = compress_model(
        model,
        method="svd",
        budget=Budget(flops=0.5),
        train_loader=loader,
        test_loader=loader,
        example_batch=x[:8],
        finetune_epochs=1,
        progress=False,
        measure_original=original,
    )
    return model, small, original, result


def test_compress_model_result_fields(run_result) -> None:
    _, small, original, result = run_result
    for entry in (result["original"], result["compressed"]):
        assert {"accuracy", "loss", "params", "flops", "latency_ms"} <= set(entry)
    assert result["compressed"]["params"] == count_params(small)
    assert result["compressed"]["flops"] == count_flops(small, torch.zeros(1, 1, 14, 14))
    assert result["flops_fraction"] == result["compressed"]["flops"] / original["flops"]
    assert result["flops_fraction"] <= 0.5
    assert 0 <= result["accuracy_before_finetune"] <= 1
    assert len(result["history"]) == 1
    assert result["latency_speedup"] > 0
    assert result["machine"]["threads"] == torch.get_num_threads()
    assert [row["layer"] for row in result["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert set(LAYER_COLUMNS) <= set(result["layers"][0])
    assert result["seconds"]["total"] >= result["seconds"]["decompose"] >= 0


def test_layer_rows_say_what_happened(run_result) -> None:
    from tensorslim.plan import plans_of

    _, small, _, _ = run_result
    rows = layer_rows(plans_of(small)[-1])
    for row in rows:
        assert row["flops_kept"] == row["flops_after"] / row["flops"]
        assert (row["method"] == "dense") == (row["flops_kept"] == 1.0)
        if row["method"] == "svd":
            assert 0 < row["energy_kept"] <= 1 and row["choice"].startswith("rank ")


def test_write_report_for_one_run(run_result, tmp_path) -> None:
    model, _, original, result = run_result
    files = write_report(
        tmp_path, [result], title="tiny", original=original, spectra=model_spectra(model)
    )
    for name in ("pareto", "spectra", "layers", "curves"):
        assert files[name].read_bytes().startswith(PNG), name
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["original"]["accuracy"] == original["accuracy"]
    assert data["compressed"]["flops"] == result["compressed"]["flops"]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# tiny")
    assert "| " + " | ".join(SUMMARY_COLUMNS) + " |" in report
    assert "![Accuracy vs FLOPs](pareto.png)" in report
    assert "## Layers: svd flops=0.5" in report
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")


def test_write_report_for_several_runs_keeps_each(run_result, tmp_path) -> None:
    _, _, original, result = run_result
    other = dict(result, method="svd-spatial", flops_fraction=0.3, plan_notes=["a note"])
    write_report(tmp_path, [result, other], title="two", original=original)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in data["runs"]] == ["svd", "svd-spatial"]
    assert {"original", "compressed"} <= set(data)
    assert "> note: a note" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "spectra.png").exists(), "no spectra were given"


def test_summary_rows(run_result) -> None:
    _, _, original, result = run_result
    row = summary_row(result)
    assert row["budget"] == "flops=0.5" and row["method"] == "svd"
    assert row["flops"] == result["compressed"]["flops"]
    assert summary_row(dict(result, budget=None))["budget"] == "rule"
    # a pruned model's row counts the weights a sparse format keeps
    pruned = dict(result, compressed=dict(result["compressed"], params_nonzero=123))
    assert summary_row(pruned)["params"] == 123
    assert original_row(original)["flops_fraction"] == 1.0


def test_model_spectra_are_descending_per_layer(tiny_cnn) -> None:
    spectra = model_spectra(tiny_cnn)
    assert list(spectra) == ["conv1", "conv2", "fc1", "fc2"]
    for values in spectra.values():
        assert torch.all(values[:-1] >= values[1:])
    assert len(model_spectra(tiny_cnn, limit=2)) == 2


def test_plots_write_png(tmp_path) -> None:
    points = [
        {"method": "svd", "flops_fraction": 0.5, "accuracy": 0.9, "accuracy_before_finetune": 0.7},
        {"method": "svd", "flops_fraction": 0.25, "accuracy": 0.8},
    ]
    pareto_plot(points, tmp_path / "p.png", original={"accuracy": 0.95})
    spectra_plot({"a": torch.tensor([3.0, 1.0, 0.0])}, tmp_path / "s.png")
    assert (tmp_path / "p.png").read_bytes().startswith(PNG)
    assert (tmp_path / "s.png").read_bytes().startswith(PNG)


def test_compress_model_refuses_a_plan_that_compresses_nothing(run_result) -> None:
    from tensorslim.errors import TensorslimError

    model = run_result[0]
    x = torch.randn(8, 1, 14, 14)
    with pytest.raises(TensorslimError, match="compressed no layer"):
        compress_model(
            model,
            method="svd",
            budget=Budget(flops=1.0),
            train_loader=None,
            test_loader=None,
            example_batch=x,
            finetune_epochs=0,
            latency=False,
        )


def test_post_finalize_epochs_fine_tune_the_truncated_svd_training_model(tmp_path) -> None:
    """SVD training's third stage: the finalized (truncated) model trains one more epoch."""
    from conftest import TinyCNN
    from tensorslim.layers import LowRankConv2d, SVDConv2d

    torch.manual_seed(0)
    model = TinyCNN().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 14, 14, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    small, result = compress_model(
        model,
        method="svd_train",
        budget=Budget(flops=0.5),
        train_loader=loader,
        test_loader=loader,
        example_batch=x[:8],
        finetune_epochs=1,
        post_finalize_epochs=2,
        checkpoint_dir=tmp_path,
        progress=False,
        latency=False,
    )
    assert len(result["history"]) == 3  # 1 regularized epoch + 2 after finalize
    assert 0 <= result["accuracy_after_finalize"] <= 1
    assert (tmp_path / "post-finalize").is_dir()  # its own checkpoint, not the first phase's
    kinds = {type(m) for m in small.modules()}
    assert SVDConv2d not in kinds and LowRankConv2d in kinds  # trained after finalize
    assert result["flops_fraction"] <= 0.5 + 1e-6


def test_nonzero_counts_skip_pruned_zeros_only() -> None:
    """Zeroing half of a planned conv's weight removes half its weights and half its FLOPs."""
    from conftest import TinyCNN
    from tensorslim.pipeline import nonzero_counts
    from tensorslim.plan import plan

    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(1, 1, 14, 14)
    the_plan = plan(model, "svd", None, x, rank=1)
    measured = {"params": count_params(model), "flops": count_flops(model, x)}
    assert nonzero_counts(model, the_plan, measured) == {
        "params_nonzero": measured["params"],
        "flops_nonzero": measured["flops"],
    }
    fqn, conv = next(
        (lp.fqn, model.get_submodule(lp.fqn))
        for lp in the_plan.layers
        if isinstance(model.get_submodule(lp.fqn), torch.nn.Conv2d)
    )
    layer_flops = next(lp.flops_before for lp in the_plan.layers if lp.fqn == fqn)
    with torch.no_grad():
        conv.weight.view(-1)[: conv.weight.numel() // 2] = 0
    got = nonzero_counts(model, the_plan, measured)
    assert got["params_nonzero"] == measured["params"] - conv.weight.numel() // 2
    assert got["flops_nonzero"] == measured["flops"] - round(layer_flops * 0.5)


def test_bn_recalibration_reestimates_statistics_after_apply() -> None:
    """The compressed model's BatchNorm statistics are those of its own (approximate) convs."""
    from tensorslim.plan import apply, plans_of
    from tensorslim.train.batchnorm import recalibrate_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 14 * 14, 10),
    ).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 1, 14, 14, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    small, result = compress_model(
        model,
        method="svd",
        budget=None,
        settings={"rank": 1},
        train_loader=loader,
        test_loader=loader,
        example_batch=x[:8],
        finetune_epochs=0,
        bn_recalibration_batches=2,
        progress=False,
        latency=False,
    )
    assert result["bn_recalibration_batches"] == 2
    twin = apply(model, plans_of(small)[-1])
    recalibrate_batchnorm(twin, loader, 2)
    torch.testing.assert_close(small[1].running_mean, twin[1].running_mean)
    torch.testing.assert_close(small[1].running_var, twin[1].running_var)
    assert not torch.allclose(small[1].running_mean, model[1].running_mean)  # not the stale ones


def test_the_accuracy_axis_keeps_the_loss_in_context() -> None:
    bottom, top = accuracy_limits([98.1, 98.4], 98.6)
    assert top - bottom >= CONTEXT_POINTS and bottom <= 98.1 and top >= 98.6
    assert accuracy_limits([20.0, 97.0], 98.0)[0] <= 20.0  # a collapse stays visible
    assert accuracy_limits([99.9], 99.95)[1] <= 100.0


def _markers(ax) -> list[str]:
    return [line.get_marker() for line in ax.get_lines() if line.get_marker() not in ("None", "")]


def test_pareto_methods_have_their_own_hollow_markers_and_the_original_in_view() -> None:
    points = [
        {"method": m, "flops_fraction": 0.5, "accuracy": 0.97, "accuracy_before_finetune": 0.9}
        for m in ("svd", "cp", "tucker")
    ]  # three methods on the very same spot
    fig = pareto_figure(points, original={"accuracy": 0.98})
    ax = fig.axes[0]
    main = [line for line in ax.get_lines() if line.get_label() in {"svd", "cp", "tucker"}]
    assert len({line.get_marker() for line in main}) == 3
    assert all(line.get_markerfacecolor() == "none" for line in main)
    bottom, top = ax.get_ylim()
    assert bottom <= 90 and top >= 98 and top - bottom >= CONTEXT_POINTS


def test_sparse_runs_are_placed_at_their_nonzero_flops() -> None:
    dense = {"method": "svd", "flops_fraction": 0.5, "flops_nonzero_fraction": 0.5,
             "compressed": {"accuracy": 0.9}}  # fmt: skip
    sparse = {"method": "gmp", "flops_fraction": 1.0, "flops_nonzero_fraction": 0.3,
              "compressed": {"accuracy": 0.9}}  # fmt: skip
    points = pareto_points([dense, sparse])
    assert [(p["method"], p["flops_fraction"]) for p in points] == [
        ("svd", 0.5),
        ("gmp (nonzero)", 0.3),
    ]


def test_fine_tuning_continues_the_training_epoch_axis() -> None:
    base = [{"epoch": 1, "test_accuracy": 0.5}, {"epoch": 2, "test_accuracy": 0.8}]
    run = {
        "method": "svd_train",
        "budget": {"flops": 0.5},
        "compressed": {"flops": 1, "params": 1},
        "accuracy_before_finetune": 0.6,
        # two fine-tuning phases, each counting its epochs from 1
        "history": [{"epoch": 1, "test_accuracy": 0.7}, {"epoch": 1, "test_accuracy": 0.75}],
    }
    histories = epoch_axis([run], base)
    curve = histories["svd_train flops=0.5"]
    assert [h["epoch"] for h in curve] == [2.5, 3, 4]
    assert [h["test_accuracy"] for h in curve] == [0.6, 0.7, 0.75]
    fig = training_curves_figure(histories, compressed_at=2.5)
    xs = [list(line.get_xdata()) for line in fig.axes[0].get_lines() if len(line.get_xdata()) > 1]
    assert [1, 2] in xs and [2.5, 3, 4] in xs


def test_chosen_ranks_are_marked_on_the_spectra(tiny_cnn, tiny_input) -> None:
    import tensorslim as ts

    the_plan = ts.plan(tiny_cnn, "svd", ts.Budget(flops=0.5), tiny_input, scheme="channel")
    small = ts.apply(tiny_cnn, the_plan)
    ranks = chosen_ranks(small)
    assert ranks and all(isinstance(r, int) and r >= 1 for r in ranks.values())
    spectra = model_spectra(tiny_cnn)
    fig = spectra_figure(spectra, ranks={"svd flops=0.5": ranks})
    marked = [line for line in fig.axes[0].get_lines() if line.get_marker() == "s"]
    assert len(marked) == len(ranks)
    for line in marked:
        x, y = float(line.get_xdata()[0]), float(line.get_ydata()[0])
        layer = next(n for n, r in ranks.items() if abs(r / spectra[n].numel() - x) < 1e-12)
        values = spectra[layer].double()
        assert y == pytest.approx(float(values[ranks[layer] - 1] / values[0]))


def test_compress_model_accepts_an_original_measured_without_latency() -> None:
    """A caller's ``measure_original`` taken with latency=False gives no speedup, not a KeyError."""
    from conftest import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(16, 1, 14, 14)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 10, (16,))), batch_size=8)
    original = measure(model, x[:4], loader, latency=False)
    assert "latency_ms" not in original
    _, result = compress_model(
        model, method="svd", budget=Budget(flops=0.5), train_loader=loader, test_loader=loader,
        example_batch=x[:4], finetune_epochs=0, progress=False, measure_original=original,
    )  # fmt: skip
    assert result["latency_speedup"] is None
    assert result["flops_fraction"] <= 0.5
