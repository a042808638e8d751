"""`python -m dpo_recipe show-data`: what the model sees, read through training's own code, with no model loaded."""

from __future__ import annotations

import json

import pytest

from dpo_recipe.cli import main
from dpo_recipe.data import recorded_pairs
from dpo_recipe.synthetic import synthetic_rows
from dpo_recipe.run import prepare_run

from conftest import CHATML_TEMPLATE, SMOKE_CONFIG, metaspace_bos_tokenizer, write_jsonl


def show_data(tmp_path, *arguments: str, overrides: tuple[str, ...] = ()) -> int:
    settings = [f"training.reference_cache_dir={tmp_path / 'cache'}", f"training.output_dir={tmp_path / 'checkpoints'}"]
    flags = [flag for setting in (*settings, *overrides) for flag in ("--set", setting)]
    return main(["show-data", "--config", str(SMOKE_CONFIG), *flags, *arguments])


def test_show_data_prints_pairs_with_special_tokens_where_truncation_cut_and_token_counts(tmp_path, capsys):
    assert show_data(tmp_path, "--split", "train", "--n", "2", overrides=("data.max_length=40", "data.num_pairs=20", "data.num_test_pairs=4")) == 0
    out = capsys.readouterr().out
    assert "synthetic:train: 24 rows read, 0 dropped\n  format  hh-rlhf" in out  # the data report comes first
    assert out.count("\npair ") == 2 and "pair 1 of 16 (train): synthetic:train row " in out
    assert "<|endoftext|>»" in out  # special tokens visible; the response's end-of-sequence token is scored
    assert "truncation cut its first" in out and "    «…" in out  # the prompt lost its oldest tokens
    assert "truncation cut its last" in out and "…»\n" in out  # a response longer than what was left
    counts = [int(line.split()[1]) for line in out.splitlines() if line.startswith(("  prompt ", "  chosen ", "  rejected "))]
    assert len(counts) == 6 and all(count > 0 for count in counts)
    for first in range(0, 6, 3):
        prompt, chosen, rejected = counts[first : first + 3]
        assert prompt + max(chosen, rejected) <= 40


def test_show_data_splits_hold_the_ids_training_uses_and_all_is_every_pair_in_source_order(tmp_path, smoke_config):
    overrides = ("data.num_pairs=20", "data.num_test_pairs=4", "data.max_length=48")
    written = {}
    for split in ("train", "val", "test", "all"):
        assert show_data(tmp_path, "--split", split, "--n", "0", "--json", str(tmp_path / f"{split}.json"), overrides=overrides) == 0
        written[split] = json.loads((tmp_path / f"{split}.json").read_text())

    trainer = prepare_run(smoke_config(*overrides, f"training.reference_cache_dir={tmp_path / 'cache'}")).trainer
    for split, dataset in (("train", trainer.train_dataset), ("val", trainer.eval_dataset)):
        ids = [[record[column] for record in written[split]] for column in ("prompt_ids", "chosen_ids", "rejected_ids")]
        assert ids == [dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]]
    recorded = json.loads((tmp_path / "checkpoints" / "smoke" / "data_indices.json").read_text())
    for split in ("train", "val", "test"):  # each pair's source and row, as show-data names them
        assert recorded_pairs(recorded, split) == [(record["source"], record["row"]) for record in written[split]]

    every = written["all"]
    assert [record["row"] for record in every] == list(range(24))  # synthetic rows are numbered from 0
    by_row = {record["row"]: record for record in every}
    assert all(by_row[record["row"]] == record for split in ("train", "val", "test") for record in written[split])


def test_show_data_loads_a_tokenizer_but_never_a_model(tmp_path, capsys):
    """model.name_or_path is a directory holding a tokenizer and no weights: enough for show-data."""
    tokenizer = metaspace_bos_tokenizer([row["chosen"] + row["rejected"] for row in synthetic_rows("train", 100)])
    tokenizer.save_pretrained(tmp_path / "tokenizer-only")
    overrides = ("model.tiny=null", f"model.name_or_path={tmp_path / 'tokenizer-only'}", "model.tokenizer=null",
                 "data.num_pairs=4", "data.num_test_pairs=1", "data.max_length=1024")  # fmt: skip
    assert show_data(tmp_path, "--n", "1", overrides=overrides) == 0
    out = capsys.readouterr().out
    assert "pair 1 of 5 (all): synthetic:train row 0" in out and "«<s>" in out  # the tokenizer's BOS, shown


@pytest.mark.parametrize(
    "arguments, overrides, message",
    [
        ((), ("data.source=no/such/pairs.jsonl",), "error: no/such/pairs.jsonl: data file not found"),
        ((), ("data.format=standard",), "none of its 288 rows is a usable preference pair in the standard format"),
    ],
)
def test_show_data_bad_input_is_one_line(tmp_path, capsys, arguments, overrides, message):
    assert show_data(tmp_path, *arguments, overrides=overrides) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_show_data_n_must_be_a_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        show_data(tmp_path, "--n", "-1")
    assert exited.value.code == 2
    assert "show-data: error: argument --n: must be a whole number >= 0 (got '-1')" in capsys.readouterr().err


def test_show_data_shows_a_chat_pair_as_the_template_renders_it(tmp_path, capsys):
    rows = [
        {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": f"Hello {n}."}],
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}], "score_chosen": 9.0}
        for n in range(6)
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "ultrafeedback.jsonl", rows)
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    overrides = (f"data.source={data}", "data.num_pairs=4", "data.num_test_pairs=1", f"data.chat_template={template}")
    assert show_data(tmp_path, "--n", "1", overrides=overrides) == 0
    out = capsys.readouterr().out
    assert "  format  conversational_implicit" in out
    assert "«<|im_start|>user\\n\n    Hi?<|im_end|>\\n\n    <|im_start|>assistant\\n\n    »" in out
    assert "«Hello 0.<|im_end|>\\n\n    »" in out
