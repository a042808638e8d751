"""Token for token what TRL 1.16 trains on: the recipe's ids against TRL's own `DPOTrainer._prepare_dataset` on the
same rows, for every format and three tokenizer families, with nothing truncated.

The families: GPT-2's byte-level BPE (no BOS), a Llama/Mistral-style Metaspace BPE whose post-processor adds BOS
(both built here, offline), and SmolLM2's real tokenizer where ../shared/tools/get-smollm2.sh has written it.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

from dpo_recipe.cli import main
from dpo_recipe.config import DataConfig
from dpo_recipe.data import tokenize_pairs
from dpo_recipe.sources import DataReport, PreferencePair, hh_messages, read_pairs, split_dialogue
from dpo_recipe.synthetic import hh_length_rows, synthetic_rows

from conftest import (
    CHATML_TEMPLATE, SMOKE_CONFIG, SMOLLM2_DIR, gpt2_style_tokenizer, metaspace_bos_tokenizer, write_jsonl,
)  # fmt: skip

NOTHING_CUT = 100_000  # data.max_length: parity is about tokenization, truncation is the recipe's own
FAMILIES = ("gpt2", "metaspace", "smollm2")


def trl_token_ids(rows: list[dict], tokenizer, extract_prompt: bool = False) -> list[tuple]:
    """TRL 1.16's `DPOTrainer._prepare_dataset` on the rows, no truncation: (prompt, chosen, rejected) ids per row.

    The method reads only `self._tokenizer` and three arguments, so it runs without a model; `extract_prompt` maps
    `trl.data_utils.maybe_extract_prompt` first, as TRL users must for UltraFeedback-binarized.
    """
    from datasets import Dataset
    from trl import DPOTrainer
    from trl.data_utils import maybe_extract_prompt

    dataset = Dataset.from_list(rows)
    if extract_prompt:
        dataset = dataset.map(maybe_extract_prompt)
    trainer = SimpleNamespace(_tokenizer=tokenizer)
    arguments = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_end")
    prepared = DPOTrainer._prepare_dataset(trainer, dataset, tokenizer, arguments, "parity")
    return list(zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"]))


def recipe_token_ids(path, tokenizer, data_format: str = "auto") -> tuple[list[tuple], DataReport]:
    config = DataConfig(source=str(path), format=data_format, max_length=NOTHING_CUT, strict=True)
    report = DataReport()
    dataset = tokenize_pairs(read_pairs(str(path), "train", config, report), tokenizer, config, "train", report)
    return list(zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])), report


def assert_same_ids(ours: list[tuple], trls: list[tuple], tokenizer) -> None:
    assert len(ours) == len(trls)
    differing = [i for i, (a, b) in enumerate(zip(ours, trls)) if list(map(list, a)) != list(map(list, b))]
    if differing:
        i = differing[0]
        decoded = [[tokenizer.convert_ids_to_tokens(part) for part in ids] for ids in (ours[i], trls[i])]
        pytest.fail(f"{len(differing)} of {len(ours)} pairs differ from TRL; pair {i}:\nrecipe {decoded[0]}\nTRL    {decoded[1]}")


# Rows ------------------------------------------------------------------------------------------------------------


def hh_dialogues(count: int = 24) -> list[dict]:
    """hh-rlhf-like dialogues (dpo_recipe.synthetic) and crafted ones: an empty response, a response that starts
    without a space or with a line break, and a long multi-turn prompt."""
    prompt = "\n\nHuman: Where is my key?\n\nAssistant: Which key?\n\nHuman: The blue one.\n\nAssistant:"
    crafted = [
        {"chosen": prompt, "rejected": prompt + " In the drawer."},
        {"chosen": prompt + "In the drawer.", "rejected": prompt + " Lost, sorry."},
        {"chosen": prompt + "\nCheck your coat.", "rejected": prompt + " No idea."},
    ]
    return synthetic_rows("train", count // 2) + hh_length_rows(count - count // 2 - len(crafted), seed=3) + crafted


def standard_rows(eos: str) -> list[dict]:
    """Boundary cases: prompts ending in a space, a line break or mid-number, an empty and a blank response, a
    response already ending in the EOS text; then hh-rlhf dialogues split at their last `\\n\\nAssistant:`."""
    crafted = [
        {"prompt": "Question: colour of the sky?\nAnswer: ", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": "Question: colour of grass?\n", "chosen": "Green.", "rejected": "Blue, mostly."},
        {"prompt": "Count on from 12", "chosen": "34", "rejected": " 13"},
        {"prompt": "Say nothing at all.", "chosen": "", "rejected": " Something."},
        {"prompt": "Say nothing at all.", "chosen": "  ", "rejected": " Fine."},
        {"prompt": "Is it done?", "chosen": f" Done.{eos}", "rejected": " Not done."},
    ]
    split = [split_dialogue(row["chosen"], row["rejected"]) for row in hh_dialogues()]
    return crafted + [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in split]


def trl_readable_implicit(rows: list[dict]) -> list[dict]:
    """Less the pairs whose empty response makes chosen a prefix of rejected, which TRL's extract_prompt misreads
    (test_trls_extract_prompt_would_cut_the_prompt_of_an_implicit_pair_with_an_empty_response)."""
    return [row for row in rows if not row["rejected"].startswith(row["chosen"])]


def implicit_rows(eos: str) -> list[dict]:
    """Implicit prompts that diverge mid-word, mid-number, after a line break, and a response ending in EOS text."""
    return [
        {"chosen": "Question: colour of the sky? It is blue.", "rejected": "Question: colour of the sky? It is black."},
        {"chosen": "The answer is 1234.", "rejected": "The answer is 1299."},
        {"chosen": "Question: colour of grass?\nGreen.", "rejected": "Question: colour of grass?\nBlue."},
        {"chosen": f"Is it done? Yes.{eos}", "rejected": "Is it done? No."},
    ]


SYSTEM = {"role": "system", "content": "You answer in one short sentence."}


def chat_rows() -> list[dict]:
    """Conversations: system messages, multi-turn prompts, an empty response; then hh-rlhf dialogues as messages."""
    user, again = {"role": "user", "content": "What colour is the sky?"}, {"role": "user", "content": "And at night?"}
    said = {"role": "assistant", "content": "It is blue."}
    crafted = [
        {"prompt": [SYSTEM, user], "chosen": [said], "rejected": [{"role": "assistant", "content": "It is black."}]},
        {"prompt": [user, said, again], "chosen": [{"role": "assistant", "content": "Black, with stars."}],
         "rejected": [{"role": "assistant", "content": "Still blue."}]},
        {"prompt": [SYSTEM, user, said, again], "chosen": [{"role": "assistant", "content": ""}],
         "rejected": [{"role": "assistant", "content": "Green."}]},
    ]  # fmt: skip
    return crafted + [hh_as_messages(row) for row in hh_dialogues(12)]


def hh_as_messages(row: dict) -> dict:
    prompt, chosen, rejected = split_dialogue(row["chosen"], row["rejected"])
    return {"prompt": hh_messages(prompt), **{key: [{"role": "assistant", "content": text.strip()}] for key, text in (("chosen", chosen), ("rejected", rejected))}}


def implicit_chat(row: dict) -> dict:
    return {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}


def ultrafeedback(row: dict, number: int) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized's layout: a string prompt beside whole conversations, and more columns."""
    conversation = implicit_chat(row)
    return {"prompt": row["prompt"][-1]["content"], "prompt_id": f"{number:064x}", **conversation,
            "messages": conversation["chosen"], "score_chosen": 8.0, "score_rejected": 3.5}  # fmt: skip


TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


def tool_rows() -> list[dict]:
    """Conversations whose `tools` (as JSON text, as hub datasets store them) and `chat_template_kwargs` the chat
    template renders; `enable_thinking: false` renders the generation prompt differently from the conversation."""
    rows = []
    for number, row in enumerate(chat_rows()[:6]):
        kwargs = {"persona": "pirate", "enable_thinking": number % 2 == 0}
        rows.append({**row, "tools": json.dumps(TOOLS), "chat_template_kwargs": kwargs})
    return rows


# Tokenizers ------------------------------------------------------------------------------------------------------


def corpus() -> list[str]:
    texts = [row["chosen"] + row["rejected"] for row in synthetic_rows("train", 200)]
    words = "It is blue. It is black. Question: colour of the sky? The answer is 1234 or 1299, 12, 34. "
    return texts + [words] * 300 + [json.dumps(standard_rows("") + implicit_rows(""))]


@pytest.fixture(scope="module")
def families():
    """name -> tokenizer, each with a ChatML chat template that renders tools and template variables."""
    built = {"gpt2": gpt2_style_tokenizer(corpus()), "metaspace": metaspace_bos_tokenizer(corpus())}
    if (SMOLLM2_DIR / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        built["smollm2"] = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    for tokenizer in built.values():
        tokenizer.chat_template = CHATML_TEMPLATE
    return built


@pytest.fixture(params=FAMILIES)
def family(request, families):
    if request.param not in families:
        pytest.skip(f"SmolLM2's tokenizer is not at {SMOLLM2_DIR} (../shared/tools/get-smollm2.sh writes it; or set SMOLLM2_DIR)")
    return families[request.param]


def test_the_offline_families_are_what_they_stand_for(families):
    gpt2, metaspace = families["gpt2"], families["metaspace"]
    assert gpt2("Hi there")["input_ids"] == gpt2("Hi there", add_special_tokens=False)["input_ids"]  # no BOS
    assert metaspace("Hi there")["input_ids"][0] == metaspace.bos_token_id  # the post-processor adds BOS
    assert metaspace.convert_ids_to_tokens(metaspace("It is blue")["input_ids"])[1:] == ["\u2581It", "\u2581is", "\u2581blue"]
    assert (gpt2.eos_token, metaspace.eos_token) == ("<|endoftext|>", "</s>")


# Parity ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["standard", "standard_implicit", "hh-rlhf as standard_implicit"])
def test_text_formats_give_trls_ids(tmp_path, family, shape):
    rows = {
        "standard": standard_rows(family.eos_token),
        "standard_implicit": implicit_rows(family.eos_token),
        "hh-rlhf as standard_implicit": trl_readable_implicit(hh_dialogues()),
    }[shape]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    ours, report = recipe_token_ids(path, family, "standard_implicit" if "implicit" in shape else "auto")
    assert report.formats == {str(path): shape.split(" as ")[-1]}
    assert_same_ids(ours, trl_token_ids(rows, family), family)
    if family.bos_token_id is not None and family("x")["input_ids"][0] == family.bos_token_id:
        assert all(prompt[0] == family.bos_token_id for prompt, _, _ in ours)


def test_hh_rlhf_gives_trls_ids_for_the_standard_rows_its_split_produces(tmp_path, family):
    rows = hh_dialogues()
    ours, report = recipe_token_ids(write_jsonl(tmp_path / "hh.jsonl", rows), family)
    assert set(report.formats.values()) == {"hh-rlhf"} and report.empty_response_kept
    split = [dict(zip(("prompt", "chosen", "rejected"), split_dialogue(row["chosen"], row["rejected"]))) for row in rows]
    assert_same_ids(ours, trl_token_ids(split, family), family)


def test_hh_rlhf_chat_gives_trls_ids_for_the_conversations_its_split_produces(tmp_path, family):
    rows = hh_dialogues(12)
    ours, _ = recipe_token_ids(write_jsonl(tmp_path / "hh.jsonl", rows), family, "hh-rlhf-chat")
    assert_same_ids(ours, trl_token_ids([hh_as_messages(row) for row in rows], family), family)


@pytest.mark.parametrize("shape", ["conversational", "conversational_implicit", "ultrafeedback", "tools"])
def test_chat_formats_give_trls_ids(tmp_path, family, shape):
    rows = chat_rows()
    if shape == "conversational_implicit":
        rows = [implicit_chat(row) for row in rows]
    elif shape == "ultrafeedback":
        rows = [ultrafeedback(row, number) for number, row in enumerate(rows)]
    elif shape == "tools":
        rows = tool_rows()
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    ours, report = recipe_token_ids(path, family)
    detected = {"ultrafeedback": "conversational_implicit", "tools": "conversational"}.get(shape, shape)
    assert report.formats == {str(path): detected}  # detected from the columns, UltraFeedback's too
    assert_same_ids(ours, trl_token_ids(rows, family, extract_prompt=shape == "ultrafeedback"), family)
    if shape == "tools":
        assert report.template_kwargs_rows == {str(path): len(rows)}
        assert report.tokenization["train"]["prompt_end_left_out"] == len(rows) // 2  # enable_thinking: false
        assert "Tools: weather" in family.decode(ours[0][0]) and "Speak as a pirate." in family.decode(ours[0][0])


def test_trls_extract_prompt_would_cut_the_prompt_of_an_implicit_pair_with_an_empty_response(tmp_path, families):
    """The one shape where the recipe reads a row differently from TRL, on purpose: when one response is empty,
    chosen is a prefix of rejected, TRL's `extract_prompt` finds no differing character and cuts the prompt's last
    character off (here the colon, which becomes the chosen "response"). The recipe keeps the whole shared text as
    the prompt, and then tokenizes exactly as TRL tokenizes that explicit row."""
    from trl.data_utils import extract_prompt

    tokenizer = families["metaspace"]
    row = {"chosen": "Are you there? Answer:", "rejected": "Are you there? Answer: Who asks?"}
    assert extract_prompt(row) == {"prompt": "Are you there? Answer", "chosen": ":", "rejected": ": Who asks?"}
    ours, report = recipe_token_ids(write_jsonl(tmp_path / "implicit.jsonl", [row]), tokenizer)
    assert report.empty_response_kept
    explicit = {"prompt": "Are you there? Answer:", "chosen": "", "rejected": " Who asks?"}
    assert_same_ids(ours, trl_token_ids([explicit], tokenizer), tokenizer)
    assert ours[0][1] == [tokenizer.eos_token_id]


# What the issue reported, seen directly ---------------------------------------------------------------------------


def test_metaspace_text_keeps_bos_one_space_whole_words_and_one_eos(tmp_path, families):
    tokenizer = families["metaspace"]
    eos = tokenizer.eos_token
    rows = [
        {"prompt": "Question: colour of the sky?\nAnswer: ", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": "Is it done?", "chosen": f" Done.{eos}", "rejected": " Not done."},
    ]
    (space, done), report = recipe_token_ids(write_jsonl(tmp_path / "standard.jsonl", rows), tokenizer)
    assert space[0][0] == done[0][0] == tokenizer.bos_token_id
    assert tokenizer.decode(space[0] + space[1]) == "<s> Question: colour of the sky?\nAnswer: Blue.</s>"  # one space
    assert tokenizer.convert_ids_to_tokens(done[1]).count(eos) == 1  # the response's own EOS, none added
    assert report.tokenization["train"] == {"prompt_end_left_out": 1, "eos_text_in_response": 1}
    assert "  prompt_end_left_out 1: the prompt's last tokens change once a response follows" in "\n".join(report.summary_lines())

    implicit = write_jsonl(tmp_path / "implicit.jsonl", implicit_rows(eos)[:1])
    [(prompt, chosen, rejected)], _ = recipe_token_ids(implicit, tokenizer)
    assert tokenizer.convert_ids_to_tokens(chosen)[0].startswith("\u2581blue")  # not "bl" + "\u2581ue"
    assert tokenizer.convert_ids_to_tokens(rejected)[0].startswith("\u2581black")
    assert tokenizer.decode(prompt + chosen) == "<s> Question: colour of the sky? It is blue.</s>"


# The study's numbers ----------------------------------------------------------------------------------------------


def before_trl_parity(pairs: list[PreferencePair], tokenizer) -> list[tuple]:
    """The recipe's text encoding before this parity work: prompt and each response tokenized apart, without
    special tokens, each response followed by EOS."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = [tokenizer.eos_token_id]
    return [(ids(p.prompt), ids(p.chosen) + eos, ids(p.rejected) + eos) for p in pairs]


@pytest.mark.parametrize("which", ["gpt2", "local-bpe", "smollm2"])
def test_gpt2_style_hh_rlhf_ids_are_the_ids_of_before(tmp_path, families, tokenizer, which):
    """GPT-2 adds no BOS and hh-rlhf prompts end at `Assistant:`, a pre-token boundary: nothing truncated, the
    study's token ids (and so its numbers) are the ones the recipe trained on before TRL parity."""
    if which not in families and which != "local-bpe":
        pytest.skip(f"SmolLM2's tokenizer is not at {SMOLLM2_DIR}")
    chosen_tokenizer = tokenizer if which == "local-bpe" else families[which]
    rows = synthetic_rows("test", 60) + hh_length_rows(60, seed=5) + hh_dialogues()[-3:]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    config = DataConfig(source=str(path), max_length=NOTHING_CUT)
    pairs = read_pairs(str(path), "train", config, DataReport())
    ours, _ = recipe_token_ids(path, chosen_tokenizer)
    assert ours == before_trl_parity(pairs, chosen_tokenizer)


def test_a_tokenization_change_changes_the_reference_cache_key(families, tmp_path):
    """Cached reference log-probs are keyed by the token ids themselves, so ids from the old tokenization can
    never be reused for the new, and the same ids always find their cache."""
    from datasets import Dataset

    from dpo_recipe.reference import cache_path

    tokenizer = families["metaspace"]
    pairs = [PreferencePair(1, "Question: colour of the sky?\nAnswer: ", "Blue.", "Green.")]
    config = DataConfig(max_length=NOTHING_CUT)
    now = tokenize_pairs(pairs, tokenizer, config, "train", DataReport())
    again = tokenize_pairs(copy.deepcopy(pairs), tokenizer, config, "train", DataReport())
    before = Dataset.from_dict(dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), map(list, zip(*before_trl_parity(pairs, tokenizer))))))
    assert before["prompt_ids"] != now["prompt_ids"]

    def key(dataset):
        return cache_path(tmp_path, "model-key", dataset, "fp32", "shared_prompt")

    assert key(now) == key(again)
    assert key(before) != key(now)


# Through the command line -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["ultrafeedback", "standard", "standard_implicit"])
def test_show_data_json_writes_trls_ids_pair_by_pair(tmp_path, shape):
    """`show-data --json` with a Metaspace+BOS tokenizer given as model.tokenizer and nothing cut: the ids TRL's
    `_prepare_dataset` gives the same rows (UltraFeedback's after `maybe_extract_prompt`), pair by pair."""
    from transformers import AutoTokenizer

    built = metaspace_bos_tokenizer(corpus())
    built.chat_template = CHATML_TEMPLATE
    built.save_pretrained(tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")  # as the recipe reads it
    rows = {
        "ultrafeedback": [ultrafeedback(row, number) for number, row in enumerate(chat_rows())],
        "standard": standard_rows(tokenizer.eos_token),
        "standard_implicit": implicit_rows(tokenizer.eos_token) + trl_readable_implicit(hh_dialogues()),
    }[shape]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "ids.json"
    assert main([
        "show-data", "--config", str(SMOKE_CONFIG), "--set", f"model.tokenizer={tmp_path / 'tokenizer'}",
        "--set", f"data.source={data}", "--set", f"data.max_length={NOTHING_CUT}", "--set", "data.num_pairs=4",
        "--set", "data.num_test_pairs=2", "--set", f"training.reference_cache_dir={tmp_path / 'cache'}",
        "--n", "0", "--json", str(out),
    ]) == 0  # fmt: skip
    written = json.loads(out.read_text())
    assert [(record["source"], record["row"]) for record in written] == [(str(data), line) for line in range(1, len(rows) + 1)]
    ids = [(record["prompt_ids"], record["chosen_ids"], record["rejected_ids"]) for record in written]
    assert_same_ids(ids, trl_token_ids(rows, tokenizer, extract_prompt=shape == "ultrafeedback"), tokenizer)
