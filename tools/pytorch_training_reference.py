#!/usr/bin/env python3
"""Generate the PyTorch autograd fixtures for the alexnet-cuda training tests.

Run from the repository root with a venv that has torch and numpy (tools/README.md):

    venv/bin/python tools/pytorch_training_reference.py

Everything is computed in float64 from float32-rounded inputs, and every input comes from
the formula in tools/formula.py (`formula_values(stream, n, scale)`), which the Rust tests
reimplement; the JSON records the streams and scales, never the inputs themselves.

What it computes (tests/data/pytorch_training.json):

* "layers": each layer's gradients from torch.autograd on odd shapes, for
  L = sum(g * layer(x)) with a formula `g`: Conv2d (input, weight, bias), LRN (the paper's
  alpha, i.e. torch's alpha = alpha * size), overlapping max-pool, Linear, and softmax
  cross-entropy (loss and logits gradient, mean reduction).
* "dropout": the crate's counter-based mask (keep_draw / layer_seed, reimplemented below
  from their definitions in src/cpu/dropout.rs) for one seed, as a list of kept indices.
* "network": a small AlexNet-shaped network (LRN, overlapping pools, dropout 0.5 inverted,
  its masks drawn as the crate draws them) with formula weights: logits, loss and every
  parameter's full gradient for one batch; then two SGD steps from the same weights, with
  torch.optim.SGD (PyTorch's rule) and with the paper's rule written out (no bias decay),
  every parameter after the second step.
* "paper": the paper preset at batch 2 with dropout: loss, and for every parameter the sum,
  the sum of absolute values, the largest absolute value and 16 sampled entries of its
  gradient (62M values are too many to keep). Its two images are the first formula images
  (one stream each, from 700 on) with no near-tie in any max-pool window and no ReLU input
  near 0 (`well_conditioned`): there the gradient jumps, and float32 against float64 would
  compare the tie's side, not the code (the first draft's image 700 had one such window).

Output is deterministic: re-running gives a byte-identical file.
"""

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from formula import formula_values

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT_JSON = os.path.join(REPO, "tests", "data", "pytorch_training.json")
MASK64 = (1 << 64) - 1


def values(stream, shape, scale):
    n = int(np.prod(shape))
    return torch.from_numpy(formula_values(stream, n, scale).reshape(shape))


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


# ---------------------------------------------------------------------------
# The crate's dropout mask (src/cpu/dropout.rs), from its definition.
# ---------------------------------------------------------------------------

def layer_seed(step_seed, layer):
    z = step_seed ^ ((layer * 0xD1B54A32D192ED03) & MASK64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def keep_mask(seed, n, p):
    """Element i is kept when keep_draw(seed, i) >= p * 2^32."""
    golden = 0x9E3779B97F4A7C15
    base = (seed * golden + golden) & MASK64
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(base) + i
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        draw = (z ^ (z >> np.uint64(31))) >> np.uint64(32)
    threshold = min(int(p * 2**32), 2**32 - 1)
    return draw >= np.uint64(threshold)


# ---------------------------------------------------------------------------
# Per-layer gradients
# ---------------------------------------------------------------------------

def grads_of(fn, g, *tensors):
    tensors = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    (out * g).sum().backward()
    return [flat(t.grad) for t in tensors]


def layer_cases():
    cases = {}
    conv = []
    for i, (shape, (o, k, s, p)) in enumerate([((3, 3, 9, 8), (4, 3, 2, 1)),
                                               ((2, 5, 13, 11), (6, 5, 3, 2))]):
        n, c, h, w = shape
        base = 100 + 10 * i
        x = values(base, shape, 2.0)
        wt = values(base + 1, (o, c, k, k), 0.5)
        b = values(base + 2, (o,), 0.5)
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        g = values(base + 3, (n, o, oh, ow), 1.0)
        dx, dw, db = grads_of(lambda x, wt, b: F.conv2d(x, wt, b, stride=s, padding=p),
                              g, x, wt, b)
        conv.append({"input": list(shape), "out_channels": o, "kernel": k, "stride": s,
                     "padding": p, "streams": [base, base + 1, base + 2, base + 3],
                     "scales": [2.0, 0.5, 0.5, 1.0], "input_grad": dx, "weight_grad": dw,
                     "bias_grad": db})
    cases["conv"] = conv

    lrn = []
    for i, (size, alpha, beta, k) in enumerate([(5, 1e-4, 0.75, 2.0), (4, 0.3, 0.6, 1.0)]):
        shape = (2, 7, 3, 5)
        base = 200 + 10 * i
        x = values(base, shape, 3.0)
        g = values(base + 1, shape, 1.0)
        # torch divides alpha by size: the paper's alpha is torch's alpha / size.
        (dx,) = grads_of(lambda x: F.local_response_norm(x, size, alpha * size, beta, k), g, x)
        lrn.append({"input": list(shape), "size": size, "alpha": alpha, "beta": beta, "k": k,
                    "streams": [base, base + 1], "scales": [3.0, 1.0], "input_grad": dx})
    cases["lrn"] = lrn

    shape = (2, 3, 9, 8)
    x = values(300, shape, 5.0)
    g = values(301, (2, 3, 4, 3), 1.0)
    (dx,) = grads_of(lambda x: F.max_pool2d(x, 3, 2), g, x)
    cases["max_pool"] = {"input": list(shape), "kernel": 3, "stride": 2,
                         "streams": [300, 301], "scales": [5.0, 1.0], "input_grad": dx}

    x = values(400, (5, 37), 1.0)
    wt = values(401, (23, 37), 0.3)
    b = values(402, (23,), 0.3)
    g = values(403, (5, 23), 1.0)
    dx, dw, db = grads_of(lambda x, wt, b: F.linear(x, wt, b), g, x, wt, b)
    cases["linear"] = {"input": [5, 37], "out_features": 23, "streams": [400, 401, 402, 403],
                       "scales": [1.0, 0.3, 0.3, 1.0], "input_grad": dx, "weight_grad": dw,
                       "bias_grad": db}

    z = values(500, (4, 11), 4.0).requires_grad_(True)
    labels = [3, 0, 10, 7]
    loss = F.cross_entropy(z, torch.tensor(labels))
    loss.backward()
    cases["cross_entropy"] = {"logits": [4, 11], "stream": 500, "scale": 4.0,
                              "labels": labels, "loss": float(loss.detach()), "logits_grad": flat(z.grad)}
    return cases


# ---------------------------------------------------------------------------
# An AlexNet-shaped network
# ---------------------------------------------------------------------------

PAPER_LRN = (5, 1e-4, 0.75, 2.0)


def conv_layout(channels):
    """(in, out, kernel, stride, padding, lrn+pool after) per conv, as the crate's skeleton."""
    c = [3] + list(channels)
    return [(c[0], c[1], 11, 4, 2, True, True), (c[1], c[2], 5, 1, 2, True, True),
            (c[2], c[3], 3, 1, 1, False, False), (c[3], c[4], 3, 1, 1, False, False),
            (c[4], c[5], 3, 1, 1, False, True)]


def formula_params(channels, side, fcs):
    """The Rust tests' formula_weights: stream 1, 2, ... per tensor in network order,
    weight = formula(stream) * sqrt(6 / fan_in), bias = formula(stream) * 0.1."""
    params = []
    stream = 1
    shapes = [(o, i, k, k) for (i, o, k, _, _, _, _) in conv_layout(channels)]
    spatial = side
    for (_, _, k, s, p, _, pool) in conv_layout(channels):
        spatial = (spatial + 2 * p - k) // s + 1
        if pool:
            spatial = (spatial - 3) // 2 + 1
    widths = [channels[-1] * spatial * spatial] + list(fcs)
    shapes += [(widths[i + 1], widths[i]) for i in range(len(fcs))]
    for shape in shapes:
        fan_in = int(np.prod(shape[1:]))
        w = values(stream, shape, math.sqrt(6.0 / fan_in))
        b = values(stream + 1, (shape[0],), 0.1)
        params += [w, b]
        stream += 2
    return params


def network_forward(params, x, channels, lrn, dropout_p, step_seed):
    """Logits in training mode: dropout after every hidden linear layer, masks drawn as the
    crate draws them (the l-th dropout layer from layer_seed(step_seed, l))."""
    i = 0
    for (_, _, _, s, p, norm_pool, pool) in conv_layout(channels):
        x = F.relu(F.conv2d(x, params[i], params[i + 1], stride=s, padding=p))
        i += 2
        if norm_pool and lrn:
            size, alpha, beta, k = PAPER_LRN
            x = F.local_response_norm(x, size, alpha * size, beta, k)
        if pool:
            x = F.max_pool2d(x, 3, 2)
    x = torch.flatten(x, 1)
    n_fcs = (len(params) - i) // 2
    for l in range(n_fcs):
        x = F.linear(x, params[i], params[i + 1])
        i += 2
        if l + 1 < n_fcs:
            x = F.relu(x)
            if dropout_p > 0:
                mask = keep_mask(layer_seed(step_seed, l), x.numel(), dropout_p)
                mask = torch.from_numpy(mask.reshape(tuple(x.shape)).astype(np.float64)).to(x.dtype)
                x = x * mask / (1.0 - dropout_p)
    return x


TINY = {"channels": [8, 12, 10, 9, 8], "side": 99, "fcs": [32, 24, 10], "lrn": True,
        "dropout": 0.5}


def tiny_network():
    cfg = TINY
    params = formula_params(cfg["channels"], cfg["side"], cfg["fcs"])
    batch, labels, step_seed = 3, [1, 7, 3], 5
    x = values(600, (batch, 3, cfg["side"], cfg["side"]), 2.0)
    leaves = [p.clone().requires_grad_(True) for p in params]
    logits = network_forward(leaves, x, cfg["channels"], cfg["lrn"], cfg["dropout"], step_seed)
    loss = F.cross_entropy(logits, torch.tensor(labels))
    loss.backward()
    out = dict(cfg)
    out.update({"batch": batch, "input_stream": 600, "input_scale": 2.0, "labels": labels,
                "step_seed": step_seed, "logits": flat(logits), "loss": float(loss.detach()),
                "grads": [flat(p.grad) for p in leaves]})

    # Two SGD steps: batches from streams 610 and 611, step seeds 0 and 1.
    steps = [(values(610, (4, 3, cfg["side"], cfg["side"]), 2.0), [0, 9, 4, 4], 0),
             (values(611, (4, 3, cfg["side"], cfg["side"]), 2.0), [2, 5, 8, 1], 1)]
    lr, momentum, wd = 0.01, 0.9, 5e-4
    out["sgd"] = {"learning_rate": lr, "momentum": momentum, "weight_decay": wd,
                  "batch_streams": [610, 611], "labels": [s[1] for s in steps],
                  "step_seeds": [s[2] for s in steps]}

    def run(update):
        leaves = [p.clone().requires_grad_(True) for p in params]
        state = update(leaves, None)
        losses = []
        for (xb, yb, seed) in steps:
            for p in leaves:
                p.grad = None
            logits = network_forward(leaves, xb, cfg["channels"], cfg["lrn"], cfg["dropout"],
                                     seed)
            loss = F.cross_entropy(logits, torch.tensor(yb))
            loss.backward()
            losses.append(float(loss))
            state = update(leaves, state)
        return losses, [flat(p) for p in leaves]

    def torch_sgd(leaves, opt):
        if opt is None:
            return torch.optim.SGD(leaves, lr=lr, momentum=momentum, weight_decay=wd)
        opt.step()
        return opt

    def paper_rule(leaves, velocity):
        # v = m v - wd lr w - lr g; w += v; biases (odd tensors) without weight decay.
        if velocity is None:
            return [torch.zeros_like(p) for p in leaves]
        with torch.no_grad():
            for j, (p, v) in enumerate(zip(leaves, velocity)):
                decay = 0.0 if j % 2 == 1 else wd
                v.mul_(momentum).sub_(decay * lr * p).sub_(lr * p.grad)
                p.add_(v)
        return velocity

    losses, weights = run(torch_sgd)
    out["sgd"]["pytorch"] = {"losses": losses, "weights": weights}
    losses, weights = run(paper_rule)
    out["sgd"]["paper_no_bias_decay"] = {"losses": losses, "weights": weights}
    return out


def well_conditioned(params, channels, x, pool_gap=1e-5, relu_margin=1e-6):
    """True when no max-pool window's two largest values lie within `pool_gap` (relative) of
    each other and no ReLU input lies within `relu_margin` of its layer's largest |value| of 0.
    At such near-ties the gradient is discontinuous: a float32 forward (error ~6e-6 of a
    window's largest value here) may route it to another element than float64 does, and the
    comparison would measure the tie, not the code."""
    with torch.no_grad():
        h, i = x, 0
        for (_, _, _, s, p, norm_pool, pool) in conv_layout(channels):
            z = F.conv2d(h, params[i], params[i + 1], stride=s, padding=p)
            i += 2
            if int((z.abs() < relu_margin * z.abs().max()).sum()) > 0:
                return False
            h = F.relu(z)
            if norm_pool:
                size, alpha, beta, k = PAPER_LRN
                h = F.local_response_norm(h, size, alpha * size, beta, k)
            if pool:
                windows = F.unfold(h.reshape(-1, 1, *h.shape[2:]), 3, stride=2)
                top2, _ = torch.topk(windows, 2, dim=1)
                gap = (top2[:, 0] - top2[:, 1]) / top2[:, 0].clamp(min=1e-30)
                if int(((gap < pool_gap) & (top2[:, 0] > 0)).sum()) > 0:
                    return False
                h = F.max_pool2d(h, 3, 2)
    return True


def paper_network():
    channels, fcs = [96, 256, 384, 384, 256], [4096, 4096, 1000]
    params = formula_params(channels, 224, fcs)
    assert sum(p.numel() for p in params) == 62_378_344
    labels, step_seed = [3, 997], 9
    # One image per stream, the first two well-conditioned streams from 700 on.
    streams, images = [], []
    stream = 700
    while len(streams) < 2:
        x = values(stream, (1, 3, 224, 224), 2.0)
        if well_conditioned(params, channels, x):
            streams.append(stream)
            images.append(x)
        stream += 1
    print(f"  paper preset: images from streams {streams}")
    x = torch.cat(images)
    leaves = [p.clone().requires_grad_(True) for p in params]
    logits = network_forward(leaves, x, channels, True, 0.5, step_seed)
    loss = F.cross_entropy(logits, torch.tensor(labels))
    loss.backward()
    stats = []
    for p in leaves:
        g = p.grad.reshape(-1)
        n = g.numel()
        picks = [(j * n) // 16 + (j * 7919) % max(1, n // 16) for j in range(16)]
        stats.append({"sum": float(g.sum()), "abs_sum": float(g.abs().sum()),
                      "max_abs": float(g.abs().max()), "indices": picks,
                      "values": [float(g[k]) for k in picks]})
    return {"image_streams": streams, "input_scale": 2.0, "labels": labels,
            "step_seed": step_seed, "logits": flat(logits), "loss": float(loss.detach()),
            "grads": stats}


def main():
    # One thread: float64 sums then run in one order, so the file is byte-identical anywhere.
    torch.set_num_threads(1)
    out = {"generator": "tools/pytorch_training_reference.py", "torch": torch.__version__,
           "layers": layer_cases(),
           "dropout": {"step_seed": 11, "layer": 1, "p": 0.5, "n": 64,
                       "kept": [int(i) for i in
                                np.nonzero(keep_mask(layer_seed(11, 1), 64, 0.5))[0]]},
           "network": tiny_network(), "paper": paper_network()}
    with open(OUT_JSON, "w") as f:
        json.dump(out, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT_JSON} ({os.path.getsize(OUT_JSON)} bytes)")


if __name__ == "__main__":
    main()
