"""End to end on the offline smoke config: checkpoints, metrics, plots, LoRA, and a 2-process launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate.utils import is_peft_model
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from dpo_recipe.cli import main
from dpo_recipe.data import load_text_splits
from dpo_recipe.evaluate import RunScorer, dataset_name
from dpo_recipe.sources import DataReport
from dpo_recipe.synthetic import synthetic_rows
from dpo_recipe.rundir import epoch_dirs, eval_file_name, read_metrics
from dpo_recipe.run import prepare_run, run_training

from conftest import REPO, launch, write_jsonl

METRIC_KEYS = {"loss", "chosen_reward", "rejected_reward", "margin", "accuracy"}


def test_smoke_run_leaves_checkpoints_metrics_plots_and_indices(smoke_config):
    config = smoke_config()
    assert run_training(config) == 0
    run_dir = config.run_dir
    epochs = epoch_dirs(run_dir)
    assert [path.name for path in epochs] == ["epoch-1", "epoch-2", "epoch-3"]
    for path in epochs:
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
        assert not list(path.glob("pytorch_model*")) and not list(path.glob("adapter_model.bin"))  # weights: safetensors only
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for record in records:
        assert METRIC_KEYS | {"tokens_per_s"} <= set(record["train"])
        assert METRIC_KEYS <= set(record["val"])
        assert record["train"]["tokens_per_s"] > 0
        assert record["val"]["margin"] == record["val"]["chosen_reward"] - record["val"]["rejected_reward"]
    # 192 train pairs at an effective batch of 16: 12 optimizer steps per epoch
    assert [r["step"] for r in records] == [12, 24, 36]
    assert records[-1]["val"]["accuracy"] > 0.6  # the preference was learned
    card = (run_dir / "README.md").read_text()
    assert "a fine-tuned version of GPT-2 from config, random init (n_layer=2" in card and "None" not in card
    # Usage in the format it trained on: hh-rlhf turns, no chat messages (its tokenizer has no chat template).
    assert '"role"' not in card and 'prompt = "\\n\\nHuman: How do I bake bread?\\n\\nAssistant:"' in card
    assert f'pipeline("text-generation", model="{run_dir / "best"}")' in card
    best = json.loads((run_dir / "best.json").read_text())
    assert "- **Data**: synthetic, read as `hh-rlhf`: 192 train / 48 val / 48 test pairs" in card
    assert "- **Loss**: dpo, β 0.3" in card and "learning rate 0.001" in card and "3 epochs configured, 3 trained" in card
    assert f"- **Best epoch**: {best['epoch']} (by val loss); validation loss {best['value']:.4f}" in card
    assert card.count("\n| 3 | 36 | ") == 1  # a row per epoch, the last one written after the last save
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["wall_seconds"] > 0 and info["sessions"][0]["device"].startswith("CPU")
    assert info["sessions"][0]["precision"] == "fp32" and info["sessions"][0]["processes"] == 1
    for plot in ("loss.png", "rewards.png", "accuracy.png"):
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    indices = json.loads((run_dir / "data_indices.json").read_text())
    assert (len(indices["train"]), len(indices["val"]), len(indices["test"])) == (192, 48, 48)
    for record in records:  # 48 validation pairs in batches of 32: a short last batch must not weigh as a full one
        assert_logged_eval_metrics_equal_the_record(run_dir / f"epoch-{record['epoch']}", record)
    best = json.loads((run_dir / "best.json").read_text())
    val_losses = {r["epoch"]: r["val"]["loss"] for r in records}
    assert best["epoch"] == min(val_losses, key=val_losses.get)
    assert (run_dir / "best").resolve() == (run_dir / f"epoch-{best['epoch']}").resolve()


def test_lora_trains_only_the_adapter_and_uses_the_base_as_reference(smoke_config, capsys):
    config = smoke_config("model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0", "training.num_epochs=2")
    run = prepare_run(config)
    assert is_peft_model(run.trainer.model)
    assert run.trainer.ref_model is None  # the reference is the base with the adapter disabled, not a copy
    run.trainer.train()
    final = epoch_dirs(config.run_dir)[-1]
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()

    reference = load_file(config.run_dir / "reference" / "model.safetensors")
    trained = run.trainer.model.get_base_model().state_dict()
    base_weights = {name.replace(".base_layer", ""): value for name, value in trained.items() if "lora_" not in name}
    changed_base = [name for name, value in reference.items() if not torch.equal(base_weights[name], value)]
    assert changed_base == []
    adapter = load_file(final / "adapter_model.safetensors")
    lora_b = [value for name, value in adapter.items() if "lora_B" in name]
    assert lora_b and all(value.abs().max() > 0 for value in lora_b)  # lora_B starts at zero: it was trained

    # Merging folds the adapter in: a plain model whose outputs equal base + adapter.
    merged_dir = config.run_dir.parent / "merged"  # outside the run: no config.yaml beside it
    assert main(["merge", "--checkpoint", str(final), "--out", str(merged_dir)]) == 0
    merged = GPT2LMHeadModel.from_pretrained(merged_dir).eval()
    peft_model = run.trainer.model.eval()
    input_ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).logits
        assert torch.allclose(merged(input_ids=input_ids).logits, expected, atol=1e-5)
        assert not torch.allclose(GPT2LMHeadModel.from_pretrained(config.run_dir / "reference")(input_ids=input_ids).logits, expected, atol=1e-5)
    _merged_model_scores_like_its_adapter(config, final, merged_dir, capsys)


def _merged_model_scores_like_its_adapter(config, adapter_checkpoint, merged_dir, capsys):
    """eval, rank and generate take a model directory outside any run, given what its run would have recorded."""
    pairs = write_jsonl(config.run_dir.parent / "pairs.jsonl", synthetic_rows("test", 8, seed=3))
    reference = str(config.run_dir / "reference")
    capsys.readouterr()
    assert main(["eval", str(merged_dir), "--data", str(pairs)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {merged_dir}: no run config.yaml beside this model directory, so give --reference (the model it was "
        "trained from: a local directory or hub id; for a merged LoRA run, checkpoints/<run>/reference or its base "
        "model) and --beta (its scoring.json gives 0.3)"
    )
    assert main(["eval", str(merged_dir), "--reference", reference, "--beta", "0.3"]) == 2
    assert "give --data FILE" in capsys.readouterr().err

    assert main(["eval", str(merged_dir), "--data", str(pairs), "--reference", reference, "--beta", "0.3"]) == 0
    assert main(["eval", str(adapter_checkpoint), "--data", str(pairs)]) == 0
    result_file = eval_file_name(dataset_name(str(pairs)))
    merged_result = json.loads((merged_dir / result_file).read_text())
    adapter_result = json.loads((adapter_checkpoint / result_file).read_text())
    assert merged_result["pairs"] == adapter_result["pairs"] == 8 and merged_result["beta"] == 0.3
    for metric in ("loss", "chosen_reward", "rejected_reward", "logps_chosen", "logps_rejected"):
        assert merged_result[metric] == pytest.approx(adapter_result[metric], abs=1e-4)
    assert merged_result["ties"] < 1.0  # scored against the reference, not against itself

    capsys.readouterr()
    assert main(["rank", "--checkpoint", str(merged_dir), "--reference", reference, "--beta", "0.3", "--prompt",
                 "How do I bake a loaf of bread?", "--response-a", "Of course.", "--response-b", "Go away."]) == 0  # fmt: skip
    assert "reward A" in capsys.readouterr().out
    out = merged_dir.parent / "samples.md"
    assert main(["generate", "--checkpoint", str(merged_dir), "--reference", reference, "--data", str(pairs),
                 "--num-prompts", "2", "--max-new-tokens", "8", "--out", str(out)]) == 0  # fmt: skip
    assert out.read_text().count("## Prompt ") == 2


def test_a_tokenizer_with_its_own_bos_gives_a_tiny_model_its_ids_and_no_alignment_warning(tmp_path, tokenizer, capfd, caplog):
    """A tiny model built for a real tokenizer (say SmolLM2's, whose BOS is not its EOS) takes the tokenizer's special
    ids, so Trainer has nothing to align and prints nothing about it."""
    import copy

    from transformers import AutoConfig

    with_bos = copy.deepcopy(tokenizer)
    with_bos.add_special_tokens({"bos_token": "<s>"})
    with_bos.save_pretrained(tmp_path / "tokenizer")
    args = ["train", "--config", str(REPO / "configs" / "smoke.yaml"), "--set", f"model.tokenizer={tmp_path / 'tokenizer'}",
            "--set", f"training.output_dir={tmp_path}", "--set", f"training.reference_cache_dir={tmp_path / 'cache'}",
            "--set", "data.num_pairs=24", "--set", "data.num_test_pairs=4", "--set", "training.num_epochs=1"]  # fmt: skip
    assert main(args) == 0
    # Both the records and the text: where transformers' handler writes depends on what the first test that used it
    # captured, and pytest's record capture on the logger's propagation.
    assert "PAD/BOS/EOS" not in "".join(capfd.readouterr()) + caplog.text
    saved = AutoConfig.from_pretrained(tmp_path / "smoke" / "epoch-1")
    assert saved.bos_token_id == with_bos.bos_token_id != with_bos.eos_token_id == saved.eos_token_id


def test_two_process_launch_keeps_the_effective_batch(tmp_path):
    out = tmp_path / "ddp"
    arguments = [
        "--config_file", str(REPO / "recipes" / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2",
        str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" / "smoke.yaml"),
        "--set", f"training.output_dir={out}", "--set", f"training.reference_cache_dir={tmp_path / 'cache'}",
        "--set", "training.num_epochs=2", "--set", "training.per_device_batch_size=4", "--set", "data.num_pairs=236",
    ]
    stdout = launch(arguments, tmp_path / "ddp.log")
    assert "batch: 2 process(es) x micro-batch 4 x accumulation 2 = effective batch 16" in stdout
    assert "find_unused_parameters" not in (tmp_path / "ddp.err").read_text()  # DDP is told every parameter is used
    run_dir = out / "smoke"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [12, 24]  # ceil(189 / 16) optimizer steps per epoch
    # Every pair once per epoch, across both ranks and both micro-batches of each step: the last micro-batch holds one
    # real pair and three that accelerate repeats to even out the ranks.
    assert [r["train"]["pairs"] for r in records] == [189, 189]
    # 47 validation pairs in batches of 32 per process: accelerate pads the last round with 17 repeated pairs, and
    # each real pair must still count once, with the metrics one process computes for the same weights.
    for record in records:
        assert record["val"]["pairs"] == 47
        expected = single_process_validation(run_dir, run_dir / f"epoch-{record['epoch']}")
        for key, value in expected.items():
            assert record["val"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert_logged_eval_metrics_equal_the_record(run_dir / f"epoch-{record['epoch']}", record)


def single_process_validation(run_dir, checkpoint) -> dict[str, float]:
    """A run's validation metrics for one checkpoint, recomputed here in one process from its config and data."""
    scorer = RunScorer(run_dir, checkpoint)
    splits = load_text_splits(scorer.config.data, scorer.config.training.seed, DataReport())
    val = scorer.tokenize(splits.val, "val", DataReport())
    policy = scorer.logps(scorer.policy_model(checkpoint), val)
    reference = scorer.logps(scorer.reference_model(), val)
    losses, chosen, rejected = scorer.loss(*policy, *reference, val)
    return {
        "loss": losses.mean().item(), "accuracy": (chosen > rejected).double().mean().item(),
        "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item(),
    }


def assert_logged_eval_metrics_equal_the_record(checkpoint, record) -> None:
    """What the trackers got (trainer_state.json's log history, as sent to wandb) equals metrics.jsonl exactly."""
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "eval_loss" in entry][-1]
    val = record["val"]
    assert logged["eval_loss"] == pytest.approx(val["loss"], rel=1e-12)
    assert logged["eval_rewards/accuracies"] == pytest.approx(val["accuracy"], rel=1e-12)
    assert logged["eval_rewards/margins"] == pytest.approx(val["margin"], rel=1e-12)
    assert logged["eval_rewards/chosen"] == pytest.approx(val["chosen_reward"], rel=1e-12)
    assert logged["eval_logps/rejected"] == pytest.approx(val["logps_rejected"], rel=1e-12)


def test_eval_steps_max_steps_and_checkpoint_retention(smoke_config):
    """Mid-epoch validation lands in metrics.jsonl; resume state (optimizer) stays in the newest epoch only."""
    config = smoke_config("training.eval_steps=6")
    assert run_training(config) == 0
    run_dir = config.run_dir
    # Steps 12, 24 and 36 end epochs, which validate anyway: no second pass there.
    assert [r["step"] for r in read_metrics(run_dir, "eval")] == [6, 18, 30]
    assert [r["step"] for r in read_metrics(run_dir, "step")] == [6, 12, 18, 24, 30, 36]  # logging_steps 6
    assert all(r["val"]["pairs"] == 48 for r in read_metrics(run_dir, "eval"))
    has_optimizer = [(path / "optimizer.pt").is_file() for path in epoch_dirs(run_dir)]
    assert has_optimizer == [False, False, True]
    assert all((path / "model.safetensors").is_file() for path in epoch_dirs(run_dir))

    # 30 steps are two and a half epochs: the partial third is evaluated and saved as epoch 3.
    short = smoke_config("run_name=short", "training.max_steps=30", "training.keep_epochs=best_and_last")
    assert run_training(short) == 0
    records = read_metrics(short.run_dir)
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 12), (2, 24), (3, 30)]
    best = json.loads((short.run_dir / "best.json").read_text())["checkpoint"]
    assert {path.name for path in epoch_dirs(short.run_dir)} == {best, "epoch-3"}
    assert (short.run_dir / "epoch-3" / "optimizer.pt").is_file()


def test_a_smoke_run_prints_a_few_readable_lines(tmp_path):
    """Non-TTY output: no progress bars, no raw dicts, one line per logging step and per epoch."""
    command = [
        sys.executable, "scripts/train.py", "--config", "configs/smoke.yaml",
        "--set", f"training.output_dir={tmp_path}", "--set", f"training.reference_cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) <= 20, "\n".join(lines)
    assert not [line for line in lines if "it/s]" in line or "%|" in line]  # progress bars
    assert not [line for line in lines if line.lstrip().startswith("{")]  # transformers' raw log dicts
    assert not [line for line in lines if "Warning" in line or "warnings.warn" in line]
    assert sum(line.startswith("step ") for line in lines) == 6 and sum(line.startswith("epoch ") for line in lines) == 3


def test_tensorboard_event_files_hold_the_metrics_jsonl_values(smoke_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = smoke_config("logging.report_to=[jsonl, tensorboard]", "training.num_epochs=2")
    assert run_training(config) == 0
    [events] = (config.run_dir / "tensorboard").glob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()

    def series(tag):
        return {event.step: event.value for event in scalars.Scalars(tag)}

    steps = read_metrics(config.run_dir, "step")
    assert series("train/loss") == pytest.approx({r["step"]: r["train"]["loss"] for r in steps}, rel=1e-6)
    assert series("train/rewards/accuracies") == pytest.approx({r["step"]: r["train"]["accuracy"] for r in steps}, rel=1e-6)
    epochs = read_metrics(config.run_dir)
    assert series("eval/loss") == pytest.approx({r["step"]: r["val"]["loss"] for r in epochs}, rel=1e-6)
    assert series("eval/rewards/margins") == pytest.approx({r["step"]: r["val"]["margin"] for r in epochs}, rel=1e-6)


def test_a_second_run_needs_resume_or_overwrite_and_overwrite_starts_clean(tmp_path, capsys):
    args = ["train", "--config", str(REPO / "configs" / "smoke.yaml"), "--set", f"training.output_dir={tmp_path}",
            "--set", f"training.reference_cache_dir={tmp_path / 'cache'}", "--set", "data.num_pairs=40",
            "--set", "data.num_test_pairs=8", "--set", "training.num_epochs=1"]  # fmt: skip
    run_dir = tmp_path / "smoke"
    assert main(args) == 0
    first_model = (run_dir / "epoch-1" / "model.safetensors").read_bytes()
    (run_dir / "epoch-1" / "eval_old.json").write_text("{}")  # anything the earlier run left
    capsys.readouterr()

    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {REPO / 'configs' / 'smoke.yaml'}: {run_dir} already holds checkpoints: add --resume to continue that "
        "run, or --overwrite to start over"
    )
    assert (run_dir / "epoch-1" / "eval_old.json").exists()  # refused: nothing touched

    assert main([*args, "--overwrite"]) == 0
    assert f"overwrite: removing {run_dir}" in capsys.readouterr().out
    assert not (run_dir / "epoch-1" / "eval_old.json").exists()
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]  # one run's record, not two
    assert (run_dir / "epoch-1" / "model.safetensors").read_bytes() == first_model  # same seed, same result
    # The config key does the same as the flag.
    assert main([*args, "--set", "training.overwrite=true"]) == 0
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]
    # The run's saved config records what was trained, not that this launch started over: used again, it refuses.
    assert "overwrite: false" in (run_dir / "config.yaml").read_text()
    assert main(["train", "--config", str(run_dir / "config.yaml")]) == 2


def test_the_saved_config_names_the_model_that_was_trained(smoke_config):
    from dpo_recipe.config_loader import load_config
    from dpo_recipe.config import describe_model

    config = smoke_config("data.num_pairs=40", "data.num_test_pairs=8", "training.num_epochs=1")
    assert run_training(config) == 0
    saved = config.run_dir / "config.yaml"
    first_line = saved.read_text().splitlines()[0]
    assert first_line == "# model: GPT-2 from config, random init (n_layer=2, n_embd=64, n_head=2)"
    reloaded = load_config(saved)  # still the loadable config that resume and eval read
    assert reloaded.model.name_or_path is None and reloaded.model.tokenizer == "local-bpe"
    assert reloaded.model.tiny == {"n_layer": 2, "n_embd": 64, "n_head": 2}
    assert describe_model(reloaded.model) == first_line.removeprefix("# model: ")


def test_wandb_settings_reach_each_run_alone_and_an_exported_value_wins(monkeypatch):
    """WANDB_MODE and WANDB_PROJECT come from each run's own config while it trains and are put back afterwards: a
    second run in the same process (a sweep, a notebook) does not inherit the first's project. A value the user
    exported is left as it is."""
    from dpo_recipe.config import LoggingConfig
    from dpo_recipe.run import wandb_environment

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "exported")
    seen = []
    for project in ("first", "second"):
        with wandb_environment(LoggingConfig(report_to=["jsonl", "wandb"], wandb_mode="disabled", wandb_project=project)):
            seen.append((os.environ.get("WANDB_MODE"), os.environ["WANDB_PROJECT"]))
        assert "WANDB_MODE" not in os.environ and os.environ["WANDB_PROJECT"] == "exported"
    assert seen == [("disabled", "exported")] * 2
    monkeypatch.delenv("WANDB_PROJECT")
    for project in ("first", "second"):
        with wandb_environment(LoggingConfig(report_to=["wandb"], wandb_project=project)):
            seen.append(os.environ["WANDB_PROJECT"])
        assert "WANDB_PROJECT" not in os.environ
    with wandb_environment(LoggingConfig(report_to=["jsonl"], wandb_project="unused")):
        assert "WANDB_PROJECT" not in os.environ  # no wandb, no variables
    assert seen[2:] == ["first", "second"]
