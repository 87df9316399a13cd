"""Fold eval-mode BatchNorm into the convolution before it.

A ``BatchNorm2d`` in eval mode is an affine map per channel: y = γ·(z − μ)/√(σ² + ε) + β. When z
is the output of a ``Conv2d`` (weight K, bias b) and nothing else reads z, the pair is one conv
with K'[o] = K[o]·s[o] and b' = (b − μ)·s + β, s = γ/√(σ² + ε). Folding removes a memory-bound
pass over every activation (at batch 64 on resnet20 the BatchNorms took more time than the
convolutions), so it belongs in the dense baseline too — a comparison against an unfolded
baseline credits compression with what folding did. Decomposing the folded conv then spreads
the per-channel scale over the factors.

The pairs come from a ``torch.fx`` trace: conv → BN where the conv's output has no other user.
Models fx cannot trace raise a clear error. The folded BN becomes ``nn.Identity`` in place, so
module names (and a plan's layer names) stay the same.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from tensorslim.errors import TensorslimError


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv fqn, BatchNorm fqn) for every BatchNorm2d that only reads one Conv2d's output."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable Python
        raise TensorslimError(
            f"cannot fold BatchNorm: torch.fx cannot trace {type(model).__name__} ({exc}); "
            "fold it by hand or leave --fold-bn off"
        ) from None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), nn.Conv2d)
            and len(source.users) == 1
        ):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The single conv equal to ``bn(conv(x))`` with ``bn`` in eval mode."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise TensorslimError("cannot fold a BatchNorm2d without running statistics")
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
        folded.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = conv.bias * scale if conv.bias is not None else torch.zeros_like(shift)
        folded.bias = nn.Parameter(bias + shift)
    return folded


def fold_batchnorm(
    model: nn.Module, *, inplace: bool = False, only: list[str] | None = None
) -> tuple[nn.Module, list[str]]:
    """``model`` (a copy unless ``inplace``) with every foldable BatchNorm folded into its conv
    (with ``only``: exactly those BatchNorms, an error if one cannot be folded).

    Returns the model and the folded BatchNorms' names. The running statistics are used, never
    batch statistics: the folded model is the eval-mode model.
    """
    target = model if inplace else copy.deepcopy(model)
    pairs = conv_bn_pairs(target)
    if only is not None:
        wanted = set(only)
        missing = sorted(wanted - {bn for _, bn in pairs})
        if missing:
            raise TensorslimError(
                f"the plan folds BatchNorm {missing[0]!r}, which this model does not have right "
                "after a conv (was the plan made for another model?)"
            )
        pairs = [(c, b) for c, b in pairs if b in wanted]
    folded = []
    for conv_name, bn_name in pairs:
        conv, bn = target.get_submodule(conv_name), target.get_submodule(bn_name)
        _set(target, conv_name, fold_pair(conv, bn))  # type: ignore[arg-type]
        _set(target, bn_name, nn.Identity())
        folded.append(bn_name)
    return target, folded


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
