"""Bad input of every kind: one line naming the file, key or line and what is allowed; exit 2; never a traceback.

Config mistakes run the real CLI in a subprocess (it fails before torch is imported, so each costs well under a
second). Mistakes that surface only once data or the model is loaded run `cli.main` in this process, to spare the
seconds of importing torch again; one unknown hub dataset runs as a subprocess to show it fails fast offline.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dpo_recipe.cli import main
from dpo_recipe.config import DataConfig, ModelConfig
from dpo_recipe.data import load_text_splits, tokenize_pairs
from dpo_recipe.sources import DataError, DataReport, read_pairs
from dpo_recipe.synthetic import synthetic_rows

from conftest import REPO, SMOKE_CONFIG, gpt2_style_tokenizer, write_jsonl

PROMPT = "\n\nHuman: How do I boil an egg?\n\nAssistant:"


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpo_recipe", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def single_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def write_config(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(f"base: {SMOKE_CONFIG}\ntraining:\n  output_dir: {tmp_path / 'checkpoints'}\n{text}")
    return path


# (YAML added to a run file over the smoke config, what the error must say after the file name)
CONFIG_MISTAKES = {
    "unknown key": ("  learnig_rate: 1.0e-4\n", "unknown key 'training.learnig_rate' (allowed here: "),
    "unknown section": ("optimiser:\n  lr: 1\n", "unknown key 'optimiser' (allowed here: data, logging, loss, model,"),
    "wrong type": ("  num_epochs: three\n", "training.num_epochs must be an integer, got 'three'"),
    "bool for a number": ("loss:\n  beta: true\n", "loss.beta must be a number, got True"),
    "beta zero": ("loss:\n  beta: 0\n", "loss.beta must be > 0 (got 0.0)"),
    "beta negative": ("loss:\n  beta: -0.1\n", "loss.beta must be > 0 (got -0.1)"),
    "lr zero": ("  learning_rate: 0\n", "training.learning_rate must be > 0 (got 0.0)"),
    "max_length below 16": ("data:\n  max_length: 8\n", "data.max_length must be >= 16 (got 8)"),
    "batch zero": ("  effective_batch_size: 0\n", "training.effective_batch_size must be >= 1 (got 0)"),
    "micro-batch zero": ("  per_device_batch_size: 0\n", "training.per_device_batch_size must be >= 1 (got 0)"),
    "val fraction 0": ("data:\n  val_fraction: 0\n", "data.val_fraction must be in (0, 1) (got 0.0)"),
    "val fraction 1": ("data:\n  val_fraction: 1.0\n", "data.val_fraction must be in (0, 1) (got 1.0)"),
    "val takes every pair": (
        "data:\n  num_pairs: 4\n  val_fraction: 0.9\n",
        "data.val_fraction leaves no training pairs out of data.num_pairs = 4 (got 0.9)",
    ),
    "unknown choice": ("  precision: fp64\n", "training.precision must be one of auto, bf16, fp32, fp16 (got 'fp64')"),
    "attention without a 4D mask": (
        "model:\n  attn_implementation: flash_attention_2\ntraining:\n  prompt_sharing: true\n",
        "model.attn_implementation 'flash_attention_2' cannot read the shared-prompt mask: use one of sdpa, eager, "
        "or set training.prompt_sharing: false",
    ),
}


@pytest.mark.parametrize("mistake", CONFIG_MISTAKES)
def test_config_mistake_is_one_line_naming_file_and_key(tmp_path, mistake):
    yaml_text, expected = CONFIG_MISTAKES[mistake]
    path = write_config(tmp_path, yaml_text)
    result = run_cli("train", "--config", str(path))
    assert result.returncode == 2
    assert single_error_line(result.stderr).startswith(f"error: {path}: {expected}")
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained or written


# (--set flag, what the error must say after naming that flag): the flag is the source, not the file it overrides.
OVERRIDE_MISTAKES = {
    "loss.beta=-1": "loss.beta must be > 0 (got -1.0)",
    "loss.betta=0.1": "unknown key 'loss.betta' (allowed here: beta, label_smoothing, rpo_alpha, type)",
    "training.num_epochs=three": "training.num_epochs must be an integer, got 'three'",
    "model.lora={r: 0}": "model.lora.r must be >= 1 (got 0)",
    "training.precision=fp64": "training.precision must be one of auto, bf16, fp32, fp16 (got 'fp64')",
}


@pytest.mark.parametrize("override", OVERRIDE_MISTAKES)
def test_an_override_mistake_names_the_set_flag_not_the_file(override):
    result = run_cli("train", "--config", str(SMOKE_CONFIG), "--set", "loss.beta=0.5", "--set", override)
    assert result.returncode == 2
    assert single_error_line(result.stderr) == f"error: --set {override}: {OVERRIDE_MISTAKES[override]}"


def test_a_file_mistake_still_names_the_file_when_other_keys_are_set(tmp_path):
    path = write_config(tmp_path, "loss:\n  beta: -0.1\n")
    result = run_cli("print-config", "--config", str(path), "--set", "training.num_epochs=2")
    assert result.returncode == 2
    assert single_error_line(result.stderr) == f"error: {path}: loss.beta must be > 0 (got -0.1)"


def test_override_mistake_and_broken_files_are_one_line(tmp_path):

    missing = tmp_path / "nope.yaml"
    result = run_cli("print-config", "--config", str(missing))
    assert result.returncode == 2
    assert single_error_line(result.stderr) == f"error: {missing.resolve()}: config file not found"

    broken = tmp_path / "broken.yaml"
    broken.write_text("training:\n  num_epochs: [1, 2\n")
    result = run_cli("print-config", "--config", str(broken))
    assert result.returncode == 2
    assert single_error_line(result.stderr).startswith(f"error: {broken.resolve()}:3: not valid YAML")


def call_main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, single_error_line(capsys.readouterr().err)


def test_max_length_above_the_model_context_names_file_and_key(tmp_path, capsys):
    path = write_config(tmp_path, "data:\n  num_pairs: 16\n  num_test_pairs: 4\nmodel:\n  tiny: {n_positions: 32}\n")
    code, line = call_main(capsys, "train", "--config", str(path), "--set", "data.max_length=48")
    assert code == 2
    assert line == "error: --set data.max_length=48: data.max_length must be <= the model's context of 32 tokens (got 48)"
    path = write_config(tmp_path, "data:\n  num_pairs: 16\n  num_test_pairs: 4\n  max_length: 48\nmodel:\n  tiny: {n_positions: 32}\n")
    code, line = call_main(capsys, "train", "--config", str(path))
    assert line == f"error: {path}: data.max_length must be <= the model's context of 32 tokens (got 48)"


def test_more_pairs_than_the_data_holds_is_an_error_not_a_smaller_run(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_rows("train", 30))
    path = write_config(tmp_path, f"data:\n  source: {data}\n  num_pairs: 28\n  num_test_pairs: 4\n")
    code, line = call_main(capsys, "train", "--config", str(path))
    assert code == 2
    assert line == f"error: {path}: data.num_pairs + data.num_test_pairs = 32 but {data} has only 30 usable pairs"


def test_unknown_loss_type_fails_before_any_data_is_read(tmp_path, capsys):
    path = write_config(tmp_path, "loss:\n  type: dop\n")
    code, line = call_main(capsys, "train", "--config", str(path))
    assert code == 2
    assert line.startswith(f"error: {path}: loss.type must be one of dpo, cdpo, ipo, hinge, robust (or TRL's sigmoid for dpo)")
    assert not (tmp_path / "checkpoints").exists()


# loss.type values that only training used to refuse (print-config printed them, exit 0), and what the line says.
LOSS_TYPE_MISTAKES = {
    "apo_zero": "loss.type must be one of dpo, cdpo, ipo, hinge, robust (or TRL's sigmoid for dpo), or a dotted path "
    "package.module:function to a loss of your own (got 'apo_zero')",
    "no_such_module:my_loss": "loss.type 'no_such_module:my_loss' could not be imported: No module named 'no_such_module'",
}


@pytest.mark.parametrize("command", ["print-config", "train"])
@pytest.mark.parametrize("loss_type", LOSS_TYPE_MISTAKES)
def test_print_config_finds_what_training_would_refuse_naming_the_flag_or_file(tmp_path, command, loss_type):
    result = run_cli(command, "--config", str(SMOKE_CONFIG), "--set", f"loss.type={loss_type}")
    assert result.returncode == 2
    assert single_error_line(result.stderr) == f"error: --set loss.type={loss_type}: {LOSS_TYPE_MISTAKES[loss_type]}"
    path = write_config(tmp_path, f"loss:\n  type: {loss_type}\n")
    result = run_cli(command, "--config", str(path), "--set", "training.num_epochs=2")
    assert result.returncode == 2
    assert single_error_line(result.stderr) == f"error: {path}: {LOSS_TYPE_MISTAKES[loss_type]}"
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU may support bf16")
def test_a_setting_this_machine_cannot_run_names_the_flag_that_gave_it(tmp_path, capsys):
    code, line = call_main(
        capsys, "train", "--config", str(SMOKE_CONFIG), "--set", f"training.output_dir={tmp_path}", "--set", "training.precision=bf16"
    )
    assert code == 2
    assert line == "error: --set training.precision=bf16: training.precision bf16 needs a GPU that supports it (use auto or fp32)"
    assert not list(tmp_path.iterdir())


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    path = write_config(tmp_path, "")
    code, line = call_main(capsys, "train", "--config", str(path), "--resume")
    assert code == 2
    assert line == f"error: {path}: --resume: no complete checkpoint in {tmp_path / 'checkpoints' / 'smoke'}"


# One row of each kind a local file can get wrong, as (raw line, reason); good rows sit between them.
BAD_LINES = [
    (b'{"chosen": "' + PROMPT.encode("unicode_escape") + b' ok"', "malformed_json"),  # cut off
    (b"[1, 2, 3]", "malformed_json"),
    (json.dumps({"chosen": PROMPT + " Boil it."}).encode(), "missing_field"),
    (json.dumps({"chosen": PROMPT + " Boil it.", "rejected": 7}).encode(), "non_string_field"),
    (json.dumps({"chosen": None, "rejected": PROMPT + " No."}).encode(), "non_string_field"),
    (json.dumps({"chosen": "   ", "rejected": PROMPT + " No."}).encode(), "empty_text"),
    (json.dumps({"chosen": PROMPT + " Boil it.", "rejected": PROMPT + " Boil it."}).encode(), "identical"),
    (json.dumps({"chosen": "Human: hi. Bot: hello", "rejected": "Human: hi. Bot: go away"}).encode(), "no_assistant_marker"),
    (
        json.dumps({"chosen": PROMPT + " Boil it.", "rejected": "\n\nHuman: Other?\n\nAssistant: No."}).encode(),
        "prompt_mismatch",
    ),
    (json.dumps({"chosen": PROMPT + " ", "rejected": PROMPT}).encode(), "identical"),  # both responses empty
    ('{"chosen": "caf\u00e9", "rejected": "x"}'.encode("latin-1"), "invalid_utf8"),
]


def dirty_file(tmp_path, good: int = 40):
    """`good` valid rows with every BAD_LINES row after the 2nd, 4th, ... good row; returns (path, {reason: lines})."""
    rows, expected = [], {}
    good_rows = iter(synthetic_rows("train", good))
    for raw, reason in BAD_LINES:
        rows += [next(good_rows), next(good_rows), raw]
        expected.setdefault(reason, []).append(len(rows))
    rows += list(good_rows)
    return write_jsonl(tmp_path / "dirty.jsonl", rows), expected


def test_every_bad_row_is_skipped_and_counted_by_reason_with_its_line(tmp_path):
    path, expected = dirty_file(tmp_path)
    report = DataReport()
    pairs = read_pairs(str(path), "train", DataConfig(source=str(path)), report)
    assert len(pairs) == 40
    assert report.rows_read == {str(path): 40 + len(BAD_LINES)}
    assert report.dropped[str(path)] == {reason: len(lines) for reason, lines in expected.items()}
    assert report.dropped_examples[str(path)] == expected
    assert 3 not in [pair.index for pair in pairs] and pairs[0].index == 1  # pairs keep their own line numbers


def test_strict_mode_turns_the_first_bad_row_into_an_error_naming_file_and_line(tmp_path):
    path, _ = dirty_file(tmp_path)
    with pytest.raises(DataError) as error:
        read_pairs(str(path), "train", DataConfig(source=str(path), strict=True), DataReport())
    assert str(error.value) == f"{path}:3: line is not a JSON object (strict mode)"


def test_a_dirty_file_trains_and_its_drops_are_printed_and_written_to_the_run(tmp_path, capsys):
    path, expected = dirty_file(tmp_path)
    config = write_config(
        tmp_path,
        f"  num_epochs: 1\n  reference_cache_dir: {tmp_path / 'cache'}\n"
        f"data:\n  source: {path}\n  num_pairs: 24\n  num_test_pairs: 4\n  max_length: 64\n",
    )
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: {40 + len(BAD_LINES)} rows read, {len(BAD_LINES)} dropped" in out
    assert "dropped     2  malformed_json: line is not a JSON object (first at 3, 6)" in out
    assert "dropped     1  invalid_utf8: line is not valid UTF-8 (first at 33)" in out
    report = json.loads((tmp_path / "checkpoints" / "smoke" / "data_report.json").read_text())
    assert report["dropped"][str(path)] == {reason: len(lines) for reason, lines in expected.items()}
    assert report["dropped_examples"][str(path)] == expected

    # The same file under --strict (or data.strict: true) stops before anything is trained.
    for extra in (["--strict"], ["--set", "data.strict=true"]):
        code, line = call_main(capsys, "train", "--config", str(config), "--set", f"training.output_dir={tmp_path / 's'}", *extra)
        assert code == 2
        assert line == f"error: {path}:3: line is not a JSON object (strict mode)"
    assert not (tmp_path / "s").exists()


def test_hub_rows_get_the_same_checks_with_row_numbers(monkeypatch):
    from datasets import Dataset

    rows = [
        {"chosen": PROMPT + " Boil it.", "rejected": PROMPT + " No."},
        {"chosen": PROMPT + " Boil it.", "rejected": None},  # a hub column with a missing value arrives as None
        {"chosen": PROMPT + " Same.", "rejected": PROMPT + " Same."},
        {"chosen": "no marker", "rejected": "at all"},
        {"chosen": PROMPT + " Boil it.", "rejected": PROMPT + " No."},
    ]
    calls = []

    def load_dataset(source, name=None, data_dir=None, split=None):
        calls.append((source, name, data_dir, split))
        return Dataset.from_list(rows)

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    report = DataReport()
    config = DataConfig(source="Anthropic/hh-rlhf", subset="harmless-base")
    pairs = read_pairs("Anthropic/hh-rlhf", "train", config, report)
    read_pairs("Anthropic/hh-rlhf", "test", DataConfig(source="Anthropic/hh-rlhf", config_name="default"), DataReport())
    assert calls == [("Anthropic/hh-rlhf", None, "harmless-base", "train"), ("Anthropic/hh-rlhf", "default", None, "test")]
    assert [pair.index for pair in pairs] == [0, 4]
    assert report.dropped["Anthropic/hh-rlhf:train"] == {"non_string_field": 1, "identical": 1, "no_assistant_marker": 1}
    with pytest.raises(DataError, match=r"^Anthropic/hh-rlhf:train:1: 'chosen' or 'rejected' \(or the format's 'prompt'\) is not a string \(strict mode\)$"):
        read_pairs("Anthropic/hh-rlhf", "train", DataConfig(source="Anthropic/hh-rlhf", strict=True), DataReport())


def _gzip_with_garbage(path):
    data = gzip.compress(b"\n".join(json.dumps(row).encode() for row in synthetic_rows("train", 200)))
    path.write_bytes(data[:40] + bytes(byte ^ 0xFF for byte in data[40:80]) + data[80:])
    return path


WHOLE_FILE_PROBLEMS = {
    "missing": (lambda tmp: tmp / "missing.jsonl", "{path}: data file not found"),
    "empty": (lambda tmp: write_jsonl(tmp / "empty.jsonl", []), "{path}: no rows (the file is empty)"),
    "blank lines only": (lambda tmp: write_jsonl(tmp / "blank.jsonl", ["", "  "]), "{path}: no rows (the file is empty)"),
    "csv": (
        lambda tmp: write_jsonl(tmp / "pairs.jsonl", ["chosen,rejected", "a,b", "c,d"]),
        "{path}: none of its 3 rows is a usable preference pair in the hh-rlhf format (malformed_json); set data.format "
        "if it is in another",
    ),
    "broken json array": (  # a whole JSON array is one document: a mistake in it loses the file, said in one line
        lambda tmp: write_jsonl(tmp / "pairs.json", json.dumps(synthetic_rows("train", 3), indent=2).splitlines()[:-1]),
        "{path}: not a valid JSON array (Expecting ',' delimiter: ",
    ),
    "not gzip": (
        lambda tmp: write_jsonl(tmp / "pairs.jsonl.gz", synthetic_rows("train", 3)),
        "{path}: cannot be read as gzip JSONL (Not a gzipped file (b'{\"'))",
    ),
    "corrupt gzip": (
        lambda tmp: _gzip_with_garbage(tmp / "corrupt.jsonl.gz"),
        "{path}: cannot be read as gzip JSONL (Error -3 while decompressing data: ",
    ),
}


@pytest.mark.parametrize("problem", WHOLE_FILE_PROBLEMS)
def test_an_unusable_file_is_one_clear_error(tmp_path, problem):
    make, expected = WHOLE_FILE_PROBLEMS[problem]
    path = make(tmp_path)
    with pytest.raises(DataError) as error:
        load_text_splits(DataConfig(source=str(path), num_pairs=4, num_test_pairs=0), 0, DataReport())
    assert str(error.value).startswith(expected.replace("{path}", str(path)))


def _without_hub(tmp_path, **extra: str) -> dict:
    """No hub: an endpoint where nothing listens (no internet is contacted) and an empty cache."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf_home"), **extra}


@pytest.mark.parametrize("offline", ["unreachable endpoint", "HF_HUB_OFFLINE=1"])
def test_the_study_config_without_the_hub_fails_in_seconds_naming_the_offline_options(tmp_path, offline):
    env = _without_hub(tmp_path, **({"HF_HUB_OFFLINE": "1"} if offline == "HF_HUB_OFFLINE=1" else {}))
    config = REPO / "configs" / "beta0.3.yaml"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "dpo_recipe", "train", "--config", str(config), "--set", f"training.output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    line = single_error_line(result.stderr)
    reason = "HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE=1" else "http://127.0.0.1:9 unreachable"
    assert line.startswith(
        f"error: {config}: model.name_or_path 'gpt2' (a hub model) and data.source 'Anthropic/hh-rlhf' (a hub dataset) "
        f"are not in the local cache and the hub is not available ({reason}"
    )
    assert "set data.source to a local .jsonl file or `synthetic`, and model.name_or_path to a local model directory" in line
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert not list(tmp_path.glob("beta0.3*"))  # nothing was written


def test_a_hub_model_that_is_cached_loads_offline_and_an_uncached_one_names_its_set_flag(tmp_path, capsys, monkeypatch):
    from dpo_recipe import hub
    from dpo_recipe.config import ConfigError
    from dpo_recipe.config_loader import load_config

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    config = load_config(SMOKE_CONFIG, ["model.tiny=null", "model.name_or_path=some-org/some-model"])
    monkeypatch.setattr(hub, "is_cached", lambda name, kind: False)
    with pytest.raises(ConfigError, match=r"^--set model.name_or_path=some-org/some-model: model.name_or_path 'some-org/some-model' \(a hub model\) is not in the local cache"):
        hub.check_hub_access(config)
    monkeypatch.setattr(hub, "is_cached", lambda name, kind: True)
    monkeypatch.setattr(hub, "_go_offline", lambda: os.environ.__setitem__("HF_HUB_OFFLINE", "1"))  # a dict monkeypatch restores
    hub.check_hub_access(config)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert "note: http://127.0.0.1:9 unreachable" in capsys.readouterr().out


def test_a_local_model_path_that_does_not_exist_says_no_such_directory(tmp_path, capsys):
    missing = tmp_path / "models" / "smollm2"
    path = write_config(tmp_path, f"model:\n  tiny: null\n  tokenizer: null\n")
    code, line = call_main(capsys, "train", "--config", str(path), "--set", f"model.name_or_path={missing}")
    assert code == 2
    assert line == f"error: --set model.name_or_path={missing}: model.name_or_path: no such directory: {missing}"
    code, line = call_main(capsys, "rank", "--checkpoint", str(missing), "--prompt", "p", "--response-a", "a", "--response-b", "b")
    assert code == 2 and line == f"error: {missing}: not a model directory (no config.json or adapter_config.json)"


def test_models_load_as_safetensors_and_remote_code_stays_off_unless_asked(monkeypatch, tokenizer):
    from dpo_recipe import models

    calls = []

    def from_pretrained(name, **kwargs):
        calls.append(kwargs)
        raise OSError(f"{name} is not a local folder")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", from_pretrained)
    assert ModelConfig().trust_remote_code is False
    for trust in (False, True):
        config = ModelConfig(name_or_path="some/model", trust_remote_code=trust)
        with pytest.raises(models.ConfigError, match=r"^model.name_or_path: cannot load 'some/model' \(some/model is not"):
            models.build_model(config, tokenizer, seed=0, max_length=64)
        with pytest.raises(models.ConfigError, match=r"^model.name_or_path: cannot load tokenizer 'some/model'"):
            models.load_tokenizer(config)
    model_calls = [c for c in calls if "use_safetensors" in c]
    assert [c["trust_remote_code"] for c in model_calls] == [False, True]
    assert all(c["use_safetensors"] is True for c in model_calls)
    assert [c["trust_remote_code"] for c in calls if "use_safetensors" not in c] == [False, True]


def test_pairs_the_tokenizer_cannot_score_are_one_line_naming_file_and_line(tmp_path):
    tokenizer = gpt2_style_tokenizer(["It is here. It is there. " * 50], vocab_size=300)
    assert len(tokenizer("It")["input_ids"]) == 1
    # "I" + "t is." tokenizes as "It is.": prompt and prompt + response share no token.
    rows = [{"prompt": "Is it?", "chosen": " It is.", "rejected": ""}, {"prompt": "I", "chosen": "t is.", "rejected": "t is not."}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = DataConfig(source=str(path), max_length=64)
    pairs = read_pairs(str(path), "train", config, DataReport())
    with pytest.raises(DataError, match=rf"^{path}:2: the prompt and prompt \+ response share no first token .*; end the prompt on a token boundary$"):
        tokenize_pairs(pairs, tokenizer, config, "train", DataReport())
    tokenizer.eos_token = None
    with pytest.raises(DataError, match=rf"^{path}:1: a response is empty and the tokenizer has no end-of-sequence token to score it$"):
        tokenize_pairs(pairs, tokenizer, config, "train", DataReport())
