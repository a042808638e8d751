"""Evaluation, ranking and generation on a smoke run trained once for this module (tiny GPT-2, synthetic pairs)."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_recipe import evaluate
from dpo_recipe.cli import main
from dpo_recipe.config_loader import load_config
from dpo_recipe.data import load_text_splits
from dpo_recipe.sources import DataError, DataReport
from dpo_recipe.evaluate import (
    RunEvaluator,
    RunScorer,
    bootstrap_ci,
    dataset_name,
    evaluate_paths,
    find_checkpoints,
    preference_metrics,
    rank_responses,
    read_rank_triples,
)
from dpo_recipe.generate import SamplingSettings, write_generations
from dpo_recipe.models import build_model, model_fingerprint
from dpo_recipe.packing import PairCollator
from dpo_recipe.rundir import eval_file_name, reference_dir
from dpo_recipe.synthetic import synthetic_rows
from dpo_recipe.run import run_training

from conftest import write_jsonl

SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
NUM_TEST_PAIRS = 24  # half the smoke default: every evaluation below is a forward pass over them
METRIC_KEYS = {
    "loss", "chosen_reward", "rejected_reward", "reward_margin", "accuracy", "ties", "wins_count", "ties_count",
    "logps_chosen", "logps_rejected", "accuracy_ci95", "reward_margin_ci95", "pairs", "bootstrap",
}  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 2-epoch smoke run (about 8 s on 2 idle CPU cores), shared by the tests below."""
    root = tmp_path_factory.mktemp("eval")
    config = load_config(
        SMOKE_CONFIG,
        [f"training.output_dir={root / 'checkpoints'}", f"training.reference_cache_dir={root / 'ref_cache'}",
         "training.num_epochs=2", f"data.num_test_pairs={NUM_TEST_PAIRS}"],
    )  # fmt: skip
    assert run_training(config) == 0
    return config.run_dir


def test_accuracy_counts_ties_apart_on_a_hand_made_batch():
    chosen = torch.tensor([1.0, 0.5, -0.2, 0.0, 0.3])
    rejected = torch.tensor([0.0, 0.5, 0.1, 0.0, -0.3])
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    metrics = preference_metrics(losses, chosen, rejected, torch.tensor([-10.0, -20.0] * 2 + [-30.0]), torch.full((5,), -4.0))
    # wins: pairs 0 and 4; ties: pairs 1 and 3; pair 2 prefers the rejected response.
    assert metrics["wins_count"] == 2 and metrics["ties_count"] == 2 and metrics["pairs"] == 5
    assert metrics["accuracy"] == pytest.approx(0.4, abs=1e-12)
    assert metrics["ties"] == pytest.approx(0.4, abs=1e-12)
    assert metrics["reward_margin"] == pytest.approx((1.0 + 0 - 0.3 + 0 + 0.6) / 5, abs=1e-7)
    assert metrics["chosen_reward"] == pytest.approx(1.6 / 5, abs=1e-7)
    assert metrics["rejected_reward"] == pytest.approx(0.3 / 5, abs=1e-7)
    assert metrics["loss"] == pytest.approx(0.3, abs=1e-7)
    assert metrics["logps_chosen"] == pytest.approx(-18.0) and metrics["logps_rejected"] == pytest.approx(-4.0)
    low, high = metrics["accuracy_ci95"]
    assert 0.0 <= low <= 0.4 <= high <= 1.0 and low < high


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = torch.arange(50, dtype=torch.float64)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    low, high = bootstrap_ci(values)
    # Standard error of the mean of 0..49 is about 2.0, so the 95% interval is about 24.5 ± 4.
    assert 19.5 < low < 24.5 < high < 29.5
    assert bootstrap_ci(torch.full((7,), 2.5)) == pytest.approx((2.5, 2.5))


def test_eval_writes_json_with_every_metric_and_prints_a_table(trained_run, capsys):
    assert main(["eval", str(trained_run)]) == 0
    out = capsys.readouterr().out
    best = json.loads((trained_run / "best.json").read_text())["checkpoint"]
    assert "accuracy [95% CI]" in out and f"{best} (best)" in out
    result = json.loads((trained_run / best / "eval_test.json").read_text())
    assert METRIC_KEYS <= result.keys()
    assert result["pairs"] == NUM_TEST_PAIRS and result["is_best"] and result["dataset"] == "test"
    assert result["reward_margin"] == pytest.approx(result["chosen_reward"] - result["rejected_reward"], abs=1e-9)
    assert result["wins_count"] / result["pairs"] == pytest.approx(result["accuracy"])
    assert result["accuracy"] + result["ties"] <= 1.0
    for metric in ("accuracy", "reward_margin"):
        low, high = result[f"{metric}_ci95"]
        assert low <= result[metric] <= high
    # The table row shows the same numbers as the JSON.
    assert f"{result['loss']:.4f}" in out and f"{result['accuracy']:.3f} [{result['accuracy_ci95'][0]:.3f}" in out


def test_initial_model_scores_log2_loss_and_ties_everywhere(trained_run):
    # Evaluating the reference against itself: every reward is exactly 0, so loss = log 2 and every pair ties.
    (result,) = evaluate_paths([reference_dir(trained_run)])
    assert result["ties"] == 1.0 and result["accuracy"] == 0.0
    assert result["chosen_reward"] == 0.0 and result["reward_margin_ci95"] == [0.0, 0.0]
    assert result["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)


def test_reference_logps_are_cached_once_and_equal_a_fresh_pass(trained_run, monkeypatch):
    calls = []
    real = evaluate.dataset_pair_logps

    def counting(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "dataset_pair_logps", counting)
    epochs = find_checkpoints(trained_run, all_epochs=True)
    assert [p.name for p in epochs] == ["epoch-1", "epoch-2"]

    evaluator = RunEvaluator(trained_run, epochs[0])
    *_, cache, _ = evaluator.scorer.cached_reference_logps(evaluator.dataset)
    cache.unlink()  # start from a cold cache, whatever ran before
    calls.clear()
    cold = evaluate_paths([trained_run], all_epochs=True)
    assert len(calls) == len(epochs) + 1  # one reference pass for all epochs
    assert [r["reference_cache"]["hit"] for r in cold] == [False, True]
    written = cache.stat().st_mtime_ns

    calls.clear()
    warm = evaluate_paths([trained_run], all_epochs=True)
    assert len(calls) == len(epochs)  # policy passes only: no reference forward at all
    assert all(r["reference_cache"]["hit"] for r in warm)
    assert cache.stat().st_mtime_ns == written
    assert [r["loss"] for r in warm] == [r["loss"] for r in cold]

    assert Path(warm[0]["reference_cache"]["file"]) == cache
    # The cached values equal a fresh reference pass, and the cache key is the trainer's: val was cached in training.
    config, tokenizer = evaluator.scorer.config, evaluator.scorer.tokenizer
    reference = build_model(config.model, tokenizer, 0, config.data.max_length, source=str(reference_dir(trained_run)))
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(reference)
    cached = load_file(cache)
    scorer = evaluator.scorer
    reference.to(scorer.device)
    fresh_chosen, fresh_rejected = real(
        reference, evaluator.dataset, PairCollator(tokenizer.pad_token_id), 32, scorer.device, scorer.autocast
    )
    assert torch.allclose(cached["chosen"], fresh_chosen, rtol=0, atol=1e-6)
    assert torch.allclose(cached["rejected"], fresh_rejected, rtol=0, atol=1e-6)
    if scorer.precision == "fp32":
        # An independent layout (two rows per pair, other batch size) agrees to float32 rounding of ~300-nat sums.
        collator = PairCollator(tokenizer.pad_token_id, share_prompt=False)
        separate = real(reference, evaluator.dataset, collator, 5, scorer.device)
        assert torch.allclose(cached["chosen"], separate[0], rtol=1e-5, atol=1e-4)

    splits = load_text_splits(config.data, config.training.seed, DataReport())
    val = evaluator.scorer.tokenize(splits.val, "val", DataReport())
    *_, hit = evaluator.scorer.cached_reference_logps(val)
    assert hit


def test_a_reference_pass_leaves_the_global_rng_alone(trained_run):
    # Otherwise a run whose reference log-probs come from the cache would train differently from one computing them.
    evaluator = RunEvaluator(trained_run, trained_run / "best")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    evaluator.scorer.logps(evaluator.scorer.reference_model(), evaluator.dataset)
    assert torch.equal(torch.rand(3), expected)


def test_checkpoint_paths_resolve_best_epochs_and_run_directories(trained_run):
    best = json.loads((trained_run / "best.json").read_text())["checkpoint"]
    assert find_checkpoints(trained_run) == [(trained_run / best).resolve()]
    assert find_checkpoints(trained_run / "best") == [(trained_run / best).resolve()]
    assert find_checkpoints(trained_run.parent) == [(trained_run / best).resolve()]


def test_eval_on_a_dataset_from_the_command_line_counts_dropped_rows(trained_run, tmp_path, capsys):
    rows = list(synthetic_rows("test", 6, seed=7)) + [{"chosen": "no marker", "rejected": "at all"}]
    data = tmp_path / "extra.jsonl.gz"
    with gzip.open(data, "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    assert main(["eval", str(trained_run / "best"), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    name = dataset_name(str(data))
    assert "dropped     1  no_assistant_marker" in out and f"| {name} " in out
    result = json.loads((trained_run / "best" / eval_file_name(name)).read_text())
    assert result["pairs"] == 6 and result["dataset"] == name and name.startswith("extra.jsonl.gz-")
    assert result["dropped"] == {str(data): {"no_assistant_marker": 1}}


def test_eval_results_of_different_datasets_never_share_a_file(trained_run, tmp_path):
    """conv.jsonl and conv.parquet, two conv.jsonl in different folders, and a file called test.jsonl (which must not
    replace the run's own eval_test.json) each get their own result file."""
    from datasets import Dataset

    rows = synthetic_rows("test", 6, seed=7)
    (tmp_path / "other").mkdir()
    parquet = tmp_path / "conv.parquet"
    Dataset.from_list(rows[:5]).to_parquet(str(parquet))
    sources = {
        write_jsonl(tmp_path / "conv.jsonl", rows): 6, parquet: 5,
        write_jsonl(tmp_path / "other" / "conv.jsonl", rows[:4]): 4, write_jsonl(tmp_path / "test.jsonl", rows[:3]): 3,
    }  # fmt: skip
    (own_test,) = evaluate_paths([trained_run / "best"])
    results = [evaluate_paths([trained_run / "best"], data_source=str(source))[0] for source in sources]
    assert len({result["path"] for result in [own_test, *results]}) == 5
    for result, pairs in zip(results, sources.values()):
        assert json.loads(Path(result["path"]).read_text())["pairs"] == pairs
    assert json.loads(Path(own_test["path"]).read_text())["pairs"] == NUM_TEST_PAIRS
    assert Path(own_test["path"]).name == "eval_test.json"


def test_eval_help_says_what_it_reads_and_writes(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "hh-rlhf JSONL" not in text  # --data reads every format training reads
    assert "in any format training reads (.jsonl, .json, .parquet, .csv, .gz), or a hub dataset id" in text
    assert "writes eval_<data>.json beside each" in text and "--format FORMAT" in text


def test_eval_refuses_test_pairs_that_differ_from_training(trained_run, tmp_path, capsys):
    copy = tmp_path / "changed"
    shutil.copytree(trained_run, copy, symlinks=True)
    indices = json.loads((copy / "data_indices.json").read_text())
    indices["test"] = indices["test"][::-1]
    (copy / "data_indices.json").write_text(json.dumps(indices))
    assert main(["eval", str(copy)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "data_indices.json" in error and "\n" not in error


def test_eval_of_a_path_that_is_no_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {tmp_path}") and "\n" not in error


def test_a_missing_reference_directory_is_named_by_its_flag(tmp_path, tiny_gpt2, tokenizer, monkeypatch, capsys):
    """`--reference checkpoints/<run>/reference` of a run on a hub model (which keeps no reference/) names the flag,
    not the "checkpoint", and says where a reference comes from."""
    model_dir = tmp_path / "merged"
    tiny_gpt2.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_rows("test", 4))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    expected = (
        "error: --reference checkpoints/lora/reference: no such directory (only a run built from model.tiny keeps its "
        "starting model, in <run>/reference; for any other run give the model it was trained from, its "
        "model.name_or_path)"
    )
    for command in (["eval", str(model_dir), "--data", str(pairs)],
                    ["rank", "--checkpoint", str(model_dir), "--prompt", "Hi?", "--response-a", "Hello.", "--response-b", "No."],
                    ["generate", "--checkpoint", str(model_dir), "--data", str(pairs)]):  # fmt: skip
        assert main([*command, "--reference", "checkpoints/lora/reference"]) == 2
        assert capsys.readouterr().err.strip() == expected


def _test_triples(run_dir: Path) -> list[dict]:
    """The run's test pairs, with the chosen response as A on even rows and as B on odd rows."""
    scorer = RunScorer(run_dir, run_dir / "best")
    triples = []
    for i, pair in enumerate(scorer.test_pairs(DataReport())):
        a, b = (pair.chosen, pair.rejected) if i % 2 == 0 else (pair.rejected, pair.chosen)
        triples.append({"prompt": pair.prompt, "response_a": a, "response_b": b})
    return triples


def test_rank_prefers_chosen_after_training_and_ties_before(trained_run):
    triples = _test_triples(trained_run)
    chosen_side = ["a" if i % 2 == 0 else "b" for i in range(len(triples))]

    before = rank_responses(reference_dir(trained_run), triples)
    assert all(r["reward_a"] == 0.0 and r["reward_b"] == 0.0 and r["prefers"] == "tie" for r in before)

    after = rank_responses(trained_run / "best", triples)
    agree = sum(r["prefers"] == side for r, side in zip(after, chosen_side))
    assert agree > len(triples) / 2

    if RunScorer(trained_run, trained_run / "best").precision != "fp32":
        return  # in bf16 the sums carry rounding of about a nat, too coarse for the check below
    # A response's reward does not depend on whether it is shown as A or as B.
    swapped = rank_responses(trained_run / "best", [{**t, "response_a": t["response_b"], "response_b": t["response_a"]} for t in triples[:6]])
    for original, flipped in zip(after, swapped):
        assert flipped["reward_a"] == pytest.approx(original["reward_b"], abs=1e-4)


def test_identical_responses_are_an_exact_tie(trained_run):
    # B is scored later in the packed row than A, where float sums round differently (measured: up to ~5e-7 apart).
    prompts = ["How do I bake a loaf of bread?", "How do I fix a flat bicycle tire?", "\n\nHuman: Hi\n\nAssistant:"]
    responses = ["Sure, happy to help. Mix flour, water, salt and yeast.", "Why would I tell you? Go away.", "Of course."]
    triples = [{"prompt": p, "response_a": r, "response_b": r} for p in prompts for r in responses]
    results = rank_responses(trained_run / "best", triples)
    assert all(r["reward_a"] == r["reward_b"] and r["prefers"] == "tie" for r in results)
    assert len({r["reward_a"] for r in results}) > 1  # real rewards, not zeros
    # A response equal to B only after the leading space the dialogue format adds is the same tokens: a tie too.
    (spaced,) = rank_responses(trained_run / "best", [{"prompt": prompts[0], "response_a": "Of course.", "response_b": " Of course."}])
    assert spaced["prefers"] == "tie"


def test_rank_cli_reads_pairs_files_and_single_pairs(trained_run, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(t) + "\n" for t in _test_triples(trained_run)[:3]))
    assert main(["rank", "--checkpoint", str(trained_run / "best"), "--pairs", str(pairs)]) == 0
    table = capsys.readouterr().out
    assert "reward A" in table and len([line for line in table.splitlines() if line.startswith("| ")]) == 4

    assert main(["rank", "--checkpoint", str(trained_run / "best"), "--prompt", "How do I bake a loaf of bread?",
                 "--response-a", "Sure, happy to help. Mix flour, water, salt and yeast.",
                 "--response-b", "Why would I tell you? Go away."]) == 0  # fmt: skip
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 ")]
    assert row.rstrip(" |").split()[-1] in {"A", "B", "tie"}


def test_rank_scores_an_empty_response_as_end_of_sequence_alone(trained_run, tmp_path, capsys):
    assert evaluate.as_dialogue("Where does she live?", " ") == ("\n\nHuman: Where does she live?\n\nAssistant:", "")
    pairs = tmp_path / "silent.jsonl"
    pairs.write_text(json.dumps({"prompt": "Where does she live?", "response_a": "", "response_b": "At 12 Elm St."}) + "\n")
    (triple,) = read_rank_triples(pairs)
    (result,) = rank_responses(trained_run / "best", [triple])
    assert all(math.isfinite(result[key]) for key in ("reward_a", "reward_b")) and result["reward_a"] != 0.0
    assert main(["rank", "--checkpoint", str(trained_run / "best"), "--prompt", "Where does she live?",
                 "--response-a", "", "--response-b", "At 12 Elm St."]) == 0  # fmt: skip
    assert f"{result['reward_a']:+.4f}" in capsys.readouterr().out


def test_rank_pairs_file_errors_name_the_line_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response_a": "a", "response_b": "b"}) + "\n" + json.dumps({"prompt": "p", "response_a": "a"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: key 'response_b'"):
        read_rank_triples(bad)
    assert main(["rank", "--checkpoint", str(tmp_path), "--pairs", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_generate_writes_policy_and_reference_side_by_side_reproducibly(trained_run, tmp_path):
    settings = SamplingSettings(num_prompts=2, max_new_tokens=12, seed=5)
    first = write_generations(trained_run / "best", settings, tmp_path / "a.md").read_text()
    default = write_generations(trained_run / "best", settings)  # written into the run directory
    assert default.parent == trained_run and default.name.startswith("generations_epoch-")
    assert default.read_text() == first
    assert first.count("## Prompt ") == 2
    header = next(line for line in first.splitlines() if line.startswith("| policy"))
    assert "| reference |" in header
    rows = [line for line in first.splitlines() if line.startswith("| ") and not line.startswith("| policy")]
    assert len(rows) == 2 and all(row.count(" | ") == 2 for row in rows)


def test_generate_takes_your_own_prompts(trained_run, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "How do I fix a flat tyre?"}, {"prompt": "Tell me a joke."}])
    out = write_generations(trained_run / "best", SamplingSettings(max_new_tokens=8), tmp_path / "own.md", prompts_file=prompts)
    text = out.read_text()
    assert "2 prompts from" in text and "Human: How do I fix a flat tyre?" in text and "## Prompt 2 (line 2)" in text
    assert "dataset's chosen response" not in text  # no dataset answer to show beside your own prompts
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"question": "no prompt key"}])
    assert main(["generate", "--checkpoint", str(trained_run / "best"), "--prompts", str(bad)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {bad}:2: key 'prompt' must be a non-empty string or list of {{role, content}} messages"


def test_lora_checkpoint_is_base_plus_adapter(trained_run, tmp_path):
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    run = tmp_path / "lora_run"
    run.mkdir()
    config = load_config(trained_run / "config.yaml", ["model.lora={r: 2, target_modules: [c_attn]}"])
    (run / "config.yaml").write_text(config.to_yaml())
    for name in ("data_indices.json", "reference"):
        (shutil.copytree if (trained_run / name).is_dir() else shutil.copy)(trained_run / name, run / name)
    scorer = RunScorer(run, reference_dir(run))
    base = scorer.reference_model()
    base_key = model_fingerprint(base)
    torch.manual_seed(1)
    policy = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
    policy.save_pretrained(run / "epoch-1")
    scorer.tokenizer.save_pretrained(run / "epoch-1")
    assert not (run / "epoch-1" / "model.safetensors").exists()

    (result,) = evaluate_paths([run / "epoch-1"])
    dataset = RunEvaluator(run, run / "epoch-1").dataset
    chosen, rejected = scorer.logps(policy.eval(), dataset)  # the in-memory model, as eval scores it
    assert result["logps_chosen"] == pytest.approx(chosen.double().mean().item(), abs=1e-4)
    assert result["logps_rejected"] == pytest.approx(rejected.double().mean().item(), abs=1e-4)
    assert result["ties"] < 1.0  # the adapter changed the policy
    # The base weights, hence the reference cache key, are those of the full-model run.
    assert model_fingerprint(policy) == base_key == model_fingerprint(RunScorer(trained_run, trained_run / "best").reference_model())
