"""Compiled against eager training steps of one config, in one process, interleaved step by step.

    python scripts/compile_profile.py [--config configs/smoke.yaml] [--set KEY=VALUE ...] [--shapes dynamic,automatic]
                                      [--passes 3] [--profile]

Each trainer is built by `prepare_run` from the same config (so the same weights, data and reference log-probs);
`eager` runs the model as it is, every name in --shapes runs it under `torch.compile` the way accelerate compiles it
(`torch.compile(model, backend=..., mode=..., dynamic=...)`): `dynamic` is what the recipe's trainer passes (shapes
traced dynamic from the first batch), `automatic` is dynamo's default (the first width static, dynamic from the
second), `static` a graph per batch shape. The first pass over one epoch's batches compiles; the passes after it
alternate the trainers batch by batch, so machine load falls on all of them alike, and report each step's time
relative to eager's on the same batch. Wall times, with the device synchronised after each step on a GPU. Inductor's
on-disk caches and dynamo's saved dynamic-shape decisions are off unless --warm, so the first pass pays what a
first run pays. `--profile` adds a torch.profiler table of one more pass per trainer. Nothing is saved; the run directories are
written under the config's output_dir.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch._functorch.config
import torch._inductor.config
from torch._dynamo.utils import counters

from dpo_recipe.config_loader import load_config
from dpo_recipe.run import prepare_run

SHAPES = {"dynamic": True, "automatic": None, "static": False}


def build(config_path: str, overrides: list[str], name: str, dynamic, backend: str):
    config = load_config(config_path, [*overrides, f"run_name=compile_profile_{name}", "training.overwrite=true",
                                       "training.torch_compile=false"])
    trainer = prepare_run(config).trainer
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which this replaces
    model = trainer.model if name == "eager" else torch.compile(trainer.model, backend=backend, dynamic=dynamic)
    return trainer, model


def step(trainer, model, batch) -> float:
    started = time.perf_counter()
    trainer.training_step(model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--shapes", default="dynamic,automatic", help=f"compiled trainers, some of {', '.join(SHAPES)}")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--passes", type=int, default=3, help="interleaved passes after the compiling one")
    parser.add_argument("--warm", action="store_true", help="let inductor and dynamo read what earlier runs saved")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if not args.warm:
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
        torch._dynamo.config.automatic_dynamic_local_pgo = False
    names = ["eager", *args.shapes.split(",")]
    if not set(names[1:]) <= set(SHAPES):
        parser.error(f"--shapes: each of {', '.join(SHAPES)}")
    trainers = {name: build(args.config, args.set, name, SHAPES.get(name), args.backend) for name in names}
    batches = list(trainers["eager"][0].get_train_dataloader())
    shapes = sorted({(*batch["input_ids"].shape, len(batch["scored_positions"])) for batch in batches})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(batches)} batches a pass, "
          f"{len(shapes)} (rows, width, scored) shapes: {shapes}", flush=True)
    for name, (trainer, model) in trainers.items():
        model.train()
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        seconds = sum(step(trainer, model, batch) for batch in batches)
        print(f"first pass, {name}: {seconds:.1f} s; graphs compiled {counters['stats']['unique_graphs'] - graphs}, "
              f"graph breaks {sum(counters['graph_break'].values()) - breaks}", flush=True)
    graphs = counters["stats"]["unique_graphs"]
    for number in range(1, args.passes + 1):
        times: dict[str, list[float]] = {name: [] for name in names}
        for batch in batches:
            for name, (trainer, model) in trainers.items():
                times[name].append(step(trainer, model, batch))
        line = f"pass {number}: eager median step {statistics.median(times['eager']) * 1e3:.1f} ms"
        for name in names[1:]:
            ratios = [mine / eager for mine, eager in zip(times[name], times["eager"])]
            line += (f"; {name} {statistics.median(times[name]) * 1e3:.1f} ms, vs eager median "
                     f"{statistics.median(ratios):.2f}x (per step {min(ratios):.2f}-{max(ratios):.2f})")
        print(line + f"; graphs compiled {counters['stats']['unique_graphs'] - graphs}", flush=True)
    if args.profile:
        for name, (trainer, model) in trainers.items():
            with torch.profiler.profile() as profile:
                for batch in batches:
                    with torch.profiler.record_function("## training step"):
                        step(trainer, model, batch)
            print(f"== {name}, one pass\n" + profile.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
