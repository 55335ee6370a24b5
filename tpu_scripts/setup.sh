#!/usr/bin/env bash
# Install tpt_jax with jax[tpu] on every worker of a TPU VM slice.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [options]

Put the tpt_jax source on every worker (~/$REMOTE_SRC), install it there with
\`pip install -e ".[tpu]"\` (all workers at once, --worker=all), then check that every
worker joins jax.distributed and sees the TPU chips.

JAX needs Python >= 3.11 and the TPU VM images ship Python 3.10, so by default the package
goes into a virtual environment ~/$REMOTE_VENV made by uv (installed from PyPI with
\`pip install --user uv\`; uv downloads a standalone Python if the image has none).

Source (--repo):
  a local directory (default: this checkout, $TPT_REPO_ROOT): its files, as git lists
      them (tracked and untracked, .gitignore respected, local edits included), are packed
      into a tarball and copied to every worker with gcloud scp;
  a git URL: every worker clones it (or fetches into an existing clone) at --ref.

Options:
  --repo DIR|URL     where the source comes from (default: this checkout)
  --ref REF          branch, tag or commit for a git URL (default: the remote's HEAD)
  --extras LIST      pip extras to install (default: tpu)
  --python VERSION   Python for the virtual environment (default: 3.11)
  --system-python    no virtual environment: \`python3 -m pip install --user\` (the image's
                     python3 must be >= 3.11)
  --no-check         skip the final "JAX sees N TPU devices" check
$COMMON_USAGE

Example:
  $SCRIPT_NAME --name tpt-2b --zone us-west4-a
  $SCRIPT_NAME --name tpt-9b --zone us-east5-a --repo https://github.com/ORG/tpt_jax --ref v0.1.0
EOF
}

REPO=$TPT_REPO_ROOT
REF=HEAD
EXTRAS=tpu
PYTHON_VERSION=3.11
SYSTEM_PYTHON=0
CHECK=1

parse_args() {
  normalize_args "$@"
  set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
  while [ $# -gt 0 ]; do
    case "$1" in
      --repo) need_value "$@"; REPO=$2; shift 2 ;;
      --ref) need_value "$@"; REF=$2; shift 2 ;;
      --extras) need_value "$@"; EXTRAS=$2; shift 2 ;;
      --python) need_value "$@"; PYTHON_VERSION=$2; shift 2 ;;
      --system-python) SYSTEM_PYTHON=1; shift ;;
      --no-check) CHECK=0; shift ;;
      *) common_option "$@" || usage_error "unknown option: $1"; shift "$SHIFT_N" ;;
    esac
  done
  check_common
  case "$REPO" in
    *://*|*@*:*) ;;  # a git URL (https://..., ssh://..., git@host:path)
    *)
      [ -d "$REPO" ] || usage_error "--repo '$REPO': no such directory (and not a git URL)"
      [ -f "$REPO/setup.py" ] || usage_error "--repo '$REPO': not a tpt_jax checkout (no setup.py)" ;;
  esac
  [[ $PYTHON_VERSION =~ ^3\.[0-9]+(\.[0-9]+)?$ ]] || usage_error "--python '$PYTHON_VERSION': expected e.g. 3.11"
  case "$EXTRAS" in *[!A-Za-z0-9_,-]*) usage_error "--extras '$EXTRAS': expected e.g. tpu or tpu,test" ;; esac
  return 0
}

# pack_source DIR TARBALL: tar up the files git would commit (or everything but caches).
pack_source() {
  local dir=$1 tarball=$2
  if git -C "$dir" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$dir" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        if [ -e "$dir/$f" ]; then printf '%s\0' "$f"; fi  # skip deleted, not yet committed
      done |
      COPYFILE_DISABLE=1 tar -czf "$tarball" -C "$dir" --null -T -  # (macOS: no ._ files)
  else
    COPYFILE_DISABLE=1 tar -czf "$tarball" -C "$dir" --exclude=.git --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache .
  fi
}

# The install every worker runs once the source is in ~/$REMOTE_SRC.
install_command() {
  local cmd="cd ~/$REMOTE_SRC && mkdir -p ~/$REMOTE_RUN"
  if [ "$SYSTEM_PYTHON" = 1 ]; then
    cmd="$cmd && python3 -m pip install -q --user --upgrade pip"
    cmd="$cmd && python3 -m pip install -q --user -e \".[$EXTRAS]\""
  else
    cmd="$cmd && python3 -m pip install -q --user --upgrade uv"
    cmd="$cmd && ~/.local/bin/uv venv -q --allow-existing --python $PYTHON_VERSION ~/$REMOTE_VENV"
    cmd="$cmd && ~/.local/bin/uv pip install -q --python ~/$REMOTE_VENV/bin/python -e \".[$EXTRAS]\""
  fi
  printf '%s' "$cmd"
}

TARBALL=""

remove_tarball() {
  if [ -n "$TARBALL" ]; then rm -f "$TARBALL"; fi
}

setup_from_local_dir() {
  TARBALL="${TMPDIR:-/tmp}/tpt_jax-src-$TPU_NAME.tar.gz"
  note "pack $REPO (git ls-files: tracked + untracked, .gitignore respected) into $TARBALL"
  if [ "$DRY_RUN" = 0 ]; then
    trap remove_tarball EXIT
    pack_source "$REPO" "$TARBALL"
    info "packed $(du -h "$TARBALL" | cut -f1) of source"
  fi
  tpu_scp_to_all "$TARBALL" tpt_jax-src.tar.gz
  tpu_ssh all "set -e; mkdir -p ~/$REMOTE_SRC; tar -xzf ~/tpt_jax-src.tar.gz -C ~/$REMOTE_SRC; rm -f ~/tpt_jax-src.tar.gz; $(install_command)"
}

setup_from_git() {
  local url ref fetch
  url=$(shell_quote "$REPO")
  ref=$(shell_quote "$REF")
  fetch="git -C ~/$REMOTE_SRC fetch -q origin $ref && git -C ~/$REMOTE_SRC checkout -q --force FETCH_HEAD"
  tpu_ssh all "set -e; if [ ! -d ~/$REMOTE_SRC/.git ]; then git clone -q $url ~/$REMOTE_SRC; fi; $fetch; $(install_command)"
}

main() {
  parse_args "$@"
  ready_to_run
  if [ -d "$REPO" ]; then setup_from_local_dir; else setup_from_git; fi
  if [ "$CHECK" = 1 ]; then
    # On a multi-host slice every worker must start the TPU runtime at once: --worker=all.
    # `python3 -m tpt_jax.distributed` initializes jax.distributed and prints what it sees.
    tpu_ssh all "$REMOTE_PATH_SETUP; cd ~/$REMOTE_SRC && python3 -m tpt_jax.distributed"
  fi
}

main "$@"
