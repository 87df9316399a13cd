"""DeBut (deformable butterfly) chains for Linear and Conv2d layers, initialised by ALS.

For every selected layer the method offers a ladder of generated, qualified chains at several
compression ratios (each with its nonzeros, FLOPs and the relative weight error after a few
ALS sweeps), so the global allocator can pick one chain per layer to meet a FLOPs or params
budget. A chain can also be given explicitly, for all layers of a shape or per layer.

Conv kernels are viewed as matrices C_out × (kh·kw·C_in) in the official position-major order
by default (``order``; see ``tensorslim.layers.debut_layout``). A plan entry records the order;
a saved conv entry without one predates the setting and was channel-major, and loads so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from tensorslim.analysis.output_error import relative_output_error, weight_rows_matrix
from tensorslim.decompose.debut_als import als_fit
from tensorslim.errors import TensorslimError
from tensorslim.facts import OUTPUT_ERROR, Config, LayerStats
from tensorslim.layers.conv_geometry import unsupported_conv_reason
from tensorslim.layers.debut import INITS, DeButConv2d, DeButLinear, chain_dense
from tensorslim.layers.debut_chain import DeButChain, generate_chains
from tensorslim.layers.debut_layout import (
    check_order,
    check_padded,
    kernel_to_matrix,
    matrix_to_kernel,
    padded_shape,
    padded_target,
)
from tensorslim.methods.base import LayerInfo, Method, Option
from tensorslim.methods.planned import Factorizations
from tensorslim.methods.presets import Preset

DEFAULT_RATIOS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)

# The official code (rlin27/DeBut): ALS_Initialization/main.py draws the starting factors from
# U[0, 1) (utils_init.Generate_Chain), sweeps its factor list output side first, keeps the scales
# ALS leaves, and runs --iter 10 sweeps for LeNet and VGG (scripts/init_lenet.sh, init_vgg.sh;
# 20 for ResNet-50); its layers start from N(0, 1/2) nonzeros (DeBut.__init__, scaling 1/√2);
# Fine_tuning/bash_files/train_lenet.sh fine-tunes with SGD, lr 0.01, momentum 0.9, weight
# decay 5e-4. Convs are position-major in both, as here by default.
DEBUT_PAPER = Preset(
    settings={
        "init": "als",
        "als_sweeps": 10,
        "als_start": "uniform",
        "als_first": "output",
        "als_balance": False,
        "random_std": 0.5**0.5,
        "order": "position",
    },
    training={"lr": 0.01, "optimizer": "sgd", "weight_decay": 5e-4},
    description="the official initialisation: ALS from U[0, 1) factors, 10 sweeps starting at "
    "the output side, no rescaling; random layers N(0, 1/2)",
    source="rlin27/DeBut (ALS_Initialization/main.py, utils_init.py, script/init_lenet.sh; "
    "Fine_tuning/debut/debut.py, bash_files/train_lenet.sh)",
)


def _weight_matrix(module: nn.Module, order: str) -> torch.Tensor:
    """Linear weight, or a conv kernel viewed C_out × (kh·kw·C_in) in ``order``."""
    w = module.weight.detach()
    if isinstance(module, nn.Conv2d):
        return kernel_to_matrix(w, order)
    return w


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the weight as a matrix: a conv's is (C_out, kh·kw·C_in)."""
    return module.weight.shape[0], module.weight[0].numel()


def _columns(module: nn.Module, info: LayerInfo) -> int:
    """Input vectors per forward at ``info``'s shape: tokens of a Linear, N·Ho·Wo of a conv."""
    if isinstance(module, nn.Linear):
        return math.prod(info.input_shape[:-1])
    return info.output_shape[0] * math.prod(info.output_shape[2:])


@dataclass
class DeButMethod(Method):
    """Deformable butterfly chains (Lin et al., NeurIPS 2021).

    Settings:
    - ``chain``: an explicit chain in the flat text form (used for every layer it fits), or a
      dict ``{fqn: chain}`` for named layers (other layers get generated chains);
    - ``ratio``: one compression ratio per layer (a per-layer rule: no budget needed);
    - ``ratios``: the ladder of ratios offered to the allocator (default 2 … 24);
    - ``num_factors``: factor count(s) for generated chains (default 2–6), ``chain_kind``: "any",
      "monotonic" or "bulging";
    - ``init``: "als" (default), "grad" (Adam on ‖W − Ŵ‖_F), "bp" (the official gradient
      initialisation: one U[0, 1) probe per plain gradient step) or "random" (from scratch);
      ``als_sweeps`` for ``build``, ``candidate_sweeps`` for the error of each candidate (cached
      per weight and chain), ``grad_steps``, ``seed``;
    - ``order``: how a conv kernel is unfolded, "position" (kh, kw, C_in; the official code,
      default) or "channel" (C_in, kh, kw);
    - ``pad``: zero-pad sizes that do not factor (as the official code): generated chains are
      made for ``padded_shape`` (a size with a prime factor > 7 grows to a power of two; a
      conv's channel count, for kh·kw·2^⌈log₂ C_in⌉ columns), and explicit per-layer chains
      may be larger than their layer (zero-padded input, cropped output);
    - ``als_start`` ("normal": N(0, 1/s_k); "uniform": U[0, 1) as the official code),
      ``als_first`` (the side the first ALS sweep starts from, "input" or "output"),
      ``als_balance`` (rescale per feature and per factor after ALS), ``random_std`` (std of every
      nonzero for ``init="random"``; default N(0, 1/s_k)).

    ``preset="paper"``: the official code's initialisation (see ``DEBUT_PAPER``).
    """

    name: ClassVar[str] = "debut"
    choice_noun: ClassVar[str] = "chains"
    choice_hint: ClassVar[str] = (
        "a per-layer rule (--set ratio=4) or an explicit chain (--set chain='p q r s t ...')"
    )
    description: ClassVar[str] = "deformable butterfly chains (DeBut) with ALS initialisation"
    builds: ClassVar[tuple[type[nn.Module], ...]] = (
        DeButLinear,
        DeButConv2d,
    )
    # a short ladder and one-sweep error estimates keep the demo's planning to seconds
    demo_settings: ClassVar[dict[str, Any] | None] = {
        "ratios": [2, 4, 8],
        "candidate_sweeps": 1,
        "als_sweeps": 3,
    }

    chain: str | dict[str, str] | None = None
    ratio: float | None = None
    ratios: list[float] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    num_factors: int | list[int] | None = None
    chain_kind: str = "any"
    init: str = "als"
    als_sweeps: int = 6
    candidate_sweeps: int = 2
    grad_steps: int = 300
    seed: int = 0
    order: str = "position"
    pad: bool = False
    als_start: str = "normal"
    als_first: str = "input"
    als_balance: bool = True
    random_std: float | None = None
    presets: ClassVar[dict[str, Preset]] = {"paper": DEBUT_PAPER}
    # candidates' quick fits, kept for output_errors only (see methods/planned.py)
    factorizations: Factorizations = field(
        default_factory=Factorizations, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        check_order(self.order)
        if self.als_start not in ("normal", "uniform"):
            raise TensorslimError(f"unknown als_start '{self.als_start}': use normal or uniform")
        if self.als_first not in ("input", "output"):
            raise TensorslimError(f"unknown als_first '{self.als_first}': use input or output")
        if self.random_std is not None and not self.random_std > 0:
            raise TensorslimError(f"random_std must be positive, got {self.random_std}")
        if self.init not in INITS:
            raise TensorslimError(f"unknown DeBut init '{self.init}': use {', '.join(INITS)}")
        if self.chain_kind not in ("any", "monotonic", "bulging"):
            raise TensorslimError(
                f"unknown chain_kind '{self.chain_kind}': use any, monotonic or bulging"
            )
        if isinstance(self.ratios, int | float):
            self.ratios = [float(self.ratios)]
        self.ratios = [float(r) for r in self.ratios]
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise TensorslimError(f"ratios must be positive numbers, got {self.ratios}")
        if self.ratio is not None and self.ratio <= 0:
            raise TensorslimError(f"ratio must be positive, got {self.ratio}")
        for name in ("als_sweeps", "candidate_sweeps", "grad_steps"):
            if int(getattr(self, name)) < 1:
                raise TensorslimError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if isinstance(self.chain, str):
            DeButChain.parse(self.chain)  # fail early on malformed text
        elif isinstance(self.chain, dict):
            for text in self.chain.values():
                DeButChain.parse(text)
        elif self.chain is not None:
            raise TensorslimError(
                f"chain must be text ('p q r s t ...') or a dict fqn → text, got {self.chain!r}"
            )

    # ------------------------------------------------------------------ contract
    def supports(self, module: nn.Module, fqn: str) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        if isinstance(module, nn.Conv2d):
            return unsupported_conv_reason(module)
        return f"{type(module).__name__} is not a Linear or Conv2d"

    def _explicit_chain(self, module: nn.Module, fqn: str) -> DeButChain | None:
        out_f, in_f = _matrix_shape(module)
        if isinstance(self.chain, dict):
            text = self.chain.get(fqn)
            if text is None:
                return None
            chain = DeButChain.parse(text)
            check_padded(
                chain.out_features, chain.in_features, out_f, in_f, self.pad, f"layer {fqn}"
            )
            chain.check_qualified()
            return chain
        if isinstance(self.chain, str):
            chain = DeButChain.parse(self.chain)
            if (chain.out_features, chain.in_features) != (out_f, in_f):
                return None  # the one chain fits other layers; this one gets generated chains
            chain.check_qualified()
            return chain
        return None

    def _chains(self, module: nn.Module, fqn: str, cols: int) -> list[DeButChain]:
        explicit = self._explicit_chain(module, fqn)
        if explicit is not None:
            return [explicit]
        out_f, in_f = _matrix_shape(module)
        # with pad, a size with a large prime factor is zero-padded (the official PaddingMatrix)
        positions = module.weight[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
        gen_out, gen_in = padded_shape(out_f, in_f, positions) if self.pad else (out_f, in_f)
        ratios = [self.ratio] if self.ratio is not None else self.ratios
        chains: dict[str, DeButChain] = {}
        for ratio in ratios:
            try:
                found = generate_chains(
                    gen_out,
                    gen_in,
                    target_params=max(1, round(out_f * in_f / ratio)),
                    num_factors=self.num_factors,
                    kind=self.chain_kind,
                    cols=max(64, cols),
                    limit=1,
                )
            except TensorslimError:
                continue
            if not found:
                continue
            best = found[0]
            # a ladder rung far from its ratio duplicates a neighbour or is not compressing
            compression = out_f * in_f / best.chain.nnz  # of the layer, padded or not
            if self.ratio is None and abs(math.log(compression / ratio)) > math.log(1.5):
                continue
            chains.setdefault(best.chain.text, best.chain)
        return list(chains.values())

    def candidates(
        self, module: nn.Module, info: LayerInfo, stats: LayerStats | None = None
    ) -> list[Option]:
        weight = _weight_matrix(module, self.order)
        cols = _columns(module, info)
        bias = module.bias.numel() if module.bias is not None else 0
        options = []
        fits: dict[str, list[torch.Tensor]] = {}
        for chain in self._chains(module, info.fqn, cols):
            error, fits[chain.text] = self._quick_fit(weight, chain)
            config: dict[str, Any] = {"chain": chain.text}
            if (chain.out_features, chain.in_features) != tuple(weight.shape):
                config["pad"] = True
            if isinstance(module, nn.Conv2d):
                config["order"] = self.order
            options.append(
                Option(
                    method=self.name,
                    config=config,
                    params=chain.nnz + bias,
                    flops=chain.flops(cols) * info.calls,
                    error=error,
                    label=f"DeBut {len(chain)}f {weight.numel() / chain.nnz:.1f}×",
                    extra={
                        "nnz": chain.nnz,
                        "factors": len(chain),
                        "kind": chain.kind,
                        "compression": round(weight.numel() / chain.nnz, 3),
                    },
                )
            )
        if stats is not None and stats.gram is not None:
            # output_errors measures these same fits against the Gram (and frees them)
            self.factorizations.put(info.fqn, module.weight, fits)
        return options

    def _quick_fit(
        self, weight: torch.Tensor, chain: DeButChain
    ) -> tuple[float, list[torch.Tensor]]:
        """The candidate estimate: ``candidate_sweeps`` float32 ALS sweeps of ``chain`` on the
        layer matrix; (relative error of the part the layer uses, the factors' nonzeros).

        The full fit (``als_sweeps``, float64) runs once, in ``build``, for the chosen chain.
        """
        generator = torch.Generator().manual_seed(self.seed)
        # float32 is plenty for an estimate that ranks options, and twice as fast
        target = padded_target(weight, chain.out_features, chain.in_features)
        weights, errors = als_fit(
            target,
            chain,
            sweeps=self.candidate_sweeps,
            generator=generator,
            dtype=torch.float32,
            start=self.als_start,
            first=self.als_first,
        )
        error = float(errors[-1])
        if target is not weight:  # padded: the error of the part the layer uses
            approx = chain_dense(chain.factors, weights)[: weight.shape[0], : weight.shape[1]]
            error = float(
                torch.linalg.vector_norm(weight - approx) / weight.norm().clamp_min(1e-30)
            )
        return error, weights

    def output_errors(
        self, module: nn.Module, info: LayerInfo, options: list[Option], stats: LayerStats
    ) -> list[Option]:
        """Output-space errors of the candidates' own quick fits (kept by ``candidates``, freed
        here), not of a full ALS per option."""
        assert stats.gram is not None
        weight = _weight_matrix(module, self.order)
        fits = self.factorizations.take(info.fqn, module.weight) or {}
        reference = weight_rows_matrix(module)
        measured = []
        for option in options:
            chain = DeButChain.parse(option.config["chain"])
            weights = fits.get(chain.text) or self._quick_fit(weight, chain)[1]
            approx = chain_dense(chain.factors, weights)[: weight.shape[0], : weight.shape[1]]
            if isinstance(module, nn.Conv2d):  # back to the kernel's own column order
                approx = matrix_to_kernel(
                    approx, module.in_channels, tuple(module.kernel_size), self.order
                )
            error = relative_output_error(reference, approx, stats.gram)
            measured.append(dataclasses.replace(option, error=error, error_space=OUTPUT_ERROR))
        return measured

    def choose_without_budget(self, options: list[Option], info: LayerInfo) -> Option | None:
        return super().choose_without_budget(options, info) if options else None

    def build(
        self, module: nn.Module, config: Config, info: LayerInfo | None, *, init: bool = True
    ) -> nn.Module:
        if "chain" not in config:
            raise TensorslimError(f"a DeBut plan entry needs a 'chain', got config {config}")
        chain = DeButChain.parse(config["chain"])
        pad = bool(config.get("pad", False))
        # a fresh plan states the order; a saved conv entry without one was written before
        # the order existed, when every DeBut conv was channel-major
        order = check_order(config.get("order", self.order if init else "channel"))
        if init:
            kwargs = {
                "sweeps": self.als_sweeps,
                "steps": self.grad_steps,
                "seed": self.seed,
                "als_start": self.als_start,
                "als_first": self.als_first,
                "balance": self.als_balance,
                "random_std": self.random_std,
            }
            if isinstance(module, nn.Linear):
                return DeButLinear.from_dense(module, chain, self.init, pad=pad, **kwargs)
            return DeButConv2d.from_dense(
                module,  # type: ignore[arg-type]
                chain,
                self.init,
                order=order,
                pad=pad,
                **kwargs,
            )
        w = module.weight
        if isinstance(module, nn.Linear):
            layer: DeButLinear | DeButConv2d = DeButLinear(
                module.in_features,
                module.out_features,
                chain,
                module.bias is not None,
                device=w.device,
                dtype=w.dtype,
                pad=pad,
            )
        else:
            layer = DeButConv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                chain,
                module.stride,
                module.padding,
                module.dilation,
                module.bias is not None,
                device=w.device,
                dtype=w.dtype,
                order=order,
                pad=pad,
            )
        if isinstance(config.get("init"), dict):
            layer.init_info = dict(config["init"])  # keep the record of how it was initialised
        return layer
