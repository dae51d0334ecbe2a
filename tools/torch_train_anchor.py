#!/usr/bin/env python3
"""PyTorch's training step, the anchor for benches/cpu_train.rs and benches/gpu_train.rs (same
machine, same run).

    venv/bin/python tools/torch_train_anchor.py [--batch 16] [--steps 5]            # CPU
    python3 tools/torch_train_anchor.py --device cuda --batch 128 --precisions fp32,tf32,amp

AlexNet (paper preset: LRN after conv1/conv2, or torchvision's) in float32, one step =
forward with dropout 0.5, cross-entropy, backward, torch.optim.SGD(lr 0.01, momentum 0.9,
weight decay 5e-4); 2 warm-up steps, then the mean of --steps timed steps, in images/s.

On CUDA (cudnn.benchmark on) the precisions are fp32 (TF32 off everywhere), tf32 (TF32 on in
cuDNN and cuBLAS) and amp (torch.autocast float16 + GradScaler: PyTorch's mixed precision).
Three figures each: `resident` (the batch already on the GPU, one sync at the end: PyTorch's
usual figure), `from host` (the batch copied from pageable host memory and the loss read
back every step: benches/gpu_train.rs's `paper/<precision>`) and `from pinned` (the same from
page-locked memory, as a DataLoader with pin_memory=True feeds it: the bench's
`paper/<precision>/page-locked`).

`--channels-last` runs the model and its batches in torch.channels_last (NHWC) memory format,
PyTorch's advice for mixed precision on tensor cores and often faster on the CPU too (oneDNN):
set its figures beside the default ones and compare with the faster of the two.
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


PRESETS = {"paper": ((96, 256, 384, 384, 256), True),
           "torchvision": ((64, 192, 384, 256, 256), False)}


def cpu_run(args):
    for name in args.presets.split(","):
        channels, lrn = PRESETS[name]
        model = alexnet(channels, lrn).train().to(memory_format=args.memory_format)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        x = torch.randn(args.batch, 3, 224, 224).to(memory_format=args.memory_format)
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
        print(f"{name} fp32{args.format_label} batch {args.batch}: {args.batch / mean:.1f} img/s "
              f"({mean * 1000:.0f} ms/step, {args.steps} steps)")


def cuda_run(args):
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(0)}, cuDNN {torch.backends.cudnn.version()}")
    for name in args.presets.split(","):
        channels, lrn = PRESETS[name]
        for precision in args.precisions.split(","):
            tf32 = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            amp = precision == "amp"
            model = alexnet(channels, lrn).to(device, memory_format=args.memory_format).train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            scaler = torch.amp.GradScaler("cuda", enabled=amp)
            x_host = torch.randn(args.batch, 3, 224, 224).to(memory_format=args.memory_format)
            y_host = torch.randint(0, 1000, (args.batch,))
            x_dev, y_dev = x_host.to(device), y_host.to(device)

            def step(x, y):
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                    loss = nn.functional.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                return loss

            for _ in range(3):
                step(x_dev, y_dev)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x_dev, y_dev)
            torch.cuda.synchronize()
            resident = (time.perf_counter() - start) / args.steps
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x_host.to(device), y_host.to(device)).item()
            from_host = (time.perf_counter() - start) / args.steps
            x_pinned, y_pinned = x_host.pin_memory(), y_host.pin_memory()
            start = time.perf_counter()
            for _ in range(args.steps):
                x = x_pinned.to(device, non_blocking=True)
                step(x, y_pinned.to(device, non_blocking=True)).item()
            from_pinned = (time.perf_counter() - start) / args.steps
            print(f"{name} {precision}{args.format_label} batch {args.batch}: resident {args.batch / resident:.1f} "
                  f"img/s ({resident * 1000:.1f} ms/step), from host "
                  f"{args.batch / from_host:.1f} img/s ({from_host * 1000:.1f} ms/step), "
                  f"from pinned {args.batch / from_pinned:.1f} img/s "
                  f"({from_pinned * 1000:.1f} ms/step), "
                  f"{args.steps} steps")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precisions", default="fp32,tf32,amp",
                        help="CUDA only: comma-separated fp32, tf32, amp")
    parser.add_argument("--presets", default="paper,torchvision")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and batches in torch.channels_last (NHWC) memory format")
    args = parser.parse_args()
    args.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    args.format_label = " channels_last" if args.channels_last else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.device == "cuda":
        cuda_run(args)
    else:
        cpu_run(args)


if __name__ == "__main__":
    main()
