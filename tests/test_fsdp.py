"""FSDP2 through the recipe on 2 CPU processes over gloo (`recipes/accelerate_configs/fsdp_cpu.yaml`).

One uninterrupted FSDP run and one single-process run of the same small config are compared: sharding, losses,
weights, the reference cache, and an epoch checkpoint in `eval`. A second FSDP run is killed inside epoch 2 and resumed.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dpo_recipe.config import ConfigError
from dpo_recipe.config_loader import load_config
from dpo_recipe.evaluate import evaluate_paths
from dpo_recipe.rundir import epoch_dirs, read_metrics
from dpo_recipe.run import prepare_run, run_training

from conftest import REPO, SMOKE_CONFIG, launch, start_launch, stop_launch

TOLERANCE = 1e-5
# 32 train / 8 val pairs: 4 optimizer steps of 8 pairs per epoch (4 per rank), val in whole batches of 4 per rank.
# Random (not length-grouped) batches: HF groups by length within the per-device batch, which differs between one
# process (8) and two (4), so only random batches give both runs the same pairs at each step.
SMALL_RUN = [
    "data.num_pairs=40", "data.val_fraction=0.2", "data.num_test_pairs=8", "data.max_length=64",
    "training.effective_batch_size=8", "training.per_device_batch_size=8", "training.eval_batch_size=4",
    "training.num_epochs=2", "training.group_by_length=false", "training.logging_steps=1",
]
TIMING_KEYS = {"tokens_per_s", "pairs_per_s"}

# The loss every FSDP run imports through `loss.type`: exactly dpo_loss, except that once epoch 1 is committed each
# rank reports its process id (gate-reached-<pid>) and holds inside the first step of epoch 2, so the test can kill
# both ranks there without timing anything. Without GATE_RUN_DIR (the resumed run, which keeps its loss.type as any
# resumed run must) it is dpo_loss throughout.
GATE_MODULE = '''
import os
import time
from pathlib import Path

from dpo_recipe.loss import dpo_loss


def hold_after_epoch_1(*args):
    run_dir = os.environ.get("GATE_RUN_DIR")
    if run_dir and (Path(run_dir) / "epoch-1").is_dir():
        (Path(run_dir).parent / f"gate-reached-{os.getpid()}").touch()
        launcher = os.getppid()
        while os.getppid() == launcher:  # a rank whose launcher is gone (a failed test) must not hold forever
            time.sleep(0.05)
        os._exit(1)
    return dpo_loss(*args)
'''


def _overrides(workspace: Path, name: str, cache: str, *extra: str) -> list[str]:
    return [f"training.output_dir={workspace / name}", f"training.reference_cache_dir={workspace / cache}", *SMALL_RUN, *extra]


def _arguments(workspace: Path, name: str, gated: bool = False, resume: bool = False) -> list[str]:
    """`accelerate launch` arguments: scripts/train.py with the CPU FSDP config."""
    overrides = _overrides(workspace, name, "cache_fsdp", *(["loss.type=gate_loss:hold_after_epoch_1"] if gated or resume else []))
    return [
        "--config_file", str(REPO / "recipes" / "accelerate_configs" / "fsdp_cpu.yaml"),
        str(REPO / "scripts" / "train.py"), "--config", str(SMOKE_CONFIG),
        *(arg for override in overrides for arg in ("--set", override)), *(["--resume"] if resume else []),
    ]


def _gate_env(workspace: Path, name: str, gated: bool = True) -> dict:
    """The gate's module on the path; GATE_RUN_DIR only for the gated run (its resumption passes straight through)."""
    modules = {"PYTHONPATH": os.pathsep.join([str(workspace / "modules"), os.environ.get("PYTHONPATH", "")])}
    return {**modules, "GATE_RUN_DIR": str(workspace / name / "smoke")} if gated else modules


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("fsdp")
    (workspace / "modules").mkdir()
    (workspace / "modules" / "gate_loss.py").write_text(GATE_MODULE)
    stdout = launch(_arguments(workspace, "fsdp"), workspace / "fsdp.log")
    single = load_config(SMOKE_CONFIG, _overrides(workspace, "single", "cache_single"))
    assert run_training(single) == 0
    # What the two trainings cached, listed now: later tests (eval, a resumed run) add entries of their own.
    cached = {name: sorted(path.name for path in (workspace / name).iterdir() if path.is_file()) for name in ("cache_fsdp", "cache_single")}
    return {"workspace": workspace, "stdout": stdout, "fsdp": workspace / "fsdp" / "smoke", "single": single.run_dir,
            "cached": cached}  # fmt: skip


def _logged_steps(run_dir: Path) -> list[dict]:
    return [record["train"] for record in read_metrics(run_dir, kind="step")]


def assert_same_weights(checkpoint: Path, expected: Path) -> None:
    ours, theirs = load_file(checkpoint / "model.safetensors"), load_file(expected / "model.safetensors")
    assert ours.keys() == theirs.keys()
    worst = max((ours[name] - theirs[name]).abs().max().item() for name in ours)
    assert worst <= TOLERANCE, f"{checkpoint} differs from {expected} by {worst:g}"


def assert_same_metrics(run_dir: Path, expected_dir: Path) -> None:
    ours, theirs = read_metrics(run_dir), read_metrics(expected_dir)
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in theirs] == [1, 2]
    for mine, reference in zip(ours, theirs):
        assert mine["step"] == reference["step"]
        for split in ("train", "val"):
            for key, value in reference[split].items():
                if key not in TIMING_KEYS:
                    assert math.isclose(mine[split][key], value, rel_tol=TOLERANCE, abs_tol=TOLERANCE), (
                        f"epoch {mine['epoch']} {split} {key}: {mine[split][key]!r} != {value!r}"
                    )


def test_fsdp_shards_the_parameters_and_says_so(runs):
    stdout = runs["stdout"]
    assert "batch: 2 process(es) x micro-batch 4 x accumulation 1 = effective batch 8; precision fp32; " \
           "FSDP2 over 2 processes, parameters sharded" in stdout
    held = {int(rank): (int(local), int(total)) for rank, local, total in
            re.findall(r"rank (\d): holds (\d+) of (\d+) parameter values", stdout)}
    assert sorted(held) == [0, 1], stdout[-2000:]
    totals = {total for _, total in held.values()}
    assert len(totals) == 1 and all(0 < local < total for local, total in held.values())
    assert sum(local for local, _ in held.values()) == totals.pop()  # every value held once, by one rank


def test_fsdp_trains_like_one_process(runs):
    fsdp, single = runs["fsdp"], runs["single"]
    ours, theirs = _logged_steps(fsdp), _logged_steps(single)
    assert len(ours) == len(theirs) == 8  # every optimizer step of both epochs
    assert ours[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference at the first step
    for step, (mine, reference) in enumerate(zip(ours, theirs), 1):
        for key in ("loss", "grad_norm", "accuracy", "margin"):
            assert math.isclose(mine[key], reference[key], rel_tol=TOLERANCE, abs_tol=TOLERANCE), (
                f"step {step} {key}: {mine[key]} != {reference[key]}"
            )
    assert_same_metrics(fsdp, single)
    # The epoch checkpoints are whole HF models, gathered from the shards, equal to the one-process weights.
    for checkpoint in epoch_dirs(fsdp):
        assert_same_weights(checkpoint, single / checkpoint.name)
    # The shards and optimizer state, which only --resume reads, are kept in the newest epoch alone.
    resume_state = {"pytorch_model_fsdp_0", "optimizer_0"}
    assert resume_state <= {path.name for path in (fsdp / "epoch-2").iterdir()}
    assert not resume_state & {path.name for path in (fsdp / "epoch-1").iterdir()}


def test_fsdp_reference_cache_is_written_once_with_the_one_process_values(runs):
    workspace = runs["workspace"]
    assert "reference log-probs: train computed, eval computed" in runs["stdout"]
    # The cache directory also holds the shared local tokenizers (`tokenizers/`); the log-probs are the files.
    written = runs["cached"]["cache_fsdp"]
    # One file per split, under the same keys (weights, token ids, precision) as the single process computed.
    assert written == runs["cached"]["cache_single"]
    assert len(written) == 2 and all(name.endswith(".safetensors") for name in written)
    for name in written:
        ours, theirs = load_file(workspace / "cache_fsdp" / name), load_file(workspace / "cache_single" / name)
        for side in ("chosen", "rejected"):
            assert not ours[side].isnan().any()
            assert (ours[side] - theirs[side]).abs().max().item() <= 1e-9


def test_an_fsdp_epoch_checkpoint_loads_in_eval(runs):
    (ours,) = evaluate_paths([runs["fsdp"] / "epoch-1"], bootstrap_samples=10)
    (theirs,) = evaluate_paths([runs["single"] / "epoch-1"], bootstrap_samples=10)
    assert ours["pairs"] == theirs["pairs"] == 8
    for key in ("loss", "chosen_reward", "rejected_reward", "accuracy", "logps_chosen", "logps_rejected"):
        assert math.isclose(ours[key], theirs[key], rel_tol=TOLERANCE, abs_tol=TOLERANCE), key


def test_fsdp_kill_during_epoch_2_then_resume_matches_the_uninterrupted_run(runs):
    workspace, name = runs["workspace"], "killed"
    launcher = start_launch(_arguments(workspace, name, gated=True), workspace / f"{name}.log", _gate_env(workspace, name))
    try:
        while len(list(workspace.glob(f"{name}/gate-reached-*"))) < 2:
            try:
                launcher.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"the run ended too early:\n{(workspace / f'{name}.err').read_text()[-3000:]}")
        for reached in workspace.glob(f"{name}/gate-reached-*"):  # both ranks die at once, as with a lost machine
            os.kill(int(reached.name.rsplit("-", 1)[1]), signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
    finally:
        stop_launch(launcher)
    run_dir = workspace / name / "smoke"
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1"]

    stdout = launch(_arguments(workspace, name, resume=True), workspace / f"{name}-resumed.log", _gate_env(workspace, name, gated=False))
    assert "reference log-probs: train reused, eval reused" in stdout
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1", "epoch-2"]
    assert_same_weights(run_dir / "epoch-2", runs["fsdp"] / "epoch-2")
    assert_same_metrics(run_dir, runs["fsdp"])


def test_lora_under_fsdp_is_a_one_line_config_error(smoke_config, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="model.lora is not supported under FSDP"):
        prepare_run(smoke_config("model.lora.r=4"))
