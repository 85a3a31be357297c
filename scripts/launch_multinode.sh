#!/usr/bin/env bash
# Multi-node training with torchrun and c10d rendezvous: run this same command on every node.
#
#   NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=node0.example.com \
#     bash scripts/launch_multinode.sh --cfg configs/swin/swin_base_patch4_window7_224.yaml \
#       --data-path /data/imagenet --batch-size 64
#
# Everything after the script name goes to main.py. Variables (defaults in brackets):
#   NNODES          number of nodes [1]; a range such as 2:4 makes the job elastic
#   NPROC_PER_NODE  processes (GPUs) per node [number of visible GPUs, else 1]
#   MASTER_ADDR     host name or IP of the rendezvous node, reachable from all nodes [localhost]
#   MASTER_PORT     its TCP port [29500]
#   RDZV_ID         job id shared by all nodes of one run [swin]; use a new one per run
#   MAX_RESTARTS    times torchrun restarts the workers after a failure [0]; main.py auto-resumes
#                   from the newest checkpoint in the output folder, so restarts continue the run
# The total batch is NNODES * NPROC_PER_NODE * --batch-size; the learning rate scales linearly with it
# (BASE_LR is per 512 images). Set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME if the nodes have several
# network interfaces.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' | sed '1s/^/usage: /'
    exit 0
fi

cd "$(dirname "$0")/.."
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

exec torchrun \
    --nnodes "${NNODES:-1}" \
    --nproc_per_node "${NPROC_PER_NODE}" \
    --rdzv_backend c10d \
    --rdzv_endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-swin}" \
    --max_restarts "${MAX_RESTARTS:-0}" \
    main.py "$@"
