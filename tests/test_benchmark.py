"""The benchmark compares like with like: the same losses step by step, and a fair pick among repeated runs."""

from __future__ import annotations

import dataclasses

import pytest

from dpo_recipe.bench_report import agreement_check, fastest, summary_table
from dpo_recipe.benchmark import BenchSettings, Job, RunResult, load_bench_data, run_job


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


def test_each_benchmark_rewrites_only_its_own_sections_of_the_results_file(tmp_path):
    """`make bench` used to write the whole of benchmarks/results.md, erasing the memory and data-preparation
    sections that take the other benchmarks 20-45 minutes to measure; a section it has nothing for this time (no run
    failed) goes."""
    from types import SimpleNamespace

    from dpo_recipe.bench_memory_report import RESULTS_HEADING as MEMORY
    from dpo_recipe.bench_report import write_results
    from dpo_recipe.results_file import replace_section

    path = tmp_path / "results.md"
    path.write_text(f"# Stale title\n\nstale setup\n\n## Results\n\nstale table\n\n## Runs that failed\n\n- stale\n\n{MEMORY}\n\nmemory table\n")
    replace_section(path, "## Data preparation", ["data table"])
    data = SimpleNamespace(description="pairs", tokenizer=[0] * 512)
    stats = {"median_prompt": 10, "median_response": 20.0, "shared_saving": 0.3}
    for _ in range(2):  # a second run replaces the first's sections instead of adding to them
        write_results(path, BenchSettings(), {"cpu": "test"}, data, stats, "fp32", "cpu", ["| new table |"], ["| steps |"])
    text = path.read_text()
    assert text.startswith("# Benchmark: RecipeDPOTrainer vs plain trl.DPOTrainer\n") and "stale" not in text.lower()
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## Results", MEMORY, "## Data preparation", "## Loss agreement",
    ]  # fmt: skip
    for kept in ("| new table |", "memory table", "data table", "| steps |"):
        assert text.count(kept) == 1
