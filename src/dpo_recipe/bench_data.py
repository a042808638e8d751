"""Data-preparation benchmark: the recipe's read + validate + render + tokenize + truncate against TRL 1.16's own
`DPOTrainer._prepare_dataset`, on a 60,000-pair conversational dataset shaped like UltraFeedback-binarized.

The rows are generated here (`ultrafeedback_like_rows`, deterministic from a seed) and written once as JSON lines.
Each measurement runs in a fresh process, so its peak memory (`getrusage` ru_maxrss) is its own:
- `recipe`: what training runs (`data.load_run_data` + `prepared.prepare_run_data`: read, validate, sample, render
  with the chat template, tokenize, truncate), the prepared-data cache off, on 1 and on 2 processes;
- `recipe_cached`: the same config again with the cache on, after a run that filled it (the fill is not timed);
- `trl`: `datasets.load_dataset("json")` + `maybe_extract_prompt` (as TRL's docs do for UltraFeedback-binarized) +
  `DPOTrainer._prepare_dataset` with `dataset_num_proc` 1 and 2 (a stand-in `self`, as tests/test_trl_parity.py
  calls it), in an empty `datasets` cache so nothing is reused from an earlier run.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .benchmark import machine_description

DEFAULT_TOKENIZER = Path("~/.cache/offline-models/smollm2-135m").expanduser()
GET_TOKENIZER = "/work/shared/tools/get-smollm2.sh"
RESULTS_START = "<!-- bench-data: start (written by `make bench-data`) -->"
RESULTS_END = "<!-- bench-data: end -->"
MULTI_TURN_SHARE = 0.15  # rows whose prompt is three messages (user, assistant, user)

# The most frequent words, in frequency order; rarer ones are made of syllables, so the vocabulary is large and
# Zipf-distributed, as in real text, and a byte-level BPE splits the rare ones into several tokens.
COMMON_WORDS = """the of and to a in is that for it as with was on be by this are or from at an which not have
you can but his they all were one their has more if will there when also been we would other what some its so
into than them only time these may first new about two like then do such use used any most each make how many
first after way well even because should just those very through where over much before same between could being
see own does both under while last great help data model people water example number system value function
result question answer process energy information different important possible following however work world
year day part place problem point set need group case fact hand high life state show form give large small long
""".split()
SYLLABLES = ("ba be bi bo bu ca ce ci co da de di do el en er es fa fe fi fo ga ge go ha he hi ho in is ja ka ke "
             "la le li lo lu ma me mi mo mu na ne ni no nu on or pa pe pi po ra re ri ro ru sa se si so su ta te "
             "ti to tu un ur va ve vi vo wa we wi xe yo za ze zi tion ment ness able ing").split()  # fmt: skip


@dataclass
class Vocabulary:
    words: list[str]
    weights: list[float]  # cumulative, for random.choices

    @classmethod
    def build(cls, size: int, rng: random.Random) -> Vocabulary:
        words = list(COMMON_WORDS)
        seen = set(words)
        while len(words) < size:
            word = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
            if word not in seen:
                seen.add(word)
                words.append(word)
        cumulative, total = [], 0.0
        for rank in range(1, size + 1):
            total += 1.0 / rank**1.05
            cumulative.append(total)
        return cls(words, cumulative)

    def text(self, count: int, rng: random.Random) -> str:
        """`count` words in sentences: capitalised, some commas and numbers, a full stop every 6-24 words."""
        words = rng.choices(self.words, cum_weights=self.weights, k=count)
        out, until_stop = [], 0
        for i, word in enumerate(words):
            if until_stop == 0:
                word, until_stop = word.capitalize(), rng.randint(6, 24)
            elif rng.random() < 0.03:
                word = str(rng.randint(0, 2030))
            until_stop -= 1
            out.append(word + ("." if until_stop == 0 or i == count - 1 else "," if rng.random() < 0.06 else ""))
        if count > 150:  # long answers come in paragraphs, some as lists, as assistants write them
            cut = rng.randint(count // 3, 2 * count // 3)
            out[cut] = ("\n\n- " if rng.random() < 0.3 else "\n\n") + out[cut].capitalize()
        return " ".join(out).replace(" \n\n", "\n\n")


def _length(rng: random.Random, median: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(0, 0.6) * median)))


def ultrafeedback_like_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows shaped like HuggingFaceH4/ultrafeedback_binarized's `train_prefs`: a `prompt` string and `chosen` /
    `rejected` message lists ([user, assistant], or [user, assistant, user, assistant] for a multi-turn row, whose
    first three messages both share), `messages`, `prompt_id` and scores. Prompts ~60 words (tens to hundreds),
    responses ~220 words (mostly 100-400)."""
    rng = random.Random(seed)
    vocabulary = Vocabulary.build(30_000, rng)
    rows = []
    for i in range(count):
        prompt = vocabulary.text(_length(rng, 60, 5, 600), rng) + "?"
        turns = [{"role": "user", "content": prompt}]
        if rng.random() < MULTI_TURN_SHARE:
            turns += [
                {"role": "assistant", "content": vocabulary.text(_length(rng, 150, 20, 500), rng)},
                {"role": "user", "content": vocabulary.text(_length(rng, 25, 3, 200), rng) + "?"},
            ]
        chosen, rejected = (vocabulary.text(_length(rng, 220, 30, 700), rng) for _ in range(2))
        scores = sorted((rng.randint(1, 10) for _ in range(2)), reverse=True)
        rows.append({
            "prompt": prompt,
            "prompt_id": f"{rng.getrandbits(64):016x}",
            "chosen": turns + [{"role": "assistant", "content": chosen}],
            "rejected": turns + [{"role": "assistant", "content": rejected}],
            "messages": turns + [{"role": "assistant", "content": chosen}],
            "score_chosen": float(scores[0]),
            "score_rejected": float(scores[1] - (scores[0] == scores[1])),
        })  # fmt: skip
    return rows


def write_dataset(path: Path, count: int, seed: int) -> Path:
    """The rows as JSON lines at `path`, written once (a file already there with this name is reused)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            for row in ultrafeedback_like_rows(count, seed):
                handle.write(json.dumps(row) + "\n")
        os.replace(temporary, path)
    return path
