"""Shared offline fixtures: tokenizers, tiny models and hh-rlhf-format data are all made here, nothing is downloaded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

from dpo_recipe.config_loader import load_config  # noqa: E402
from dpo_recipe.models import train_local_tokenizer  # noqa: E402
from dpo_recipe.synthetic import synthetic_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
# A two-process launch takes minutes on a 2-core machine that other jobs load; this bounds a hang, not a slow run.
LAUNCH_TIMEOUT_S = 1800
# A free port can be taken by another process (another test run on the machine) before the launcher binds it: only
# that failure is worth a second launch.
PORT_TAKEN = ("EADDRINUSE", "address already in use")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_launch(arguments: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`accelerate launch` on a free port (a launch config's fixed port may be another run's); output in log.out/.err."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *arguments]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env or {})}
    with open(log.with_suffix(".out"), "w") as stdout, open(log.with_suffix(".err"), "w") as stderr:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=stdout, stderr=stderr)


def stop_launch(process: subprocess.Popen) -> None:
    """torchrun stops its ranks on SIGTERM; a launcher still there two minutes later is killed."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch(arguments: list[str], log: Path, env: dict | None = None, attempts: int = 3) -> str:
    """`start_launch` run to the end; its stdout. A failed or hung launch fails the test with its output, and leaves
    no process behind to slow the tests after it."""
    for attempt in range(attempts):
        process = start_launch(arguments, log, env)
        try:
            code = process.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_launch(process)
        stdout, stderr = log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()
        if code == 0:
            return stdout
        if code is None or not any(sign in stderr for sign in PORT_TAKEN) or attempt == attempts - 1:
            raise AssertionError(
                f"{'no exit after ' + str(LAUNCH_TIMEOUT_S) + ' s' if code is None else f'exit {code}'}\n"
                f"--- stdout:\n{stdout[-1500:]}\n--- stderr:\n{stderr[-3000:]}"
            )


# ChatML, as SmolLM2 and Qwen render turns; it also renders a row's `tools` and two template variables
# (`chat_template_kwargs`), one of which (`enable_thinking` false, as in Qwen3) changes the generation prompt only.
CHATML_TEMPLATE = (
    r"{% if tools %}{{ '<|im_start|>system\nTools:' }}{% for tool in tools %}{{ ' ' + tool['function']['name'] }}"
    r"{% endfor %}{{ '<|im_end|>\n' }}{% endif %}{% if persona is defined %}{{ '<|im_start|>system\nSpeak as a ' + "
    r"persona + '.<|im_end|>\n' }}{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + "
    r"m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    r"{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)


def _trained_bpe(texts: list[str], pre_tokenizer, special_tokens: list[str], vocab_size: int) -> tuple[dict, list]:
    """The vocabulary and merges of a BPE trained on `texts` (the `tokenizers` trainer; nothing is downloaded)."""
    from tokenizers import Tokenizer, models, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizer
    initial = pre_tokenizer.alphabet() if hasattr(pre_tokenizer, "alphabet") else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=initial, show_progress=False
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    return state["vocab"], [tuple(merge) for merge in state["merges"]]


def gpt2_style_tokenizer(texts: list[str], vocab_size: int = 700):
    """GPT-2's tokenizer class over a byte-level BPE trained on `texts`: no BOS, `<|endoftext|>` as EOS."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    vocab, merges = _trained_bpe(texts, pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"], vocab_size)
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def metaspace_bos_tokenizer(texts: list[str], vocab_size: int = 700):
    """Llama/Mistral style: Llama's tokenizer class, a SentencePiece-like Metaspace BPE with byte fallback whose
    post-processor adds the BOS `<s>`; `</s>` as EOS."""
    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer

    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    vocab, merges = _trained_bpe(texts, metaspace, specials, vocab_size + 256)
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


# SmolLM2-135M-Instruct as ../shared/tools/get-smollm2.sh writes it (its tokenizer files are enough); tests that use
# it are skipped where it is absent.
SMOLLM2_DIR = Path(os.environ.get("SMOLLM2_DIR", Path.home() / ".cache" / "offline-models" / "smollm2-135m"))


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


def pytest_addoption(parser):
    parser.addoption(
        "--test-order", choices=("default", "reverse", "shuffle"), default="default",
        help="run the test modules, and the tests within each, in reverse or shuffled order: no test may depend on "
        "another having run first (a module stays together, so its module fixtures are built once)",
    )
    parser.addoption("--test-order-seed", type=int, default=None, help="the shuffle's seed (default: random, printed)")


def pytest_configure(config):
    if config.getoption("--test-order") == "shuffle" and config.getoption("--test-order-seed") is None:
        config.option.test_order_seed = int.from_bytes(os.urandom(2), "little")


def pytest_report_header(config):
    if config.getoption("--test-order") == "shuffle":
        return f"test order: shuffled with --test-order-seed={config.getoption('--test-order-seed')}"
    return f"test order: {config.getoption('--test-order')}"


def pytest_collection_modifyitems(config, items):
    order = config.getoption("--test-order")
    if order == "default":
        return
    import random

    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = list(modules.values())
    if order == "reverse":
        groups = [group[::-1] for group in groups[::-1]]
    else:
        shuffle = random.Random(config.getoption("--test-order-seed")).shuffle
        shuffle(groups)
        for group in groups:
            shuffle(group)
    items[:] = [item for group in groups for item in group]
