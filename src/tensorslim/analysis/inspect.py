"""Per-layer inspection: shapes, parameters, FLOPs, spectra and measured latency."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tensorslim.analysis.flops import count_flops
from tensorslim.analysis.latency import measure_latency
from tensorslim.analysis.profile import COMPRESSIBLE, collect_layer_info, count_params
from tensorslim.decompose.svd import conv_weight_to_matrix, singular_values
from tensorslim.facts import LayerInfo
from tensorslim.inputs import Inputs, batch_size, take_samples
from tensorslim.layers.composite import composite_matrices, is_composite
from tensorslim.rank.select import rank_from_energy


def inspect_model(
    model: nn.Module, example_batch: torch.Tensor, *, latency: bool = True, energy: float = 0.9
) -> dict[str, Any]:
    """Facts per Linear/Conv2d layer and for the whole model.

    Per layer: input/output shape (batch 1), params, FLOPs (share of the model), full rank of the
    weight matrix, the rank keeping ``energy`` of Σσ², and (optionally) the layer's own measured
    latency on an input of the example batch's size.
    """
    x1 = take_samples(example_batch, 1)
    infos, never_called = collect_layer_info(model, x1, types=COMPRESSIBLE)
    total_flops = count_flops(model, x1)
    batch = batch_size(example_batch)
    rows = []
    for fqn, info in infos.items():
        module = model.get_submodule(fqn)
        spectra = [singular_values(m) for m in _matrices(module)]
        row: dict[str, Any] = {
            "layer": fqn,
            "type": info.type_name,
            "input": "×".join(map(str, info.input_shape[1:])),
            "output": "×".join(map(str, info.output_shape[1:])),
            "params": info.params,
            "flops": info.flops,
            "flops_share": info.flops / total_flops if total_flops else 0.0,
            # a composite layer (LSTM, …) states its largest matrix's ranks
            "full_rank": max(s.numel() for s in spectra),
            f"rank@{energy:g}": max(rank_from_energy(s, energy) for s in spectra),
        }
        if latency:
            row["latency_ms"] = _layer_latency(module, info, batch)
        rows.append(row)
    whole: dict[str, Any] = {"params": count_params(model), "flops": total_flops}
    if latency:
        whole["latency_ms"] = measure_latency(model, example_batch)["median_ms"]
        whole["latency_batch"] = batch
        whole["threads"] = torch.get_num_threads()
    return {"layers": rows, "total": whole, "never_called": sorted(never_called)}


def _matrices(module: nn.Module) -> list[torch.Tensor]:
    """The weight matrices whose spectra describe the layer."""
    if is_composite(module):
        return composite_matrices(module)
    w = module.weight.detach()
    # Linear (out × in) and Conv1d (n, c, k) flatten to n × c·k; Conv2d uses the channel view
    return [w.reshape(w.shape[0], -1) if w.dim() <= 3 else conv_weight_to_matrix(w, "channel")]


def _layer_latency(module: nn.Module, info: LayerInfo, batch: int) -> float:
    """The layer's median latency on random inputs of ``batch`` samples (an attention layer
    gets its query, key and value; its own query as key and value in self-attention)."""
    dtype = next(module.parameters()).dtype

    def sample(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn((batch, *shape[1:]), dtype=dtype)

    x = sample(info.input_shape)
    example: Any = x
    if isinstance(module, nn.MultiheadAttention):
        keys = [sample(s) for s in info.other_shapes[:2]] or [x, x]
        example = Inputs((x, *keys), {})
    return measure_latency(module, example, min_run_time=0.05)["median_ms"]
