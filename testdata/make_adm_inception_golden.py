"""Regenerate testdata/adm_inception_golden.npz from torch-fidelity (ADM's TF1 input pipeline).

Run by hand only, never by the tests, in a throwaway venv (torch-fidelity is NOT a dependency):

  python3 -m venv --system-site-packages /tmp/venv-i10e
  /tmp/venv-i10e/bin/pip install torch-fidelity==0.4.0
  /tmp/venv-i10e/bin/python testdata/make_adm_inception_golden.py

torch-fidelity's FeatureExtractorInceptionV3 reproduces the input pipeline of the TF Inception graph
that ADM's evaluator feeds (guided-diffusion evaluations/evaluator.py: uint8 pixels as float into
"ExpandDims:0"): TF1 bilinear resize to 299 (align_corners=False, src = dst * in / out; its
interpolate_bilinear_2d_like_tensorflow1x), then (x - 128) / 128. It is loaded here with the weights
of testdata/inception_weights.py (seed 0), written to a temporary .pth.

Contents, for each case c in CASES (uint8 NHWC inputs at 256x256, 32x32 and a non-square 48x80):
  c_images                 (N, H, W, 3) uint8
  c_resized_sum / _sqsum   float64 sum and sum of squares of the TF1-resized (N, 3, 299, 299) input
  c_resized_slice          resized[:, :, ::23, ::23] (N, 3, 13, 13) float32, and c_resized_row = row 150
  c_pool (N, 2048), c_logits_unbiased (N, 1008) (= pool @ fc.weight.T, the IS input), c_logits
  (N, 1008) (with the fc bias), c_spatial (N, 2023): first 7 channels of Mixed_6d.branch1x1 in (H, W, C)
  order, all float32
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402  (only for the network's parameter names and shapes)
from testdata.inception_weights import random_inception_state_dict  # noqa: E402
import torch_fidelity  # noqa: E402
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x  # noqa: E402

CASES = {"s256": (1, 256, 256), "s32": (2, 32, 32), "s48x80": (1, 48, 80)}


def make_images(n, h, w, seed):
    """Smooth gradients plus uniform noise (sharp edges and fine texture both exercise the resize)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([xx, yy, 0.5 + 0.5 * np.sin(9 * xx * yy)], -1) * 160
    ims = [np.clip(base + rng.randint(0, 96, (h, w, 3)), 0, 255).astype(np.uint8) for _ in range(n)]
    return np.stack(ims)


def main():
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inception_random.pth"
        torch.save(random_inception_state_dict(evaluate.FIDInception().net.state_dict(), 0), path)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                          feature_extractor_weights_path=str(path))
    grabbed = {}
    net.Mixed_6d.branch1x1.register_forward_hook(
        lambda m, i, o: grabbed.__setitem__("s", o[:, :7].permute(0, 2, 3, 1).flatten(1)))
    for seed, (case, (n, h, w)) in enumerate(CASES.items()):
        images = make_images(n, h, w, seed)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()        # uint8 NCHW
        with torch.no_grad():
            resized = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
            pool, unbiased, logits = net(x)
        out.update({f"{case}_images": images,
                    f"{case}_resized_sum": resized.double().sum().numpy(),
                    f"{case}_resized_sqsum": (resized.double() ** 2).sum().numpy(),
                    f"{case}_resized_slice": resized[:, :, ::23, ::23].numpy(),
                    f"{case}_resized_row": resized[:, :, 150, :].numpy(),
                    f"{case}_pool": pool.numpy(), f"{case}_logits_unbiased": unbiased.numpy(),
                    f"{case}_logits": logits.numpy(), f"{case}_spatial": grabbed["s"].numpy()})
        print(case, tuple(images.shape), "pool |max|", float(pool.abs().max()))
    out["torch_fidelity_version"] = np.array(torch_fidelity.__version__)
    out["torch_version"] = np.array(torch.__version__)
    np.savez_compressed(ROOT / "testdata" / "adm_inception_golden.npz", **out)
    print("wrote testdata/adm_inception_golden.npz")


if __name__ == "__main__":
    main()
