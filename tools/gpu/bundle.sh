#!/usr/bin/env bash
# Builds what runs on a GPU machine and packs it into .gpu/ at the repository root, for a GPU
# machine without Rust (carry .gpu/ there, then: bash .gpu/on-device.sh). On a GPU machine
# with Rust, `tools/gpu/run.sh` does both in place.
#
# Packs the release executables that touch a GPU (the library's unit tests, tests/gpu_*.rs,
# tests/soak.rs, the infer and train binaries, the pipeline example, the GPU benches),
# tools/gpu/on-device.sh and the PyTorch anchors (inference and training). Built with nvcc 13.0 (tools/cuda-env.sh), so the kernels carry sm_75..sm_120 machine
# code. .gpu/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
cuda_env=$(tools/cuda-env.sh)
eval "$cuda_env"
export ALEXNET_REQUIRE_CUDA_TOOLS=1

rm -rf .gpu && mkdir -p .gpu/bin
cargo build --release --lib --tests --bins --examples --benches --message-format=json-render-diagnostics \
    > .gpu/build.json
python3 - .gpu/build.json > .gpu/executables.txt <<'PY'
import json, sys
wanted = {("unit", "alexnet_cuda"), ("test", "gpu_layers"), ("test", "gpu_model"),
          ("test", "gpu_training_kernels"), ("test", "gpu_training"),
          ("test", "soak"), ("bin", "infer"), ("bin", "train"), ("example", "pipeline"),
          ("bench", "gpu_forward"), ("bench", "gpu_train")}
seen = set()
for line in open(sys.argv[1]):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    kinds = msg["target"]["kind"]
    kind = next((k for k in ("test", "bench", "example", "bin") if k in kinds), "lib")
    if msg["profile"].get("test") and kind in ("lib", "bin"):
        kind = "unit"
    key = (kind, msg["target"]["name"])
    if key in wanted and key not in seen:
        seen.add(key)
        print(kind, msg["target"]["name"], msg["executable"])
missing = wanted - seen
if missing:
    sys.exit(f"not built: {sorted(missing)}")
PY
rm -f .gpu/build.json
while read -r kind name exe; do
    cp "$exe" ".gpu/bin/${kind}-${name}"
    strip --strip-debug ".gpu/bin/${kind}-${name}" 2>/dev/null || true
done < .gpu/executables.txt
# One solid xz stream: the executables share their embedded kernels, so the archive is a
# seventh of their size (about 12 MiB for 80), well inside what a device run may carry (64 MiB).
tar -C .gpu -cf - bin | xz -T0 -6 > .gpu/bin.tar.xz
rm -rf .gpu/bin
cp tools/gpu/on-device.sh tools/gpu/torch_anchor.py tools/gpu/compare_losses.py tools/gpu/targets.py \
    tools/torch_train_anchor.py .gpu/
git rev-parse --short HEAD > .gpu/commit.txt 2>/dev/null || echo unknown > .gpu/commit.txt
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || echo "+uncommitted changes" >> .gpu/commit.txt
size=$(du -sm .gpu | cut -f1)
[ "$size" -lt 64 ] || echo "warning: .gpu/ is ${size} MiB; a device run carries at most 64 MiB" >&2
echo "packed $(wc -l < .gpu/executables.txt) executables into .gpu/ (${size} MiB), commit $(head -1 .gpu/commit.txt)"
