# ---- preemption and requeue (the same in every template) -----------------------------------------
# SLURM sends SIGUSR1 to this script {{grace_s}} s before the time limit (--signal=B:USR1@...). It is
# passed on to the training processes, which checkpoint at their next optimizer step and exit with
# {{requeue_exit_code}}; this script then requeues the job, which resumes from that checkpoint.
# SIGTERM (scancel, or preemption by another job) is passed on too, so a checkpoint is written, but
# the job is not requeued from here: SLURM itself requeues a preempted --requeue job.
# Without scontrol (e.g. in a container) the script exits with {{requeue_exit_code}} instead: set
# RequeueExit={{requeue_exit_code}} in slurm.conf so that SLURM requeues such jobs, or resubmit it.
REQUEUE_EXIT_CODE={{requeue_exit_code}}
warned=0
terminated=0
forward() { [ -n "${child:-}" ] && kill -"$FORWARD_SIGNAL" "$child" 2>/dev/null; }
trap 'warned=1; forward' USR1
trap 'terminated=1; forward' TERM

run_and_requeue() {
  "$@" &
  child=$!
  wait "$child"; status=$?
  # `wait` returns as soon as a trapped signal arrives: keep waiting while the job checkpoints
  while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
  if [ "$terminated" -eq 0 ] && { [ "$warned" -eq 1 ] || [ "$status" -eq "$REQUEUE_EXIT_CODE" ]; }; then
    if command -v scontrol >/dev/null 2>&1; then
      echo "launcher: checkpointed before the time limit; requeueing job $SLURM_JOB_ID"
      scontrol requeue "$SLURM_JOB_ID"
    else
      echo "launcher: checkpointed; no scontrol here: exiting with $REQUEUE_EXIT_CODE for the site's RequeueExit policy"
    fi
    exit "$REQUEUE_EXIT_CODE"
  fi
  exit "$status"
}
