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
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bench_report import machine_description
from .results_file import replace_section

DEFAULT_TOKENIZER = Path("~/.cache/offline-models/smollm2-135m").expanduser()
GET_TOKENIZER = "/work/shared/tools/get-smollm2.sh"
RESULTS_HEADING = "## Data preparation: the recipe against TRL's `_prepare_dataset` (issue 20)"
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


@dataclass
class DataBenchSettings:
    pairs: int = 60_000
    seed: int = 0
    tokenizer: str = str(DEFAULT_TOKENIZER)
    max_length: int = 1024  # alignment-handbook's for UltraFeedback; TRL cuts at batch time, the recipe here
    processes: tuple[int, ...] = (1, 2)
    threads_off: bool = False  # a further recipe run on one process with the tokenizer's own threads off
    work_dir: str = ".cache/bench_data"  # the generated rows (kept) and each run's caches (emptied)
    output: str | None = "benchmarks/results.md"
    command: str = "make bench-data"


@dataclass
class Measurement:
    name: str
    seconds: float
    pairs: int
    peak_rss: int  # bytes: the measuring process's ru_maxrss
    peak_worker_rss: int  # bytes: the largest of its worker processes (0: none)
    row_digests: dict[int, str]  # 1-based line -> digest of (prompt, chosen, rejected) ids
    fits: dict[int, bool]  # TRL: line -> prompt + longest response <= max_length (the recipe cuts nothing there)
    note: str = ""


def _digests(dataset, lines) -> dict[int, str]:
    import hashlib

    columns = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
    return {line: hashlib.sha1(json.dumps(ids).encode()).hexdigest() for line, ids in zip(lines, columns)}


def _peak_rss() -> tuple[int, int]:
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)  # fmt: skip


def measure_recipe(settings: DataBenchSettings, data_file: str, num_proc: int, cache_dir: str, cache: bool,
                   threads: bool = True) -> Measurement:  # fmt: skip
    """`prepare_run_data`, as `train` calls it, in this (fresh) process."""
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import datasets
    import transformers  # noqa: F401 - imported before the clock starts, as for TRL
    import trl  # noqa: F401

    from .config import DataConfig, ModelConfig, RecipeConfig, TrainingConfig
    from .prepared import prepare_run_data

    datasets.disable_progress_bars()
    config = RecipeConfig(
        model=ModelConfig(name_or_path=settings.tokenizer),
        data=DataConfig(source=data_file, num_pairs=settings.pairs, num_test_pairs=0, max_length=settings.max_length,
                        num_proc=num_proc, cache=cache),  # fmt: skip
        training=TrainingConfig(reference_cache_dir=cache_dir, seed=settings.seed),
    )
    start = time.perf_counter()
    _, data, note = prepare_run_data(config)
    seconds = time.perf_counter() - start
    peak, workers = _peak_rss()
    digests = {}
    for split in ("train", "val", "test"):
        dataset = getattr(data, split)
        digests |= _digests(dataset, dataset["source_index"])
    return Measurement("", seconds, sum(data.report.pairs.values()), peak, workers, digests, {}, note)


def measure_trl(settings: DataBenchSettings, data_file: str, num_proc: int, cache_dir: str) -> Measurement:
    """`load_dataset("json")` + `maybe_extract_prompt` + TRL 1.16's `DPOTrainer._prepare_dataset`, in this (fresh)
    process, with an empty `datasets` cache."""
    from types import SimpleNamespace

    import datasets
    import transformers
    from trl import DPOTrainer
    from trl.data_utils import maybe_extract_prompt

    datasets.disable_progress_bars()
    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(settings.tokenizer)
    dataset = datasets.load_dataset("json", data_files=data_file, split="train", cache_dir=cache_dir)
    dataset = dataset.map(maybe_extract_prompt, num_proc=num_proc)
    trainer = SimpleNamespace(_tokenizer=tokenizer)  # the method reads only this of `self`
    arguments = SimpleNamespace(dataset_num_proc=num_proc, max_length=settings.max_length, truncation_mode="keep_end")
    prepared = DPOTrainer._prepare_dataset(trainer, dataset, tokenizer, arguments, "train")
    seconds = time.perf_counter() - start
    peak, workers = _peak_rss()
    lines = range(1, len(prepared) + 1)
    fits = {line: len(p) + max(len(c), len(r)) <= settings.max_length
            for line, p, c, r in zip(lines, prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])}  # fmt: skip
    return Measurement("", seconds, len(prepared), peak, workers, _digests(prepared, lines), fits)


def in_fresh_process(function, *args, **kwargs) -> Measurement:
    import multiprocessing

    # spawn: the measurement's imports, memory and caches are its own
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()


def run_data_benchmark(settings: DataBenchSettings) -> int:
    if not (Path(settings.tokenizer) / "tokenizer_config.json").is_file():
        print(f"bench-data: no tokenizer at {settings.tokenizer}; run {GET_TOKENIZER} (or pass --tokenizer DIR)", file=sys.stderr)
        return 2
    work = Path(settings.work_dir)
    data_file = str(write_dataset(work / f"ultrafeedback_like_{settings.pairs}_seed{settings.seed}.jsonl", settings.pairs, settings.seed))
    print(f"data: {data_file} ({Path(data_file).stat().st_size / 2**20:,.0f} MiB)", flush=True)
    runs: list[Measurement] = []

    def measure(name: str, function, *args, **kwargs) -> Measurement:
        with tempfile.TemporaryDirectory(dir=work) as cache_dir:
            result = in_fresh_process(function, settings, data_file, *args, cache_dir=kwargs.pop("cache_dir", cache_dir), **kwargs)
        result.name = name
        runs.append(result)
        print(f"{name}: {result.seconds:.1f} s, {result.pairs / result.seconds:,.0f} pairs/s, peak RSS "
              f"{result.peak_rss / 2**20:,.0f} MiB (workers {result.peak_worker_rss / 2**20:,.0f} MiB)", flush=True)  # fmt: skip
        return result

    with tempfile.TemporaryDirectory(dir=work) as cache_dir:
        for processes in settings.processes:
            measure(f"trl, dataset_num_proc={processes}", measure_trl, processes)
            # The last recipe run fills the cache (its time includes writing the entry) for the second run below.
            fills = processes == settings.processes[-1]
            name = f"recipe, data.num_proc={processes}" + (", filling the cache" if fills else "")
            measure(name, measure_recipe, processes, cache=fills, **({"cache_dir": cache_dir} if fills else {}))
        if settings.threads_off:
            measure("recipe, data.num_proc=1, tokenizer threads off", measure_recipe, 1, cache=False, threads=False)
        measure("recipe, second run: cache hit", measure_recipe, settings.processes[-1], cache=True, cache_dir=cache_dir)
    agreement = agreement_line(runs)
    print(agreement)
    if settings.output:
        write_section(Path(settings.output), settings, data_file, runs, agreement)
        print(f"wrote {settings.output}")
    return 0


def agreement_line(runs: list[Measurement]) -> str:
    """The recipe's ids against TRL's, pair by pair, where the recipe's truncation cuts nothing."""
    trl = next(run for run in runs if run.name.startswith("trl"))
    lines = [line for line, fits in trl.fits.items() if fits]
    checks = []
    for run in runs:
        if run.name.startswith("recipe"):
            same = sum(run.row_digests.get(line) == trl.row_digests[line] for line in lines)
            checks.append(same == len(lines))
    recipe = [run.row_digests for run in runs if run.name.startswith("recipe")]
    verdict = "identical" if all(checks) else "DIFFERENT"
    among = "identical" if all(digests == recipe[0] for digests in recipe) else "DIFFERENT"
    return (f"Token ids: every recipe run's are {verdict} to TRL's on the {len(lines):,} of {len(trl.fits):,} pairs "
            f"that fit in max_length (the recipe truncates the rest; TRL's collator cuts them at batch time), and "
            f"{among} to each other's on all pairs (1 or 2 processes, prepared or read from the cache).")  # fmt: skip


def _table(runs: list[Measurement]) -> list[str]:
    trl = {run.name.split("=")[-1]: run for run in runs if run.name.startswith("trl")}
    header = "| run | wall time | pairs/s | " + " | ".join(f"speed vs TRL num_proc={n}" for n in trl) + " | peak RSS (main process) | peak RSS (largest worker) |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in runs:
        ratios = " | ".join(f"{baseline.seconds / run.seconds:.2f}x" for baseline in trl.values())
        worker = f"{run.peak_worker_rss / 2**20:,.0f} MiB" if run.peak_worker_rss else "-"
        lines.append(f"| {run.name} | {run.seconds:,.1f} s | {run.pairs / run.seconds:,.0f} | {ratios} | "
                     f"{run.peak_rss / 2**20:,.0f} MiB | {worker} |")  # fmt: skip
    return lines


def write_section(path: Path, settings: DataBenchSettings, data_file: str, runs: list[Measurement], agreement: str) -> None:
    """This benchmark's section of `path` (appended the first time); the rest is left as is."""
    machine = machine_description()
    lines = [
        f"Command: `{settings.command}`. " + "; ".join(f"{key}: {value}" for key, value in machine.items())
        + f"; load average at the end {os.getloadavg()[0]:.1f} (`os.getloadavg`: above the core count, other jobs shared them).",
        "",
        f"- Data: {settings.pairs:,} generated pairs shaped like UltraFeedback-binarized "
        f"(`dpo_recipe.bench_data.ultrafeedback_like_rows`, seed {settings.seed}; a `prompt` string, `chosen` / "
        f"`rejected` message lists, {MULTI_TURN_SHARE:.0%} of them multi-turn, `messages` and scores; "
        f"{Path(data_file).stat().st_size / 2**20:,.0f} MiB of JSON lines), tokenized with "
        f"SmolLM2-135M-Instruct's tokenizer and chat template.",
        f"- recipe: `prepared.prepare_run_data`, what `train` runs: read and validate every row, sample the "
        f"{settings.pairs:,} pairs (data.num_pairs, num_test_pairs 0), render with the chat template, tokenize as "
        f"TRL does, truncate to max_length {settings.max_length}, build the Arrow datasets. `data.num_proc` processes; "
        "with 1 the fast tokenizer still uses its own threads on a batch (a row with them off, if shown, is one core). "
        "Its last run has `data.cache: true` (preparing and writing the entry); the second run of that config reads it.",
        "- trl: `load_dataset(\"json\")`, `maybe_extract_prompt` (as TRL's docs do for UltraFeedback-binarized), then "
        "TRL 1.16's `DPOTrainer._prepare_dataset` (`dataset_num_proc` as shown; a stand-in `self`, as in "
        "tests/test_trl_parity.py), in an empty `datasets` cache. It neither validates nor truncates (its collator "
        "cuts at batch time).",
        "- Each run in a fresh process; time includes loading the tokenizer. Peak RSS: `getrusage` ru_maxrss of the "
        "measuring process (imports included) and of its largest worker process.",
        "",
        *_table(runs),
        "",
        agreement,
    ]
    replace_section(path, RESULTS_HEADING, lines)
