# shellcheck shell=bash
# shellcheck disable=SC2034  # the globals below are used by the scripts that source this file
# Shared code for the tpu_scripts/*.sh scripts (sourced, never run directly).
#
# Provides: option parsing helpers, the TPU type table (--type -> accelerator type and
# runtime version), `run` (print in --dry-run mode, otherwise echo to stderr and execute),
# and the remote paths every script agrees on. Works with bash >= 3.2 (macOS).

# ---------------------------------------------------------------- settings and defaults
# Environment variables give defaults so a session can `export TPT_ZONE=...` once.
TPU_NAME=${TPT_TPU_NAME:-tpt-tpu}
ZONE=${TPT_ZONE:-}        # empty: gcloud's compute/zone property
PROJECT=${TPT_PROJECT:-}  # empty: gcloud's core/project property
DRY_RUN=0
SHIFT_N=1

TPT_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TPT_REPO_ROOT=$(cd "$TPT_SCRIPTS_DIR/.." && pwd)

# On every worker (relative to the login user's home directory).
REMOTE_SRC=tpt_jax       # the package source, installed with `pip install -e .[tpu]`
REMOTE_RUN=tpt_run       # shipped configs, per-worker logs, the pid file
REMOTE_VENV=tpt-venv     # Python >= 3.11 virtual environment (uv) with the package installed
# Remote snippet: find `tpt` and `python3` of the venv (or of `pip install --user`) first.
# shellcheck disable=SC2016  # expanded on the worker, not here
REMOTE_PATH_SETUP='export PATH=$HOME/'$REMOTE_VENV'/bin:$HOME/.local/bin:$PATH'
# Prints this worker's index (0..hosts-1) on a Cloud TPU VM; the hostname elsewhere.
# shellcheck disable=SC2016  # expanded on the worker, not here
REMOTE_WORKER_ID='$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'

# ---------------------------------------------------------------- messages
SCRIPT_NAME=$(basename "$0")

info() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }

die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

usage_error() {
  printf '%s: error: %s (see --help)\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

# ---------------------------------------------------------------- option parsing
# normalize_args "$@": splits "--opt=value" into "--opt" "value" (up to a lone "--");
# the result is in NORMALIZED_ARGS. Use: normalize_args "$@"; set -- ${NORMALIZED_ARGS[@]+...}
normalize_args() {
  NORMALIZED_ARGS=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --) NORMALIZED_ARGS+=("$@"); return 0 ;;
      --*=*) NORMALIZED_ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) NORMALIZED_ARGS+=("$1") ;;
    esac
    shift
  done
}

# need_value "$@": the option in $1 must be followed by a value.
need_value() {
  [ $# -ge 2 ] || usage_error "$1 needs a value"
  case "$2" in --*) usage_error "$1 needs a value, got option $2" ;; esac
}

# common_option "$@": handles an option every script takes, setting SHIFT_N to the number
# of words it used; returns 1 when $1 is not a common option. Scripts define usage().
common_option() {
  SHIFT_N=1
  case "$1" in
    --name) need_value "$@"; TPU_NAME=$2; SHIFT_N=2 ;;
    --zone) need_value "$@"; ZONE=$2; SHIFT_N=2 ;;
    --project) need_value "$@"; PROJECT=$2; SHIFT_N=2 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

# shellcheck disable=SC2016  # literal $VARS in help text
COMMON_USAGE='Common options:
  --name NAME       TPU VM (and queued resource) name          [$TPT_TPU_NAME or tpt-tpu]
  --zone ZONE       e.g. us-east5-b; default: gcloud compute/zone  [$TPT_ZONE]
  --project ID      Google Cloud project; default: gcloud core/project [$TPT_PROJECT]
  --dry-run         print the commands (one per line) instead of running them
  -h, --help        this help'

# check_common: validates the common options (call after parsing).
check_common() {
  local re='^[a-z]([-a-z0-9]*[a-z0-9])?$'
  [[ $TPU_NAME =~ $re ]] ||
    usage_error "--name '$TPU_NAME': use lowercase letters, digits and hyphens, starting with a letter"
  return 0
}

# ---------------------------------------------------------------- TPU types
# resolve_tpu_type TYPE: sets TPU_GENERATION, ACCELERATOR_TYPE, RUNTIME_VERSION, TPU_CHIPS,
# TPU_HOSTS. TYPE is a short name (v4-8, v5e-8, v5p-32, v6e-8) or an accelerator type
# (v5litepod-8). The number is TensorCores for v4/v5p (2 per chip, 4 chips per host) and
# chips for v5e/v6e (8 chips on a single-host slice, 4 per host beyond that).
resolve_tpu_type() {
  local type=$1 size
  size=${type##*-}
  if ! [[ $size =~ ^[1-9][0-9]*$ ]]; then
    usage_error "--type '$type': expected GENERATION-SIZE such as v5e-8, v5p-32, v6e-8, v4-8"
  fi
  case "$type" in
    v4-*)
      TPU_GENERATION=v4; ACCELERATOR_TYPE=v4-$size; RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5e-*|v5litepod-*)
      TPU_GENERATION=v5e; ACCELERATOR_TYPE=v5litepod-$size; RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*)
      TPU_GENERATION=v5p; ACCELERATOR_TYPE=v5p-$size; RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*)
      TPU_GENERATION=v6e; ACCELERATOR_TYPE=v6e-$size; RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) usage_error "--type '$type': unknown TPU generation (known: v4, v5e, v5p, v6e)" ;;
  esac
  case "$TPU_GENERATION" in
    v4|v5p)
      [ $((size % 8)) -eq 0 ] || usage_error "--type '$type': $TPU_GENERATION sizes count TensorCores, a multiple of 8"
      TPU_CHIPS=$((size / 2)); TPU_HOSTS=$((size / 8)) ;;
    v5e|v6e)
      case "$size" in 1|4|8|16|32|64|128|256) ;;
        *) usage_error "--type '$type': $TPU_GENERATION slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips" ;;
      esac
      TPU_CHIPS=$size
      if [ "$size" -le 8 ]; then TPU_HOSTS=1; else TPU_HOSTS=$((size / 4)); fi ;;
  esac
}

# ---------------------------------------------------------------- running commands
# shell_quote WORD: prints WORD so that a POSIX shell reads it back unchanged; "--opt=value"
# keeps the option name bare and quotes only the value.
shell_quote() {
  local word=$1 safe='^[A-Za-z0-9_@%+=:,./-]+$' q="'\\''"
  if [[ $word =~ $safe ]]; then
    printf '%s' "$word"
  elif [[ $word =~ ^--[A-Za-z0-9-]+= ]]; then
    printf '%s=' "${word%%=*}"
    shell_quote "${word#*=}"
  else
    printf "'%s'" "${word//\'/$q}"
  fi
}

# format_cmd WORD...: the command line as one string, each word quoted as needed.
format_cmd() {
  local out="" word
  for word in "$@"; do
    out="$out${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# run CMD...: in --dry-run mode print the command (one line, exactly as it would run);
# otherwise echo it to stderr with a "+ " prefix and execute it.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "$(format_cmd "$@")"
    return 0
  fi
  printf '+ %s\n' "$(format_cmd "$@")" >&2
  "$@"
}

# note TEXT: a local step that is not a single command; a comment line in --dry-run output.
note() {
  if [ "$DRY_RUN" = 1 ]; then printf '# %s\n' "$*"; else info "$*"; fi
}

# ---------------------------------------------------------------- gcloud helpers
# location_flags: sets LOCATION_FLAGS to --zone/--project as given (may be empty).
location_flags() {
  LOCATION_FLAGS=()
  if [ -n "$ZONE" ]; then LOCATION_FLAGS+=("--zone=$ZONE"); fi
  if [ -n "$PROJECT" ]; then LOCATION_FLAGS+=("--project=$PROJECT"); fi
  return 0
}

# tpu_ssh WORKER COMMAND: run a shell command on the TPU VM's workers (WORKER: all, 0, 1-3).
tpu_ssh() {
  location_flags
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" ${LOCATION_FLAGS[@]+"${LOCATION_FLAGS[@]}"} \
    "--worker=$1" "--command=$2"
}

# tpu_scp_to_all LOCAL_FILE REMOTE_PATH: copy a file to every worker (REMOTE_PATH relative
# to the home directory).
tpu_scp_to_all() {
  location_flags
  run gcloud compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" ${LOCATION_FLAGS[@]+"${LOCATION_FLAGS[@]}"} \
    --worker=all
}

# ready_to_run: call once the options are parsed and checked. With TPT_VALIDATE_ONLY=1 it
# exits 0 right there (run_all.sh checks every step's options before creating anything);
# otherwise it fails early, with a useful message, when gcloud is missing (not in --dry-run).
ready_to_run() {
  if [ "${TPT_VALIDATE_ONLY:-0}" = 1 ]; then exit 0; fi
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
}
