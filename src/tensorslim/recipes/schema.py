"""The recipe file: one YAML document describing a whole run, validated with pydantic.

    name: svd-small-cnn
    model: {name: small_cnn}
    data: {name: digits, batch_size: 64}
    stages:
      - {stage: train, epochs: 5}
      - {stage: compress, method: svd, budget: flops=0.5}
      - {stage: finetune, epochs: 2, distill: true}
      - {stage: evaluate}
      - {stage: export, formats: [onnx, safetensors]}

Errors name the file, the line and the key (``recipe.yaml:7: stages[1].epochs: …``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from tensorslim.errors import TensorslimError
from tensorslim.rank.budget import Budget


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """The base model: a zoo name, ``hf:PATH`` (a local pretrained Hugging Face directory),
    ``torchvision:NAME`` or ``module:function``; optional weights."""

    name: str
    weights: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DataSpec(_Strict):
    """The dataset and how it is served. ``batch_size`` is the global batch (split over ranks)."""

    name: str
    data_dir: str | None = None
    batch_size: PositiveInt = 128
    limit_train: PositiveInt | None = None
    limit_test: PositiveInt | None = None
    shuffle: bool = True


class _Optim(_Strict):
    epochs: PositiveInt
    lr: PositiveFloat = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    weight_decay: NonNegativeFloat = 5e-4


def _check_method_name(method: str, kind: str | None = None) -> str:
    """The method exists (and, with ``kind``, is of that kind); its message names the known ones."""
    from tensorslim.methods.registry import method_class

    try:
        cls = method_class(method)
    except TensorslimError as exc:
        raise ValueError(str(exc)) from None
    if kind is not None and cls.kind != kind:
        stage = "svd_train" if cls.name == "svd_train" else "prune"
        raise ValueError(
            f"method '{cls.name}' reaches its structure during training: use a '{stage}' stage"
        )
    return method


def _check_settings(
    method: str | None, settings: dict[str, Any], preset: str | None = None
) -> dict[str, Any]:
    """The method accepts these settings (under ``preset``): built exactly as the stage will
    build it, so a typo fails when the recipe is read — before the first stage trains."""
    from tensorslim.methods.presets import PRESET_KEY
    from tensorslim.methods.registry import get_method

    if method is not None:  # an unknown method has its own error already
        try:
            get_method(method, **({PRESET_KEY: preset} if preset else {}), **settings)
        except TensorslimError as exc:
            raise ValueError(str(exc)) from None
    return settings


def _check_preset(method: str | None, preset: str | None) -> str | None:
    """``preset`` is one the method declares (``default``, ``paper``, ...)."""
    from tensorslim.methods.presets import get_preset
    from tensorslim.methods.registry import method_class

    if method is not None and preset is not None:
        try:
            get_preset(method_class(method), preset)
        except TensorslimError as exc:
            raise ValueError(str(exc)) from None
    return preset


def _check_budget(value: str | None) -> str | None:
    if value is not None:
        try:
            Budget.parse(value)
        except TensorslimError as exc:
            raise ValueError(str(exc)) from None
    return value


class TrainStage(_Optim):
    """Train the current model (the dense base, usually) from its current weights."""

    stage: Literal["train"]
    lr: PositiveFloat = 0.05


class CompressStage(_Strict):
    """Plan + apply a decomposition method (svd, cp, tucker, tt, debut, ...)."""

    stage: Literal["compress"]
    method: str
    budget: str | None = None
    # a named preset of the method's settings ("paper": the official code's); settings override
    preset: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    layers: list[str] | None = None
    exclude: list[str] | None = None
    # BatchNorm statistics re-estimated on this many training batches after the layers change
    recalibrate_bn: int = Field(default=10, ge=0)
    # where latency is measured ("batch=1,threads=1,format=channels_last"), and whether layers
    # measured slower than dense may be chosen (default: never)
    deployment: str | None = None
    allow_slower: bool | None = None
    _budget = field_validator("budget")(_check_budget)

    @field_validator("deployment")
    @classmethod
    def _deployment(cls, value: str | None) -> str | None:
        if value is not None:
            from tensorslim.analysis.deployment import Deployment

            try:
                Deployment.parse(value)
            except TensorslimError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        return _check_method_name(value, kind="decomposition")

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_preset(info.data.get("method"), value)

    @field_validator("settings")
    @classmethod
    def _settings(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _check_settings(info.data.get("method"), value, info.data.get("preset"))


class SvdTrainStage(_Optim):
    """SVD training (Yang et al. 2020): full-rank SVD training with regularizers for ``epochs``,
    energy pruning (or a FLOPs budget), then ``finetune_epochs`` of low-rank fine-tuning."""

    stage: Literal["svd_train"]
    finetune_epochs: int = Field(default=1, ge=0)
    budget: str | None = None
    preset: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    _budget = field_validator("budget")(_check_budget)

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str | None) -> str | None:
        return _check_preset("svd_train", value)

    @field_validator("settings")
    @classmethod
    def _settings(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _check_settings("svd_train", value, info.data.get("preset"))


class PruneStage(_Optim):
    """Gradual sparse pruning during ``epochs`` of training (rpg, gmp, rigl), then bake masks."""

    stage: Literal["prune"]
    method: Literal["rpg", "gmp", "rigl"] = "rpg"
    budget: str = "params=0.1"
    preset: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    _budget = field_validator("budget")(_check_budget)

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_preset(info.data.get("method"), value)

    @field_validator("settings")
    @classmethod
    def _settings(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _check_settings(info.data.get("method"), value, info.data.get("preset"))


class FinetuneStage(_Optim):
    """Fine-tune the current (compressed) model, optionally distilling from the original."""

    stage: Literal["finetune"]
    distill: bool = False
    kd_alpha: float = Field(default=0.5, ge=0, le=1)
    kd_temperature: PositiveFloat = 4.0


class EvaluateStage(_Strict):
    """Measure accuracy, params, FLOPs and latency of the current model."""

    stage: Literal["evaluate"]
    latency: bool = True


class ExportStage(_Strict):
    """Export the current model; ``merge_slow`` folds back to dense the structured layers that
    measure slower than their dense form."""

    stage: Literal["export"]
    formats: list[Literal["safetensors", "onnx", "torchscript"]] = Field(
        default_factory=lambda: ["safetensors"]
    )
    merge_slow: bool = True


Stage = Annotated[
    TrainStage
    | CompressStage
    | SvdTrainStage
    | PruneStage
    | FinetuneStage
    | EvaluateStage
    | ExportStage,
    Field(discriminator="stage"),
]
STRUCTURE_STAGES = {"compress", "svd_train", "prune"}


class Recipe(_Strict):
    """A whole run: model, data, seed and an ordered list of stages."""

    name: str = "run"
    model: ModelSpec
    data: DataSpec
    seed: int = 0
    stages: list[Stage] = Field(min_length=1)

    def order_problem(self) -> tuple[int, str] | None:
        """(stage index, why) for the first stage that cannot run where it stands, else None."""
        # an hf:PATH model comes with its pretrained weights
        trained = self.model.weights is not None or self.model.name.strip().startswith("hf:")
        for i, stage in enumerate(self.stages):
            kind = stage.stage
            if kind == "train" or (kind == "svd_train" and stage.settings.get("from_scratch")):
                trained = True
            elif not trained:
                return i, (
                    f"stage '{kind}' needs a trained model: add a train stage before it or "
                    "give model.weights"
                )
        return None


def _node_line(root: yaml.Node | None, loc: tuple[Any, ...]) -> tuple[int | None, str]:
    """Line (1-based) of the YAML node at a pydantic error location, and a readable key path."""
    node, path, line = root, "", None
    if node is not None:
        line = node.start_mark.line + 1
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            if isinstance(node, yaml.SequenceNode) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            continue
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == part:
                    path += f".{part}" if path else str(part)
                    node = value_node
                    line = key_node.start_mark.line + 1
                    break
            else:
                # a discriminator tag (e.g. 'finetune') or a missing key: stay on this node
                if part not in {
                    "train",
                    "compress",
                    "svd_train",
                    "prune",
                    "finetune",
                    "evaluate",
                    "export",
                }:
                    path += f".{part}" if path else str(part)
    return line, path


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    """Validate recipe text; errors name the source, line and key."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise TensorslimError(
            f"{source}{where}: not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None
    if not isinstance(data, dict):
        raise TensorslimError(f"{source}: a recipe is a mapping with model, data and stages")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        # an unknown key explains most other errors of its mapping (a typo'd required key)
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        error = errors[0]
        line, path = _node_line(root, tuple(error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown key '{error['loc'][-1]}'"
        elif error["type"] == "missing":
            message = f"missing key '{error['loc'][-1]}'"
        where = f"{source}:{line}" if line else source
        key = f" {path}:" if path else ""
        more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise TensorslimError(f"{where}:{key} {message}{more}") from None
    problem = recipe.order_problem()
    if problem is not None:
        index, why = problem
        line, path = _node_line(root, ("stages", index))
        raise TensorslimError(f"{source}:{line}: {path}: {why}")
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise TensorslimError(f"recipe {path} does not exist")
    return parse_recipe(path.read_text(), str(path))
