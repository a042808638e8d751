"""The GPU path, checked on CPU: device defaults, compiled graphs that stop changing, no host reads inside a step, and
a compilation that fails without ending the run."""

from __future__ import annotations

import re

import pytest
import torch
import torch._inductor.config
from transformers import TrainerCallback

import dpo_recipe.packing as packing
import dpo_recipe.run as run_module
from dpo_recipe.rundir import read_metrics
from dpo_recipe.run import dpo_arguments, prepare_run

SMALL_RUN = [
    "data.num_pairs=40", "data.num_test_pairs=4", "data.max_length=64",
    "training.effective_batch_size=8", "training.per_device_batch_size=8",
]


def test_cpu_defaults_keep_the_cpu_path(smoke_config, capsys):
    """`null` settings resolve per device: on CPU, shared prompts, exact widths, no compile, forward batch 32; the
    printed plan says the model is not compiled."""
    config = smoke_config(*SMALL_RUN)
    training = config.training
    assert (training.prompt_sharing, training.length_buckets, training.torch_compile, training.eval_batch_size) == (None,) * 4
    run = prepare_run(config)
    trainer = run.trainer
    assert trainer.data_collator.share_prompt and trainer.data_collator.buckets is None
    assert trainer.data_collator.pad_to_multiple_of == 1
    assert not trainer.args.torch_compile and trainer.args.per_device_eval_batch_size == 32
    assert not trainer.args.logging_nan_inf_filter  # transformers' own filter reads the loss every step
    assert re.search(r"^batch: .*; model compiled: no$", capsys.readouterr().out, re.MULTILINE)


def test_gpu_defaults_are_the_plain_path_except_where_a_gpu_measured_better(smoke_config, monkeypatch):
    """On a GPU `null` means no compilation, no length buckets, exact widths and forward batches of 32, until a GPU run
    measures something faster; only the layout differs from the CPU's: TRL's separate rows, which ran faster on an
    H100."""
    monkeypatch.setattr(packing, "on_gpu", lambda: True)
    config = smoke_config(*SMALL_RUN)
    arguments = dpo_arguments(config, 1, "bf16")
    assert not arguments.torch_compile and arguments.per_device_eval_batch_size == arguments.precompute_ref_batch_size == 32
    pairs = [{"prompt_ids": [1] * n, "chosen_ids": [2] * 3, "rejected_ids": [3] * 5} for n in (9, 20, 31, 47)]
    columns = {key: [pair[key] for pair in pairs] for key in pairs[0]}

    class Columns(dict):  # what make_collator reads of a dataset
        column_names = list(columns)

    collator = packing.make_collator(0, datasets=(Columns(columns),), length_buckets=None, batch_size=2)
    assert (collator.share_prompt, collator.pad_to_multiple_of, collator.buckets) == (False, 1, None)
    assert collator(pairs[:2])["input_ids"].shape == (4, 25)  # exact: the longest row, [prompt 20, rejected 5]


def test_a_training_step_never_reads_a_value_back_to_the_host(smoke_config, monkeypatch):
    """On a GPU every such read waits for the device; the step's statistics are read at the next log or save."""
    trainer = prepare_run(smoke_config(*SMALL_RUN)).trainer
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()

    def host_read(*args, **kwargs):
        raise AssertionError("a host read inside the step")

    with monkeypatch.context() as patch:
        for method in ("tolist", "item", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, method, host_read)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
    assert len(trainer.totals.pending) == 1  # the step's sums, still on the device
    means = trainer.totals.means("log")  # the read
    assert not trainer.totals.pending and means["pairs"] == len(batch["pair_tokens"])
    assert means["loss"] == pytest.approx(loss.item(), rel=1e-6)


class GraphCounter(TrainerCallback):
    """Graphs dynamo has compiled, and the batch widths seen, at the end of each epoch (after its evaluation)."""

    def __init__(self):
        self.graphs: list[int] = []

    def on_save(self, args, state, control, **kwargs):
        from torch._dynamo.utils import counters

        self.graphs.append(counters["stats"]["unique_graphs"])


def compile_with_aot_eager(monkeypatch):
    """Compiled runs use dynamo's aot_eager backend (AOTAutograd without code generation: no C++ compiler needed)."""

    def aot_eager(*args, **kwargs):
        arguments = dpo_arguments(*args, **kwargs)
        arguments.torch_compile_backend = "aot_eager"  # read when the trainer builds its accelerator
        return arguments

    monkeypatch.setattr(run_module, "dpo_arguments", aot_eager)


def test_a_compiled_model_compiles_one_graph_in_the_first_epoch_and_none_after(smoke_config, monkeypatch, tmp_path, capsys):
    """Three epochs of varied lengths in length buckets, with `training.torch_compile`: the shapes are dynamic from
    the first batch, so one graph is compiled in epoch 1 (dynamo's default compiled a static one first, then a
    dynamic one at the second width); epochs 2 and 3, their evaluations included, reuse it. The metrics equal those
    of the same run uncompiled."""
    from torch._dynamo.utils import counters

    compile_with_aot_eager(monkeypatch)
    settings = [*SMALL_RUN, "training.num_epochs=3", "training.length_buckets=3"]
    torch._dynamo.reset()
    counters.clear()
    run = prepare_run(smoke_config(*settings, "training.torch_compile=true"))
    assert run.trainer.args.torch_compile and len(run.trainer.data_collator.buckets.widths) >= 2
    plan = "model compiled: yes (torch.compile, aot_eager, mode default, dynamic shapes)"
    assert re.search(rf"^batch: .*; {re.escape(plan)}$", capsys.readouterr().out, re.MULTILINE)
    counter = GraphCounter()
    run.trainer.add_callback(counter)
    widths = []
    collate = run.trainer.data_collator.__call__
    monkeypatch.setattr(type(run.trainer.data_collator), "__call__", lambda self, examples: widths.append(
        (batch := collate(examples))["input_ids"].shape[1]) or batch)
    run.trainer.train()
    monkeypatch.undo()
    assert len(set(widths)) >= 2  # the lengths did vary
    assert counter.graphs == [1, 1, 1], counter.graphs

    eager, _ = train_and_read_metrics(smoke_config(*settings, f"training.output_dir={tmp_path / 'eager'}"))
    assert len(eager) == 3
    assert_same_training(read_metrics(run.trainer.args.output_dir), eager)


def train_and_read_metrics(config) -> tuple[list[dict], str | None]:
    run = prepare_run(config)
    run.trainer.train()
    return read_metrics(run.trainer.args.output_dir), run.trainer.compile_fallback


def assert_same_training(records: list[dict], reference: list[dict]) -> None:
    assert len(records) == len(reference) > 0
    for mine, theirs in zip(records, reference):
        for split in ("train", "val"):
            for key in ("loss", "accuracy", "margin", "logps_chosen", "logps_rejected", "pairs"):
                assert mine[split][key] == pytest.approx(theirs[split][key], rel=1e-5), (split, key)


def test_a_failed_compilation_leaves_the_run_training_uncompiled(smoke_config, monkeypatch, tmp_path, capsys):
    """Inductor without a working C++ compiler: the first step's compilation fails, one line says so and why, and
    the run trains uncompiled, the failed step included, exactly as a run that never compiled."""
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    # A graph compiled earlier would be read from the caches, needing no compiler.
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    settings = [*SMALL_RUN, "training.num_epochs=1"]
    compiled, fallback = train_and_read_metrics(smoke_config(*settings, "training.torch_compile=true"))
    lines = [line for line in capsys.readouterr().out.splitlines() if "torch.compile" in line and "failed" in line]
    assert lines == [
        "torch.compile failed at optimizer step 1 (InvalidCxxCompiler: No working C++ compiler found in "
        "torch._inductor.config.cpp.cxx: ('/nonexistent/c++',)): this run continues uncompiled"
    ]
    assert fallback.startswith("InvalidCxxCompiler")
    eager, _ = train_and_read_metrics(smoke_config(*settings, f"training.output_dir={tmp_path / 'eager'}"))
    assert_same_training(compiled, eager)


def test_passing_the_recompile_limit_leaves_the_run_training_uncompiled(smoke_config, monkeypatch, tmp_path, capsys):
    """Static shapes (the launcher's ACCELERATE_DYNAMO_USE_DYNAMIC wins over the recipe's dynamic ones) recompile at
    every new width; past the limit dynamo would run that frame eagerly and keep the rest compiled, with a warning.
    Here the whole run goes on uncompiled from that step, one line saying so, and trains as an uncompiled run does."""
    compile_with_aot_eager(monkeypatch)
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_DYNAMIC", "false")
    torch._dynamo.reset()
    settings = [*SMALL_RUN, "training.num_epochs=1"]
    # torch's own patch, not monkeypatch: undoing a setattr on dynamo's config hides the key for every later test.
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled, fallback = train_and_read_metrics(smoke_config(*settings, "training.torch_compile=true"))
    output = capsys.readouterr().out
    assert "mode default, static shapes)" in output
    lines = [line for line in output.splitlines() if "torch.compile" in line and "failed" in line]
    assert len(lines) == 1 and re.fullmatch(
        r"torch\.compile failed at optimizer step [2-9] \(FailOnRecompileLimitHit: .+\): this run continues uncompiled",
        lines[0],
    ), lines
    eager, _ = train_and_read_metrics(smoke_config(*settings, f"training.output_dir={tmp_path / 'eager'}"))
    assert_same_training(compiled, eager)
