"""torch's fused Transformer inference paths, kept away from compressed layers.

In eval mode ``nn.TransformerEncoderLayer`` (batch_first) runs one fused kernel that reads
``self_attn.in_proj_weight``, ``linear1.weight``, ``linear2.weight`` … directly, and
``nn.TransformerEncoder`` (given a padding mask) converts its input to a nested tensor for that
kernel. A compressed sub-layer has no such weight: the fused path would crash (or, before a
sub-layer is replaced, never call it). So after a plan is applied, every encoder layer holding a
structured layer is marked to take its unfused path — by a no-op forward pre-hook, the signal
torch's own check honours ("forward pre-/hooks are attached to the module") — and every encoder
holding one stops building nested tensors (``use_nested_tensor = False``). Layers left dense
keep the fused path. ``load`` applies the plan again, so a loaded model is marked the same way.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tensorslim.layers.base import StructuredLayer


def unfused_path_hook(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing: its presence keeps the fused encoder path off."""
    return None


def keep_compressed_layers_unfused(model: nn.Module) -> list[str]:
    """Mark every Transformer encoder (layer) of ``model`` that holds a structured layer; return
    the names of those newly marked."""
    marked = []
    for fqn, module in model.named_modules():
        if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            continue
        if not any(isinstance(m, StructuredLayer) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoder):
            if getattr(module, "use_nested_tensor", False):
                module.use_nested_tensor = False
                marked.append(fqn)
            continue
        if unfused_path_hook not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(unfused_path_hook)
            marked.append(fqn)
    return marked
