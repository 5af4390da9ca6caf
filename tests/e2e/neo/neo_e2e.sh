#!/usr/bin/env bash
# Reproducible, CPU-only, headless Forge Neo (forge_version.version == "neo") with random-weight checkpoints.
#
#   neo_e2e.sh [up]      setup (idempotent) + start Neo in the background + wait for the API + print URL
#   neo_e2e.sh setup     only: work tree, venv + packages, random checkpoints
#   neo_e2e.sh start     only: start (no-op if already up) and wait for the API
#   neo_e2e.sh stop      stop the Neo process started by this script (by its PID file)
#   neo_e2e.sh restart   stop + start (needed after adding/removing an extension)
#   neo_e2e.sh status    print whether it is up
#   neo_e2e.sh smoke     POST /sdapi/v1/txt2img (64x64, 4 steps, Euler, cfg 7), check a PNG comes back, time it
#   neo_e2e.sh dit-models  write random-weight Anima and Flux.1 checkpoints (make_random_dit.py) into
#                          $NEO_MODELS/Stable-diffusion-dit (2.9 + 4.8 GiB, a few minutes)
#   neo_e2e.sh decline     restart with that folder listed too, run decline_check.py (needs the extension
#                          linked), restart without it; about 6 GB of extra RAM while Flux is loaded
#   neo_e2e.sh link-ext DIR [NAME]   symlink a local extension dir into $NEO_DIR/extensions/NAME (then: restart)
#   neo_e2e.sh unlink-ext NAME       remove that symlink (then: restart)
#
# Everything lives under /tmp; nothing here contains Neo code, only commands that use it.
# Environment overrides (defaults in brackets):
#   NEO_SRC     [/work/.mirror/exo101+sd-webui-forge-neo-v3/repo]  git dir holding Neo's tree under webui/
#   NEO_REF     [HEAD]             commit of NEO_SRC to export (only when $NEO_DIR is first created)
#   NEO_DIR     [/tmp/neo]         Neo work tree = the repo's webui/ (also its data dir: config.json, extensions/)
#   NEO_VENV    [/tmp/neo-venv]    Python 3.11 venv (Neo is tested on 3.13; --skip-python-version-check)
#   NEO_MODELS  [/tmp/neo-models]  --ckpt-dirs is $NEO_MODELS/Stable-diffusion
#   NEO_PORT    [7863]             bound on 127.0.0.1 only
#   NEO_STATE   [/tmp/neo-e2e]     log, pid file, generated requirements file
#   NEO_UI      [0]                1 = also serve the Gradio UI (default: API only, --nowebui)
#   NEO_EXTRA_ARGS []              appended to Neo's command line
#   NEO_START_TIMEOUT [400]        seconds to wait for the API
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NEO_SRC="${NEO_SRC:-/work/.mirror/exo101+sd-webui-forge-neo-v3/repo}"
NEO_REF="${NEO_REF:-HEAD}"
NEO_DIR="${NEO_DIR:-/tmp/neo}"
NEO_VENV="${NEO_VENV:-/tmp/neo-venv}"
NEO_MODELS="${NEO_MODELS:-/tmp/neo-models}"
NEO_PORT="${NEO_PORT:-7863}"
NEO_STATE="${NEO_STATE:-/tmp/neo-e2e}"
NEO_UI="${NEO_UI:-0}"
NEO_EXTRA_ARGS="${NEO_EXTRA_ARGS:-}"
NEO_START_TIMEOUT="${NEO_START_TIMEOUT:-400}"
CKDIR="$NEO_MODELS/Stable-diffusion"
DITDIR="$NEO_MODELS/Stable-diffusion-dit"
SD15="$CKDIR/random-sd15.safetensors"
FORGE_SD15="${FORGE_MODELS:-/tmp/forge-models}/Stable-diffusion/random-sd15.safetensors"
LOG="$NEO_STATE/neo.log"
PIDFILE="$NEO_STATE/neo.pid"
URL="http://127.0.0.1:$NEO_PORT"
PY="$NEO_VENV/bin/python"
# Neo wants torch 2.11+cu130 (launch_utils.prepare_environment). The CPU wheel torch==2.13.0+cpu cannot be
# used: the only torchvision for it on PyPI (0.28.0) is the CUDA build and fails to load (libc10_cuda.so
# missing -> "operator torchvision::nms does not exist"). These two lie on local disk, as for Forge; on CPU they run.
TORCH_PKGS=(torch==2.14.1 torchvision==0.29.1)
STAMP_VERSION=1

mkdir -p "$NEO_STATE"
log() { echo "[neo_e2e] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- setup
setup_tree() {
  if [ ! -f "$NEO_DIR/launch.py" ]; then
    git --git-dir="$NEO_SRC" rev-parse -q --verify "$NEO_REF^{commit}" >/dev/null || die "no commit $NEO_REF in NEO_SRC=$NEO_SRC"
    log "exporting webui/ of Neo ($NEO_REF) from $NEO_SRC into $NEO_DIR (without webui/extensions: LFS objects missing)"
    local tmp; tmp="$(mktemp -d)"
    git --git-dir="$NEO_SRC" archive "$NEO_REF" webui ':(exclude)webui/extensions' | tar -x -C "$tmp"
    rm -rf "$NEO_DIR"; mv "$tmp/webui" "$NEO_DIR"; rmdir "$tmp"
    git --git-dir="$NEO_SRC" rev-parse "$NEO_REF^{commit}" > "$NEO_DIR/.neo_commit"
  fi
  log "Neo at $(cat "$NEO_DIR/.neo_commit" 2>/dev/null || echo unknown)"
  mkdir -p "$NEO_DIR/extensions"
}

make_reqs() {
  # Neo's own pins, minus torch (installed explicitly) and with setuptools relaxed:
  # torch 2.13 requires setuptools>=77.0.3; setuptools>=81 removed pkg_resources.
  sed -e 's/^torch[[:space:]]*$/# torch: installed explicitly/' \
      -e 's/^setuptools==69\.5\.1.*/setuptools>=77.0.3,<81  # was ==69.5.1/' \
      "$NEO_DIR/requirements.txt" > "$NEO_STATE/requirements.txt"
}

setup_venv() {
  if [ ! -x "$PY" ]; then
    command -v python3.11 >/dev/null || die "python3.11 not found"
    log "creating venv $NEO_VENV"
    python3.11 -m venv "$NEO_VENV"
  fi
  make_reqs
  local stamp="$NEO_VENV/.neo_e2e_stamp" want
  want="$STAMP_VERSION $(sha256sum "$NEO_STATE/requirements.txt" | cut -c1-16) ${TORCH_PKGS[*]}"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    log "venv packages up to date"
    return
  fi
  log "installing packages into $NEO_VENV (several minutes the first time; log: $NEO_STATE/pip.log)"
  local t0=$SECONDS
  # Three runs in prepare_environment's order: torch, then gradio, then requirements.txt. Neo's pins
  # conflict with gradio 4.40's (Pillow==12.2.0 vs pillow<11): Neo's launcher lets the later run
  # override the earlier, and one resolver run would refuse the set.
  : > "$NEO_STATE/pip.log"
  local step
  for step in "${TORCH_PKGS[*]} packaging==26.0" "gradio==4.40.0 gradio_rangeslider==0.0.8" \
              "-r $NEO_STATE/requirements.txt"; do
    # shellcheck disable=SC2086
    if ! "$PY" -m pip install ${TORCH_PKGS[*]} $step >> "$NEO_STATE/pip.log" 2>&1; then
      grep -v "WARNING: Location" "$NEO_STATE/pip.log" | tail -30 >&2
      die "pip install $step failed"
    fi
  done
  "$PY" - <<'EOF'
import importlib.metadata as m, torch, torchvision, gradio  # noqa: F401
print("[neo_e2e] torch", torch.__version__, "torchvision", torchvision.__version__, "gradio", gradio.__version__,
      "diffusers", m.version("diffusers"), "transformers", m.version("transformers"))
EOF
  log "pip done in $((SECONDS - t0))s"
  echo "$want" > "$stamp"
}

setup_ckpt() {
  mkdir -p "$CKDIR"
  if [ -f "$SD15" ]; then
    log "checkpoint present: $SD15"
  elif [ -f "$FORGE_SD15" ]; then
    # same SD1.5 LDM key layout; a hard link costs no disk (falls back to a copy across file systems)
    ln "$FORGE_SD15" "$SD15" 2>/dev/null || cp "$FORGE_SD15" "$SD15"
    log "checkpoint $SD15 <- $FORGE_SD15"
  else
    die "no $FORGE_SD15 to link: make it with ../shared/tools/forge-e2e/forge_e2e.sh setup (its make_random_sd15.py), or put an SD1.5 checkpoint at $SD15"
  fi
}

do_setup() { setup_tree; setup_venv; setup_ckpt; }

# ---------------------------------------------------------------- run
running_pid() {
  [ -f "$PIDFILE" ] || return 1
  local pid; pid="$(cat "$PIDFILE")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "launch.py" "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

api_up() { curl -sf -m 5 "$URL/sdapi/v1/sd-models" >/dev/null 2>&1; }

do_start() {
  local pid
  if pid="$(running_pid)"; then
    if api_up; then log "already running (pid $pid)"; echo "$URL"; return; fi
  else
    if curl -s -m 3 -o /dev/null "$URL/" 2>/dev/null; then
      die "port $NEO_PORT is already served by a process this script did not start; set NEO_PORT"
    fi
    local mode=(--nowebui) ; [ "$NEO_UI" = 1 ] && mode=()
    # shellcheck disable=SC2206
    local args=(
      --skip-prepare-environment --skip-install        # no pip installs / downloads at start
      --skip-torch-cuda-test --skip-python-version-check --skip-version-check
      --cpu                                            # backend/args.py: Use the CPU for everything
      --api "${mode[@]}"
      --server-name 127.0.0.1 --port "$NEO_PORT"
      --ckpt-dirs "$CKDIR"                             # Neo has no --ckpt: it picks from this folder
      --no-hashing                                     # Neo has no --no-download-sd-model
      $NEO_EXTRA_ARGS
    )
    log "starting Neo: launch.py ${args[*]}"
    log "log: $LOG"
    (
      cd "$NEO_DIR"
      export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
             GRADIO_ANALYTICS_ENABLED=False DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
      exec setsid nohup "$PY" launch.py "${args[@]}" > "$LOG" 2>&1 < /dev/null
    ) &
    echo $! > "$PIDFILE"
    pid="$(cat "$PIDFILE")"
  fi
  local t0=$SECONDS
  until api_up; do
    kill -0 "$pid" 2>/dev/null || { tail -40 "$LOG" >&2; die "Neo exited during startup (see $LOG)"; }
    [ $((SECONDS - t0)) -lt "$NEO_START_TIMEOUT" ] || { tail -40 "$LOG" >&2; die "API not up after ${NEO_START_TIMEOUT}s"; }
    sleep 2
  done
  log "API up after $((SECONDS - t0))s (pid $pid)"
  grep -E "Startup time" "$LOG" >&2 || true
  echo "$URL"
}

do_stop() {
  local pid
  if pid="$(running_pid)"; then
    log "stopping pid $pid"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && { log "SIGKILL $pid"; kill -9 "$pid" 2>/dev/null || true; }
  else
    log "not running"
  fi
  rm -f "$PIDFILE"
}

do_status() {
  local pid
  if pid="$(running_pid)" && api_up; then echo "up pid=$pid url=$URL log=$LOG"; else echo "down"; return 1; fi
}

# ---------------------------------------------------------------- checks
do_smoke() {
  api_up || die "API not up at $URL (run: $0 up)"
  "$PY" "$HERE/txt2img.py" --url "$URL" --size "${1:-64}" --out "$NEO_STATE/last.png"
}

dit_models() {
  mkdir -p "$DITDIR"
  local family
  for family in anima flux; do
    if [ -f "$DITDIR/random-$family.safetensors" ]; then log "present: $DITDIR/random-$family.safetensors"; continue; fi
    (cd "$NEO_STATE" && "$PY" "$HERE/make_random_dit.py" --neo "$NEO_DIR" --family "$family" \
       --out "$DITDIR/random-$family.safetensors")
  done
}

do_decline() {
  dit_models
  local saved="$NEO_EXTRA_ARGS" rc=0
  NEO_EXTRA_ARGS="$saved --ckpt-dirs $DITDIR"; do_stop; do_start >/dev/null
  (cd "$HERE/../../.." && "$PY" -m tests.e2e.neo.decline_check random-anima random-flux --port "$NEO_PORT") || rc=$?
  NEO_EXTRA_ARGS="$saved"; do_stop; do_start >/dev/null
  return $rc
}

link_ext() {
  local src="${1:?usage: link-ext DIR [NAME]}" name="${2:-}"
  src="$(cd "$src" && pwd)"; name="${name:-$(basename "$src")}"
  mkdir -p "$NEO_DIR/extensions"
  ln -sfn "$src" "$NEO_DIR/extensions/$name"
  log "linked $NEO_DIR/extensions/$name -> $src (restart Neo to load it: $0 restart)"
}

unlink_ext() {
  local name="${1:?usage: unlink-ext NAME}"
  rm -f "$NEO_DIR/extensions/$name"
  log "removed $NEO_DIR/extensions/$name (restart Neo to unload it: $0 restart)"
}

cmd="${1:-up}"; shift || true
case "$cmd" in
  up)       do_setup; do_start ;;
  setup)    do_setup ;;
  start)    do_start ;;
  stop)     do_stop ;;
  restart)  do_stop; do_start ;;
  status)   do_status ;;
  smoke)    do_smoke "$@" ;;
  dit-models) dit_models ;;
  decline)  do_decline ;;
  link-ext) link_ext "$@" ;;
  unlink-ext) unlink_ext "$@" ;;
  *) awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 2 ;;
esac
