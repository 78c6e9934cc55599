#!/usr/bin/env bash
# Body of the sbatch scripts: one `accelerate launch` per node through srun, rendezvous on the
# allocation's first node; SLURM's preemption warning becomes a clean stop plus a requeue, and a
# requeued job resumes from the saved state by itself.
set -euo pipefail
cd "${TL_DIR:-$SLURM_SUBMIT_DIR}"

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}  # processes per node; on CPU nodes 1
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node.yaml}
OUTPUT_DIR=${OUTPUT_DIR:-runs/slurm-$SLURM_JOB_ID}          # the job id survives a requeue
DATA_DIR=${DATA_DIR:-data/hymenoptera_data}
MODE=${MODE:-finetune}
VENV=${VENV:-.venv}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MAIN_PROCESS_PORT:-$((29500 + SLURM_JOB_ID % 1000))}

# After a requeue (or a resubmission with the same OUTPUT_DIR) continue the saved run.
resume=()
[[ -e $OUTPUT_DIR/config.json ]] && resume=(--resume)
echo "tl: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}, $SLURM_NNODES node(s) x $GPUS_PER_NODE," \
     "rendezvous $HEAD:$PORT, output $OUTPUT_DIR ${resume[*]}"

on_preempt() {
  echo "tl: preemption signal; stopping every process at its next step, then requeueing"
  scancel --signal=TERM "$SLURM_JOB_ID"  # all processes of the running step: tl stops cleanly
  wait "$srun_pid" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap on_preempt USR1 TERM

# The inner bash expands SLURM_NODEID per node; TRAIN_ARGS is split into words on purpose.
# shellcheck disable=SC2016,SC2086
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'exec "$0" launch --config_file "$1" \
    --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * $2)) --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$3" --main_process_port "$4" "${@:5}"' \
  "$VENV/bin/accelerate" "$ACCELERATE_CONFIG" "$GPUS_PER_NODE" "$HEAD" "$PORT" \
  train.py --mode "$MODE" --data-dir "$DATA_DIR" --output-dir "$OUTPUT_DIR" "${resume[@]}" ${TRAIN_ARGS:-} &
srun_pid=$!
wait "$srun_pid"  # in the background so the trap runs as soon as the signal comes
