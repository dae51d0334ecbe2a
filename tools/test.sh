#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs nvcc/NVRTC 13.0 and libclang when
# missing (tools/cuda-env.sh), then runs `cargo test --release` with any extra arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
# An assignment keeps the script's exit status (set -e stops on a failed install); a bare
# eval "$(...)" would not.
cuda_env=$(tools/cuda-env.sh)
eval "$cuda_env"
# The toolchain-dependent tests run (and fail if a tool is missing) instead of being ignored.
export ALEXNET_REQUIRE_CUDA_TOOLS=1
exec cargo test --release "$@"
