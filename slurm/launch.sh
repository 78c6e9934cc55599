#!/usr/bin/env bash
# Body of the sbatch scripts: one `accelerate launch` per node through srun, rendezvous on the
# allocation's first node; SLURM's preemption warning becomes a clean stop plus a requeue, and a
# requeued job resumes from the saved state by itself.
#
# A step that dies otherwise (a rank killed or crashing, OOM, a node lost) requeues the job too,
# when OUTPUT_DIR holds a saved state (state.safetensors) and the job has been requeued fewer than
# MAX_RESTARTS times (env, default 3; SLURM_RESTART_COUNT counts every requeue, preemptions
# included). A run that ended with tl's one-line user error (exit status 2) is not requeued: it
# would fail the same way again.
#
# Resubmitting: the default OUTPUT_DIR is runs/slurm-<jobid>, and a new submission gets a new job
# id. To continue a run in a new job, submit with the same variables plus OUTPUT_DIR=runs/slurm-<old
# id> (e.g. sbatch --export ALL,OUTPUT_DIR=runs/slurm-1234 slurm/multi_node.sbatch): launch.sh adds
# --resume itself when OUTPUT_DIR holds a run, and tl continues after its last saved epoch.
#
# Array jobs: each task is its own job to SLURM; this script signals and requeues only its own task
# (JOB below), and OUTPUT_DIR and TRAIN_ARGS may use the task's variables ($SLURM_ARRAY_TASK_ID, ...)
# to give each task its own dir and options. Arguments to this script are more train.py options,
# after TRAIN_ARGS (slurm/sweep.sbatch passes a sweep's option set so).
set -euo pipefail
cd "${TL_DIR:-$SLURM_SUBMIT_DIR}"

fail() { echo "error: $*" >&2; exit 2; }

# SLURM's job and array variables in OUTPUT_DIR and TRAIN_ARGS, as $NAME or ${NAME}, are replaced by
# their values: text substitution, never eval, so nothing in these variables runs. Any other $ is
# refused (it would reach train.py as it is). SLURM_RESTART_COUNT is not offered: it changes on a
# requeue, and the resumed run must get the same options.
TASK_VARS=(SLURM_ARRAY_TASK_ID SLURM_ARRAY_JOB_ID SLURM_ARRAY_TASK_COUNT SLURM_ARRAY_TASK_MIN
           SLURM_ARRAY_TASK_MAX SLURM_ARRAY_TASK_STEP SLURM_JOB_ID)
expand_task_vars() {  # $1: the variable's name, for messages; $2: its value. Prints the expanded value.
  # shellcheck disable=SC2016  # a regex: a $ followed by a name, { or (
  local text=$2 rest=$2 name other='\$([{(]|[A-Za-z_])[A-Za-z0-9_]*'
  for name in "${TASK_VARS[@]}"; do
    rest=${rest//"\${$name}"/}
    rest=${rest//"\$$name"/}
  done
  if [[ $rest =~ $other ]]; then
    fail "$1 holds ${BASH_REMATCH[0]}, which launch.sh does not expand (only ${TASK_VARS[*]/#/\$});" \
         "write the value itself"
  fi
  for name in "${TASK_VARS[@]}"; do
    if [[ $text == *"\$$name"* || $text == *"\${$name}"* ]]; then
      [[ -n ${!name:-} ]] || fail "$1 uses \$$name, which job ${SLURM_JOB_ID:-?} does not have (not an array job?);" \
                                 "submit it with sbatch --array, or drop \$$name"
      text=${text//"\${$name}"/${!name}}
      text=${text//"\$$name"/${!name}}
    fi
  done
  printf '%s' "$text"
}

# The job to signal and requeue: an array task as <array job>_<task>, since a task's SLURM_JOB_ID
# can be the array's own id, which names every task of the array.
JOB=$SLURM_JOB_ID
[[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && JOB=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}  # processes per node; on CPU nodes 1
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node.yaml}
OUTPUT_DIR=$(expand_task_vars OUTPUT_DIR "${OUTPUT_DIR:-runs/slurm-$JOB}")  # the job id survives a requeue
TRAIN_ARGS=$(expand_task_vars TRAIN_ARGS "${TRAIN_ARGS:-}")
# Words split on whitespace; quotes are not parsed, and nothing is glob-expanded.
read -r -d '' -a train_args <<<"$TRAIN_ARGS" || true
DATA_DIR=${DATA_DIR:-data/hymenoptera_data}
MODE=${MODE:-finetune}
VENV=${VENV:-.venv}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RESTART=${SLURM_RESTART_COUNT:-0}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MAIN_PROCESS_PORT:-$((29500 + SLURM_JOB_ID % 1000))}

# After a requeue (or a resubmission with the same OUTPUT_DIR) continue the run. A dir where a run
# began (tl writes config.json first) gets --resume: tl continues after the last saved epoch, or
# starts afresh when none was saved; an empty or new dir starts the run.
resume=()
[[ -f $OUTPUT_DIR/config.json ]] && resume=(--resume)
echo "tl: job $JOB restart $RESTART, $SLURM_NNODES node(s) x $GPUS_PER_NODE," \
     "rendezvous $HEAD:$PORT, output $OUTPUT_DIR${resume:+ ${resume[*]}}" \
     "(to continue this run in a new job, submit it with OUTPUT_DIR=$OUTPUT_DIR)"

# A rank that ends with tl's user error (not a stop by a signal) touches this file: accelerate's
# launcher reports every failure as 1, and srun as 143 once --kill-on-bad-exit stops the other tasks.
TL_USER_ERROR_MARK=$(dirname "$OUTPUT_DIR")/.tl-user-error-$SLURM_JOB_ID
export TL_USER_ERROR_MARK
rm -f "$TL_USER_ERROR_MARK"
trap 'rm -f "$TL_USER_ERROR_MARK"' EXIT

# shellcheck disable=SC2317  # run by the trap below
on_preempt() {
  echo "tl: preemption signal; stopping every process at its next step, then requeueing"
  scancel --signal=TERM "$JOB"  # all processes of the running step: tl stops cleanly
  wait "$srun_pid" || true
  scontrol requeue "$JOB"
  exit 0
}
trap on_preempt USR1 TERM

# The inner bash expands SLURM_NODEID per node.
# shellcheck disable=SC2016
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'exec "$0" launch --quiet --config_file "$1" \
    --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * $2)) --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$3" --main_process_port "$4" "${@:5}"' \
  "$VENV/bin/accelerate" "$ACCELERATE_CONFIG" "$GPUS_PER_NODE" "$HEAD" "$PORT" \
  train.py --mode "$MODE" --data-dir "$DATA_DIR" --output-dir "$OUTPUT_DIR" "${resume[@]}" \
  "${train_args[@]}" "$@" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?  # in the background so the trap runs as soon as the signal comes
((status == 0)) && exit 0

# The step failed without the preemption signal: requeue a crash that left a saved state.
why="tl: step failed (srun exit status $status); not requeueing:"
if ((status == 2)) || [[ -e $TL_USER_ERROR_MARK ]]; then
  echo "$why tl stopped with a user error (its message is above), which a requeue would repeat"
  exit 2
elif [[ ! -e $OUTPUT_DIR/state.safetensors ]]; then
  echo "$why no saved state in $OUTPUT_DIR to resume from"
elif ((RESTART >= MAX_RESTARTS)); then
  echo "$why restart bound reached ($RESTART requeues, MAX_RESTARTS=$MAX_RESTARTS)"
else
  echo "tl: step failed (srun exit status $status) with a saved state in $OUTPUT_DIR;" \
       "requeueing (restart $((RESTART + 1)) of at most $MAX_RESTARTS)"
  scontrol requeue "$JOB"
  exit 0
fi
exit "$status"
