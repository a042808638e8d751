"""Command line: `python -m dpo_recipe <command>`. Each command parses, then calls one package function.

Expected failures (bad config, bad data, divergence) print one line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run file, e.g. configs/beta0.3.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any key, e.g. --set training.learning_rate=5e-5 (repeatable)",
    )


def _command_train(args) -> int:
    from .config import load_config
    from .trainer import run_training

    config = load_config(args.config, args.overrides)
    if args.strict:
        config.data.strict = True
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    return run_training(config, resume=args.resume)


def _command_print_config(args) -> int:
    from .config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-recipe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one config (launch under `accelerate launch` to scale out)")
    _config_arguments(train)
    train.add_argument("--resume", action="store_true", help="continue from the latest complete epoch checkpoint")
    train.add_argument("--strict", action="store_true", help="any bad data row is an error naming file:line")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(handler=_command_train)

    show = commands.add_parser("print-config", help="print the fully resolved config (loads no model or data)")
    _config_arguments(show)
    show.set_defaults(handler=_command_print_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:
        from .trainer import DivergenceError

        if isinstance(error, DivergenceError):
            print(f"error: training diverged: {error}; the last good checkpoint is intact", file=sys.stderr)
            return EXIT_DIVERGED
        raise
