"""A Hugging Face BERT from its config plans and applies from tokenizer-style dict batches."""

from __future__ import annotations

import pytest
import torch

import tensorslim as ts
from tensorslim.layers.lowrank import LowRankLinear

transformers = pytest.importorskip(
    "transformers", reason="transformers (the .[hf] extra) is absent"
)


def tiny_bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def encodings(n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, 120, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[:, 9:] = 0
        batches.append(
            transformers.BatchEncoding(
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
            )
        )
    return batches


def test_bert_plans_and_applies_from_dict_batches_with_calibration() -> None:
    model = tiny_bert()
    loader = encodings(6)
    plan = ts.plan(model, "svd", "params=0.8", calibration=loader, calibration_batches=3)
    assert plan.error_space == "output" and plan.calibration["batches"] == 3
    linears = [lp for lp in plan.layers if lp.type_name == "Linear"]
    assert len(linears) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output; pooler
    assert plan.compressed_layers
    embeddings = {lp.fqn for lp in plan.layers if lp.type_name == "Embedding"}
    assert embeddings == {
        "embeddings.word_embeddings",
        "embeddings.position_embeddings",
        "embeddings.token_type_embeddings",
    }
    assert plan.estimated_params <= 0.8 * plan.model_params + 1
    small = ts.apply(model, plan)
    assert any(isinstance(m, LowRankLinear) for m in small.modules())
    with torch.no_grad():
        out = small(**loader[0]).last_hidden_state
        ref = model(**loader[0]).last_hidden_state
    assert out.shape == ref.shape and torch.isfinite(out).all()
    again = ts.plan(model, "svd", "params=0.8", calibration=loader, calibration_batches=3)
    assert again.to_dict() == plan.to_dict(), "planning is deterministic"
