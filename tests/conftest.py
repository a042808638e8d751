"""Shared offline fixtures: tokenizers, tiny models and hh-rlhf-format data are all made here, nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

from dpo_recipe.config import load_config  # noqa: E402
from dpo_recipe.models import train_local_tokenizer  # noqa: E402
from dpo_recipe.synthetic import synthetic_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def tokenizer():
    texts = [row["chosen"] + row["rejected"] for row in synthetic_rows("train", 200)]
    return train_local_tokenizer(texts, vocab_size=400)


@pytest.fixture
def tiny_gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (written as JSON) or raw str/bytes lines (written as they are)."""
    with open(path, "wb") as handle:
        for row in rows:
            if isinstance(row, bytes):
                handle.write(row + b"\n")
            elif isinstance(row, str):
                handle.write(row.encode() + b"\n")
            else:
                handle.write(json.dumps(row).encode() + b"\n")
    return path


@pytest.fixture
def smoke_config(tmp_path):
    """The smoke config, writing under tmp_path; pass extra `key=value` overrides."""

    def make(*overrides: str):
        return load_config(
            SMOKE_CONFIG,
            [
                f"training.output_dir={tmp_path / 'checkpoints'}",
                f"training.reference_cache_dir={tmp_path / 'ref_cache'}",
                *overrides,
            ],
        )

    return make
