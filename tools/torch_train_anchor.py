#!/usr/bin/env python3
"""PyTorch's CPU training step, the anchor for benches/cpu_train.rs (same machine, same run).

    venv/bin/python tools/torch_train_anchor.py [--batch 16] [--steps 5]

AlexNet (paper preset: LRN after conv1/conv2, or torchvision's) in float32, one step =
forward with dropout 0.5, cross-entropy, backward, torch.optim.SGD(lr 0.01, momentum 0.9,
weight decay 5e-4); 2 warm-up steps, then the mean of --steps timed steps, in images/s.
"""

import argparse
import time

import torch
import torch.nn as nn


def alexnet(channels, lrn):
    c1, c2, c3, c4, c5 = channels
    norm = [nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)] if lrn else []
    return nn.Sequential(
        nn.Conv2d(3, c1, 11, stride=4, padding=2), nn.ReLU(), *norm, nn.MaxPool2d(3, 2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), *norm, nn.MaxPool2d(3, 2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(c5 * 36, 4096), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, channels, lrn in [("paper", (96, 256, 384, 384, 256), True),
                                ("torchvision", (64, 192, 384, 256, 256), False)]:
        model = alexnet(channels, lrn).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        x = torch.randn(args.batch, 3, 224, 224)
        y = torch.randint(0, 1000, (args.batch,))
        times = []
        for i in range(2 + args.steps):
            start = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - start)
        mean = sum(times) / len(times)
        print(f"{name} fp32 batch {args.batch}: {args.batch / mean:.1f} img/s "
              f"({mean * 1000:.0f} ms/step, {args.steps} steps)")


if __name__ == "__main__":
    main()
