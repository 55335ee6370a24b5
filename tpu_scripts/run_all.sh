#!/usr/bin/env bash
# create.sh + setup.sh + launch.sh in one go: from nothing to a running `tpt run` on a slice.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --type TYPE --config CONFIG --output gs://BUCKET/PATH [options] [-- TPT_RUN_ARGS...]

Create the slice (create.sh), install tpt_jax with jax[tpu] on every worker (setup.sh) and
start \`tpt run CONFIG --output gs://...\` on all workers (launch.sh). Follow the run with
logs.sh and delete the slice with teardown.sh when it is done. Each step's options are
described in its own --help.

Options:
  create.sh:  --type TYPE  --runtime VERSION  --spot  --queued  --reserved  --valid-until DUR
  setup.sh:   --repo DIR|URL  --ref REF  --extras LIST  --python VERSION  --system-python  --no-check
  launch.sh:  --config CONFIG  --output gs://...  --env KEY=VALUE  --restart  -- TPT_RUN_ARGS
  --skip-create      the slice exists already (setup + launch only)
  --skip-setup       the package is installed already (create + launch only)
$COMMON_USAGE

Examples:
  # Gemma2-2B TPT on a v5e-8 (one host, 8 chips)
  $SCRIPT_NAME --name tpt-2b --zone us-west4-a --type v5e-8 --spot \\
      --config gemma2_2b_gsm8k --output gs://my-bucket/tpt/gemma2-2b
  # Gemma2-9B TPT on a v5p-32 (4 hosts, 16 chips), through a queued resource
  $SCRIPT_NAME --name tpt-9b --zone us-east5-a --type v5p-32 --queued \\
      --config gemma2_9b_gsm8k --output gs://my-bucket/tpt/gemma2-9b
EOF
}

COMMON_ARGS=()
CREATE_ARGS=()
SETUP_ARGS=()
LAUNCH_ARGS=()
TPT_ARGS=()
SKIP_CREATE=0
SKIP_SETUP=0

parse_args() {
  normalize_args "$@"
  set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
  while [ $# -gt 0 ]; do
    case "$1" in
      --type|--runtime|--valid-until)
        need_value "$@"; CREATE_ARGS+=("$1" "$2"); shift 2 ;;
      --spot|--queued|--reserved)
        CREATE_ARGS+=("$1"); shift ;;
      --repo|--ref|--extras|--python)
        need_value "$@"; SETUP_ARGS+=("$1" "$2"); shift 2 ;;
      --no-check|--system-python)
        SETUP_ARGS+=("$1"); shift ;;
      --config|--output|--env)
        need_value "$@"; LAUNCH_ARGS+=("$1" "$2"); shift 2 ;;
      --restart)
        LAUNCH_ARGS+=("$1"); shift ;;
      --skip-create) SKIP_CREATE=1; shift ;;
      --skip-setup) SKIP_SETUP=1; shift ;;
      --) shift; TPT_ARGS=("$@"); break ;;
      *)
        common_option "$@" || usage_error "unknown option: $1"
        COMMON_ARGS+=("${@:1:$SHIFT_N}")
        shift "$SHIFT_N" ;;
    esac
  done
  check_common
}

# step SCRIPT ARGS...: run one of the sibling scripts with the common options.
step() {
  local script=$1
  shift
  if [ "${TPT_VALIDATE_ONLY:-0}" = 0 ]; then
    if [ "$DRY_RUN" = 1 ]; then printf '# --- %s\n' "$script"; else info "--- $script"; fi
  fi
  bash "$TPT_SCRIPTS_DIR/$script" ${COMMON_ARGS[@]+"${COMMON_ARGS[@]}"} "$@"
}

# Each step stops the sequence if it fails (also where `set -e` does not apply).
run_steps() {
  if [ "$SKIP_CREATE" = 0 ]; then step create.sh ${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"} || return; fi
  if [ "$SKIP_SETUP" = 0 ]; then step setup.sh ${SETUP_ARGS[@]+"${SETUP_ARGS[@]}"} || return; fi
  step launch.sh ${LAUNCH_ARGS[@]+"${LAUNCH_ARGS[@]}"} -- ${TPT_ARGS[@]+"${TPT_ARGS[@]}"}
}

main() {
  parse_args "$@"
  # Check every step's options (known type, config exists, gs:// output, ...) before
  # anything is created: each script exits right after parsing under TPT_VALIDATE_ONLY=1.
  if [ "$DRY_RUN" = 0 ] && ! TPT_VALIDATE_ONLY=1 run_steps; then exit 2; fi
  run_steps
  if [ "$DRY_RUN" = 0 ]; then
    info "follow the run with: $TPT_SCRIPTS_DIR/logs.sh$(printf ' %s' ${COMMON_ARGS[@]+"${COMMON_ARGS[@]}"})"
  fi
}

main "$@"
