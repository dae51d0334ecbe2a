#!/usr/bin/env python3
"""Sets a training run's per-epoch losses beside a reference run's (both `train --log` CSVs).

    python3 compare_losses.py GPU.csv CPU.csv

Prints one line: the relative difference of the train loss after the first epoch, and the
largest over every epoch (with its epoch). on-device.sh uses it to set the GPU's `train` runs
beside the same run on the CPU, the reference. Exits 1 when either file is missing, unreadable or
the two runs logged different epochs.
"""

import csv
import math
import sys


def losses(path):
    with open(path, newline="") as f:
        return {int(row["epoch"]): float(row["train_loss"]) for row in csv.DictReader(f)}


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} RUN.csv REFERENCE.csv")
    try:
        run, reference = losses(sys.argv[1]), losses(sys.argv[2])
    except (OSError, KeyError, TypeError, ValueError) as e:
        print(f"not compared: {e}")
        sys.exit(1)
    if not run or run.keys() != reference.keys():
        print(f"not compared: epochs {sorted(run)} against {sorted(reference)}")
        sys.exit(1)
    nonfinite = [e for e in sorted(run) if not (math.isfinite(run[e]) and math.isfinite(reference[e]))]
    if nonfinite:
        print(f"not compared: a loss that is not finite at epoch {nonfinite[0]}")
        sys.exit(1)
    diff = {e: abs(run[e] - reference[e]) / max(abs(reference[e]), 1e-30) for e in sorted(run)}
    first = min(diff)
    worst = max(diff, key=diff.get)
    print(f"loss after epoch {first} {run[first]:.6f} vs {reference[first]:.6f} "
          f"(relative {diff[first]:.1e}); largest relative difference {diff[worst]:.1e} "
          f"at epoch {worst} of {len(diff)}")


if __name__ == "__main__":
    main()
