"""Datasets as practitioners run them: every pair (`all`), a dataset's own validation and test splits, and mixtures of
sources, each counted and recorded on its own; bad input is one line naming the key."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import write_jsonl

from dpo_recipe.cli import main
from dpo_recipe.config import ConfigError, DataConfig
from dpo_recipe.config_loader import load_config
from dpo_recipe.data import load_text_splits, recorded_pairs
from dpo_recipe.run import run_training
from dpo_recipe.sources import DataError, DataReport
from dpo_recipe.synthetic import synthetic_rows

CONVERSATIONAL_ROW = {
    "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
    "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
}


def pairs_file(path, usable: int, bad: int = 0, seed: int = 0):
    """hh-rlhf rows: `usable` good ones, then `bad` lines that are dropped (and counted) when read."""
    return write_jsonl(path, [*synthetic_rows("train", usable, seed=seed), *["not json"] * bad])


def write_config(tmp_path, data: dict, name: str = "run.yaml"):
    """A config written from scratch (no base): the DataConfig defaults hold where `data` says nothing."""
    config = {
        "run_name": "mix",
        "model": {"tiny": {"n_layer": 1, "n_embd": 32, "n_head": 2}, "tokenizer": "local-bpe", "tokenizer_vocab_size": 300},
        "data": {"max_length": 64, **data},
        "training": {
            "output_dir": str(tmp_path / "checkpoints"), "reference_cache_dir": str(tmp_path / "cache"),
            "num_epochs": 1, "effective_batch_size": 8, "per_device_batch_size": 8, "logging_steps": 100,
        },
    }  # fmt: skip
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def splits_of(path, seed: int = 42):
    config = load_config(path)
    report = DataReport()
    return load_text_splits(config.data, seed, report, str(path)), report


def test_a_mixture_counts_each_source_and_records_each_pairs_source_and_row(tmp_path):
    team = pairs_file(tmp_path / "team_a.jsonl", 36, seed=1)
    other = pairs_file(tmp_path / "b.jsonl", 40, bad=2, seed=2)
    path = write_config(tmp_path, {
        "mixture": [{"source": str(team), "num_pairs": 30}, {"source": str(other), "fraction": 0.5}], "num_test_pairs": 0,
    })  # fmt: skip
    splits, report = splits_of(path)
    by_source = report.to_dict()["pairs_by_source"]
    assert list(by_source) == [str(team), str(other)]
    assert sum(by_source[str(team)].values()) == 30 and by_source[str(team)]["test"] == 0
    assert sum(by_source[str(other)].values()) == 20 and by_source[str(other)]["test"] == 0
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 5, 0)  # val_fraction 0.1 of the 50
    assert report.dropped[str(other)] == {"malformed_json": 2}  # its 2 bad lines, counted on their own source
    assert report.selection[str(other)] == "20 of its 40 usable pairs: data.mixture[1].fraction 0.5"
    lines = report.summary_lines()
    assert f"pairs from {team}: {by_source[str(team)]['train']} train, {by_source[str(team)]['val']} val, 0 test (30 of its 36 usable pairs: data.mixture[0].num_pairs 30)" in lines
    assert "pairs from all sources: 45 train, 5 val, 0 test" in lines

    indices = json.loads(json.dumps(splits.indices()))  # as data_indices.json holds it
    for split in ("train", "val"):
        pairs = getattr(splits, split)
        assert recorded_pairs(indices, split) == [(pair.source, pair.index) for pair in pairs]
    every = recorded_pairs(indices, "train") + recorded_pairs(indices, "val")
    assert len(set(every)) == 50  # no pair twice
    assert {row for source, row in every if source == str(other)} <= set(range(1, 41))  # line numbers of good rows
    # The sources are shuffled together, so validation is not one source's pairs; and the seed decides it all.
    assert len({source for source, _ in recorded_pairs(indices, "train")}) == 2
    assert splits_of(path)[0].indices() == indices
    assert splits_of(path, seed=7)[0].indices() != indices


def test_num_pairs_all_uses_every_usable_pair_and_the_test_pairs_are_carved_first(tmp_path):
    assert (DataConfig().num_pairs, DataConfig().num_test_pairs) == ("all", "all")  # a config written from scratch
    data = pairs_file(tmp_path / "pairs.jsonl", 50, bad=3)
    splits, report = splits_of(write_config(tmp_path, {"source": str(data), "num_pairs": "all", "num_test_pairs": 10}))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (36, 4, 10)
    assert len({pair.index for pair in splits.train + splits.val + splits.test}) == 50  # each usable pair once
    assert report.rows_read[str(data)] == 53 and report.dropped[str(data)] == {"malformed_json": 3}
    assert f"pairs from {data}: 36 train, 4 val, 10 test (50 of its 50 usable pairs: data.num_pairs all, data.num_test_pairs 10 carved from it)" in report.summary_lines()
    # A number of train + val pairs, and every other pair for test.
    splits, _ = splits_of(write_config(tmp_path, {"source": str(data), "num_pairs": 20, "num_test_pairs": "all"}))
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (20, 30)
    # Both `all` from one file cannot be: one line saying what to do.
    with pytest.raises(DataError, match=r": data.num_pairs and data.num_test_pairs are both `all`, but the test pairs of a file are carved"):
        splits_of(write_config(tmp_path, {"source": str(data)}))


def dataset_dir(tmp_path, splits: dict[str, int]):
    """A local directory laid out like a hub dataset: one JSON-lines file per split."""
    root = tmp_path / "dataset"
    root.mkdir()
    for seed, (split, count) in enumerate(splits.items()):
        pairs_file(root / f"{split}.jsonl", count, seed=seed)
    return root


def test_a_datasets_own_validation_split_and_no_test_split(tmp_path):
    root = dataset_dir(tmp_path, {"train": 24, "validation": 6})  # no test split
    path = write_config(tmp_path, {"source": str(root), "val_split": "validation", "test_split": None})
    splits, report = splits_of(path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 0)  # all train pairs are train
    assert {pair.source for pair in splits.val} == {f"{root}:validation"}
    assert list(report.rows_read) == [f"{root}:train", f"{root}:validation"]  # no test split was asked for
    assert report.pairs_by_source == {
        f"{root}:train": {"train": 24, "val": 0, "test": 0}, f"{root}:validation": {"train": 0, "val": 6, "test": 0},
    }  # fmt: skip
    # num_test_pairs: 0 reads no test split either, whatever test_split says.
    splits, report = splits_of(write_config(tmp_path, {"source": str(root), "num_pairs": 12, "num_test_pairs": 0}))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (11, 1, 0) and f"{root}:test" not in report.rows_read


def test_a_validation_file_of_its_own(tmp_path):
    data, val = pairs_file(tmp_path / "train.jsonl", 30, seed=1), pairs_file(tmp_path / "val.jsonl", 7, bad=1, seed=2)
    splits, report = splits_of(write_config(tmp_path, {"source": str(data), "val_source": str(val), "num_test_pairs": 5}))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (25, 7, 5)
    assert {pair.source for pair in splits.val} == {str(val)} and report.dropped[str(val)] == {"malformed_json": 1}
    assert report.selection[str(val)] == "all 7 usable pairs: data.val_source"


def error_line(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_each_datasets_at_scale_mistake_is_one_line_naming_the_key(tmp_path, capsys):
    a, b = pairs_file(tmp_path / "a.jsonl", 36), pairs_file(tmp_path / "b.jsonl", 40, seed=1)
    chat = write_jsonl(tmp_path / "chat.jsonl", [CONVERSATIONAL_ROW] * 4)
    root = dataset_dir(tmp_path, {"train": 24, "validation": 6})

    def error(data: dict, command: str = "show-data") -> tuple[str, str]:
        path = write_config(tmp_path, data)
        return error_line(capsys, command, "--config", str(path)), str(path)

    line, path = error({"source": str(root), "val_split": "valid", "num_test_pairs": 0})
    assert line == f"error: {path}: data.val_split 'valid' is not a split of dataset '{root}' (its splits: train, validation)"
    line, path = error({"source": str(root)})  # the default test split, which this dataset lacks
    assert line == f"error: {path}: data.test_split 'test' is not a split of dataset '{root}' (its splits: train, validation)"
    line, path = error({"mixture": [{"source": str(a), "num_pairs": 30}, {"source": str(b), "fraction": 1.5}]}, "print-config")
    assert line == f"error: {path}: data.mixture[1] ({b}): fraction must be in (0, 1] (got 1.5)"
    line, path = error({"mixture": [{"source": str(a), "num_pairs": 30}, {"source": str(chat), "num_pairs": "all"}], "num_test_pairs": 0})
    assert line == f"error: {path}: data.mixture[1] ({chat}): format conversational_implicit cannot be mixed with hh-rlhf text of data.mixture[0]"
    mixed = [{"source": str(a), "num_pairs": 30, "format": "hh-rlhf"}, {"source": str(chat), "fraction": 1, "format": "conversational"}]
    line, path = error({"mixture": mixed}, "print-config")  # formats given: caught before any data is read
    assert line == f"error: {path}: data.mixture[1] ({chat}): format conversational cannot be mixed with hh-rlhf text of data.mixture[0]"
    line, path = error({"mixture": [{"source": str(a), "num_pairs": 50}], "num_test_pairs": 0})
    assert line == f"error: {path}: data.mixture[0].num_pairs = 50 but {a} has only 36 usable pairs"
    line, path = error({"mixture": [{"source": str(a), "num_pairs": 5}], "source": str(b)}, "print-config")
    assert line.startswith(f"error: {path}: data.source ('{b}') and data.mixture are both set: each entry of a mixture names its own")
    line, path = error({"mixture": [{"source": str(a), "num_pairs": 5}], "num_test_pairs": 20}, "print-config")
    assert line == (
        f"error: {path}: data.num_test_pairs = 20 but a mixture's test pairs come from data.test_source, which is not "
        "set: name one, or set data.num_test_pairs: 0"
    )
    line, path = error({"source": str(a), "num_pairs": "lots"}, "print-config")
    assert line == f"error: {path}: data.num_pairs must be an integer >= 2 or `all` (got 'lots')"
    line, path = error({"source": str(a), "num_test_pairs": -1}, "print-config")
    assert line == f"error: {path}: data.num_test_pairs must be an integer >= 0 (0: none) or `all` (got -1)"
    line, path = error({"source": "synthetic"}, "print-config")  # `all` of a source with no size
    assert line == f"error: {path}: data.num_pairs must be a number for data.source synthetic, which makes as many pairs as asked"
    with pytest.raises(ConfigError, match=r"data.mixture\[0\] \(a.jsonl\): give one of fraction"):
        load_config(write_config(tmp_path, {"mixture": [{"source": "a.jsonl"}]}))


def test_a_mixture_trains_through_the_real_entry_point(tmp_path, capsys):
    a, b = pairs_file(tmp_path / "a.jsonl", 40, seed=1), pairs_file(tmp_path / "b.jsonl", 30, bad=1, seed=2)
    test = write_jsonl(tmp_path / "test.jsonl", synthetic_rows("test", 8, seed=3))
    path = write_config(tmp_path, {
        "mixture": [{"source": str(a), "num_pairs": 24}, {"source": str(b), "fraction": 0.5}], "test_source": str(test),
    })  # fmt: skip
    config = load_config(path)
    assert run_training(config) == 0
    out = capsys.readouterr().out
    assert "pairs from all sources: 35 train, 4 val, 8 test" in out
    run_dir = config.run_dir
    report = json.loads((run_dir / "data_report.json").read_text())
    assert {source: sum(counts.values()) for source, counts in report["pairs_by_source"].items()} == {
        str(a): 24, str(b): 15, str(test): 8
    }
    indices = json.loads((run_dir / "data_indices.json").read_text())
    assert indices["sources"] and len(indices["pair_sources"]["train"]) == len(indices["train"]) == 35
    assert {source for source, _ in recorded_pairs(indices, "test")} == {str(test)}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["epoch"] == 1 and records[-1]["val"]["loss"] > 0
    # The test pairs evaluate as training recorded them (their sources and rows rebuilt from the saved config), and
    # so do those of a run recorded before each pair's source was (rows alone).
    assert main(["eval", str(run_dir)]) == 0
    rows_only = {split: indices[split] for split in ("train", "val", "test")}
    (run_dir / "data_indices.json").write_text(json.dumps(rows_only))
    assert main(["eval", str(run_dir)]) == 0
