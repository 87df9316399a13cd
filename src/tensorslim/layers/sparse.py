"""Unstructured sparsity: weight masks for training, compact storage and sparse inference.

Training form — a mask parametrization (``torch.nn.utils.parametrize``) on the ``weight`` of an
``nn.Linear`` or ``nn.Conv2d`` (grouped convs included)::

    module.weight = original ⊙ mask          original: the trained parameter, mask ∈ {0, 1}

``original`` stays an ``nn.Parameter`` (the optimizer updates it), ``mask`` is a buffer of the
parametrization module, so the state-dict keys are ``parametrizations.weight.original`` and
``parametrizations.weight.0.mask``. The gradient that reaches ``original`` is ∂L/∂W ⊙ mask (zero at
pruned positions); RigL-style regrowth needs the *dense* gradient ∂L/∂W at every position, so the
parametrization can capture it with a hook on its output W (see :class:`WeightMask`).

``finalize`` bakes the zeros in (weight = original ⊙ mask becomes a plain parameter again) and
removes the parametrization; the result is an ordinary dense layer whose weight has zeros.

Storage — :func:`sparse_state` writes each tensor in the smallest of three encodings: dense, values
+ flat int32 indices (nnz·(b + 4) bytes, b the element size), or values + a one-bit-per-element
occupancy bitmap (⌈numel/8⌉ + nnz·b bytes); :func:`unpack_sparse_state` inverts it exactly.

Inference — :class:`SparseLinear` and :class:`SparseConv2d` hold the weight in CSR form and compute
y = W x with ``torch.sparse`` (convs through ``unfold``: per sample, the n × (c·kh·kw) sparse
kernel times the (c·kh·kw) × L matrix of input patches). They cost 2·nnz FLOPs per output
position instead of 2·n·c·kh·kw; whether that is faster than the dense kernel on a CPU depends on
the sparsity and the shapes — measure it (``bench/pruning.py``).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from tensorslim.errors import TensorslimError
from tensorslim.layers.base import StructuredLayer, dense_linear
from tensorslim.layers.conv_geometry import conv_output_hw, dense_conv, pair

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

# Suffixes of the keys that hold one sparsely encoded tensor in a ``sparse_state`` dict.
_VALUES, _INDICES, _BITMAP, _SHAPE = (
    "@sparse.values",
    "@sparse.indices",
    "@sparse.bitmap",
    "@sparse.shape",
)
_SUFFIXES = (_VALUES, _INDICES, _BITMAP, _SHAPE)


class WeightMask(nn.Module):
    """The parametrization W = original ⊙ mask, with an optional dense-gradient capture.

    ``mask`` has the weight's shape and dtype (values 0 or 1; a float mask multiplies without a
    type promotion and is broadcast by DistributedDataParallel like any buffer).

    When ``capture`` is true, every W produced while autograd records registers a tensor hook
    that adds ∂L/∂W (all positions, pruned ones included) into ``dense_grad``. W may be produced
    several times in one step (the forward pass, then a regularizer reading ``module.weight``);
    the hooks sum, which is the total derivative with respect to the shared W.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.capture = False
        self.dense_grad: torch.Tensor | None = None

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        weight = original * self.mask
        if self.capture and weight.requires_grad:
            weight.register_hook(self._accumulate)
        return weight

    def _accumulate(self, grad: torch.Tensor) -> None:
        if self.dense_grad is None:
            self.dense_grad = grad.detach().clone()
        else:
            self.dense_grad.add_(grad.detach())

    def start_capture(self) -> None:
        """Capture ∂L/∂W from the next backward pass on (previous captures are dropped)."""
        self.capture = True
        self.dense_grad = None

    def stop_capture(self) -> None:
        """Stop capturing and release the stored gradient."""
        self.capture = False
        self.dense_grad = None

    def extra_repr(self) -> str:
        density = float(self.mask.mean()) if self.mask.numel() else 1.0
        return f"density={density:.4f}"


def _check_prunable(module: nn.Module, what: str) -> None:
    if not isinstance(module, PRUNABLE_TYPES):
        raise TensorslimError(
            f"{what} is a {type(module).__name__}: masks go on nn.Linear or nn.Conv2d weights only"
        )


def mask_of(module: nn.Module) -> WeightMask | None:
    """The :class:`WeightMask` parametrizing ``module.weight``, or ``None``."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:  # type: ignore[union-attr]
        if isinstance(p, WeightMask):
            return p
    return None


def add_mask(module: nn.Module, mask: torch.Tensor | None = None, *, name: str = "layer") -> None:
    """Register the mask parametrization on ``module.weight`` in place (all ones by default).

    ``mask`` must have the weight's shape and hold only 0 and 1. Raises if the weight already has
    a mask (call :func:`set_mask` to change it) or the module is not a Linear/Conv2d.
    """
    _check_prunable(module, name)
    if mask_of(module) is not None:
        raise TensorslimError(f"{name} already has a pruning mask: use set_mask to change it")
    weight = module.weight
    if mask is None:
        mask = torch.ones_like(weight, memory_format=torch.contiguous_format)
    else:
        mask = _validated_mask(mask, weight, name)
    parametrize.register_parametrization(module, "weight", WeightMask(mask.detach().clone()))


def _validated_mask(mask: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    if tuple(mask.shape) != tuple(weight.shape):
        raise TensorslimError(
            f"mask for {name} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}"
        )
    mask = mask.to(device=weight.device, dtype=weight.dtype)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise TensorslimError(f"mask for {name} must contain only 0 and 1")
    return mask


def set_mask(module: nn.Module, mask: torch.Tensor, *, name: str = "layer") -> None:
    """Replace the mask of an already masked ``module`` (values copied into the buffer)."""
    holder = mask_of(module)
    if holder is None:
        raise TensorslimError(f"{name} has no pruning mask: call add_mask first")
    with torch.no_grad():
        holder.mask.copy_(_validated_mask(mask, holder.mask, name))


def original_weight(module: nn.Module) -> nn.Parameter:
    """The trained parameter under the mask (``module.weight`` itself when unmasked)."""
    if mask_of(module) is not None:
        return module.parametrizations.weight.original  # type: ignore[union-attr,return-value]
    return module.weight  # type: ignore[return-value]


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(fqn, module) of every module with a pruning mask, in registration order."""
    for fqn, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and mask_of(module) is not None:
            yield fqn, module


def prunable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(fqn, module) of every Linear / Conv2d, in registration order."""
    for fqn, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            yield fqn, module


def finalize_module(module: nn.Module) -> nn.Module:
    """Bake the mask into ``module.weight`` and remove the parametrization (in place)."""
    if mask_of(module) is not None:
        # copy.deepcopy of a parametrized module shares its injected class with the original,
        # and remove_parametrizations deletes the `weight` property from that class, breaking
        # the original too. A private copy of the class keeps the removal local.
        cls = module.__class__
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return module


def finalize(model: nn.Module) -> nn.Module:
    """Bake every mask in ``model`` into its weight and remove the parametrizations (in place)."""
    for _, module in list(masked_modules(model)):
        finalize_module(module)
    return model


def weight_sparsity(module: nn.Module) -> float:
    """Fraction of exactly-zero entries of the (effective, masked) weight."""
    weight = module.weight.detach()
    return float((weight == 0).sum()) / max(1, weight.numel())


# ----------------------------------------------------------------------------------------------
# Compact storage


def baked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as it would be after :func:`finalize`, without changing ``model``.

    A masked layer's ``…parametrizations.weight.original`` and ``…parametrizations.weight.0.mask``
    become one ``….weight`` = original ⊙ mask.
    """
    state = dict(model.state_dict())
    for fqn, module in masked_modules(model):
        prefix = f"{fqn}." if fqn else ""
        state.pop(f"{prefix}parametrizations.weight.original")
        for key in [k for k in state if k.startswith(f"{prefix}parametrizations.weight.")]:
            state.pop(key)
        state[f"{prefix}weight"] = module.weight.detach()
    return state


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape) → uint8 bytes, 8 flags per byte, most significant bit first."""
    flat = flags.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: the first ``count`` flags as a flat bool tensor."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:count].bool()


def sparse_state(
    model_or_state: nn.Module | dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A compact, safetensors-ready copy of a state dict: each tensor in its smallest encoding.

    For a tensor t with n elements of b bytes, nnz of them nonzero, the encodings cost
    dense n·b, indices nnz·(b + 4) (flat int32 positions; int64 beyond 2³¹ elements), bitmap
    ⌈n/8⌉ + nnz·b. A sparse tensor named ``k`` is stored as ``k@sparse.values``, ``k@sparse.shape``
    and ``k@sparse.indices`` or ``k@sparse.bitmap``. Masked layers are baked first (the masks
    themselves are not stored: they are implied by the zeros). :func:`unpack_sparse_state` inverts.
    """
    if isinstance(model_or_state, nn.Module):
        state = baked_state_dict(model_or_state)
    else:
        state = dict(model_or_state)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if any(key.endswith(s) for s in _SUFFIXES):
            raise TensorslimError(f"state-dict key '{key}' clashes with the sparse encoding names")
        tensor = tensor.detach().cpu()
        if tensor.is_sparse or tensor.layout != torch.strided:
            raise TensorslimError(f"'{key}' is not a strided tensor: densify it before storing")
        n = tensor.numel()
        if n == 0 or tensor.dtype == torch.bool:
            out[key] = tensor.contiguous()
            continue
        flat = tensor.reshape(-1)
        nonzero = flat != 0
        nnz = int(nonzero.sum())
        b = tensor.element_size()
        index_bytes = 4 if n < 2**31 else 8
        costs = {
            "dense": n * b,
            "indices": nnz * (b + index_bytes),
            "bitmap": (n + 7) // 8 + nnz * b,
        }
        encoding = min(costs, key=lambda name: (costs[name], name != "dense"))
        if encoding == "dense":
            out[key] = tensor.contiguous()
            continue
        out[key + _VALUES] = flat[nonzero].contiguous()
        out[key + _SHAPE] = torch.tensor(list(tensor.shape), dtype=torch.int64)
        if encoding == "indices":
            index_dtype = torch.int32 if index_bytes == 4 else torch.int64
            out[key + _INDICES] = nonzero.nonzero().reshape(-1).to(index_dtype)
        else:
            out[key + _BITMAP] = _pack_bits(nonzero)
    return out


def unpack_sparse_state(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense state dict that :func:`sparse_state` encoded (bit-exact)."""
    out: dict[str, torch.Tensor] = {}
    sparse_keys: set[str] = set()
    for key in packed:
        for suffix in _SUFFIXES:
            if key.endswith(suffix):
                sparse_keys.add(key[: -len(suffix)])
                break
        else:
            out[key] = packed[key]
    for key in sorted(sparse_keys):
        try:
            values = packed[key + _VALUES]
            shape = [int(v) for v in packed[key + _SHAPE].tolist()]
        except KeyError as exc:
            raise TensorslimError(
                f"sparse tensor '{key}' lacks {exc.args[0]!r}: the file is incomplete"
            ) from None
        n = math.prod(shape)
        flat = values.new_zeros(n)
        if key + _INDICES in packed:
            index = packed[key + _INDICES].to(torch.int64)
        elif key + _BITMAP in packed:
            index = _unpack_bits(packed[key + _BITMAP], n).nonzero().reshape(-1)
        else:
            raise TensorslimError(f"sparse tensor '{key}' has neither indices nor a bitmap")
        if index.numel() != values.numel() or (index.numel() and int(index.max()) >= n):
            raise TensorslimError(f"sparse tensor '{key}' has inconsistent indices and values")
        flat[index] = values
        out[key] = flat.reshape(shape)
    return out


def save_sparse(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> int:
    """Write :func:`sparse_state` of ``model`` to a safetensors file; returns its size in bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sparse_state(model), str(path), metadata=metadata)
    return path.stat().st_size


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_sparse` back into a dense state dict."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise TensorslimError(f"sparse weights file {path} does not exist")
    return unpack_sparse_state(load_file(str(path)))


# ----------------------------------------------------------------------------------------------
# Sparse inference


class _CsrWeight(StructuredLayer):
    """Shared storage of an n × m CSR weight matrix (buffers, so state_dict/safetensors work)."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None

    def _store(self, matrix: torch.Tensor, bias: torch.Tensor | None) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = matrix.detach().to_sparse_csr()
        self.register_buffer("crow_indices", csr.crow_indices().clone())
        self.register_buffer("col_indices", csr.col_indices().clone())
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.matrix_shape = (int(matrix.shape[0]), int(matrix.shape[1]))

    def csr(self) -> torch.Tensor:
        """The weight as a ``torch.sparse_csr_tensor`` over the buffers (no copy; cached until
        the buffers are replaced, e.g. by ``.to()`` or ``load_state_dict``)."""
        key = (
            self.values.data_ptr(),
            self.crow_indices.data_ptr(),
            self.col_indices.data_ptr(),
            self.values.device,
            self.values.dtype,
        )
        cached = getattr(self, "_csr_cache", None)
        if cached is None or cached[0] != key:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse invariant checks")
                tensor = torch.sparse_csr_tensor(
                    self.crow_indices, self.col_indices, self.values, self.matrix_shape
                )
            object.__setattr__(self, "_csr_cache", (key, tensor))
            return tensor
        return cached[1]

    def nnz(self) -> int:
        return int(self.values.numel())

    def analytic_params(self) -> int:
        """Stored numbers of the sparse form: nnz values (+ bias); indices are not counted."""
        return self.nnz() + (0 if self.bias is None else self.bias.numel())

    def nonzero_params(self) -> int:
        return self.analytic_params()

    def dense_matrix(self) -> torch.Tensor:
        return self.csr().to_dense()


class SparseLinear(_CsrWeight):
    """y = W x + b with W (out × in) in CSR form; 2·nnz FLOPs per token."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        _check_prunable(layer, "SparseLinear source")
        if mask_of(layer) is not None:
            raise TensorslimError("finalize the masked Linear before converting it to SparseLinear")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._store(layer.weight, layer.bias)

    @classmethod
    def from_dense(cls, layer: nn.Linear) -> SparseLinear:
        return cls(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        cols = x.reshape(-1, self.in_features).t()
        # CSR × strided: the sparse kernel walks only the stored entries.
        y = torch.sparse.mm(self.csr(), cols).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def to_dense(self) -> nn.Linear:
        return dense_linear(self.dense_matrix(), self.bias)

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        return 2 * math.prod(input_shape[:-1]) * self.nnz()

    def config(self) -> dict[str, Any]:
        return {
            "nnz": self.nnz(),
            "sparsity": 1 - self.nnz() / (self.in_features * self.out_features),
        }

    def extra_repr(self) -> str:
        return f"{self.in_features} → {self.out_features}, nnz={self.nnz()}"


def _unfold_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Symmetric zero padding equivalent to ``conv.padding`` (what ``F.unfold`` accepts)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                raise TensorslimError(
                    "SparseConv2d cannot reproduce padding='same' with an even kernel extent "
                    "(asymmetric padding); keep this conv dense"
                )
            pads.append(total // 2)
        return (pads[0], pads[1])
    return pair(conv.padding)  # type: ignore[arg-type]


def sparse_conv_unsupported_reason(conv: nn.Conv2d) -> str | None:
    """Why :class:`SparseConv2d` cannot replace ``conv``, or ``None``."""
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups}) stays dense at inference"
    if conv.padding_mode != "zeros":
        return f"padding_mode '{conv.padding_mode}' stays dense at inference"
    if conv.padding == "same" and tuple(conv.stride) != (1, 1):
        return "padding='same' with stride > 1 stays dense at inference"
    if conv.padding == "same" and any(
        (d * (k - 1)) % 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)
    ):
        return "padding='same' with an even kernel extent stays dense at inference"
    return None


class SparseConv2d(_CsrWeight):
    """A Conv2d computed as a sparse × dense matmul on unfolded patches.

    Input (N, c, H, W) → patches P = unfold(x) of shape (N, c·kh·kw, L), L = Ho·Wo; per sample
    Y_i = K_csr P_i with K the n × (c·kh·kw) kernel; output (N, n, Ho, Wo).
    FLOPs 2·N·Ho·Wo·nnz (the unfold copy is memory traffic, not FLOPs).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        _check_prunable(conv, "SparseConv2d source")
        if mask_of(conv) is not None:
            raise TensorslimError("finalize the masked Conv2d before converting it to SparseConv2d")
        reason = sparse_conv_unsupported_reason(conv)
        if reason is not None:
            raise TensorslimError(f"cannot build SparseConv2d: {reason}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = pair(conv.kernel_size)
        self.stride = pair(conv.stride)
        self.dilation = pair(conv.dilation)
        self.padding = _unfold_padding(conv)
        n = conv.out_channels
        self._store(conv.weight.reshape(n, -1), conv.bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> SparseConv2d:
        return cls(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        ho, wo = conv_output_hw(
            (x.shape[-2], x.shape[-1]), self.kernel_size, self.stride, self.padding, self.dilation
        )
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        csr = self.csr()
        # One CSR × (c·kh·kw, L) product per sample: patches[i] is contiguous, whereas one
        # product over (c·kh·kw, N·L) would first copy all patches into that layout
        # (measured 1.4–2.6× slower here).
        y = torch.stack([torch.sparse.mm(csr, patches[i]) for i in range(batch)])
        y = y.reshape(batch, self.out_channels, ho, wo)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def to_dense(self) -> nn.Conv2d:
        return dense_conv(self, self.dense_matrix(), self.bias)

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        batch = math.prod(input_shape[:-3])
        ho, wo = conv_output_hw(
            (input_shape[-2], input_shape[-1]),
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
        )
        return 2 * batch * ho * wo * self.nnz()

    def config(self) -> dict[str, Any]:
        total = self.matrix_shape[0] * self.matrix_shape[1]
        return {"nnz": self.nnz(), "sparsity": 1 - self.nnz() / total}

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return f"{self.in_channels} → {self.out_channels}, {kh}×{kw}, nnz={self.nnz()}"


def to_sparse_inference(
    model: nn.Module, min_sparsity: float = 0.7, *, convs: bool = True
) -> nn.Module:
    """A copy of ``model`` with every Linear / Conv2d of weight sparsity ≥ ``min_sparsity``
    replaced by :class:`SparseLinear` / :class:`SparseConv2d` (masks are baked first).

    ``convs=False`` converts the Linear layers only: on CPUs the unfold-based sparse conv is
    usually slower than the dense convolution kernel even at 98 % sparsity (bench/pruning.py),
    while a CSR Linear pays from roughly 90 %. Layers the sparse path cannot reproduce (grouped
    or non-zero-padded convs) stay dense, with a warning naming them.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise TensorslimError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    new = finalize(copy.deepcopy(model))
    replacements: list[tuple[str, nn.Module]] = []
    for fqn, module in prunable_modules(new):
        if weight_sparsity(module) < min_sparsity:
            continue
        if isinstance(module, nn.Conv2d):
            if not convs:
                continue
            reason = sparse_conv_unsupported_reason(module)
            if reason is not None:
                warnings.warn(f"{fqn}: {reason}", stacklevel=2)
                continue
            replacements.append((fqn, SparseConv2d(module)))
        else:
            replacements.append((fqn, SparseLinear(module)))
    for fqn, replacement in replacements:
        _set_submodule(new, fqn, replacement)
    return new


def _set_submodule(model: nn.Module, fqn: str, replacement: nn.Module) -> None:
    if not fqn:
        raise TensorslimError("the model itself is a single layer: wrap it in a container first")
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)
