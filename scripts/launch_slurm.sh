#!/usr/bin/env bash
# A SLURM batch script: one jaxllm process per node, all GPUs of the node in that process.
#
#   sbatch --nodes=4 --gpus-per-node=8 scripts/launch_slurm.sh \
#       --config configs/gpt2_124m.py --workdir /shared/runs/gpt2
#
# srun starts the same command on every node; JAXLLM_DISTRIBUTED=auto makes
# jax.distributed.initialize() read the coordinator, process count and process id from
# SLURM's environment. The workdir must be on a filesystem all nodes share.
#
# Preemption and time limits: --signal=TERM@120 has SLURM send SIGTERM to the training
# processes 120 s before the time limit (and a preempting scheduler sends it before the kill).
# They agree on a step, save a checkpoint, wait until it is written and exit with status 75;
# this script then requeues the job, and the requeued job resumes from that checkpoint.
# Exit 2 (bad config or data) and 3 (training diverged) are not retried.
#
#SBATCH --job-name=jaxllm
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=jaxllm-%j.out
set -uo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: sbatch [--nodes=N --gpus-per-node=G ...] $0 --config FILE --workdir DIR [--config.x.y=v ...]" >&2
  exit 2
fi

export JAXLLM_DISTRIBUTED=auto
export TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}

srun --kill-on-bad-exit=1 "$python" -m jaxllm.train "$@"
status=$?
if [[ $status -eq 75 ]]; then
  echo "preempted after a checkpoint (job $SLURM_JOB_ID); requeueing to resume" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit $status
