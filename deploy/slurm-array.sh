#!/bin/bash
# N workers of one run as a Slurm job array: each task runs `image-runner work` until no job is
# left. Plan the run once first, from the login node:
#   image-runner run jobs/catalog.csv --state postgresql://runner@db/runner --out s3://images/catalog
# then: sbatch deploy/slurm-array.sh
# PGPASSWORD and IMAGE_RUNNER_API_KEY come from the environment sbatch passes on (or ~/.pgpass).
#SBATCH --job-name=image-runner
#SBATCH --array=1-8
#SBATCH --cpus-per-task=2
#SBATCH --mem=1G
#SBATCH --time=12:00:00
#SBATCH --requeue
exec image-runner work --state postgresql://runner@db/runner --out s3://images/catalog \
  --concurrency 16 --no-progress
