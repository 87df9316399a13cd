"""Layer weights for the allocator: how much the model's output moves per unit of a layer's error.

A layer's options carry relative output errors e = ‖ΔY‖/‖Y‖ (Y = W X on the calibration rows).
Relative errors of different layers are not on one scale: a layer whose output feeds a small
term of the residual stream, or whose errors the next softmax or LayerNorm absorbs, can take a
large e at little cost to the model's output, and another cannot. Model the truncation error as
white noise of the same energy, ΔY with i.i.d. entries of variance e²‖Y‖²/(n·m) (n rows, m
outputs). To first order the model's output f changes by J ΔY (J = ∂f/∂Y), so

    E‖Δf‖² = e² · ‖Y‖²/(n·m) · ‖J‖²_F,

and ‖J‖²_F = E_ε‖Jᵀε‖² is what the calibration pass measures as the layer's ``sensitivity``
(Σ‖∂loss/∂Y‖² for a loss whose gradient is Jᵀε, ε ~ N(0, I): the sampled-Gaussian loss). The
weight w = sensitivity · ‖Y‖²/(n·m), normalised to mean 1 over the layers, turns the allocator's
Σ e² into Σ w e² ≈ E‖Δf‖² up to a constant: the budget goes where the output is sensitive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import nn

from tensorslim.analysis.output_error import quadratic_energy, weight_rows_matrix
from tensorslim.facts import LayerStats
from tensorslim.rank.allocate import LayerChoices


def output_sensitivity(module: nn.Module, stats: LayerStats) -> float | None:
    """sensitivity · ‖WX‖²/(rows · outputs) for one layer, or ``None`` without the statistics."""
    if stats.sensitivity is None or stats.gram is None or stats.rows == 0:
        return None
    matrix = weight_rows_matrix(module)
    if matrix.shape[1] != stats.gram.shape[0]:
        return None  # a layout the Gram does not describe (e.g. a grouped conv)
    energy = quadratic_energy(matrix, stats.gram)
    return stats.sensitivity * energy / (stats.rows * matrix.shape[0])


def weighted_choices(
    choices: list[LayerChoices],
    modules: Mapping[str, nn.Module],
    stats: Mapping[str, LayerStats],
) -> list[LayerChoices]:
    """``choices`` with ``weight`` = each layer's output sensitivity over the layers' mean.

    Unchanged (every weight 1) unless every layer has a positive sensitivity: weights measured
    for some layers only would not be comparable with the others' 1.
    """
    raw = {}
    for layer in choices:
        layer_stats = stats.get(layer.fqn)
        value = None
        if layer_stats is not None:
            value = output_sensitivity(modules[layer.fqn], layer_stats)
        if value is None or not value > 0:
            return choices
        raw[layer.fqn] = value
    if not raw:
        return choices
    mean = sum(raw.values()) / len(raw)
    return [dataclasses.replace(layer, weight=raw[layer.fqn] / mean) for layer in choices]
