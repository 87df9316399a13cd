"""The one extension point of tensorslim: a compression method.

A method answers, for one layer of a model:

- ``supports(module, fqn)``: ``None`` when it can work on the layer, else the reason it cannot
  (the reason is kept in the plan);
- ``candidates(module, info)``: the options it could use there, each with its parameters, FLOPs
  and the relative reconstruction error it would cause — cheap to get;
- ``build(module, option_config, info, init=...)``: the structured module; with ``init=True`` its
  weights come from the decomposition of ``module``, with ``init=False`` only the structure is made
  (``load`` fills the weights from safetensors afterwards);
- optionally ``train_hooks(model, plan)`` (extra loss terms, per-step actions) and
  ``finalize(model, plan)`` (a conversion after training, e.g. baking masks).

Methods are classes registered by name; their constructor keyword arguments are their settings,
which the plan stores so that ``apply`` can build the same method again.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from tensorslim.errors import TensorslimError

if TYPE_CHECKING:
    from tensorslim.plan import CompressionPlan
    from tensorslim.rank.budget import Budget
    from tensorslim.train.hooks import TrainHook


@dataclass(frozen=True)
class LayerInfo:
    """Facts about one layer, gathered by running an example input through the model.

    ``input_shape``/``output_shape`` include the batch dimension of the example input (the planner
    uses a batch of 1). ``flops`` is the dense layer's FLOPs at that input (2 per multiply-add).
    """

    fqn: str
    type_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    flops: int
    calls: int = 1


@dataclass(frozen=True)
class Option:
    """One way a method could compress one layer.

    ``config`` is JSON-serialisable and is all ``build`` needs (e.g. ``{"rank": 8, "scheme":
    "channel"}``); ``error`` is the relative Frobenius reconstruction error ‖W − Ŵ‖_F / ‖W‖_F of
    the layer's weight; ``params`` and ``flops`` are the replacement's (FLOPs for ``info``'s input).
    ``method`` lets a method delegate a layer to another method (e.g. Tucker falls back to SVD on
    1×1 convs); ``label`` is a short human description ("rank 8").
    """

    method: str
    config: dict[str, Any]
    params: int
    flops: int
    error: float
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and not getattr(cls, "__abstractmethods__", None):
            from tensorslim.methods.registry import _register

            _register(cls)

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this method (stored in the plan)."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {}

    @abc.abstractmethod
    def supports(self, module: nn.Module, fqn: str) -> str | None:
        """``None`` if this method can compress ``module``, else a one-line reason it cannot."""

    @abc.abstractmethod
    def candidates(self, module: nn.Module, info: LayerInfo) -> list[Option]:
        """Options for this layer, cheapest last or in any order; the planner sorts them."""

    @abc.abstractmethod
    def build(
        self,
        module: nn.Module,
        config: dict[str, Any],
        info: LayerInfo | None,
        *,
        init: bool = True,
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

        The default accepts a single candidate (the method's own rank rule already chose it).
        """
        if len(options) == 1:
            return options[0]
        raise TensorslimError(
            f"method '{self.name}' needs a budget (e.g. --budget flops=0.5) or a per-layer rule "
            f"(e.g. rank, ratio or energy) to choose among {len(options)} options for {info.fqn}"
        )

    def train_hooks(self, model: nn.Module, plan: CompressionPlan) -> list[TrainHook]:
        """Hooks the training loop runs while this method's structure is trained."""
        return []

    def finalize(self, model: nn.Module, plan: CompressionPlan) -> nn.Module:
        """Conversion after training (e.g. bake pruning masks); default: nothing to do."""
        return model
