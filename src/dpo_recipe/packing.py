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
pair and its side, so TRL's fused LM head scores only those and the sums are the same function in both layouts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model
from torch.utils.data import DataLoader

IGNORE_INDEX = -100

# How each attention implementation reads the shared layout's 4D mask. SDPA takes booleans (True = attend); eager
# attention adds the mask to the scores, where True/False would become +1/0 and mask nothing. Kernels that take no
# 4D mask at all (flash attention) need the separate layout; flex attention crashes on CPU in torch 2.13, so it is
# not offered until it can be tested.
SHARED_PROMPT_MASKS = {"sdpa": "boolean", "eager": "additive"}


@dataclass
class PairCollator:
    pad_token_id: int
    share_prompt: bool = True
    pad_to_multiple_of: int | None = None

    @property
    def layout(self) -> str:
        return "shared_prompt" if self.share_prompt else "separate"

    def _padded_length(self, longest: int) -> int:
        if self.pad_to_multiple_of:
            return -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
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


GPU_PAD_MULTIPLE = 64


def make_collator(pad_token_id: int, share_prompt: bool, pad_to_multiple_of: int | None = None) -> PairCollator:
    """The collator for this device: on a GPU, widths are rounded up so only a few batch shapes ever occur."""
    if pad_to_multiple_of is None:
        pad_to_multiple_of = GPU_PAD_MULTIPLE if torch.cuda.is_available() else 1
    return PairCollator(pad_token_id, share_prompt=share_prompt, pad_to_multiple_of=pad_to_multiple_of)


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer under the LM head, through DDP, DeepSpeed, FSDP, torch.compile and PEFT wrappers."""
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if is_peft_model(model):
        model = model.get_base_model()
    return model.base_model


def _keep_scored_positions(backbone: torch.nn.Module, inputs, output):
    # Set by `pair_logps` around its forward; None for every other call (generation, plain forwards).
    if backbone.scored_positions is not None:
        hidden = output.last_hidden_state
        output.last_hidden_state = hidden.flatten(0, 1).index_select(0, backbone.scored_positions).unsqueeze(0)
    return output


def attention_mask_for(backbone: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The batch's mask in the form the model's attention implementation reads correctly."""
    if mask.dim() != 4:
        return mask  # a 2D padding mask: every implementation reads it the same way
    implementation = backbone.config._attn_implementation
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


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each pair's chosen and rejected response, each of shape (pairs,).

    The model must carry TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`). That head projects only the
    scored positions through the vocabulary on CUDA, but every position (prompt and padding too) elsewhere. So a
    forward hook on the backbone hands the head the scored positions alone, as one row, on every device: on CPU this
    halves the vocabulary projection of an hh-rlhf batch. The hook stays installed (adding and removing it per call
    would recompile a `torch.compile`d model every step) and acts only inside this function.
    """
    backbone = _backbone(model)
    if not hasattr(backbone, "scored_positions"):
        backbone.scored_positions = None
        backbone.register_forward_hook(_keep_scored_positions)
    backbone.scored_positions = batch["scored_positions"]
    try:
        outputs = model(
            input_ids=batch["input_ids"],
            attention_mask=attention_mask_for(backbone, batch["attention_mask"]),
            position_ids=batch["position_ids"],
            shift_labels=batch["scored_labels"].unsqueeze(0),
            fused_lm_head=True,
            use_cache=False,
        )
    finally:
        backbone.scored_positions = None
    # Summed in float64: a response of a few hundred tokens loses ~1e-5 to fp32 rounding otherwise.
    token_logps = outputs.log_probs.squeeze(0).double()
    pairs, chosen = len(batch["pair_tokens"]), batch["scored_chosen"]
    per_pair = token_logps.new_zeros(pairs)
    return (
        per_pair.index_add(0, batch["scored_pairs"], token_logps * chosen),
        per_pair.index_add(0, batch["scored_pairs"], token_logps * ~chosen),
    )


@torch.no_grad()
def dataset_pair_logps(
    model: torch.nn.Module,
    dataset,
    collator: PairCollator,
    batch_size: int,
    device: torch.device | str,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs for every pair of a tokenized dataset, in dataset order.

    Pairs are visited longest first, so each batch holds pairs of similar length and pads little.
    """
    lengths = dataset["length"]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    # A DataLoader draws a seed from the global RNG when iterated, even unshuffled. Its own generator keeps that draw
    # off the global RNG, so a run trains the same whether its reference log-probs were computed or read from cache.
    loader = DataLoader(
        [columns[i] for i in order], batch_size=batch_size, shuffle=False, collate_fn=collator,
        generator=torch.Generator(),
    )
    was_training = model.training
    model.eval()
    chosen_parts, rejected_parts = [], []
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast():
            chosen, rejected = pair_logps(model, batch)
        chosen_parts.append(chosen.cpu())  # already float64 (see `pair_logps`)
        rejected_parts.append(rejected.cpu())
    model.train(was_training)
    chosen_sorted, rejected_sorted = torch.cat(chosen_parts), torch.cat(rejected_parts)
    chosen_out, rejected_out = torch.empty_like(chosen_sorted), torch.empty_like(rejected_sorted)
    index = torch.tensor(order)
    chosen_out[index], rejected_out[index] = chosen_sorted, rejected_sorted
    return chosen_out, rejected_out
