#!/usr/bin/env bash
# Follow (or show) the tpt run logs of a TPU VM slice's workers.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [options]

Follow ~/$REMOTE_RUN/worker-N.log on the workers (Ctrl-C to stop following; the run goes
on). Every line is prefixed with [wN], the worker it came from.

Options:
  --worker W         all (default), one index (0) or a list/range (0,2 or 1-3)
  --lines N          lines of history to show first (default 50)
  --no-follow        print the last N lines and exit
  --status           show, per worker, whether tpt is running and its last 3 log lines
$COMMON_USAGE

Example:
  $SCRIPT_NAME --name tpt-9b --zone us-east5-a --worker 0
EOF
}

WORKER=all
LINES=50
FOLLOW=1
STATUS=0

parse_args() {
  normalize_args "$@"
  set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
  while [ $# -gt 0 ]; do
    case "$1" in
      --worker) need_value "$@"; WORKER=$2; shift 2 ;;
      --lines) need_value "$@"; LINES=$2; shift 2 ;;
      --no-follow) FOLLOW=0; shift ;;
      --status) STATUS=1; shift ;;
      *) common_option "$@" || usage_error "unknown option: $1"; shift "$SHIFT_N" ;;
    esac
  done
  check_common
  [[ $LINES =~ ^[0-9]+$ ]] || usage_error "--lines '$LINES': expected a number"
  [[ $WORKER =~ ^(all|[0-9]+([-,][0-9]+)*)$ ]] || usage_error "--worker '$WORKER': expected all, N, N,M or N-M"
}

logs_command() {
  local follow=""
  if [ "$FOLLOW" = 1 ]; then follow=" -F"; fi
  printf '%s' "W=$REMOTE_WORKER_ID; tail -n $LINES$follow ~/$REMOTE_RUN/worker-\$W.log | sed -u \"s/^/[w\$W] /\""
}

status_command() {
  printf '%s' "W=$REMOTE_WORKER_ID; if [ -f ~/$REMOTE_RUN/tpt.pid ] && kill -0 \"\$(cat ~/$REMOTE_RUN/tpt.pid)\" 2>/dev/null; then S=running; else S=stopped; fi; echo \"[w\$W] tpt \$S\"; tail -n 3 ~/$REMOTE_RUN/worker-\$W.log 2>/dev/null | sed \"s/^/[w\$W] /\""
}

main() {
  parse_args "$@"
  ready_to_run
  if [ "$STATUS" = 1 ]; then
    tpu_ssh "$WORKER" "$(status_command)"
  else
    tpu_ssh "$WORKER" "$(logs_command)"
  fi
}

main "$@"
