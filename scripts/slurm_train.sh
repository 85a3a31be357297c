#!/usr/bin/env bash
# Slurm example: one torchrun per node (srun), c10d rendezvous on the job's first node.
#
#   sbatch --nodes 4 scripts/slurm_train.sh --cfg configs/swin/swin_base_patch4_window7_224.yaml \
#     --data-path /data/imagenet --batch-size 64 --output /checkpoints/swin
#
# Arguments go to main.py. Edit the #SBATCH lines (partition, time, GPUs per node) for your cluster, or
# override them on the sbatch command line. GPUS_PER_NODE [8] must match --gpus-per-node. A job that is
# requeued or restarted with the same --output auto-resumes from its newest checkpoint.
#SBATCH --job-name=swin
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --requeue
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^#SBATCH/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' | sed '1s/^/usage: /'
    exit 0
fi

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
# CPU threads per process for torch ops (data loading uses DATA.NUM_WORKERS worker processes).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv_id "$SLURM_JOB_ID" \
    main.py "$@"
