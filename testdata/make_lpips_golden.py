"""Generate testdata/lpips_golden.pt: LPIPS-VGG (v0.1) parity data from the reference `lpips` package.

Run by hand only (tests never run this; `lpips` is not a project dependency), from the repo root:

    python3 -m venv --system-site-packages /tmp/lpipsenv && /tmp/lpipsenv/bin/pip install lpips
    /tmp/lpipsenv/bin/python testdata/make_lpips_golden.py

The real v0.1 linear heads ship inside the lpips package (lpips/weights/v0.1/vgg.pth); the ImageNet
VGG16 trunk cannot be downloaded here, so the trunk is built deterministically instead:
    torch.manual_seed(0); torchvision.models.vgg16(weights=None).features
and copied into lpips' trunk (net.slice1..slice5 = features[0:4], [4:9], [9:16], [16:23], [23:30],
keyed by the original layer indices, see lpips/pretrained_networks.py class vgg16).
"""

import importlib.metadata
import os

import torch
import torchvision

import lpips

VGG_SEED = 0
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lpips_golden.pt")


def make_vgg_features(seed=VGG_SEED):
    torch.manual_seed(seed)
    return torchvision.models.vgg16(weights=None).features


def main():
    torch.set_num_threads(1)

    # Linear heads exactly as stored in the package.
    lin_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    lin = torch.load(lin_path, map_location="cpu", weights_only=True)
    assert sorted(lin) == [f"lin{i}.model.1.weight" for i in range(5)], sorted(lin)

    model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    model.eval()

    # Deterministic trunk, copied into lpips' slices (keys are the original feature indices).
    feats = make_vgg_features()
    feats_again = make_vgg_features()
    for a, b in zip(feats.state_dict().values(), feats_again.state_dict().values()):
        assert torch.equal(a, b), "vgg16(weights=None) construction is not deterministic"
    trunk_sd = {}
    slices = [(1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30)]
    feats_sd = feats.state_dict()
    for s, lo, hi in slices:
        for k, v in feats_sd.items():
            idx = int(k.split(".")[0])
            if lo <= idx < hi:
                trunk_sd[f"slice{s}.{k}"] = v
    assert set(trunk_sd) == set(model.net.state_dict()), (sorted(trunk_sd), sorted(model.net.state_dict()))
    model.net.load_state_dict(trunk_sd, strict=True)

    # Check the heads inside the model are the package's, and the stored recipe reproduces the trunk.
    msd = model.state_dict()
    for k, v in lin.items():
        assert torch.equal(msd[k], v), k
    recreated = make_vgg_features(VGG_SEED).state_dict()
    max_diff = 0.0
    for k, v in model.net.state_dict().items():
        ref = recreated[k.split(".", 1)[1]]
        max_diff = max(max_diff, (v - ref).abs().max().item())
    assert max_diff == 0.0, max_diff
    print("trunk recipe max abs diff:", max_diff)

    g = torch.Generator().manual_seed(1234)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    # make the third pair close (small distance) to exercise that regime as well
    y[2] = (x[2] + 0.05 * (torch.rand(3, 32, 32, generator=g) * 2 - 1)).clamp(-1, 1)

    with torch.no_grad():
        d, per_layer = model(x, y, retPerLayer=True, normalize=False)
    d = d.flatten().float()
    per_layer = torch.stack([r.flatten() for r in per_layer]).float()  # (5, 3)
    assert torch.allclose(per_layer.sum(0), d, atol=1e-6)

    out = {
        "lin": {k: v.clone() for k, v in lin.items()},  # plain dict, same keys/order as vgg.pth
        "vgg_seed": VGG_SEED,
        "x": x,
        "y": y,
        "d": d,
        "per_layer": per_layer,
        "lpips_version": importlib.metadata.version("lpips"),
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
    }
    torch.save(out, OUT)
    print("d =", d.tolist())
    print("per_layer =", per_layer.tolist())
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
