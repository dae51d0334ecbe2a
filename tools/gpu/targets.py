#!/usr/bin/env python3
"""The speed targets of issues 10, 13 and 14, read off one on-device.sh run's logs.

    python3 targets.py OUT_DIR        (on-device.sh's $OUT; prints Markdown)

Sets ours beside PyTorch from the same run, as BENCHMARKS.md wants it, and gives each target
one line: `target <name>: met|NOT met|not measured (...)`. It only reads what the run wrote:
`infer-P.txt` (ours, batch 128), `anchor.json` (PyTorch eager, batch 128), `latency-P.txt` and
`anchor-latency.txt` (batch 1), `bench-train.txt` (criterion, benches/gpu_train.rs) and
`anchor-train.txt` (tools/torch_train_anchor.py). A missing or unreadable file makes its
targets "not measured", never met.
"""
import json
import re
import sys
from pathlib import Path

# (precision of infer-P.txt, label): the order of the inference table.
INFER_RUNS = [("fp32", "fp32"), ("fp32g", "fp32 --fp32-gemm-only"), ("tf32", "tf32"),
              ("fp16", "fp16"), ("bf16", "bf16")]
# criterion's element-throughput units (`" elem/s"` below 1,000, padded to the others' width).
UNITS = {"elem/s": 1.0, "Kelem/s": 1e3, "Melem/s": 1e6, "Gelem/s": 1e9}
# One `thrpt:` line: the low, middle and high estimates, each `{:>6} {unit}`, each with its own
# unit (the low one may be in elem/s where the others are in Kelem/s).
THRPT = re.compile(r"thrpt:\s*\[\s*[0-9.]+\s+[KMG]?elem/s\s+([0-9.]+)\s+([KMG]?elem/s)\s")


def read(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def number(pattern, text):
    """The first group of `pattern` in `text` as a float, or None."""
    m = re.search(pattern, text or "", re.MULTILINE)
    return float(m.group(1)) if m else None


def ours_inference(out, precision):
    """infer's report: throughput (img/s through the pipeline), the GPU compute stage's median
    ms per batch (the forward alone) and the batch; None where infer did not report them."""
    text = read(out / f"infer-{precision}.txt")
    throughput = number(r"^throughput\s*:\s*([0-9.]+) images/s", text)
    if throughput is None:
        return None
    return {
        "img_s": throughput,
        "compute_ms": number(r"^GPU compute\s*:\s*mean [0-9.]+ ms, median ([0-9.]+) ms", text),
        "batch": number(r"^batch\s*:\s*([0-9]+)", text),
    }


def anchor_inference(out):
    """anchor.json: PyTorch eager's results by precision."""
    text = read(out / "anchor.json")
    try:
        return {r["precision"]: r for r in json.loads(text)} if text else {}
    except (ValueError, KeyError, TypeError):
        return {}


def anchor_table(path, column):
    """torch_anchor.py's printed table in `path`: one column by precision (4: e2e ms/batch,
    5: e2e img/s)."""
    rows = {}
    for line in (read(path) or "").splitlines():
        cells = line.split()
        if len(cells) == 6 and cells[0] in ("fp32", "tf32", "fp16", "bf16"):
            try:
                rows[cells[0]] = float(cells[column])
            except ValueError:
                pass
    return rows


def bench_train(out):
    """bench-train.txt: criterion's middle throughput estimate (images/s) of the paper preset
    per figure name (`fp32`, `fp16+channels-last/sent-ahead`, ...), and apart the names of the
    figures the bench marked INVALID (a timed step failed: criterion still printed a figure)."""
    figures, invalid, name = {}, set(), None
    for line in (read(out / "bench-train.txt") or "").splitlines():
        # The id, alone on its line or before `time:`: gpu_train/paper/<mode>[/<source>]/<batch>
        m = re.match(r"gpu_train/paper/(\S+)/[0-9]+(\s|$)", line)
        if m:
            name = m.group(1)
        m = re.match(r"gpu_train paper/(\S+): INVALID figure", line)
        if m:
            invalid.add(m.group(1))
        m = THRPT.search(line)
        if m and name:
            figures[name] = float(m.group(1)) * UNITS[m.group(2)]
            name = None
    return {k: v for k, v in figures.items() if k not in invalid}, invalid


def anchor_train(out):
    """anchor-train.txt: PyTorch's resident img/s by precision (`fp32`, `tf32`, `amp`,
    `amp channels_last`), paper preset at batch 128."""
    rows = {}
    for line in (read(out / "anchor-train.txt") or "").splitlines():
        m = re.match(r"paper (\S+( channels_last)?) batch 128: resident ([0-9.]+) img/s", line)
        if m:
            rows[m.group(1)] = float(m.group(3))
    return rows


def ratio(ours, theirs):
    return ours / theirs if ours and theirs else None


def fmt(value, spec, suffix=""):
    return format(value, spec) + suffix if value is not None else "-"


def verdict(name, got, want, what, strictly=False):
    """One target line: met when `got` (ours against PyTorch, higher is better) reaches `want`
    (passes it, `strictly`)."""
    if got is None:
        return f"target {name}: not measured ({what})"
    met = got > want if strictly else got >= want
    wants = f"> {want}x" if strictly else f">= {want}x"
    return f"target {name}: {'met' if met else 'NOT met'} ({got:.2f}x, wants {wants}; {what})"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: targets.py OUT_DIR (on-device.sh's $OUT)")
    out = Path(sys.argv[1])
    if not out.is_dir():
        sys.exit(f"targets.py: {out} is not a folder (on-device.sh's $OUT)")
    anchor = anchor_inference(out)
    lines, targets = [], []

    lines += ["## Inference, paper preset, batch 128 (ours: infer; PyTorch: torch_anchor.py)", "",
              "| precision | ours img/s (pipeline) | ours fwd ms | PyTorch e2e img/s | "
              "PyTorch fwd ms | e2e | fwd |", "|---|---|---|---|---|---|---|"]
    ours = {}
    fp16_img_s = (ours_inference(out, "fp16") or {}).get("img_s")
    for key, label in INFER_RUNS:
        mine = ours_inference(out, key)
        theirs = anchor.get("fp32" if key == "fp32g" else key, {})
        e2e = ratio(mine and mine["img_s"], theirs.get("e2e_img_per_s"))
        fwd = ratio(theirs.get("gpu_ms_per_batch"), mine and mine["compute_ms"])
        ours[key] = (e2e, fwd)
        lines.append(f"| {label} | {fmt(mine and mine['img_s'], ',.0f')} | "
                     f"{fmt(mine and mine['compute_ms'], '.3f')} | "
                     f"{fmt(theirs.get('e2e_img_per_s'), ',.0f')} | "
                     f"{fmt(theirs.get('gpu_ms_per_batch'), '.3f')} | "
                     f"{fmt(e2e, '.2f', 'x')} | {fmt(fwd, '.2f', 'x')} |")
    targets += [
        verdict("fp16 end to end", ours["fp16"][0], 1.5, "img/s, u8 in to logits on the host"),
        verdict("fp16 forward", ours["fp16"][1], 1.2, "GPU compute ms against PyTorch's forward"),
        verdict("fp16 end to end against torch.compile",
                ratio(fp16_img_s, anchor_table(out / "anchor-compile.txt", 5).get("fp16")), 1.0,
                "ahead of reduce-overhead's e2e img/s (the optional `compile` word)",
                strictly=True),
        verdict("fp32 end to end", ours["fp32"][0], 1.1, "both FMA math, FFT/Winograd allowed"),
        verdict("fp32 forward", ours["fp32"][1], 1.1, "both FMA math, FFT/Winograd allowed"),
        verdict("tf32 end to end", ours["tf32"][0], 1.1, "TF32 on both sides"),
        verdict("tf32 forward", ours["tf32"][1], 1.1, "TF32 on both sides"),
    ]

    theirs_b1 = anchor_table(out / "anchor-latency.txt", 4)
    # Both means: torch_anchor.py's e2e ms/batch is a serial loop's wall time over its batches.
    lines += ["", "## Batch 1 (ours: infer --batch 1, mean latency; PyTorch: e2e ms/batch)", "",
              "| precision | ours ms | PyTorch ms | PyTorch / ours |", "|---|---|---|---|"]
    for p in ("fp32", "fp16"):
        mine = number(r"^latency/batch\s*:.* mean ([0-9.]+) ms", read(out / f"latency-{p}.txt"))
        speedup = ratio(theirs_b1.get(p), mine)
        lines.append(f"| {p} | {fmt(mine, '.3f')} | {fmt(theirs_b1.get(p), '.3f')} | "
                     f"{fmt(speedup, '.2f', 'x')} |")
        targets.append(verdict(f"{p} batch-1 latency", speedup, 1.0,
                               "PyTorch eager's ms over ours: below it", strictly=True))

    (figures, invalid), theirs_train = bench_train(out), anchor_train(out)
    lines += ["", "## Training step, paper preset, batch 128 (ours: benches/gpu_train.rs, sent "
              "ahead; PyTorch: torch_train_anchor.py, batch resident)", "",
              "| mode | ours img/s (plain / page-locked / sent-ahead) |", "|---|---|"]
    modes = sorted({name.split("/")[0] for name in figures} | {n.split("/")[0] for n in invalid})
    for mode in modes:
        row = [("invalid" if f"{mode}{s}" in invalid else fmt(figures.get(f"{mode}{s}"), ",.0f"))
               for s in ("", "/page-locked", "/sent-ahead")]
        lines.append(f"| {mode} | {' / '.join(row)} |")
    lines += ["", "| PyTorch | img/s |", "|---|---|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in sorted(theirs_train.items())]

    amp = max((v for k, v in theirs_train.items() if k.startswith("amp")), default=None)
    fp16_modes = {m: figures.get(f"{m}/sent-ahead") for m in modes if m.startswith("fp16")}
    best = max(((v, m) for m, v in fp16_modes.items() if v), default=(None, None))
    targets.append(verdict("mixed-precision training", ratio(best[0], amp), 1.2,
                           f"our best fp16 mode ({best[1] or 'none measured'}) sent ahead "
                           "against the faster "
                           "of PyTorch's autocast NCHW and channels_last"))
    targets.append(verdict("fp32 training", ratio(figures.get("fp32+nondeterministic/sent-ahead"),
                                                  theirs_train.get("fp32")), 1.0,
                           "fp32+nondeterministic, PyTorch's fp32 algorithms"))
    default = ratio(figures.get("fp32/sent-ahead"), theirs_train.get("fp32"))
    lines += ["", f"fp32 training as `train` runs it by default (deterministic algorithms) "
              f"against PyTorch's fp32: {fmt(default, '.2f', 'x')} (not a target)"]

    print("\n".join(lines + ["", "## Targets", ""] + [f"- {t}" for t in targets]))


if __name__ == "__main__":
    main()
