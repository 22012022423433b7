#!/usr/bin/env bash
# Runs one jaxllm training command on every worker of a Cloud TPU pod slice.
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE -- --config configs/gpt2_124m.py --workdir /mnt/shared/runs/gpt2
#
# Every worker runs the same command with JAXLLM_DISTRIBUTED=auto, so jax.distributed.initialize()
# reads the slice's topology itself; each worker feeds its own share of the data. The workdir must
# be one directory that all workers see (an NFS/Filestore or gcsfuse mount): orbax writes each
# worker's shards of a checkpoint there and process 0 writes metrics.jsonl and config.json.
#
# Preemption / maintenance: the workers get SIGTERM, agree on a step, save a checkpoint and exit
# with status 75. Rerun this script (after the slice is back) with the same arguments to resume.
#
# Environment: REPO_DIR (checkout on every worker, default ~/jaxllm), PYTHON (default python3),
# PROJECT (gcloud project, default: gcloud's), SETUP (a command run first on every worker, e.g.
# "git -C ~/jaxllm pull && pip install -q -r ~/jaxllm/requirements.txt"; default: none).
set -euo pipefail

if [[ $# -lt 3 || $3 != "--" ]]; then
  echo "usage: $0 TPU_NAME ZONE -- TRAIN_ARGS..." >&2
  exit 2
fi
tpu_name=$1 zone=$2
shift 3

repo_dir=${REPO_DIR:-'~/jaxllm'}
python=${PYTHON:-python3}
train_args=$(printf '%q ' "$@")
remote="cd $repo_dir && JAXLLM_DISTRIBUTED=auto TOKENIZERS_PARALLELISM=false $python -m jaxllm.train $train_args"
if [[ -n ${SETUP:-} ]]; then
  remote="$SETUP && $remote"
fi

project_flag=()
if [[ -n ${PROJECT:-} ]]; then
  project_flag=(--project "$PROJECT")
fi

set +e
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" "${project_flag[@]}" --worker=all \
  --command "$remote"
status=$?
set -e
if [[ $status -eq 75 ]]; then
  echo "preempted after a checkpoint; rerun the same command to resume" >&2
fi
exit $status
