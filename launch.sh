#!/usr/bin/env bash
# Launchers for adapters_jax runs. Every mode takes --dry-run, which prints the exact
# commands instead of running them.
#
#   launch.sh local CONFIG [--workdir DIR] [--config.x=y ...]   one process, this machine
#   launch.sh sweep SWEEP [--parallel N]                          experiments.sweep over a grid
#   launch.sh gpu CONFIG [overrides]                              one process per host, all its GPUs
#   launch.sh tpu --name N --zone Z [--project P] CONFIG [overrides]
#                                                                 every worker of a TPU VM pod slice
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

DRY_RUN=0
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
done
set -- "${ARGS[@]+"${ARGS[@]}"}"
[[ $# -ge 1 ]] || usage
MODE="$1"; shift

run() {  # prints the command (shell-quoted) in dry-run mode, runs it otherwise
  if [[ $DRY_RUN -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

need_config() {
  [[ $# -ge 1 && "$1" != --* ]] || { echo "error: $MODE needs a CONFIG file" >&2; usage; }
  [[ -f "${1%%:*}" ]] || { echo "error: config file ${1%%:*} not found" >&2; exit 2; }
}

case "$MODE" in
  local)
    need_config "$@"
    CONFIG="$1"; shift
    run python -m experiments.train --config="$CONFIG" "$@"
    ;;
  sweep)
    [[ $# -ge 1 ]] || { echo "error: sweep needs a SWEEP file" >&2; usage; }
    [[ -f "${1%%:*}" ]] || { echo "error: sweep file ${1%%:*} not found" >&2; exit 2; }
    SWEEP="$1"; shift
    run python -m experiments.sweep --sweep="$SWEEP" "$@"
    ;;
  gpu)
    need_config "$@"
    CONFIG="$1"; shift
    # One process per host sees every local GPU; with several hosts, set the JAX coordinator
    # variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or use SLURM.
    MULTI=()
    if [[ -n "${JAX_NUM_PROCESSES:-}${SLURM_JOB_ID:-}" ]]; then MULTI=(--multihost); fi
    run python -m experiments.train --config="$CONFIG" "${MULTI[@]+"${MULTI[@]}"}" "$@"
    ;;
  tpu)
    NAME="" ZONE="" PROJECT=""
    while [[ $# -gt 0 && "$1" == --* ]]; do
      case "$1" in
        --name) NAME="${2:-}"; shift 2 ;;
        --zone) ZONE="${2:-}"; shift 2 ;;
        --project) PROJECT="${2:-}"; shift 2 ;;
        *) break ;;
      esac
    done
    [[ -n "$NAME" && -n "$ZONE" ]] || { echo "error: tpu needs --name and --zone" >&2; usage; }
    need_config "$@"
    CONFIG="$1"; shift
    REPO="${REPO_URL:-$(git config --get remote.origin.url 2>/dev/null || true)}"
    if [[ -z "$REPO" ]]; then
      [[ $DRY_RUN -eq 1 ]] || { echo "error: set REPO_URL (the git URL the TPU workers clone)" >&2; exit 2; }
      REPO="<REPO_URL>"
    fi
    OVERRIDES=""
    for o in "$@"; do OVERRIDES+=" $(printf '%q' "$o")"; done
    REMOTE="set -e; if [ ! -d adapters_jax_repo ]; then git clone $(printf '%q' "$REPO") adapters_jax_repo; fi; \
cd adapters_jax_repo && git pull --ff-only && \
pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && pip install -q --no-deps -r requirements-assets.txt && \
python -m experiments.train --config=$(printf '%q' "$CONFIG") --multihost$OVERRIDES"
    GCLOUD=(gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all)
    [[ -n "$PROJECT" ]] && GCLOUD+=(--project="$PROJECT")
    run "${GCLOUD[@]}" --command="$REMOTE"
    ;;
  -h|--help|help) usage ;;
  *) echo "error: unknown mode '$MODE'" >&2; usage ;;
esac
