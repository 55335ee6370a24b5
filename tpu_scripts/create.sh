#!/usr/bin/env bash
# Create a Cloud TPU VM slice, directly or through a queued resource.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --type TYPE [options] [-- EXTRA_GCLOUD_FLAGS...]

Create a TPU VM slice named NAME. With --queued, create a queued resource NAME whose node
is also called NAME, and wait until it is ACTIVE (queued resources are the way to get
v5p/v6e capacity and large slices; the slice then behaves like any TPU VM).

Types (the number is TensorCores for v4/v5p, chips for v5e/v6e):
  v4-8 ...     accelerator v4-N,        runtime tpu-ubuntu2204-base
  v5e-8 ...    accelerator v5litepod-N, runtime v2-alpha-tpuv5-lite
  v5p-32 ...   accelerator v5p-N,       runtime v2-alpha-tpuv5
  v6e-8 ...    accelerator v6e-N,       runtime v2-alpha-tpuv6e

Options:
  --type TYPE          slice type, as above                       [\$TPT_TPU_TYPE]
  --runtime VERSION    override the runtime (software) version
  --spot               Spot capacity (cheaper, can be preempted; runs resume from checkpoints)
  --queued             create through a queued resource (gcloud compute tpus queued-resources)
  --reserved           use reserved capacity (queued resources only)
  --valid-until DUR    give up on a queued request after DUR, e.g. 6h (queued resources only)
  --no-wait            do not wait for a queued resource to become ACTIVE
  -- FLAGS...          passed through to the gcloud create command (e.g. --network=...)
$COMMON_USAGE

Example:
  $SCRIPT_NAME --name tpt-2b --zone us-west4-a --type v5e-8 --spot
  $SCRIPT_NAME --name tpt-9b --zone us-east5-a --type v5p-32 --queued --dry-run
EOF
}

TPU_TYPE=${TPT_TPU_TYPE:-}
RUNTIME=""
SPOT=0
QUEUED=0
RESERVED=0
VALID_UNTIL=""
WAIT=1
EXTRA=()

parse_args() {
  normalize_args "$@"
  set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
  while [ $# -gt 0 ]; do
    case "$1" in
      --type) need_value "$@"; TPU_TYPE=$2; shift 2 ;;
      --runtime) need_value "$@"; RUNTIME=$2; shift 2 ;;
      --spot) SPOT=1; shift ;;
      --queued) QUEUED=1; shift ;;
      --reserved) RESERVED=1; shift ;;
      --valid-until) need_value "$@"; VALID_UNTIL=$2; shift 2 ;;
      --no-wait) WAIT=0; shift ;;
      --) shift; EXTRA=("$@"); break ;;
      *) common_option "$@" || usage_error "unknown option: $1"; shift "$SHIFT_N" ;;
    esac
  done
  check_common
  [ -n "$TPU_TYPE" ] || usage_error "--type is required (e.g. v5e-8, v5p-32)"
  resolve_tpu_type "$TPU_TYPE"
  if [ -n "$RUNTIME" ]; then RUNTIME_VERSION=$RUNTIME; fi
  if [ "$SPOT" = 1 ] && [ "$RESERVED" = 1 ]; then usage_error "--spot and --reserved exclude each other"; fi
  if [ "$QUEUED" = 0 ] && [ "$RESERVED" = 1 ]; then usage_error "--reserved needs --queued"; fi
  if [ "$QUEUED" = 0 ] && [ -n "$VALID_UNTIL" ]; then usage_error "--valid-until needs --queued"; fi
  return 0
}

create_tpu_vm() {
  local cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME")
  cmd+=(${LOCATION_FLAGS[@]+"${LOCATION_FLAGS[@]}"})
  cmd+=("--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
  if [ "$SPOT" = 1 ]; then cmd+=(--spot); fi
  run "${cmd[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
}

create_queued_resource() {
  local cmd=(gcloud compute tpus queued-resources create "$TPU_NAME")
  cmd+=(${LOCATION_FLAGS[@]+"${LOCATION_FLAGS[@]}"})
  cmd+=("--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE"
        "--runtime-version=$RUNTIME_VERSION")
  if [ "$SPOT" = 1 ]; then cmd+=(--spot); fi
  if [ "$RESERVED" = 1 ]; then cmd+=(--reserved); fi
  if [ -n "$VALID_UNTIL" ]; then cmd+=("--valid-until-duration=$VALID_UNTIL"); fi
  run "${cmd[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
}

# Polls the queued resource until ACTIVE (the TPU VM exists); fails on FAILED/SUSPENDED.
wait_until_active() {
  local cmd=(gcloud compute tpus queued-resources describe "$TPU_NAME")
  cmd+=(${LOCATION_FLAGS[@]+"${LOCATION_FLAGS[@]}"} "--format=value(state.state)")
  if [ "$DRY_RUN" = 1 ]; then
    note "repeat every 30 s until the state is ACTIVE:"
    run "${cmd[@]}"
    return 0
  fi
  local state last=""
  while true; do
    state=$("${cmd[@]}")
    if [ "$state" != "$last" ]; then info "queued resource $TPU_NAME: $state"; last=$state; fi
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED|SUSPENDING|DELETING)
        die "queued resource $TPU_NAME is $state (details: gcloud compute tpus queued-resources" \
          "describe $TPU_NAME; clean up with teardown.sh --queued)" ;;
    esac
    sleep 30
  done
}

main() {
  parse_args "$@"
  ready_to_run
  location_flags
  info "$TPU_TYPE: accelerator $ACCELERATOR_TYPE, runtime $RUNTIME_VERSION, $TPU_CHIPS chips on $TPU_HOSTS host(s)"
  if [ "$QUEUED" = 1 ]; then
    create_queued_resource
    if [ "$WAIT" = 1 ]; then wait_until_active; fi
  else
    create_tpu_vm
  fi
}

main "$@"
