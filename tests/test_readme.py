"""Every command in the README's code blocks runs as written on a fresh clone, offline.

The commands are read from the README itself, in order: every line of a ```bash block and of an indented code block
(continuation lines joined). They run in a copy of the clone (configs, recipes, scripts, Makefile) whose `.venv` is
this interpreter's environment, with $HOME in the test's directory, as a user who follows the README from the top
would run them. The files a user brings are stood in for by the test: `my_pairs.jsonl`, `triples.jsonl`,
`my_chats.jsonl` and `chatml.jinja` in the clone, 1812 synthetic pairs at the README's path of the hh-rlhf file, and a
tiny Llama with a chat template at the README's path of SmolLM2. Each command runs one of these ways (`plan`):

- as written: everything offline that takes seconds;
- at smoke size: a study config on a local model and file runs as written plus SMOKE_SIZE;
- config only: training that would download gpt2 and Anthropic/hh-rlhf, or launch on GPUs, runs with
  `--print-config` (every key, value and --set checked, nothing loaded), and its launch config must exist;
- `make -n`: every make command expands (its target exists, its variables resolve); the ones in MAKE_RUNS also run.

A command that no rule covers fails the test, so a new README command cannot go unchecked. NOT_RUN lists the only
commands that are not run at all, with the reason.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_recipe.config import ConfigError
from dpo_recipe.config_loader import load_config
from dpo_recipe.hub import hub_names
from dpo_recipe.synthetic import synthetic_rows

from conftest import REPO, write_jsonl

README = REPO / "README.md"
CLONE_PARTS = ("configs", "recipes", "scripts", "Makefile", "pyproject.toml")
NOT_RUN = {
    "docker run": "needs a Docker daemon and a CUDA image (the Dockerfile is linted by tests/test_docker.py)",
}
# make commands that also run (as this command), beyond `make -n`. The others only expand: `install` downloads packages,
# `test` is this suite, `train`, `sweep` and `eval` of checkpoints/beta0.3 need the study's downloads and hours of
# training, `sweep-smoke` trains three smoke runs (minutes), `docker` needs a Docker daemon.
MAKE_RUNS = {"make install smoke": "make smoke", "make eval": "make eval"}
# The study's size on a local model and file: all its pairs are read, split and tokenized (so they must fit the
# file), but rows are cut to 64 tokens (the shared-prompt collator's masks grow with the square of the length) and
# training stops after 2 steps.
SMOKE_SIZE = ["--set", "data.max_length=64", "--set", "training.max_steps=2"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def readme_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each command of a ```bash block or an indented block; comment lines left out."""
    commands, pending, fence, previous = [], None, None, ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            previous = line
            continue
        indented = fence is None and line.startswith("    ") and (previous.strip() == "" or previous.startswith("    "))
        if fence == "bash" or indented:
            body = line[4:] if indented else line
            if pending is not None:
                pending = (pending[0], pending[1] + " " + body.strip())
            elif body.strip() and not body.strip().startswith("#"):
                pending = (number, body.strip())
            if pending is not None and not pending[1].endswith("\\"):
                commands.append(pending)
                pending = None
            elif pending is not None:
                pending = (pending[0], pending[1][:-1].rstrip())
        previous = line
    return commands


def _train_arguments(words: list[str]) -> list[str] | None:
    """The arguments of a training command (scripts/train.py or `-m dpo_recipe train`), after any launcher."""
    if "scripts/train.py" in words:
        return words[words.index("scripts/train.py") + 1 :]
    if words[:4] == ["python", "-m", "dpo_recipe", "train"]:
        return words[4:]
    return None


def plan(command: str, home: Path) -> tuple[str, list[str]]:
    """How the test runs a README command: (way, words to run)."""
    words = shlex.split(os.path.expandvars(command.replace("$HOME", str(home))), comments=True)
    for prefix, reason in NOT_RUN.items():
        if command.startswith(prefix):
            return "not run", [reason]
    if words[0] == "make":
        return "make", words
    if words[0] == "source":
        return "activate", words
    train = _train_arguments(words)
    if words[0] == "accelerate":
        assert train is not None, f"an accelerate command that does not train: {command}"
        return "config only", ["python", "scripts/train.py", *train]
    if words[0] != "python":
        raise AssertionError(f"no rule says how to run this README command: {command}")
    if train is not None:
        config_file = train[train.index("--config") + 1]
        overrides = [train[i + 1] for i, word in enumerate(train) if word == "--set"]
        try:
            config = load_config(config_file, overrides)
        except ConfigError:
            return "as written", words  # which then fails, with the one-line error in the test's report
        if hub_names(config):
            return "config only", words
        if Path(config_file).name != "smoke.yaml":
            return "smoke size", words + SMOKE_SIZE
    return "as written", words


def run_python(words: list[str]) -> tuple[int, str]:
    """`python scripts/x.py ...` or `python -m module ...` in this process, as the interpreter would run it."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = sys.argv
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if words[1] == "-m":
                sys.argv = [words[2], *words[3:]]
                runpy.run_module(words[2], run_name="__main__", alter_sys=True)
            else:
                sys.argv = words[1:]
                runpy.run_path(words[1], run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return code, stdout.getvalue() + stderr.getvalue()


def run_shell(command: str, clone: Path, env: dict) -> tuple[int, str]:
    result = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    return result.returncode, result.stdout + result.stderr


def _stand_in_smollm2(directory: Path) -> None:
    """A tiny Llama with a chat template where the README expects SmolLM2-135M-Instruct (no download here)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_recipe.models import train_local_tokenizer

    texts = [row["chosen"] + row["rejected"] for row in synthetic_rows("train", 200)]
    tokenizer = train_local_tokenizer(texts + [CHATML], vocab_size=400)
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _as_messages(row: dict) -> dict:
    prompt, chosen = row["chosen"].rsplit("\n\nAssistant:", 1)
    rejected = row["rejected"][len(prompt) + len("\n\nAssistant:") :]
    turns = re.split(r"\n\n(Human|Assistant): ", prompt)[1:]
    messages = [{"role": "user" if who == "Human" else "assistant", "content": text} for who, text in zip(turns[::2], turns[1::2])]
    return {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen.strip()}],
            "rejected": [{"role": "assistant", "content": rejected.strip()}]}  # fmt: skip


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone's files, its .venv (this environment), a home, and the files the README's commands read."""
    root = tmp_path_factory.mktemp("readme")
    clone = root / "clone"
    clone.mkdir()
    for part in CLONE_PARTS:
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, clone / part)
    (clone / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    home = root / "home"
    _stand_in_smollm2(home / ".cache" / "offline-models" / "smollm2-135m")
    (root / "shared" / "data").mkdir(parents=True)
    with gzip.open(root / "shared" / "data" / "hh-rlhf-harmless-base-1812.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in synthetic_rows("train", 1812, seed=7))
    write_jsonl(clone / "my_pairs.jsonl", synthetic_rows("test", 16, seed=5))
    write_jsonl(clone / "my_chats.jsonl", [_as_messages(row) for row in synthetic_rows("train", 100, seed=9)])
    (clone / "chatml.jinja").write_text(CHATML)
    write_jsonl(clone / "triples.jsonl", [
        {"prompt": "How do I bake bread?", "response_a": "Mix flour, water, salt and yeast.", "response_b": "Go away."},
        {"prompt": "How do I start running?", "response_a": "No.", "response_b": "Run and walk in turns, three times a week."},
    ])  # fmt: skip
    return clone, home


def test_the_readme_says_how_to_activate_the_environment_before_any_python_command():
    commands = [shlex.join(shlex.split(command, comments=True)) for _, command in readme_commands(README.read_text())]
    activation = commands.index("source .venv/bin/activate")
    first_python = next(i for i, command in enumerate(commands) if command.startswith(("python", "accelerate")))
    assert activation < first_python


def test_every_readme_command_runs_as_written(clone, monkeypatch):
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's commands run in a virtual environment (`make install` makes one); this is not one")
    clone, home = clone
    env = {**os.environ, "HOME": str(home)}
    env.pop("VIRTUAL_ENV", None)
    # Under `make test ARGS=...` make exports its command-line variables to the environment and to every make below
    # it (MAKEFLAGS): the README's `make smoke` would get the test run's ARGS. A user's shell has none of these.
    for name in ("ARGS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):
        env.pop(name, None)
    monkeypatch.chdir(clone)
    monkeypatch.setenv("HOME", str(home))
    commands = readme_commands(README.read_text())
    assert len(commands) > 30
    failures, ways = [], {}
    for line, command in commands:
        way, words = plan(command, home)
        ways.setdefault(way, []).append(line)
        launch = re.search(r"--config_file ([^\s\"']+)", command)
        started = time.perf_counter()
        if way == "not run":
            continue
        if launch and not (clone / launch.group(1)).is_file():
            results = [(1, f"no launch config {launch.group(1)}")]
        elif way == "make":
            runs = [shlex.join(["make", "-n", *words[1:]])]
            runs += [MAKE_RUNS[shlex.join(words)]] if shlex.join(words) in MAKE_RUNS else []
            results = [run_shell(run, clone, env) for run in runs]
        elif way == "activate":
            # As written, then the README's next kind of command in that shell: the environment's python must be found.
            results = [run_shell(f"{shlex.join(words)} && python -m dpo_recipe --help", clone, env)]
        elif way == "config only":
            results = [run_python([*words, "--print-config"])]
        else:
            results = [run_python(words)]
        print(f"{time.perf_counter() - started:6.1f} s  line {line} ({way}): {command[:100]}")
        for code, output in results:
            if code != 0:
                failures.append(f"README line {line} ({way}): {command}\nexit {code}\n{output[-2500:]}")
    assert not failures, "\n\n".join(failures)
    # The study's training commands were each checked one way or another, and the smoke-sized ones trained.
    assert len(ways["config only"]) >= 4 and len(ways["smoke size"]) == 2 and len(ways["not run"]) == 1
    for run in ("smoke", "lora", "my_chats", "smollm2", "smollm2_chat"):
        assert (clone / "checkpoints" / run / "best.json").is_file(), run
    assert (clone / "reports" / "mine.md").is_file() and (clone / "merged" / "model.safetensors").is_file()
