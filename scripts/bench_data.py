"""Data-preparation benchmark, the recipe against TRL's `_prepare_dataset`: `python scripts/bench_data.py [--pairs N]`."""

import argparse
import shlex
import sys

from dpo_recipe.bench_data import DataBenchSettings, run_data_benchmark


def main() -> int:
    defaults = DataBenchSettings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=defaults.pairs, help="generated pairs (default: %(default)s; 2000 rehearses)")
    parser.add_argument("--tokenizer", default=defaults.tokenizer, help="a tokenizer directory with a chat template (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--processes", type=int, nargs="+", default=list(defaults.processes), help="num_proc values to compare")
    parser.add_argument("--threads-off", action="store_true", help="also run the recipe on 1 process without tokenizer threads")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--work-dir", default=defaults.work_dir, help="the generated data and the runs' caches")
    parser.add_argument("--output", default=defaults.output, help="results file whose data section is replaced; '' for none")
    args = parser.parse_args()
    settings = DataBenchSettings(
        pairs=args.pairs, seed=args.seed, tokenizer=args.tokenizer, max_length=args.max_length,
        processes=tuple(args.processes), threads_off=args.threads_off, work_dir=args.work_dir, output=args.output or None,
        command=shlex.join(["python", "scripts/bench_data.py", *sys.argv[1:]]),
    )  # fmt: skip
    return run_data_benchmark(settings)


if __name__ == "__main__":
    sys.exit(main())
