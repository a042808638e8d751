"""Per-pair sums behind every logged mean: each step adds its pairs' statistics, each window reads exact means.

The trainer records each step's sums on the device; the callbacks and the log read windows of them. A read is also
where divergence is caught, before any save.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


class DivergenceError(RuntimeError):
    """The loss became nan or inf. Raised at the next read of the step statistics, which comes before any save."""


# Per-pair values gathered each step and summed; keeping sums (not per-batch means) makes every logged mean exact.
STAT_NAMES = ("loss", "chosen_reward", "rejected_reward", "wins", "ties", "pairs", "tokens", "logps_chosen", "logps_rejected")
# What each stat is logged as (TRL's names), besides the loss.
LOGGED_MEANS = {
    "rewards/chosen": "chosen_reward",
    "rewards/rejected": "rejected_reward",
    "rewards/margins": "margin",
    "rewards/accuracies": "accuracy",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
}


@dataclass
class RunningTotals:
    """Sums per window: `train` (the epoch so far), `eval` (the current evaluation), `log` (since the last log line).

    Each step's sums arrive as a tensor on the device (`record`) and are read to the host, all at once, only when
    something reads a window (`means`, `flush`): a read in every step would make the host wait for the device every
    step. The read is also where divergence is caught: the first non-finite step raises `DivergenceError`, naming
    it. Every save reads first (`RecipeDPOTrainer._save_checkpoint`), so no update after a bad step is ever saved.

    A window that is one pass over a dataset (`train`: an epoch, `eval`: a validation) knows how many pairs the pass
    holds, so `real_pairs` can tell the pairs of each step from the repeats that even out the last batches (see there).
    """

    sums: dict[str, dict[str, float]] = field(default_factory=lambda: {"train": {}, "eval": {}, "log": {}})
    # (windows, where, sums on the device) per step not read yet
    pending: list[tuple[tuple[str, ...], str, torch.Tensor]] = field(default_factory=list)
    # Pairs of the current pass a window has not seen yet; None where the pass size is unknown (every row counts).
    unseen: dict[str, int | None] = field(default_factory=dict)
    # When each window started (time.perf_counter), for throughput.
    started: dict[str, float] = field(default_factory=dict)

    def reset(self, window: str, pairs: int | None = None) -> None:
        """Start the window afresh; `pairs`: the size of the pass it covers, if it is one."""
        self.flush()
        self.sums[window] = dict.fromkeys(STAT_NAMES, 0.0)
        self.unseen[window] = pairs
        self.started[window] = time.perf_counter()

    def real_pairs(self, window: str, rows: int) -> int:
        """How many of a step's `rows` gathered pairs are real pairs of the window's pass; the rest are repeats.

        accelerate evens out the last batches of a pass (across processes, `even_batches`) by repeating pairs from its
        start, and only after every real pair: in the gathered order, process by process and step by step, the first
        pairs of a pass are the real ones. Counted per pass, not per batch, so it holds for any accumulation (where
        transformers fetches a whole accumulation window ahead, and accelerate's `gather_for_metrics` then cuts every
        batch of the last window to the remainder), any process count and any remainder.
        """
        left = self.unseen.get(window)
        if left is None:
            return rows
        real = min(rows, left)
        self.unseen[window] = left - real
        return real

    def elapsed(self, window: str) -> float:
        return time.perf_counter() - self.started.get(window, time.perf_counter())

    def snapshot(self) -> dict:
        """What a checkpoint keeps so a run resumed inside an epoch goes on with the same epoch and log windows."""
        self.flush()
        return {
            "sums": {window: dict(self.sums[window]) for window in ("train", "log")},
            "unseen": {"train": self.unseen.get("train")},
            "elapsed": {"train": self.elapsed("train")},
        }

    def restore(self, snapshot: dict, windows: tuple[str, ...]) -> None:
        self.flush()
        now = time.perf_counter()
        for window in windows:
            self.sums[window] = dict(snapshot["sums"][window])
            if window in snapshot["unseen"]:
                self.unseen[window] = snapshot["unseen"][window]
            self.started[window] = now - snapshot["elapsed"].get(window, 0.0)

    def add(self, window: str, values: list[float]) -> None:
        totals = self.sums[window] or dict.fromkeys(STAT_NAMES, 0.0)
        for name, value in zip(STAT_NAMES, values):
            totals[name] += value
        self.sums[window] = totals

    def record(self, windows: tuple[str, ...], where: str, values: torch.Tensor) -> None:
        self.pending.append((windows, where, values))

    def flush(self) -> None:
        """Read every pending step's sums, in order, into their windows; raise at the first non-finite one."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        rows = torch.stack([values for _, _, values in pending]).tolist()  # the one wait for the device
        for (windows, where, _), values in zip(pending, rows):
            if not all(map(_finite, values[:3])):
                raise DivergenceError(f"loss became {values[0] / max(values[5], 1):g} at {where}")
            for window in windows:
                self.add(window, values)

    def means(self, window: str) -> dict[str, float]:
        self.flush()
        totals = self.sums[window] or dict.fromkeys(STAT_NAMES, 0.0)
        pairs = max(totals["pairs"], 1.0)
        chosen, rejected = totals["chosen_reward"] / pairs, totals["rejected_reward"] / pairs
        return {
            "loss": totals["loss"] / pairs,
            "chosen_reward": chosen,
            "rejected_reward": rejected,
            "margin": chosen - rejected,
            "accuracy": totals["wins"] / pairs,
            "ties": totals["ties"] / pairs,
            "logps_chosen": totals["logps_chosen"] / pairs,
            "logps_rejected": totals["logps_rejected"] / pairs,
            "pairs": int(totals["pairs"]),
            "tokens": int(totals["tokens"]),
        }

def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")
