"""Batches of preference pairs and their sequence log-probabilities.

Two layouts, one code path:
- shared prompt (default): one row per pair, [prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected]. A block
  attention mask lets each response see the prompt and itself only, and its position ids restart after the prompt,
  so each response is scored exactly as if it followed the prompt alone. The prompt, the largest part of an hh-rlhf
  pair, is computed once instead of twice. Its last token is repeated once per branch because it is the position
  that predicts each response's first token.
- separate: two rows per pair, [prompt, chosen] and [prompt, rejected], as plain TRL does. It needs no 4D mask, for
  attention kernels that take none.

Either way the batch lists the scored positions (each response token's predecessor), the token each predicts, its
pair and its side, so the LM head scores only those and the sums are the same function in both layouts.

Length buckets (`LengthBuckets`, `training.length_buckets`, off by default): row widths and scored-position counts are
padded up to a few fixed values drawn from the data, and batches are formed within a bucket (`LengthBucketSampler`).
A GPU then sees a handful of shapes, so attention plans are built once per bucket instead of once per batch.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model
from torch.utils.data import Sampler
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import maybe_gather_lm_head_ctx

IGNORE_INDEX = -100

# How each attention implementation reads the shared layout's 4D mask. SDPA takes booleans (True = attend); eager
# attention adds the mask to the scores, where True/False would become +1/0 and mask nothing. Kernels that take no
# 4D mask at all (flash attention) need the separate layout; flex attention crashes on CPU in torch 2.13, so it is
# not offered until it can be tested.
SHARED_PROMPT_MASKS = {"sdpa": "boolean", "eager": "additive"}


def on_gpu() -> bool:
    return torch.cuda.is_available()


# What each `null` (device default) training setting means on each device. A GPU value other than the plain path
# (TRL's own layout, exact widths, no compilation, the CPU's forward batch) has to rest on a GPU measurement that shows
# it faster end to end; config.TrainingConfig names the measurement behind each. Only prompt sharing has one so far:
# `scripts/gpu_check.sh` measures the rest (compiled and uncompiled, buckets on request) for a GPU session to set.
DEVICE_DEFAULTS = {
    "cpu": {"prompt_sharing": True, "length_buckets": 0, "pad_to_multiple_of": 1, "forward_batch": 32, "torch_compile": False},
    "cuda": {"prompt_sharing": False, "length_buckets": 0, "pad_to_multiple_of": 1, "forward_batch": 32, "torch_compile": False},
}  # fmt: skip
# Bucket widths are multiples of this when batch widths are exact (`pad_to_multiple_of` 1).
BUCKET_MULTIPLE = 8


def device_default(setting: str, value: Any = None) -> Any:
    """`value`, or this device's default for the setting when it is None (`null` in a config)."""
    return DEVICE_DEFAULTS["cuda" if on_gpu() else "cpu"][setting] if value is None else value


def default_prompt_sharing(setting: bool | None) -> bool:
    return device_default("prompt_sharing", setting)


def forward_batch_size(setting: int | None) -> int:
    """Pairs per batch for the forward-only passes: the reference-cache fill and evaluation."""
    return device_default("forward_batch", setting)


def row_lengths(pairs, share_prompt: bool) -> list[int]:
    """Each pair's row length in a layout (the longer of its two rows when separate), from examples or a dataset."""
    columns = pairs if hasattr(pairs, "column_names") else {k: [e[k] for e in pairs] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    prompts, chosens, rejecteds = (columns[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    if share_prompt:  # the prompt's last token repeats once per branch
        return [len(p) + len(c) + len(r) + 1 for p, c, r in zip(prompts, chosens, rejecteds)]
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosens, rejecteds)]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class LengthBuckets:
    """The few batch shapes a run uses: row widths, and scored positions per pair (times the pairs in a batch).

    A batch pads its rows to the smallest width at least its longest row, and its scored-position list to the
    smallest per-pair count at least its mean, times its pairs. A batch beyond every bucket (a longer evaluation
    pair, say) is rounded up to `multiple` instead: correct, only one shape more.
    """

    widths: tuple[int, ...]
    scored_per_pair: tuple[int, ...]
    multiple: int

    def width(self, longest: int) -> int:
        return next((w for w in self.widths if w >= longest), _round_up(longest, self.multiple))

    def bucket(self, length: int) -> int:
        """Index of the width bucket a row of this length falls in (the last one for anything longer)."""
        return next((i for i, w in enumerate(self.widths) if w >= length), len(self.widths) - 1)

    def scored(self, count: int, pairs: int) -> int:
        per_pair = next((s for s in self.scored_per_pair if s * pairs >= count), None)
        return _round_up(per_pair * pairs if per_pair else count, self.multiple)


def _least_padding_ladder(values: Sequence[float], count: int, step: int) -> tuple[int, ...]:
    """At most `count` multiples of `step`, the largest holding max(values), that minimise the total padding
    sum(smallest ladder value >= v, minus v) over the values (dynamic programming over the candidate multiples)."""
    ordered = sorted(values)
    candidates = list(range(_round_up(math.ceil(ordered[0]), step), _round_up(math.ceil(ordered[-1]), step) + 1, step))
    prefix = [0.0]
    for value in ordered:
        prefix.append(prefix[-1] + value)
    held = [bisect.bisect_right(ordered, c) for c in candidates]  # values <= each candidate

    def cost(low: int, high: int) -> float:  # values in (candidates[low], candidates[high]] padded to the latter
        start = held[low] if low >= 0 else 0
        return candidates[high] * (held[high] - start) - (prefix[held[high]] - prefix[start])

    best = {(1, j): (cost(-1, j), (j,)) for j in range(len(candidates))}
    for k in range(2, count + 1):
        for j in range(len(candidates)):
            options = [(best[k - 1, i][0] + cost(i, j), best[k - 1, i][1] + (j,)) for i in range(j)]
            best[k, j] = min(options, default=best[k - 1, j])
    last = len(candidates) - 1
    _, picks = min(best[k, last] for k in range(1, count + 1))
    return tuple(candidates[i] for i in picks)


def plan_buckets(
    lengths: Sequence[int], scored: Sequence[int], count: int, multiple: int, batch_size: int, seed: int = 0
) -> LengthBuckets:
    """At most `count` row widths (multiples of `multiple`) that pad the data's rows least, the last holding the
    longest; and at most `count` scored-per-pair counts that pad least the batches `LengthBucketSampler` forms from
    these pairs (simulated over a few epochs; a batch beyond them all is rounded up to `multiple` instead)."""
    widths = _least_padding_ladder(lengths, count, multiple)
    plan = LengthBuckets(widths, (), multiple)
    generator = torch.Generator().manual_seed(seed)
    means = []
    for _ in range(8):
        for batch in bucket_batches([plan.bucket(n) for n in lengths], batch_size, generator):
            means.append(sum(scored[i] for i in batch) / len(batch))
    return LengthBuckets(widths, _least_padding_ladder(means, count, 1), multiple)


def bucket_batches(buckets: Sequence[int], batch_size: int, generator: torch.Generator | None) -> list[list[int]]:
    """One epoch of batches formed within buckets: each bucket's pairs shuffled, the buckets laid end to end, longest
    first, and cut into batches, so only a batch on a boundary mixes two buckets (taking the wider one's width). The
    first batch, of the longest bucket, stays first, so an out-of-memory shows at step one; the short one, if any,
    stays last, so every other batch is whole; those between come in random order."""
    members: dict[int, list[int]] = {}
    for index, bucket in enumerate(buckets):
        members.setdefault(bucket, []).append(index)
    order = []
    for bucket in sorted(members, reverse=True):
        pairs = members[bucket]
        order += [pairs[i] for i in torch.randperm(len(pairs), generator=generator).tolist()]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) <= 2:
        return batches
    middle = batches[1:-1]
    return [batches[0], *(middle[i] for i in torch.randperm(len(middle), generator=generator).tolist()), batches[-1]]


class LengthBucketSampler(Sampler):
    """Pair indices in `bucket_batches` order, `batch_size` at a time; a fresh order every epoch.

    Like transformers' LengthGroupedSampler, it draws from `generator`, or from torch's global RNG when that is None
    (which the Trainer saves in its checkpoints, so a resumed run replays the same order).
    """

    def __init__(self, buckets: Sequence[int], batch_size: int, generator: torch.Generator | None = None):
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.generator = generator

    def __len__(self) -> int:
        return len(self.buckets)

    def __iter__(self):
        return iter([i for batch in bucket_batches(self.buckets, self.batch_size, self.generator) for i in batch])


@dataclass
class PairCollator:
    pad_token_id: int
    share_prompt: bool = True
    pad_to_multiple_of: int | None = None
    buckets: LengthBuckets | None = None

    @property
    def layout(self) -> str:
        return "shared_prompt" if self.share_prompt else "separate"

    def _padded_length(self, longest: int) -> int:
        if self.buckets is not None:
            return self.buckets.width(longest)
        if self.pad_to_multiple_of:
            return _round_up(longest, self.pad_to_multiple_of)
        return longest

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = self._shared_rows(examples) if self.share_prompt else self._separate_rows(examples)
        width = self._padded_length(max(len(row["input_ids"]) for row in rows))
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_token_id, dtype=torch.long),
            "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        }
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        chosen = torch.zeros((len(rows), width), dtype=torch.bool)
        if self.share_prompt:
            # Padding positions attend to themselves only, so no softmax row is empty (an empty row gives NaN).
            batch["attention_mask"] = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
        else:
            batch["attention_mask"] = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(row["input_ids"])
            batch["position_ids"][i, :n] = torch.as_tensor(row["position_ids"])
            labels[i, :n] = torch.as_tensor(row["shift_labels"])
            chosen[i, :n] = torch.as_tensor(row["chosen_mask"])
            if self.share_prompt:
                batch["attention_mask"][i, :n, :n] = row["attention_mask"]
            else:
                batch["attention_mask"][i, :n] = 1
        if self.share_prompt:
            batch["attention_mask"] = batch["attention_mask"].unsqueeze(1)  # (rows, 1, query, key)
        # The scored positions, found here on the host: on a GPU, finding them there would stall every step.
        scored = (labels != IGNORE_INDEX).flatten().nonzero(as_tuple=True)[0]
        batch["scored_positions"] = scored  # flat indices into (rows, width)
        batch["scored_labels"] = labels.flatten()[scored]  # the token each scored position predicts
        batch["scored_pairs"] = scored // width % len(examples)  # rows are [pairs] or [chosen pairs; rejected pairs]
        batch["scored_chosen"] = chosen.flatten()[scored]  # chosen response, else rejected
        batch["scored_rejected"] = ~batch["scored_chosen"]
        if self.buckets is not None:
            # Bucket padding: slots that score position 0 (a real token) against token 0 and count for neither side.
            slots = self.buckets.scored(len(scored), len(examples)) - len(scored)
            for key, value in (("scored_positions", 0), ("scored_labels", 0), ("scored_pairs", 0)):
                batch[key] = torch.cat([batch[key], torch.full((slots,), value, dtype=torch.long)])
            for key in ("scored_chosen", "scored_rejected"):
                batch[key] = torch.cat([batch[key], torch.zeros(slots, dtype=torch.bool)])
        # Non-padding tokens per pair: what throughput counts, and the number of pairs in either layout.
        batch["pair_tokens"] = torch.tensor([len(row["input_ids"]) for row in rows]).view(-1, len(examples)).sum(0)
        # Scored tokens per response, for losses that normalise by length (IPO).
        batch["chosen_tokens"], batch["rejected_tokens"] = response_token_counts(examples)
        if "ref_chosen_logps" in examples[0]:
            # float64, like the sums they are compared with (see `pair_logps`)
            batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples], dtype=torch.float64)
            batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples], dtype=torch.float64)
        return batch

    @staticmethod
    def _branch_labels(branch: list[int]) -> list[int]:
        return branch[1:] + [IGNORE_INDEX]

    def _shared_rows(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = []
        for example in examples:
            prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
            stem = prompt[:-1]
            chosen_branch, rejected_branch = [prompt[-1], *chosen], [prompt[-1], *rejected]
            s, c, r = len(stem), len(chosen_branch), len(rejected_branch)
            n = s + c + r
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            visible = torch.zeros(n, n, dtype=torch.bool)
            visible[:, :s] = True  # everything sees the prompt stem
            visible[s : s + c, s : s + c] = True  # the chosen branch sees itself
            visible[s + c :, s + c :] = True  # the rejected branch sees itself
            rows.append(
                {
                    "input_ids": stem + chosen_branch + rejected_branch,
                    "position_ids": list(range(s)) + list(range(s, s + c)) + list(range(s, s + r)),
                    "shift_labels": [IGNORE_INDEX] * s
                    + self._branch_labels(chosen_branch)
                    + self._branch_labels(rejected_branch),
                    "chosen_mask": [False] * s + [True] * (c - 1) + [False] * (r + 1),
                    "attention_mask": causal & visible,
                }
            )
        return rows

    def _separate_rows(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = []
        for response_key in ("chosen_ids", "rejected_ids"):
            for example in examples:
                prompt, response = example["prompt_ids"], example[response_key]
                ids = prompt + response
                labels = [IGNORE_INDEX] * (len(prompt) - 1) + list(response) + [IGNORE_INDEX]
                rows.append(
                    {
                        "input_ids": ids,
                        "position_ids": list(range(len(ids))),
                        "shift_labels": labels,
                        "chosen_mask": [response_key == "chosen_ids" and label != IGNORE_INDEX for label in labels],
                    }
                )
        return rows


def response_token_counts(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's chosen and rejected token counts (every response token is scored), from examples or a dataset."""
    columns = pairs if hasattr(pairs, "column_names") else {k: [e[k] for e in pairs] for k in ("chosen_ids", "rejected_ids")}
    return tuple(torch.tensor([len(ids) for ids in columns[key]]) for key in ("chosen_ids", "rejected_ids"))


def make_collator(
    pad_token_id: int,
    share_prompt: bool | None = None,
    pad_to_multiple_of: int | None = None,
    length_buckets: int | None = 0,
    datasets: Sequence = (),
    batch_size: int = 16,
) -> PairCollator:
    """The collator for this device; `None` settings take the device's default (see config.TrainingConfig).

    With buckets, their widths and scored counts are drawn from the pairs of `datasets` (train and validation), in
    batches of `batch_size`. Without, widths are rounded up to `pad_to_multiple_of` (exact by default).
    """
    share_prompt = default_prompt_sharing(share_prompt)
    pad_to_multiple_of = device_default("pad_to_multiple_of", pad_to_multiple_of)
    length_buckets = device_default("length_buckets", length_buckets)
    buckets = None
    if length_buckets and datasets:
        multiple = pad_to_multiple_of if pad_to_multiple_of > 1 else BUCKET_MULTIPLE
        lengths = [n for dataset in datasets for n in row_lengths(dataset, share_prompt)]
        scored = [c + r for dataset in datasets for c, r in zip(*response_token_counts(dataset))]
        buckets = plan_buckets(lengths, [int(n) for n in scored], length_buckets, multiple, batch_size)
    return PairCollator(pad_token_id, share_prompt=share_prompt, pad_to_multiple_of=pad_to_multiple_of, buckets=buckets)


def epoch_padding(collator: PairCollator, batches: list[list[dict[str, Any]]]) -> dict[str, float]:
    """The share of positions and of scored-position slots that one epoch of these batches spends on padding."""
    tokens = positions = scored = slots = 0
    for examples in batches:
        lengths = row_lengths(examples, collator.share_prompt)
        rows = 1 if collator.share_prompt else 2
        width = collator._padded_length(max(lengths))
        tokens += sum(len(e["prompt_ids"]) * rows + len(e["chosen_ids"]) + len(e["rejected_ids"]) + (rows == 1) * 1
                      for e in examples)
        positions += width * rows * len(examples)
        count = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
        scored += count
        slots += collator.buckets.scored(count, len(examples)) if collator.buckets else count
    return {"positions": 1 - tokens / max(positions, 1), "scored": 1 - scored / max(slots, 1)}


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP, DeepSpeed, FSDP, torch.compile and PEFT wrappers."""
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    return model.get_base_model() if is_peft_model(model) else model


def _logit_transform(config) -> tuple[float | None, float]:
    """(final softcap, scale) of the logits, read from the config the way trl's `add_fused_lm_head` reads them."""
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return getattr(text, "final_logit_softcapping", None), 1.0 if scale is None else scale


@torch.compiler.disable
def _head_log_probs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, config) -> torch.Tensor:
    # TRL's chunked kernel (the logits never exist whole; fp32 accumulation), kept out of compiled graphs: its tiling
    # loops and Triton launches would be traced afresh for every new count of scored positions.
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2 shards it as a DTensor; the backbone's output is a plain tensor
        weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
    softcap, scale = _logit_transform(config)
    with maybe_gather_lm_head_ctx(weight, bias):
        log_probs = ChunkedLogProbFunction.apply(
            hidden.to(weight.device), weight, bias, labels.to(weight.device), 1.0, 32768, softcap, scale, ("log_probs",)
        )[0]
    return log_probs


def _router_balancing_loss(router_logits, config, token_mask: torch.Tensor) -> torch.Tensor:
    """A mixture-of-experts model's load-balancing loss over the real tokens, computed as TRL's fused LM head computes
    it (Mixtral's function, which every MoE family in transformers shares), without the coefficient."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text = config.get_text_config()
    return load_balancing_loss_func(router_logits, text.num_experts, text.num_experts_per_tok, token_mask)


def _scoring_forward(self, *args, scored_positions=None, scored_labels=None, labels=None, router_token_mask=None, **kwargs):
    """The model's forward, or with `scored_positions`: log p(label) at those flat (row, position) indices only.

    With `router_token_mask` (rows, width: the real tokens) as well, (log-probs, the router's load-balancing loss).
    """
    if scored_positions is None:
        if labels is not None:
            kwargs["labels"] = labels
        return self._forward_before_scoring(*args, **kwargs)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    kwargs["use_cache"] = False
    if router_token_mask is not None:
        kwargs["output_router_logits"] = True
    outputs = self.base_model(*args, **kwargs)
    # A gather with a fixed count (bucketed), unlike a boolean mask, whose size the host must wait for.
    hidden = outputs.last_hidden_state.flatten(0, 1).index_select(0, scored_positions)
    log_probs = _head_log_probs(hidden, self.get_output_embeddings(), scored_labels, self.config)
    if router_token_mask is None:
        return log_probs
    return log_probs, _router_balancing_loss(outputs.router_logits, self.config, router_token_mask)


def install_scoring_head(model: torch.nn.Module) -> None:
    """Let `model(..., scored_positions=, scored_labels=)` return per-position log-probs (see `pair_logps`).

    Like TRL's fused LM head, it patches the forward of the transformers model, so calls through DDP, FSDP, PEFT and
    torch.compile wrappers reach it. Install it before `accelerate` prepares the model (RecipeDPOTrainer does, in its
    constructor), so that the mixed-precision autocast accelerate puts around the forward surrounds this one too.
    """
    inner = _unwrapped(model)
    # Marked on the module, not the function: accelerate later replaces the forward with its autocast wrapper.
    if getattr(inner, "_forward_before_scoring", None) is not None:
        return
    inner._forward_before_scoring = inner.forward

    @functools.wraps(type(inner).forward)  # the original signature, which `generate` validates its kwargs against
    def forward(self, *args, **kwargs):
        return _scoring_forward(self, *args, **kwargs)

    inner.forward = types.MethodType(forward, inner)


def attention_mask_for(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The batch's mask in the form the model's attention implementation reads correctly."""
    if mask.dim() != 4:
        return mask  # a 2D padding mask: every implementation reads it the same way
    implementation = model.config._attn_implementation
    form = SHARED_PROMPT_MASKS.get(implementation)
    if form is None:
        raise ValueError(
            f"attention implementation {implementation!r} cannot read the shared-prompt mask; use one of "
            f"{', '.join(SHARED_PROMPT_MASKS)} or the separate layout (training.prompt_sharing: false)"
        )
    if form == "boolean":
        return mask
    # The most negative float rather than -inf: a softmax over -inf alone would be NaN (each row sees itself anyway).
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)


def token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, width): True at each row's real tokens, False at padding, in either layout."""
    mask = batch["attention_mask"]
    if mask.dim() == 2:  # separate rows: the padding mask itself
        return mask.bool()
    # One row per pair, its real tokens first: as many as the pair has.
    return torch.arange(mask.shape[-1], device=mask.device) < batch["pair_tokens"].to(mask.device).unsqueeze(1)


def score_pairs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], router_aux_loss: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed log-probabilities of each pair's chosen and rejected response, each of shape (pairs,), and with
    `router_aux_loss` a mixture-of-experts model's load-balancing loss over the batch's real tokens (else None).

    Only the scored positions go through the LM head (`install_scoring_head`), in every layout and on every device.
    Nothing here needs the host to wait for the device: the positions were listed by the collator, and bucket padding
    (slots of neither side) is masked out of the sums rather than filtered.
    """
    install_scoring_head(model)
    output = model(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask_for(_unwrapped(model), batch["attention_mask"]),
        position_ids=batch["position_ids"],
        scored_positions=batch["scored_positions"],
        scored_labels=batch["scored_labels"],
        router_token_mask=token_mask(batch) if router_aux_loss else None,
    )
    token_logps, aux_loss = output if router_aux_loss else (output, None)
    # Summed in float64: a response of a few hundred tokens loses ~1e-5 to fp32 rounding otherwise.
    token_logps = token_logps.double()
    per_pair = token_logps.new_zeros(len(batch["pair_tokens"]))
    chosen, rejected = (
        per_pair.index_add(0, batch["scored_pairs"], torch.where(batch[side], token_logps, 0.0))
        for side in ("scored_chosen", "scored_rejected")
    )
    return chosen, rejected, aux_loss


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each pair's chosen and rejected response (`score_pairs` without the router)."""
    chosen, rejected, _ = score_pairs(model, batch)
    return chosen, rejected


@torch.no_grad()
def dataset_pair_logps(
    model: torch.nn.Module,
    dataset,
    collator: PairCollator,
    batch_size: int,
    device: torch.device | str,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    process_index: int = 0,
    num_processes: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs for every pair of a tokenized dataset, in dataset order.

    Pairs are visited longest first, so each batch holds pairs of similar length and pads little. With several
    processes, process `process_index` scores every `num_processes`-th batch and returns nan for the pairs of the
    others; every process runs the same number of forwards (a sharded model all-gathers its weights in each), the
    last ones repeating a batch whose result is dropped. The batches are those of one process, so the log-probs
    equal a one-process pass.
    """
    lengths = dataset["length"]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[process_index::num_processes]
    forwards = -(-len(batches) // num_processes)
    columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    was_training = model.training
    model.eval()
    chosen_out = torch.full((len(order),), float("nan"), dtype=torch.float64)
    rejected_out = torch.full((len(order),), float("nan"), dtype=torch.float64)
    for step in range(forwards):
        indices = mine[step] if step < len(mine) else batches[0]
        batch = collator([columns[i] for i in indices])
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast():
            chosen, rejected = pair_logps(model, batch)
        if step < len(mine):
            index = torch.tensor(indices)
            chosen_out[index], rejected_out[index] = chosen.cpu(), rejected.cpu()  # already float64 (see `pair_logps`)
    model.train(was_training)
    return chosen_out, rejected_out
