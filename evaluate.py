"""Evaluation for Spectrum Matching: Inception FID / sFID / IS / precision-recall, SWD, autoencoder metrics
(rFID, PSNR, SSIM, LPIPS, DSM check, spectra), the metrics of a training run and the diffusability probe.

  python evaluate.py                             # the run runs/deadleaves (or --run OUT) -> OUT/metrics.json
  python evaluate.py SAMPLES REFERENCE           # folders, arr_0 .npz, mu/sigma .npz (--save-stats caches them)
  python evaluate.py SAMPLES --dataset imagenet --data-path DIR     # reference: held-out images of a dataset
  python evaluate.py --vae CKPT --dataset imagenet --data-path DIR [--rfid-protocol ours|authors]
  python evaluate.py --probe VAE_CKPT [--seed S] [--budget short|long] [--control scramble]
  python evaluate.py --compare OUT [--seeds 0 1 2] [--budget short|long]
  torchrun --nproc_per_node=8 evaluate.py SAMPLES REFERENCE         # DDP feature extraction

Results: stdout (the protocol record, then the table) and a JSON next to the input (X.npz -> X.metrics.json).

Inception: pytorch-fid's FID network (TF 2015-12-05 graph), input as ADM's evaluator (--resize adm, default) or
pytorch-fid. FD-DINOv2 beside FID when DINOv2 ViT-L/14 loads (torch.hub cache or --dinov2 CLONE): EDM2's protocol.
FID / sFID / P-R / rFID are refused below 2,048 images on either side unless --allow-small, then labelled with
their size (`fid-512`). The protocols in full: README.md, Evaluation.
"""

import argparse
import functools
import glob
import hashlib
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import sample
import sm
import train

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
RESIZE_PROTOCOLS = ("adm", "pytorch-fid")
MIN_IMAGES_UNBIASED = 2048                                  # below: FID & co. refused, or labelled with the size
IS_SPLIT_SIZE = 5000                                        # ADM's compute_inception_score(split_size=5000)
DSM_KS = (8, 10, 12)                                        # the DSM k checked: the nonzero k training draws
RUN_EVAL_IMAGES = 1024                                      # held-out images of a run's metrics.json
DINOV2_PROTOCOL = ("EDM2's: dinov2_vitl14 (torch.hub) output, the normalised CLS token, of bicubic antialiased "
                   "224 x 224 resizes / 255, ImageNet mean / std; mean, covariance (N - 1)")
RFID_PROTOCOLS = {  # --vae --rfid-protocol: the reconstructions measured, JPEG quality of the files, Inception input
    "ours": dict(posterior="mean", jpeg_quality=0, resize=None, num_images=10_000),
    # the authors' stage1_vae_evaluation.py: JPEG-75 crops, a posterior sample decoded, both sides written as .jpg
    # (Pillow's quality 75) and read by pytorch-fid
    "authors": dict(posterior="sample", jpeg_quality=75, resize="pytorch-fid", num_images=50_000),
}


# ----------------------------------------------------------------------------------------
# Feature networks: FID Inception (TF-compatible, torchvision layout), DINOv2 ViT-L/14 (FD-DINOv2, Stein et al. 2023)
# ----------------------------------------------------------------------------------------

def resize_bilinear_tf1(x, size=(299, 299)):
    """TF1 `tf.image.resize_bilinear` (align_corners=False, no half-pixel centres) of float (N, C, H, W)."""
    # src = dst * in / out (the scale rounded to float32 like TF's kernel), then lerp along W and along H in TF's
    # order: top = tl + (tr - tl) dx, bottom = bl + (br - bl) dx, out = top + (bottom - top) dy
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


class FIDInception(nn.Module):
    """FID Inception-v3, one input protocol: uint8 (N, 3, H, W) (or float in [0, 1]) -> pool, logits, spatial..."""

    def __init__(self, resize="adm"):
        super().__init__()
        if resize not in RESIZE_PROTOCOLS:
            raise ValueError(f"resize must be one of {RESIZE_PROTOCOLS}, got {resize!r}")
        self.resize, self.weights_path = resize, None      # weights_path: for the protocol record
        from torchvision.models import inception as tvi    # torchvision's blocks with TF's pooling

        pool_avg = functools.partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        pool_max = functools.partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)

        class A(tvi.InceptionA):
            def _forward(self, x):
                b5 = self.branch5x5_2(self.branch5x5_1(x))
                b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
                return [self.branch1x1(x), b5, b3, self.branch_pool(pool_avg(x))]

        class C(tvi.InceptionC):
            def _forward(self, x):
                b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
                d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
                d = self.branch7x7dbl_5(self.branch7x7dbl_4(d))
                return [self.branch1x1(x), b7, d, self.branch_pool(pool_avg(x))]

        class E(tvi.InceptionE):                            # self.pool: average (7b) or max (7c), set below
            def _forward(self, x):
                a = self.branch3x3_1(x)
                b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
                d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
                bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
                return [self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))]

        net = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
        net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
        net.Mixed_7b, net.Mixed_7c = E(1280), E(2048)
        net.Mixed_7b.pool, net.Mixed_7c.pool = pool_avg, pool_max   # TF's last block max-pools its pool branch
        self.net = net

    @torch.no_grad()
    def forward(self, x):
        if self.resize == "adm":                            # ADM: float pixels, TF1 resize, (x - 128) / 128
            x = x.float() if x.dtype == torch.uint8 else x.float() * 255.0
            x = (resize_bilinear_tf1(x, (299, 299)) - 128.0) / 128.0
        else:                                               # pytorch-fid: [0, 1], torch resize, 2x - 1
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            x = 2.0 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1.0
        x = x.contiguous(memory_format=torch.channels_last)  # (N, 3, 299, 299); ~1.5x faster convs on CPU
        n = self.net
        for m in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1, n.Conv2d_4a_3x3,
                  n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d,
                  n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            if m is n.Mixed_6d:                             # ADM's "mixed_6/conv": 7 channels of its 1x1 branch
                spatial = n.Mixed_6d.branch1x1(x)[:, :7]    # (N, 7, 17, 17)
            x = m(x)
        pool = x.mean(dim=(2, 3))                           # (N, 2048)
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)    # (N, 17*17*7) in ADM's NHWC order
        unbiased = pool @ n.fc.weight.T                     # (N, 1008) ADM: softmax(pool_3 @ W), no bias
        return {"pool": pool, "logits": unbiased + n.fc.bias, "logits_unbiased": unbiased, "spatial": spatial}


def load_inception(path_or_state_dict=None, device="cpu", resize="adm"):
    """FID Inception in eval mode from a .pth path, a state dict, or the hub cache / URL."""
    model = FIDInception(resize)                            # checks resize before any download
    if isinstance(path_or_state_dict, dict):
        state = path_or_state_dict
    else:
        model.weights_path = sm.fetch_weights(FID_WEIGHTS_URL, path_or_state_dict, "FID Inception",
                                              flag="--inception PATH")
        state = torch.load(model.weights_path, map_location="cpu", weights_only=True)
    model.net.load_state_dict(state)
    return model.eval().requires_grad_(False).to(device).to(memory_format=torch.channels_last)


def optional(what, path, load, *args):
    """load(*args), or None (said on stderr) when no path is given and no weights can be fetched."""
    try:
        return load(*args)
    except (FileNotFoundError, RuntimeError) as e:         # not here or no download; a given file that won't load
        if path is not None:
            raise ValueError(f"cannot load {what} from {path}: {e}") from None
        print(f"[evaluate] no {what}: {e}", file=sys.stderr)
        return None


def try_inception(path, resize, device):
    """The Inception network, or None (said on stderr) when unavailable."""
    return optional("Inception metrics", path, load_inception, path, device, resize)


def load_lpips(path, vgg_path, device):
    """sm.load_lpips of --lpips PATH and --vgg PATH, each else from the hub cache / URL (offline: naming its flag)."""
    heads = sm.fetch_weights(sm.LPIPS_URL, path, "LPIPS v0.1 linear-head", "lpips_v0.1_vgg.pth", "--lpips PATH")
    vgg = sm.fetch_weights(sm.VGG16_URL, vgg_path, "VGG16", flag="--vgg PATH")
    return sm.load_lpips(heads, vgg).to(device).eval()


def dinov2_preprocess(batch):
    """The DINOv2 passes' collate: uint8 (3, H, W) images -> float32 (N, 3, 224, 224), EDM2's DINOv2Detector input
    (resize_mode 'torch'): bicubic antialiased resize of the 0..255 values to 224 x 224, / 255, ImageNet mean / std."""
    x = F.interpolate(collate_images(batch).to(torch.float32), size=(224, 224), mode="bicubic", antialias=True) / 255
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in (sm.IMAGENET_MEAN, sm.IMAGENET_STD))
    return (x - mean) / std


def try_dinov2(path, device):
    """DINOv2 ViT-L/14 from torch.hub as it is (path: a local clone), or None (said on stderr) when unavailable."""
    return optional("FD-DINOv2", path, sm.load_dinov2, "dinov2_vitl14", path, device, None)


# ----------------------------------------------------------------------------------------
# Inputs (image folders, ADM .npz, statistics .npz, datasets), features, FID, IS, precision / recall
# ----------------------------------------------------------------------------------------

class Images(torch.utils.data.Dataset):
    """n images as uint8 (3, H, W) tensors from get(i) -> uint8 (H, W, 3) array."""

    def __init__(self, n, get):
        self.n, self.get = n, get

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.get(i), dtype=np.uint8)).permute(2, 0, 1)


def open_input(path):
    """SAMPLES / REFERENCE -> {'path', 'n' (images; None: unknown), and 'images' (Images) and / or 'stats'}."""
    p = Path(path)
    if p.is_dir():                                          # every image below, uncropped, decoded as in training
        files = train.image_files(p)
        if not files:
            raise ValueError(f"no images ({', '.join(train.IMAGE_EXTS)}) found in {p}")
        images = Images(len(files), lambda i: np.array(train.read_rgb(files[i])))
        return {"images": images, "n": len(files), "path": str(p)}
    if p.suffix.lower() != ".npz" or not p.is_file():
        raise ValueError(f"{p} not found, or not a folder of images or an .npz file")
    try:
        data = dict(np.load(p))                             # every array read here: a damaged one is named
    except Exception as e:
        raise ValueError(f"cannot read {p}: {e}") from None
    out = {"path": str(p), "n": int(data["num_images"]) if "num_images" in data else None}
    if {"mu", "sigma"} <= data.keys() or {"mu_dinov2", "sigma_dinov2"} <= data.keys():
        out["stats"] = {k: v for k, v in data.items() if k != "arr_0"}      # in the file's order
    elif "arr_0" not in data:
        raise ValueError(f"{p} has neither 'arr_0' (images) nor 'mu'/'sigma' (statistics); keys: {sorted(data)}")
    if "arr_0" in data:                                     # images (N, H, W, 3); ADM's reference batches hold both
        arr = data["arr_0"]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or not len(arr):
            raise ValueError(f"{p}: arr_0 must hold uint8 N x H x W x 3 images, got {arr.dtype} {arr.shape}")
        out["images"], out["n"] = Images(len(arr), arr.__getitem__), len(arr)
    return out


def shard(ds, d):
    """This rank's contiguous share of a dataset (all of it without DDP)."""
    if d is None or d.world == 1:
        return ds
    return torch.utils.data.Subset(ds, np.array_split(np.arange(len(ds)), d.world)[d.rank].tolist())


def gather(arrays, d):
    """Every rank's dict of arrays of its contiguous share -> the whole arrays in dataset order, on every rank."""
    if d is None or d.world == 1:
        return arrays
    parts = [None] * d.world
    torch.distributed.all_gather_object(parts, arrays)                 # a rank with no images sends {}
    return {k: np.concatenate([p[k] for p in parts if p]) for k in next(p for p in parts if p)}


def collate_images(batch):
    """Stack uint8 (3, H, W) images of one size (the networks resize each batch as a whole)."""
    if any(b.shape != batch[0].shape for b in batch):
        raise ValueError(f"images of different sizes in one batch ({tuple(batch[0].shape)}, ...): crop them to one "
                         f"size, or pass --batch-size 1 to measure each image at its own")
    return torch.stack(batch)


@torch.no_grad()
def extract_features(model, images, d=None, batch_size=50, num_workers=0, collate=collate_images):
    """The model's outputs {key: float32 (N, dim)} ('features': a tensor) for Images, in order on every rank."""
    loader = torch.utils.data.DataLoader(shard(images, d), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate)
    device = next(model.parameters()).device
    feats = {}
    for x in tqdm(loader, desc="features", unit="batch", leave=False, disable=d is not None and not d.main):
        out = model(x.to(device))
        for k, v in (out if isinstance(out, dict) else {"features": out}).items():
            feats.setdefault(k, []).append(v.float().cpu().numpy())
    return gather({k: np.concatenate(v) for k, v in feats.items()}, d)


def compute_statistics(features):
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64 (small sets: metric_key labels the result)."""
    x = np.asarray(features, dtype=np.float64)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 images for statistics, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def inception_stats(feats, resize):
    """Statistics of Inception features as --save-stats writes them: FID, sFID, P/R features, protocol tag."""
    (mu, sigma), (mu_s, sigma_s) = compute_statistics(feats["pool"]), compute_statistics(feats["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pool": feats["pool"],
            "num_images": len(feats["pool"]), "resize": resize}


def save_stats(path, stats):
    """Write statistics to .npz (np.savez appends the suffix), atomically."""
    path = str(path) if str(path).endswith(".npz") else f"{path}.npz"
    train.atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in stats.items()}))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) in float64, without scipy's sqrtm (any scipy version)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape} (means), "
                         f"{s1.shape} vs {s2.shape} (covariances)")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("statistics contain NaN or inf")
    diff = mu1 - mu2
    head = diff @ diff + np.trace(s1) + np.trace(s2)
    # pytorch-fid parity: its sqrtm(S1 S2) turns non-finite (scipy <= 1.15) when each set has an exactly-zero-variance
    # dimension the other lacks; it then uses S + eps*I for the trace term only, and so do we
    dead1, dead2 = (set(np.flatnonzero(~np.any(s != 0, axis=1)).tolist()) for s in (s1, s2))   # zero rows
    if (dead1 - dead2) and (dead2 - dead1):
        warnings.warn(f"singular covariance product; adding {eps} to the diagonal (pytorch-fid fallback)", stacklevel=2)
        s1, s2 = s1 + np.eye(len(s1)) * eps, s2 + np.eye(len(s2)) * eps
    w, v = np.linalg.eigh(s1)                               # tr sqrt(S1 S2) = tr sqrt(sqrt(S1) S2 sqrt(S1))
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T        # symmetric sqrt(S1)
    m = root @ s2 @ root
    return float(head - 2.0 * np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def fid_of(a, b):
    """Fréchet distance of two feature sets (N, D)."""
    return frechet_distance(*compute_statistics(a), *compute_statistics(b))


def inception_score(logits, split_size=IS_SPLIT_SIZE):
    """Inception Score (mean, std) of logits_unbiased as ADM: exp(mean_x KL(p(y|x) || p(y))) over splits of 5,000
    consecutive samples (the last may be shorter)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if len(logits) < 2:
        raise ValueError(f"need at least 2 images for the Inception Score, got {len(logits)}")
    scores = []
    for logq in torch.log_softmax(logits, dim=1).split(split_size):               # one split (b, 1008)
        log_marg = torch.logsumexp(logq, 0, keepdim=True) - math.log(len(logq))   # log p(y)
        scores.append(math.exp((logq.exp() * (logq - log_marg)).sum(1).mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


def knn_radii(features, k=3, batch_size=1024, device="cpu"):
    """Squared distance of every row to its k-th nearest neighbour (self excluded), in blocks of rows."""
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} feature vectors, got {len(x)}")
    radii = []
    for i in range(0, len(x), batch_size):
        d = torch.cdist(x[i:i + batch_size], x).square()                       # (b, N) squared distances
        d[torch.arange(len(d)), torch.arange(i, i + len(d))] = 0.0              # self distance exactly 0
        radii.append(d.kthvalue(k + 1, dim=1).values)                           # the first is the point itself
    return torch.cat(radii).cpu().numpy()


def precision_recall(real_features, fake_features, k=3, batch_size=1024, device="cpu"):
    """Improved precision / recall (Kynkäänniemi et al. 2019): fake / real samples inside the other's k-NN balls."""
    real, fake = (torch.as_tensor(f, dtype=torch.float32, device=device) for f in (real_features, fake_features))
    if real.shape[1] != fake.shape[1] or not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        raise ValueError(f"precision / recall needs finite features of one size, got {real.shape[1]}, {fake.shape[1]}")

    def coverage(queries, support):
        r = torch.as_tensor(knn_radii(support, k, batch_size, device), device=device)
        return torch.cat([(torch.cdist(queries[i:i + batch_size], support).square() <= r).any(1)
                          for i in range(0, len(queries), batch_size)]).float().mean().item()
    return coverage(fake, real), coverage(real, fake)


# ----------------------------------------------------------------------------------------
# Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018)
# ----------------------------------------------------------------------------------------

def _binomial_blur(x):
    """5x5 binomial [1,4,6,4,1]/16 blur per channel, reflect padding. x: (N,C,H,W)."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype) / 16.0
    k = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=x.shape[1])


def laplacian_pyramid(x, min_res=16):
    """Laplacian pyramid of float (N,C,H,W), finest level first, the gaussian residual last (>= min_res)."""
    levels = []
    while min(x.shape[-2:]) // 2 >= min_res:
        small = _binomial_blur(x)[..., ::2, ::2]
        up = torch.zeros_like(x)
        up[..., ::2, ::2] = small * 4.0                        # zero-insert upsampling
        levels.append(x - _binomial_blur(up))
        x = small
    return levels + [x]


def _patch_descriptors(level, patches_per_image, patch, gen):
    """Random (patch x patch) neighbourhoods of one pyramid level, normalised per channel -> (n*P, p*p*c)."""
    n, c, h, w = level.shape
    p = min(patch, h, w)
    ys = torch.randint(0, h - p + 1, (n, patches_per_image), generator=gen)
    xs = torch.randint(0, w - p + 1, (n, patches_per_image), generator=gen)
    windows = level.unfold(2, p, 1).unfold(3, p, 1).permute(0, 2, 3, 4, 5, 1)   # (n, h-p+1, w-p+1, p, p, c): a view
    desc = windows[torch.arange(n)[:, None], ys, xs].contiguous().view(-1, p, p, c)   # (n*P, p, p, c)
    desc = (desc - desc.mean((0, 1, 2))) / desc.std((0, 1, 2)).clamp_min(1e-8)
    return desc.reshape(desc.shape[0], -1)


def swd(images_a, images_b, patches_per_image=128, patch=7, min_res=16, dir_repeats=4, dirs_per_repeat=128, seed=0):
    """ProGAN's SWD x1e3 of uint8 (N, H, W, 3) image sets of one size, per Laplacian level and mean (equal N only)."""
    a, b = (torch.as_tensor(np.asarray(x)) for x in (images_a, images_b))
    if a.dtype != torch.uint8 or a.ndim != 4 or a.shape[-1] != 3 or b.dtype != torch.uint8:
        raise ValueError(f"SWD needs uint8 N x H x W x 3 images, got {a.dtype} {tuple(a.shape)}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"SWD needs equal image sizes, got {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    n = min(len(a), len(b))
    if n < 2:
        raise ValueError(f"need at least 2 images per set for SWD, got {n}")
    gen = torch.Generator().manual_seed(seed)
    levels = {}
    for la, lb in zip(*(laplacian_pyramid(v[:n].permute(0, 3, 1, 2).float(), min_res) for v in (a, b))):
        da, db = (_patch_descriptors(v, patches_per_image, patch, gen).double() for v in (la, lb))   # a, then b
        dist = 0.0
        for _ in range(dir_repeats):                           # mean |sorted projection difference|
            u = torch.randn(da.shape[1], dirs_per_repeat, generator=gen, dtype=torch.float64)
            u = u / u.norm(dim=0, keepdim=True)
            dist += (torch.sort(da @ u, dim=0).values - torch.sort(db @ u, dim=0).values).abs().mean().item()
        levels[int(la.shape[-1])] = 1e3 * dist / dir_repeats
    return {"levels": levels, "mean": float(np.mean(list(levels.values())))}


# ----------------------------------------------------------------------------------------
# Autoencoder metrics: PSNR, SSIM, LPIPS, DSM, spectra, rFID
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


def unit(x):
    """[-1, 1] images -> float [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def downsample2(x):
    """x2 down as EQ-VAE (bilinear, align_corners=False, no antialiasing): exactly 2x2 average pooling."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"x2 downsampling needs even sizes, got {tuple(x.shape[-2:])}")
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)


def jpeg_pixels(x, quality):
    """[-1, 1] images (B, 3, H, W) written as JPEG files at `quality` would be read back (uint8 values)."""
    back = np.stack([train.jpeg_round_trip(a, quality) for a in train.to_uint8(x)])     # (B, H, W, 3)
    return torch.from_numpy(back).permute(0, 3, 1, 2).to(x.device).float() / 127.5 - 1


@torch.no_grad()
def autoencoder_metrics(vae, batches, d=None, inception=None, lpips=None, posterior="mean", jpeg_quality=0, seed=0):
    """Metrics of batches of [-1, 1] images (this rank's share) -> (scalars and spectra, gathered per-image arrays).
    The reconstruction decodes the posterior mean or a sample (noise seeded by seed + rank); with jpeg_quality,
    PSNR and rFID compare both sides after a JPEG round trip (SSIM, LPIPS: before)."""
    per, delta = {}, float(getattr(vae, "esm_delta", 1.0))     # the ESM target's delta (1: every recipe)
    g = torch.Generator().manual_seed(seed + (d.rank if d is not None else 0))
    for x in batches:                                       # (B, 3, H, W)
        mean, logvar = vae.encode(x)                        # posterior (B, C, h, w)
        z = mean if posterior == "mean" else vae.sample(mean, logvar, torch.randn(mean.shape, generator=g).to(x.device))
        rec = vae.decode(z).clamp(-1, 1)
        out = {"ssim": ssim(unit(x), unit(rec))}
        if lpips is not None:
            out["lpips"] = lpips(x, rec).flatten()
        x_file, rec_file = (jpeg_pixels(v, jpeg_quality) if jpeg_quality else v for v in (x, rec))
        out["psnr"] = psnr(unit(x_file), unit(rec_file))
        for k in DSM_KS:                                    # decoded DSM low-passed latent vs low-passed image
            xk, zk = sm.dsm_mask(x, mean, k)
            out[f"dsm{k}_psnr"] = psnr(unit(xk), unit(vae.decode(zk).clamp(-1, 1)))
        st, sl, si = sm.spectrum_profiles(x, mean, delta=delta, blur_sigma=vae.esm_blur)   # (B, 16) each
        out["spectrum_kl"] = (st * (torch.log(st + 1e-8) - torch.log(sl + 1e-8))).sum(-1)   # as sm.esm_loss
        out["spectrum_target"], out["spectrum_latent"], out["spectrum_image"] = st, sl, si
        out["directional_spectral_energy"] = sm.directional_spectral_energy(
            mean.flatten(2).transpose(1, 2), grid=tuple(mean.shape[-2:]), reduction="none")   # tokens (B, h*w, C)
        if mean.shape[-1] % 2 == mean.shape[-2] % 2 == 0:   # EQ-VAE's equivariance error |D(down2(E x)) - down2(x)|
            eq = vae.decode(downsample2(mean)).clamp(-1, 1) - downsample2(x)
            out["equivariance_error"] = eq.abs().flatten(1).mean(1)
        if inception is not None:
            out["pool_x"], out["pool_rec"] = (inception(unit(v))["pool"] for v in (x_file, rec_file))
        for k, v in out.items():
            per.setdefault(k, []).append(v.float().cpu().numpy())
    per = gather({k: np.concatenate(v) for k, v in per.items()}, d)
    n = len(per["psnr"])
    res = {k: float(v.mean()) for k, v in per.items() if v.ndim == 1}
    res["dsm_psnr"], res["num_images"] = float(np.mean([res[f"dsm{k}_psnr"] for k in DSM_KS])), n
    if inception is not None:
        res[metric_key("rfid", n, n)] = fid_of(per["pool_x"], per["pool_rec"])
    res["spectra"] = {k: per[f"spectrum_{k}"].mean(0).tolist() for k in ("image", "latent", "target")}
    res["esm_delta"] = delta
    return res, per


def evaluate_vae(args, d):
    """--vae: reconstruction metrics, DSM check, rFID and spectra on --dataset's held-out images (RFID_PROTOCOLS)."""
    vae, proto = train.load_vae(args.vae, d.device), RFID_PROTOCOLS[args.rfid_protocol]
    size = args.image_size or train.load_checkpoint(args.vae, "vae")["args"]["image_size"]   # default: its training's
    ds = train.build_dataset(args.dataset, args.data_path, size, split="val", jpeg_quality=proto["jpeg_quality"])
    ds = torch.utils.data.Subset(ds, train.uniform_subset(len(ds), args.num_images or proto["num_images"], 0))
    inception = try_inception(args.inception, proto["resize"] or args.resize, d.device)
    if inception is not None:
        check_sample_sizes(len(ds), len(ds), args.allow_small, "rFID")
    lpips = optional("LPIPS", args.lpips or args.vgg, load_lpips, args.lpips, args.vgg, d.device)
    loader = torch.utils.data.DataLoader(shard(ds, d), batch_size=args.batch_size, num_workers=args.workers)
    batches = (x.to(d.device) for x, _ in tqdm(loader, desc="vae", unit="batch", leave=False, disable=not d.main))
    res, _ = autoencoder_metrics(vae, batches, d, inception, lpips, proto["posterior"], proto["jpeg_quality"])
    if not d.main:
        return None
    res = {"vae": args.vae, **res}
    res["protocol"] = protocol(inception, rfid_protocol=dict(proto, name=args.rfid_protocol, num_images=len(ds)),
                               dataset=args.dataset, data_path=args.data_path, split="val", image_size=size,
                               checkpoint_sha256=sha256_input(args.vae))
    out = args.json or default_json_path(args.vae)
    report(res, out)
    train.plot_spectra(dict(res["spectra"], kl=res["spectrum_kl"]), str(Path(out).with_suffix(".spectrum.png")),
                       res["esm_delta"])
    return res


# ----------------------------------------------------------------------------------------
# SAMPLES vs REFERENCE, the protocol record, the small-sample rule, the report
# ----------------------------------------------------------------------------------------

def sha256_input(path):
    """sha256 of a file; None for what is not one (folders, datasets)."""
    if not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def protocol(model, **entries):
    """A result's protocol record: the Inception input protocol and weights (None: no Inception), entries, code."""
    weights = getattr(model, "weights_path", None)
    return {"features": None if model is None else model.resize, "inception_weights": weights,
            "inception_sha256": None if weights is None else sha256_input(weights), **entries,
            "code_version": sample.code_version()}


def metric_key(name, n, n_ref=None):
    """Result key: fid (>= 2,048 images on both sides), else labelled with the sizes: fid-512, fid-50000-ref1000."""
    if n >= MIN_IMAGES_UNBIASED and (n_ref is None or n_ref >= MIN_IMAGES_UNBIASED):
        return name
    if n_ref is None or n_ref == n or n < MIN_IMAGES_UNBIASED <= n_ref:
        return f"{name}-{n}"
    return f"{name}-{n}-ref{n_ref}"


def check_sample_sizes(n, n_ref, allow_small, what="FID / sFID / precision-recall"):
    """Refuse metrics on fewer than 2,048 images on either side unless allow_small (ADM uses 50k / 10k)."""
    if metric_key("fid", n, n_ref) != "fid" and not allow_small:
        raise ValueError(f"{what} on {n} samples and {'unknown' if n_ref is None else n_ref} reference images: "
                         f"below {MIN_IMAGES_UNBIASED} images they are biased and not comparable to 50k-sample "
                         f"numbers; pass --allow-small to compute them anyway (labelled {metric_key('fid', n, n_ref)})")


def default_json_path(src, suffix=".metrics.json"):
    """Output next to the input: X.npz -> X.metrics.json (X.json: sample.py's side file), D/ -> D.metrics.json."""
    p = Path(src)
    return str(p.parent / (p.name if p.is_dir() else p.stem)) + suffix


def report(results, out):
    """Print the protocol record (`key: value` lines) and the table of scalar results; write it all to JSON `out`."""
    print("protocol")
    for k, v in results.get("protocol", {}).items():
        print(f"  {k}: {v}")
    rows = [(k, v) for k, v in results.items() if isinstance(v, (int, float))]
    w = max([6] + [len(k) for k, _ in rows])
    print(f"{'metric':<{w}}  value\n" + "-" * (w + 14))
    for k, v in rows:
        print(f"{k:<{w}}  {v:.4f}" if isinstance(v, float) else f"{k:<{w}}  {v}")
    train.write_json(results, out)
    print(f"[evaluate] wrote {out}")


def evaluate_samples(args, d):
    """SAMPLES vs REFERENCE (or --dataset's held-out images): FID, sFID, IS, P/R, FD-DINOv2 and / or SWD."""
    samples = open_input(args.samples)
    if "images" not in samples:
        raise ValueError(f"{args.samples}: SAMPLES must be images (folder or arr_0 .npz)")
    if args.reference:
        ref = open_input(args.reference)
    elif args.dataset:                                                     # held-out split, cropped as in training
        size = args.image_size or len(samples["images"].get(0))            # default: the samples' own size
        ds = train.build_dataset(args.dataset, args.data_path, size, split="val")
        ref = {"images": Images(len(ds), lambda i: train.to_uint8(ds[i][0][None])[0]),
               "path": f"{args.dataset}:{args.data_path}", "n": len(ds)}
    else:
        raise ValueError("give REFERENCE, or --dataset (and --data-path) for held-out dataset images")
    if args.swd and "images" not in ref:                                 # before any pass
        raise ValueError(f"{ref['path']}: --swd needs reference images (a folder or an arr_0 .npz), not statistics")
    n, n_ref = samples["n"], ref["n"]
    model, dino = try_inception(args.inception, args.resize, d.device), try_dinov2(args.dinov2, d.device)
    r_stats, kw = dict(ref.get("stats", {})), dict(d=d, batch_size=args.batch_size, num_workers=args.workers)
    tag = str(r_stats.get("resize", "adm"))                               # untagged statistics: ADM's batches
    if model is not None and r_stats and tag != model.resize:             # before any pass: no number shows it
        raise ValueError(f"{ref['path']}: statistics computed with --resize {tag}, but the samples use --resize "
                         f"{model.resize}; FIDs across protocols are not comparable")
    if model is not None or dino is not None:
        check_sample_sizes(n, n_ref, args.allow_small)
    if model is not None and "mu" not in r_stats and "images" not in ref:
        raise ValueError(f"{ref['path']}: statistics without Inception features ('mu', 'sigma'); give the "
                         f"reference images, or statistics saved with Inception")
    if dino is not None and "mu_dinov2" not in r_stats and "images" not in ref:
        print(f"[evaluate] no FD-DINOv2: the statistics {ref['path']} have no DINOv2 features", file=sys.stderr)
        dino = None
    # every rank extracts its share of the features; rank 0 computes the metrics
    if model is not None:
        fs = extract_features(model, samples["images"], **kw)
        ref_fs = (extract_features(model, ref["images"], **kw) if "images" in ref and not {"mu", "pool"} <= set(r_stats)
                  else None)                                               # a file's own mu, sigma (ADM's) kept
    if dino is not None:                                                   # FD-DINOv2, EDM2's protocol
        fs_dino = extract_features(dino, samples["images"], collate=dinov2_preprocess, **kw)["features"]
        ref_dino = (extract_features(dino, ref["images"], collate=dinov2_preprocess, **kw)["features"]
                    if "mu_dinov2" not in r_stats else None)
    if not d.main:
        return None
    res, key = {}, functools.partial(metric_key, n=n, n_ref=n_ref)
    if model is not None:
        if ref_fs is not None:
            r_stats = {**inception_stats(ref_fs, model.resize), **r_stats}
        st = inception_stats(fs, model.resize)
        res[key("fid")] = frechet_distance(st["mu"], st["sigma"], r_stats["mu"], r_stats["sigma"])
        if "mu_s" in r_stats:
            res[key("sfid")] = frechet_distance(st["mu_s"], st["sigma_s"], r_stats["mu_s"], r_stats["sigma_s"])
        res["inception_score"], res["inception_score_std"] = inception_score(fs["logits_unbiased"])
        if "pool" in r_stats:
            res[key("precision")], res[key("recall")] = precision_recall(r_stats["pool"], fs["pool"], device=d.device)
    if dino is not None:
        if ref_dino is not None:
            mu_r, sigma_r = compute_statistics(ref_dino)
            r_stats = {"num_images": n_ref, **r_stats, "mu_dinov2": mu_r, "sigma_dinov2": sigma_r}
        res[key("fd_dinov2")] = frechet_distance(*compute_statistics(fs_dino), r_stats["mu_dinov2"],
                                                 r_stats["sigma_dinov2"])
    if args.save_stats and (model is not None or dino is not None):
        save_stats(args.save_stats, r_stats)
        print(f"[evaluate] reference statistics -> {args.save_stats}")
    if (args.swd or model is None) and "images" in ref:
        pics = [np.stack([s["images"].get(i) for i in range(min(args.num_images or 10_000, len(s["images"])))])
                for s in (samples, ref)]                                    # (N, H, W, 3) uint8
        s = swd(*pics)
        res.update(swd_mean=s["mean"], **{f"swd_{r}px": v for r, v in s["levels"].items()})
    res["protocol"] = protocol(
        model, fd_dinov2=None if dino is None else f"{DINOV2_PROTOCOL}; {args.dinov2 or 'torch.hub'}",
        num_samples=n, num_reference=n_ref, samples_file=samples["path"], samples_sha256=sha256_input(samples["path"]),
        reference_file=ref["path"], reference_sha256=sha256_input(ref["path"]), is_split_size=IS_SPLIT_SIZE)
    report(res, args.json or default_json_path(args.samples))
    return res


# ----------------------------------------------------------------------------------------
# The metrics of a training run (the quickstart's metrics.json)
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def flow_val_loss(model, z, y=None, seed=1234, batch=64):
    """Flow-matching MSE on normalised latents z (N, C, h, w), at a fixed stratified t grid and noise (`seed`)."""
    n = len(z)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(z.shape, generator=g).to(z.device)
    t = ((torch.arange(n) + 0.5) / n)[torch.randperm(n, generator=g)].to(z.device)   # stratified t grid
    losses = [sm.flow_loss(model, z[i:i + batch], None if y is None else y[i:i + batch], t=t[i:i + batch],
                           noise=noise[i:i + batch])["mse"] for i in range(0, n, batch)]
    return float(torch.cat(losses).mean())


@torch.no_grad()
def heldout(vae, dataset, data_path, image_size, n, seed):
    """n held-out images, a seeded uniform subset: (n, 3, H, W) in [-1, 1], labels (n,) or None (flat val/), latents."""
    val = train.build_dataset(dataset, data_path, image_size, split="val", seed=seed, length=n)
    if len(val) < n:
        raise ValueError(f"{n} held-out images are needed; {dataset} has {len(val)}")
    idx = train.uniform_subset(len(val), n, seed)
    x = torch.stack([val[i][0] for i in idx]).to(next(vae.parameters()).device)
    z = torch.cat([vae.normalize(vae.encode(b)[0]) for b in x.split(64)])
    return x, torch.tensor([int(val[i][1]) for i in idx], device=x.device) if val.num_classes else None, z


@torch.no_grad()
def evaluate_run(out, d, data_path=None):
    """A run's autoencoder, DiT and sample metrics on held-out images (of data_path, else the run's) -> metrics.json."""
    dit_path, npz = os.path.join(out, "dit.pt"), os.path.join(out, "samples", "samples.npz")
    for path in (dit_path, npz, Path(npz).with_suffix(".json")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {path}: `python train.py` trains, samples and evaluates the default run "
                                    f"(`--dataset NAME` the run runs/NAME)")
    if not d.main:
        return None
    model, vae, source = sample.load(dit_path, d.device)                    # source: the DiT's step and sha256
    drawn = train.read_json(Path(npz).with_suffix(".json"))                # sample.py's record of its DiT
    if (drawn.get("step"), drawn.get("sha256")) != (source["step"], source["sha256"]):
        raise ValueError(f"{npz} was sampled from another DiT (step {drawn.get('step')}) than {dit_path} (step "
                         f"{source['step']}): `python train.py` with the run's flags samples it anew")
    run = train.load_checkpoint(dit_path, "dit")["args"]                   # the run's recipe entries
    samples = open_input(npz)["images"].get(slice(RUN_EVAL_IMAGES))        # arr_0[:RUN_EVAL_IMAGES] (n, H, W, 3) uint8
    n = len(samples)
    x, y, z = heldout(vae, run["dataset"], data_path or run.get("data_path"), run["image_size"], n, run["seed"])
    inception = try_inception(None, "adm", d.device)
    res, per = autoencoder_metrics(vae, x.split(64), None, inception)
    if y is not None or not model.num_classes:                             # flat val/: no labels for its classes
        res["dit_val_loss"] = flow_val_loss(model, z, y if model.num_classes else None)
    res["swd"], res["num_eval_images"] = swd(samples[:n], train.to_uint8(x))["mean"], n
    if inception is not None:
        fs = extract_features(inception, Images(n, samples.__getitem__))["pool"]
        res[metric_key("fid", n, n)] = fid_of(fs, per["pool_x"])
    res["protocol"] = protocol(inception, num_samples=n, samples_file=npz, samples_sha256=sha256_input(npz),
                               dit_step=source["step"], dit_sha256=source["sha256"], heldout_labels=y is not None,
                               reference=f"{run['dataset']} val, {n} drawn uniformly (seed {run['seed']})")
    report(res, os.path.join(out, "metrics.json"))
    return res


# ----------------------------------------------------------------------------------------
# The diffusability probe and the regulariser comparison
# ----------------------------------------------------------------------------------------
# How easy a latent space is to *generate*, with decoder blur cancelled: one small fixed DiT budget on fixed images.

PROBE_BUDGETS = {   # the probe's image counts, and recipe entries (of its DiT, and of the comparison's stage 1)
    "short": dict(probe_images=2048, probe_eval=512, vae_steps=300, dit_steps=500, sample_steps=25),
    "long": dict(probe_images=2048, probe_eval=512, vae_steps=300, dit_steps=1000, sample_steps=25),   # 2x the DiT
}
PROBE_RECIPE = dict(unconditional=True, repa_encoder="none", repa_lambda=0.0, class_dropout=0.0)   # latents differ only
PROBE_DATA_SEED = 0          # the probe's images: the same for every seed and autoencoder
PROBE_VAL_POINTS = 5         # snapshots along the DiT budget: the curves of every metric
SCRAMBLE_SEED = 0            # the positive control's permutation of latent positions
PROBE_METRICS = (("gap_ratio", "gap / floor"), ("gap_swd", "gap SWD"), ("floor_swd", "floor SWD"),
                 ("latent_fd_ratio", "latent FD / floor"), ("latent_fd", "latent FD"),
                 ("latent_participation", "latent dims"), ("psnr", "PSNR"),
                 ("ssim", "SSIM"), ("spectrum_kl", "spectrum KL"), ("equivariance_error", "EQ error"),
                 ("dit_val_loss", "DiT val loss"))
PROBE_CURVES = (("gap_ratio", "gap / floor"), ("latent_fd_ratio", "latent FD / floor"))   # against DiT steps
CURVE_COLORS = [(30, 90, 220), (220, 60, 30), (40, 150, 60), (150, 60, 180), (220, 160, 0), (90, 90, 90),
                (0, 170, 170), (140, 90, 40)]


def latent_features(z, dims=64, seed=0):
    """Decoder-free features of normalised latents (N, C, h, w) -> (N, min(C*h*w, dims)) float64: projected on
    `dims` fixed orthonormal directions when longer, so that a few hundred images give a well-conditioned FD."""
    flat = z.detach().reshape(len(z), -1).double().cpu()
    if flat.shape[1] <= dims:
        return flat.numpy()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(flat.shape[1], dims, generator=g, dtype=torch.float64))   # (D, dims)
    return (flat @ q).numpy()


def gaussian_floor(features, m):
    """What sampling alone gives two m-image halves of a Gaussian with the features' covariance (eigenvalues l):
    E[FD] ~ (3 sum l + sum_{i != j} l_i l_j / (l_i + l_j)) / m to first order in 1 / m, and the participation ratio
    (sum l)^2 / sum l^2 (the effective number of dimensions): a concentrated spectrum has a lower floor."""
    lam = np.clip(np.linalg.eigvalsh(np.cov(features, rowvar=False)), 1e-12, None)
    pair = np.outer(lam, lam) / np.add.outer(lam, lam)                    # its diagonal sums to sum(l) / 2
    return dict(latent_fd_floor_gaussian=float((2.5 * lam.sum() + pair.sum()) / m),
                latent_participation=float(lam.sum() ** 2 / (lam ** 2).sum()))


@torch.no_grad()
def generation_gap(sample_latents, real_latents, decode, batch=64, seed=0):
    """Distance of generated to real latents with decoder blur cancelled, relative to the measurement's floor."""
    # halves A, B of the real latents (2m, C, h, w); S vs A and B vs A alike (m images, one SWD seed); ratio ~1: floor
    m = len(real_latents) // 2
    if m < 2 or len(sample_latents) < m:
        raise ValueError(f"generation gap needs 2m >= 4 real latents and m samples, got {len(real_latents)} real "
                         f"and {len(sample_latents)} samples")
    S, A, B = sample_latents[:m], real_latents[:m], real_latents[m:2 * m]
    pics = lambda z: np.concatenate([train.to_uint8(decode(b)) for b in z.split(batch)])  # noqa: E731
    dA, (fS, fA, fB) = pics(A), (latent_features(v) for v in (S, A, B))
    res = dict(gap_swd=swd(pics(S), dA, seed=seed)["mean"], floor_swd=swd(pics(B), dA, seed=seed)["mean"],
               latent_fd=fid_of(fS, fA), latent_fd_floor=fid_of(fB, fA), num_images=m)
    res["gap_ratio"] = res["gap_swd"] / max(res["floor_swd"], 1e-12)
    res["latent_fd_ratio"] = res["latent_fd"] / max(res["latent_fd_floor"], 1e-12)
    return dict(res, **gaussian_floor(np.concatenate([fA, fB]), m))


def probe(vae_path, d, seed=0, budget="short", out=None, control=None):
    """The diffusability probe of one autoencoder (control "scramble": of its scrambled copy) -> OUT/probe.json
    (metrics at every DiT snapshot + protocol), probe.png, probe-curves.png, probe-spectrum.png."""
    t0 = time.time()
    name = f"probe-seed{seed}" + (f"-{control}" if control else "")
    out = out or os.path.join(os.path.dirname(os.path.abspath(vae_path)), name)
    result_path = os.path.join(out, "probe.json")
    asked = dict(budget=budget, seed=seed, vae_sha256=sha256_input(vae_path))
    if os.path.exists(result_path):                                         # finished: with these settings only
        done = train.read_json(result_path)
        diff = [f"{k}: {done['protocol'].get(k)} -> {v}" for k, v in asked.items() if done["protocol"].get(k) != v]
        if diff:
            raise FileExistsError(f"{result_path}: finished with other settings ({'; '.join(diff)}); remove {out}")
        train.log(d, f"probe: {result_path} is finished, skipping")
        return done
    if control not in (None, "scramble"):
        raise ValueError(f"unknown probe control {control!r}: scramble or none")
    vae_state = train.load_checkpoint(vae_path, "vae")                     # every rank: a train.py checkpoint
    source = os.path.join(out, "vae-scramble.pt") if control else vae_path
    # the positive control: the checkpoint with its latent positions shuffled by a fixed permutation
    # (sm.VAE.permute_latent, seed SCRAMBLE_SEED): the same reconstructions, a white latent spectrum
    if control and d.main and not os.path.exists(source):
        train.save_checkpoint(dict(vae_state, vae_config=dict(vae_state["vae_config"], scramble=SCRAMBLE_SEED)), source)
    d.barrier()
    entries = dict(PROBE_BUDGETS[budget])
    n_train, n_eval = entries.pop("probe_images"), entries.pop("probe_eval")
    if n_eval < 16 or n_eval % 8:
        raise ValueError(f"the probe's held-out images must be a multiple of 8 and at least 16, got {n_eval}")
    every = max(1, entries["dit_steps"] // PROBE_VAL_POINTS)                # the snapshots of the curves
    entries.update(**PROBE_RECIPE, vae_ckpt=os.path.abspath(source), image_size=vae_state["args"]["image_size"],
                   out=out, resume=True, dataset_size=n_train, ckpt_every=every, keep_every=every,
                   vis_every=entries["dit_steps"])
    train.run(train.recipe("deadleaves", seed=PROBE_DATA_SEED, **entries), d, stages=("latents",))   # fixed images
    cfg = train.recipe("deadleaves", seed=seed, **entries)
    train.run(cfg, d, stages=("dit",))
    if not d.main:
        d.barrier()
        return None
    # rank 0 measures every snapshot's EMA samples against the held-out latents, and the autoencoder
    model, vae, ckpt = sample.load_dit(os.path.join(out, "dit.pt"), d.device)
    x, _, z = heldout(vae, cfg.dataset, cfg.data_path, cfg.image_size, n_eval, PROBE_DATA_SEED)
    m = n_eval // 2
    decode = lambda v: vae.decode(vae.denormalize(v)).clamp(-1, 1)          # noqa: E731
    draw = lambda net: torch.cat([sample.sample_latents(net, range(i, min(i + 64, m)), None, z.shape[1:], seed,  # noqa
                                                        d.device, steps=cfg.sample_steps) for i in range(0, m, 64)])
    curve = []
    snapshots = [p for p in sorted(glob.glob(os.path.join(out, "dit-*.pt"))) if int(Path(p).stem[4:]) < ckpt["step"]]
    for path in snapshots + [os.path.join(out, "dit.pt")]:                 # dit-0000400.pt, ... by step; dit.pt last
        snap, _, snap_ckpt = sample.load_dit(path, d.device)
        samples = draw(snap)                                                # (m, C, h, w)
        curve.append(dict(step=snap_ckpt["step"], dit_val_loss=flow_val_loss(snap, z),
                          **generation_gap(samples, z, decode)))
    res = dict(curve[-1])
    # the floor's dependence on the images per half: the last snapshot on nested subsets of both halves
    res["by_images"] = [generation_gap(samples[:k], torch.cat([z[:k], z[m:m + k]]), decode)
                        for k in (m // 4, m // 2, m)]
    ae, _ = autoencoder_metrics(vae, x.split(64))
    res.update({k: ae[k] for k in ("psnr", "ssim", "spectrum_kl", "equivariance_error")})
    res["curve"] = curve
    res["train_curve"] = [[h["step"], h["mse"]] for h in ckpt.get("history", [])]
    res["protocol"] = dict(
        **asked, data_seed=PROBE_DATA_SEED, vae=os.path.abspath(vae_path), sampler="ode",
        control=dict(kind="scramble", seed=SCRAMBLE_SEED, vae=os.path.abspath(source)) if control else None,
        probe_images=n_train, eval_images=n_eval, snapshots=[c["step"] for c in curve],
        latent_std_heldout=z.transpose(0, 1).flatten(1).std(1).tolist(),      # ~1 when the normalisation fits
        recipe={k: v for k, v in vars(cfg).items() if k not in ("out", "vae_ckpt")},
        machine=platform.processor() or platform.machine(), code_version=sample.code_version(), torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"), minutes=(time.time() - t0) / 60)
    n = min(8, m)
    train.save_grid(np.concatenate([train.to_uint8(v[:n]) for v in (x, decode(z[:n]), decode(samples[:n]))]),
                    os.path.join(out, "probe.png"), n)                      # rows: real, reconstructed, sampled
    plot_curves([(label, [res], key) for key, label in PROBE_CURVES], os.path.join(out, "probe-curves.png"),
                " and ".join(label for _, label in PROBE_CURVES))
    with torch.no_grad():
        z_raw = vae.encode(x[:64])[0]                                       # the spectrum the DiT sees, and
    rep = train.spectrum_report(x[:64], z_raw, cfg.esm_delta, vae.esm_blur)
    series = {"image": (rep["image"], (40, 40, 40)), "latent the DiT sees": (rep["latent"], (30, 90, 220))}
    if control:                                                              # the unscrambled latent's beside it
        series["latent unscrambled"] = (train.spectrum_report(x[:64], vae.permute_latent(z_raw, inverse=True),
                                                              cfg.esm_delta, vae.esm_blur)["latent"], (220, 60, 30))
    train.plot_lines(series, os.path.join(out, "probe-spectrum.png"), title="normalised log radial spectra",
                     xlabel="frequency bin (low -> high)", ylabel="share")
    train.write_json(res, result_path)                                     # written last: marks the probe finished
    train.log(d, "probe: " + ", ".join(f"{name} {res[k]:.4g}" for k, name in PROBE_METRICS) + f" -> {result_path}")
    d.barrier()
    return res


def plot_curves(lines, path, title):
    """Curves (name, probe results, metric key) against DiT steps, each the mean over its results."""
    series = {name: (np.mean([[c[key] for c in r["curve"]] for r in results], 0), color)
              for (name, results, key), color in zip(lines, CURVE_COLORS * 2)}
    steps = [c["step"] for c in lines[0][1][0]["curve"]]
    train.plot_lines(series, path, title=f"{title} against DiT steps (1 = the floor of real images)",
                     xlabel=f"DiT steps {steps[0]} -> {steps[-1]} ({len(steps)} snapshots)", ylabel="ratio")


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
    cols = [(k, name) for k, name in PROBE_METRICS if any(k in s for s in summary.values())]
    lines = ["| reg | " + " | ".join(name for _, name in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for reg, s in summary.items():
        lines.append(f"| {reg} | " + " | ".join(f"{s[k]['mean']:.4g} ± {s[k]['std']:.2g}" if k in s else "-"
                                                 for k, _ in cols) + " |")
    return "\n".join(lines), summary


def compare(out, d, seeds=(0, 1, 2), budget="short"):
    """Every regulariser preset (sm.REG_PRESETS) x seeds: stage 1 at the budget, then the probe; with the controls on
    the first preset: its autoencoders scrambled (positive), its first autoencoder probed with the other DiT seeds
    (negative). One table of mean ± std -> OUT/compare.md, .json, curves -> OUT/compare-*.png; resumable."""
    runs, t0 = {}, time.time()
    entries = {k: v for k, v in PROBE_BUDGETS[budget].items() if not k.startswith("probe_")}
    first = next(iter(sm.REG_PRESETS))
    for reg in sm.REG_PRESETS:
        for seed in seeds:
            folder = os.path.join(out, f"{reg.replace('+', '_')}-seed{seed}")
            train.run(train.recipe("deadleaves", out=folder, seed=seed, reg=reg, resume=True, **entries), d,
                      stages=("vae",))
            vae = os.path.join(folder, "vae.pt")
            runs.setdefault(reg, {})[seed] = probe(vae, d, seed, budget, os.path.join(folder, "probe"))
            if reg == first:
                runs.setdefault(f"{first} scrambled", {})[seed] = probe(
                    vae, d, seed, budget, os.path.join(folder, "probe-scramble"), control="scramble")
        if reg == first:                                   # the same autoencoder, only the DiT's seed differs
            folder = os.path.join(out, f"{reg.replace('+', '_')}-seed{seeds[0]}")
            runs[f"{first} seed {seeds[0]}, DiT seeds"] = {seed: runs[first][seed] if seed == seeds[0] else probe(
                os.path.join(folder, "vae.pt"), d, seed, budget, os.path.join(folder, f"probe-dit-seed{seed}"))
                for seed in seeds}
    if d.main:
        table, summary = compare_table(runs)
        p = runs[first][seeds[0]]["protocol"]
        head = (f"`python evaluate.py --compare {out} --budget {budget} --seeds {' '.join(map(str, seeds))}`, "
                f"{p['date']}, {p['machine']}, {(time.time() - t0) / 60:.0f} min this invocation; mean ± std over "
                f"{len(seeds)} seeds")
        train.atomic_write(os.path.join(out, "compare.md"), lambda f: f.write(f"{head}\n\n{table}\n"), binary=False)
        train.write_json(dict(summary=summary, budget=PROBE_BUDGETS[budget], seeds=list(seeds), protocol=p, runs=runs),
                         os.path.join(out, "compare.json"))
        for (key, label), file in zip(PROBE_CURVES, ("compare-gap.png", "compare-latent-fd.png")):
            plot_curves([(reg, list(r.values()), key) for reg, r in runs.items()], os.path.join(out, file), label)
        print(head + "\n\n" + table)
    d.barrier()
    return runs


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="?", help="folder / arr_0 .npz of generated images")
    p.add_argument("reference", nargs="?", help="folder / arr_0 .npz / mu,sigma .npz")
    p.add_argument("--run", default="runs/deadleaves", help="training run folder (the default mode): metrics.json")
    p.add_argument("--vae", metavar="CKPT", help="autoencoder metrics of a train.py VAE checkpoint")
    p.add_argument("--probe", metavar="VAE_CKPT", help="the diffusability probe of a train.py VAE checkpoint")
    p.add_argument("--compare", metavar="OUT", help="stage 1 and the probe for every regulariser and --seeds")
    p.add_argument("--dataset", help="held-out images of this dataset: --vae's, or the reference without REFERENCE")
    p.add_argument("--data-path", help="dataset root")
    p.add_argument("--image-size", type=int, help="held-out images' size (default: --vae's, or the samples')")
    p.add_argument("--num-images", type=int, help="at most this many images for --vae (10,000; authors: 50,000), SWD")
    p.add_argument("--inception", help="path to pt_inception-2015-12-05-6726825d.pth (else the hub cache / URL)")
    p.add_argument("--resize", choices=RESIZE_PROTOCOLS, default="adm", help="Inception input protocol")
    p.add_argument("--dinov2", help="FD-DINOv2: a local clone of facebookresearch/dinov2 (else the torch.hub cache)")
    p.add_argument("--rfid-protocol", choices=list(RFID_PROTOCOLS), default="ours", help="--vae: RFID_PROTOCOLS")
    p.add_argument("--allow-small", action="store_true", help="FID & co. below 2,048 images, labelled fid-N")
    p.add_argument("--save-stats", help="write the reference statistics to this .npz")
    p.add_argument("--json", help="output JSON (default: next to SAMPLES / CKPT, X.npz -> X.metrics.json)")
    p.add_argument("--swd", action="store_true", help="also compute SWD (always without Inception weights)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--lpips", help="LPIPS v0.1 linear-head weights path (else the hub cache / URL)")
    p.add_argument("--vgg", help="VGG16 weights path for LPIPS (else the hub cache / URL)")
    p.add_argument("--seed", type=int, default=0, help="--probe: the DiT's seed")
    p.add_argument("--control", choices=["scramble"], help="--probe: of the autoencoder's scrambled copy")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--compare: seeds per preset")
    p.add_argument("--budget", choices=list(PROBE_BUDGETS), default="short", help="--probe / --compare budget")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_images is not None and args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    d = train.Dist()
    if args.probe:
        return probe(args.probe, d, args.seed, args.budget, control=args.control)
    if args.compare:
        return compare(args.compare, d, args.seeds, args.budget)
    if args.vae:
        if not args.dataset:
            raise ValueError("--vae needs --dataset NAME (and --data-path)")
        return evaluate_vae(args, d)
    if args.samples:
        return evaluate_samples(args, d)
    return evaluate_run(args.run, d, args.data_path)


if __name__ == "__main__":
    train.cli(main, "evaluate.py")
