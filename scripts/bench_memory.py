"""Memory per setting (full fp32 / bf16 weights, LoRA, QLoRA): measured on tiny Llama models on this CPU, counted on
fake tensors at 0.5B-8B shapes; writes its section of benchmarks/results.md. `python scripts/bench_memory.py [...]`."""

import argparse
import shlex
import sys

from dpo_recipe.bench_memory import REAL_SHAPES, SETTINGS, TINY_SHAPES, Batch
from dpo_recipe.bench_memory_report import MemorySettings, run_memory_benchmark
from dpo_recipe.bench_report import machine_description


def main() -> int:
    defaults = MemorySettings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", nargs="+", choices=list(TINY_SHAPES), default=list(defaults.tiny_shapes),
                        help="tiny shapes measured on real tensors")
    parser.add_argument("--real", nargs="*", choices=list(REAL_SHAPES), default=list(defaults.real_shapes),
                        help="real shapes counted on fake tensors for the table")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(defaults.settings))
    parser.add_argument("--pairs", type=int, default=defaults.measured_batch.pairs, help="pairs per measured step")
    parser.add_argument("--prompt", type=int, default=defaults.measured_batch.prompt, help="prompt tokens, measured")
    parser.add_argument("--response", type=int, default=defaults.measured_batch.response, help="response tokens, measured")
    parser.add_argument("--cache", default=defaults.cache, help="each run's JSON, reused by the next invocation")
    parser.add_argument("--fresh", action="store_true", help="redo every run instead of reusing the cache")
    parser.add_argument("--output", default=defaults.output, help="markdown file whose memory section is replaced")
    parser.add_argument("--note", help="a line for the results, e.g. how loaded the machine was")
    args = parser.parse_args()
    settings = MemorySettings(
        tiny_shapes=tuple(args.tiny), real_shapes=tuple(args.real), settings=tuple(args.settings),
        measured_batch=Batch(pairs=args.pairs, prompt=args.prompt, response=args.response), cache=args.cache, fresh=args.fresh,
        output=args.output or None, note=args.note, command=shlex.join(["python", "scripts/bench_memory.py", *sys.argv[1:]]),
    )
    print("\n".join(run_memory_benchmark(settings, machine_description())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
