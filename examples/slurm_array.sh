#!/bin/bash
# A study as a SLURM job array: each task runs one slice of the extract/data/train/eval units,
# then one dependent job finds every unit cached and writes the sweep and report.
#
#   first=$(sbatch --parsable examples/slurm_array.sh examples/study_qwen7b.yaml)
#   sbatch --dependency=afterok:$first --gpus=1 --wrap "persona-geometry run examples/study_qwen7b.yaml"
#
# The output folder must be on a file system every node sees. Shards that need the same unit
# (every shard needs the single data unit) take a file lock and compute it once.
#SBATCH --job-name=persona-geometry
#SBATCH --array=0-7
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
set -euo pipefail
persona-geometry run "$1" --shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"
