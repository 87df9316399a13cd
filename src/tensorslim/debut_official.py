"""Read the official DeBut code's artefacts (rlin27/DeBut) into tensorslim's DeBut layers.

Three artefacts, all read as data (never executing code from the file):

- **chain files** (``Fine_tuning/rshapes/*.txt``): one line per DeBut layer, five integers
  ``p q r s t`` per factor, input side first — tensorslim's chain text form, one chain a line;
- **fine-tuned layer parameters**: an official ``DeBut`` / ``DeBut_2dConv`` layer keeps all its
  nonzeros in one flat parameter ``twiddle`` of Σ_k p_k s_k values; factor k's slice, viewed
  (B, t, r, s), holds value ``[b, d, i, j]`` at row b·r·t + i·t + d and column b·s·t + j·t + d,
  so tensorslim's (B, r, s, t) storage is ``slice.view(B, t, r, s).permute(0, 2, 3, 1)``.
  A checkpoint (``model_best.pth``: ``{"state_dict": …}``) holds ``<layer>.twiddle`` and
  ``<layer>.bias``, possibly behind a DataParallel ``module.`` prefix;
- **ALS initialisations** (``Best_DeBut_info.pth.tar``): ``{"DeBut_factors": [F_K, …, F_1]}``,
  the factors as dense p×q matrices, *output side first* (the ALS code multiplies
  ``D ≈ F_K ⋯ F_1`` left to right). Their values are read at the chain's pattern; a matrix with
  nonzeros outside it is not a factor of that chain and is refused.

Official conv layers unfold position-major (kh, kw, C_in); they load into a ``DeButConv2d``
with ``order="position"`` (the default) only.

Files: ``.safetensors``, ``.npz`` / ``.npy`` (``allow_pickle=False``), or PyTorch files read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.layers.debut import DeButConv2d, DeButLinear
from tensorslim.layers.debut_chain import DeButChain
from tensorslim.train.checkpoint import refusal_reason

DeButLayer = DeButLinear | DeButConv2d

# ------------------------------------------------------------------------------- chain files


def parse_rshapes(text: str) -> list[DeButChain]:
    """One chain per non-empty line of an official ``rshapes`` text (input side first)."""
    chains = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            chains.append(DeButChain.parse(line))
        except TensorslimError as exc:
            raise TensorslimError(f"rshapes line {number}: {exc}") from None
    if not chains:
        raise TensorslimError("the rshapes text holds no chain: write one chain per line")
    return chains


def read_rshapes(path: str | Path) -> list[DeButChain]:
    """The chains of an official ``rshapes`` file, one per line, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise TensorslimError(f"rshapes file {path} does not exist")
    return parse_rshapes(path.read_text())


def format_rshapes(chains: Sequence[DeButChain | str]) -> str:
    """The official ``rshapes`` text for ``chains``: single spaces, one chain per line."""
    return "".join(
        " ".join(str(int(v)) for f in DeButChain.parse(c) for v in (f.p, f.q, f.r, f.s, f.t)) + "\n"
        for c in chains
    )


def chain_setting(chains: Sequence[DeButChain], layers: Sequence[str]) -> dict[str, str]:
    """The ``debut`` method's ``chain`` setting ``{fqn: chain}``, pairing lines with layers."""
    if len(chains) != len(layers):
        raise TensorslimError(
            f"the rshapes file has {len(chains)} chains for {len(layers)} layers: give one "
            "layer name per line, in the file's order"
        )
    return {fqn: chain.text for fqn, chain in zip(layers, chains, strict=True)}


# ---------------------------------------------------------------------------- factor tensors


def twiddle_to_factors(twiddle: torch.Tensor, chain: DeButChain | str) -> list[torch.Tensor]:
    """Split an official flat ``twiddle`` into tensorslim's factors, shapes (B, r, s, t)."""
    chain = DeButChain.parse(chain)
    flat = torch.as_tensor(twiddle).detach().reshape(-1)
    if flat.numel() != chain.nnz:
        raise TensorslimError(
            f"a twiddle of {flat.numel()} values does not fit chain '{chain.text}', which has "
            f"{chain.nnz} nonzeros (Σ p·s): is it the chain of the same layer?"
        )
    out, used = [], 0
    for spec in chain:
        piece = flat[used : used + spec.nnz].reshape(spec.blocks, spec.t, spec.r, spec.s)
        out.append(piece.permute(0, 2, 3, 1).contiguous())
        used += spec.nnz
    return out


def factors_to_twiddle(factors: Sequence[torch.Tensor], chain: DeButChain | str) -> torch.Tensor:
    """tensorslim's factors (B, r, s, t) as the official flat ``twiddle`` (inverse of above)."""
    chain = DeButChain.parse(chain)
    _check_factor_shapes(factors, chain)
    return torch.cat([w.detach().permute(0, 3, 1, 2).reshape(-1) for w in factors])


def dense_to_factors(
    matrices: Sequence[torch.Tensor], chain: DeButChain | str, *, atol: float = 0.0
) -> list[torch.Tensor]:
    """The official ALS ``DeBut_factors`` (dense p×q matrices, output side first) as
    tensorslim's factors (input side first, (B, r, s, t)), read at each factor's pattern."""
    chain = DeButChain.parse(chain)
    if len(matrices) != len(chain):
        raise TensorslimError(
            f"{len(matrices)} ALS factors for a chain of {len(chain)} factors '{chain.text}'"
        )
    out = []
    for k, (spec, m) in enumerate(zip(chain, reversed(list(matrices)), strict=True)):
        m = torch.as_tensor(m).detach()
        if tuple(m.shape) != (spec.p, spec.q):
            raise TensorslimError(
                f"ALS factor for chain factor {k} ({spec.text}) is {tuple(m.shape)}, needs "
                f"({spec.p}, {spec.q}); the official list runs output side first"
            )
        rows, cols = spec.indices(m.device)
        values = m[rows, cols]
        off = m.clone()
        off[rows, cols] = 0
        stray = float(off.abs().max()) if off.numel() else 0.0
        if stray > atol:
            raise TensorslimError(
                f"ALS factor for chain factor {k} ({spec.text}) has nonzeros outside its "
                f"pattern (up to {stray:.3g}): it is not a factor of this chain"
            )
        out.append(values.contiguous())
    return out


def _check_factor_shapes(factors: Sequence[torch.Tensor], chain: DeButChain) -> None:
    if len(factors) != len(chain):
        raise TensorslimError(f"{len(factors)} factors for a chain of {len(chain)}")
    for spec, w in zip(chain, factors, strict=True):
        if tuple(w.shape) != spec.weight_shape:
            raise TensorslimError(
                f"factor for ({spec.text}) has shape {tuple(w.shape)}, needs {spec.weight_shape}"
            )


def set_factors(
    layer: DeButLayer, factors: Sequence[torch.Tensor], bias: torch.Tensor | None = None
) -> None:
    """Copy factors (input side first, (B, r, s, t)) and optionally the bias into ``layer``."""
    if isinstance(layer, DeButConv2d) and layer.order != "position":
        raise TensorslimError(
            "official DeBut factors are position-major (kh, kw, C_in): build the DeButConv2d "
            "with order='position' to load them"
        )
    _check_factor_shapes(factors, layer.chain)
    with torch.no_grad():
        for p, w in zip(layer.factors, factors, strict=True):
            p.copy_(w.to(dtype=p.dtype, device=p.device))
        if bias is not None:
            if layer.bias is None or layer.bias.shape != bias.shape:
                raise TensorslimError(
                    f"bias of shape {tuple(bias.shape)} does not fit this layer's bias "
                    f"({None if layer.bias is None else tuple(layer.bias.shape)})"
                )
            layer.bias.copy_(bias.to(dtype=layer.bias.dtype, device=layer.bias.device))
    layer.init_info = {"method": "official"}


# -------------------------------------------------------------------------------- files


def read_tensors(path: str | Path) -> Any:
    """A file's tensors as data: safetensors, numpy without pickle, or ``weights_only`` torch."""
    path = Path(path)
    if not path.is_file():
        raise TensorslimError(f"file {path} does not exist")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        import safetensors.torch

        return safetensors.torch.load_file(str(path))
    if name.endswith((".npz", ".npy")):
        try:
            loaded = np.load(path, allow_pickle=False)
        except ValueError as exc:  # an object array would need pickle
            raise TensorslimError(f"{path} was refused: {exc}") from None
        if isinstance(loaded, np.ndarray):
            return torch.from_numpy(loaded)
        with loaded:
            return {key: torch.from_numpy(loaded[key]) for key in loaded.files}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TensorslimError(
            f"{path} was refused: it holds pickled objects, not only tensors "
            f"({refusal_reason(exc)}); re-save its tensors (e.g. as safetensors)"
        ) from None


def _numbered(mapping: Mapping[str, Any], prefix: str) -> list[Any] | None:
    """Values of keys ``<prefix>0``, ``<prefix>1``, … in order, or None if there are none."""
    found = {}
    for key, value in mapping.items():
        tail = key[len(prefix) :] if key.startswith(prefix) else ""
        if tail.isdigit():
            found[int(tail)] = value
    if not found:
        return None
    if sorted(found) != list(range(len(found))):
        raise TensorslimError(f"factor keys {prefix}0 … are not numbered 0, 1, 2, …")
    return [found[k] for k in range(len(found))]


def als_factor_list(content: Any) -> list[torch.Tensor]:
    """The dense ALS factors (output side first) in a loaded ALS file's content.

    Accepted: the official ``{"DeBut_factors": [...]}``, a bare list, or flat tensor files
    with keys ``DeBut_factors.0 …`` (safetensors) or ``arr_0 …`` (``np.savez``).
    """
    if isinstance(content, Mapping):
        if "DeBut_factors" in content:
            content = content["DeBut_factors"]
        else:
            listed = _numbered(content, "DeBut_factors.") or _numbered(content, "arr_")
            if listed is None:
                raise TensorslimError(
                    "no DeBut factors in this file: expected 'DeBut_factors' (the official "
                    f"ALS output), found keys {sorted(content)[:6]}"
                )
            content = listed
    if not isinstance(content, list | tuple) or not all(
        isinstance(m, torch.Tensor) for m in content
    ):
        raise TensorslimError("DeBut_factors must be a list of matrices (output side first)")
    return list(content)


def load_als(layer: DeButLayer, path: str | Path, *, atol: float = 0.0) -> None:
    """Initialise ``layer`` from an official ALS file (``Best_DeBut_info.pth.tar``)."""
    factors = dense_to_factors(als_factor_list(read_tensors(path)), layer.chain, atol=atol)
    set_factors(layer, factors)


def load_checkpoint(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    names: Mapping[str, str] | None = None,
) -> list[str]:
    """Load official ``twiddle`` / ``bias`` parameters into ``model``'s DeBut layers.

    ``source``: a checkpoint path (``{"state_dict": …}`` or a bare state dict) or a state dict.
    ``names`` maps a tensorslim layer name to the official one where they differ (e.g.
    ``{"fc1": "fc"}`` for the official LeNet). Returns the layers loaded; a named layer
    missing from the checkpoint, or none loaded at all, is an error.
    """
    state = read_tensors(source) if isinstance(source, str | Path) else source
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise TensorslimError("an official DeBut checkpoint is a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    names = dict(names or {})
    loaded = []
    for fqn, module in model.named_modules():
        if not isinstance(module, DeButLinear | DeButConv2d):
            continue
        name = names.get(fqn, fqn)
        twiddle = state.get(f"{name}.twiddle")
        if twiddle is None:
            if fqn in names:
                raise TensorslimError(f"the checkpoint has no '{name}.twiddle' for layer {fqn}")
            continue
        try:
            factors = twiddle_to_factors(twiddle, module.chain)
            set_factors(module, factors, state.get(f"{name}.bias"))
        except TensorslimError as exc:
            raise TensorslimError(f"layer {fqn}: {exc}") from None
        loaded.append(fqn)
    if not loaded:
        raise TensorslimError(
            "no DeBut layer of the model has a '<name>.twiddle' in the checkpoint: map names "
            "with names={'tensorslim.layer': 'official.layer'}"
        )
    return loaded
