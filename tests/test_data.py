"""hh-rlhf parsing, deterministic sampling and truncation that keeps every pair."""

from __future__ import annotations

import json

import pytest

from dpo_recipe.config import DataConfig
from dpo_recipe.data import PreparedData, load_text_splits, prepare_data, tokenize_pairs, truncate_pair
from dpo_recipe.sources import BadRow, DataError, DataReport, PreferencePair, read_pairs, split_dialogue

from dpo_recipe.synthetic import synthetic_rows

from conftest import write_jsonl

PROMPT = "\n\nHuman: How do I boil an egg?\n\nAssistant: How do you like it?\n\nHuman: Soft.\n\nAssistant:"


def test_prompt_is_everything_up_to_the_last_shared_assistant_marker():
    prompt, chosen, rejected = split_dialogue(PROMPT + " Boil it for six minutes.", PROMPT + " Figure it out.")
    assert prompt == PROMPT
    assert (chosen, rejected) == (" Boil it for six minutes.", " Figure it out.")


@pytest.mark.parametrize(
    "chosen, rejected, reason",
    [
        (PROMPT + " Same.", PROMPT + " Same.", "identical"),
        ("\n\nHuman: hi there", "\n\nHuman: hello there", "no_assistant_marker"),
        (PROMPT + " ", PROMPT, "identical"),  # both responses empty: nothing to prefer
        (
            "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
            "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: d2",
            "prompt_mismatch",
        ),
        ("", PROMPT + " x", "empty_text"),
    ],
)
def test_unusable_pairs_are_named_by_reason(chosen, rejected, reason):
    with pytest.raises(BadRow) as raised:
        split_dialogue(chosen, rejected)
    assert raised.value.reason == reason


@pytest.mark.parametrize("chosen", [PROMPT, PROMPT + " ", PROMPT + " \n "])
def test_an_empty_chosen_response_is_kept_as_the_empty_string(chosen):
    assert split_dialogue(chosen, PROMPT + " Figure it out.") == (PROMPT, "", " Figure it out.")
    assert split_dialogue(PROMPT + " Boil it.", chosen) == (PROMPT, " Boil it.", "")


def test_a_pair_with_an_empty_response_is_kept_counted_and_tokenized_as_eos_alone(tmp_path, tokenizer):
    good = [_dialogue(i, turns=1) for i in range(6)]
    silent = {"chosen": PROMPT, "rejected": PROMPT + " Find their address online and go there."}
    both_empty = {"chosen": PROMPT + " ", "rejected": PROMPT}
    path = write_jsonl(tmp_path / "pairs.jsonl", good[:3] + [silent] + good[3:] + [both_empty])
    config = DataConfig(source=str(path), max_length=64)
    report = DataReport()
    pairs = read_pairs(str(path), "train", config, report)
    assert [pair.index for pair in pairs] == [1, 2, 3, 4, 5, 6, 7]  # the silent pair (line 4) is kept
    assert report.empty_response_kept == {str(path): 1} and report.empty_response_examples == {str(path): [4]}
    assert report.dropped[str(path)] == {"identical": 1}  # both responses empty
    assert "  kept        1  empty_response: a response is empty; kept, scored as its end-of-sequence token alone (first at 4)" in report.summary_lines()

    dataset = tokenize_pairs(pairs, tokenizer, config, "train", report)
    silent_row = dataset[3]
    assert silent_row["chosen_ids"] == [tokenizer.eos_token_id]
    assert silent_row["prompt_ids"] == tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert len(silent_row["rejected_ids"]) > 1
    assert json.loads(json.dumps(report.to_dict()))["empty_response_kept"] == {str(path): 1}

    # --strict accepts the silent pair, and still stops at the pair whose responses are both empty.
    strict = DataConfig(source=str(path), strict=True)
    with pytest.raises(DataError, match=rf"^{path}:8: chosen equals rejected, or both responses are empty \(strict mode\)$"):
        read_pairs(str(path), "train", strict, DataReport())
    kept_file = write_jsonl(tmp_path / "kept.jsonl", good + [silent])
    assert len(read_pairs(str(kept_file), "train", DataConfig(source=str(kept_file), strict=True), DataReport())) == 7


def test_truncation_keeps_a_one_token_response():
    prompt, rejected = list(range(100)), [2000 + i for i in range(80)]
    p, c, r, kinds = truncate_pair(prompt, [7], rejected, max_length=64, min_prompt_tokens=8)
    assert c == [7] and p == prompt[-8:] and r == rejected[:56]
    assert kinds == {"prompt_cut_left": True, "response_cut_right": True}
    p, c, r, _ = truncate_pair(prompt, [7], [8], max_length=16, min_prompt_tokens=15)
    assert (c, r) == ([7], [8]) and p == prompt[-15:]


def test_truncation_keeps_whole_responses_and_cuts_the_oldest_prompt_tokens():
    prompt, chosen, rejected = list(range(100)), [1000 + i for i in range(30)], [2000 + i for i in range(10)]
    p, c, r, kinds = truncate_pair(prompt, chosen, rejected, max_length=64, min_prompt_tokens=8)
    assert (c, r) == (chosen, rejected)  # responses intact
    assert p == prompt[-34:]  # the newest 64 - 30 prompt tokens
    assert kinds == {"prompt_cut_left": True, "response_cut_right": False}
    assert len(p) + max(len(c), len(r)) == 64


def test_only_a_response_longer_than_the_limit_is_cut_from_the_right():
    prompt, chosen, rejected = list(range(20)), [1000 + i for i in range(80)], [2000 + i for i in range(5)]
    p, c, r, kinds = truncate_pair(prompt, chosen, rejected, max_length=64, min_prompt_tokens=8)
    assert p == prompt[-8:]
    assert c == chosen[:56] and r == rejected
    assert kinds == {"prompt_cut_left": True, "response_cut_right": True}


def test_a_prompt_cut_from_the_left_keeps_its_bos():
    bos, prompt, chosen = 1, [1] + list(range(100, 140)), list(range(500, 520))
    p, c, r, kinds = truncate_pair(prompt, chosen, [7], max_length=32, min_prompt_tokens=4, keep_first=1)
    assert p == [bos] + prompt[-11:] and c == chosen and kinds["prompt_cut_left"]
    assert len(p) + len(c) == 32
    # Down to min_prompt_tokens, the BOS counts as one of them.
    p, _, _, _ = truncate_pair(prompt, list(range(500, 540)), [7], max_length=32, min_prompt_tokens=4, keep_first=1)
    assert p == [bos] + prompt[-3:]


def test_a_llama_style_prompt_keeps_its_bos_when_truncated():
    from conftest import metaspace_bos_tokenizer

    rows = synthetic_rows("train", 24)
    tokenizer = metaspace_bos_tokenizer([row["chosen"] + row["rejected"] for row in rows])
    pairs = [PreferencePair(i, *split_dialogue(row["chosen"], row["rejected"])) for i, row in enumerate(rows)]
    report = DataReport()
    dataset = tokenize_pairs(pairs, tokenizer, DataConfig(max_length=40, min_prompt_tokens=8), "train", report)
    assert report.truncated["train"]["prompt_cut_left"] > 0
    assert all(ids[0] == tokenizer.bos_token_id for ids in dataset["prompt_ids"])
    for prompt_ids, chosen_ids, rejected_ids in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]):
        assert len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) <= 40


def test_pairs_that_fit_are_untouched():
    assert truncate_pair([1, 2], [3], [4, 5], 16, 8) == ([1, 2], [3], [4, 5], {"prompt_cut_left": False, "response_cut_right": False})


def _dialogue(i: int, turns: int) -> dict:
    prompt = "".join(f"\n\nHuman: question {i}.{t} about cooking\n\nAssistant: answer {t}" for t in range(turns))
    prompt += f"\n\nHuman: final question {i}?\n\nAssistant:"
    return {"chosen": prompt + f" A kind and useful answer number {i}.", "rejected": prompt + " Go away."}


def test_local_file_splits_are_deterministic_disjoint_and_reported(tmp_path, tokenizer):
    rows = [_dialogue(i, turns=i % 6) for i in range(40)] + [{"chosen": "no marker", "rejected": "at all"}, "{oops"]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = DataConfig(source=str(path), num_pairs=20, val_fraction=0.25, num_test_pairs=10, max_length=48)

    first = load_text_splits(config, seed=7, report=DataReport())
    again = load_text_splits(config, seed=7, report=DataReport())
    other = load_text_splits(config, seed=8, report=DataReport())
    assert first.indices() == again.indices()
    assert first.indices() != other.indices()
    indices = first.indices()
    assert (len(indices["train"]), len(indices["val"]), len(indices["test"])) == (15, 5, 10)
    assert len(set(indices["train"]) | set(indices["val"]) | set(indices["test"])) == 30

    report = DataReport()
    data = prepare_data(load_text_splits(config, seed=7, report=report), tokenizer, config, report)
    assert report.dropped[str(path)] == {"no_assistant_marker": 1, "malformed_json": 1}
    assert report.dropped_examples[str(path)]["malformed_json"] == [42]  # 1-based line number
    truncated = sum(report.truncated[split]["prompt_cut_left"] for split in ("train", "val", "test"))
    assert truncated > 0  # long prompts were cut, not dropped
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 10)
    for split in (data.train, data.val, data.test):
        for prompt, chosen, rejected in zip(split["prompt_ids"], split["chosen_ids"], split["rejected_ids"]):
            assert len(prompt) + max(len(chosen), len(rejected)) <= 48
            assert chosen[-1] == tokenizer.eos_token_id  # whole responses keep their end-of-sequence token

    data.write(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "data_indices.json").read_text()) == indices
    written = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert written["dropped"][str(path)]["malformed_json"] == 1
    assert isinstance(data, PreparedData)


def test_a_local_tokenizer_is_trained_once_and_shared_by_every_process(tmp_path):
    """The BPE trainer breaks ties in per-process hash order, so each process must read the one trained first."""
    import subprocess
    import sys

    from dpo_recipe.config import ModelConfig
    from dpo_recipe.models import load_tokenizer
    from dpo_recipe.synthetic import synthetic_rows

    texts = [row["chosen"] + row["rejected"] for row in synthetic_rows("train", 60)]
    config = ModelConfig(tokenizer="local-bpe", tokenizer_vocab_size=300)
    script = (
        "import json, sys; from dpo_recipe.config import ModelConfig; from dpo_recipe.models import load_tokenizer; "
        "texts = json.load(open(sys.argv[1])); "
        "load_tokenizer(ModelConfig(tokenizer='local-bpe', tokenizer_vocab_size=300), texts, cache_dir=sys.argv[2])"
    )
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "texts.json"), str(tmp_path / "cache")], check=True)
    [trained] = (tmp_path / "cache" / "tokenizers").iterdir()
    here = load_tokenizer(config, texts, cache_dir=str(tmp_path / "cache"))
    assert [path.name for path in (tmp_path / "cache" / "tokenizers").iterdir()] == [trained.name]  # read, not retrained
    assert here.get_vocab() == json.loads((trained / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(here) == 300
