#!/bin/bash
# cmc segment over a folder of studies as a Slurm array: each task segments its own share of
# the cases (--shard auto: share I of N from SLURM_ARRAY_TASK_ID relative to the array's
# first index, N = the array's task count), all into one output folder on a shared
# filesystem. Submit, then merge once every task has ended (see merge-shards.sh):
#
#   ARRAY=$(sbatch --parsable deploy/slurm/segment-array.sh)
#   sbatch --dependency=afterany:$ARRAY deploy/slurm/merge-shards.sh
#
# Paths come from the environment (sbatch passes the submitter's by default, or give
# --export=ALL,CMC_INPUT=...): CMC_INPUT (folder of studies), CMC_OUT (output folder),
# CMC_MODEL (exported model dir); CMC_SERVER (optional): a Triton URL such as
# grpc://triton.internal:8001, then every task runs against that one deployment;
# CMC_SEGMENT_ARGS (optional): further `cmc segment` flags, split on spaces.
# --continue makes a requeued or re-run task skip the cases it already finished.
# Change --array to the number of tasks you want (--array=0-7 and 1-8 both give 8 shares).
#SBATCH --job-name=cmc-segment
#SBATCH --array=1-8
#SBATCH --cpus-per-task=1
#SBATCH --requeue
#SBATCH --output=cmc-segment-%A_%a.log
set -euo pipefail
: "${CMC_INPUT:?set CMC_INPUT to the folder of studies}"
: "${CMC_OUT:?set CMC_OUT to the output folder (shared by every task)}"
: "${CMC_MODEL:?set CMC_MODEL to the exported model directory}"
server=()
if [[ -n "${CMC_SERVER:-}" ]]; then
    server=(--runtime triton --server "$CMC_SERVER")
fi
# shellcheck disable=SC2086  # CMC_SEGMENT_ARGS is a list of flags
exec cmc segment "$CMC_INPUT" -o "$CMC_OUT" --model "$CMC_MODEL" "${server[@]}" \
    --shard auto --continue --jobs "${SLURM_CPUS_PER_TASK:-1}" ${CMC_SEGMENT_ARGS:-}
