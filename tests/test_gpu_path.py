"""The GPU path, checked on CPU: device defaults, compiled graphs that stop changing, no host reads inside a step."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

import dpo_recipe.run as run_module
from dpo_recipe.rundir import read_metrics
from dpo_recipe.run import prepare_run

SMALL_RUN = [
    "data.num_pairs=40", "data.num_test_pairs=4", "data.max_length=64",
    "training.effective_batch_size=8", "training.per_device_batch_size=8",
]


def test_cpu_defaults_keep_the_cpu_path(smoke_config):
    """`null` settings resolve per device: on CPU, shared prompts, exact widths, no compile, forward batch 32."""
    config = smoke_config(*SMALL_RUN)
    training = config.training
    assert (training.prompt_sharing, training.length_buckets, training.torch_compile, training.eval_batch_size) == (None,) * 4
    run = prepare_run(config)
    trainer = run.trainer
    assert trainer.data_collator.share_prompt and trainer.data_collator.buckets is None
    assert not trainer.args.torch_compile and trainer.args.per_device_eval_batch_size == 32
    assert not trainer.args.logging_nan_inf_filter  # transformers' own filter reads the loss every step


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


def test_a_compiled_model_compiles_no_new_graph_after_the_first_epoch(smoke_config, monkeypatch, tmp_path):
    """Three epochs of varied lengths in length buckets, with `training.torch_compile` (aot_eager: no C++ compiler
    needed): every graph is compiled in epoch 1; epochs 2 and 3, their evaluations included, reuse them. The
    metrics equal those of the same run uncompiled."""
    from torch._dynamo.utils import counters

    def aot_eager(*args, **kwargs):
        arguments = dpo_arguments(*args, **kwargs)
        arguments.torch_compile_backend = "aot_eager"  # read when the trainer builds its accelerator
        return arguments

    dpo_arguments = run_module.dpo_arguments
    monkeypatch.setattr(run_module, "dpo_arguments", aot_eager)
    settings = [*SMALL_RUN, "training.num_epochs=3", "training.length_buckets=3"]
    torch._dynamo.reset()
    counters.clear()
    run = prepare_run(smoke_config(*settings, "training.torch_compile=true"))
    assert run.trainer.args.torch_compile and len(run.trainer.data_collator.buckets.widths) >= 2
    counter = GraphCounter()
    run.trainer.add_callback(counter)
    widths = []
    collate = run.trainer.data_collator.__call__
    monkeypatch.setattr(type(run.trainer.data_collator), "__call__", lambda self, examples: widths.append(
        (batch := collate(examples))["input_ids"].shape[1]) or batch)
    run.trainer.train()
    monkeypatch.undo()
    assert len(set(widths)) >= 2  # the lengths did vary
    assert counter.graphs[0] > 0 and counter.graphs == [counter.graphs[0]] * 3, counter.graphs

    eager = prepare_run(smoke_config(*settings, f"training.output_dir={tmp_path / 'eager'}"))
    eager.trainer.train()
    compiled_records, eager_records = read_metrics(run.trainer.args.output_dir), read_metrics(eager.trainer.args.output_dir)
    assert len(compiled_records) == len(eager_records) == 3
    for mine, reference in zip(compiled_records, eager_records):
        for split in ("train", "val"):
            assert mine[split]["loss"] == pytest.approx(reference[split]["loss"], rel=1e-5)
