"""GPT-2's Conv1D layers are planned, compressed and saved like Linear layers."""

from __future__ import annotations

import pytest
import torch

import tensorslim as ts
from tensorslim.layers.lowrank import LowRankLinear

transformers = pytest.importorskip(
    "transformers", reason="transformers (the .[hf] extra) is absent"
)


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_are_planned_and_compressed(tmp_path) -> None:
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 8))
    plan = ts.plan(model, "svd", None, {"input_ids": ids}, ratio=0.25)
    conv1d = {lp.fqn for lp in plan.layers if lp.type_name == "Conv1D"}
    assert len(conv1d) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert conv1d <= {lp.fqn for lp in plan.compressed_layers}
    small = ts.apply(model, plan)
    assert isinstance(small.get_submodule("transformer.h.0.mlp.c_fc"), LowRankLinear)
    with torch.no_grad():
        out = small(input_ids=ids).logits
    assert torch.isfinite(out).all()
    ts.save(small, tmp_path)
    again = ts.load(tmp_path, tiny_gpt2()).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, out)


def test_gpt2_full_rank_svd_reproduces_the_model() -> None:
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 8))
    fc = "transformer.h.0.mlp.c_fc"
    plan = ts.plan(model, "svd", None, {"input_ids": ids}, ratio=1.0, layers=[fc])
    for lp in plan.layers:  # full rank costs more than dense, so the planner keeps it dense:
        if lp.fqn == fc:  # force it, the math must still be exact
            lp.method, lp.config = "svd", {"rank": 32, "scheme": "channel"}
    small = ts.apply(model, plan)
    assert isinstance(small.get_submodule(fc), LowRankLinear)
    with torch.no_grad():
        torch.testing.assert_close(
            small(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5
        )
