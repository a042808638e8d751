"""Every preference format TRL's DPOTrainer reads, from every kind of source, made from the same pairs in the tests."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest

from dpo_recipe.cli import main
from dpo_recipe.config import ConfigError, DataConfig
from dpo_recipe.config_loader import load_config
from dpo_recipe.data import load_text_splits, tokenize_pairs
from dpo_recipe.evaluate import dataset_name
from dpo_recipe.rundir import eval_file_name
from dpo_recipe.sources import DataError, DataReport, detect_format, hh_messages, read_pairs, split_dialogue
from dpo_recipe.synthetic import synthetic_rows

from conftest import SMOKE_CONFIG, write_jsonl

# Renders messages exactly as hh-rlhf writes its turns, so the chat formats must give the hh-rlhf token ids.
HH_TEMPLATE = (
    r"{% for m in messages %}{% if m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
    r"{% else %}{{ '\n\nAssistant:' }}{% if m['content'] %}{{ ' ' + m['content'] }}{% endif %}"
    r"{% if loop.last %}{{ eos_token }}{% endif %}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)
# A ChatML-like template that adds its own tokens around every turn.
CHATML_TEMPLATE = (
    r"{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SILENT_PROMPT = "\n\nHuman: Where does my neighbour live?\n\nAssistant:"


def hh_rows(count: int = 8) -> list[dict]:
    """Synthetic hh-rlhf rows, the last one a pair whose chosen response is empty."""
    return synthetic_rows("train", count - 1) + [{"chosen": SILENT_PROMPT, "rejected": SILENT_PROMPT + " At number 12."}]


def as_format(row: dict, data_format: str) -> dict:
    prompt, chosen, rejected = split_dialogue(row["chosen"], row["rejected"])
    if data_format == "standard":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    messages = hh_messages(prompt)
    chosen_turn, rejected_turn = ([{"role": "assistant", "content": text.strip()}] for text in (chosen, rejected))
    if data_format == "conversational":
        return {"prompt": messages, "chosen": chosen_turn, "rejected": rejected_turn}
    assert data_format == "conversational_implicit"
    return {"chosen": messages + chosen_turn, "rejected": messages + rejected_turn}


def write_source(directory: Path, rows: list[dict], kind: str) -> str:
    """The rows as a local source of the given kind; returns what data.source names."""
    from datasets import Dataset

    if kind == "jsonl":
        return str(write_jsonl(directory / "pairs.jsonl", rows))
    if kind == "jsonl.gz":
        path = directory / "pairs.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
        return str(path)
    if kind == "json array":
        path = directory / "pairs.json"
        path.write_text(json.dumps(rows, indent=2))
        return str(path)
    if kind == "parquet":
        path = directory / "pairs.parquet"
        Dataset.from_list(rows).to_parquet(str(path))
        return str(path)
    if kind in ("csv", "csv.gz"):
        path = directory / "pairs.csv"
        Dataset.from_list(rows).to_csv(str(path), index=False)
        if kind == "csv.gz":
            path = path.rename(directory / "pairs.csv.gz.tmp")
            (directory / "pairs.csv.gz").write_bytes(gzip.compress(path.read_bytes()))
            return str(directory / "pairs.csv.gz")
        return str(path)
    raise AssertionError(kind)


def token_ids(source: str, tokenizer, **config) -> tuple[str, list[tuple]]:
    if config.get("chat_template"):
        tokenizer = copy.deepcopy(tokenizer)  # it takes the template on; the session's tokenizer must not
    config = DataConfig(source=source, max_length=4096, **config)  # nothing truncated: ids compare whole
    report = DataReport()
    pairs = read_pairs(source, "train", config, report)
    dataset = tokenize_pairs(pairs, tokenizer, config, "train", report)
    (data_format,) = report.formats.values()
    return data_format, list(zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]))


@pytest.fixture
def hh_ids(tmp_path, tokenizer):
    data_format, ids = token_ids(write_source(tmp_path, hh_rows(), "jsonl"), tokenizer)
    assert data_format == "hh-rlhf"
    assert ids[-1][1] == [tokenizer.eos_token_id]  # the empty chosen response
    return ids


@pytest.mark.parametrize(
    "data_format, kind",
    [
        ("standard", "jsonl"), ("standard", "json array"), ("standard", "parquet"), ("standard", "csv"),
        ("standard", "csv.gz"), ("conversational", "jsonl"), ("conversational", "jsonl.gz"),
        ("conversational", "parquet"), ("conversational", "json array"), ("conversational_implicit", "jsonl"),
        ("conversational_implicit", "parquet"),
    ],
)  # fmt: skip
def test_the_same_pairs_in_every_format_and_file_kind_tokenize_to_the_same_ids(
    tmp_path, tokenizer, hh_ids, data_format, kind
):
    rows = [as_format(row, data_format) for row in hh_rows()]
    detected, ids = token_ids(write_source(tmp_path, rows, kind), tokenizer, chat_template=HH_TEMPLATE)
    assert detected == data_format
    assert ids == hh_ids


def test_hh_rlhf_turns_rendered_through_a_chat_template(tmp_path, tokenizer, hh_ids):
    source = write_source(tmp_path, hh_rows(), "jsonl")
    assert token_ids(source, tokenizer, format="hh-rlhf-chat", chat_template=HH_TEMPLATE) == ("hh-rlhf-chat", hh_ids)
    assert hh_messages("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
    ]  # fmt: skip

    chatml_format, chatml = token_ids(source, tokenizer, format="hh-rlhf-chat", chat_template=CHATML_TEMPLATE)
    assert [c for _, c, _ in chatml] != [c for _, c, _ in hh_ids]  # the template adds its own tokens


def test_standard_implicit_prompt_is_the_common_prefix_with_the_space_on_the_responses(tmp_path, tokenizer):
    rows = [
        {"chosen": f"Question {i}: what is {i} plus {i}? Answer: It is {2 * i}.", "rejected": f"Question {i}: what is {i} plus {i}? Answer: No idea."}
        for i in range(5)
    ] + [{"chosen": "Question 9: are you there? Answer:", "rejected": "Question 9: are you there? Answer: Who asks?"}]
    implicit = write_source(tmp_path, rows, "jsonl")
    (tmp_path / "explicit").mkdir()
    explicit = write_source(tmp_path / "explicit", [
        {"prompt": row["chosen"][: row["chosen"].index("Answer:") + 7], "chosen": row["chosen"][row["chosen"].index("Answer:") + 7 :],
         "rejected": row["rejected"][row["rejected"].index("Answer:") + 7 :]} for row in rows
    ], "jsonl")  # fmt: skip
    pairs = read_pairs(implicit, "train", DataConfig(source=implicit), report := DataReport())
    assert report.formats == {implicit: "standard_implicit"}
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("Question 0: what is 0 plus 0? Answer:", " It is 0.", " No idea.")
    assert pairs[-1].chosen == "" and report.empty_response_kept == {implicit: 1}
    assert token_ids(implicit, tokenizer)[1] == token_ids(explicit, tokenizer)[1]


def test_conversational_prompt_ids_are_the_chat_template_with_the_generation_prompt(tmp_path):
    rows = [as_format(row, "conversational") for row in hh_rows()]
    templated = _with_template(CHATML_TEMPLATE)
    _, ids = token_ids(write_source(tmp_path, rows, "jsonl"), templated)
    for row, (prompt_ids, chosen_ids, rejected_ids) in zip(rows, ids):
        expected = templated.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
        assert prompt_ids == expected
        full = templated.apply_chat_template(row["prompt"] + row["chosen"], return_dict=True)["input_ids"]
        assert prompt_ids + chosen_ids == full  # the response is what the rendered conversation adds
        assert templated.decode(chosen_ids).endswith("<|im_end|>\n")


def _with_template(template: str):
    from dpo_recipe.models import train_local_tokenizer

    tokenizer = train_local_tokenizer([row["chosen"] for row in synthetic_rows("train", 50)], vocab_size=300)
    tokenizer.chat_template = template
    return tokenizer


def test_messages_without_a_chat_template_are_one_clear_error(tmp_path):
    tokenizer = _with_template(None)
    source = write_source(tmp_path, [as_format(row, "conversational") for row in hh_rows()], "jsonl")
    with pytest.raises(DataError) as error:
        token_ids(source, tokenizer)
    assert str(error.value) == (
        "train pairs are chat messages but the tokenizer has no chat template: set data.chat_template to a Jinja "
        "template or a file holding one"
    )
    template_file = tmp_path / "template.jinja"
    template_file.write_text(CHATML_TEMPLATE)
    config = DataConfig(source=source, chat_template=str(template_file))
    dataset = tokenize_pairs(read_pairs(source, "train", config, DataReport()), tokenizer, config, "train", DataReport())
    assert len(dataset) == len(hh_rows())
    assert tokenizer.chat_template == CHATML_TEMPLATE  # saved with the tokenizer, so evaluation renders the same


def test_detection_reads_the_columns_and_data_format_forces_one():
    assert detect_format({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}) == "hh-rlhf"
    assert detect_format({"chosen": "a b", "rejected": "a c"}) == "standard_implicit"
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "standard"
    assert detect_format({"prompt": [], "chosen": [], "rejected": []}) == "conversational"
    assert detect_format({"chosen": [], "rejected": []}) == "conversational_implicit"
    # A prompt of another kind than the responses is not the prompt (TRL's maybe_extract_prompt): UltraFeedback's
    # string beside whole conversations, and the reverse.
    assert detect_format({"prompt": "a", "chosen": [], "rejected": [], "prompt_id": "x", "score_chosen": 9.0}) == "conversational_implicit"
    assert detect_format({"prompt": [], "chosen": "a b", "rejected": "a c"}) == "standard_implicit"
    assert detect_format([1, 2]) is None
    with pytest.raises(ConfigError, match=r"data.format must be one of auto, hh-rlhf, hh-rlhf-chat, standard, "):
        load_config(SMOKE_CONFIG, ["data.format=sharegpt"])
    with pytest.raises(ConfigError, match=r"data.chat_template must be a Jinja template or the path of a file"):
        load_config(SMOKE_CONFIG, ["data.chat_template=no/such/file.jinja"])


def conversational_dirty_file(tmp_path) -> tuple[str, dict[str, list[int]]]:
    good = [as_format(row, "conversational") for row in synthetic_rows("train", 12)]
    user = [{"role": "user", "content": "Hi?"}]
    bad = [
        ({"prompt": user, "chosen": [{"role": "assistant", "content": 7}], "rejected": good[0]["rejected"]}, "malformed_messages"),
        ({"chosen": good[0]["chosen"], "rejected": good[0]["rejected"]}, "missing_field"),
        ({"prompt": [], "chosen": good[0]["chosen"], "rejected": good[0]["rejected"]}, "empty_prompt"),
        ({"prompt": user, "chosen": good[0]["chosen"], "rejected": good[0]["chosen"]}, "identical"),
        ("{not json", "malformed_json"),
        ({"prompt": user, "chosen": "Hello.", "rejected": good[0]["rejected"]}, "malformed_messages"),
        ({**good[0], "tools": "[{not json"}, "malformed_template_columns"),
        ({**good[0], "chat_template_kwargs": {"add_generation_prompt": False}}, "malformed_template_columns"),
    ]  # fmt: skip
    rows, expected = list(good[:2]), {}
    for row, reason in bad:
        rows.append(row)
        expected.setdefault(reason, []).append(len(rows))
        rows.append(good[len(rows) % 12])
    return str(write_jsonl(tmp_path / "conversational.jsonl", rows)), expected


def test_a_conversational_file_with_bad_rows_counts_them_or_names_file_and_line_under_strict(tmp_path):
    source, expected = conversational_dirty_file(tmp_path)
    report = DataReport()
    pairs = read_pairs(source, "train", DataConfig(source=source), report)
    assert len(pairs) == 10 and report.formats == {source: "conversational"}
    assert report.dropped_examples[source] == expected
    assert report.dropped[source] == {reason: len(lines) for reason, lines in expected.items()}
    with pytest.raises(DataError) as error:
        read_pairs(source, "train", DataConfig(source=source, strict=True), DataReport())
    assert str(error.value) == (
        f"{source}:3: a field is not a list of {{role, content}} messages with string values (strict mode)"
    )


def test_table_rows_are_named_by_row_number_under_strict(tmp_path):
    rows = [as_format(row, "standard") for row in synthetic_rows("train", 4)]
    rows[2]["prompt"] = "  "
    source = write_source(tmp_path, rows, "parquet")
    report = DataReport()
    assert len(read_pairs(source, "train", DataConfig(source=source), report)) == 3
    assert report.dropped_examples[source] == {"empty_prompt": [2]}  # 0-based row, as in a hub split
    with pytest.raises(DataError, match=rf"^{source}:2: the prompt \(given, or shared by chosen and rejected\) is empty \(strict mode\)$"):
        read_pairs(source, "train", DataConfig(source=source, strict=True), DataReport())


def test_a_local_directory_laid_out_like_a_hub_dataset_loads_through_subset(tmp_path):
    root = tmp_path / "hh-rlhf"
    (root / "harmless-base").mkdir(parents=True)
    (root / "helpful-base").mkdir()
    for split, count in (("train", 30), ("test", 10)):
        for subset in ("harmless-base", "helpful-base"):
            rows = synthetic_rows(split, count, seed=0 if subset == "harmless-base" else 1)
            data = "".join(json.dumps(row) + "\n" for row in rows).encode()
            (root / subset / f"{split}.jsonl.gz").write_bytes(gzip.compress(data))
    config = DataConfig(source=str(root), subset="harmless-base", num_pairs=20, num_test_pairs=6, val_fraction=0.25)
    report = DataReport()
    splits = load_text_splits(config, seed=0, report=report)
    assert report.rows_read == {f"{root}:train": 30, f"{root}:test": 10}  # one subset, both its splits
    assert report.formats[f"{root}:train"] == "hh-rlhf"
    harmless_test = [split_dialogue(r["chosen"], r["rejected"])[0] for r in synthetic_rows("test", 10, seed=0)]
    assert all(pair.prompt in harmless_test for pair in splits.test)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 6)
    with pytest.raises(DataError, match=r"^dataset '.*' \(split 'train'\) could not be loaded: "):
        read_pairs(str(root), "train", DataConfig(source=str(root), subset="no-such-subset"), DataReport())


def test_a_local_directory_with_configurations_loads_through_config_name(tmp_path):
    """Configurations declared in the directory's README.md, as on the hub: `load_dataset(source, config_name)`."""
    root = tmp_path / "preferences"
    for name, seed in (("polite", 0), ("rude", 1)):
        (root / name).mkdir(parents=True)
        for split, count in (("train", 12), ("test", 4)):
            write_jsonl(root / name / f"{split}.jsonl", synthetic_rows(split, count, seed=seed))
    declared = "".join(
        f"- config_name: {name}\n  data_files:\n" + "".join(f"  - split: {split}\n    path: {name}/{split}.jsonl\n" for split in ("train", "test"))
        for name in ("polite", "rude")
    )
    (root / "README.md").write_text(f"---\nconfigs:\n{declared}---\n")
    config = DataConfig(source=str(root), config_name="rude", num_pairs=8, num_test_pairs=3)
    report = DataReport()
    splits = load_text_splits(config, seed=0, report=report)
    assert report.rows_read == {f"{root}:train": 12, f"{root}:test": 4}
    rude_test = [split_dialogue(row["chosen"], row["rejected"])[0] for row in synthetic_rows("test", 4, seed=1)]
    assert all(pair.prompt in rude_test for pair in splits.test)
    with pytest.raises(DataError, match=rf"^dataset '{root}' configuration 'kind' \(split 'train'\) could not be loaded: BuilderConfig 'kind' not found"):
        read_pairs(str(root), "train", DataConfig(source=str(root), config_name="kind"), DataReport())


def test_config_name_is_for_datasets_only(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_rows("train", 8))
    with pytest.raises(ConfigError, match=r"^data.config_name 'en' names a configuration of a hub dataset .* but data.source '.*pairs.jsonl' is not one$"):
        load_text_splits(DataConfig(source=str(data), config_name="en", num_pairs=4, num_test_pairs=2), 0, DataReport())
    assert main(["show-data", "--config", str(SMOKE_CONFIG), "--set", "data.config_name=en"]) == 2
    assert capsys.readouterr().err == (
        "error: --set data.config_name=en: data.config_name 'en' names a configuration of a hub dataset (or of a "
        "directory laid out like one), but data.source 'synthetic' is not one\n"
    )
    with pytest.raises(ConfigError, match=r"data.config_name must be a configuration name or null \(got ''\)"):
        load_config(SMOKE_CONFIG, ["data.config_name=''"])


def test_a_conversational_file_trains_evaluates_ranks_and_generates_end_to_end(tmp_path, capsys):
    rows = [as_format(row, "conversational") for row in hh_rows(48)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    held_out = write_jsonl(tmp_path / "chat_held_out.jsonl", [as_format(r, "conversational") for r in synthetic_rows("test", 6)])
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    run = tmp_path / "checkpoints" / "chat"
    assert main([
        "train", "--config", str(SMOKE_CONFIG), "--strict", "--set", "run_name=chat", "--set", f"data.source={data}",
        "--set", f"data.chat_template={template}", "--set", "data.num_pairs=36", "--set", "data.num_test_pairs=12",
        "--set", "data.max_length=96", "--set", "training.num_epochs=1",
        "--set", f"training.output_dir={tmp_path / 'checkpoints'}", "--set", f"training.reference_cache_dir={tmp_path / 'cache'}",
    ]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "  format  conversational" in out and "  kept        1  empty_response" in out
    assert json.loads((run / "data_report.json").read_text())["formats"] == {str(data): "conversational"}
    card = (run / "README.md").read_text()  # its usage example passes chat messages, as it trained on
    assert 'prompt = [{"role": "user", "content": "How do I bake bread?"}]' in card and f'model="{run / "best"}"' in card

    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "best" / "eval_test.json").read_text())["pairs"] == 12
    assert main(["eval", str(run / "best"), "--data", str(held_out)]) == 0
    result = json.loads((run / "best" / eval_file_name(dataset_name(str(held_out)))).read_text())
    assert result["pairs"] == 6 and result["dropped"] == {}
    capsys.readouterr()

    triples = tmp_path / "triples.jsonl"
    triples.write_text(
        json.dumps({"prompt": "How do I bake a loaf of bread?", "response_a": "Mix flour and water.", "response_b": ""}) + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "Hi?"}], "response_a": "Hello!", "response_b": "Go away."}) + "\n"
    )  # fmt: skip
    assert main(["rank", "--checkpoint", str(run / "best"), "--pairs", str(triples)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and all("nan" not in line for line in table)

    out_md = tmp_path / "samples.md"
    assert main(["generate", "--checkpoint", str(run / "best"), "--num-prompts", "2", "--max-new-tokens", "8", "--out", str(out_md)]) == 0
    samples = out_md.read_text()
    assert samples.count("## Prompt ") == 2 and "user: " in samples
