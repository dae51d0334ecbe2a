#!/usr/bin/env bash
# Installs what the kernel build and kernel tests need on a machine without CUDA, when it is
# missing, and prints the environment to use it:
#
#     cuda_env=$(tools/cuda-env.sh) && eval "$cuda_env"
#
# - nvcc and NVRTC 13.0 from NVIDIA's pip wheels (no GPU or driver needed), into a cache outside
#   the repository (override with ALEXNET_CUDA_DIR);
# - libclang (bindgen, tests/abi_bindgen.rs) and g++ (nvcc's preprocessor) with apt-get.
# Progress goes to stderr; only the `export` lines go to stdout. Idempotent and quick once done.
set -euo pipefail
exec 3>&1 1>&2   # everything but the final exports goes to stderr

fail() {
    echo "error: $*" >&2
    exit 1
}

# --- CUDA toolchain: nvcc + NVRTC 13.0 from NVIDIA's pip wheels -----------------------------
# Pinned to CUDA 13.0: the GPU machines run driver 580 (CUDA 13.0), which rejects PTX made by
# newer toolkits. Installed with `pip --target` into a cache outside the repository (no venv
# module or system site needed); reinstalled only when the pins change or the install is broken.
echo "== CUDA toolchain (nvcc and NVRTC 13.0, pip wheels)"
CUDA_PACKAGES=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-cuda-runtime==13.0.96"
    "nvidia-cuda-crt==13.0.88"
    "nvidia-nvvm==13.0.88"
    "nvidia-cuda-cccl==13.0.*"
    "nvidia-cuda-nvrtc==13.0.*"
    # Only reads fatbins (tests/ptx_kernels.rs lists their machine code); no 13.0 wheel exists.
    "nvidia-cuda-cuobjdump==13.2.*"
)
CUDA_DIR="${ALEXNET_CUDA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/alexnet-cuda/cuda-13.0}"
CUDA_STAMP="$CUDA_DIR/.alexnet-packages"
CUDA_ROOT="$CUDA_DIR/nvidia/cu13"
if [ "$(cat "$CUDA_STAMP" 2>/dev/null)" != "${CUDA_PACKAGES[*]}" ] \
    || ! "$CUDA_ROOT/bin/nvcc" --version >/dev/null 2>&1 \
    || [ ! -e "$CUDA_ROOT/lib/libnvrtc.so.13" ]; then
    command -v python3 >/dev/null || fail "python3 is needed to install the CUDA wheels"
    rm -rf "$CUDA_DIR" "$CUDA_DIR.partial"
    mkdir -p "$(dirname "$CUDA_DIR")"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-input \
        --target "$CUDA_DIR.partial" "${CUDA_PACKAGES[@]}" \
        || fail "pip could not install the CUDA wheels: ${CUDA_PACKAGES[*]}"
    mv "$CUDA_DIR.partial" "$CUDA_DIR"
    echo "${CUDA_PACKAGES[*]}" >"$CUDA_STAMP"
fi
export NVCC="$CUDA_ROOT/bin/nvcc"
export LD_LIBRARY_PATH="$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$NVCC" --version | grep release || fail "$NVCC does not run"
[ -e "$CUDA_ROOT/lib/libnvrtc-builtins.so.13.0" ] || fail "NVRTC 13.0 missing from $CUDA_ROOT/lib"
[ -x "$CUDA_ROOT/bin/cuobjdump" ] || fail "cuobjdump missing from $CUDA_ROOT/bin"

# --- System packages: libclang (bindgen, tests/abi_bindgen.rs) and g++ (nvcc's preprocessor) -
echo "== system packages (libclang, g++)"
APT_PACKAGES=()
if [ -z "${LIBCLANG_PATH:-}" ] && ! ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9.]+)?\.so'; then
    APT_PACKAGES+=(libclang-dev)
fi
command -v g++ >/dev/null || APT_PACKAGES+=(g++)
if [ ${#APT_PACKAGES[@]} -gt 0 ]; then
    SUDO=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || fail "need root (or sudo) to apt-get install ${APT_PACKAGES[*]}"
        SUDO=(sudo)
    fi
    ${SUDO[@]+"${SUDO[@]}"} apt-get update -q || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive ${SUDO[@]+"${SUDO[@]}"} apt-get install -y -q --no-install-recommends \
        "${APT_PACKAGES[@]}" || fail "apt-get install ${APT_PACKAGES[*]} failed"
else
    echo "already present"
fi

echo "NVCC=$NVCC"
printf 'export NVCC=%q\nexport LD_LIBRARY_PATH=%q\n' "$NVCC" "$LD_LIBRARY_PATH" >&3
