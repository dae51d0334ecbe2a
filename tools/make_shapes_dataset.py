#!/usr/bin/env python3
"""Make the small deterministic image-folder dataset the training tests learn from.

    venv/bin/python tools/make_shapes_dataset.py [--out tests/data/shapes]

Four classes of 256x256 RGB PNGs, torchvision's ImageFolder layout (one folder per class):
`bars` (horizontal stripes), `columns` (vertical stripes), `disc` and `square`, each in a
random colour on a random two-colour vertical-gradient background, at a random place and
size. `train/` holds 8 images per class, `val/` 2. Everything comes from one seeded numpy
generator and the drawing is integer arithmetic, so re-running writes the same pixels (the
PNG bytes too, with the same Pillow). The images are 256x256 so the crate's eval transform
(resize the shorter side to 256, centre crop 224) only crops: a reference outside the crate
needs no resampler to see the same input (tools/pytorch_train_steps_reference.py).
"""

import argparse
import os

import numpy as np
from PIL import Image

SIDE = 256
CLASSES = ["bars", "columns", "disc", "square"]
COUNTS = {"train": 8, "val": 2}
SEED = 20261129


def background(rng):
    """A vertical gradient between two random colours, as uint8 [SIDE, SIDE, 3]."""
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    rows = np.arange(SIDE)[:, None]
    column = (top[None, :] * (SIDE - 1 - rows) + bottom[None, :] * rows) // (SIDE - 1)
    return np.repeat(column[:, None, :], SIDE, axis=1).astype(np.uint8)


def contrasting_colour(rng, image):
    """A random colour at least 96 away (sum over channels) from the background's mean."""
    mean = image.reshape(-1, 3).mean(axis=0)
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - mean).sum() >= 96:
            return colour.astype(np.uint8)


def draw(rng, kind):
    image = background(rng)
    colour = contrasting_colour(rng, image)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    if kind in ("bars", "columns"):
        period = int(rng.integers(24, 48))
        phase = int(rng.integers(0, period))
        along = y if kind == "bars" else x
        mask = (along + phase) % period < period // 2
    else:
        size = int(rng.integers(48, 112))
        cy, cx = (int(v) for v in rng.integers(size // 2 + 8, SIDE - size // 2 - 8, 2))
        if kind == "disc":
            mask = (y - cy) ** 2 + (x - cx) ** 2 <= (size // 2) ** 2
        else:
            mask = (np.abs(y - cy) <= size // 2) & (np.abs(x - cx) <= size // 2)
    image[mask] = colour
    return image


def main():
    parser = argparse.ArgumentParser()
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    parser.add_argument("--out", default=os.path.join(repo, "tests", "data", "shapes"))
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    for split, count in COUNTS.items():
        for kind in CLASSES:
            folder = os.path.join(args.out, split, kind)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                path = os.path.join(folder, f"{i:02}.png")
                Image.fromarray(draw(rng, kind), "RGB").save(path, optimize=True)
    print(f"wrote {len(CLASSES)} classes x {COUNTS} images to {args.out}")


if __name__ == "__main__":
    main()
