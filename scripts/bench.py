"""Benchmark this recipe's trainer against plain trl.DPOTrainer: `python scripts/bench.py [--size tiny|124m] [...]`."""

import argparse
import shlex
import sys

import yaml

from dpo_recipe.bench_report import run_benchmark
from dpo_recipe.benchmark import MODEL_SHAPES, REAL_DATA, TRAINERS, BenchSettings
from dpo_recipe.config import TrainingConfig


def main() -> int:
    defaults = BenchSettings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=sorted(MODEL_SHAPES), default=defaults.size)
    parser.add_argument(
        "--data", default=str(REAL_DATA) if REAL_DATA.is_file() else None,
        help=f"hh-rlhf JSONL(.gz) (default: {REAL_DATA} if present, else synthetic pairs with hh-rlhf-like lengths)",
    )
    parser.add_argument("--synthetic", action="store_true", help="use synthetic pairs even if the data file exists")
    parser.add_argument("--train-pairs", type=int, default=defaults.train_pairs)
    parser.add_argument("--eval-pairs", type=int, default=defaults.eval_pairs)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument(
        "--eval-batch-size", type=int, default=defaults.eval_batch_size,
        help="pairs per batch for evaluation and the reference passes, for every trainer; 0: ours takes its device "
        "default (training.eval_batch_size: null), plain TRL the training batch",
    )
    parser.add_argument("--beta", type=float, default=defaults.beta)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--tokenizer-vocab-size", type=int, default=defaults.tokenizer_vocab_size)
    parser.add_argument(
        "--baselines", nargs="*", choices=TRAINERS[1:], default=list(defaults.baselines),
        help="plain-TRL baselines to run (default: both)",
    )
    parser.add_argument(
        "--repeats", type=int, default=defaults.repeats,
        help="runs per trainer, interleaved; the fastest is reported (default: %(default)s)",
    )
    parser.add_argument("--agreement-steps", type=int, default=defaults.agreement_steps, help="0 skips the check")
    parser.add_argument(
        "--ours-set", action="append", default=[], metavar="KEY=VALUE",
        help="a training.* setting for ours beyond its device defaults (YAML value), e.g. length_buckets=5",
    )
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE...]",
        help="after the agreement check, also run ours under this name (ours_...) with these training settings, "
        "e.g. ours_compiled:torch_compile=true",
    )
    parser.add_argument(
        "--profile-steps", type=int, default=defaults.profile_steps,
        help="training steps profiled after each timed run, for the device kernel time per step (default: 5 on a GPU, "
        "none on CPU)",
    )
    parser.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s, to report MFU")
    parser.add_argument("--output", default=defaults.output, help="results markdown file")
    args = parser.parse_args()

    def training_settings(settings: list[str], flag: str) -> dict:
        parsed = {}
        for setting in settings:
            key, _, value = setting.partition("=")
            if key not in TrainingConfig.__dataclass_fields__ or not value:
                parser.error(f"{flag} {setting!r}: expected KEY=VALUE with KEY a training setting")
            parsed[key] = yaml.safe_load(value)
        return parsed

    ours_training = training_settings(args.ours_set, "--ours-set")
    variants = {}
    for variant in args.variant:
        name, _, settings = variant.partition(":")
        if not name.startswith("ours_") or name in variants or not settings:
            parser.error(f"--variant {variant!r}: expected a new NAME starting ours_, a colon, and KEY=VALUE settings")
        variants[name] = training_settings(settings.split(","), f"--variant {name}:")
    settings = BenchSettings(
        size=args.size,
        data=None if args.synthetic else args.data,
        train_pairs=args.train_pairs,
        eval_pairs=args.eval_pairs,
        epochs=args.epochs,
        eval_batch_size=args.eval_batch_size or None,
        beta=args.beta,
        learning_rate=args.learning_rate,
        ours_training=ours_training,
        variants=variants,
        profile_steps=args.profile_steps,
        tokenizer_vocab_size=args.tokenizer_vocab_size,
        baselines=tuple(args.baselines),
        agreement_steps=args.agreement_steps,
        repeats=args.repeats,
        peak_flops=args.peak_flops,
        output=args.output,
        command=shlex.join(["python", "scripts/bench.py", *sys.argv[1:]]),
    )
    return run_benchmark(settings)


if __name__ == "__main__":
    sys.exit(main())
