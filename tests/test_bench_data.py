"""The data benchmark's rows are UltraFeedback-shaped and reproducible, both sides measure the same pairs, and its
results section replaces only itself."""

from __future__ import annotations

import pytest

from dpo_recipe.bench_data import (
    RESULTS_HEADING, DataBenchSettings, Measurement, agreement_line, measure_recipe, measure_trl,
    ultrafeedback_like_rows, write_dataset, write_section,
)  # fmt: skip
from dpo_recipe.config import DataConfig
from dpo_recipe.data import DataReport, read_pairs

from conftest import CHATML_TEMPLATE, gpt2_style_tokenizer


def test_rows_are_reproducible_ultrafeedback_shaped_conversations(tmp_path):
    rows = ultrafeedback_like_rows(60, seed=2)
    assert rows == ultrafeedback_like_rows(60, seed=2) and rows != ultrafeedback_like_rows(60, seed=3)
    assert set(rows[0]) == {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}
    path = write_dataset(tmp_path / "rows.jsonl", 60, seed=2)
    report = DataReport()
    pairs = read_pairs(str(path), "train", DataConfig(source=str(path), strict=True), report)
    assert report.formats[str(path)] == "conversational_implicit" and len(pairs) == 60
    turns = {len(pair.prompt) for pair in pairs}
    assert turns == {1, 3}  # single- and multi-turn prompts
    words = [len(pair.chosen[-1]["content"].split()) for pair in pairs]
    assert 100 <= sorted(words)[len(words) // 2] <= 400


@pytest.fixture
def bench_workspace(tmp_path):
    path = write_dataset(tmp_path / "rows.jsonl", 24, seed=4)
    rows = ultrafeedback_like_rows(24, seed=4)
    tokenizer = gpt2_style_tokenizer([m["content"] for row in rows for m in row["chosen"] + row["rejected"]])
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    # max_length at the median pair's length: about half the pairs fit, the others are cut.
    longest = sorted(max(len(tokenizer.apply_chat_template(row[side])["input_ids"]) for side in ("chosen", "rejected"))
                     for row in rows)  # fmt: skip
    settings = DataBenchSettings(pairs=24, tokenizer=str(tmp_path / "tokenizer"), max_length=longest[12], output=None)
    return settings, str(path), tmp_path


def test_the_recipe_and_trl_measure_the_same_ids(bench_workspace):
    settings, path, tmp_path = bench_workspace
    trl = measure_trl(settings, path, 1, cache_dir=str(tmp_path / "trl"))
    trl.name = "trl, dataset_num_proc=1"
    recipe = measure_recipe(settings, path, 1, cache_dir=str(tmp_path / "cache"), cache=True)
    recipe.name = "recipe"
    assert trl.pairs == recipe.pairs == 24 and 0 < sum(trl.fits.values()) < 24  # some pairs are cut, some not
    assert agreement_line([trl, recipe]).startswith("Token ids: every recipe run's are identical to TRL's")
    recipe.row_digests[next(line for line, fits in trl.fits.items() if fits)] = "changed"
    assert "DIFFERENT" in agreement_line([trl, recipe])


def test_the_section_replaces_only_itself(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Benchmark\n\nthe training table\n")
    runs = [Measurement(name, seconds, 100, 2**30, 0, {}, {}) for name, seconds in (("trl, dataset_num_proc=1", 4.0), ("recipe, data.num_proc=1", 2.0))]
    for _ in range(2):
        write_section(results, DataBenchSettings(pairs=100), str(results), runs, "agreement")
    text = results.read_text()
    assert text.startswith("# Benchmark\n\nthe training table\n") and text.count(RESULTS_HEADING) == 1
    assert "| recipe, data.num_proc=1 | 2.0 s | 50 | 2.00x | 1,024 MiB | - |" in text
