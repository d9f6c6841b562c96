#!/usr/bin/env bash
# Makes sure wgpu will find an adapter, then runs the given command (if any).
#
# featreplay needs a GPU driver with Vulkan, Metal or DX12. On a machine without one
# (CI, a server, a fresh container) it installs Mesa's software Vulkan driver, lavapipe,
# which runs the same WGSL kernels on the CPU. Usage:
#   scripts/ensure-gpu.sh                       # check / install only
#   scripts/ensure-gpu.sh cargo test --release  # then run a command
set -euo pipefail

have_adapter() {
    case "$(uname -s)" in
        Darwin) return 0 ;;                        # Metal is always there
        MINGW* | MSYS* | CYGWIN*) return 0 ;;      # DX12 / Vulkan through the GPU driver
    esac
    # Vulkan needs the loader library and at least one driver manifest (ICD).
    local loader=0 icd=0
    if ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then loader=1; fi
    for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
        if compgen -G "$d/*.json" >/dev/null 2>&1; then icd=1; fi
    done
    [ "$loader" = 1 ] && [ "$icd" = 1 ]
}

install_lavapipe() {
    if command -v apt-get >/dev/null 2>&1; then
        local sudo=""
        if [ "$(id -u)" != 0 ]; then
            if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
                echo "featreplay: no Vulkan driver found; run as root: apt-get install -y mesa-vulkan-drivers libvulkan1" >&2
                return 1
            fi
        fi
        echo "featreplay: no GPU adapter found; installing Mesa's software Vulkan driver (lavapipe)..." >&2
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
    elif command -v dnf >/dev/null 2>&1; then
        echo "featreplay: no Vulkan driver found. Install one: sudo dnf install mesa-vulkan-drivers vulkan-loader" >&2
        return 1
    elif command -v pacman >/dev/null 2>&1; then
        echo "featreplay: no Vulkan driver found. Install one: sudo pacman -S vulkan-swrast vulkan-icd-loader" >&2
        return 1
    elif command -v apk >/dev/null 2>&1; then
        echo "featreplay: no Vulkan driver found. Install one: apk add mesa-vulkan-swrast vulkan-loader" >&2
        return 1
    else
        echo "featreplay: no Vulkan driver found. Install your GPU's Vulkan driver, or Mesa's lavapipe (package usually named mesa-vulkan-drivers) and the Vulkan loader (libvulkan1 / vulkan-loader)." >&2
        return 1
    fi
}

if ! have_adapter; then
    install_lavapipe
    have_adapter || { echo "featreplay: still no Vulkan driver after installing lavapipe" >&2; exit 1; }
fi

# lavapipe probes Wayland for presentation and complains when this is unset; compute does
# not need it.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

if [ "$#" -gt 0 ]; then
    exec "$@"
fi
