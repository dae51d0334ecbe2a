#!/usr/bin/env python3
"""Generate the ten-crop fixture for the alexnet-cuda tests (tests/data/ten_crop_reference.json).

Run from the repository root with the venv of tools/README.md (torch, torchvision, pillow):

    venv/bin/python tools/ten_crop_reference.py

For three sample photos (PNGs): the paper's test-time augmentation as torchvision composes it,
Resize(256) (bilinear, antialiased) -> CenterCrop(256) -> TenCrop(224) -> ToTensor ->
Normalize, through the paper preset with the formula weights of pytorch_reference.py in
float64, the softmax of the ten crops averaged. Records each photo's 1000 averaged
probabilities and top-5. One thread: byte-identical on re-runs.
"""

import json
import os

import torch
from PIL import Image
from torchvision import transforms

from pytorch_reference import IMAGES_DIR, NORMALIZE, REPO, TO_TENSOR, build_model

OUT_JSON = os.path.join(REPO, "tests", "data", "ten_crop_reference.json")
# PNGs only: they decode to the same pixels in PIL and in the crate (a JPEG differs by the
# decoders' IDCT rounding, which tests/preprocess.rs bounds on its own).
PHOTOS = ["chelsea.png", "coffee.png", "camera.png"]

TEN_CROP = transforms.Compose([
    transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
    transforms.CenterCrop(256),
    transforms.TenCrop(224),
])


def main():
    torch.set_num_threads(1)
    model = build_model("paper")
    out = {"generator": "tools/ten_crop_reference.py", "torch": torch.__version__,
           "preset": "paper", "photos": {}}
    for name in PHOTOS:
        with Image.open(os.path.join(IMAGES_DIR, name)) as im:
            rgb = im.convert("RGB")
        crops = TEN_CROP(rgb)
        assert len(crops) == 10 and all(c.size == (224, 224) for c in crops)
        batch = torch.stack([NORMALIZE(TO_TENSOR(c)) for c in crops]).to(torch.float64)
        with torch.no_grad():
            probabilities = torch.softmax(model(batch), dim=1).mean(dim=0)
        top5 = torch.topk(probabilities, 5)
        out["photos"][name] = {
            "probabilities": [float(p) for p in probabilities],
            "top5": [int(i) for i in top5.indices],
        }
        print(f"  {name}: top5={out['photos'][name]['top5']}")
    with open(OUT_JSON, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT_JSON}")


if __name__ == "__main__":
    main()
