#!/usr/bin/env python3
"""Write the GIF test files whose first frame does not cover the logical screen, and what PIL
makes of them.

Run from the repository root with Pillow installed (any venv; `pip install pillow`):

    python3 tools/gif_reference.py

Writes, for each case NAME below:
* tests/data/gif/NAME.gif: written byte by byte here (not by Pillow's encoder), so that the
  screen size, the frame's offset, the palettes and the transparency index are exactly the ones
  described, whatever the Pillow version.
* tests/data/reference/gif_NAME_rgb.png: `Image.open(gif).convert("RGB")` — what torchvision's
  ImageFolder/`pil_loader` hands to the transforms.

The Rust test `gif_first_frame_is_composed_like_pil` (tests/preprocess.rs) decodes each GIF and
compares every pixel with the PNG. What PIL does (checked with Pillow 13.0):
* the canvas is the logical screen, enlarged to hold the frame if the frame reaches past it;
* the area the first frame does not cover is palette index 0, or the frame's transparency index
  when it has one (the screen's background colour index is ignored);
* the frame's palette (local, else global) maps indices to RGB; a transparent index keeps its
  palette colour; an index past the end of the palette is black;
* only the first frame counts.
"""

import io
import os
import struct

from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GIF_DIR = os.path.join(ROOT, "tests", "data", "gif")
REF_DIR = os.path.join(ROOT, "tests", "data", "reference")


def palette(seed, n=256):
    """n distinct-looking RGB entries, deterministic."""
    out = []
    for i in range(n):
        out += [(i * 37 + seed) % 256, (i * 91 + 30 + seed) % 256, (i * 53 + 60) % 256]
    return bytes(out)


def lzw_uncompressed(indices, min_code_size=8):
    """GIF LZW data that stores every index as a literal code: a clear code every 250 codes
    keeps the code width at min_code_size + 1 bits. Valid LZW for any decoder."""
    clear, end = 1 << min_code_size, (1 << min_code_size) + 1
    width = min_code_size + 1
    codes = []
    for i, v in enumerate(indices):
        if i % 250 == 0:
            codes.append(clear)
        codes.append(v)
    codes.append(end)
    acc = nbits = 0
    data = bytearray()
    for c in codes:
        acc |= c << nbits
        nbits += width
        while nbits >= 8:
            data.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
    if nbits:
        data.append(acc & 0xFF)
    blocks = bytearray([min_code_size])
    for i in range(0, len(data), 255):
        chunk = data[i : i + 255]
        blocks += bytes([len(chunk)]) + chunk
    return bytes(blocks + b"\x00")


def table_size_bits(table):
    """The 3-bit size field of a colour table of 2, 4, ..., 256 entries."""
    entries = len(table) // 3
    bits = entries.bit_length() - 2
    assert len(table) == 3 * entries and entries == 2 << bits, len(table)
    return bits


def gif(screen, background, global_palette, frames):
    """frames: list of dicts with left, top, width, height, indices, and optionally
    local_palette and transparency."""
    out = bytearray(b"GIF89a")
    flags = 0
    if global_palette is not None:
        flags = 0x80 | 0x70 | table_size_bits(global_palette)  # global table, 8-bit resolution
    out += struct.pack("<HHBBB", screen[0], screen[1], flags, background, 0)
    if global_palette is not None:
        out += global_palette
    for f in frames:
        if "transparency" in f:
            # Graphic control extension: transparency flag, no disposal, no delay.
            out += bytes([0x21, 0xF9, 4, 0x01, 0, 0, f["transparency"], 0])
        local = f.get("local_palette")
        lflags = (0x80 | table_size_bits(local)) if local is not None else 0
        indices = f["indices"]
        if f.get("interlaced"):
            lflags |= 0x40
            indices = interlace(indices, f["width"], f["height"])
        out += b"\x2c" + struct.pack(
            "<HHHHB", f["left"], f["top"], f["width"], f["height"], lflags
        )
        if local is not None:
            out += local
        assert len(indices) == f["width"] * f["height"]
        out += lzw_uncompressed(indices)
    out += b"\x3b"
    return bytes(out)


def interlace(indices, width, height):
    """The rows in GIF's interlaced order: every 8th from 0, every 8th from 4, every 4th from 2,
    every 2nd from 1."""
    rows = [indices[y * width : (y + 1) * width] for y in range(height)]
    order = [y for start, step in ((0, 8), (4, 8), (2, 4), (1, 2)) for y in range(start, height, step)]
    return [v for y in order for v in rows[y]]


def gradient(width, height, colours, first=1):
    """Indices first..first+colours-1 in a diagonal pattern."""
    return [first + (x * 3 + y * 5) % colours for y in range(height) for x in range(width)]


def cases():
    frame = dict(left=13, top=9, width=40, height=30, indices=gradient(40, 30, 16))
    second = dict(left=0, top=0, width=64, height=48, indices=[7] * (64 * 48))
    # Some pixels inside the frame use the transparency index (3): PIL keeps their colour.
    transparent = dict(frame, transparency=3)
    yield "offset", gif((64, 48), 5, palette(200), [frame, second])
    yield "offset_transparent", gif((64, 48), 5, palette(200), [transparent])
    yield "overflow", gif((30, 20), 5, palette(200), [frame])
    local = dict(frame, local_palette=palette(17))
    yield "local_palette", gif((64, 48), 5, None, [local])
    # A 4-entry palette and indices 1..16: indices 4 and up are past its end.
    yield "short_palette", gif((64, 48), 0, palette(90, 4), [frame])
    # No palette at all: PIL reads the indices as grey levels (mode L).
    yield "no_palette", gif((64, 48), 0, None, [frame])
    # Interlaced rows: the decoder must put them back in order.
    yield "interlaced", gif((64, 48), 0, palette(33), [dict(frame, interlaced=True)])


def main():
    os.makedirs(GIF_DIR, exist_ok=True)
    os.makedirs(REF_DIR, exist_ok=True)
    for name, data in cases():
        path = os.path.join(GIF_DIR, name + ".gif")
        with open(path, "wb") as f:
            f.write(data)
        im = Image.open(io.BytesIO(data))
        rgb = im.convert("RGB")
        rgb.save(os.path.join(REF_DIR, "gif_" + name + "_rgb.png"), optimize=False)
        print(f"{name}: {len(data)} bytes, PIL mode {im.mode}, size {im.size}")


if __name__ == "__main__":
    main()
