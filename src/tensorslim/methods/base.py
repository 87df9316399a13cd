"""The one extension point of tensorslim: a compression method.

A method answers, for one layer of a model:

- ``supports(module, fqn)``: ``None`` when it can work on the layer, else the reason it cannot
  (the reason is kept in the plan);
- ``candidates(module, info, stats)``: the options it could use there, each with its parameters,
  FLOPs and the relative error it would cause — cheap to get. ``stats`` holds the calibration
  statistics the method declared in ``calibration_needs`` (``None`` without calibration data);
  with an input Gram the planner measures errors in output space (:meth:`Method.output_errors`);
- ``build(module, option_config, info, init=...)``: the structured module; with ``init=True`` its
  weights come from the decomposition of ``module``, with ``init=False`` only the structure is made
  (``load`` fills the weights from safetensors afterwards). A method whose weights depend on
  the data (``needs_statistics_to_build``: ASVD, SVD-LLM, FWSVD) also takes ``stats=`` — the
  layer's calibration statistics, which ``apply`` supplies;
- optionally ``train_hooks(model, plan)`` (extra loss terms, per-step actions) and
  ``finalize(model, plan)`` (a conversion after training, e.g. baking masks).

Methods are classes registered by name; their constructor keyword arguments are their settings,
which the plan stores so that ``apply`` can build the same method again. A method also declares
the structured layer types it builds (``builds``), the calibration statistics it needs, the
settings the demo uses, its named ``presets`` (``preset="paper"``: the authors' official settings,
see :mod:`tensorslim.methods.presets`), and may add a ``summary`` of what training did to the
results.

Linear-like layers that are not ``nn.Linear`` (transformers' ``Conv1D``, weight stored (in, out))
reach a method as an equivalent ``nn.Linear``: the base class wraps each subclass's ``supports``,
``candidates``, ``output_errors`` and ``build`` so that their ``module`` argument goes through
:func:`tensorslim.layers.linear_like.as_linear` first. A method therefore handles Linear once and
covers every Linear-like layer.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from tensorslim.errors import TensorslimError
from tensorslim.facts import OUTPUT_ERROR, Config, LayerInfo, LayerStats, Option
from tensorslim.layers.linear_like import as_linear
from tensorslim.methods.presets import Preset
from tensorslim.methods.registry import _register, get_method

if TYPE_CHECKING:
    from tensorslim.planner.records import CompressionPlan
    from tensorslim.rank.budget import Budget
    from tensorslim.train.hooks import TrainHook

# the per-layer entry points whose first argument is the layer (see the module docstring)
_LAYER_ENTRY_POINTS = ("supports", "candidates", "output_errors", "build")


def _sees_linear_like_as_linear(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function(self, module, ...)`` called with ``as_linear(module)`` instead of ``module``.

    Only ``build`` gets a copy of a transposed weight (what it returns may hold it); the planning
    entry points read a view, so planning a GPT-2 copies none of its Conv1D weights (a method's
    planning store keeps the weight it factorized: a copy there would be a second model).
    """
    copy = function.__name__ == "build"

    @functools.wraps(function)
    def wrapper(self: Method, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return function(self, as_linear(module, copy=copy), *args, **kwargs)

    return wrapper


class Method(abc.ABC):
    """Base class of compression methods; subclasses register themselves by ``name``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # "decomposition": weights replaced once from a trained layer (SVD, CP, ...);
    # "training": the structure is reached during training (SVD training, pruning).
    kind: ClassVar[str] = "decomposition"
    # the budget metric this method is naturally matched on: structured methods remove FLOPs;
    # masks do not (dense kernels compute the zeros), so sparse methods are budgeted in params
    budget_metric: ClassVar[str] = "flops"
    # epochs a pipeline should fine-tune after finalize() (SVD training's low-rank stage)
    post_finalize_epochs: ClassVar[int] = 0
    # the structured layer types this method's ``build`` makes (refresh_plan maps a layer type
    # back to the one method that builds it); delegated options name their own method
    builds: ClassVar[tuple[type[nn.Module], ...]] = ()
    # calibration statistics ``candidates`` wants (names in tensorslim.analysis.calibration)
    calibration_needs: ClassVar[frozenset[str]] = frozenset()
    # True when ``build(..., init=True)`` needs the layer's calibration statistics (passed as
    # ``stats=``): the weights depend on the data, not on the dense weight alone
    needs_statistics_to_build: ClassVar[bool] = False
    # settings the demo runs this method with (None: the demo uses the defaults)
    demo_settings: ClassVar[dict[str, Any] | None] = None
    # named presets (e.g. "paper": the official code's settings); "default" changes nothing
    presets: ClassVar[Mapping[str, Preset]] = {}
    # for the error of a plan without a budget: what a layer's options are, and how else to pick
    choice_noun: ClassVar[str] = "options"
    choice_hint: ClassVar[str] = "a per-layer rule (e.g. rank, ratio or energy)"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for entry in _LAYER_ENTRY_POINTS:
            if entry in cls.__dict__:
                setattr(cls, entry, _sees_linear_like_as_linear(cls.__dict__[entry]))
        if cls.name and not getattr(cls, "__abstractmethods__", None):
            _register(cls)

    def weighs_layers(self) -> bool:
        """Whether the planner should weight each layer's output error by the model output's
        sensitivity to it (``LayerStats.sensitivity``) when it allocates a budget."""
        return False

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this method (stored in the plan)."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {}

    @abc.abstractmethod
    def supports(self, module: nn.Module, fqn: str) -> str | None:
        """``None`` if this method can compress ``module``, else a one-line reason it cannot."""

    @abc.abstractmethod
    def candidates(
        self, module: nn.Module, info: LayerInfo, stats: LayerStats | None = None
    ) -> list[Option]:
        """Options for this layer, in any order; the planner sorts them.

        ``stats`` carries the statistics named in ``calibration_needs`` when the plan has
        calibration data. Errors may be in weight or output space (``Option.error_space``).
        """

    def output_errors(
        self, module: nn.Module, info: LayerInfo, options: list[Option], stats: LayerStats
    ) -> list[Option]:
        """``options`` with errors in output space, ‖(W − Ŵ)X‖/‖WX‖ from ``stats.gram``.

        The default builds each option and multiplies its dense form out (exact for every
        structured layer, at the cost of one decomposition per option); methods with a closed
        form (SVD) override it. Options already in output space are kept as they are.
        """
        from tensorslim.analysis.output_error import relative_output_error, weight_rows_matrix

        assert stats.gram is not None
        reference = weight_rows_matrix(module)
        measured = []
        for option in options:
            if option.error_space == OUTPUT_ERROR:
                measured.append(option)
                continue
            approx = self._approximate_weight(module, option, info)
            error = relative_output_error(reference, approx, stats.gram)
            measured.append(dataclasses.replace(option, error=error, error_space=OUTPUT_ERROR))
        return measured

    def _approximate_weight(self, module: nn.Module, option: Option, info: LayerInfo) -> Tensor:
        """Ŵ of ``option``: the built layer multiplied out (a method delegating builds there)."""
        from tensorslim.layers.base import StructuredLayer

        builder = self if option.method == self.name else get_method(option.method)
        built = builder.build(module, option.config, info, init=True)
        dense = built.to_dense() if isinstance(built, StructuredLayer) else built
        return dense.weight.detach()

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """What training or finalize did, for the results (e.g. ranks after pruning)."""
        return {}

    @abc.abstractmethod
    def build(
        self, module: nn.Module, config: Config, info: LayerInfo | None, *, init: bool = True
    ) -> nn.Module:
        """The structured replacement of ``module`` described by ``config``."""

    def with_budget(self, budget: Budget) -> Method:
        """This method aimed at ``budget`` (training methods only; the default ignores it).

        A training method reaches its structure during training, so the planner does not
        allocate options; instead it asks the method for the settings that aim at the budget
        (e.g. pruning's sparsity 1 − f for ``params=f``) so the plan's labels tell the truth.
        """
        return self

    def choose_without_budget(self, options: list[Option], info: LayerInfo) -> Option | None:
        """Pick an option when the plan has no global budget (a per-layer rule decides).

        The option the method's rank rule marked ``extra["default"]`` (e.g. the VBMF rank), else
        a single candidate; several unmarked ones are an error that names ``choice_noun`` and
        the other ways to choose (``choice_hint``).
        """
        for option in options:
            if option.extra.get("default"):
                return option
        if len(options) == 1:
            return options[0]
        raise TensorslimError(
            f"method '{self.name}' needs a budget (e.g. --budget flops=0.5) or {self.choice_hint} "
            f"to choose among {len(options)} {self.choice_noun} for {info.fqn}"
        )

    def train_hooks(self, model: nn.Module, plan: CompressionPlan) -> list[TrainHook]:
        """Hooks the training loop runs while this method's structure is trained."""
        return []

    def finalize(self, model: nn.Module, plan: CompressionPlan) -> nn.Module:
        """Conversion after training (e.g. bake pruning masks); default: nothing to do."""
        return model


def require_conv2d(method: str, module: nn.Module) -> None:
    """A one-line error unless ``module`` is an ``nn.Conv2d`` (for kernel decompositions)."""
    if not isinstance(module, nn.Conv2d):
        raise TensorslimError(
            f"{method} builds Conv2d layers only, got {type(module).__name__} (Linear and 1×1 "
            "convs go through the svd method)"
        )
