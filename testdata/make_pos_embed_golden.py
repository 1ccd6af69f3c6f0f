"""Regenerate testdata/pos_embed_golden.npz from timm's resample_abs_pos_embed (REPA's DINOv2 step).

Run by hand only, never by the tests, in a throwaway venv (timm is NOT a dependency):

  python3 -m venv --system-site-packages /tmp/venv-i10e
  /tmp/venv-i10e/bin/pip install timm==1.0.31
  /tmp/venv-i10e/bin/python testdata/make_pos_embed_golden.py

REPA (sihyun-yu/REPA utils.py, load_encoders) resamples DINOv2's pos_embed (1, 1 + 37*37, D) once to
the 16x16 (256 px) or 32x32 (512 px) token grid with timm.layers.pos_embed.resample_abs_pos_embed and
its defaults (bicubic, antialias=True, one prefix token).

Contents, per case c: c_input (1, P + h*w, D) float32 (torch.manual_seed(i) normal), c_output (timm's
result), c_new_hw, c_old_hw ((0, 0) = timm's square default), c_prefix (P). Cases:
  sq37_to16     37x37 -> 16x16, P=1 (REPA at 256 px)
  sq37_to32     37x37 -> 32x32, P=1 (REPA at 512 px)
  sq37_to10x14  37x37 -> 10x14, P=1 (non-square target)
  r12x20_to16   12x20 -> 16x16, P=0 (non-square source, no prefix)
  r6x4_to9x7    6x4 -> 9x7, P=2 (upsampling, two prefix tokens)
"""

import sys
from pathlib import Path

import numpy as np
import torch
import timm
from timm.layers.pos_embed import resample_abs_pos_embed

ROOT = Path(__file__).resolve().parent.parent
D = 8
CASES = {"sq37_to16": ((37, 37), (16, 16), 1, False), "sq37_to32": ((37, 37), (32, 32), 1, False),
         "sq37_to10x14": ((37, 37), (10, 14), 1, False), "r12x20_to16": ((12, 20), (16, 16), 0, True),
         "r6x4_to9x7": ((6, 4), (9, 7), 2, True)}


def main():
    out = {}
    for i, (case, (old, new, prefix, give_old)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        pe = torch.randn(1, prefix + old[0] * old[1], D)
        res = resample_abs_pos_embed(pe, list(new), old_size=list(old) if give_old else None,
                                     num_prefix_tokens=prefix)
        out.update({f"{case}_input": pe.numpy(), f"{case}_output": res.numpy(),
                    f"{case}_new_hw": np.array(new), f"{case}_old_hw": np.array(old if give_old else (0, 0)),
                    f"{case}_prefix": np.array(prefix)})
        print(case, tuple(pe.shape), "->", tuple(res.shape))
    out["timm_version"] = np.array(timm.__version__)
    out["torch_version"] = np.array(torch.__version__)
    np.savez_compressed(ROOT / "testdata" / "pos_embed_golden.npz", **out)
    print("wrote testdata/pos_embed_golden.npz")


if __name__ == "__main__":
    sys.exit(main())
