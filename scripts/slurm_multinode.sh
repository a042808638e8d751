#!/usr/bin/env bash
# N machines x M GPUs with SLURM: one task per machine, each running `accelerate launch` with its own machine rank;
# the first node of the allocation is the rendezvous host. Submit with, for example:
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_multinode.sh configs/examples/llama-1b-lora-ultrafeedback.yaml
#SBATCH --job-name=dpo-recipe
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=${1:?usage: sbatch --nodes=N --gpus-per-node=M scripts/slurm_multinode.sh CONFIG [train.py arguments]}
shift
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
# The launcher forwards SIGUSR1 (from `#SBATCH --signal=USR1@120`) to the training processes instead of ending at it,
# so that training.save_on_signal can save before the time limit (README, "Preemption").
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
# Single quotes: SLURM_NODEID must expand on each node, not here.
srun bash -c 'accelerate launch --config_file recipes/accelerate_configs/multi_node.yaml \
  --num_machines "$SLURM_NNODES" --num_processes "$((SLURM_NNODES * '"$GPUS_PER_NODE"'))" \
  --machine_rank "$SLURM_NODEID" --main_process_ip '"$MAIN_HOST"' --main_process_port '"$MAIN_PORT"' \
  scripts/train.py --config "$0" "$@"' "$CONFIG" "$@"
