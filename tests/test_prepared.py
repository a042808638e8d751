"""Preparing data on several processes gives the one-process result, and the prepared-data cache is read back only
while nothing that made its entry has changed."""

from __future__ import annotations

import json
import os

import pytest

from dpo_recipe import data as data_module
from dpo_recipe.bench_data import ultrafeedback_like_rows
from dpo_recipe.config import DataConfig, ModelConfig, RecipeConfig, TrainingConfig
from dpo_recipe.prepared import cache_key, prepare_run_data
from dpo_recipe.rundir import DATA_INDICES_FILE, DATA_REPORT_FILE
from dpo_recipe.run import run_training

from conftest import CHATML_TEMPLATE, gpt2_style_tokenizer, write_jsonl

TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {}}}]


def conversation_rows() -> list[dict]:
    """40 UltraFeedback-like rows (some multi-turn), some with tools or a template variable, one with an empty
    response and one identical pair (dropped)."""
    rows = ultrafeedback_like_rows(40, seed=1)
    for i, row in enumerate(rows):
        if i % 5 == 0:
            row["chat_template_kwargs"] = {"persona": "pirate"}
        if i % 7 == 0:
            row["tools"] = json.dumps(TOOLS)
    rows[3]["rejected"][-1]["content"] = ""
    rows[4]["rejected"] = rows[4]["chosen"]
    return rows


@pytest.fixture
def workspace(tmp_path):
    """A conversational data file and a ChatML tokenizer directory trained on it."""
    rows = conversation_rows()
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    tokenizer = gpt2_style_tokenizer([m["content"] for row in rows for m in row["chosen"] + row["rejected"]])
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return tmp_path


def recipe_config(workspace, **data) -> RecipeConfig:
    settings = {"source": str(workspace / "pairs.jsonl"), "num_pairs": 30, "num_test_pairs": 8, "max_length": 160,
                "min_prompt_tokens": 8, **data}  # fmt: skip
    return RecipeConfig(
        model=ModelConfig(tokenizer=str(workspace / "tokenizer")),
        data=DataConfig(**settings),
        training=TrainingConfig(reference_cache_dir=str(workspace / "cache"), seed=3),
    )


def contents(prepared) -> dict:
    """Everything a run takes from prepared data: each split's columns, the report and the indices."""
    splits = {split: getattr(prepared, split).to_dict() for split in ("train", "val", "test")}
    return {"splits": splits, "report": prepared.report.to_dict(), "indices": prepared.indices}


def test_parallel_preparation_gives_the_one_process_result(workspace, monkeypatch):
    _, whole, _ = prepare_run_data(recipe_config(workspace, num_proc=1, cache=False))
    expected = contents(whole)
    report = expected["report"]
    assert report["truncated"]["train"]["prompt_cut_left"] and report["truncated"]["train"]["response_cut_right"]
    assert report["template_kwargs_rows"] and report["empty_response_kept"] and report["dropped"]
    monkeypatch.setattr(data_module, "ENCODE_BATCH", 4)  # several chunks per split, each with its own template kwargs
    for processes in (1, 2, 3):
        _, chunked, _ = prepare_run_data(recipe_config(workspace, num_proc=processes, cache=False))
        assert contents(chunked) == expected, f"data.num_proc={processes}"


def test_the_second_run_reads_the_cache_and_gets_the_same_data(workspace):
    tokenizer, first, note = prepare_run_data(recipe_config(workspace, num_proc=1))
    assert note.startswith("prepared data: cached in ")
    entries = list((workspace / "cache" / "prepared").iterdir())
    assert len(entries) == 1 and entries[0].name in note
    # The number of processes changes how, not what: the same entry serves.
    cached_tokenizer, second, note = prepare_run_data(recipe_config(workspace, num_proc=2))
    assert note.startswith(f"prepared data: read from the cache {entries[0]}") and "nothing prepared" in note
    assert contents(second) == contents(first)
    assert cached_tokenizer.chat_template == tokenizer.chat_template == CHATML_TEMPLATE


def _change_one_letter_keeping_size_and_time(path):
    """The file's content changes; its size and modification time do not (only the content hash can tell)."""
    stat = path.stat()
    text = path.read_text()
    at = text.index('"content": "') + len('"content": "')
    path.write_text(text[:at] + ("Q" if text[at] != "Q" else "R") + text[at + 1 :])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


@pytest.mark.parametrize("change", ["max_length", "data file content", "tokenizer", "seed"])
def test_the_cache_misses_when_anything_that_makes_the_data_changes(workspace, change):
    config = recipe_config(workspace)
    prepare_run_data(config)
    if change == "max_length":
        config = recipe_config(workspace, max_length=120)
    elif change == "data file content":
        _change_one_letter_keeping_size_and_time(workspace / "pairs.jsonl")
    elif change == "tokenizer":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(workspace / "tokenizer")
        tokenizer.chat_template = CHATML_TEMPLATE.replace("<|im_start|>assistant\\n", "<|im_start|>assistant:\\n")
        tokenizer.save_pretrained(workspace / "tokenizer")
    else:
        config.training.seed = 4
    _, prepared, note = prepare_run_data(config)
    assert note.startswith("prepared data: cached in "), note
    assert len(list((workspace / "cache" / "prepared").iterdir())) == 2
    # What the miss prepared is what preparing without a cache gives.
    config.data.cache = False
    assert contents(prepare_run_data(config)[1]) == contents(prepared)


def test_a_trained_tokenizer_comes_back_from_the_cache_with_its_data(tmp_path):
    config = RecipeConfig(
        model=ModelConfig(tokenizer="local-bpe", tokenizer_vocab_size=400),
        data=DataConfig(source="synthetic", num_pairs=24, num_test_pairs=6, max_length=64),
        training=TrainingConfig(reference_cache_dir=str(tmp_path / "cache")),
    )
    tokenizer, first, _ = prepare_run_data(config)
    cached_tokenizer, second, note = prepare_run_data(config)
    assert note.startswith("prepared data: read from the cache")
    assert cached_tokenizer.get_vocab() == tokenizer.get_vocab() and cached_tokenizer.pad_token == tokenizer.pad_token
    assert contents(second) == contents(first)


def test_hub_datasets_and_cache_false_are_not_cached(workspace):
    config = recipe_config(workspace)
    config.data.source = "HuggingFaceH4/ultrafeedback_binarized"
    assert cache_key(config, "any tokenizer") is None  # a hub dataset's revision can change under its name
    _, _, note = prepare_run_data(recipe_config(workspace, cache=False))
    assert note == "prepared data: not cached (data.cache is false)"
    assert not (workspace / "cache" / "prepared").exists()


def test_a_run_from_the_cache_writes_the_same_data_report_and_indices(smoke_config, capsys):
    config = smoke_config("training.num_epochs=1", "data.num_pairs=40", "data.num_test_pairs=8")
    assert run_training(config) == 0
    written = {name: (config.run_dir / name).read_text() for name in (DATA_REPORT_FILE, DATA_INDICES_FILE)}
    assert "prepared data: cached in " in capsys.readouterr().out
    config.training.overwrite = True
    assert run_training(config) == 0
    assert "prepared data: read from the cache " in capsys.readouterr().out
    assert {name: (config.run_dir / name).read_text() for name in written} == written
