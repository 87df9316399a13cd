"""The plain data the planner, the profiler, the allocator and the methods share.

These types sit at the bottom of the package: they import nothing from tensorslim, so every other
module can import them without a cycle.

- :class:`LayerInfo`: what one forward pass tells about a layer (shapes, parameters, FLOPs).
- :class:`LayerStats`: what calibration batches tell about the activations a layer sees.
- :class:`Option`: one way a method could compress one layer, with its cost and its error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# an option's build description: JSON-ready, all ``Method.build`` needs (ranks, scheme, chain…)
Config = dict[str, Any]

WEIGHT_ERROR = "weight"  # ‖W − Ŵ‖_F / ‖W‖_F
OUTPUT_ERROR = "output"  # ‖(W − Ŵ)X‖_F / ‖WX‖_F over the calibration inputs X


@dataclass(frozen=True)
class LayerInfo:
    """Facts about one layer, gathered by running an example input through the model.

    ``input_shape``/``output_shape`` include the batch dimension of the example input (the planner
    uses a batch of 1). ``flops`` is the dense layer's FLOPs at that input (2 per multiply-add),
    summed over its ``calls`` (a layer shared by two parents runs twice). ``other_shapes`` are
    the shapes of the call's further tensor inputs (an attention layer's key and value).
    """

    fqn: str
    type_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    flops: int
    calls: int = 1
    other_shapes: tuple[tuple[int, ...], ...] = ()


@dataclass
class LayerStats:
    """Streaming statistics of the inputs one layer saw over the calibration batches.

    The layer's weight is viewed as a matrix M (out × d) that multiplies input rows x ∈ R^d:
    for a Linear, d = in_features and a row is one token; for a Conv2d, d = c·kh·kw and a row is
    one unfolded patch (``F.unfold`` order (c, kh, kw), the conv's own stride, padding and
    dilation), so the layer's output is M·x for every row. Over the ``rows`` rows seen:

    - ``gram``: Σ x xᵀ (d × d, float64) — the input Gram XᵀX;
    - ``abs_mean``: mean |x_j| per input column j (d);
    - ``sq_mean``: mean x_j² per input column j (d);
    - ``output_energy``: Σ ‖y‖² of the layer's outputs (bias included);
    - ``fisher``: Σ over batches of (∂loss/∂W)², the weight's shape (float64), when a loss was
      given;
    - ``sensitivity``: Σ over batches (and calls) of ‖∂loss/∂y‖²_F, the squared gradient of the
      loss with respect to the layer's whole output y, when a loss was given.

    Fields are ``None`` when no method asked for them.
    """

    rows: int = 0
    batches: int = 0
    gram: torch.Tensor | None = None
    abs_mean: torch.Tensor | None = None
    sq_mean: torch.Tensor | None = None
    output_energy: float | None = None
    fisher: torch.Tensor | None = None
    sensitivity: float | None = None


@dataclass(frozen=True)
class Option:
    """One way a method could compress one layer.

    ``config`` is JSON-serialisable and is all ``build`` needs (e.g. ``{"rank": 8, "scheme":
    "channel"}``); ``error`` is the relative error the option causes, in ``error_space``:
    ``"weight"``, ‖W − Ŵ‖_F / ‖W‖_F, or ``"output"``, ‖(W − Ŵ)X‖_F / ‖WX‖_F over the calibration
    inputs. ``params`` and ``flops`` are the replacement's (FLOPs for the layer's input).
    ``method`` lets a method delegate a layer to another method (e.g. Tucker falls back to SVD on
    1×1 convs); ``label`` is a short human description ("rank 8"). ``latency`` is the
    replacement's measured latency in ms at the plan's deployment setting (``None``: not
    measured), summed over the layer's calls.
    """

    method: str
    config: Config
    params: int
    flops: int
    error: float
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    error_space: str = WEIGHT_ERROR
    latency: float | None = None
