#!/usr/bin/env bash
# On a GPU machine with Rust: build (tools/gpu/bundle.sh) and run the GPU suite in place
# (tools/gpu/on-device.sh). Arguments are on-device.sh's words.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools/gpu/bundle.sh
exec bash .gpu/on-device.sh "$@"
