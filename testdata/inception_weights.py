"""The golden tests' FID-Inception weights: deterministic and pseudo-random, the same in test_sm.py and in the
generators of this folder (which load them into pytorch-fid's and torch-fidelity's networks)."""

import math

import torch


def random_inception_state_dict(template, seed=0):
    """Weights for a torchvision-layout Inception state dict `template` (names and shapes; values unused).

    For every key in sorted order, drawn from one torch.Generator(seed) on CPU in float32:
      conv / fc weight   N(0,1) * sqrt(2 / fan_in)     (fc: sqrt(1 / fan_in))
      bn.weight          U(0.5, 1.5)        bn.bias, bn.running_mean, fc.bias  0.1 * N(0,1)
      bn.running_var     U(0.5, 1.5)        num_batches_tracked                0
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(template):
        t = template[key]
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros_like(t)
        elif key.endswith("weight") and t.dim() > 1:
            gain = 1.0 if key.startswith("fc.") else 2.0
            out[key] = torch.randn(t.shape, generator=g) * math.sqrt(gain / t[0].numel())
        elif key.endswith(("bn.weight", "running_var")):
            out[key] = torch.rand(t.shape, generator=g) + 0.5
        else:                                               # biases, running means
            out[key] = 0.1 * torch.randn(t.shape, generator=g)
    return out
