"""FLOPs: counted by ``torch.utils.flop_counter`` for whole models, analytic for single layers.

Convention everywhere: 2 FLOPs per multiply-add (what ``FlopCounterMode`` counts for matmul,
conv, bmm and einsum). Bias additions, activations, pooling and normalisation are not counted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tensorslim.inputs import ForwardFn, call_model
from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.conv_geometry import conv_output_hw
from tensorslim.layers.linear_like import is_linear_like, linear_features


def count_flops(model: nn.Module, example_input: Any, forward_fn: ForwardFn | None = None) -> int:
    """Total FLOPs of one forward pass of ``model`` on ``example_input``, by FlopCounterMode.

    The input takes any structure :mod:`tensorslim.inputs` accepts (or ``forward_fn``).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(model, example_input, forward_fn)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def dense_layer_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Analytic FLOPs of a Linear(-like), Conv1d/2d or structured layer on an ``input_shape`` input.

    Linear (and Linear-like, e.g. transformers' Conv1D): 2·tokens·in·out.
    Conv1d/Conv2d: 2·B·(output positions)·n·(c/groups)·(kernel taps). Other modules: 0.
    """
    if isinstance(module, StructuredLayer):
        return int(module.analytic_flops(tuple(input_shape)))
    if is_linear_like(module):
        in_features, out_features = linear_features(module)
        return 2 * math.prod(input_shape[:-1]) * in_features * out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        dims = len(module.kernel_size)
        batch = math.prod(input_shape[: -(dims + 1)])
        positions = conv_output_hw(
            tuple(input_shape[-dims:]),  # type: ignore[arg-type]
            module.kernel_size,  # type: ignore[arg-type]
            module.stride,  # type: ignore[arg-type]
            module.padding,  # type: ignore[arg-type]
            module.dilation,  # type: ignore[arg-type]
        )
        taps = math.prod(module.kernel_size)
        per_position = module.out_channels * (module.in_channels // module.groups) * taps
        return 2 * batch * math.prod(positions) * per_position
    return 0
