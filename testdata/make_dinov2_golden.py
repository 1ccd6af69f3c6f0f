"""Regenerate testdata/dinov2_golden.npz from EDM2's own FD-DINOv2 preprocessing (NVlabs/edm2).

Run by hand only, never by the tests, in a throwaway venv with a checkout of NVlabs/edm2 (its
calculate_metrics.py imports dnnlib, torch_utils, click; edm2 is NOT a dependency of this project):

  git clone https://github.com/NVlabs/edm2 /tmp/edm2          # checked with 4bf8162 ("Autoguidance release")
  python3 -m venv --system-site-packages /tmp/edmenv && /tmp/edmenv/bin/pip install click requests
  /tmp/edmenv/bin/python testdata/make_dinov2_golden.py /tmp/edm2

EDM2's DINOv2Detector (resize_mode 'torch', its default) loads DINOv2 ViT-L/14 with torch.hub.load; here
torch.hub.load returns a random stand-in instead (the weights cannot be downloaded in CI, and the golden is
about what EDM2 does to the pixels before the model): a 14x14 stride-14 convolution to 2 channels, flattened,
so every output depends on every preprocessed pixel of its patch. Images: numpy's default_rng(seed) integers,
uint8 NCHW, one batch 48x48 (upsampled to 224) and one 300x300 (downsampled, antialiased).

Contents: weight (2, 3, 14, 14), bias (2,) float32; features_48 (4, 512), features_300 (2, 512) float32;
edm2_commit.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

edm2 = sys.argv[1]
sys.path.insert(0, edm2)
import calculate_metrics  # noqa: E402  (EDM2's module)


def images(n, size, seed):
    """The test images: uint8 (n, 3, size, size) from numpy's PCG64 (stable across numpy versions)."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


g = torch.Generator().manual_seed(0)
conv = torch.nn.Conv2d(3, 2, 14, stride=14)
with torch.no_grad():
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
stand_in = torch.nn.Sequential(conv, torch.nn.Flatten())          # (N, 2 * 16 * 16)
torch.hub.load = lambda *a, **k: stand_in
detector = calculate_metrics.DINOv2Detector()                       # resize_mode='torch'
with torch.no_grad():
    out = dict(weight=conv.weight.numpy(), bias=conv.bias.numpy(),
               features_48=detector(images(4, 48, 1)).numpy(), features_300=detector(images(2, 300, 2)).numpy())
out["edm2_commit"] = np.array(subprocess.run(["git", "-C", edm2, "rev-parse", "HEAD"], capture_output=True,
                                             text=True).stdout.strip() or "unknown")
np.savez(Path(__file__).with_name("dinov2_golden.npz"), **out)
print({k: v.shape for k, v in out.items()})
