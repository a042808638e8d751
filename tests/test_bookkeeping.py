"""Bookkeeping that never lies: every pair counted once per pass, one record per epoch with a `best` that names the
weights it points to, early stopping by epoch-end validations alone, the RPO NLL defined once, what a run says about
itself (run_info.json), and a reference-cache key no upgrade reuses.

Most runs here train the smoke config on 37 train pairs (46 with val_fraction 0.2) in micro-batches of 4 with
gradient accumulation 2: 10 micro-batches an epoch, the last of a single pair, in 5 optimizer steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpo_recipe.cli import main
from dpo_recipe.config_loader import load_config
from dpo_recipe.data import load_text_splits
from dpo_recipe.evaluate import RunScorer
from dpo_recipe.rundir import epoch_dirs, read_metrics
from dpo_recipe.run import prepare_run, run_training
from dpo_recipe.sources import DataReport
from dpo_recipe.totals import RunningTotals

from conftest import SMOKE_CONFIG

TRAIN_PAIRS, VAL_PAIRS = 37, 9
ACCUMULATED = [
    "data.num_pairs=46", "data.num_test_pairs=4", "training.per_device_batch_size=4", "training.effective_batch_size=8",
    "training.num_epochs=2", "training.logging_steps=2",
    # RPO, with validation batches of 4, 4 and 1 pairs: the NLL must be the same per-pair term in all of them as in eval.
    "loss.rpo_alpha=0.5", "training.eval_batch_size=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("bookkeeping")


def _config(workspace, name: str, *extra: str):
    overrides = [f"training.output_dir={workspace / name}", f"training.reference_cache_dir={workspace / 'cache'}"]
    return load_config(SMOKE_CONFIG, [*overrides, *ACCUMULATED, *extra])


@pytest.fixture(scope="module")
def accumulated_run(workspace):
    config = _config(workspace, "uninterrupted")
    assert run_training(config) == 0
    return config.run_dir


def test_every_epoch_record_counts_each_pair_once_under_accumulation(accumulated_run):
    records = read_metrics(accumulated_run)
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 5), (2, 10)]
    # accelerate's gather_for_metrics cut every micro-batch of the last accumulation window to the remainder: 34.
    assert [r["train"]["pairs"] for r in records] == [TRAIN_PAIRS, TRAIN_PAIRS]
    assert [r["val"]["pairs"] for r in records] == [VAL_PAIRS, VAL_PAIRS]


def test_the_rpo_nll_is_one_definition_in_validation_and_eval(accumulated_run):
    """Validation (in batches of 4, 4 and 1) and `eval`'s scorer (over the whole set) give one loss per checkpoint."""
    scorer = RunScorer(accumulated_run, epoch_dirs(accumulated_run)[0])
    splits = load_text_splits(scorer.config.data, scorer.config.training.seed, DataReport())
    val = scorer.tokenize(splits.val, "val", DataReport())
    reference = scorer.logps(scorer.reference_model(), val)
    for record in read_metrics(accumulated_run):
        policy = scorer.logps(scorer.policy_model(accumulated_run / f"epoch-{record['epoch']}"), val)
        losses, _, _ = scorer.loss(*policy, *reference, val)
        assert record["val"]["loss"] == pytest.approx(losses.mean().item(), rel=1e-6)


def test_a_max_steps_run_resumed_keeps_one_record_per_epoch_and_a_true_best(workspace):
    """max_steps=3 saves epoch 1 at step 3; resumed without max_steps, epoch 1 is saved again at step 5. Its record is
    replaced (and still covers all 37 pairs), and best.json and the `best` link describe the weights they name."""
    assert run_training(_config(workspace, "cut", "training.max_steps=3")) == 0
    config = _config(workspace, "cut")
    assert [(r["epoch"], r["step"]) for r in read_metrics(config.run_dir)] == [(1, 3)]
    assert run_training(config, resume=True) == 0

    run_dir = config.run_dir
    records = read_metrics(run_dir)
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 5), (2, 10)]
    # The resumed epoch's means also cover the pairs it trained on before the cut.
    assert [(r["train"]["pairs"], r["val"]["pairs"]) for r in records] == [(TRAIN_PAIRS, VAL_PAIRS)] * 2
    best = json.loads((run_dir / "best.json").read_text())
    lowest = min(records, key=lambda r: r["val"]["loss"])
    assert (best["epoch"], best["step"], best["value"]) == (lowest["epoch"], lowest["step"], lowest["val"]["loss"])
    assert json.loads((run_dir / "best" / "trainer_state.json").read_text())["global_step"] == best["step"]


def test_counting_leaves_out_exactly_the_pairs_accelerate_repeats_to_even_out_processes():
    """Against accelerate's own sharding (even_batches), for several process counts and remainders: each gathered
    step is the processes' batches in order, and counting per pass keeps every pair once and no repeat."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    for processes, pairs, batch_size in [(2, 37, 4), (3, 10, 4), (2, 3, 4), (4, 16, 4), (3, 50, 8)]:
        order = torch.randperm(pairs, generator=torch.Generator().manual_seed(pairs)).tolist()
        shards = [
            list(BatchSamplerShard(BatchSampler(order, batch_size, drop_last=False), processes, rank, even_batches=True))
            for rank in range(processes)
        ]
        totals = RunningTotals()
        totals.reset("train", pairs)
        counted = []
        for step in zip(*shards):
            gathered = [index for batch in step for index in batch]
            counted += gathered[: totals.real_pairs("train", len(gathered))]
        assert len(sum(shards[0], [])) * processes > pairs or pairs % (processes * batch_size) == 0  # repeats exist
        assert sorted(counted) == list(range(pairs)), (processes, pairs, batch_size)


def test_early_stopping_compares_epoch_ends_only_and_says_how_it_ended(workspace, capsys):
    """At this learning rate a validation inside epoch 1 beats epoch 1's end. transformers' best_metric took it, and
    with training.eval_steps=3 the run stopped after epoch 1; without, after epoch 3. Now both stop alike."""
    stopping = ["training.learning_rate=3e-4", "training.num_epochs=6", "training.early_stopping_patience=1"]
    smoke = [f"training.reference_cache_dir={workspace / 'cache'}", *stopping]
    plain = load_config(SMOKE_CONFIG, [f"training.output_dir={workspace / 'plain'}", *smoke])
    stepped = load_config(SMOKE_CONFIG, [f"training.output_dir={workspace / 'stepped'}", *smoke, "training.eval_steps=3"])
    assert run_training(stepped) == 0
    capsys.readouterr()
    assert run_training(plain) == 0
    out = capsys.readouterr().out

    epochs = read_metrics(plain.run_dir)
    assert [r["epoch"] for r in read_metrics(stepped.run_dir)] == [r["epoch"] for r in epochs]
    assert len(epochs) < 6  # it did stop early
    best = json.loads((plain.run_dir / "best.json").read_text())
    assert json.loads((stepped.run_dir / "best.json").read_text())["epoch"] == best["epoch"]
    assert epochs[-1]["epoch"] - best["epoch"] == 1  # patience 1
    # The case that misled it: some validation inside an epoch did better than that epoch's end.
    ends = {r["epoch"]: r["val"]["loss"] for r in read_metrics(stepped.run_dir)}
    inside = read_metrics(stepped.run_dir, "eval")
    assert any(r["val"]["loss"] < ends[math.ceil(r["epoch"])] for r in inside)
    # Validating more often changes nothing about training: evaluation leaves torch's random generator alone.
    assert ends == {r["epoch"]: r["val"]["loss"] for r in epochs}

    stopped = {"epoch": epochs[-1]["epoch"], "best_epoch": best["epoch"], "metric": "val_loss", "patience": 1, "num_epochs": 6}
    assert json.loads((plain.run_dir / "run_info.json").read_text())["early_stopped"] == stopped
    line = (f"early stopping after epoch {stopped['epoch']}: val_loss has not improved on epoch {best['epoch']} for 1 "
            f"epoch (patience 1); best epoch {best['epoch']}")  # fmt: skip
    assert out.splitlines().count(line) == 1
    assert out.index(f"epoch {stopped['epoch']}: train loss") < out.index(line)  # after the stopped epoch's line

    # --resume of the stopped run: one line, exit 0, nothing trained (its patience count had already been reached).
    arguments = ["train", "--config", str(SMOKE_CONFIG), *(a for s in [f"training.output_dir={workspace / 'plain'}", *smoke]
                                                           for a in ("--set", s))]  # fmt: skip
    sessions = len(json.loads((plain.run_dir / "run_info.json").read_text())["sessions"])
    assert main([*arguments, "--resume"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        f"nothing to resume: {line}. Raise training.num_epochs (was 6) or training.early_stopping_patience (was 1) to train on"
    ]
    assert read_metrics(plain.run_dir) == epochs
    assert len(json.loads((plain.run_dir / "run_info.json").read_text())["sessions"]) == sessions

    # More epochs than the run was given: it trains on, counting on from the epochs before. The next epoch does not
    # beat the best either (measured: 0.518 against 0.497 in a 6-epoch run), so it stops after that one.
    assert main([*arguments, "--set", "training.num_epochs=7", "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics(plain.run_dir)] == list(range(1, stopped["epoch"] + 2))
    info = json.loads((plain.run_dir / "run_info.json").read_text())
    assert info["early_stopped"] == {**stopped, "epoch": stopped["epoch"] + 1, "num_epochs": 7}
    assert len(info["sessions"]) == sessions + 1


def test_lora_dropout_is_applied_as_configured_and_the_model_dropout_stays_off(smoke_config, tmp_path):
    config = smoke_config("model.lora.r=4", "model.lora.dropout=0.3", "data.num_pairs=40", "data.num_test_pairs=4")
    trainer = prepare_run(config).trainer
    adapter = [m for name, m in trainer.model.named_modules() if ".lora_dropout." in name and isinstance(m, torch.nn.Dropout)]
    others = [m for name, m in trainer.model.named_modules() if ".lora_dropout." not in name and isinstance(m, torch.nn.Dropout)]
    assert adapter and all(m.p == 0.3 for m in adapter)
    assert others and all(m.p == 0 for m in others)  # TRL's disable_dropout, for the model itself
    trainer.save_model(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["lora_dropout"] == 0.3


@pytest.fixture
def llama_dir(tmp_path, tiny_llama, tokenizer):
    tiny_llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_lora_targets_that_match_nothing_stop_before_the_run_directory(tmp_path, llama_dir, capsys):
    """GPT-2's targets on a Llama-style model: one line naming the key and the layers there are, exit 2."""
    arguments = ["train", "--config", str(SMOKE_CONFIG)] + [
        a for s in [f"training.output_dir={tmp_path / 'checkpoints'}", f"training.reference_cache_dir={tmp_path / 'cache'}",
                    "model.tiny=null", f"model.name_or_path={llama_dir}", "model.tokenizer=null", "model.lora.r=4",
                    "model.lora.target_modules=[c_attn, c_proj]", "data.num_pairs=40", "data.num_test_pairs=4"]
        for a in ("--set", s)
    ]  # fmt: skip
    layers = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    assert main(arguments) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --set model.lora.target_modules=[c_attn, c_proj]: model.lora.target_modules c_attn, c_proj match no "
        "module of this model; its linear "
        f"layers are {layers}"
    ]
    # One of several that matches nothing is named too (PEFT would only warn and leave it out).
    assert main([*arguments, "--set", "model.lora.target_modules=[q_proj, qkv_proj]"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --set model.lora.target_modules=[q_proj, qkv_proj]: model.lora.target_modules qkv_proj matches no "
        f"module of this model; its linear layers are {layers}"
    ]
    assert not (tmp_path / "checkpoints").exists()


def test_the_reference_cache_key_changes_with_torch_transformers_and_trl(monkeypatch, tmp_path):
    import transformers
    import trl
    from datasets import Dataset

    from dpo_recipe.reference import cache_path

    dataset = Dataset.from_dict({"prompt_ids": [[1, 2, 3]], "chosen_ids": [[4, 5]], "rejected_ids": [[6]]})

    def key() -> str:
        return cache_path(tmp_path, "model", dataset, "fp32", "shared_prompt").name

    keys = {key()}
    for module in (torch, transformers, trl):
        monkeypatch.setattr(module, "__version__", module.__version__ + ".post1")
        keys.add(key())
    assert len(keys) == 4  # each upgrade alone makes a new key
