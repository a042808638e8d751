"""Train one DPO config: `accelerate launch scripts/train.py --config configs/beta0.3.yaml [--set k=v] [--resume]`."""

import sys

from dpo_recipe.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
