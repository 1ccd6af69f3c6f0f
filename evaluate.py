"""Evaluation for Spectrum Matching: Inception FID/IS/sFID/precision-recall, SWD,
autoencoder metrics (rFID, PSNR, SSIM, LPIPS, DSM check), spectrum diagnostics, and the
diffusability probe and regulariser comparison (run_probe / run_compare, which train.py's
--stage probe / compare call).

Usage
-----
  python evaluate.py SAMPLES REFERENCE [--save-stats STATS.npz] [--json OUT.json]
  python evaluate.py SAMPLES --ref-dataset imagenet --ref-path DIR --image-size 256
  python evaluate.py --vae CKPT --dataset imagenet --data-path DIR --num-images 10000
  python evaluate.py --spectrum --vae CKPT --dataset imagenet --data-path DIR
  python evaluate.py --bench                       # images/s, ours vs pytorch-fid
  torchrun --nproc_per_node=8 evaluate.py SAMPLES REFERENCE    # DDP feature extraction

SAMPLES / REFERENCE: a folder of images, an .npz with `arr_0` (N,H,W,3 uint8; the ADM
format sample.py writes), or an .npz with `mu`/`sigma` (ADM reference batches, or
statistics cached by --save-stats). Results go to stdout (the protocol, then the table) and
to a JSON next to SAMPLES (`X.npz` -> `X.metrics.json`, folder `D/` -> `D.metrics.json`;
`X.json` is sample.py's side file) unless --json says where.

Inception: the TF "2015-12-05" FID network in torchvision's Inception-v3 layout with the
weights pytorch-fid publishes (pt_inception-2015-12-05-6726825d.pth). Input protocols
(--resize): 'adm' (default) as ADM's TF evaluator (guided-diffusion evaluations/evaluator.py):
pixels 0..255, TF1 bilinear resize to 299 (src = dst * in / out), (x - 128) / 128;
'pytorch-fid': pixels / 255, torch bilinear resize (half-pixel centres), 2x - 1. Features:
  pool    (N, 2048)   pool_3, for FID and precision/recall
  logits_unbiased (N, 1008)   pool_3 @ W (no fc bias): the softmax input of ADM's Inception Score
  spatial (N, 2023)   ADM's sFID features, "mixed_6/conv" = first 7 channels of the
                      1x1 branch (conv+BN+ReLU) of torchvision's Mixed_6d, 17x17, flattened in
                      (H, W, C) order like ADM's NHWC tensor
FID / sFID / precision-recall are refused below 2,048 images on either side unless --allow-small;
then they are labelled with their size (`fid-512`).
"""

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sm
import train

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                   "fid_weights/" + FID_WEIGHTS_NAME)
IMAGE_EXTS = train.IMAGE_EXTS
MIN_IMAGES_UNBIASED = 2048
SPATIAL_CHANNELS = 7
RESIZE_PROTOCOLS = ("adm", "pytorch-fid")
IS_SPLIT_SIZE = 5000                                        # ADM's compute_inception_score(split_size=5000)
FEATURE_KEYS = ("pool", "logits_unbiased", "spatial")


class EvalError(ValueError):
    """Bad input to the evaluator (message names the problem and the file)."""


# ----------------------------------------------------------------------------------------
# Inception network (TF-compatible FID Inception, torchvision layout)
# ----------------------------------------------------------------------------------------

def _tf_blocks():
    """Torchvision Inception blocks with TF pooling (imports torchvision lazily)."""
    from torchvision.models import inception as tvi

    def pool_avg(x):
        # TF average pooling ignores the zero padding
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    def pool_max(x):
        return F.max_pool2d(x, 3, stride=1, padding=1)

    class BlockA(tvi.InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(pool_avg(x))]

    class BlockC(tvi.InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
                d = m(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(pool_avg(x))]

    class BlockE(tvi.InceptionE):
        def __init__(self, in_channels, pool):
            super().__init__(in_channels)
            self.pool = pool

        def _forward(self, x):
            a = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            return [self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))]

    return tvi, BlockA, BlockC, BlockE, pool_avg, pool_max


def resize_bilinear_tf1(x, size=(299, 299)):
    """TF1 `tf.image.resize_bilinear` (align_corners=False, no half-pixel centres), as in ADM's graph.

    src = dst * in / out (scale rounded to float32 like TF's kernel), then lerp along W and along H in
    TF's order: top = tl + (tr - tl) dx, bottom = bl + (br - bl) dx, out = top + (bottom - top) dy.
    x: float (N, C, H, W) -> (N, C, size[0], size[1]).
    """
    def axis(n_in, n_out):
        scale = torch.tensor(float(n_in), dtype=torch.float32) / n_out
        src = torch.arange(n_out, dtype=torch.float32) * scale                 # (n_out,)
        lo = src.floor()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo.long().to(x.device), hi.long().to(x.device), (src - lo).to(x.device, x.dtype)

    ylo, yhi, dy = axis(x.shape[-2], size[0])
    xlo, xhi, dx = axis(x.shape[-1], size[1])
    left = x.index_select(-1, xlo)
    x = left + (x.index_select(-1, xhi) - left) * dx                        # (N, C, H, ow), every input row once
    top = x.index_select(-2, ylo)
    return top + (x.index_select(-2, yhi) - top) * dy[:, None]               # (N, C, oh, ow)


def _check_resize(resize):
    if resize not in RESIZE_PROTOCOLS:
        raise EvalError(f"resize must be one of {RESIZE_PROTOCOLS}, got {resize!r}")
    return resize


def inception_input(x, resize="adm"):
    """Images -> the network's (N, 3, 299, 299) input under one protocol (see the module docstring).

    x: uint8 (N, 3, H, W) pixels 0..255 (exact), or float (N, 3, H, W) in [0, 1] (scaled by 255).
    """
    _check_resize(resize)
    if x.ndim != 4 or x.shape[1] != 3:
        raise EvalError(f"Inception input must be (N, 3, H, W) images, got shape {tuple(x.shape)}")
    if resize == "adm":                                     # ADM: float pixels, TF1 resize, (x - 128) / 128
        x = x.float() if x.dtype == torch.uint8 else x.float() * 255.0
        return (resize_bilinear_tf1(x, (299, 299)) - 128.0) / 128.0
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0                                    # pytorch-fid: [0,1] -> [-1,1]


class FIDInception(nn.Module):
    """FID Inception-v3; forward(NCHW uint8 0..255 or float [0,1]) -> dict(pool, logits, logits_unbiased,
    spatial). `resize` picks the input protocol ('adm' or 'pytorch-fid'); logits = fc(pool) with the bias
    (pytorch-fid's output), logits_unbiased = pool @ fc.weight.T (ADM's and torch-fidelity's IS input)."""

    def __init__(self, resize="adm"):
        super().__init__()
        self.resize = _check_resize(resize)
        tvi, A, C, E, pool_avg, pool_max = _tf_blocks()
        net = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
        net.Mixed_6b, net.Mixed_6c = C(768, 128), C(768, 160)
        net.Mixed_6d, net.Mixed_6e = C(768, 160), C(768, 192)
        net.Mixed_7b, net.Mixed_7c = E(1280, pool_avg), E(2048, pool_max)
        self.net = net
        self.weights_path = None                            # set by load_inception (for the protocol)
        self._spatial = None
        net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SPATIAL_CHANNELS]        # (N, 7, 17, 17)

    @torch.no_grad()
    def forward(self, x):
        x = inception_input(x, self.resize)                 # (N, 3, 299, 299)
        x = x.contiguous(memory_format=torch.channels_last)  # ~1.5x faster convs on CPU
        n = self.net
        for m in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1,
                  n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.maxpool2,
                  n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                  n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = m(x)
        pool = x.mean(dim=(2, 3))                           # (N, 2048)
        # ADM flattens the NHWC TF tensor: (H, W, C) order, so its reference statistics line up
        spatial, self._spatial = self._spatial.permute(0, 2, 3, 1).flatten(1), None   # (N, 17*17*7)
        unbiased = pool @ n.fc.weight.T                     # (N, 1008) ADM: softmax(pool_3 @ W), no bias
        return {"pool": pool, "logits": unbiased + n.fc.bias, "logits_unbiased": unbiased,
                "spatial": spatial}


def _find_weights(path=None):
    """Local path of the FID Inception weights, downloading them if needed and possible."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Inception weights not found: {path}")
        return str(path)
    return sm.fetch_weights(FID_WEIGHTS_URL, None, "FID Inception", flag="--inception PATH")


def load_inception(path_or_state_dict=None, device="cpu", resize="adm"):
    """FID Inception in eval mode from a .pth path, a state dict, or the hub cache/URL.

    resize: input protocol, 'adm' (ADM's TF evaluator: TF1 resize of 0..255 pixels; default) or
    'pytorch-fid' (pytorch-fid's torch bilinear resize of [0, 1] pixels).
    """
    model = FIDInception(resize)                            # checks resize before any download
    if isinstance(path_or_state_dict, dict):
        state = path_or_state_dict
    else:
        model.weights_path = _find_weights(path_or_state_dict)
        state = torch.load(model.weights_path, map_location="cpu", weights_only=True)
    model.net.load_state_dict(state)
    model = model.eval().requires_grad_(False).to(device)
    return model.to(memory_format=torch.channels_last)


def random_inception_state_dict(seed=0):
    """Deterministic pseudo-random FID-Inception weights (golden tests, benchmarks).

    Recipe (reproducible on any side that has the torchvision key names): for every key
    in sorted order, draw from one torch.Generator(seed) on CPU in float32:
      conv / fc weight   N(0,1) * sqrt(2 / fan_in)     (fc: sqrt(1 / fan_in))
      bn.weight          U(0.5, 1.5)        bn.bias, bn.running_mean, fc.bias  0.1 * N(0,1)
      bn.running_var     U(0.5, 1.5)        num_batches_tracked                0
    """
    g = torch.Generator().manual_seed(seed)
    template = FIDInception().net.state_dict()
    out = {}
    for key in sorted(template):
        t = template[key]
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros_like(t)
        elif key.endswith("weight") and t.dim() > 1:
            fan_in = t[0].numel()
            gain = 1.0 if key.startswith("fc.") else 2.0
            out[key] = torch.randn(t.shape, generator=g) * math.sqrt(gain / fan_in)
        elif key.endswith(("bn.weight", "running_var")):
            out[key] = torch.rand(t.shape, generator=g) + 0.5
        else:                                               # biases, running means
            out[key] = 0.1 * torch.randn(t.shape, generator=g)
    return out


# ----------------------------------------------------------------------------------------
# Distributed helpers (torchrun: WORLD_SIZE > 1; otherwise world size 1)
# ----------------------------------------------------------------------------------------

def dist_setup():
    """(rank, world size, device) under torchrun or a plain process (train.Dist)."""
    d = train.Dist()
    return d.rank, d.world, d.device


def _gather(arrays, world):
    """Per-rank dicts of numpy arrays, rank r holding items r, r + world, ...: all items, in index order,
    on every rank (so consecutive splits, e.g. the Inception Score's, match a single process)."""
    if world == 1:
        return arrays
    parts = [None] * world
    torch.distributed.all_gather_object(parts, arrays)
    out = {}
    for k in arrays:
        n = sum(len(p[k]) for p in parts)
        out[k] = np.empty((n,) + parts[0][k].shape[1:], parts[0][k].dtype)
        for r, p in enumerate(parts):
            out[k][r::world] = p[k]
    return out


# ----------------------------------------------------------------------------------------
# Inputs: image folders, ADM .npz, statistics .npz, datasets
# ----------------------------------------------------------------------------------------

class ImageFolderDataset(train.ImageFiles):
    """The images of a folder and its subfolders, uncropped, as uint8 (3, H, W) tensors, decoded as in training."""

    def __init__(self, root):
        super().__init__(root, None, classes=False, recursive=True)

    def __getitem__(self, i):
        arr = np.array(train.read_rgb(self.files[i]), dtype=np.uint8)
        return torch.from_numpy(arr).permute(2, 0, 1)


class ArrayDataset(torch.utils.data.Dataset):
    """N,H,W,3 uint8 array (or .npz path, read on first access) as uint8 (3,H,W) tensors."""

    def __init__(self, arr, shape=None):
        self.arr, self.shape = arr, (arr.shape if shape is None else shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        if isinstance(self.arr, (str, Path)):               # lazy: ADM batches are ~2 GB
            self.arr = np.load(self.arr)["arr_0"]
        return torch.from_numpy(np.ascontiguousarray(self.arr[i])).permute(2, 0, 1)


def _npz_array_header(path, key):
    """(shape, dtype) of one array in an .npz without reading its data."""
    import zipfile
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
    return shape, np.dtype(dtype)


class SignedDataset(torch.utils.data.Dataset):
    """train.build_dataset output ([-1,1] float, label) as float (3,H,W) in [0,1]."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return _from_signed(self.ds[i][0])


def collate_images(batch, resize="adm"):
    """Stack images; mixed sizes are resized to 299x299 by the Inception protocol's own resize
    (what the network does anyway; 299 -> 299 is then the identity) and returned as float [0, 1]."""
    if all(b.shape == batch[0].shape for b in batch):
        return torch.stack(batch)
    if _check_resize(resize) == "adm":
        return torch.cat([resize_bilinear_tf1(_to_unit(b)[None] * 255.0) / 255.0 for b in batch])
    return torch.cat([F.interpolate(_to_unit(b)[None], size=(299, 299), mode="bilinear",
                                    align_corners=False) for b in batch])


def _to_unit(x):
    """uint8 0-255 or float [0,1] tensor -> float [0,1]."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _from_signed(x):
    """[-1, 1] images -> float [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def _image_array(path):
    """Lazy dataset over arr_0 of an .npz after checking its header (N,H,W,3 uint8)."""
    shape, dtype = _npz_array_header(path, "arr_0")
    if len(shape) != 4 or shape[-1] != 3:
        raise EvalError(f"{path}: arr_0 must be N x H x W x 3 images, got shape {shape}")
    if dtype != np.uint8:
        raise EvalError(f"{path}: arr_0 must be uint8 images, got {dtype}")
    if shape[0] == 0:
        raise EvalError(f"{path}: arr_0 holds no images")
    return ArrayDataset(str(path), shape)


def open_input(path):
    """Classify SAMPLES/REFERENCE: {'images': Dataset} and/or {'stats': dict}."""
    p = Path(path)
    if p.is_dir():
        return {"images": ImageFolderDataset(p), "path": str(p)}
    if not p.exists():
        raise EvalError(f"input not found: {p}")
    if p.suffix.lower() != ".npz":
        raise EvalError(f"input must be a folder of images or an .npz file: {p}")
    try:
        data = np.load(p)
        keys = set(data.files)
    except Exception as e:
        raise EvalError(f"cannot read {p}: {e}") from None
    out = {"path": str(p)}
    if {"mu", "sigma"} <= keys:
        out["stats"] = {k: data[k] for k in keys if k != "arr_0"}
        if "arr_0" in keys and len(_npz_array_header(p, "arr_0")[0]) == 4:
            out["images"] = _image_array(p)                   # ADM batches also hold images
    elif "arr_0" in keys:
        out["images"] = _image_array(p)
    else:
        raise EvalError(f"{p} has neither 'arr_0' (images) nor 'mu'/'sigma' (statistics); "
                        f"keys: {sorted(keys)}")
    return out


def build_eval_dataset(name, path, image_size, seed=0):
    """Dataset spec (center-cropped like train.py) as float [0,1] images."""
    return SignedDataset(train.build_dataset(name, path, image_size, train=False, seed=seed))


# ----------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(model, dataset, batch_size=50, num_workers=0, device="cpu",
                     max_images=None, progress=True, shard=True, keys=FEATURE_KEYS):
    """Inception features of a dataset of images, sharded over DDP ranks and gathered.

    Returns dict of float32 numpy arrays for `keys` (any of the model's outputs): by default
    pool (N,2048), logits_unbiased (N,1008) and spatial (N,2023).
    """
    rank, world = 0, 1
    if shard and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    subset = torch.utils.data.Subset(dataset, list(range(rank, n, world)))
    collate = functools.partial(collate_images, resize=getattr(model, "resize", "adm"))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=collate)
    feats = {k: [] for k in keys}
    if progress and rank == 0:
        from tqdm import tqdm
        loader = tqdm(loader, desc="inception", unit="batch", leave=False)
    for x in loader:
        out = model(x.to(device))
        for k in feats:
            feats[k].append(out[k].float().cpu().numpy())
    feats = {k: (np.concatenate(v) if v else np.zeros((0, 1), np.float32))
             for k, v in feats.items()}
    return _gather(feats, world)


# ----------------------------------------------------------------------------------------
# Statistics and Fréchet distance
# ----------------------------------------------------------------------------------------

def compute_statistics(features):
    """(N, D) features -> (mu (D,), sigma (D,D)) in float64; warns below 2048 images."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise EvalError(f"features must be (N, D), got shape {x.shape}")
    if x.shape[0] < 2:
        raise EvalError(f"need at least 2 images for statistics, got {x.shape[0]}")
    if x.shape[0] < MIN_IMAGES_UNBIASED:
        warnings.warn(f"only {x.shape[0]} images (< {MIN_IMAGES_UNBIASED}): FID is biased "
                      f"upwards and not comparable to 50k-image numbers", stacklevel=2)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def save_stats(path, stats):
    """Write statistics (mu, sigma, optional mu_s, sigma_s, pool, num_images, resize) to .npz, atomically."""
    path = str(path) if str(path).endswith(".npz") else f"{path}.npz"     # np.savez's own rule
    train.atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in stats.items()}))


def load_stats(path):
    """Read statistics written by save_stats or ADM's reference batches."""
    src = open_input(path)
    if "stats" not in src:
        raise EvalError(f"{path} holds no 'mu'/'sigma' statistics")
    return src["stats"]


def _zero_var_dims(sigma):
    """Indices of dimensions whose whole covariance row is exactly zero (dead features)."""
    return set(np.flatnonzero(~np.any(sigma != 0, axis=1)).tolist())


def _trace_sqrt_product(sigma1, sigma2):
    """tr sqrt(S1 S2) = tr sqrt(sqrt(S1) S2 sqrt(S1)) via symmetric eigendecompositions."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T        # symmetric sqrt(S1)
    m = root @ sigma2 @ root
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

    ||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), with the trace term from the
    eigenvalues of sqrt(S1) S2 sqrt(S1) (no scipy.linalg.sqrtm, any scipy version).
    pytorch-fid parity: its sqrtm(S1 S2) turns non-finite (scipy <= 1.15, Schur-based
    sqrtm) when one set has an exactly-zero-variance dimension the other lacks and vice
    versa; it then uses S + eps*I for the trace term only. We apply the same rule, so the
    numbers match pytorch-fid with those scipy versions (scipy >= 1.16's sqrtm never falls
    back; the difference is ~1e-5 relative in that corner case only).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise EvalError(f"mean vectors have different dimensions: {mu1.shape} vs {mu2.shape}")
    if s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise EvalError(f"covariances have different/mismatched dimensions: {s1.shape} vs "
                        f"{s2.shape} for means of length {mu1.shape[0]}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise EvalError("statistics contain NaN or inf")
    z1, z2 = _zero_var_dims(s1), _zero_var_dims(s2)
    if (z1 - z2) and (z2 - z1):
        warnings.warn(f"singular covariance product; adding {eps} to the diagonal "
                      f"(pytorch-fid fallback)", stacklevel=2)
        off = np.eye(s1.shape[0]) * eps
        tr = _trace_sqrt_product(s1 + off, s2 + off)
    else:
        tr = _trace_sqrt_product(s1, s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr)


# ----------------------------------------------------------------------------------------
# Inception Score, precision / recall
# ----------------------------------------------------------------------------------------

def inception_score(logits, splits=None, split_size=IS_SPLIT_SIZE):
    """Inception Score (mean, std over splits) of softmax(logits), as ADM's evaluator.

    ADM (guided-diffusion evaluations/evaluator.py, compute_inception_score): logits = pool_3 @ W
    without the fc bias (our `logits_unbiased`), consecutive splits of `split_size` = 5,000 samples
    (the last one may be shorter), exp(mean_x KL(p(y|x) || p(y))) per split, averaged: 50k samples give
    10 splits of 5,000. `splits=K` instead cuts K near-equal chunks (the improved-GAN / torch-fidelity
    convention); the default, used by the CLI and the JSON, is ADM's split size.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = logits.shape[0]
    if n < 2:
        raise EvalError(f"need at least 2 images for the Inception Score, got {n}")
    if splits is not None:
        chunks = np.array_split(np.arange(n), min(splits, n))
    else:
        if split_size < 1:
            raise EvalError(f"split_size must be >= 1, got {split_size}")
        chunks = [np.arange(i, min(i + split_size, n)) for i in range(0, n, split_size)]
    p = torch.softmax(logits, dim=1)
    logp = torch.log_softmax(logits, dim=1)
    scores = []
    for idx in chunks:
        part, lpart = p[idx], logp[idx]
        log_marg = torch.logsumexp(lpart, 0, keepdim=True) - math.log(len(idx))  # log p(y)
        kl = (part * (lpart - log_marg)).sum(1).mean()
        scores.append(math.exp(kl.item()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a, b):
    """Squared euclidean distances (A, B) from float32 rows."""
    d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return d.clamp_min_(0)


def knn_radii(features, k=3, batch_size=4096, device="cpu"):
    """Squared distance of every row to its k-th nearest neighbour (self excluded)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
    n = x.shape[0]
    if n <= k:
        raise EvalError(f"need more than k={k} feature vectors, got {n}")
    radii = torch.empty(n, dtype=torch.float32)
    for i in range(0, n, batch_size):
        best = None                                           # (b, k+1) smallest so far
        for j in range(0, n, batch_size):
            d = _sq_dists(x[i:i + batch_size], x[j:j + batch_size])
            if i == j:                                        # self distance is exactly 0
                d.fill_diagonal_(0.0)
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[i:i + batch_size] = best[:, k].cpu()            # index 0 is the point itself
    return radii.numpy()


def _coverage(queries, support, radii, batch_size, device):
    """Fraction of query rows inside at least one ball (support row, radius)."""
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float32, device=device)
    s = torch.as_tensor(np.asarray(support), dtype=torch.float32, device=device)
    r = torch.as_tensor(radii, dtype=torch.float32, device=device)
    inside = torch.zeros(q.shape[0], dtype=torch.bool, device=device)
    for i in range(0, q.shape[0], batch_size):
        for j in range(0, s.shape[0], batch_size):
            d = _sq_dists(q[i:i + batch_size], s[j:j + batch_size])
            inside[i:i + batch_size] |= (d <= r[None, j:j + batch_size]).any(1)
    return inside.float().mean().item()


def precision_recall(real_features, fake_features, k=3, batch_size=4096, device="cpu"):
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN balls, as ADM.

    precision = share of fake samples inside the real manifold; recall = share of real
    samples inside the fake manifold. Blocks of batch_size^2 distances bound the memory.
    """
    r_real = knn_radii(real_features, k, batch_size, device)
    r_fake = knn_radii(fake_features, k, batch_size, device)
    precision = _coverage(fake_features, real_features, r_real, batch_size, device)
    recall = _coverage(real_features, fake_features, r_fake, batch_size, device)
    return precision, recall


# ----------------------------------------------------------------------------------------
# Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018)
# ----------------------------------------------------------------------------------------

def _binomial_blur(x):
    """5x5 binomial [1,4,6,4,1]/16 blur per channel, reflect padding. x: (N,C,H,W)."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype) / 16.0
    k = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 5, 5)
    pad = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode=pad), k, groups=x.shape[1])


def laplacian_pyramid(x, min_res=16):
    """Laplacian pyramid of float (N,C,H,W), finest level first, down to min_res."""
    levels = []
    while True:
        if min(x.shape[-2:]) // 2 < min_res:
            levels.append(x)                                   # gaussian residual
            return levels
        small = _binomial_blur(x)[..., ::2, ::2]
        up = torch.zeros_like(x)
        up[..., ::2, ::2] = small * 4.0                        # zero-insert upsampling
        levels.append(x - _binomial_blur(up))
        x = small


def _patch_descriptors(level, patches_per_image, patch, gen):
    """Random (patch x patch) neighbourhoods of one pyramid level, normalised per channel."""
    n, c, h, w = level.shape
    p = min(patch, h, w)
    ys = torch.randint(0, h - p + 1, (n, patches_per_image), generator=gen)
    xs = torch.randint(0, w - p + 1, (n, patches_per_image), generator=gen)
    off = torch.arange(p)
    rows = (ys[..., None] + off)[..., :, None].expand(n, patches_per_image, p, p)
    cols = (xs[..., None] + off)[..., None, :].expand(n, patches_per_image, p, p)
    img = torch.arange(n)[:, None, None, None].expand_as(rows)
    desc = level.permute(0, 2, 3, 1)[img, rows, cols]          # (n, P, p, p, c)
    desc = desc.reshape(-1, p, p, c)
    desc = (desc - desc.mean((0, 1, 2))) / desc.std((0, 1, 2)).clamp_min(1e-8)
    return desc.reshape(desc.shape[0], -1)                     # (n*P, p*p*c)


def _sliced_wasserstein(a, b, repeats, dirs, gen):
    """Mean |sorted projection difference| over random unit directions."""
    total = 0.0
    for _ in range(repeats):
        d = torch.randn(a.shape[1], dirs, generator=gen, dtype=torch.float64)
        d = d / d.norm(dim=0, keepdim=True)
        pa, pb = torch.sort(a @ d, dim=0).values, torch.sort(b @ d, dim=0).values
        total += (pa - pb).abs().mean().item()
    return total / repeats


def swd(images_a, images_b, patches_per_image=128, patch=7, min_res=16,
        dir_repeats=4, dirs_per_repeat=128, seed=0):
    """Sliced Wasserstein distance ×1e3 per Laplacian level and their mean (ProGAN SWD).

    images_*: uint8 (N,H,W,3) numpy/tensor (values 0-255) or float (N,3,H,W) in [0,1];
    both sets the same size (H,W) and the same N (extra images are dropped). An offline
    proxy for FID that needs no pretrained network; only comparable at equal N and size.
    Returns {'levels': {res: swd}, 'mean': swd}.
    """
    a, b = _swd_input(images_a), _swd_input(images_b)
    if a.shape[1:] != b.shape[1:]:
        raise EvalError(f"SWD needs equal image sizes, got {tuple(a.shape[1:])} vs "
                        f"{tuple(b.shape[1:])}")
    n = min(a.shape[0], b.shape[0])
    if n < 2:
        raise EvalError(f"need at least 2 images per set for SWD, got {n}")
    gen = torch.Generator().manual_seed(seed)
    pyr_a, pyr_b = laplacian_pyramid(a[:n], min_res), laplacian_pyramid(b[:n], min_res)
    levels = {}
    for la, lb in zip(pyr_a, pyr_b):
        da = _patch_descriptors(la, patches_per_image, patch, gen).double()
        db = _patch_descriptors(lb, patches_per_image, patch, gen).double()
        levels[int(la.shape[-1])] = 1e3 * _sliced_wasserstein(da, db, dir_repeats,
                                                               dirs_per_repeat, gen)
    return {"levels": levels, "mean": float(np.mean(list(levels.values())))}


def _swd_input(x):
    """uint8 NHWC (0-255) or float NCHW [0,1] -> float32 NCHW in 0-255 (ProGAN scale)."""
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise EvalError(f"uint8 images must be N x H x W x 3, got {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float()
    if x.ndim != 4 or x.shape[1] != 3:
        raise EvalError(f"float images must be N x 3 x H x W in [0,1], got {tuple(x.shape)}")
    return x.float() * 255.0


# ----------------------------------------------------------------------------------------
# Image-quality metrics for autoencoders
# ----------------------------------------------------------------------------------------

def psnr(x, y):
    """Per-image PSNR (dB) of float [0,1] (B,C,H,W) images."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(x, y, window=11, sigma=1.5):
    """Per-image SSIM (Wang et al. 2004, gaussian 11x11, sigma 1.5) of [0,1] images."""
    c = x.shape[1]
    g = sm.gaussian_kernel1d(sigma, window // 2, x.device)
    k = (g[:, None] * g[None, :]).expand(c, 1, window, window)
    blur = lambda v: F.conv2d(v, k, groups=c)                    # noqa: E731 (valid conv)
    x, y = x.float(), y.float()
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


# ----------------------------------------------------------------------------------------
# Report helpers: table, JSON, PNG plot
# ----------------------------------------------------------------------------------------

def report(results, out, title="metric"):
    """Print the protocol and the table of scalar results; write all of it to the JSON file `out`."""
    print_protocol(results["protocol"])
    print_table(results, title)
    train.write_json(results, out)
    print(f"[evaluate] wrote {out}")


def print_table(results, title="metric"):
    """Two-column table of scalar results."""
    rows = [(k, v) for k, v in results.items() if isinstance(v, (int, float))]
    w = max([len(title)] + [len(k) for k, _ in rows])
    print(f"{title:<{w}}  value")
    print("-" * (w + 14))
    for k, v in rows:
        print(f"{k:<{w}}  {v:.4f}" if isinstance(v, float) else f"{k:<{w}}  {v}")


def default_json_path(src, suffix=".metrics.json"):
    """Output next to the input: X.npz -> X.metrics.json, folder D/ -> D.metrics.json, vae.pt ->
    vae.metrics.json (never X.json: that is sample.py's side file)."""
    p = Path(src)
    return str(p.parent / (p.name if p.is_dir() else p.stem)) + suffix


# ----------------------------------------------------------------------------------------
# Protocol record: what was measured, on what, with which code
# ----------------------------------------------------------------------------------------

def sha256_file(path, chunk=1 << 20):
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_input(path):
    """sha256 of an input: the file's, or for a folder of images the sha256 of its `sha256sum`-style
    listing ("<hex>  <relative path>\n" per image, sorted by path); None for non-files (datasets)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        files = sorted(Path(f) for f in train.image_files(p))              # the images a folder input reads
        listing = "".join(f"{sha256_file(f)}  {f.relative_to(p).as_posix()}\n" for f in files)
        return hashlib.sha256(listing.encode()).hexdigest()
    return None


def side_file(samples_path):
    """sample.py's side file of SAMPLES (`X.npz` -> `X.json`) as a dict, or None when absent."""
    p = Path(samples_path)
    side = p.with_suffix(".json") if p.suffix.lower() == ".npz" else None
    if side is None or not side.is_file():
        return None
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot read the samples' side file {side}: {e}") from None
    if not isinstance(info, dict):
        raise EvalError(f"the samples' side file {side} must hold a JSON object, got {type(info).__name__}")
    return info


def is_small(n, n_ref=None):
    """True when either side has fewer than MIN_IMAGES_UNBIASED images (biased FID / sFID / precision-recall)."""
    return n < MIN_IMAGES_UNBIASED or (n_ref is not None and n_ref < MIN_IMAGES_UNBIASED)


def metric_key(name, n, n_ref=None):
    """Result key of a metric on n samples and n_ref reference images: the bare name with >= 2,048 on
    both sides, else labelled with the size: fid-512 (small samples, or both sides 512), and
    fid-50000-ref1000 / fid-512-ref1000 when the reference side is small and of another size."""
    if not is_small(n, n_ref):
        return name
    if n_ref is None or n_ref == n or (n < MIN_IMAGES_UNBIASED <= n_ref):
        return f"{name}-{n}"
    return f"{name}-{n}-ref{n_ref}"


def print_protocol(protocol):
    """The protocol record, one `key: value` line each, above the table."""
    print("protocol")
    for k, v in protocol.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        v = str(v)
        print(f"  {k}: {v if len(v) <= 200 else v[:197] + '...'}")


# ----------------------------------------------------------------------------------------
# Modes: generative metrics, autoencoder metrics, spectra, benchmark
# ----------------------------------------------------------------------------------------

def _try_inception(args, device):
    """Inception network, or None (with a message) when weights are unavailable offline."""
    try:
        return load_inception(args.inception, device, getattr(args, "resize", "adm"))
    except RuntimeError as e:
        if args.require_inception:
            raise
        print(f"[evaluate] no FID: {e}", file=sys.stderr)
        return None


def _features_and_stats(model, images, args, device):
    f = extract_features(model, images, args.batch_size, args.workers, device)
    mu, sigma = compute_statistics(f["pool"])
    mu_s, sigma_s = compute_statistics(f["spatial"])
    return f, {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s,
               "pool": f["pool"], "num_images": f["pool"].shape[0], "resize": model.resize}


def _all_images(ds, limit=None):
    """Whole image dataset as one uint8 (N,H,W,3) array (for SWD)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    ims = [ds[i] for i in range(n)]
    if any(x.shape != ims[0].shape for x in ims):
        raise EvalError("SWD needs images of one size; the input mixes sizes")
    x = torch.stack(ims)
    if x.dtype != torch.uint8:
        x = (x * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _input_size(src):
    """Number of images behind an input: its images, else the statistics' num_images / pool rows."""
    if "images" in src:
        return len(src["images"])
    stats = src.get("stats", {})
    if "num_images" in stats:
        return int(stats["num_images"])
    return int(stats["pool"].shape[0]) if "pool" in stats else None


def check_sample_sizes(n, n_ref, allow_small, what="FID / sFID / precision-recall"):
    """Refuse metrics on fewer than 2,048 images on either side unless allow_small (ADM uses 50k / 10k)."""
    if is_small(n, n_ref) and not allow_small:
        ref = "unknown" if n_ref is None else n_ref
        raise EvalError(f"{what} on {n} samples and {ref} reference images: below {MIN_IMAGES_UNBIASED} "
                        f"images they are biased and not comparable to 50k-sample numbers; pass "
                        f"--allow-small to compute them anyway (labelled {metric_key('fid', n, n_ref)})")


def generative_protocol(model, samples, ref, n, n_ref, side):
    """The protocol record of a SAMPLES vs REFERENCE evaluation (goes into the JSON and on stdout)."""
    weights = getattr(model, "weights_path", None)
    return {
        "features": None if model is None else model.resize,       # None: no Inception (SWD only)
        "num_samples": n,
        "num_reference": n_ref,
        "samples_file": samples["path"],
        "samples_sha256": sha256_input(samples["path"]),
        "reference_file": ref["path"],
        "reference_sha256": sha256_input(ref["path"]),
        "inception_weights": weights,
        "inception_sha256": None if weights is None else sha256_file(weights),
        "is_split_size": IS_SPLIT_SIZE,
        "code_version": train.code_version(),
        "samples": side,                                             # sample.py's X.json, if present
    }


def open_generative_inputs(args):
    """SAMPLES (images) and REFERENCE (images or statistics, or --ref-dataset) as open_input dicts."""
    samples = open_input(args.samples)
    if "images" not in samples:
        raise EvalError(f"{args.samples}: SAMPLES must be images (folder or arr_0 .npz)")
    if args.ref_dataset:
        ref = {"images": build_eval_dataset(args.ref_dataset, args.ref_path, args.image_size),
               "path": f"{args.ref_dataset}:{args.ref_path}"}
    elif args.reference:
        ref = open_input(args.reference)
    else:
        raise EvalError("give REFERENCE or --ref-dataset/--ref-path")
    for src in (samples, ref):
        if "images" in src and len(src["images"]) < 2:
            raise EvalError(f"{src['path']}: need at least 2 images, got {len(src['images'])}")
    return samples, ref


def inception_metrics(model, samples, ref, n, n_ref, args, rank, device):
    """FID, sFID, IS and precision/recall of n SAMPLES vs n_ref REFERENCE images (keys labelled by metric_key);
    every rank extracts features, rank 0 computes the metrics (and saves --save-stats)."""
    check_sample_sizes(n, n_ref, args.allow_small)
    tag = ref.get("stats", {}).get("resize")
    if tag is not None and str(tag) != model.resize:
        raise EvalError(f"{ref['path']}: statistics computed with --resize {tag}, but the samples use "
                        f"--resize {model.resize}; FIDs across protocols are not comparable")
    key = functools.partial(metric_key, n=n, n_ref=n_ref)
    fs, s_stats = _features_and_stats(model, samples["images"], args, device)
    if "stats" in ref:
        r_stats = ref["stats"]
        r_pool = r_stats.get("pool")
        if r_pool is None and "images" in ref and not args.no_pr:
            r_pool = extract_features(model, ref["images"], args.batch_size,
                                      args.workers, device, keys=("pool",))["pool"]
    else:
        _, r_stats = _features_and_stats(model, ref["images"], args, device)
        r_pool = r_stats["pool"]
    if args.save_stats and rank == 0:
        save_stats(args.save_stats, r_stats)
        print(f"[evaluate] reference statistics -> {args.save_stats}")
    if rank != 0:
        return {}
    res = {key("fid"): frechet_distance(s_stats["mu"], s_stats["sigma"], r_stats["mu"], r_stats["sigma"])}
    if "mu_s" in r_stats:
        res[key("sfid")] = frechet_distance(s_stats["mu_s"], s_stats["sigma_s"], r_stats["mu_s"], r_stats["sigma_s"])
    res["inception_score"], res["inception_score_std"] = inception_score(fs["logits_unbiased"])
    if r_pool is not None and not args.no_pr:
        res[key("precision")], res[key("recall")] = precision_recall(r_pool, fs["pool"], k=3, device=device)
    return res


def run_generative(args, rank, device):
    """SAMPLES vs REFERENCE: FID, sFID, IS, precision/recall (Inception) and optional SWD."""
    samples, ref = open_generative_inputs(args)
    side = side_file(args.samples)
    n, n_ref = len(samples["images"]), _input_size(ref)
    if side is not None and side.get("num_samples") not in (None, n):
        warnings.warn(f"{args.samples} holds {n} images but its side file says num_samples="
                      f"{side['num_samples']}", stacklevel=2)
    model = _try_inception(args, device)
    results = {"samples": samples["path"], "reference": ref["path"], "num_samples": n}
    if model is not None:
        results.update(inception_metrics(model, samples, ref, n, n_ref, args, rank, device))
    if (args.swd or model is None) and "images" in ref and rank == 0:
        s = swd(_all_images(samples["images"], args.swd_images),
                _all_images(ref["images"], args.swd_images))
        results["swd_mean"] = s["mean"]
        results.update({f"swd_{r}px": v for r, v in s["levels"].items()})
    if rank == 0:
        results["protocol"] = generative_protocol(model, samples, ref, n, n_ref, side)
        report(results, args.json or default_json_path(args.samples))
    return results


@torch.no_grad()
def reconstruction_pairs(vae, x, ks):
    """x in [-1, 1] -> (posterior mean, images in [0, 1]): x, rec = decode(mean), and for each DSM k
    x{k} = the low-passed image and d{k} = the decode of the low-passed latent (no mask: k = 0)."""
    mean, _ = vae.encode(x)
    pairs = {"x": _from_signed(x), "rec": _from_signed(vae.decode(mean))}
    for k in ks:
        if k == 0:                                                         # dsm_mask(., ., 0) is the identity
            pairs["x0"], pairs["d0"] = pairs["x"], pairs["rec"]
            continue
        xm, zm = sm.dsm_mask(x, mean, k)
        pairs[f"x{k}"], pairs[f"d{k}"] = _from_signed(xm), _from_signed(vae.decode(zm))
    return mean, pairs


def _vae_and_loader(args, device):
    ckpt = train.load_checkpoint(args.vae, kind="vae", map_location="cpu")
    vae = train.build_vae_from_checkpoint(ckpt).to(device).eval()
    ds = build_eval_dataset(args.dataset, args.data_path, args.image_size)
    n = min(args.num_images, len(ds)) if args.num_images else len(ds)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    sub = torch.utils.data.Subset(ds, list(range(rank, n, world)))
    loader = torch.utils.data.DataLoader(sub, batch_size=args.batch_size,
                                         num_workers=args.workers)
    if rank == 0:
        from tqdm import tqdm
        loader = tqdm(loader, desc="vae", unit="batch", leave=False)
    return vae, loader, n


def _vae_protocol(args, n, model=None):
    """The protocol record of --vae / --spectrum runs."""
    weights = getattr(model, "weights_path", None)
    out = {"features": None if model is None else model.resize, "num_images": n,
           "dataset": args.dataset, "data_path": args.data_path, "image_size": args.image_size,
           "checkpoint": args.vae, "checkpoint_sha256": sha256_input(args.vae)}
    if model is not None:
        out.update(inception_weights=weights, inception_sha256=None if weights is None else sha256_file(weights))
    out["code_version"] = train.code_version()
    return out


@torch.no_grad()
def run_vae(args, rank, world, device):
    """Reconstruction metrics (rFID, PSNR, SSIM, LPIPS) and the DSM check of a VAE."""
    vae, loader, n = _vae_and_loader(args, device)
    model = _try_inception(args, device)
    if model is not None:
        check_sample_sizes(n, n, args.allow_small, "rFID")
    lpips = None
    try:
        lpips = sm.load_lpips(args.lpips).to(device).eval()
    except Exception as e:                                   # offline: no LPIPS weights
        print(f"[evaluate] no LPIPS: {e}", file=sys.stderr)
    ks = [0, 4, 8, 10, 12]
    acc = {"psnr": [], "ssim": [], "lpips": []}
    acc.update({f"dsm{k}_psnr": [] for k in ks})
    feats = {n: [] for n in ["x", "rec"] + [f"x{k}" for k in ks] + [f"d{k}" for k in ks]}
    for x in loader:
        _, pairs = reconstruction_pairs(vae, x.to(device) * 2 - 1, ks)   # loader gives [0, 1]
        acc["psnr"].append(psnr(pairs["x"], pairs["rec"]).cpu())
        acc["ssim"].append(ssim(pairs["x"], pairs["rec"]).cpu())
        if lpips is not None:
            acc["lpips"].append(lpips(pairs["x"] * 2 - 1, pairs["rec"] * 2 - 1).flatten().cpu())
        for k in ks:
            acc[f"dsm{k}_psnr"].append(psnr(pairs[f"x{k}"], pairs[f"d{k}"]).cpu())
        if model is not None:
            for n, v in pairs.items():
                feats[n].append(model(v)["pool"].cpu().numpy())
    acc = _gather({k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in acc.items()},
                  world)
    feats = _gather({n: np.concatenate(v) if v else np.zeros((0, 2048), np.float32)
                     for n, v in feats.items()}, world)
    if rank != 0:
        return None
    res = {"vae": args.vae, "num_images": int(len(acc["psnr"]))}
    res.update({k: float(np.mean(v)) for k, v in acc.items() if len(v)})
    if model is not None:
        fid = lambda a, b: frechet_distance(*compute_statistics(feats[a]),   # noqa: E731
                                            *compute_statistics(feats[b]))
        key = functools.partial(metric_key, n=res["num_images"])
        res[key("rfid")] = fid("x", "rec")
        for k in ks:
            res[key(f"dsm{k}_rfid")] = fid(f"x{k}", f"d{k}")
    res["protocol"] = _vae_protocol(args, res["num_images"], model)
    out = args.json or default_json_path(args.vae)
    report(res, out)
    return res


@torch.no_grad()
def run_spectrum(args, rank, world, device):
    """Radial spectra (16 bins) of images, latents and the δ target; KL; directional energy."""
    vae, loader, _ = _vae_and_loader(args, device)
    delta = float(getattr(vae, "esm_delta", 1.0))
    blur = float(getattr(vae, "esm_blur", 1.2))
    prof = {"target": [], "latent": [], "image": [], "dse": []}
    for x in loader:
        x = x.to(device) * 2 - 1                             # (B,3,H,W) in [-1,1]
        z, _ = vae.encode(x)                                 # posterior mean (B,C,h,w)
        st, sl, si = sm.spectrum_profiles(x, z, delta=delta, n_bins=args.n_bins,
                                          blur_sigma=blur)
        tokens = z.flatten(2).transpose(1, 2)                # (B, h*w, C)
        dse = sm.directional_spectral_energy(tokens, grid=tuple(z.shape[-2:]), reduction="none")
        for k, v in zip(("target", "latent", "image", "dse"), (st, sl, si, dse)):
            prof[k].append(v.float().cpu())
    prof = _gather({k: torch.cat(v).numpy() for k, v in prof.items()}, world)
    if rank != 0:
        return None
    mean = {k: v.mean(0) for k, v in prof.items() if k != "dse"}
    t, lat = (torch.as_tensor(prof[k], dtype=torch.float64) for k in ("target", "latent"))
    # KL(target || latent) of the per-image normalised spectra, as sm.esm_loss
    kl = (t * (torch.log(t + 1e-8) - torch.log(lat + 1e-8))).sum(-1).mean().item()
    res = {"vae": args.vae, "delta": delta, "n_bins": args.n_bins,
           "num_images": int(prof["image"].shape[0]),
           "kl_target_latent": kl, "spectra": mean,
           "directional_spectral_energy": float(prof["dse"].mean())}
    res["protocol"] = _vae_protocol(args, res["num_images"])
    out = args.json or default_json_path(args.vae, ".spectrum.json")
    report(res, out, "spectrum")
    png = str(Path(out).with_suffix(".png"))
    train.plot_spectra(dict(image=mean["image"], latent=mean["latent"], target=mean["target"], kl=kl), png, delta)
    print(f"[evaluate] wrote {png}")
    return res


def run_bench(args, device):
    """Feature-extraction images/s: this module vs pytorch-fid (same random weights)."""
    torch.manual_seed(0)
    n, res = args.bench_images, args.bench_size
    x8 = torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8)
    state = random_inception_state_dict(0)
    ours = load_inception(state, device, args.resize)
    rows = {}

    fns = {"sm evaluate.py": ours}
    try:
        from unittest import mock
        from pytorch_fid import inception as pfi
        with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
            ref = pfi.InceptionV3([3]).eval().to(device)
        fns["pytorch-fid"] = lambda b: ref(b.float() / 255.0)
    except ImportError:
        print("[bench] pytorch-fid not installed; only our numbers", file=sys.stderr)

    def timed(fn):
        t = time.perf_counter()
        for i in range(0, n, args.batch_size):
            fn(x8[i:i + args.batch_size].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    with torch.no_grad():
        for fn in fns.values():
            fn(x8[: min(2, n)].to(device))                  # warm-up
        for _ in range(args.bench_repeats):                 # interleaved, best of repeats
            for name, fn in fns.items():
                rows[name] = max(rows.get(name, 0.0), timed(fn))
    cpu = _cpu_name()
    print(f"device: {device} ({cpu}), threads={torch.get_num_threads()}, "
          f"images={n} at {res}px, batch={args.batch_size}")
    for k, v in rows.items():
        print(f"{k:<16} {v:8.2f} images/s")
    if len(rows) == 2:
        print(f"speed ratio (ours / pytorch-fid): {rows['sm evaluate.py'] / rows['pytorch-fid']:.2f}x")
    return rows


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


# ----------------------------------------------------------------------------------------
# Diffusability probe (train.py --stage probe): decoder-free and decoder-cancelling distances
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def flow_val_loss(model, z, y=None, seed=1234, batch=64):
    """Flow-matching MSE of `model` on normalised latents z (N, C, h, w) at a fixed stratified t grid and fixed
    noise (both from `seed`), so that checkpoints and latent spaces are scored on the same draws."""
    n = len(z)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(z.shape, generator=g).to(z.device)
    t = ((torch.arange(n) + 0.5) / n)[torch.randperm(n, generator=g)].to(z.device)   # stratified t grid
    losses = [sm.flow_loss(model, z[i:i + batch], None if y is None else y[i:i + batch], t=t[i:i + batch],
                           noise=noise[i:i + batch])["mse"] for i in range(0, n, batch)]
    return float(torch.cat(losses).mean())


def downsample2(x):
    """x2 down: bilinear, align_corners=False, no antialiasing (F.interpolate, as sm.eq_vae_scale, EQ-VAE's
    convention). At exactly half size it samples midway between pixel pairs, i.e. it is 2x2 average pooling."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise EvalError(f"x2 downsampling needs even sizes, got {tuple(x.shape[-2:])}")
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)


@torch.no_grad()
def equivariance_error(vae, x, batch=64):
    """EQ-VAE's scale-equivariance error mean |D(down2(E(x))) - down2(x)| over pixels and images, with the
    posterior mean, images in [-1, 1] (N, 3, H, W) and the decode clamped to [-1, 1] like reconstructions."""
    err = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        mean, _ = vae.encode(xb)
        err.append((vae.decode(downsample2(mean)).clamp(-1, 1) - downsample2(xb)).abs().flatten(1).mean(1))
    return float(torch.cat(err).mean())


def latent_features(z, dims=64, seed=0):
    """Decoder-free per-image features of normalised latents (N, C, h, w) -> (N, min(D, dims)) float64: the
    flat latents (D = C*h*w) projected on `dims` fixed orthonormal directions (QR of a Gaussian from `seed`,
    the same for every run) when D > dims, so their covariance stays well conditioned with a few hundred images
    (an orthonormal projection keeps isotropic noise isotropic); the flat latents themselves when D <= dims."""
    flat = z.detach().reshape(len(z), -1).double().cpu()
    D = flat.shape[1]
    if D <= dims:
        return flat.numpy()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, dims, generator=g, dtype=torch.float64))     # (D, dims) orthonormal
    return (flat @ q).numpy()


def latent_fd(a, b):
    """Fréchet distance between the latent_features of two sets of normalised latents."""
    with warnings.catch_warnings():                        # small sets by design: compared with their floor
        warnings.simplefilter("ignore")
        return frechet_distance(*compute_statistics(latent_features(a)), *compute_statistics(latent_features(b)))


@torch.no_grad()
def generation_gap(sample_latents, real_latents, decode, batch=64, seed=0):
    """Distance of generated to real latents with decoder blur cancelled, relative to the measurement's floor.

    real_latents (2m, C, h, w) are split into halves A and B; the first m samples S are compared with A and
    B with A, on the same footing (m images each, same SWD seed): gap_swd = SWD(D(S), D(A)) and floor_swd =
    SWD(D(B), D(A)) on Laplacian-pyramid patches of images decoded by the same decode (normalised latents ->
    [-1, 1]), and latent_fd / latent_fd_floor, the decoder-free Fréchet distances of latent_features.
    A ratio near 1 means the samples are as close to A as other real images are.
    """
    m = len(real_latents) // 2
    if m < 2 or len(sample_latents) < m:
        raise EvalError(f"generation gap needs 2m >= 4 real latents and m samples, got {len(real_latents)} real "
                        f"and {len(sample_latents)} samples")
    if sample_latents.shape[1:] != real_latents.shape[1:]:
        raise EvalError(f"samples {tuple(sample_latents.shape[1:])} and real latents "
                        f"{tuple(real_latents.shape[1:])} differ in shape")
    S, A, B = sample_latents[:m], real_latents[:m], real_latents[m:2 * m]
    pics = lambda z: np.concatenate([train.to_uint8(decode(z[i:i + batch])) for i in range(0, m, batch)])  # noqa
    dA = pics(A)
    res = dict(gap_swd=swd(pics(S), dA, seed=seed)["mean"], floor_swd=swd(pics(B), dA, seed=seed)["mean"],
               latent_fd=latent_fd(S, A), latent_fd_floor=latent_fd(B, A), num_images=m)
    res["gap_ratio"] = res["gap_swd"] / max(res["floor_swd"], 1e-12)
    res["latent_fd_ratio"] = res["latent_fd"] / max(res["latent_fd_floor"], 1e-12)
    return res


# ----------------------------------------------------------------------------------------
# The quickstart's metrics.json (train.py --stage all)
# ----------------------------------------------------------------------------------------

def spectrum_kl(vae, x, mean):
    """The ESM objective at evaluation: KL(delta target of x || spectrum of the posterior means), with the
    autoencoder's own delta and blur (the pipeline's metrics.json and the probe report the same number)."""
    return float(sm.esm_loss(x, mean, delta=float(getattr(vae, "esm_delta", 1.0)), blur_sigma=vae.esm_blur))


@torch.no_grad()
def reconstruction_metrics(vae, x, ks=(8, 10, 12)):
    """PSNR / SSIM of the reconstructions of x (n, 3, H, W) in [-1, 1], KL(delta target || latent spectrum) and
    the PSNR of decoded DSM low-passed latents (k in ks) -> (metrics, posterior means, reconstructions in [0, 1])."""
    means, recs, dsm = [], [], {k: [] for k in ks}
    for i in range(0, len(x), 64):
        mean, pairs = reconstruction_pairs(vae, x[i:i + 64], ks)
        means.append(mean)
        recs.append(pairs["rec"])
        for k in ks:
            dsm[k].append(psnr(pairs[f"x{k}"], pairs[f"d{k}"]))
    mean, rec = torch.cat(means), torch.cat(recs)                          # (n, C, h, w), (n, 3, H, W)
    res = {"psnr": float(psnr(_from_signed(x), rec).mean()), "ssim": float(ssim(_from_signed(x), rec).mean())}
    res["spectrum_kl"] = spectrum_kl(vae, x, mean)
    res.update({f"dsm{k}_psnr": float(torch.cat(v).mean()) for k, v in dsm.items()})
    res["dsm_psnr"] = float(np.mean([res[f"dsm{k}_psnr"] for k in ks]))
    return res, mean, rec


@torch.no_grad()
def small_fids(inception, samples, real, rec, device):
    """FID of samples and rFID of reconstructions rec ([0, 1]) against m real images (uint8 (m, H, W, 3)),
    labelled with their size (`fid-<m>`, see metric_key) as with --allow-small."""
    m = len(real)
    feats = functools.partial(extract_features, inception, device=device, progress=False, shard=False,
                              keys=("pool",))
    fs, fr = feats(ArrayDataset(samples))["pool"], feats(ArrayDataset(real))["pool"]
    fx = feats(ArrayDataset(train.to_uint8(rec * 2 - 1)))["pool"]
    with warnings.catch_warnings():                        # the label says it is a small-sample FID
        warnings.simplefilter("ignore")
        s_fs, s_fr, s_fx = compute_statistics(fs), compute_statistics(fr), compute_statistics(fx)
    return {metric_key("fid", m, m): frechet_distance(*s_fs, *s_fr),
            metric_key("rfid", m, m): frechet_distance(*s_fx, *s_fr)}


@torch.no_grad()
def pipeline_metrics(args, samples_npz, device, n_val=None):
    """Metrics of one quickstart run: reconstructions, latent spectrum, DSM, diffusion loss, samples.

    All on held-out images (the dataset drawn with another seed): PSNR / SSIM of reconstructions,
    KL(delta target || latent spectrum), PSNR of decoded DSM low-passed latents against the low-passed
    images (k = 8, 10, 12), the EMA DiT's flow-matching loss on a fixed t grid and noise, and SWD of the
    samples against real images; with the Inception weights also FID and rFID, labelled with their size
    below 2,048 images (`fid-512`, see metric_key), and a `protocol` record.
    """
    n = n_val or min(args.num_fid_samples, 1024)
    vae = train.build_vae_from_checkpoint(train.load_checkpoint(os.path.join(args.out, "vae.pt"), "vae")).to(device)
    val = train.build_dataset(args.dataset, args.data_path, args.image_size, train=False, seed=args.seed,
                              length=args.dataset_size)
    n = min(n, len(val))
    x = torch.stack([val[i][0] for i in range(n)]).to(device)               # (n, 3, H, W) in [-1, 1]
    y = torch.tensor([val[i][1] for i in range(n)], device=device)
    res, mean, rec = reconstruction_metrics(vae, x)
    # diffusion: validation flow-matching loss of the EMA model on normalised latents
    model = train.ema_dit(train.load_checkpoint(os.path.join(args.out, "dit.pt"), "dit"), device)
    res["dit_val_loss"] = flow_val_loss(model, vae.normalize(mean), None if model.num_classes == 0 else y)
    # samples against real images
    samples = np.load(samples_npz)["arr_0"]
    real = train.to_uint8(x)
    m = min(len(samples), len(real))
    res["swd"] = swd(samples[:m], real[:m])["mean"]
    res["num_eval_images"] = m
    inception = _try_inception(argparse.Namespace(inception=None, require_inception=False), device)
    if inception is not None:
        res.update(small_fids(inception, samples[:m], real[:m], rec, device))
    res["protocol"] = {"features": None if inception is None else inception.resize, "num_samples": m,
                       "samples_file": samples_npz, "samples_sha256": sha256_file(samples_npz),
                       "reference": f"{args.dataset} held-out images (seed {args.seed})",
                       "code_version": train.code_version(), "samples": side_file(samples_npz)}
    return res


# ----------------------------------------------------------------------------------------
# The diffusability probe and the preset comparison (train.py --stage probe / compare)
# ----------------------------------------------------------------------------------------
# Issue 12: how easy a latent space is to *generate*, with decoder blur cancelled. One fixed small DiT budget
# on the latents of a fixed image set; samples are compared with decoded real latents through the same decoder.
# The budgets' flag defaults are train.PROBE_BUDGETS (beside the other defaults, for --budget); these are fixed.

PROBE_DATA_SEED = 0          # the probe's images: the same for every seed and autoencoder
PROBE_VAL_POINTS = 5         # validation-loss checkpoints along the DiT budget
PROBE_METRICS = (("gap_ratio", "gap / floor"), ("gap_swd", "gap SWD"), ("floor_swd", "floor SWD"),
                 ("latent_fd_ratio", "latent FD / floor"), ("latent_fd", "latent FD"), ("psnr", "PSNR"),
                 ("ssim", "SSIM"), ("spectrum_kl", "spectrum KL"), ("equivariance_error", "EQ error"),
                 ("dit_val_loss", "DiT val loss"))


def probe_settings(args):
    """A copy of args with the --budget's numbers (explicit flags win) and the probe's fixed DiT recipe:
    unconditional, no REPA, no flips, no label dropout, so only the latent space differs between runs."""
    a = argparse.Namespace(**vars(args))
    for k, v in train.PROBE_BUDGETS[args.budget].items():
        if k not in args.explicit or getattr(args, k) is None:
            setattr(a, k, v)
    a.unconditional, a.repa_encoder, a.repa_lambda, a.hflip, a.class_dropout = True, "none", 0.0, False, 0.0
    a.compile, a.keep_every, a.ckpt_every, a.vis_every, a.resume = False, 0, a.dit_steps, a.dit_steps, False
    a.dataset_size = a.probe_images
    a.subset = None if a.dataset == "deadleaves" else (0, a.probe_images)   # image files: a seeded subset
    a.explicit = sorted(set(args.explicit) | {"dataset_size"})          # load_stage1_vae keeps the probe's count
    return a


def probe_panel(real, rec, samples, curves, path):
    """One PNG: rows of real images, reconstructions and decoded samples (uint8 (n, H, W, 3)), then the curves."""
    from PIL import Image
    n = min(8, len(real), len(rec), len(samples))
    base = os.path.splitext(path)[0]
    train.save_grid(np.concatenate([real[:n], rec[:n], samples[:n]]), base + "-grid.png", n)
    train.plot_lines(curves, base + "-loss.png",
                     title="DiT flow loss: rows above are real / reconstructed / sampled",
                     xlabel="training (start -> end of the budget)", ylabel="MSE")
    grid, plot = Image.open(base + "-grid.png"), Image.open(base + "-loss.png")
    scale = max(1, plot.width // (2 * grid.width))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    panel = Image.new("RGB", (max(grid.width, plot.width), grid.height + plot.height), "white")
    panel.paste(grid, (0, 0))
    panel.paste(plot, (0, grid.height))
    panel.save(path)
    for f in (base + "-grid.png", base + "-loss.png"):
        os.remove(f)


@torch.no_grad()
def probe_heldout(vae, a, device):
    """Held-out images (n, 3, H, W) in [-1, 1], disjoint from the probe's training images (dead leaves: another
    seed; image files: the next positions of the same permutation), and their normalised posterior-mean latents."""
    held_out = None if a.dataset == "deadleaves" else (a.probe_images, a.probe_eval)
    val = train.build_dataset(a.dataset, a.data_path, a.image_size, train=held_out is not None,
                              seed=PROBE_DATA_SEED, length=a.probe_eval, subset=held_out)
    if len(val) < a.probe_eval:
        raise ValueError(f"--probe-eval {a.probe_eval} needs that many held-out images; the dataset has {len(val)}")
    x = torch.stack([val[i][0] for i in range(a.probe_eval)]).to(device)
    z = torch.cat([vae.normalize(vae.encode(x[i:i + 64])[0]) for i in range(0, len(x), 64)])
    return x, z


def probe_dit_budget(a, d, z_val):
    """Train the probe's DiT budget in PROBE_VAL_POINTS pieces, each followed (on rank 0) by the EMA model's
    validation loss on z_val into val_curve.json; a resumed run is exactly an uninterrupted one.
    -> (the final 'dit' checkpoint, {str(step): validation loss})."""
    curve_path, dit_path = os.path.join(a.out, "val_curve.json"), os.path.join(a.out, "dit.pt")
    curve = {}
    if os.path.exists(curve_path):
        with open(curve_path) as f:
            curve = json.load(f)
    for b in [round(a.dit_steps * (i + 1) / PROBE_VAL_POINTS) for i in range(PROBE_VAL_POINTS)]:
        done = train.load_checkpoint(dit_path, "dit")["step"] if os.path.exists(dit_path) else 0
        if done < b:
            a.max_steps = b - done
            train.train_dit(a, d, quickstart=True)
        ckpt = train.load_checkpoint(dit_path, "dit")
        if str(ckpt["step"]) not in curve and d.main:
            curve[str(ckpt["step"])] = flow_val_loss(train.ema_dit(ckpt, d.device), z_val)
            train.write_json(curve, curve_path)
    return ckpt, curve


def probe_metrics(vae, ckpt, curve, x, z_val, a, device):
    """Metrics of the finished probe: the generation gap of EMA samples (seed a.seed), reconstruction, spectrum
    and equivariance of the autoencoder on the held-out images x / z_val, and the loss curves.
    -> (metrics, reconstructions in [-1, 1], decoded samples[:8] in [-1, 1])."""
    ema = train.ema_dit(ckpt, device)
    meta = dict(latent_mean=vae.latent_mean.tolist(), latent_std=vae.latent_std.tolist())
    m = a.probe_eval // 2
    samples = torch.cat([train.sample_latents(ema, range(i, min(i + 64, m)), None, z_val.shape[1:], a.seed,
                                              device, steps=a.sample_steps)
                         for i in range(0, m, 64)])                                           # (m, C, h, w)
    decode = functools.partial(train.decode_latents, vae, meta=meta)
    res = generation_gap(samples, z_val, decode)
    with torch.no_grad():
        rec = torch.cat([decode(z_val[i:i + 64]) for i in range(0, len(z_val), 64)])          # [-1, 1]
        mean = vae.denormalize(z_val)
    unit = lambda v: (v + 1) / 2                                                               # noqa: E731
    res["psnr"] = float(psnr(unit(x), unit(rec)).mean())
    res["ssim"] = float(ssim(unit(x), unit(rec)).mean())
    res["spectrum_kl"] = spectrum_kl(vae, x, mean)
    res["equivariance_error"] = equivariance_error(vae, x)
    steps = sorted(int(k) for k in curve)
    res["val_curve"] = [[s_, curve[str(s_)]] for s_ in steps]
    res["dit_val_loss"] = curve[str(steps[-1])]
    res["train_curve"] = [[h["step"], h["mse"]] for h in ckpt["history"]]
    return res, rec, decode(samples[:8])


def probe_protocol(a, ckpt, z_val, source, t0):
    """The protocol record of a probe: its budget and recipe, images, autoencoder, metric definitions, machine."""
    return dict(
        budget=a.budget, dit_steps=a.dit_steps, dit_batch=a.dit_batch, dit_lr=a.dit_lr, ema=a.ema,
        model=a.model, dit_config=ckpt["dit_config"], weighting=a.weighting, sample_steps=a.sample_steps,
        sampler="ode", seed=a.seed, data_seed=PROBE_DATA_SEED, dataset=a.dataset, data_path=a.data_path,
        image_size=a.image_size, probe_images=a.probe_images, eval_images=a.probe_eval,
        eval_split="two halves of the held-out images (gap: samples vs half A; floor: half B vs half A)",
        normalisation="the autoencoder's stored latent_mean / latent_std", vae=source,
        latent_std_heldout=z_val.transpose(0, 1).flatten(1).std(1).tolist(),   # ~1 when the rule fits these images
        latent_features="flat normalised latents, fixed orthonormal projection to <= 64 dims (seed 0)",
        swd="evaluate.swd, 128 7x7 patches per image per Laplacian level, seed 0",
        equivariance="x2 bilinear (align_corners=False) = 2x2 average pooling, posterior mean, [-1, 1] pixels",
        code_version=train.code_version(), machine=_cpu_name(), torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"), minutes=(time.time() - t0) / 60)


def run_probe(args, d, folder=None):
    """The diffusability probe of one autoencoder (--vae-ckpt, default OUT/vae.pt, or --sd-vae): encode a fixed
    image set, train the fixed DiT budget on it with the seed (validation loss at PROBE_VAL_POINTS checkpoints),
    sample with the EMA model, and write probe.json (metrics + protocol) and probe.png. Resumes; skips a
    finished probe.json when called by --stage compare."""
    t0 = time.time()
    a = probe_settings(args)
    a.out = folder or args.probe_out or os.path.join(args.out, f"probe-seed{args.seed}")
    result_path = os.path.join(a.out, "probe.json")
    if os.path.exists(result_path):
        if folder is not None or args.resume:
            train.log(d, f"probe: {result_path} is finished, skipping")
            with open(result_path) as f:
                return json.load(f)
        raise FileExistsError(f"{result_path} exists: pass --resume to keep it or choose another --probe-out")
    if not (args.sd_vae or args.official_vae):
        a.vae_ckpt = os.path.abspath(args.vae_ckpt or os.path.join(args.out, "vae.pt"))
        if not os.path.exists(a.vae_ckpt):
            raise FileNotFoundError(f"no autoencoder checkpoint {a.vae_ckpt}: pass --vae-ckpt, --sd-vae or "
                                    "--official-vae")
    train.check_output_folder(a.out)
    vae, source = train.load_stage1_vae(a, d)              # also takes the dataset and image size of stage 1
    vae.eval()
    seed, a.seed = a.seed, PROBE_DATA_SEED                 # fixed images; the seed drives the DiT only
    train.encode_latents(a, d, quickstart=True)
    a.seed = seed
    x, z_val = probe_heldout(vae, a, d.device)             # (n, 3, H, W), (n, C, h, w)
    ckpt, curve = probe_dit_budget(a, d, z_val)
    if not d.main:
        d.barrier()
        return None
    res, rec, sample_pics = probe_metrics(vae, ckpt, curve, x, z_val, a, d.device)
    res["protocol"] = probe_protocol(a, ckpt, z_val, source, t0)
    train.write_json(res, result_path)
    train_mse = [v for _, v in res["train_curve"]] or [res["dit_val_loss"]]
    probe_panel(train.to_uint8(x[:8]), train.to_uint8(rec[:8]), train.to_uint8(sample_pics),
                {"train (batch)": (train_mse, (150, 150, 150)),
                 "validation (EMA)": ([v for _, v in res["val_curve"]], (220, 60, 30))},
                os.path.join(a.out, "probe.png"))
    train.log(d, "probe: " + ", ".join(f"{name} {res[k]:.4g}" for k, name in PROBE_METRICS) + f"  -> {result_path}")
    d.barrier()
    return res


def compare_table(runs):
    """runs {reg: {seed: probe result}} -> (markdown table of mean ± std (ddof 1) per metric, summary dict)."""
    summary = {}
    for reg, by_seed in runs.items():
        summary[reg] = {}
        for k, _ in PROBE_METRICS:
            v = np.array([r[k] for r in by_seed.values() if k in r], float)
            if len(v):
                summary[reg][k] = dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                                       n=len(v), values=v.tolist())
    cols = [(k, name) for k, name in PROBE_METRICS if any(k in s_ for s_ in summary.values())]
    lines = ["| reg | " + " | ".join(name for _, name in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for reg, s_ in summary.items():
        lines.append(f"| {reg} | " + " | ".join(f"{s_[k]['mean']:.4g} ± {s_[k]['std']:.2g}" if k in s_ else "-"
                                                 for k, _ in cols) + " |")
    return "\n".join(lines), summary


def run_compare(args, d):
    """Every --reg preset x --seeds: stage 1 at the --budget's steps, then the probe; one table of mean ± std.
    Each (reg, seed) has its own folder OUT/<reg>-seed<seed>, so an interrupted comparison resumes."""
    root, runs, t0 = args.out, {}, time.time()
    for reg in train.REG_PRESETS:
        runs[reg] = {}
        for seed in args.seeds:
            a = argparse.Namespace(**vars(args))
            for k, v in train.REG_PRESETS[reg].items():
                setattr(a, k, v)
            a.reg, a.seed, a.out = reg, seed, os.path.join(root, f"{reg.replace('+', '_')}-seed{seed}")
            if "vae_steps" not in args.explicit:
                a.vae_steps = train.PROBE_BUDGETS[args.budget]["vae_steps"]
            a.vae_ckpt, a.sd_vae, a.official_vae, a.probe_out = None, None, None, None
            train.train_vae(a, d, quickstart=True)
            runs[reg][seed] = run_probe(a, d, folder=os.path.join(a.out, "probe"))
    if d.main:
        table, summary = compare_table(runs)
        p = runs[next(iter(runs))][args.seeds[0]]["protocol"]
        head = (f"`python train.py --stage compare --budget {args.budget} --seeds {' '.join(map(str, args.seeds))}`"
                f", {p['date']}, {p['machine']}, {(time.time() - t0) / 60:.0f} min this invocation; mean ± std over "
                f"{len(args.seeds)} seeds")
        with open(os.path.join(root, "compare.md"), "w") as f:
            f.write(head + "\n\n" + table + "\n")
        train.write_json(dict(summary=summary, budget=train.PROBE_BUDGETS[args.budget], seeds=list(args.seeds),
                              protocol=p, runs={r: {str(s_): v for s_, v in v_.items()} for r, v_ in runs.items()}),
                         os.path.join(root, "compare.json"))
        print(head + "\n\n" + table)
    d.barrier()
    return runs


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="?", help="folder / arr_0 .npz of generated images")
    p.add_argument("reference", nargs="?", help="folder / arr_0 .npz / mu,sigma .npz")
    p.add_argument("--ref-dataset", help="reference dataset name (imagenet, folder, ...)")
    p.add_argument("--ref-path", help="reference dataset root")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--save-stats", help="write reference statistics to this .npz")
    p.add_argument("--json", help="output JSON path (default: next to SAMPLES / the --vae checkpoint, "
                                  "X.npz -> X.metrics.json)")
    p.add_argument("--inception", help=f"path to {FID_WEIGHTS_NAME}")
    p.add_argument("--resize", choices=RESIZE_PROTOCOLS, default="adm",
                   help="Inception input protocol: ADM's TF evaluator (default) or pytorch-fid's")
    p.add_argument("--allow-small", action="store_true",
                   help=f"compute FID / sFID / P-R / rFID below {MIN_IMAGES_UNBIASED} images (labelled fid-N)")
    p.add_argument("--require-inception", action="store_true",
                   help="fail instead of skipping FID when weights are missing")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    p.add_argument("--swd", action="store_true", help="also compute SWD (always when no FID)")
    p.add_argument("--swd-images", type=int, default=None, help="max images for SWD")
    p.add_argument("--vae", help="VAE checkpoint: reconstruction metrics / --spectrum")
    p.add_argument("--dataset", help="dataset name for --vae / --spectrum")
    p.add_argument("--data-path", help="dataset root for --vae / --spectrum")
    p.add_argument("--num-images", type=int, default=10000)
    p.add_argument("--lpips", help="LPIPS weights path (sm.load_lpips)")
    p.add_argument("--spectrum", action="store_true", help="spectrum diagnostics of --vae")
    p.add_argument("--n-bins", type=int, default=16)
    p.add_argument("--bench", action="store_true", help="feature-extraction benchmark")
    p.add_argument("--bench-images", type=int, default=32)
    p.add_argument("--bench-size", type=int, default=256)
    p.add_argument("--bench-repeats", type=int, default=3)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    rank, world, device = dist_setup()
    try:
        if args.bench:
            return run_bench(args, device)
        if args.spectrum:
            if not (args.vae and args.dataset):
                raise EvalError("--spectrum needs --vae CKPT and --dataset NAME")
            return run_spectrum(args, rank, world, device)
        if args.vae:
            if not args.dataset:
                raise EvalError("--vae needs --dataset NAME (and --data-path)")
            return run_vae(args, rank, world, device)
        if not args.samples:
            build_parser().error("SAMPLES is required")
        return run_generative(args, rank, device)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    train.cli(main, "evaluate.py")
