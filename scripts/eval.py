"""Evaluate checkpoints: `python scripts/eval.py checkpoints/beta0.3 [--all-epochs] [--data FILE]` (see `eval --help`)."""

import sys

from dpo_recipe.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
