"""The benchmark compares like with like: the same losses step by step, and a fair pick among repeated runs."""

from __future__ import annotations

import dataclasses

import pytest

from dpo_recipe.benchmark import BenchSettings, Job, RunResult, agreement_check, fastest, load_bench_data, run_job, summary_table


@pytest.fixture(scope="module")
def bench_setup():
    settings = BenchSettings(train_pairs=48, eval_pairs=16, epochs=1, tokenizer_vocab_size=512, output=None)
    return settings, load_bench_data(settings)


def test_ours_and_plain_trl_train_the_same_thing(bench_setup):
    settings, data = bench_setup
    ours = run_job(Job("ours", group_by_length=False, max_steps=3, logging_steps=1), settings, data)
    trl = run_job(Job("trl", max_steps=3, logging_steps=1), settings, data)
    lines, agreed = agreement_check(ours, trl, "fp32")
    assert agreed, "\n".join(lines)
    assert len(ours.losses) == 3 and ours.losses[1] != ours.losses[0]  # training moved the loss
    # Same pairs and steps, fewer positions: the prompt once per pair and less padding.
    assert ours.pairs == trl.pairs == 3 * settings.batch_size
    assert ours.data_tokens == trl.data_tokens
    assert ours.epoch_positions < trl.epoch_positions


def result(seconds: float, eval_seconds: float | None, peak_memory: int) -> RunResult:
    return RunResult(
        seconds=seconds, steps=4, pairs=64, data_tokens=6400, epoch_tokens=3200, epoch_positions=4000,
        epoch_pairs=64, reference_tokens=3200, parameters=10, peak_memory=peak_memory, eval_seconds=eval_seconds,
        eval_pairs=32,
    )


def test_repeated_runs_report_the_fastest_and_list_every_run():
    ours = fastest([result(12.0, 2.0, 100), result(10.0, 3.0, 300)])
    assert (ours.seconds, ours.eval_seconds, ours.peak_memory) == (10.0, 2.0, 300)
    trl = fastest([result(40.0, 8.0, 500), result(45.0, 6.0, 400)])
    table = "\n".join(summary_table({"ours": ours, "trl": trl}, BenchSettings(repeats=2)))
    assert "| trl | 4.00x | 0.60x | 3.00x |" in table  # 40/10 training, 300/500 memory, 6/2 evaluation
    assert "ours 12.0, 10.0 s; trl 40.0, 45.0 s" in table


def test_a_variant_runs_ours_with_its_settings_on_top(bench_setup):
    """`--variant ours_buckets:length_buckets=2` (how gpu_check.sh measures ours compiled, or with buckets): the
    recipe's trainer (plain TRL scores no slots), with the variant's settings: length buckets, which pad the LM head's
    scored-position slots (without them, slots and scored positions are equal)."""
    settings, data = bench_setup
    settings = dataclasses.replace(settings, variants={"ours_buckets": {"length_buckets": 2}})
    bucketed = run_job(Job("ours_buckets", max_steps=1, settings={"length_buckets": 2}), settings, data)
    assert bucketed.epoch_scored_slots > bucketed.epoch_scored > 0
