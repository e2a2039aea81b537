#!/usr/bin/env bash
# Install edgeinfer as a service on a Raspberry Pi (64-bit Pi OS) or a
# similar 64-bit ARM board. Idempotent: run it again to update.
#
#   sudo bash scripts/install-pi.sh              # install, pull the default model, start the service
#   sudo bash scripts/install-pi.sh --dry-run    # print every step, change nothing
#   sudo bash scripts/install-pi.sh --lan        # listen on the LAN, with a token file
#   sudo bash scripts/install-pi.sh --uninstall [--purge-models]
#
# Environment: EDGEINFER_MODEL (a catalog name; default: chosen for this
# board), EDGEINFER_PREFIX (default /opt/edgeinfer), EDGEINFER_SRC (the
# edgeinfer source to install; default: this checkout).
set -euo pipefail

DRY=0 UNINSTALL=0 PURGE=0 LAN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge-models) PURGE=1 ;;
        --lan) LAN=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
    esac
done

PREFIX=${EDGEINFER_PREFIX:-/opt/edgeinfer}
HOME_DIR=/var/lib/edgeinfer
USER_NAME=edgeinfer
UNIT=/etc/systemd/system/edgeinfer.service
TOKEN_FILE=/etc/edgeinfer/token
SRC=${EDGEINFER_SRC:-$(cd "$(dirname "$0")/.." && pwd)}
ARCH=${EDGEINFER_INSTALL_ARCH:-$(uname -m)}   # the override exists for tests of --dry-run
MODEL_FILE=${EDGEINFER_INSTALL_MODEL_FILE:-/proc/device-tree/model}
COMPATIBLE_FILE=${EDGEINFER_INSTALL_COMPATIBLE_FILE:-/proc/device-tree/compatible}

step() { echo "+ $*"; }
run() {  # run a command, or only print it with --dry-run
    step "$*"
    if [ "$DRY" = 0 ]; then "$@"; fi
}

board() {
    # The device tree's model names a Pi; its compatible list names the SoC
    # of other boards ("rockchip,rk3588" on a ROCK 5B or an Orange Pi 5).
    local model="" compatible=""
    [ -r "$MODEL_FILE" ] && model=$(tr -d '\0' < "$MODEL_FILE")
    [ -r "$COMPATIBLE_FILE" ] && compatible=$(tr '\0' ' ' < "$COMPATIBLE_FILE")
    shopt -s nocasematch
    case "$model $compatible" in
        *"Raspberry Pi 5"*|*bcm2712*) echo pi5 ;;
        *"Raspberry Pi 4"*|*"Compute Module 4"*|*bcm2711*) echo pi4 ;;
        *rk3588*|*"Orange Pi 5"*|*"Rock 5"*) echo rk3588 ;;
        *) echo generic ;;
    esac
    shopt -u nocasematch
}

# CMake flags per board (llama.cpp's GGML_CPU_ARM_ARCH): the build must not
# rely on -march=native guessing the core of a big.LITTLE board.
cmake_args() {
    case "$1" in
        pi4) echo "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a" ;;                  # Cortex-A72: NEON, no dotprod
        pi5) echo "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" ;;    # Cortex-A76
        rk3588) echo "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" ;; # A76 + A55
        *) echo "-DGGML_NATIVE=ON" ;;
    esac
}

if [ "$UNINSTALL" = 1 ]; then
    run systemctl disable --now edgeinfer.service || true
    run rm -f "$UNIT"
    run systemctl daemon-reload
    run rm -rf "$PREFIX"
    if [ "$PURGE" = 1 ]; then
        run rm -rf "$HOME_DIR" /etc/edgeinfer
        run userdel "$USER_NAME" || true
    else
        echo "Kept the models in $HOME_DIR (add --purge-models to remove them)."
    fi
    exit 0
fi

if [ "$ARCH" != "aarch64" ] && [ "$ARCH" != "arm64" ]; then
    echo "This installer is for 64-bit ARM Linux (found $ARCH); on other machines use the README's command." >&2
    [ "$DRY" = 1 ] || exit 1
    echo "Not on ARM, so this dry run shows the plan for a board of this kind:"
fi
if [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "Run it as root: sudo bash $0 $*" >&2
    exit 1
fi
free_mb=$(df -Pm "$(dirname "$PREFIX")" | awk 'NR==2 {print $4}')
if [ "${free_mb:-0}" -lt 3000 ]; then
    echo "Need 3 GB free under $(dirname "$PREFIX") for the build and a model; found ${free_mb} MB." >&2
    [ "$DRY" = 1 ] || exit 1
fi

BOARD=$(board)
echo "Board: $BOARD; llama.cpp flags: $(cmake_args "$BOARD")"

run apt-get update
run apt-get install -y --no-install-recommends python3-venv python3-dev build-essential cmake git
id "$USER_NAME" >/dev/null 2>&1 || run useradd --system --home-dir "$HOME_DIR" --shell /usr/sbin/nologin "$USER_NAME"
run install -d -o "$USER_NAME" -g "$USER_NAME" -m 0750 "$HOME_DIR"
[ -d "$PREFIX/venv" ] || run python3 -m venv "$PREFIX/venv"
run env CMAKE_ARGS="$(cmake_args "$BOARD")" "$PREFIX/venv/bin/pip" install --upgrade "$SRC"

as_service_user() { run runuser -u "$USER_NAME" -- env EDGEINFER_HOME="$HOME_DIR" "$PREFIX/venv/bin/edgeinfer" "$@"; }
MODEL=${EDGEINFER_MODEL:-}
if [ -n "$MODEL" ]; then as_service_user pull "$MODEL"; else as_service_user run --yes "Say hello." >/dev/null; fi
as_service_user doctor --selftest
as_service_user rpc-worker --build-only   # llama.cpp's RPC backend, for 'edgeinfer rpc-worker' and 'serve --rpc'
as_service_user tune ${MODEL:+"$MODEL"}

serve_opts=(--http 8080)   # JSON lines on 8765, the OpenAI / Anthropic APIs and /metrics on 8080
if [ "$LAN" = 1 ]; then
    if [ ! -s "$TOKEN_FILE" ]; then
        run install -d -m 0700 /etc/edgeinfer
        step "umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > $TOKEN_FILE"
        [ "$DRY" = 1 ] || (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$TOKEN_FILE")
    fi
    serve_opts+=(--host 0.0.0.0 --token-file "$TOKEN_FILE")
fi
step "$PREFIX/venv/bin/edgeinfer serve ${MODEL} --print-systemd-unit ${serve_opts[*]} > $UNIT"
if [ "$DRY" = 0 ]; then
    "$PREFIX/venv/bin/edgeinfer" serve ${MODEL:+"$MODEL"} --print-systemd-unit "${serve_opts[@]}" \
        --unit-user "$USER_NAME" --unit-home "$HOME_DIR" > "$UNIT"
fi
run systemctl daemon-reload
run systemctl enable --now edgeinfer.service
echo "edgeinfer is serving: systemctl status edgeinfer; logs: journalctl -u edgeinfer"
