"""Command line: `python -m dpo_recipe <command>`. Each command parses, then calls one package function.

Expected failures (bad config, bad data, divergence) print one line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run file, e.g. configs/beta0.3.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any key, e.g. --set training.learning_rate=5e-5 (repeatable)",
    )


def _checked_config(args):
    """The config of --config and --set, with every check that needs no model or data: what print-config shows is
    what training accepts."""
    from .config import check_loss_import
    from .config_loader import load_config

    config = load_config(args.config, args.overrides)
    check_loss_import(config)
    return config


def _command_train(args) -> int:
    from .hub import check_hub_access

    config = _checked_config(args)
    if args.strict:
        config.data.strict = True
    if args.overwrite:
        config.training.overwrite = True
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    check_hub_access(config)  # before any model or data is loaded
    from .run import run_training  # imported after the config is known good: torch and trl take seconds

    return run_training(config, resume=args.resume, verbose=args.verbose, signal_after_stop=False)  # exits 130 instead


def _command_print_config(args) -> int:
    config = _checked_config(args)
    if args.run_dir:
        print(config.run_dir)
    else:
        print(config.to_yaml(), end="")
    return 0


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 (got {text!r})")
    return int(text)


def _command_show_data(args) -> int:
    from .config_loader import load_config
    from .hub import check_hub_access

    config = load_config(args.config, args.overrides)
    check_hub_access(config)  # the tokenizer may come from the model's hub id; no weights are loaded
    from .showdata import show_data

    print("\n".join(show_data(config, args.split, args.n, args.json)))
    return 0


def _command_eval(args) -> int:
    from .evaluate import eval_table, evaluate_paths

    results = evaluate_paths(
        args.paths, args.all_epochs, args.data, args.batch_size, reference=args.reference, beta=args.beta,
        data_format=args.format,
    )
    print(eval_table(results))
    print("\n".join(f"wrote {r['path']}" for r in results))
    return 0


def _command_rank(args) -> int:
    from .config import ConfigError
    from .evaluate import rank_responses, rank_table, read_rank_triples

    if args.pairs:
        triples = read_rank_triples(args.pairs)
    elif args.prompt and args.response_a is not None and args.response_b is not None:  # a response may be empty
        triples = [{"prompt": args.prompt, "response_a": args.response_a, "response_b": args.response_b}]
    else:
        raise ConfigError("rank: give --pairs FILE, or all of --prompt, --response-a and --response-b")
    print(rank_table(rank_responses(args.checkpoint, triples, reference=args.reference, beta=args.beta, data_format=args.format)))
    return 0


def _command_generate(args) -> int:
    from .generate import SamplingSettings, write_generations

    settings = SamplingSettings(args.num_prompts, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    out = write_generations(args.checkpoint, settings, args.out, args.reference, args.data, args.prompts, args.format)
    print(f"wrote {out}")
    return 0


def _command_merge(args) -> int:
    from .evaluate import merge_adapter

    print(f"wrote {merge_adapter(args.checkpoint, args.out)}")
    return 0


def _command_report(args) -> int:
    from .report import write_sweep_report

    print(f"wrote {write_sweep_report(args.runs, args.out)}")
    return 0


def _outside_a_run_arguments(parser: argparse.ArgumentParser, beta: bool = True) -> None:
    """What a run's config.yaml records, for a model directory that belongs to no run (a `merge` output, any HF model)."""
    from .config import DATA_FORMATS

    parser.add_argument(
        "--reference", metavar="PATH_OR_HUB_ID",
        help="model directory outside a run: the model it was trained from, scored as the reference",
    )
    if beta:
        parser.add_argument(
            "--beta", type=float,
            help="model directory outside a run: β of the implicit reward (default: its scoring.json's, else 0.1)",
        )
    parser.add_argument(
        "--format", choices=DATA_FORMATS, metavar="FORMAT",
        help="model directory the recipe did not write (no scoring.json): the data format it reads, as data.format "
        f"({', '.join(DATA_FORMATS)}; default auto: data files by their columns, your prompts as hh-rlhf turns)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-recipe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one config (launch under `accelerate launch` to scale out)")
    _config_arguments(train)
    restart = train.add_mutually_exclusive_group()
    restart.add_argument("--resume", action="store_true", help="continue from the latest complete epoch checkpoint")
    restart.add_argument(
        "--overwrite", action="store_true",
        help="start over: remove the run directory (checkpoints, metrics, best link) first (training.overwrite)",
    )
    train.add_argument("--strict", action="store_true", help="any bad data row is an error naming file:line")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument(
        "--verbose", action="store_true", help="everything: transformers' log dicts, progress bars and warnings"
    )
    train.set_defaults(handler=_command_train)

    show = commands.add_parser(
        "print-config", help="print the fully resolved config, after every check that needs no model or data"
    )
    _config_arguments(show)
    show.add_argument("--run-dir", action="store_true", help="print only the run directory it trains into")
    show.set_defaults(handler=_command_print_config)

    show_data = commands.add_parser(
        "show-data", help="what the model sees: pairs after rendering, tokenization and truncation (loads no model)"
    )
    _config_arguments(show_data)
    show_data.add_argument(
        "--split", choices=("all", "train", "val", "test"), default="all",
        help="a split as training samples it, or all: every usable pair in source order (default)",
    )
    show_data.add_argument("--n", type=_count, default=3, help="pairs to print (default 3)")
    show_data.add_argument(
        "--json", type=Path, metavar="FILE",
        help="write every pair of the split: source, row (as data_report.json numbers it) and the token ids training uses",
    )
    show_data.set_defaults(handler=_command_show_data)

    summary = "evaluate checkpoints on their run's test pairs (or --data); writes eval_<data>.json beside each"
    evaluate = commands.add_parser("eval", help=summary, description=summary)
    evaluate.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH",
        help="a checkpoint, a run directory (its best epoch), a directory of runs, or any model directory",
    )
    evaluate.add_argument("--all-epochs", action="store_true", help="every epoch of each run (default: its best epoch)")
    evaluate.add_argument(
        "--data",
        help="evaluate on this preference dataset instead: a local file or dataset directory in any format training "
        "reads (.jsonl, .json, .parquet, .csv, .gz), or a hub dataset id (its test split); needed for a model "
        "directory outside a run",
    )
    evaluate.add_argument(
        "--batch-size", type=int, help="pairs per forward batch (default: the run's training.eval_batch_size; if null, 32 on CPU, 128 on a GPU)"
    )
    _outside_a_run_arguments(evaluate)
    evaluate.set_defaults(handler=_command_eval)

    rank = commands.add_parser("rank", help="which of two responses a checkpoint prefers, by implicit reward")
    rank.add_argument("--checkpoint", required=True, type=Path, help="e.g. checkpoints/beta0.3/best, or any model directory")
    _outside_a_run_arguments(rank)
    rank.add_argument("--pairs", type=Path, help="JSONL of {prompt, response_a, response_b}")
    rank.add_argument("--prompt", help='the user turn, or a whole "\\n\\nHuman: ...\\n\\nAssistant:" dialogue')
    rank.add_argument("--response-a")
    rank.add_argument("--response-b")
    rank.set_defaults(handler=_command_rank)

    generate = commands.add_parser("generate", help="policy and reference samples for test prompts, side by side (markdown)")
    generate.add_argument("--checkpoint", required=True, type=Path, help="e.g. checkpoints/beta0.3/best, or any model directory")
    _outside_a_run_arguments(generate, beta=False)
    generate.add_argument("--data", help="take the prompts from this preference dataset (default: the run's test pairs)")
    generate.add_argument("--prompts", type=Path, help='your own prompts: JSONL of {"prompt": text or messages}, all used')
    generate.add_argument("--num-prompts", type=int, default=4)
    generate.add_argument("--max-new-tokens", type=int, default=48)
    generate.add_argument("--temperature", type=float, default=0.7)
    generate.add_argument("--top-p", type=float, default=0.9)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", type=Path, help="markdown file (default: <run>/generations_<checkpoint>.md)")
    generate.set_defaults(handler=_command_generate)

    report = commands.add_parser("report", help="sweep report: table and comparison plots of several runs")
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories, or a directory of runs")
    report.add_argument("--out", type=Path, default=Path("reports/sweep.md"))
    report.set_defaults(handler=_command_report)

    merge = commands.add_parser("merge", help="fold a LoRA checkpoint's adapter into its base model")
    merge.add_argument("--checkpoint", required=True, type=Path, help="an epoch-K (or best) directory holding an adapter")
    merge.add_argument("--out", required=True, type=Path, help="directory for the merged model and tokenizer")
    merge.set_defaults(handler=_command_merge)
    return parser


def _name_the_source(message: str, config_file: str, overrides: list[str]) -> str:
    """Checks made after loading (e.g. the model's context) name only the key: add the --set flag or file it came from."""
    if message.startswith(("--set ", config_file, str(Path(config_file).resolve()))):
        return message
    for override in reversed(overrides):  # the last --set of a key is the one that counts
        key = override.split("=", 1)[0].strip()
        if message.startswith((f"{key} ", f"{key}:")):
            return f"--set {override.strip()}: {message}"
    return f"{config_file}: {message}"


def quiet_third_party_output() -> None:
    """No progress bars for saving and loading, and no warnings known to be benign; `--verbose` keeps them all."""
    import logging
    import warnings

    # bitsandbytes (the .[qlora] extra), imported by PEFT and transformers whenever installed, says at import on an
    # AVX512-BF16 CPU that it cannot fetch an optional kernel from the hub, then uses its own: every command, no fault.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Writing model shards", "Loading weights": per file, per call
    # `datasets` ("Generating train split" for a dataset directory) reads this when imported; if it already is, tell it.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    # TRL and PEFT still call the old name internally; nothing the user can change, and it works until v6.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .sources import DataError

    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        quiet_third_party_output()
    config_file = getattr(args, "config", None)
    try:
        return args.handler(args)
    except (ConfigError, DataError) as error:
        message = str(error)
        if isinstance(error, ConfigError) and config_file:
            message = _name_the_source(message, config_file, args.overrides)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # A second Ctrl-C, or one before training began; complete `epoch-K` checkpoints are never touched by either.
        print("error: interrupted; complete epoch checkpoints are kept (if one exists, add --resume to the same command)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        from .totals import DivergenceError

        if isinstance(error, DivergenceError):
            print(f"error: training diverged: {error}; the last good checkpoint is intact", file=sys.stderr)
            return EXIT_DIVERGED
        raise
