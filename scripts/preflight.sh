#!/usr/bin/env bash
# Host preflight for `docker compose run` with GPUs: run it on the GPU host before building.
#
#   bash scripts/preflight.sh            checks only (nothing is pulled or started)
#   bash scripts/preflight.sh --smoke    also starts a CUDA container with the GPUs
#
# Checks Docker, the Compose version, the NVIDIA driver (against the image's CUDA), and the
# NVIDIA Container Toolkit / runtime. A container that reserves a GPU on a host without the
# toolkit fails at start ("could not select device driver"); the in-container
# `bundleflow doctor` never gets to run, so this script is where that is diagnosed.
# Exit 0 when everything passed, 1 otherwise; every failure prints its fix.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

COMPOSE_MIN=2.24.0 # env_file entries with `required: false`
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1

# The image's CUDA flavour (as compose.yaml reads it) and the driver it needs.
FLAVOUR=${CUDA_FLAVOUR:-}
if [ -z "$FLAVOUR" ] && [ -f .env ]; then
  FLAVOUR=$(sed -n 's/^CUDA_FLAVOUR=//p' .env | tail -n 1)
fi
FLAVOUR=${FLAVOUR:-cu121}
case "$FLAVOUR" in
  cu121) CUDA=12.1 DRIVER_MIN=530.30.02 BASE=nvidia/cuda:12.1.1-base-ubuntu22.04 ;;
  cu124) CUDA=12.4 DRIVER_MIN=550.54.14 BASE=nvidia/cuda:12.4.1-base-ubuntu22.04 ;;
  cu128) CUDA=12.8 DRIVER_MIN=570.124.06 BASE=nvidia/cuda:12.8.1-base-ubuntu22.04 ;;
  *)
    echo "CUDA_FLAVOUR=$FLAVOUR is not one of cu121, cu124, cu128 (docker/Dockerfile)"
    exit 1
    ;;
esac

FAILED=0
ok() { printf '  ok    %s\n' "$1"; }
warn() { printf '  warn  %s\n        fix: %s\n' "$1" "$2"; }
fail() {
  printf '  FAIL  %s\n        fix: %s\n' "$1" "$2"
  FAILED=1
}
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }

echo "bundleflow preflight (image flavour $FLAVOUR: CUDA $CUDA, driver >= $DRIVER_MIN)"

# --- Docker -------------------------------------------------------------------------
DOCKER_UP=0
if ! command -v docker >/dev/null 2>&1; then
  fail "docker: not installed" "install Docker Engine: https://docs.docker.com/engine/install/"
elif ! docker info >/dev/null 2>&1; then
  why=$(docker info 2>&1 | grep -m1 -i 'cannot\|denied\|error')
  fail "docker: the daemon is not reachable (${why:-docker info failed})" \
    "start it (sudo systemctl start docker), or add yourself to the docker group (sudo usermod -aG docker \$USER, then log in again)"
else
  DOCKER_UP=1
  ok "docker: $(docker version --format '{{.Server.Version}}' 2>/dev/null) (daemon reachable)"
fi

# --- Compose --------------------------------------------------------------------------
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
  COMPOSE=$(docker compose version --short 2>/dev/null | sed 's/^v//')
  if version_ge "$COMPOSE" "$COMPOSE_MIN"; then
    ok "compose: $COMPOSE (>= $COMPOSE_MIN)"
    if docker compose config --quiet 2>/dev/null; then
      ok "compose.yaml: valid"
    else
      fail "compose.yaml: docker compose config rejects it" "run: docker compose config (it names the error)"
    fi
  else
    fail "compose: $COMPOSE < $COMPOSE_MIN" \
      "upgrade the Compose plugin: sudo apt-get install docker-compose-plugin (Docker's apt repository), https://docs.docker.com/compose/install/linux/"
  fi
else
  fail "compose: the v2 plugin (docker compose) is missing" \
    "install it: sudo apt-get install docker-compose-plugin (Docker's apt repository), https://docs.docker.com/compose/install/linux/"
fi

# --- NVIDIA driver ------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
  fail "nvidia driver: nvidia-smi not found (no driver, or no NVIDIA GPU)" \
    "install the NVIDIA driver >= $DRIVER_MIN: https://docs.nvidia.com/datacenter/tesla/driver-installation-guide/ (e.g. sudo ubuntu-drivers install)"
else
  DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | paste -sd ',' -)
  if [ -z "$DRIVER" ]; then
    fail "nvidia driver: nvidia-smi cannot talk to the driver" \
      "reboot after a driver install, or reinstall the driver; run nvidia-smi to see the error"
  elif version_ge "$DRIVER" "$DRIVER_MIN"; then
    ok "nvidia driver: $DRIVER (>= $DRIVER_MIN for CUDA $CUDA); GPUs: $GPUS"
  elif [ "$FLAVOUR" = cu121 ] && version_ge "$DRIVER" 525.60.13; then
    warn "nvidia driver: $DRIVER < $DRIVER_MIN: CUDA 12.1 runs only under minor-version compatibility (no PTX JIT)" \
      "upgrade the driver to >= $DRIVER_MIN"
  else
    fail "nvidia driver: $DRIVER is too old for CUDA $CUDA (needs >= $DRIVER_MIN)" \
      "upgrade the driver, or build an older CUDA flavour (CUDA_FLAVOUR in .env)"
  fi
fi

# --- NVIDIA Container Toolkit ----------------------------------------------------------
if command -v nvidia-ctk >/dev/null 2>&1 || command -v nvidia-container-cli >/dev/null 2>&1; then
  ok "nvidia container toolkit: $(nvidia-ctk --version 2>/dev/null | head -n 1 || echo installed)"
else
  fail "nvidia container toolkit: not installed (GPU services fail with 'could not select device driver')" \
    "install nvidia-container-toolkit: https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html, then: sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker"
fi
if [ "$DOCKER_UP" = 1 ]; then
  if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
    ok "docker runtime: nvidia registered"
  else
    fail "docker runtime: docker info lists no nvidia runtime" \
      "sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker"
  fi
fi

# --- optional: a container that sees the GPUs ------------------------------------------
if [ "$SMOKE" = 1 ]; then
  if [ "$DOCKER_UP" = 1 ] && docker run --rm --gpus all "$BASE" nvidia-smi -L; then
    ok "smoke: a CUDA container sees the GPUs"
  else
    fail "smoke: docker run --gpus all $BASE nvidia-smi -L failed" \
      "fix the failures above; the message of that command names the missing piece"
  fi
fi

if [ "$FAILED" = 0 ]; then
  echo "preflight: ok. Next: docker compose build train test && docker compose run --rm doctor"
else
  echo "preflight: FAILED (fixes above)"
fi
exit "$FAILED"
