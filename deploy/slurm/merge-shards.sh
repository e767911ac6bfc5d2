#!/bin/bash
# The step after a segment-array.sh array: merge every task's records into CMC_OUT/report.json
# and say whether the whole array succeeded. Submit it as a job that depends on the array:
#
#   sbatch --dependency=afterany:$ARRAY deploy/slurm/merge-shards.sh
#
# afterany (not afterok) so it also runs when a task failed or was cancelled: its exit code
# then says what to do. 0: every shard finished and every case is done; 1: some case failed
# (CMC_OUT/failures.csv lists them); 2: a shard is missing or did not finish (report.json's
# "shards" names it: requeue that task, `scontrol requeue JOBID_TASK`, and merge again).
#SBATCH --job-name=cmc-merge-shards
#SBATCH --cpus-per-task=1
#SBATCH --output=cmc-merge-shards-%j.log
set -euo pipefail
: "${CMC_OUT:?set CMC_OUT to the output folder the array wrote into}"
exec cmc merge-shards "$CMC_OUT"
