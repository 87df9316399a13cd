"""Architectures users bring × the methods that apply: plan, apply, a finite forward, never more
parameters than the original, every weight holder accounted for in the plan, save/load exact,
ONNX where the exporter supports the model. Small configs; the full sizes are in
bench/architectures.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.profile import count_params
from tensorslim.export import export_onnx
from tensorslim.inputs import call_model, output_tensor
from tensorslim.models import TiedLSTMLanguageModel, create_model

transformers = pytest.importorskip("transformers", reason="the .[hf] extra is absent")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=96,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config)


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
    )
    return transformers.ViTForImageClassification(config)


class Encoder(nn.Module):
    """Linear in → 2 nn.TransformerEncoder layers → Linear head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.inp(x)))


def ids(n: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(1, 96, (n, length), generator=torch.Generator().manual_seed(1))
    }


# name → (builder, example, methods, ONNX checked)
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], Callable[[], object], list[str], bool]] = {
    "gpt2": (gpt2, ids, ["svd", "svd+share", "tt", "debut", "rpg"], True),
    "bert": (bert, ids, ["svd", "tt", "debut", "rpg"], True),
    "lstm_lm": (
        lambda: TiedLSTMLanguageModel(vocab_size=600, dim=24, num_layers=2),
        lambda: ids()["input_ids"],
        ["svd", "svd+share"],
        True,
    ),
    "encoder_batch_first": (
        lambda: Encoder(True),
        lambda: torch.randn(2, 6, 16),
        ["svd", "tt", "rpg"],
        True,
    ),
    "encoder_seq_first": (
        lambda: Encoder(False),
        lambda: torch.randn(6, 2, 16),
        ["svd", "tt", "rpg"],
        True,
    ),
    "resnet18": (
        lambda: create_model("resnet18", in_channels=3, num_classes=5, width=0.125),
        lambda: torch.randn(2, 3, 32, 32),
        ["svd", "tucker", "debut", "rpg"],
        True,
    ),
    "mobilenet_v2": (
        lambda: create_model("mobilenet_v2", in_channels=3, num_classes=5, width=0.25),
        lambda: torch.randn(2, 3, 32, 32),
        ["svd", "tucker", "rpg"],
        True,
    ),
    "vit": (vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}, ["svd", "tt", "rpg"], True),
}
# "svd+share": tied='share' (an LM head tied to its embedding shares the head's factors); rpg on
# the LSTM LM has nothing to prune (its LSTM is not a Linear/Conv2d, its decoder is tied); cp is
# left out for time (its ALS on ResNet's convs takes ~30 s here; tests/methods cover it)

CASES = [
    pytest.param(arch, method, id=f"{arch}-{method}")
    for arch, (_, _, methods, _) in ARCHITECTURES.items()
    for method in methods
]


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[arch][0]().eval()


def weight_holders(model: nn.Module) -> list[str]:
    """Modules holding a parameter of ≥ 2 dims of their own (first names)."""
    return [
        fqn
        for fqn, m in model.named_modules()
        if fqn and any(p.dim() >= 2 for p in m.parameters(recurse=False))
    ]


def logits(model: nn.Module, example: object) -> torch.Tensor:
    with torch.no_grad():
        output = call_model(model, example)
    has_logits = hasattr(output, "logits") or isinstance(output, torch.Tensor)
    return output_tensor(output, "logits" if has_logits else "hidden")


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_architecture_plans_applies_and_round_trips(arch: str, method: str, tmp_path) -> None:
    model, example = build(arch), ARCHITECTURES[arch][1]()
    name, _, share = method.partition("+")
    plan = ts.plan(model, name, {"params": 0.5}, example, tied="share" if share else "dense")
    assert plan.compressed_layers, [(lp.fqn, lp.reason) for lp in plan.layers]
    planned = {lp.fqn for lp in plan.layers}
    for fqn in weight_holders(model):  # in the plan, or part of a planned layer (attention)
        assert any(fqn == p or fqn.startswith(p + ".") for p in planned), fqn
    assert all(lp.reason for lp in plan.layers if lp.method is None)
    small = ts.apply(model, plan)
    out = logits(small, example)
    assert torch.isfinite(out).all()
    assert count_params(small) <= count_params(model)
    assert plan.estimated_params <= plan.model_params
    ts.save(small, tmp_path / "saved")
    again = ts.load(tmp_path / "saved", build(arch))
    assert torch.equal(logits(again, example), out)
    if share:  # the tied pair was compressed together and stays tied
        assert any("tied_to" in lp.config for lp in plan.compressed_layers)
    if ARCHITECTURES[arch][3] and method == "svd":
        pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime")
        assert export_onnx(small, example, tmp_path / "model.onnx")["max_abs_diff"] < 1e-4
