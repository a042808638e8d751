"""Model directories outside their run read data as their run did: a LoRA run on chat messages with a chat-template
tokenizer (a tiny Llama, built offline), merged, scores like its adapter checkpoint; any other directory takes
--format."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from dpo_recipe.cli import main
from dpo_recipe.config import ConfigError
from dpo_recipe.evaluate import evaluate_paths, rank_responses
from dpo_recipe.rundir import SCORING_FILE
from dpo_recipe.sources import DataError, hh_messages, split_dialogue
from dpo_recipe.synthetic import synthetic_rows

from conftest import SMOKE_CONFIG, write_jsonl

CHATML_TEMPLATE = (
    r"{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BETA = 0.3
# The triple, once as text and once as messages: a chat run reads both as a user message.
TRIPLES = [
    {"prompt": "How do I bake bread?", "response_a": "Mix flour, water, salt and yeast, then bake.",
     "response_b": "Figure it out yourself."},
    {"prompt": [{"role": "user", "content": "Can you help me move house?"}], "response_a": "Of course, when?",
     "response_b": "Go away."},
]  # fmt: skip
REWARD_METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "accuracy", "ties", "logps_chosen", "logps_rejected")


def conversational(rows: list[dict]) -> list[dict]:
    """hh-rlhf rows as TRL's conversational format: prompt messages and one assistant message per response."""
    converted = []
    for row in rows:
        prompt, chosen, rejected = split_dialogue(row["chosen"], row["rejected"])
        converted.append({"prompt": hh_messages(prompt), **{key: [{"role": "assistant", "content": text.strip()}]
                          for key, text in (("chosen", chosen), ("rejected", rejected))}})  # fmt: skip
    return converted


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tokenizer):
    """A tiny Llama whose tokenizer has a chat template, LoRA-trained 2 epochs on a conversational file, then merged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("chat_run")
    base = root / "base"
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(base)  # fmt: skip
    chat_tokenizer.save_pretrained(base)
    data = write_jsonl(root / "chat.jsonl", conversational(synthetic_rows("train", 48)))
    held_out = write_jsonl(root / "held_out.jsonl", conversational(synthetic_rows("test", 8, seed=5)))
    settings = [
        "run_name=chat_lora", "model.tiny=null", "model.tokenizer=null", f"model.name_or_path={base}",
        "model.lora={r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}", f"data.source={data}",
        "data.num_pairs=40", "data.num_test_pairs=8", "data.max_length=96", f"loss.beta={BETA}",
        "training.learning_rate=1.0e-2", "training.num_epochs=2",
        f"training.output_dir={root / 'checkpoints'}", f"training.reference_cache_dir={root / 'cache'}",
    ]  # fmt: skip
    assert main(["train", "--config", str(SMOKE_CONFIG), *(arg for s in settings for arg in ("--set", s))]) == 0
    run = root / "checkpoints" / "chat_lora"
    merged = root / "merged_conv"
    assert main(["merge", "--checkpoint", str(run / "best"), "--out", str(merged)]) == 0
    return {"base": base, "run": run, "merged": merged, "held_out": held_out, "root": root}


def test_checkpoints_and_merged_models_record_how_they_read_data(chat_run):
    for model_dir in (chat_run["run"] / "epoch-1", chat_run["run"] / "epoch-2", chat_run["merged"]):
        scoring = json.loads((model_dir / SCORING_FILE).read_text())
        assert scoring["data"] == {"format": "auto", "trained_format": "conversational", "max_length": 96, "min_prompt_tokens": 16}
        assert scoring["loss"] == {"type": "dpo", "beta": BETA, "label_smoothing": 0.0, "rpo_alpha": None}
    # The chat template that rendered the messages travels in the tokenizer files.
    assert AutoTokenizer.from_pretrained(chat_run["merged"]).chat_template == CHATML_TEMPLATE


def test_a_merged_model_ranks_like_its_adapter_checkpoint(chat_run):
    adapter = rank_responses(chat_run["run"] / "best", TRIPLES)
    merged = rank_responses(chat_run["merged"], TRIPLES, reference=str(chat_run["base"]))  # β from its scoring.json
    for ours, theirs in zip(merged, adapter):
        assert ours["reward_a"] == pytest.approx(theirs["reward_a"], abs=1e-4)
        assert ours["reward_b"] == pytest.approx(theirs["reward_b"], abs=1e-4)
        assert ours["prefers"] == theirs["prefers"]
    # The rewards are far from zero, so agreeing within 1e-4 says something.
    assert min(abs(r[key]) for r in adapter for key in ("reward_a", "reward_b")) > 1e-2


def test_a_merged_model_evaluates_like_its_adapter_checkpoint(chat_run):
    (adapter,) = evaluate_paths([chat_run["run"] / "best"], data_source=str(chat_run["held_out"]))
    (merged,) = evaluate_paths([chat_run["merged"]], data_source=str(chat_run["held_out"]), reference=str(chat_run["base"]))
    assert merged["pairs"] == adapter["pairs"] == 8 and merged["beta"] == adapter["beta"] == BETA
    for metric in REWARD_METRICS:
        assert merged[metric] == pytest.approx(adapter[metric], abs=1e-4), metric
    assert merged["ties"] < 1.0  # scored against the base, not against itself


def test_a_model_directory_the_recipe_did_not_write_takes_format(chat_run, capsys):
    plain = chat_run["root"] / "plain"
    if not plain.exists():
        shutil.copytree(chat_run["merged"], plain, ignore=shutil.ignore_patterns(SCORING_FILE))
    adapter = rank_responses(chat_run["run"] / "best", TRIPLES[:1])
    named = rank_responses(plain, TRIPLES[:1], reference=str(chat_run["base"]), beta=BETA, data_format="conversational")
    assert named[0]["reward_a"] == pytest.approx(adapter[0]["reward_a"], abs=1e-4)
    assert named[0]["reward_b"] == pytest.approx(adapter[0]["reward_b"], abs=1e-4)
    # Without --format such a directory reads prompts as hh-rlhf text: other tokens, other rewards, no messages.
    as_text = rank_responses(plain, TRIPLES[:1], reference=str(chat_run["base"]), beta=BETA)
    assert abs(as_text[0]["reward_a"] - adapter[0]["reward_a"]) > 1e-3
    with pytest.raises(DataError, match="message list, but the model was trained on hh-rlhf text .* takes --format"):
        rank_responses(plain, TRIPLES[1:], reference=str(chat_run["base"]), beta=BETA)
    # A directory that records its format needs no --format, and refuses one; a run's checkpoint takes none at all.
    with pytest.raises(ConfigError, match=f"--format is for model directories that do not record their format; this one "
                                          f"was trained on conversational data \\(its {SCORING_FILE}\\)"):  # fmt: skip
        rank_responses(chat_run["merged"], TRIPLES[:1], reference=str(chat_run["base"]), data_format="hh-rlhf")
    code = main(["rank", "--checkpoint", str(chat_run["run"] / "best"), "--format", "hh-rlhf", "--prompt", "Hi?",
                 "--response-a", "Hello.", "--response-b", "No."])  # fmt: skip
    assert code == 2 and "--reference, --beta and --format are for model directories outside a run" in capsys.readouterr().err


def test_the_model_card_of_a_chat_lora_run_says_merge_then_chat(chat_run):
    card = (chat_run["run"] / "README.md").read_text()
    run = chat_run["run"]
    assert f"python -m dpo_recipe merge --checkpoint {run / 'best'} --out {run}-merged" in card
    assert f'model="{run}-merged"' in card and 'prompt = [{"role": "user", "content": "How do I bake bread?"}]' in card
    assert f"- **Model**: local model {chat_run['base']}; LoRA r=8, alpha 16, dropout 0 on q_proj, v_proj" in card
    assert "read as `conversational`: 32 train / 8 val / 8 test pairs" in card and "- **Loss**: dpo, β 0.3" in card
    assert "learning rate 0.01" in card and "2 epochs configured, 2 trained" in card
    best = json.loads((run / "best.json").read_text())
    assert f"- **Best epoch**: {best['epoch']} (by val loss); validation loss {best['value']:.4f}" in card
