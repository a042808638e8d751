"""Evaluation of trained checkpoints on held-out pairs, and ranking two responses by hand.

- `evaluate_paths`: DPO loss, implicit rewards, accuracy (ties apart), log-probs and bootstrap CIs on a run's test
  pairs (or any preference dataset), written as `eval_<dataset>.json` beside each checkpoint. Reference log-probs come
  from the on-disk cache the trainer uses, so evaluating ten checkpoints costs at most one reference pass.
- `rank_responses`: which of two responses a checkpoint prefers, by implicit reward beta * (log pi - log pi_ref).

Policy and reference samples side by side are `generate`'s, which scores nothing but reads models the same way.

Everything is read back from what training left in the run directory: the resolved `config.yaml`, the tokenizer
saved with each checkpoint, `data_indices.json`, and (for locally built models) the initial model in `reference/`.
A model directory outside any run (a `merge` output, any Hugging Face model) has none of that, so the caller names
its reference model (`--reference`) and, to evaluate or sample, its pairs (`--data`). How it reads data (format,
lengths) and its loss and β come from the `scoring.json` every model directory the recipe writes carries; any
other model directory takes `--format` and `--beta`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import ConfigError, DataConfig, LossConfig, ModelConfig, RecipeConfig, check_loss_import, looks_like_local_path
from .data import load_text_splits, recorded_pairs, tokenize_pairs
from .hub import check_hub_access
from .loss import resolve_loss
from .models import build_model, dequantized, load_tokenizer, model_fingerprint, resolve_precision
from .packing import dataset_pair_logps, forward_batch_size, make_collator, response_token_counts
from .reference import cache_path, cached_reference_logps
from .rundir import (
    ADAPTER_CONFIG_FILE,
    BEST_FILE,
    DATA_INDICES_FILE,
    RUN_CONFIG_FILE,
    SCORING_FILE,
    TEST_DATASET,
    checkpoint_epoch,
    eval_file_name,
    find_checkpoints,
    is_checkpoint,
    is_run_dir,
    load_run_config,
    read_scoring_settings,
    reference_dir,
    scoring_settings,
    trained_format,
    write_scoring_settings,
)
from .sources import (
    ASSISTANT_MARKER,
    CHAT_FORMATS,
    HUMAN_MARKER,
    BadRow,
    DataError,
    DataReport,
    PreferencePair,
    read_messages,
    read_pairs,
)

if TYPE_CHECKING:
    from datasets import Dataset

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95


# ---------------------------------------------------------------------------------------------------------------
# Metrics: pure functions of per-pair tensors.


def bootstrap_ci(
    values: torch.Tensor, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of per-pair values; the fixed seed makes it reproducible."""
    values = values.detach().double().flatten()
    generator = torch.Generator().manual_seed(seed)
    resampled = torch.randint(len(values), (samples, len(values)), generator=generator)
    means = values[resampled].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def preference_metrics(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    bootstrap_samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """Means over pairs, with accuracy = share of pairs whose chosen reward is strictly higher; ties are their own share.

    A tie is not half a win: an untrained policy (equal to the reference) ties on every pair, and calling that 50%
    accuracy would hide it.
    """
    if len(losses) == 0:
        raise DataError("no pairs to evaluate")
    wins = (chosen_rewards > rejected_rewards).double()
    ties = (chosen_rewards == rejected_rewards).double()
    margins = (chosen_rewards - rejected_rewards).double()
    return {
        "pairs": len(losses),
        "loss": losses.double().mean().item(),
        "chosen_reward": chosen_rewards.double().mean().item(),
        "rejected_reward": rejected_rewards.double().mean().item(),
        "reward_margin": margins.mean().item(),
        "accuracy": wins.mean().item(),
        "ties": ties.mean().item(),
        "wins_count": int(wins.sum().item()),
        "ties_count": int(ties.sum().item()),
        "logps_chosen": chosen_logps.double().mean().item(),
        "logps_rejected": rejected_logps.double().mean().item(),
        "accuracy_ci95": list(bootstrap_ci(wins, bootstrap_samples, seed)),
        "reward_margin_ci95": list(bootstrap_ci(margins, bootstrap_samples, seed)),
        "bootstrap": {"samples": bootstrap_samples, "seed": seed, "level": CI_LEVEL},
    }


# ---------------------------------------------------------------------------------------------------------------
# Runs, checkpoints and the models in them.


def model_context(model_dir: Path) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def scoring_config(
    checkpoint: Path, reference: str | None = None, beta: float | None = None, data_format: str | None = None
) -> tuple[RecipeConfig, Path]:
    """The config and directory that score a checkpoint: its run's, or for a model directory outside any run one made
    from `reference` (the model it was trained from) and the directory's `scoring.json` (how its run read data and
    scored pairs: a `merge` output, or an epoch copied out of its run); `beta` and `data_format` stand in for it in a
    model directory the recipe did not write. Everything else takes the recipe's defaults."""
    run_dir = checkpoint.resolve().parent
    if is_run_dir(run_dir):
        if reference is not None or beta is not None or data_format is not None:
            raise ConfigError(
                f"{checkpoint}: --reference, --beta and --format are for model directories outside a run; this "
                f"checkpoint's run ({run_dir}) records them in its {RUN_CONFIG_FILE}"
            )
        return load_run_config(run_dir), run_dir
    recorded = read_scoring_settings(checkpoint)
    if recorded is not None and data_format is not None:
        raise ConfigError(
            f"{checkpoint}: --format is for model directories that do not record their format; this one was trained "
            f"on {recorded['data']['trained_format']} data (its {SCORING_FILE})"
        )
    beta_default = f"its {SCORING_FILE} gives {recorded['loss']['beta']:g}" if recorded else f"default {LossConfig.beta}"
    if reference is None:
        raise ConfigError(
            f"{checkpoint}: no run {RUN_CONFIG_FILE} beside this model directory, so give --reference (the model it was "
            f"trained from: a local directory or hub id; for a merged LoRA run, checkpoints/<run>/reference or its base "
            f"model) and --beta ({beta_default})"
        )
    if looks_like_local_path(reference) and not Path(reference).expanduser().is_dir():
        raise ConfigError(
            f"--reference {reference}: no such directory (only a run built from model.tiny keeps its starting model, in "
            "<run>/reference; for any other run give the model it was trained from, its model.name_or_path)"
        )
    if beta is not None and not beta > 0:
        raise ConfigError(f"--beta must be > 0 (got {beta})")
    if recorded is not None:
        data = DataConfig(**{key: value for key, value in recorded["data"].items() if key != "trained_format"})
        loss = LossConfig(**recorded["loss"])
    else:
        context = model_context(checkpoint)
        data = DataConfig(format=data_format or "auto", max_length=min(DataConfig.max_length, context or DataConfig.max_length))
        loss = LossConfig()
    if beta is not None:
        loss.beta = beta
    config = RecipeConfig(run_name=checkpoint.resolve().name, model=ModelConfig(name_or_path=reference), data=data, loss=loss)
    config.source_file = f"{checkpoint} (with --reference {reference})"
    return config, checkpoint.resolve()


def load_reference_model(config: RecipeConfig, run_dir: Path, tokenizer) -> torch.nn.Module:
    """The run's starting model: the saved initial model of a locally built run, else the configured base model."""
    source = str(reference_dir(run_dir)) if config.model.tiny is not None else config.model.name_or_path
    return build_model(config.model, tokenizer, config.training.seed, config.data.max_length, source=source).eval()


def load_policy_model(
    config: RecipeConfig, run_dir: Path, checkpoint: Path, tokenizer, fused_lm_head: bool = True
) -> torch.nn.Module:
    """A checkpoint's policy; a LoRA checkpoint holds only the adapter, which goes on top of the base model."""
    from trl.trainer.utils import add_fused_lm_head

    is_adapter = (checkpoint / ADAPTER_CONFIG_FILE).is_file()
    if is_adapter:
        model = load_reference_model(config, run_dir, tokenizer)
    else:
        model = build_model(config.model, tokenizer, config.training.seed, config.data.max_length, source=str(checkpoint))
    if fused_lm_head:
        add_fused_lm_head(model)  # must come before the PEFT wrapper
    if is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(checkpoint))
    return model.eval()


def merge_adapter(checkpoint: str | Path, out: str | Path) -> Path:
    """Fold a LoRA checkpoint's adapter into its base model and save a plain model (safetensors) + tokenizer."""
    checkpoint = Path(checkpoint).resolve()
    if not (checkpoint / ADAPTER_CONFIG_FILE).is_file():
        raise ConfigError(f"{checkpoint}: not a LoRA checkpoint (no {ADAPTER_CONFIG_FILE}); it already holds a full model")
    config = load_run_config(checkpoint.parent)
    tokenizer = load_tokenizer(config.model, source=str(checkpoint))
    if config.model.quantization is not None:  # merged into the de-quantized base, saved in model.dtype
        from peft import PeftModel

        base = dequantized(load_reference_model(config, checkpoint.parent, tokenizer), config.model)
        model = PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()
    else:
        model = load_policy_model(config, checkpoint.parent, checkpoint, tokenizer, fused_lm_head=False).merge_and_unload()
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # with the chat template the run rendered its messages with
    # Outside the run, the merged model still reads data and scores pairs as its run did (see `scoring_config`).
    write_scoring_settings(out, scoring_settings(config, trained_format(checkpoint.parent, config.data)))
    return out


def _autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device.type, dtype=dtype)


class RunScorer:
    """What scoring pairs under one run needs: its config, tokenizer, batching, device, precision and loss.

    `config` stands in for the run's config.yaml when the model directory belongs to no run (see `scoring_config`).
    """

    def __init__(self, run_dir: Path, tokenizer_source: Path, batch_size: int | None = None, config: RecipeConfig | None = None):
        self.run_dir = Path(run_dir)
        self.config = config or load_run_config(self.run_dir)
        self.config_file = self.config.source_file if config else str(self.run_dir / RUN_CONFIG_FILE)
        check_hub_access(self.config, data=False)
        try:
            self.precision = resolve_precision(self.config.training.precision, self.config_file)
        except ConfigError:  # e.g. a bf16 run looked at on a CPU: fp32 scores the same weights, only more exactly
            print(f"note: training.precision {self.config.training.precision} is not available here; scoring in fp32")
            self.precision = "fp32"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = _autocast(self.precision, self.device)
        self.tokenizer = load_tokenizer(self.config.model, source=str(tokenizer_source))
        self.collator = make_collator(
            self.tokenizer.pad_token_id, self.config.training.prompt_sharing, self.config.training.pad_to_multiple_of
        )
        self.batch_size = batch_size or forward_batch_size(self.config.training.eval_batch_size)
        check_loss_import(self.config)
        self.loss_fn = resolve_loss(self.config.loss.type, self.config.loss.label_smoothing, self.config.loss.rpo_alpha)
        self.beta = self.config.loss.beta

    def test_pairs(self, report: DataReport) -> list[PreferencePair]:
        """The run's test pairs, rebuilt from its data config and seed and checked against what training recorded."""
        if not is_run_dir(self.run_dir):
            raise ConfigError(f"{self.run_dir}: a model directory outside any run has no test pairs; give --data FILE")
        check_hub_access(self.config, models=False)
        splits = load_text_splits(self.config.data, self.config.training.seed, report, self.config_file)
        indices_file = self.run_dir / DATA_INDICES_FILE
        if indices_file.is_file():
            recorded, rebuilt = json.loads(indices_file.read_text()), splits.indices()
            if "pair_sources" not in recorded:  # written before each pair's source was: rows alone
                del rebuilt["pair_sources"]
            if recorded.get("test") is not None and recorded_pairs(recorded, "test") != recorded_pairs(rebuilt, "test"):
                source = self.config.data.test_source or self.config.data.source
                raise DataError(
                    f"{indices_file}: the test pairs rebuilt from {source} are not the ones training recorded "
                    f"({len(splits.test)} vs {len(recorded['test'])} pairs; did the data change?)"
                )
        return splits.test

    def read_pairs(self, source: str, report: DataReport) -> list[PreferencePair]:
        """Every usable pair of a dataset named on the command line (a hub dataset's test split); drops are printed."""
        data = dataclasses.replace(self.config.data, source=source, test_source=None)
        check_hub_access(dataclasses.replace(self.config, data=data), models=False)
        pairs = read_pairs(source, data.test_split or "test", data, report)
        for line in report.summary_lines():
            print(line, flush=True)
        return pairs

    @property
    def data_format(self) -> str:
        """The format the model was trained on, which prompts given on the command line are shaped in."""
        return trained_format(self.run_dir, self.config.data)

    def tokenize(self, pairs: list[PreferencePair], split: str, report: DataReport) -> Dataset:
        return tokenize_pairs(pairs, self.tokenizer, self.config.data, split, report)

    def logps(self, model: torch.nn.Module, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        model.to(self.device)
        return dataset_pair_logps(model, dataset, self.collator, self.batch_size, self.device, self.autocast)

    def loss(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, dataset: Dataset):
        """The run's loss and rewards for the pairs of `dataset`, whose log-probs are given."""
        chosen_tokens, rejected_tokens = response_token_counts(dataset)
        return self.loss_fn(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta,
            chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
        )

    def reference_model(self) -> torch.nn.Module:
        from trl.trainer.utils import add_fused_lm_head

        model = load_reference_model(self.config, self.run_dir, self.tokenizer)
        add_fused_lm_head(model)
        return model

    def cached_reference_logps(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor, Path, bool]:
        """Reference log-probs through the trainer's cache (see `reference.cache_path` for its key)."""
        reference = self.reference_model()
        path = cache_path(
            self.config.training.reference_cache_dir, model_fingerprint(reference), dataset, self.precision,
            self.collator.layout,
        )
        chosen, rejected, hit = cached_reference_logps(path, lambda: self.logps(reference, dataset))
        return chosen, rejected, path, hit

    def policy_model(self, checkpoint: Path, fused_lm_head: bool = True) -> torch.nn.Module:
        return load_policy_model(self.config, self.run_dir, checkpoint, self.tokenizer, fused_lm_head)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation.


def dataset_name(source: str) -> str:
    """A file-name-safe name for a dataset given on the command line, one per dataset: its file name (suffix kept, so
    conv.jsonl and conv.parquet differ, and no file is taken for the run's `test` split) or hub id, then a digest of
    its resolved path or id (so two conv.jsonl in different folders differ too)."""
    path = Path(source)
    local = path.exists()
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name if local else source).strip("_") or "data"
    digest = hashlib.sha256(str(path.resolve() if local else source).encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


class RunEvaluator:
    """Evaluates checkpoints of one run on one dataset; tokenized pairs and reference log-probs are made once."""

    def __init__(
        self,
        run_dir: Path,
        tokenizer_source: Path,
        data_source: str | None = None,
        batch_size: int | None = None,
        config: RecipeConfig | None = None,
    ):
        self.scorer = RunScorer(run_dir, tokenizer_source, batch_size, config)
        self.report = DataReport()
        if data_source is None:
            self.dataset_name = TEST_DATASET
            pairs = self.scorer.test_pairs(self.report)
        else:
            self.dataset_name = dataset_name(data_source)
            pairs = self.scorer.read_pairs(data_source, self.report)
        if not pairs:
            raise DataError(
                f"{self.scorer.config_file}: no {self.dataset_name} pairs to evaluate (data.num_test_pairs is 0, or "
                "the run had no test source)"
            )
        data = self.scorer.config.data
        self.data_source = data_source or f"{data.test_source or data.source} (test split of the run)"
        self.dataset = self.scorer.tokenize(pairs, self.dataset_name, self.report)
        self._reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reference_cache_file: Path | None = None

    def reference_logps(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Reference log-probs and whether they came from disk; a run's later checkpoints reuse them from memory."""
        if self._reference is not None:
            return (*self._reference, True)
        chosen, rejected, self.reference_cache_file, hit = self.scorer.cached_reference_logps(self.dataset)
        self._reference = (chosen, rejected)
        return chosen, rejected, hit

    def evaluate(self, checkpoint: Path, bootstrap_samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
        scorer = self.scorer
        ref_chosen, ref_rejected, hit = self.reference_logps()
        policy = scorer.policy_model(checkpoint)
        policy_chosen, policy_rejected = scorer.logps(policy, self.dataset)
        del policy
        losses, chosen_rewards, rejected_rewards = scorer.loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.dataset
        )
        best = scorer.run_dir / BEST_FILE
        best_checkpoint = json.loads(best.read_text())["checkpoint"] if best.is_file() else None
        result = {
            "run": scorer.run_dir.name,
            "checkpoint": checkpoint.name,
            "epoch": checkpoint_epoch(checkpoint),
            "is_best": checkpoint.name == best_checkpoint,
            "dataset": self.dataset_name,
            "data_source": self.data_source,
            "loss_type": scorer.config.loss.type,
            "beta": scorer.beta,
            **preference_metrics(
                losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, bootstrap_samples, seed
            ),
            "truncated": self.report.truncated.get(self.dataset_name, {}),
            "dropped": {source: dict(counts) for source, counts in self.report.dropped.items()},
            "precision": scorer.precision,
            "reference_cache": {"file": str(self.reference_cache_file), "hit": hit},
        }
        path = checkpoint / eval_file_name(self.dataset_name)
        path.write_text(json.dumps(result, indent=2) + "\n")
        result["path"] = str(path)
        return result


def evaluate_paths(
    paths: list[str | Path],
    all_epochs: bool = False,
    data_source: str | None = None,
    batch_size: int | None = None,
    bootstrap_samples: int = BOOTSTRAP_SAMPLES,
    reference: str | None = None,
    beta: float | None = None,
    data_format: str | None = None,
) -> list[dict]:
    """Evaluate every checkpoint the paths name, one run at a time so each run loads its data and reference once.

    A model directory outside any run is scored against `reference`, on `data_source` (see `scoring_config`).
    """
    by_run: dict[Path, tuple[RecipeConfig, list[Path]]] = {}
    for path in paths:
        for checkpoint in find_checkpoints(path, all_epochs):
            run_dir = checkpoint.parent if is_run_dir(checkpoint.parent) else checkpoint
            if run_dir not in by_run:
                config, _ = scoring_config(checkpoint, reference, beta, data_format)
                if run_dir == checkpoint and data_source is None:
                    raise ConfigError(f"{path}: a model directory outside any run has no test pairs; give --data FILE")
                by_run[run_dir] = (config, [])
            if checkpoint not in by_run[run_dir][1]:
                by_run[run_dir][1].append(checkpoint)
    results = []
    for run_dir, (config, checkpoints) in by_run.items():
        evaluator = RunEvaluator(run_dir, checkpoints[0], data_source, batch_size, config)
        for checkpoint in checkpoints:
            results.append(evaluator.evaluate(checkpoint, bootstrap_samples))
    return results


def _interval(value: float, interval: list[float], digits: int) -> str:
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A pipe table with padded columns, so it reads the same in a terminal and rendered as markdown."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def eval_table(results: list[dict]) -> str:
    headers = ["run", "checkpoint", "data", "pairs", "loss", "accuracy [95% CI]", "ties", "margin [95% CI]",
               "chosen rwd", "rejected rwd", "logp chosen", "logp rejected"]  # fmt: skip
    rows = [
        [
            r["run"],
            r["checkpoint"] + (" (best)" if r["is_best"] else ""),
            r["dataset"],
            r["pairs"],
            f"{r['loss']:.4f}",
            _interval(r["accuracy"], r["accuracy_ci95"], 3),
            f"{r['ties']:.3f}",
            _interval(r["reward_margin"], r["reward_margin_ci95"], 3),
            f"{r['chosen_reward']:.3f}",
            f"{r['rejected_reward']:.3f}",
            f"{r['logps_chosen']:.1f}",
            f"{r['logps_rejected']:.1f}",
        ]
        for r in results
    ]
    return markdown_table(headers, rows)


# ---------------------------------------------------------------------------------------------------------------
# Ranking two responses.

RANK_KEYS = ("prompt", "response_a", "response_b")


def rank_pair(index: int, triple: dict, data_format: str) -> PreferencePair:
    """A triple as a pair in the run's data format; response A takes the place of "chosen", B of "rejected"."""
    prompt, a, b = (triple[key] for key in RANK_KEYS)
    if data_format in CHAT_FORMATS:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return PreferencePair(index, messages, *([{"role": "assistant", "content": r.strip()}] for r in (a, b)))
    if not isinstance(prompt, str):
        raise DataError(
            f"rank: the prompt of pair {index + 1} is a message list, but the model was trained on {data_format} text "
            "(a model directory outside a run that records no format takes --format)"
        )
    if data_format == "hh-rlhf":
        return PreferencePair(index, *as_dialogue(prompt, a), as_dialogue(prompt, b)[1])
    return PreferencePair(index, prompt, *(r if r.strip() else "" for r in (a, b)))


def as_dialogue(prompt: str, response: str) -> tuple[str, str]:
    """Bare text becomes an hh-rlhf turn ("\\n\\nHuman: ...\\n\\nAssistant:" + " response"), as the model was trained on."""
    prompt = prompt.rstrip()
    if not prompt.endswith(ASSISTANT_MARKER.strip()):
        if HUMAN_MARKER.strip() not in prompt:
            prompt = f"{HUMAN_MARKER} {prompt.strip()}"
        prompt += ASSISTANT_MARKER
    if not response.strip():
        return prompt, ""  # an empty response is scored as end-of-sequence alone, as in training
    if response[:1] not in (" ", "\n"):
        response = " " + response
    return prompt, response


def _json_objects(path: str | Path, keys: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; anything else is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected an object with keys {', '.join(keys)}")
        yield number, row


def _prompt(row: dict, where: str) -> str | list[dict[str, str]]:
    """A row's prompt: non-empty text, or a non-empty list of {role, content} messages (for chat-format runs)."""
    prompt = row.get("prompt")
    try:
        if isinstance(prompt, list) and (messages := read_messages(prompt)):
            return messages
    except BadRow:
        pass
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    raise DataError(f"{where}: key 'prompt' must be a non-empty string or list of {{role, content}} messages")


def read_prompts(path: str | Path) -> list[str | list[dict[str, str]]]:
    """{"prompt": text or messages} objects, one per line; any bad line is an error naming it."""
    prompts = [_prompt(row, f"{path}:{number}") for number, row in _json_objects(path, ("prompt",))]
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


def read_rank_triples(path: str | Path) -> list[dict[str, Any]]:
    """{prompt, response_a, response_b} objects, one per line; any bad line is an error naming it.

    The prompt is text, or a list of {role, content} messages for a run trained on a chat format.
    """
    triples = []
    for number, row in _json_objects(path, RANK_KEYS):
        row["prompt"] = _prompt(row, f"{path}:{number}")
        for key in RANK_KEYS[1:]:  # a response may be empty: it is then scored as end-of-sequence alone
            if not isinstance(row.get(key), str):
                raise DataError(f"{path}:{number}: key '{key}' must be a string")
        triples.append({key: row[key] for key in RANK_KEYS})
    if not triples:
        raise DataError(f"{path}: no pairs to rank (the file is empty)")
    return triples


def scorer_for(
    checkpoint: Path, reference: str | None, beta: float | None, data_format: str | None, batch_size: int | None = None
) -> RunScorer:
    if not is_checkpoint(checkpoint):
        raise ConfigError(f"{checkpoint}: not a model directory (no config.json or {ADAPTER_CONFIG_FILE})")
    config, run_dir = scoring_config(checkpoint, reference, beta, data_format)
    return RunScorer(run_dir, checkpoint, batch_size, config)


def rank_responses(
    checkpoint: str | Path,
    triples: list[dict[str, str]],
    batch_size: int | None = None,
    reference: str | None = None,
    beta: float | None = None,
    data_format: str | None = None,
) -> list[dict]:
    """Each response's implicit reward under the checkpoint, and which one it prefers ("a", "b" or "tie")."""
    given = Path(checkpoint)
    scorer = scorer_for(given, reference, beta, data_format, batch_size)
    checkpoint = given.resolve()
    # Response A is scored as "chosen" and B as "rejected": exactly the two branches of a training pair.
    pairs = [rank_pair(i, triple, scorer.data_format) for i, triple in enumerate(triples)]
    report = DataReport()
    dataset = scorer.tokenize(pairs, "rank", report)
    policy_a, policy_b = scorer.logps(scorer.policy_model(checkpoint), dataset)
    reference_a, reference_b = scorer.logps(scorer.reference_model(), dataset)
    # Two identical responses have equal log-probs in exact arithmetic, but B sits later in the packed row (and in
    # another row without prompt sharing), where float sums round differently (~1e-7): score such a pair once.
    same = torch.tensor([a == b for a, b in zip(dataset["chosen_ids"], dataset["rejected_ids"])], dtype=torch.bool)
    policy_b, reference_b = torch.where(same, policy_a, policy_b), torch.where(same, reference_a, reference_b)
    _, rewards_a, rewards_b = scorer.loss(policy_a, policy_b, reference_a, reference_b, dataset)
    truncated = [kind for kind, count in report.truncated["rank"].items() if count]
    results = []
    for i, triple in enumerate(triples):
        a, b = rewards_a[i].item(), rewards_b[i].item()
        results.append({**triple, "reward_a": a, "reward_b": b, "prefers": "a" if a > b else "b" if b > a else "tie"})
    if truncated:
        print(f"note: some pairs were truncated to data.max_length={scorer.config.data.max_length} ({', '.join(truncated)})")
    return results


def rank_table(results: list[dict]) -> str:
    def preview(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= 40 else text[:37] + "..."

    rows = [
        [i + 1, preview(r["response_a"]), f"{r['reward_a']:+.4f}", preview(r["response_b"]), f"{r['reward_b']:+.4f}",
         r["prefers"].upper() if r["prefers"] != "tie" else "tie"]
        for i, r in enumerate(results)
    ]  # fmt: skip
    return markdown_table(["#", "response A", "reward A", "response B", "reward B", "prefers"], rows)
