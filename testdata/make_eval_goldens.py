"""Regenerate testdata/eval_goldens.npz from the reference implementation (pytorch-fid).

Run by hand only, never by the tests, in a throwaway venv (pytorch-fid is NOT a
dependency of this project). The singular-covariance case needs a scipy whose sqrtm is
the Schur-based one (<= 1.15), since newer scipy never takes pytorch-fid's eps fallback:

  python3 -m venv --system-site-packages /tmp/oldenv
  /tmp/oldenv/bin/pip install "numpy<2" "scipy==1.13.1" pytorch-fid==0.3.0
  /tmp/oldenv/bin/python testdata/make_eval_goldens.py

Contents (all small):
  images (4,64,64,3) uint8               deterministic test pictures
  pool (4,2048) / logits (4,1008) / spatial (4,2023) float32
      pytorch-fid's FID Inception with the weights of testdata/inception_weights.py (seed 0) loaded
      (its weight download is patched to return that state dict); logits = its fc
      output, spatial = first 7 channels of Mixed_6d.branch1x1, flattened in (H, W, C)
      order like ADM's NHWC tensor
  fd_<case>_{mu1,sigma1,mu2,sigma2} float64 and fd_<case>_value: pytorch-fid's
      calculate_frechet_distance(mu1, sigma1, mu2, sigma2); fd_<case>_fallback says
      whether it printed its "adding eps to diagonal" fallback message
"""

import contextlib
import io
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import scipy
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402  (only for the network's parameter names and shapes)
from testdata.inception_weights import random_inception_state_dict  # noqa: E402
from pytorch_fid import inception as pfi  # noqa: E402
from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: E402


def make_images():
    """Four 64x64 RGB test images: gradients, stripes, a disc and noise."""
    rng = np.random.RandomState(1234)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    ims = [np.stack([xx, yy, 1 - xx], -1),
           np.stack([np.sin(xx * 20) * 0.5 + 0.5, yy, np.cos(yy * 9) * 0.5 + 0.5], -1),
           np.stack([((xx - .5) ** 2 + (yy - .5) ** 2 < .1)] * 3, -1) * [0.9, 0.3, 0.1],
           rng.rand(64, 64, 3)]
    return np.stack([(np.clip(i, 0, 1) * 255).round().astype(np.uint8) for i in ims])


def inception_features(images):
    """pool / logits / spatial from pytorch-fid's own network and blocks."""
    state = random_inception_state_dict(evaluate.FIDInception().net.state_dict(), 0)
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        wrapper = pfi.InceptionV3([3]).eval()
        full = pfi.fid_inception_v3().eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    grabbed = {}
    full.Mixed_6d.branch1x1.register_forward_hook(
        lambda m, i, o: grabbed.__setitem__("s", o[:, :7].permute(0, 2, 3, 1).flatten(1)))
    with torch.no_grad():
        pool = wrapper(x)[0].flatten(1)
        xin = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        logits = full(xin)
    return pool.numpy(), logits.numpy(), grabbed["s"].numpy()


def fd_cases():
    """Random Gaussian statistics (d=32), incl. rank-deficient and dead-feature cases."""
    rng = np.random.RandomState(7)

    def stats(n, d=32, dead=()):
        x = rng.randn(n, d) @ rng.randn(d, d) * 0.3 + rng.randn(d)
        x[:, list(dead)] = 1.5                       # zero-variance (dead) features
        return x.mean(0), np.cov(x, rowvar=False)

    return {
        "full": stats(500) + stats(300),
        "rankdef": stats(20) + stats(24),             # N < d: singular, no fallback
        "dead_one": stats(200, dead=[3]) + stats(200),
        "dead_same": stats(200, dead=[3, 7]) + stats(200, dead=[3, 7]),
        "fallback": stats(200, dead=[3]) + stats(200, dead=[7]),   # eps fallback
        "shift": stats(100, d=16) + (stats(100, d=16)[0] + 3.0, stats(100, d=16)[1]),
    }


def main():
    images = make_images()
    pool, logits, spatial = inception_features(images)
    out = {"images": images, "pool": pool, "logits": logits, "spatial": spatial}
    for name, (m1, s1, m2, s2) in fd_cases().items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            value = calculate_frechet_distance(m1, s1, m2, s2)
        out.update({f"fd_{name}_mu1": m1, f"fd_{name}_sigma1": s1, f"fd_{name}_mu2": m2,
                    f"fd_{name}_sigma2": s2, f"fd_{name}_value": np.float64(value),
                    f"fd_{name}_fallback": np.bool_("singular" in buf.getvalue())})
        print(f"{name:10s} fid={value:.10f} fallback={'singular' in buf.getvalue()}")
    assert out["fd_fallback_fallback"], f"scipy {scipy.__version__} took no eps fallback"
    out["scipy_version"] = np.array(scipy.__version__)
    np.savez_compressed(ROOT / "testdata" / "eval_goldens.npz", **out)
    print("wrote testdata/eval_goldens.npz with scipy", scipy.__version__)


if __name__ == "__main__":
    main()
