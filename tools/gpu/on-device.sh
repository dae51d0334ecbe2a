#!/usr/bin/env bash
# Runs the GPU suite on a GPU machine, over what tools/gpu/bundle.sh packed into .gpu/, from the
# repository root:   bash .gpu/on-device.sh [WORDS]     (logs under $OUT, default .gpu/out)
#
# Words (default: info libs tests infer anchor trainbench latency train targets):
#   info     the card, its driver, the CUDA libraries on the machine
#   libs     opens the GPU with the plain environment: the crate's own library search
#            (README, "GPU set-up") must find cuBLAS/cuDNN; prints the versions it loaded
#   tests    every GPU test, one at a time (--test-threads=1), each result listed; never stops at
#            a failure (not the 10,000-batch soak)
#   infer    infer --batch $BATCH in fp32, fp32 --fp32-gemm-only, tf32, fp16 and bf16 (extra
#            flags: INFER_ARGS)
#   bench    the criterion GPU benches (benches/gpu_forward.rs: forward_u8 at batch 1 to 256,
#            the pipeline at 128), about four minutes (--quick by default: BENCH_ARGS)
#   anchor   PyTorch in the same run: torch_anchor.py --precisions fp32,tf32,fp16,bf16
#   trainbench  one training step's throughput (benches/gpu_train.rs: paper, batch 128,
#            fp32+gemm-only, fp32, tf32, fp16, the last three also +nondeterministic; pageable,
#            page-locked and sent-ahead; each mode first with a phase-by-phase profile of one
#            step per source, its cuDNN algorithm choices and graph state; criterion's --quick
#            by default: TRAIN_BENCH_ARGS) beside PyTorch's (torch_train_anchor.py: fp32, tf32,
#            autocast+GradScaler, the last also in channels_last). Before latency and train: the training target is the
#            furthest from met (0.18x at da4e9e1), so its profile must not be cut by the budget
#   train    train --device cuda for 20 steps in fp32, fp32 --fp32-gemm-only and fp16 on
#            tests/data/shapes, the fp32 losses set beside the same run on the CPU
#   compile  the anchor again with torch.compile (reduce-overhead), under its own timeout
#   latency  batch 1: infer in fp32 and fp16 (latency from submission to logits on the host)
#            beside the anchor's e2e ms/batch at --batch 1 (issue 10's batch-1 target)
#   targets  the issues' speed targets from this run's logs (targets.py): ours beside PyTorch
#            in tables (targets.md) and one met / NOT met / not measured line per target
#   sanitize compute-sanitizer memcheck, racecheck, synccheck, initcheck over the GPU test
#            executables in SANITIZE_TESTS (default gpu_layers: the others run many times
#            slower under a sanitizer; add gpu_model gpu_training_kernels gpu_training
#            where the lease allows)
#   soak     the 10,000-batch GPU soak
# Time knobs, for a short lease: BUDGET (seconds for the whole script, default 530: no step
# runs past it, and a step with under 10 s left is skipped with a note),
# TEST_TIMEOUT (seconds per test executable, default 420),
# INFER_TIMEOUT (seconds per infer run, default 240),
# UNIT_FILTER (the library's unit tests to run, default "cuda::": the CPU ones run in CI),
# TRAIN_BENCH_ARGS / BENCH_ARGS (criterion's arguments, default --quick: each figure after at
# most a few seconds instead of its full measurement time),
# SANITIZE_TESTS (default "gpu_layers"), SANITIZE_TOOLS (default "memcheck racecheck synccheck
# initcheck"), SANITIZE_TIMEOUT (seconds per tool and executable, default 300).
# Prints one summary table at the end; $OUT/summary.txt grows line by line as the run goes, so
# a run cut short still leaves what it had. PACK_TO: a folder to pack the logs into at the end
# (see there).
set -uo pipefail
cd "$(dirname "$0")/.."
G=.gpu
OUT=${OUT:-$G/out}
mkdir -p "$OUT"
# PACK_TO gets copies as the run goes (see note); none where it is $OUT itself.
if [ -n "${PACK_TO:-}" ]; then
    mkdir -p "$PACK_TO"
    [ "$(cd "$PACK_TO" && pwd -P)" = "$(cd "$OUT" && pwd -P)" ] && PACK_TO=
fi
words=${*:-info libs tests infer anchor trainbench latency train targets}
BATCH=${BATCH:-128}
TEST_TIMEOUT=${TEST_TIMEOUT:-420}
UNIT_FILTER=${UNIT_FILTER-cuda::}
INFER_TIMEOUT=${INFER_TIMEOUT:-240}
deadline=$((SECONDS + ${BUDGET:-530}))
: > "$OUT/summary.txt"
# With PACK_TO, the summary is copied there at every line too, so that a run the device tool
# kills at its limit (before the packing at the end) still brings back what it had.
note() {
    echo "$1" >> "$OUT/summary.txt"
    echo "== $1"
    [ -z "${PACK_TO:-}" ] || cp "$OUT/summary.txt" "$PACK_TO/"
}
# Runs a command under `timeout` for at most $1 seconds and never past the deadline (killed 5 s
# after the polite signal): one hanging step cannot take the rest of the lease. Exit status 125
# without running when under 10 s are left.
within() {
    local want=$1 left=$((deadline - SECONDS - 5))
    shift
    if [ "$left" -lt 10 ]; then
        echo "skipped: out of time (BUDGET)" >&2
        return 125
    fi
    [ "$want" -gt "$left" ] && want=$left
    timeout -k 5 "$want" "$@"
}
export RUST_BACKTRACE=1
# Criterion's saved baselines would add comparison lines to a rerun on the same machine.
CRITERION_HOME=$(mktemp -d)
export CRITERION_HOME

# bundle.sh packs the executables as one xz archive (see there); Python's tarfile unpacks it
# where no xz is installed.
if [ ! -d $G/bin ] && [ -f $G/bin.tar.xz ]; then
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' $G/bin.tar.xz $G \
        || { echo "could not unpack $G/bin.tar.xz"; exit 3; }
fi
note "commit: $(cat $G/commit.txt 2>/dev/null | paste -sd' ')"
for w in $words; do
    case $w in
    info)
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/info.txt" 2>&1
        note "card, driver, memory: $(head -1 "$OUT/info.txt")"
        python3 - >> "$OUT/info.txt" 2>&1 <<'PY'
import glob, site
for d in site.getsitepackages():
    for f in sorted(glob.glob(d + "/nvidia/*/lib/lib*.so*")):
        print(f)
PY
        note "CUDA libraries in site-packages: $(grep -c '\.so' "$OUT/info.txt") files (info.txt)"
        ;;
    libs)
        # The plain environment: no LD_LIBRARY_PATH help, the crate must find the libraries.
        within 120 $G/bin/bin-infer --device cuda --batch 1 --iterations 1 --warmup 0 > "$OUT/libs.txt" 2>&1
        rc=$?
        note "libs (crate's own search) rc=$rc: $(grep -E 'libraries|error' "$OUT/libs.txt" | head -1)"
        ;;
    tests)
        : > "$OUT/tests.log"
        for t in $G/bin/unit-alexnet_cuda $G/bin/test-gpu_layers $G/bin/test-gpu_model \
            $G/bin/test-gpu_training_kernels $G/bin/test-gpu_training; do
            [ -x "$t" ] || { note "tests $(basename "$t"): missing"; continue; }
            log="$OUT/tests-$(basename "$t").log"
            filter=()
            [ "$(basename "$t")" = unit-alexnet_cuda ] && [ -n "$UNIT_FILTER" ] && filter=("$UNIT_FILTER")
            # --show-output: a passing test's margins and algorithm choices are what calibrate
            # the tolerances, so they are kept too. Each executable its own log, so that one
            # that dies before its result line is not reported with the previous one's.
            within "$TEST_TIMEOUT" "$t" --include-ignored --test-threads=1 --show-output "${filter[@]}" > "$log" 2>&1
            rc=$?
            { echo "### $t"; cat "$log"; } >> "$OUT/tests.log"
            note "tests $(basename "$t"): rc=$rc $(grep -E '^test result:' "$log" | tail -1 | sed 's/test result: //')"
        done
        # The convolution algorithms cuDNN chose at batch 128, GEMM family only and free to take
        # transforms (paper_network_fp32_with_transforms_matches_cpu_fp32 prints them first).
        grep 'fp32_gemm_only=.* batch 128' "$OUT/tests.log" > "$OUT/conv-algorithms.txt"
        note "conv algorithms at batch 128: $(wc -l < "$OUT/conv-algorithms.txt") lines (conv-algorithms.txt)"
        grep -E '^test .* \.\.\. (ok|FAILED|ignored)' "$OUT/tests.log" | sed 's/^test /  /' > "$OUT/test-results.txt"
        cat "$OUT/test-results.txt" >> "$OUT/summary.txt"
        [ -z "${PACK_TO:-}" ] || cp "$OUT/summary.txt" "$PACK_TO/"
        ;;
    infer)
        # fp32 is PyTorch's fp32 (FFT and Winograd allowed); fp32g keeps to the GEMM family
        # (--fp32-gemm-only), within 1e-4 of the CPU.
        for p in fp32 fp32g tf32 fp16 bf16; do
            flags=(--precision "$p")
            [ "$p" = fp32g ] && flags=(--precision fp32 --fp32-gemm-only)
            within "$INFER_TIMEOUT" $G/bin/bin-infer --device cuda --batch "$BATCH" "${flags[@]}" ${INFER_ARGS:-} > "$OUT/infer-$p.txt" 2>&1
            rc=$?
            note "infer $p batch $BATCH rc=$rc: $(grep -E 'throughput|error' "$OUT/infer-$p.txt" | head -1)"
            grep -E 'GPU (H2D|compute|D2H)' "$OUT/infer-$p.txt" | sed 's/^/  /'
        done
        ;;
    bench)
        within 400 $G/bin/bench-gpu_forward --bench ${BENCH_ARGS---quick} > "$OUT/bench.txt" 2>&1
        rc=$?
        note "bench gpu_forward rc=$rc: $(grep -cE 'thrpt' "$OUT/bench.txt") figures (bench.txt) $(grep -m1 SKIPPED "$OUT/bench.txt")"
        while read -r l; do note "  $l"; done < <(grep -B2 -E 'thrpt|skipped' "$OUT/bench.txt" | grep -E '^gpu_|thrpt|skipped')
        ;;
    anchor)
        within 300 python3 $G/torch_anchor.py --batch "$BATCH" --precisions fp32,tf32,fp16,bf16 --json "$OUT/anchor.json" > "$OUT/anchor.txt" 2>&1
        rc=$?
        note "anchor (PyTorch eager) rc=$rc (anchor.txt)"
        # The table: its header and one row per precision (or why one was not measured).
        while read -r l; do note "  $l"; done < <(grep -E 'img/s|^ *(fp32|tf32|fp16|bf16) |not measured' "$OUT/anchor.txt")
        ;;
    train)
        # fp32g: fp32 kept to the GEMM-family convolutions (--fp32-gemm-only). cpu: the same run
        # on the CPU, the reference both fp32 runs' losses are set beside (per epoch).
        # The weights and checkpoints (~700 MB a run) go to a scratch folder, not $OUT; a rerun
        # starts afresh (train appends to its log and refuses to overwrite a checkpoint).
        saves=$(mktemp -d)
        declare -A train_rc=()
        for p in fp32 fp32g fp16 bf16 cpu; do
            flags=(--device cuda --precision "$p")
            [ "$p" = fp32g ] && flags=(--device cuda --precision fp32 --fp32-gemm-only)
            [ "$p" = cpu ] && flags=(--device cpu --precision fp32)
            rm -f "$OUT/train-$p.csv"
            within 180 $G/bin/bin-train --data tests/data/shapes/train --val tests/data/shapes/val \
                --classes 4 --batch 16 --steps 20 "${flags[@]}" \
                --save "$saves/train-$p.safetensors" --log "$OUT/train-$p.csv" > "$OUT/train-$p.txt" 2>&1
            rc=$?
            train_rc[$p]=$rc
            note "train $p 20 steps rc=$rc: $(grep -iE 'epoch|error' "$OUT/train-$p.txt" | tail -1)"
        done
        rm -rf "$saves"
        for p in fp32 fp32g; do
            if [ "${train_rc[$p]}" = 0 ] && [ "${train_rc[cpu]}" = 0 ]; then
                note "train $p against the CPU: $(python3 "$G/compare_losses.py" "$OUT/train-$p.csv" "$OUT/train-cpu.csv" 2>&1)"
            else
                note "train $p against the CPU: not compared (rc ${train_rc[$p]}, CPU rc ${train_rc[cpu]})"
            fi
        done
        ;;
    trainbench)
        within 400 $G/bin/bench-gpu_train --bench ${TRAIN_BENCH_ARGS---quick} > "$OUT/bench-train.txt" 2>&1
        rc=$?
        note "bench gpu_train rc=$rc: $(grep -cE 'thrpt' "$OUT/bench-train.txt") figures (bench-train.txt) $(grep -m1 SKIPPED "$OUT/bench-train.txt")"
        while read -r l; do note "  $l"; done < <(grep -B2 -E 'thrpt|skipped' "$OUT/bench-train.txt" | grep -E '^gpu_|thrpt|skipped')
        # What failed or was passed over, and whether each mode's figures replayed a graph.
        while read -r l; do note "  $l"; done < <(grep -E 'SKIPPED|INVALID|steps skipped' "$OUT/bench-train.txt")
        # From each profile: the upload, all forwards, all backwards, the whole step.
        while read -r l; do note "  $l"; done < <(grep -A60 'profile (one eager step)' "$OUT/bench-train.txt" | grep -E 'profile \(one|^batch upload|^all forwards|^all backwards|^step ')
        within 240 python3 $G/torch_train_anchor.py --device cuda --batch 128 --steps 10 --presets paper --precisions fp32,tf32,amp > "$OUT/anchor-train.txt" 2>&1
        rc=$?
        note "anchor (PyTorch training) rc=$rc (anchor-train.txt)"
        # Autocast again in channels_last (NHWC), PyTorch's advice for mixed precision on tensor
        # cores: the mixed-precision target is held against the faster of the two.
        within 90 python3 $G/torch_train_anchor.py --device cuda --batch 128 --steps 10 --presets paper --precisions amp --channels-last >> "$OUT/anchor-train.txt" 2>&1
        rc=$?
        note "anchor (PyTorch training, amp channels_last) rc=$rc (anchor-train.txt)"
        while read -r l; do note "  $l"; done < <(grep -E 'img/s' "$OUT/anchor-train.txt")
        ;;
    latency)
        for p in fp32 fp16; do
            within "$INFER_TIMEOUT" $G/bin/bin-infer --device cuda --batch 1 --precision "$p" --iterations 500 --warmup 50 > "$OUT/latency-$p.txt" 2>&1
            rc=$?
            note "infer $p batch 1 rc=$rc: $(grep -E '^latency|error' "$OUT/latency-$p.txt" | head -1)"
            grep -E '^interval|GPU compute' "$OUT/latency-$p.txt" | sed 's/^/  /'
        done
        within 300 python3 $G/torch_anchor.py --batch 1 --iters 500 --warmup 50 --precisions fp32,fp16 > "$OUT/anchor-latency.txt" 2>&1
        rc=$?
        note "anchor batch 1 rc=$rc (anchor-latency.txt)"
        while read -r l; do note "  $l"; done < <(grep -E 'ms/batch|fp32|fp16' "$OUT/anchor-latency.txt")
        ;;
    compile)
        within 400 python3 $G/torch_anchor.py --batch "$BATCH" --precisions fp32,fp16 --compile --compile-mode reduce-overhead > "$OUT/anchor-compile.txt" 2>&1
        rc=$?
        note "anchor (torch.compile) rc=$rc (anchor-compile.txt)"
        ;;
    targets)
        # Reads the logs the words above wrote; a second or so, so it runs even past BUDGET.
        timeout -k 5 30 python3 $G/targets.py "$OUT" > "$OUT/targets.md" 2>&1
        rc=$?
        note "targets rc=$rc (targets.md: ours beside PyTorch, every target's verdict)"
        while read -r l; do note "  ${l#- }"; done < <(grep -E '^- target ' "$OUT/targets.md")
        ;;
    sanitize)
        if command -v compute-sanitizer >/dev/null; then
            for t in ${SANITIZE_TESTS:-gpu_layers}; do
                [ -x "$G/bin/test-$t" ] || { note "sanitize $t: missing"; continue; }
                for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}; do
                    log="$OUT/sanitize-$t-$tool.log"
                    within "${SANITIZE_TIMEOUT:-300}" compute-sanitizer --tool $tool --error-exitcode 9 $G/bin/test-$t --include-ignored --test-threads=1 > "$log" 2>&1
                    rc=$?
                    note "sanitize $tool $t rc=$rc $(grep -E 'ERROR SUMMARY' "$log" | tail -1)"
                done
            done
        else
            note "sanitize: compute-sanitizer not found"
        fi
        ;;
    soak)
        within 580 $G/bin/test-soak --include-ignored --exact soak_gpu_10000_batches > "$OUT/soak.log" 2>&1
        rc=$?
        note "soak rc=$rc $(grep -E '^test result:' "$OUT/soak.log" | tail -1)"
        ;;
    *) note "unknown word: $w" ;;
    esac
done

echo
echo "================ summary ================"
cat "$OUT/summary.txt"

# PACK_TO (a folder; on a lent GPU the device tool's $OUT, with OUT elsewhere): every log packed
# there as logs.tar.xz by Python's tarfile (no xz program needed on the GPU machine; tar's gzip
# where Python fails), saved weights left out, with summary.txt, tests.log and targets.md
# beside it to read at once.
if [ -n "${PACK_TO:-}" ]; then
    python3 - "$OUT" "$PACK_TO/logs.tar.xz" <<'PY' \
        || tar -C "$OUT" -czf "$PACK_TO/logs.tar.gz" --exclude='*.safetensors' .
import sys, tarfile
logs, archive = sys.argv[1], sys.argv[2]
with tarfile.open(archive, "w:xz") as packed:
    packed.add(logs, arcname=".",
               filter=lambda m: None if m.name.endswith(".safetensors") else m)
PY
    for f in summary.txt tests.log targets.md; do
        [ ! -f "$OUT/$f" ] || cp "$OUT/$f" "$PACK_TO/"
    done
fi
exit 0
