#!/usr/bin/env bash
# Ship a config to every worker and start the same `tpt run` on all of them, in the background.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --config CONFIG --output gs://BUCKET/PATH [options] [-- TPT_RUN_ARGS...]
       $SCRIPT_NAME --stop [options]

Copy CONFIG to ~/$REMOTE_RUN/ on every worker, then start on all workers at once
(--worker=all)

    tpt run ~/$REMOTE_RUN/CONFIG_FILE --output gs://BUCKET/PATH [TPT_RUN_ARGS...]

under nohup, so it survives the ssh session. Each worker logs to ~/$REMOTE_RUN/worker-N.log
(follow with logs.sh). Every process of a multi-host slice runs the same program; they find
each other through jax.distributed on the TPU VM. Outputs and checkpoints go to the gs://
output, so a preempted or stopped run continues when launched again with the same output.

Options:
  --config CONFIG    YAML file, or a name in configs/ (gemma2_2b_gsm8k -> configs/gemma2_2b_gsm8k.yaml)
  --output URL       run directory for outputs and checkpoints; must be gs:// (workers
                     do not share a disk)
  --env KEY=VALUE    environment variable for the run (repeatable), e.g. HF_TOKEN=...;
                     note that values appear in --dry-run output and on the workers' ps
  --restart          stop a tpt run that is still running on the workers first
  --stop             only stop a running tpt run (SIGTERM, then SIGKILL after 60 s)
  -- ARGS...         extra arguments for \`tpt run\` (e.g. dotted config overrides)
$COMMON_USAGE

Example:
  $SCRIPT_NAME --name tpt-2b --zone us-west4-a --config gemma2_2b_gsm8k \\
      --output gs://my-bucket/tpt/gemma2-2b-r1
EOF
}

CONFIG=""
OUTPUT=""
ENVS=()
RESTART=0
STOP_ONLY=0
TPT_ARGS=()

parse_args() {
  normalize_args "$@"
  set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
  while [ $# -gt 0 ]; do
    case "$1" in
      --config) need_value "$@"; CONFIG=$2; shift 2 ;;
      --output) need_value "$@"; OUTPUT=$2; shift 2 ;;
      --env) need_value "$@"; ENVS+=("$2"); shift 2 ;;
      --restart) RESTART=1; shift ;;
      --stop) STOP_ONLY=1; shift ;;
      --) shift; TPT_ARGS=("$@"); break ;;
      *) common_option "$@" || usage_error "unknown option: $1"; shift "$SHIFT_N" ;;
    esac
  done
  check_common
  if [ "$STOP_ONLY" = 1 ]; then return 0; fi
  [ -n "$CONFIG" ] || usage_error "--config is required"
  [ -n "$OUTPUT" ] || usage_error "--output is required (gs://BUCKET/PATH)"
  case "$OUTPUT" in
    gs://?*) ;;
    *) usage_error "--output '$OUTPUT' must be a gs:// URL: every worker reads and writes the same run directory" ;;
  esac
  local kv
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env '$kv': expected KEY=VALUE"
  done
  resolve_config
  [[ $(basename "$CONFIG") =~ ^[A-Za-z0-9_.-]+$ ]] ||
    usage_error "--config '$CONFIG': use a file name of letters, digits, '.', '_' and '-'"
}

# resolve_config: CONFIG may be a path or a name in configs/, as `tpt run` accepts.
resolve_config() {
  local candidate
  for candidate in "$CONFIG" "$TPT_REPO_ROOT/configs/$CONFIG" "$TPT_REPO_ROOT/configs/$CONFIG.yaml"; do
    if [ -f "$candidate" ]; then CONFIG=$candidate; return 0; fi
  done
  case "$CONFIG" in
    */*|*.yaml|*.yml) ;;
    *) CONFIG=$TPT_REPO_ROOT/configs/$CONFIG.yaml ;;
  esac
  if [ "$DRY_RUN" = 1 ]; then
    info "warning: config $CONFIG does not exist (yet)"
  else
    die "config not found: $CONFIG"
  fi
}

# Remote snippet (after W=worker id) that stops a running tpt from its pid file: SIGTERM,
# then SIGKILL if it is still alive after 60 s (the TPU is free only once it has exited).
stop_snippet() {
  printf '%s' "P=\$(cat ~/$REMOTE_RUN/tpt.pid 2>/dev/null || true); if [ -n \"\$P\" ] && kill -0 \"\$P\" 2>/dev/null; then kill \"\$P\"; for i in \$(seq 60); do kill -0 \"\$P\" 2>/dev/null || break; sleep 1; done; kill -9 \"\$P\" 2>/dev/null || true; echo \"worker \$W: stopped tpt (pid \$P)\"; fi"
}

# Remote snippet (after W=worker id) that refuses to start while a tpt run is still alive.
busy_snippet() {
  printf '%s' "if [ -f ~/$REMOTE_RUN/tpt.pid ] && kill -0 \"\$(cat ~/$REMOTE_RUN/tpt.pid)\" 2>/dev/null; then echo \"worker \$W: tpt is still running; use --restart or --stop\" >&2; exit 1; fi"
}

# The remote command that starts `tpt run` in the background on each worker.
launch_command() {
  local base tpt_cmd env_prefix="" kv
  base=$(basename "$CONFIG")
  tpt_cmd="tpt run ~/$REMOTE_RUN/$base $(format_cmd --output "$OUTPUT" ${TPT_ARGS[@]+"${TPT_ARGS[@]}"})"
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do
    env_prefix="$env_prefix${kv%%=*}=$(shell_quote "${kv#*=}") "
  done
  local guard
  if [ "$RESTART" = 1 ]; then guard=$(stop_snippet); else guard=$(busy_snippet); fi
  printf '%s' "set -e; mkdir -p ~/$REMOTE_RUN; W=$REMOTE_WORKER_ID; LOG=~/$REMOTE_RUN/worker-\$W.log; $guard; cd ~/$REMOTE_SRC; echo \"=== \$(date -u +%FT%TZ) launch\" >> \"\$LOG\"; $REMOTE_PATH_SETUP; ${env_prefix}nohup $tpt_cmd >> \"\$LOG\" 2>&1 < /dev/null & echo \$! > ~/$REMOTE_RUN/tpt.pid; echo \"worker \$W: started tpt (pid \$!), log \$LOG\""
}

main() {
  parse_args "$@"
  ready_to_run
  if [ "$STOP_ONLY" = 1 ]; then
    tpu_ssh all "W=$REMOTE_WORKER_ID; $(stop_snippet)"
    return 0
  fi
  tpu_ssh all "mkdir -p ~/$REMOTE_RUN"
  tpu_scp_to_all "$CONFIG" "$REMOTE_RUN/$(basename "$CONFIG")"
  tpu_ssh all "$(launch_command)"
  if [ "$DRY_RUN" = 0 ]; then
    info "started on all workers; follow with: $(dirname "$0")/logs.sh --name $TPU_NAME${ZONE:+ --zone $ZONE}"
  fi
}

main "$@"
