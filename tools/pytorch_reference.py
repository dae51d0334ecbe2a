#!/usr/bin/env python3
"""Generate PyTorch reference fixtures for the alexnet-cuda Rust tests.

Run from the repository root with a venv that has torch, torchvision, numpy
and pillow (see tools/README.md):

    /path/to/venv/bin/python tools/pytorch_reference.py

What it computes
----------------
* An AlexNet in two presets, built from plain torch.nn layers:
    - "paper":       channels (96, 256, 384, 384, 256), with LRN after
                     conv1 and conv2 (size 5, alpha 1e-4 per element,
                     beta 0.75, k 2).
    - "torchvision": channels (64, 192, 384, 256, 256), no LRN.
  Layout: conv1 11x11/4 pad 2 -> ReLU -> [LRN] -> MaxPool(3,2);
  conv2 5x5 pad 2 -> ReLU -> [LRN] -> MaxPool(3,2); conv3/4/5 3x3 pad 1 with
  ReLU; MaxPool(3,2); flatten (C,H,W); fc1 -> ReLU; fc2 -> ReLU; fc3.
  Dropout is the identity at eval time and is left out.
* Weights are not drawn from torch's RNG. They come from a deterministic
  splitmix64-based formula (see `uniform_pm1`) that the Rust tests
  reimplement bit-exactly. Each tensor gets its own stream number
  (conv1.weight=1, conv1.bias=2, ..., fc3.bias=16) and is filled in C order of
  its PyTorch shape (conv OIHW, linear [out, in]):
      weight = uniform_pm1(stream, numel) * sqrt(6 / fan_in)
      bias   = uniform_pm1(stream, numel) * 0.1
  and then rounded to float32. The model itself runs in float64 on the CPU
  using those float32 values.
* A synthetic input of shape [2, 3, 224, 224] = uniform_pm1(1000, n) * 2.0
  (rounded to float32): logits for both images plus per-stage max|x| and
  sum(x) for image 0.
* Five sample photos from tests/data/images, preprocessed exactly like
  torchvision's ImageNet eval transform (Resize(256) bilinear+antialias,
  CenterCrop(224), ToTensor, Normalize). The 224x224 uint8 crops are saved
  as PNGs in tests/data/reference/<stem>_crop224.png; the JSON records the
  resized (pre-crop) size, the top-5 indices and the 1000 logits.

Output: tests/data/pytorch_reference.json (floats written with repr, so they
round-trip exactly to the float64 values computed here).
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torchvision import transforms

from formula import uniform_pm1

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
IMAGES_DIR = os.path.join(REPO, "tests", "data", "images")
CROPS_DIR = os.path.join(REPO, "tests", "data", "reference")
OUT_JSON = os.path.join(REPO, "tests", "data", "pytorch_reference.json")

PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "logo.png"]

PRESETS = {
    "paper": {"channels": (96, 256, 384, 384, 256), "lrn": True},
    "torchvision": {"channels": (64, 192, 384, 256, 256), "lrn": False},
}
EXPECTED_PARAMS = {"paper": 62_378_344, "torchvision": 61_100_840}

INPUT_STREAM = 1000
INPUT_SCALE = 2.0


# ---------------------------------------------------------------------------
# Deterministic weight formula (mirrored bit-exactly by the Rust tests).
# ---------------------------------------------------------------------------

# splitmix64 and uniform_pm1 live in tools/formula.py (shared with the training fixtures).


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

class AlexNet(nn.Module):
    def __init__(self, channels, lrn):
        super().__init__()
        c1, c2, c3, c4, c5 = channels
        self.use_lrn = lrn
        self.conv1 = nn.Conv2d(3, c1, 11, stride=4, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1)
        self.fc1 = nn.Linear(c5 * 6 * 6, 4096)
        self.fc2 = nn.Linear(4096, 4096)
        self.fc3 = nn.Linear(4096, 1000)
        # Paper LRN: b = a / (k + alpha * sum a^2)^beta with alpha = 1e-4.
        # PyTorch divides its alpha by `size`, hence 5 * 1e-4 here.
        self.lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
        self.pool = nn.MaxPool2d(3, 2)
        self.relu = nn.ReLU()

    def layers(self):
        """Parameter-bearing layers in stream order."""
        return [self.conv1, self.conv2, self.conv3, self.conv4, self.conv5,
                self.fc1, self.fc2, self.fc3]

    def forward(self, x, stages=None):
        """Forward pass; if `stages` is a dict, record each stage's output."""
        def rec(name, t):
            if stages is not None:
                stages[name] = t
            return t

        x = rec("conv1", self.relu(self.conv1(x)))
        if self.use_lrn:
            x = rec("lrn1", self.lrn(x))
        x = rec("pool1", self.pool(x))
        x = rec("conv2", self.relu(self.conv2(x)))
        if self.use_lrn:
            x = rec("lrn2", self.lrn(x))
        x = rec("pool2", self.pool(x))
        x = rec("conv3", self.relu(self.conv3(x)))
        x = rec("conv4", self.relu(self.conv4(x)))
        x = rec("conv5", self.relu(self.conv5(x)))
        x = rec("pool3", self.pool(x))
        x = torch.flatten(x, 1)  # (C, H, W) order per image
        x = rec("fc1", self.relu(self.fc1(x)))
        x = rec("fc2", self.relu(self.fc2(x)))
        x = rec("fc3", self.fc3(x))
        return x


def build_model(preset):
    cfg = PRESETS[preset]
    model = AlexNet(cfg["channels"], cfg["lrn"]).to(torch.float64).eval()
    stream = 1
    with torch.no_grad():
        for layer in model.layers():
            w = layer.weight
            fan_in = int(np.prod(w.shape[1:]))  # in_ch*kh*kw or in_features
            vals = uniform_pm1(stream, w.numel()) * math.sqrt(6.0 / fan_in)
            vals = vals.astype(np.float32).astype(np.float64).reshape(w.shape)
            w.copy_(torch.from_numpy(vals))
            stream += 1
            b = layer.bias
            vals = (uniform_pm1(stream, b.numel()) * 0.1).astype(np.float32)
            b.copy_(torch.from_numpy(vals.astype(np.float64)))
            stream += 1
    assert stream == 17
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == EXPECTED_PARAMS[preset], (preset, n_params)
    return model


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def synthetic_input():
    shape = (2, 3, 224, 224)
    vals = (uniform_pm1(INPUT_STREAM, int(np.prod(shape))) * INPUT_SCALE)
    vals = vals.astype(np.float32).astype(np.float64).reshape(shape)
    return torch.from_numpy(vals)


RESIZE = transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR,
                           antialias=True)
CROP = transforms.CenterCrop(224)
TO_TENSOR = transforms.ToTensor()
NORMALIZE = transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def load_photo(name):
    """Returns (resized (w, h), uint8 crop as PIL image, normalised float64 tensor)."""
    with Image.open(os.path.join(IMAGES_DIR, name)) as im:
        print(f"  {name}: mode={im.mode} size={im.size} format={im.format}")
        rgb = im.convert("RGB")
    resized = RESIZE(rgb)
    crop = CROP(resized)
    assert crop.size == (224, 224) and crop.mode == "RGB"
    # ToTensor gives float32 in [0, 1] (x / 255); Normalize in float32, as
    # torchvision does, then widen to float64 for the reference model.
    t = NORMALIZE(TO_TENSOR(crop)).to(torch.float64)
    return list(resized.size), crop, t


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(CROPS_DIR, exist_ok=True)

    x = synthetic_input()

    print("photos:")
    photos = {}
    for name in PHOTOS:
        resized, crop, t = load_photo(name)
        stem = os.path.splitext(name)[0]
        crop.save(os.path.join(CROPS_DIR, f"{stem}_crop224.png"), format="PNG")
        photos[name] = (resized, t)
    photo_batch = torch.stack([photos[n][1] for n in PHOTOS])

    out = {
        "generated_by": "tools/pytorch_reference.py",
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "numpy_version": np.__version__,
        "pillow_version": Image.__version__,
        "input": {"shape": list(x.shape), "stream": INPUT_STREAM, "scale": INPUT_SCALE},
        "presets": {},
    }

    for preset in PRESETS:
        model = build_model(preset)
        with torch.no_grad():
            stages = {}
            logits = model(x, stages)
            photo_logits = model(photo_batch)
        assert torch.isfinite(logits).all() and torch.isfinite(photo_logits).all()

        stage_stats = {
            name: {"max_abs": t[0].abs().max().item(), "sum": t[0].sum().item()}
            for name, t in stages.items()
        }
        photo_out = {}
        for i, name in enumerate(PHOTOS):
            lg = photo_logits[i]
            top5 = torch.topk(lg, 5).indices.tolist()
            photo_out[name] = {"resized": photos[name][0], "top5": top5,
                               "logits": lg.tolist()}

        out["presets"][preset] = {
            "channels": list(PRESETS[preset]["channels"]),
            "lrn": PRESETS[preset]["lrn"],
            "params": sum(p.numel() for p in model.parameters()),
            "logits": logits.tolist(),
            "stages": stage_stats,
            "photos": photo_out,
        }

        print(f"\npreset {preset}: params={out['presets'][preset]['params']}")
        print(f"  synthetic logits: max|x|={logits.abs().max().item():.6g} "
              f"mean|x|={logits.abs().mean().item():.6g} "
              f"argmax={logits.argmax(1).tolist()}")
        for name, s in stage_stats.items():
            print(f"  {name:6s} max_abs={s['max_abs']:.6g} sum={s['sum']:.6g}")
        for name in PHOTOS:
            p = photo_out[name]
            lg = photo_logits[PHOTOS.index(name)]
            print(f"  {name:12s} resized={p['resized']} top5={p['top5']} "
                  f"max|logit|={lg.abs().max().item():.6g}")

    with open(OUT_JSON, "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"), allow_nan=False)
        f.write("\n")
    print(f"\nwrote {OUT_JSON} ({os.path.getsize(OUT_JSON)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
