#!/usr/bin/env python3
"""Two steps of torch.optim.SGD on PNG images: the reference tests/train_vs_pytorch.rs holds
the `train` binary to.

    venv/bin/python tools/pytorch_train_steps_reference.py

The run it mirrors: `train --data D --weights W --batch 2 --steps 2 --no-augment --no-shuffle
--dropout 0` with the default SGD (lr 0.01, momentum 0.9, weight decay 5e-4 on every
parameter, PyTorch's rule), where
* D holds one 256x256 PNG per class, `class0/00.png` ... `class3/00.png`, whose bytes come
  from the shared formula (tools/formula.py; tests/common `formula_values`): byte i of class
  c's image (HWC order) is `(v + 1) * 127.99` truncated, computed in float32 from
  `v = formula_values(stream_c, 256*256*3, 1)[i]`. Without shuffling step 1 sees classes
  (0, 1) and step 2 classes (2, 3).
* W is the paper preset with a 4-way last layer and the tests' formula weights
  (tools/pytorch_training_reference.py `formula_params`, tests/common `formula_weights`).
The images are 256x256, so the eval transform is a centre crop at (16, 16) and ImageNet's
normalisation, written out here in float32 as the crate does it; the network then runs in
float64.

Whether float32 can meet the test's tolerance (1e-4 of each tensor's largest update) at all
is a property of the weights, images and learning rate, so the script checks it: it repeats
the two steps in float32 with PyTorch and requires PyTorch's own float32 update to be within
1e-5 of the largest float64 update, every tensor, whole tensors (it records the worst). Three
things make the check fail if chosen otherwise:
* the update is after - before of float32 weights: a small learning rate makes it a few
  units in the last place of the weights (lr 0.001 here: 1e-4 off; 0.0001: 1e-3), so the
  learning rate is the default 0.01. These He-uniform weights overshoot at it (the second
  step's loss is in the hundreds), which makes the updates large, not ill-posed;
* flat images (tests/data/shapes) make conv1's weight gradient a sum of large cancelling
  terms (float32 2e-4 off), so the images are noise;
* a max-pool near-tie or a ReLU input near 0 flips the gradient's route, so the streams are
  the first from 800 on whose image is `well_conditioned` under W.

For every parameter the JSON keeps the update (after the two steps minus before): its
largest absolute value, the sum of its absolute values, and 64 sampled entries (62M values
are too many to keep). Output is deterministic: re-running gives a byte-identical file.
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from formula import formula_values
from pytorch_training_reference import formula_params, network_forward, well_conditioned

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT_JSON = os.path.join(REPO, "tests", "data", "pytorch_train_steps.json")
CHANNELS, FCS = [96, 256, 384, 384, 256], [4096, 4096, 4]
CLASSES = 4
SIDE = 256
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
LR, MOMENTUM, WEIGHT_DECAY, BATCH, STEPS = 0.01, 0.9, 5e-4, 2, 2
FLOAT32_BOUND = 1e-5
SAMPLES = 64


def formula_image(stream):
    """The crate tests' formula image: HWC uint8, (v + 1) * 127.99 truncated, in float32."""
    v = formula_values(stream, SIDE * SIDE * 3, 1.0).astype(np.float32)
    pixels = ((v + np.float32(1.0)) * np.float32(127.99)).astype(np.uint8)
    return pixels.reshape(SIDE, SIDE, 3)


def eval_transform(pixels):
    """Resize to 256 (a no-op: the images are 256x256), centre crop 224, normalise."""
    crop = pixels[16:240, 16:240].astype(np.float32) / np.float32(255.0)
    chw = ((crop - MEAN) / STD).transpose(2, 0, 1)
    return torch.from_numpy(chw.astype(np.float64))


def two_steps(params, images, labels):
    """The losses and the parameters after STEPS steps of torch.optim.SGD, in the dtype given."""
    leaves = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.SGD(leaves, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    losses = []
    for step in range(STEPS):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        opt.zero_grad()
        logits = network_forward(leaves, images[batch], CHANNELS, True, 0.0, step)
        loss = F.cross_entropy(logits, torch.tensor(labels[batch]))
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    return losses, [p.detach() for p in leaves]


def main():
    torch.set_num_threads(1)
    params = formula_params(CHANNELS, 224, FCS)
    streams, images = [], []
    stream = 800
    while len(streams) < CLASSES:
        x = eval_transform(formula_image(stream))
        if well_conditioned(params, CHANNELS, x[None]):
            streams.append(stream)
            images.append(x)
        stream += 1
    print(f"image streams {streams}")
    images = torch.stack(images)
    labels = list(range(CLASSES))
    losses, after = two_steps(params, images, labels)
    _, after32 = two_steps([p.float() for p in params], images.float(), labels)
    float32_worst = []
    for before, a64, a32 in zip(params, after, after32):
        u64, u32 = a64 - before, a32.double() - before
        float32_worst.append(float((u32 - u64).abs().max() / u64.abs().max()))
    assert max(float32_worst) < FLOAT32_BOUND, f"float32 itself is off: {float32_worst}"
    print(f"PyTorch float32 against float64: worst {max(float32_worst):.2e} of the largest update")
    updates = []
    for before, a in zip(params, after):
        u = (a - before).reshape(-1)
        n = u.numel()
        picks = [(j * n) // SAMPLES + (j * 7919) % max(1, n // SAMPLES) for j in range(SAMPLES)]
        updates.append({"max_abs": float(u.abs().max()), "abs_sum": float(u.abs().sum()),
                        "indices": picks, "values": [float(u[k]) for k in picks]})
    out = {"image_streams": streams, "side": SIDE, "labels": labels, "batch": BATCH,
           "steps": STEPS, "learning_rate": LR, "momentum": MOMENTUM,
           "weight_decay": WEIGHT_DECAY, "classes": CLASSES, "losses": losses,
           "pytorch_float32_worst": float32_worst, "updates": updates}
    with open(OUT_JSON, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"losses {losses}; wrote {OUT_JSON}")


if __name__ == "__main__":
    main()
