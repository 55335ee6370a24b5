#!/usr/bin/env bash
# Delete a TPU VM slice (or its queued resource); optionally save the worker logs first.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [options]

Delete the TPU VM NAME, or with --queued the queued resource NAME together with its TPU VM
(queued-resources delete --force). Outputs and checkpoints on gs:// are kept; everything on
the workers' disks is lost, so --save-logs copies ~/$REMOTE_RUN/worker-*.log first.

Options:
  --queued           NAME is a queued resource (created with create.sh --queued)
  --save-logs DIR    copy every worker's log into local DIR before deleting
  --yes              do not ask for confirmation (passes --quiet to gcloud)
$COMMON_USAGE

Example:
  $SCRIPT_NAME --name tpt-9b --zone us-east5-a --queued --save-logs logs/tpt-9b
EOF
}

QUEUED=0
SAVE_LOGS=""
YES=0

parse_args() {
  normalize_args "$@"
  set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
  while [ $# -gt 0 ]; do
    case "$1" in
      --queued) QUEUED=1; shift ;;
      --save-logs) need_value "$@"; SAVE_LOGS=$2; shift 2 ;;
      --yes|--quiet) YES=1; shift ;;
      *) common_option "$@" || usage_error "unknown option: $1"; shift "$SHIFT_N" ;;
    esac
  done
  check_common
}

save_logs() {
  note "mkdir -p $SAVE_LOGS"
  if [ "$DRY_RUN" = 0 ]; then mkdir -p "$SAVE_LOGS"; fi
  location_flags
  # Each worker's log has its own name (worker-N.log), so all of them land side by side.
  run gcloud compute tpus tpu-vm scp "$TPU_NAME:$REMOTE_RUN/worker-*.log" "$SAVE_LOGS/" \
    ${LOCATION_FLAGS[@]+"${LOCATION_FLAGS[@]}"} --worker=all
}

delete() {
  local cmd
  if [ "$QUEUED" = 1 ]; then
    cmd=(gcloud compute tpus queued-resources delete "$TPU_NAME" --force)
  else
    cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME")
  fi
  location_flags
  cmd+=(${LOCATION_FLAGS[@]+"${LOCATION_FLAGS[@]}"})
  if [ "$YES" = 1 ]; then cmd+=(--quiet); fi
  run "${cmd[@]}"
}

main() {
  parse_args "$@"
  ready_to_run
  if [ -n "$SAVE_LOGS" ]; then save_logs; fi
  delete
}

main "$@"
