"""Measurements: parameters, FLOPs, latency, per-layer facts, reconstruction error."""

from tensorslim.analysis.flops import count_flops, dense_layer_flops
from tensorslim.analysis.latency import measure_latency
from tensorslim.analysis.profile import collect_layer_info, count_params

__all__ = [
    "collect_layer_info",
    "count_flops",
    "count_params",
    "dense_layer_flops",
    "measure_latency",
]
