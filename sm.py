"""
Spectrum Matching latent diffusion in one file.

Ning et al., 2026, "Spectrum Matching: a Unified Perspective for Superior Diffusability in Latent
Diffusion". The file follows the data: images and latents are compared through their spectra, the
autoencoder is trained to match them, a diffusion transformer learns the latents, and samplers turn
noise back into latents. Top to bottom:

  1. Spectra               dct2 / idct2, radial_spectrum, gaussian_blur
  2. Spectrum Matching     esm_loss (Encoding SM, §3.2), dsm_mask (Decoding SM, §3.3)
  3. Autoencoder           SD-VAE layout (diffusers AutoencoderKL), VAE_CONFIGS
  4. Stage-1 losses        LPIPS-VGG, PatchGAN, hinge, adaptive weight, KL, EQ-VAE
  5. DiT / SiT             adaLN-Zero transformer (REPA's SiT), DiT_CONFIGS
  6. REPA                  projectors, targets (raw / iREPA zscore / REPA-DoG), repa_loss
  7. Flow matching         sample_time, flow_loss
  8. Samplers              sample_ode (Euler / Heun), sample_sde (Euler-Maruyama)
  9. Dead leaves           the embedded procedural dataset
  Appendix: interop        load_sd_vae, load_official_vae, load_repa_sit, load_lpips, load_dinov2,
                           load_safetensors, the weight fetcher

Only the standard library, torch and numpy are imported at module level; torchvision is imported
lazily where a pretrained network needs it. Copy this file into your project as it is.
"""

import contextlib
import functools
import itertools
import json
import math
import operator
import os
import re
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


#################################################################################
#                                   1. Spectra                                  #
#################################################################################

_DCT_CACHE, _BIN_CACHE = {}, {}           # built outside inference mode, so autograd can use them later


def dct_matrix(n, device=None):
    """Orthonormal DCT-II matrix C (n, n), so that dct(x) = C @ x; cached per (n, device), do not modify."""
    key = (n, str(device))
    if key not in _DCT_CACHE:
        with torch.inference_mode(False):
            k = torch.arange(n, dtype=torch.float64)[:, None]
            i = torch.arange(n, dtype=torch.float64)[None, :]
            c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
            c[0] /= math.sqrt(2.0)
            _DCT_CACHE[key] = c.to(device=device, dtype=torch.float32)
    return _DCT_CACHE[key]


def dct2(x):
    """Orthonormal 2-D DCT-II over the last two dims, in float32 (autocast off)."""
    with torch.autocast(x.device.type, enabled=False):
        ch, cw = dct_matrix(x.shape[-2], x.device), dct_matrix(x.shape[-1], x.device)
        return ch @ x.float() @ cw.T


def idct2(X):
    """Exact inverse of dct2 (orthonormal 2-D DCT-III)."""
    with torch.autocast(X.device.type, enabled=False):
        ch, cw = dct_matrix(X.shape[-2], X.device), dct_matrix(X.shape[-1], X.device)
        return ch.T @ X.float() @ cw


def _radial_bins(h, w, n_bins, device):
    """(bin index (h*w,), coefficients per bin (n_bins,)) by radius sqrt(u^2 + v^2), DC at (0, 0); cached."""
    key = (h, w, n_bins, str(device))
    if key not in _BIN_CACHE:
        with torch.inference_mode(False):
            u = torch.arange(h, dtype=torch.float32)[:, None]
            v = torch.arange(w, dtype=torch.float32)[None, :]
            r_max = max(math.sqrt((h - 1) ** 2 + (w - 1) ** 2), 1.0)    # the largest radius
            bins = torch.floor(torch.sqrt(u ** 2 + v ** 2) / r_max * n_bins).clamp(0, n_bins - 1).long().flatten()
            counts = torch.bincount(bins, minlength=n_bins).clamp_min(1).float()
            _BIN_CACHE[key] = (bins.to(device), counts.to(device))
    return _BIN_CACHE[key]


def radial_spectrum(x, n_bins=16):
    """Radially binned DCT power spectrum (B, n_bins) of x (B, C, H, W), channel-averaged (§3.1)."""
    x = x.float()
    x = x - x.mean(dim=(-2, -1), keepdim=True)                # remove each (sample, channel) mean
    p = dct2(x).pow(2).mean(dim=1).clamp_min(1e-8)            # (B, H, W) channel-averaged power
    B, H, W = p.shape
    dc = torch.ones(H, W, device=p.device)
    dc[0, 0] = 0.0
    p = p * dc                                                # drop the DC entry
    bins, counts = _radial_bins(H, W, n_bins, p.device)       # (H*W,), (n_bins,)
    sums = p.new_zeros(B, n_bins).index_add_(1, bins, p.flatten(1))
    return sums / (counts + 1e-8)


def gaussian_kernel1d(sigma, radius, device=None):
    """Normalised Gaussian taps exp(-i^2 / (2 sigma^2)), i = -radius..radius, float32 (2 radius + 1,)."""
    i = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    g = torch.exp(-i ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def gaussian_blur(x, sigma, kernel_size):
    """Depthwise Gaussian blur of x (B, C, H, W) with an odd kernel_size x kernel_size kernel, zero padding."""
    g = gaussian_kernel1d(sigma, kernel_size // 2, x.device)
    k = (g[:, None] * g[None, :]).to(x.dtype)                 # exp(-(i^2 + j^2) / (2 sigma^2)), sums to 1
    C = x.shape[1]
    return F.conv2d(x, k.expand(C, 1, kernel_size, kernel_size), padding=kernel_size // 2, groups=C)


#################################################################################
#                              2. Spectrum Matching                             #
#################################################################################

def spectrum_profiles(x, z, delta=1.0, n_bins=16, blur_sigma=1.2, blur_kernel=7):
    """Normalised log spectra (target, latent, image), each (B, n_bins), as compared by ESM (§3.2).

    target = image spectrum at the latent's resolution, flattened by f**delta;
    image = the same without flattening (delta = 0), for plots. Float32, also under bf16 autocast.
    """
    with torch.autocast(x.device.type, enabled=False):
        x, z = x.float(), z.float()
        if blur_sigma > 0:
            x = gaussian_blur(x, blur_sigma, blur_kernel)                # anti-alias before downsampling
        x_small = F.interpolate(x, size=z.shape[-2:], mode="bicubic", align_corners=False)
        s_img, s_lat = radial_spectrum(x_small, n_bins), radial_spectrum(z, n_bins)
        f = torch.arange(1, n_bins + 1, device=x.device, dtype=torch.float32)
        s_tgt = s_img * f ** delta                                       # flatten the power law by f^delta

        def normalise(s):
            s = torch.log(s + 1e-8 + 1).clamp_min(0)
            return s / (s.sum(dim=-1, keepdim=True) + 1e-8)

        return normalise(s_tgt), normalise(s_lat), normalise(s_img)


def esm_loss(x, z, delta=1.0, n_bins=16, blur_sigma=1.2, blur_kernel=7):
    """Encoding Spectrum Matching (§3.2): KL(target || latent) of normalised log radial spectra.

    x: images in [-1, 1] (B, 3, H, W); z: sampled latents (B, C, h, w). The target is the
    image spectrum at the latent resolution, flattened by f**delta (f = 1..n_bins).
    """
    s_x, s_z, _ = spectrum_profiles(x, z, delta, n_bins, blur_sigma, blur_kernel)
    kl = (s_x * (torch.log(s_x + 1e-8) - torch.log(s_z + 1e-8))).sum(dim=-1)
    return kl.mean()


def dsm_keep_mask(k, block=8, device=None):
    """(block, block) 0/1 mask of the DCT coefficients DSM keeps: u + v < 2(block-1) - (k-1)."""
    u = torch.arange(block, device=device)[:, None]
    v = torch.arange(block, device=device)[None, :]
    return ((u + v) < 2 * (block - 1) - (k - 1)).float()


def block_lowpass(t, k, block=8):
    """Zero the high-frequency DCT coefficients of every block x block tile of t (B, C, H, W)."""
    B, C, H, W = t.shape
    if H % block or W % block:
        raise ValueError(f"dsm_mask: spatial size {H}x{W} is not divisible by the DSM block size {block}")
    tiles = t.reshape(B, C, H // block, block, W // block, block).transpose(3, 4)  # (B, C, nh, nw, b, b)
    coeffs = dct2(tiles) * dsm_keep_mask(k, block, t.device)
    tiles = idct2(coeffs).to(t.dtype)
    return tiles.transpose(3, 4).reshape(B, C, H, W)


def dsm_mask(x, z, k, block=8):
    """Decoding Spectrum Matching (§3.3): the same block-DCT low-pass on image and latent.

    k = 0 returns both unchanged; otherwise coefficients with u + v >= 2(block-1) - (k-1)
    are zeroed in every tile (block 8: k = 8/10/12 zero 36/49/58 of 64). Valid 0 <= k <= 2*block-2.
    """
    try:
        k = operator.index(k)                                  # int, numpy or 0-d torch integers
    except TypeError:
        k = None
    if k is None or not 0 <= k <= 2 * block - 2:
        raise ValueError(f"dsm_mask: k must be an integer in [0, {2 * block - 2}] for block {block}")
    if k == 0:
        return x, z
    return block_lowpass(x, k, block), block_lowpass(z, k, block)


#################################################################################
#                 3. Autoencoder (SD-VAE / AutoencoderKL layout)                #
#################################################################################
# Parameter names follow diffusers' AutoencoderKL, so SD-VAE weights load as they are; the
# authors' VAE has the same layout with symmetric downsampling padding (load_official_vae).

# name: channels per level, ResNet blocks per level, latent channels, ESM blur sigma (0 for f8, §3.2),
# downsampling padding ("asymmetric": diffusers' SD-VAE; "symmetric": the authors' VAE, configs/ldm_*.yaml)
_AUTHORS = dict(layers_per_block=2, esm_blur=1.2, downsample_padding="symmetric")   # their shared settings
VAE_CONFIGS = {
    "f8d4":    dict(channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, esm_blur=0.0,
                    downsample_padding="asymmetric"),                             # SD-VAE
    "f16d16":  dict(_AUTHORS, channels=(128, 128, 256, 256, 512), latent_channels=16),  # the authors' presets
    "f16d32":  dict(_AUTHORS, channels=(128, 128, 256, 256, 512), latent_channels=32),
    "f32d64":  dict(_AUTHORS, channels=(128, 128, 256, 256, 512, 512), latent_channels=64),
    "f64d256": dict(_AUTHORS, channels=(128, 128, 256, 256, 512, 512, 1024), latent_channels=256),
    "tiny":    dict(_AUTHORS, channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_groups=8),  # ours, f4
}
DOWNSAMPLE_PADDINGS = ("asymmetric", "symmetric")


def _group_norm(c, groups=32):
    return nn.GroupNorm(min(groups, c), c, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, 1x1 shortcut when the channel count changes."""

    def __init__(self, cin, cout, groups=32):
        super().__init__()
        self.norm1 = _group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over all pixels, GroupNorm first, residual."""

    def __init__(self, c, groups=32):
        super().__init__()
        self.group_norm = _group_norm(c, groups)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)               # (B, HW, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    """ResNet block, self-attention, ResNet block at the lowest resolution."""

    def __init__(self, c, groups=32):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([SpatialAttention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv; padding "asymmetric" = (0, 1, 0, 1) then p=0 (diffusers), "symmetric" = p=1."""

    def __init__(self, c, padding="asymmetric"):
        super().__init__()
        self.asymmetric = padding == "asymmetric"
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0 if self.asymmetric else 1)

    def forward(self, x):                                      # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    """Nearest x2 upsampling, then a 3x3 conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level: ResNet blocks, then a stride-2 downsample (none at the last level)."""

    def __init__(self, resnets, downsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.downsamplers = nn.ModuleList([downsample] if downsample is not None else [])   # diffusers' names

    def forward(self, x):
        for m in (*self.resnets, *self.downsamplers):
            x = m(x)
        return x


class UpBlock(nn.Module):
    """One decoder level: ResNet blocks, then a x2 upsample (none at the last level)."""

    def __init__(self, resnets, upsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([upsample] if upsample is not None else [])

    def forward(self, x):
        for m in (*self.resnets, *self.upsamplers):
            x = m(x)
        return x


class Encoder(nn.Module):
    """Images -> 2C posterior moments; a stride-2 downsample after every level but the last."""

    def __init__(self, channels, layers_per_block, latent_channels, groups=32, downsample_padding="asymmetric"):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        levels, cin = [], channels[0]
        for i, c in enumerate(channels):
            last = i == len(channels) - 1
            res = [ResnetBlock(cin if j == 0 else c, c, groups) for j in range(layers_per_block)]
            levels.append(DownBlock(res, None if last else Downsample(c, downsample_padding)))
            cin = c
        self.down_blocks = nn.ModuleList(levels)
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = _group_norm(channels[-1], groups)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):                                      # (B, 3, H, W)
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))    # (B, 2C, H/f, W/f)


class Decoder(nn.Module):
    """Latents -> images; levels in reverse with one more ResNet block each, nearest x2 upsampling."""

    def __init__(self, channels, layers_per_block, latent_channels, groups=32):
        super().__init__()
        rev = list(reversed(channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups)
        levels, cin = [], rev[0]
        for i, c in enumerate(rev):
            last = i == len(rev) - 1
            res = [ResnetBlock(cin if j == 0 else c, c, groups) for j in range(layers_per_block + 1)]
            levels.append(UpBlock(res, None if last else Upsample(c)))
            cin = c
        self.up_blocks = nn.ModuleList(levels)
        self.conv_norm_out = _group_norm(channels[0], groups)
        self.conv_out = nn.Conv2d(channels[0], 3, 3, padding=1)

    def forward(self, z):                                      # (B, C, h, w)
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))    # (B, 3, h*f, w*f), no output nonlinearity


class VAE(nn.Module):
    """KL autoencoder with the SD-VAE layout; latents are normalised with latent_mean / latent_std.

    downsample_padding: "asymmetric" (SD-VAE; the default, so configs saved before this field rebuild as
    trained) or "symmetric" (the authors'). quant_conv / post_quant_conv: the 1x1 convs around the latent.
    """

    def __init__(self, channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 esm_blur=1.2, norm_groups=32, downsample_padding="asymmetric", quant_conv=True,
                 post_quant_conv=True, preset=None):
        super().__init__()
        if downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"VAE: downsample_padding must be one of {DOWNSAMPLE_PADDINGS}, "
                             f"got {downsample_padding!r}")
        self.config = dict(channels=tuple(channels), layers_per_block=layers_per_block,
                           latent_channels=latent_channels, esm_blur=esm_blur, norm_groups=norm_groups,
                           downsample_padding=downsample_padding, quant_conv=bool(quant_conv),
                           post_quant_conv=bool(post_quant_conv))
        self.preset = preset
        self.factor = 2 ** (len(channels) - 1)
        self.latent_channels = latent_channels
        self.esm_blur = esm_blur
        self.encoder = Encoder(channels, layers_per_block, latent_channels, norm_groups, downsample_padding)
        self.decoder = Decoder(channels, layers_per_block, latent_channels, norm_groups)
        C = latent_channels
        self.quant_conv = nn.Conv2d(2 * C, 2 * C, 1) if quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(C, C, 1) if post_quant_conv else nn.Identity()
        # per-channel latent statistics for stage 2, filled in after training
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    def check_size(self, x):
        """Raise a clear error when the image size is not a multiple of the downsampling factor."""
        H, W = x.shape[-2:]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"VAE expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if H % self.factor or W % self.factor:
            raise ValueError(f"image size {H}x{W} is not divisible by the VAE downsampling factor {self.factor}")

    def encode(self, x):
        """Images in [-1, 1] (B, 3, H, W) -> posterior (mean, logvar), each (B, C, H/f, W/f)."""
        self.check_size(x)
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """Latents (B, C, h, w) -> images (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    @staticmethod
    def sample(mean, logvar, eps=None):
        """Reparameterised posterior sample z = mean + exp(logvar / 2) * eps."""
        eps = torch.randn_like(mean) if eps is None else eps
        return mean + torch.exp(0.5 * logvar) * eps

    def normalize(self, z):
        """Latents -> zero-mean, unit-variance latents for the diffusion model."""
        return (z - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)

    def denormalize(self, z):
        return z * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)

    def forward(self, x):
        mean, logvar = self.encode(x)
        return self.decode(self.sample(mean, logvar)), mean, logvar


def build_vae(preset="f8d4", **overrides):
    """VAE from a VAE_CONFIGS preset, with optional overrides."""
    if preset not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose from {sorted(VAE_CONFIGS)}")
    return VAE(**{**VAE_CONFIGS[preset], **overrides}, preset=preset)


#################################################################################
#                               4. Stage-1 losses                               #
#################################################################################

class LPIPS(nn.Module):
    """LPIPS v0.1 with VGG16 features (Zhang et al., 2018); inputs in [-1, 1], output (B,)."""

    chns = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16
        feats = vgg16(weights=None).features
        cuts = (4, 9, 16, 23, 30)                              # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        self.slices = nn.ModuleList([feats[a:b] for a, b in zip((0,) + cuts[:-1], cuts)])
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in self.chns])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)

    @classmethod
    def from_state_dicts(cls, lin, vgg):
        """LPIPS from the v0.1 linear heads (lin{i}.model.1.weight) and torchvision VGG16 weights."""
        model = cls()
        for s in model.slices:                                 # slices keep VGG's layer indices as keys
            s.load_state_dict({k: vgg["features." + k] for k in s.state_dict()})
        for i, l in enumerate(model.lins):
            l.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        return model.eval()

    def forward(self, x, y):
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = 0.0
        for s, lin in zip(self.slices, self.lins):
            hx, hy = s(hx), s(hy)
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((nx - ny) ** 2).mean(dim=(2, 3))
        return total[:, 0]


class PatchGAN(nn.Module):
    """PatchGAN discriminator (Isola et al., 2017) as the authors' (modules/discriminator.py).

    A stride-2 conv, n_layers convs doubling the width (stride 2, the last 1) with BatchNorm, a 1-channel
    conv; kernel 4, padding 1, LeakyReLU. Their init_weights: conv weights N(0, 0.2^2) (VQGAN uses 0.02),
    conv biases PyTorch's default, BatchNorm weights N(1, 0.02^2) and biases 0.
    """

    def __init__(self, in_channels=3, ndf=64, n_layers=3, kernel_size=4, slope=0.2, init_std=0.2):
        super().__init__()
        layers, c = [nn.Conv2d(in_channels, ndf, kernel_size, 2, 1), nn.LeakyReLU(slope)], ndf
        for n in range(n_layers):
            layers += [nn.Conv2d(c, 2 * c, kernel_size, 2 if n < n_layers - 1 else 1, 1, bias=False),
                       nn.BatchNorm2d(2 * c), nn.LeakyReLU(slope)]
            c *= 2
        layers += [nn.Conv2d(c, 1, kernel_size, 1, 1)]
        self.main = nn.Sequential(*layers)
        for m in self.modules():                               # same order as their .apply(init_weights)
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, init_std)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)                                    # (B, 1, h, w) patch logits


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))), no 1/2 (as the
    authors' stage1_vae_trainer.py)."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def adaptive_gan_weight(rec_loss, gen_loss, last_layer, scale=0.5, max_weight=1e4, reduce=None, eps=1e-8):
    """VQGAN's adaptive weight as the authors': ||grad L_rec|| / max(||grad L_gen||, eps) at the decoder's
    last layer, clamped at max_weight, times scale (their disc_weight 0.5); detached. reduce(g) may average
    the gradients over ranks first, so every rank (and one process on the global batch) uses the same weight.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gen = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)[0]
    if reduce is not None:
        g_rec, g_gen = reduce(g_rec), reduce(g_gen)
    w = g_rec.norm() / g_gen.norm().clamp_min(eps)
    return w.clamp(max=max_weight).detach() * scale


def kl_loss(mean, logvar):
    """KL(q(z|x) || N(0, I)), summed over latent dims, averaged over the batch (as in LDM)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()


def eq_vae_scale(x, z, factor, vae_factor, min_image_size=1):
    """EQ-VAE scale equivariance (Kouzelis et al., 2025): bilinearly downscale z by `factor`
    and the image to the matching size; the decoder must map one to the other. The scaled image
    keeps at least min_image_size pixels per side (LPIPS and PatchGAN need about 32)."""
    h, w = z.shape[-2:]
    lo = -(-min_image_size // vae_factor)                      # ceil: smallest latent side allowed
    hs, ws = min(h, max(1, lo, round(h * factor))), min(w, max(1, lo, round(w * factor)))
    z_s = F.interpolate(z, size=(hs, ws), mode="bilinear", align_corners=False)
    x_s = F.interpolate(x, size=(hs * vae_factor, ws * vae_factor), mode="bilinear", align_corners=False)
    return x_s, z_s


#################################################################################
#                     5. DiT / SiT (REPA's SiT, adaLN-Zero)                     #
#################################################################################
# Layout and parameter names follow REPA's SiT (Yu et al., 2025; models/sit.py), itself DiT
# (Peebles & Xie, 2023) with a velocity output and projectors, so REPA checkpoints load as they are.
# LightningDiT options (Yao et al., 2025: QK-norm, RMSNorm, SwiGLU, 2-D RoPE) are off by default.

def modulate(x, shift, scale):
    """adaLN modulation of tokens x (N, T, D) by per-sample shift / scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _sincos_1d(dim, pos):
    """(M,) positions -> (M, dim) [sin | cos] embedding."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(dim, grid_hw):
    """Fixed 2-D sin-cos position embedding (h*w, dim); the first half encodes the column (as MAE / DiT)."""
    h, w = grid_hw
    gw, gh = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return np.concatenate([_sincos_1d(dim // 2, gw), _sincos_1d(dim // 2, gh)], axis=1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (N, T, D) with a strided conv."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x):                                                  # (N, C, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)                     # (N, T, D)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> 256 sinusoidal frequencies [cos | sin] -> Linear-SiLU-Linear (N, D)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        if frequency_embedding_size % 2:
            raise ValueError(f"frequency_embedding_size must be even, got {frequency_embedding_size}")
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)           # (N, dim), dim even

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(t.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D); one extra row (index num_classes) is the null class for CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        if force_drop_ids is not None:                                     # drop mask given by the caller
            labels = torch.where(force_drop_ids.bool(), self.num_classes, labels)
        elif train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019), optionally without affine weight."""

    def __init__(self, dim, eps=1e-6, affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype)
        return y * self.weight if self.weight is not None else y


def _block_norm(dim, rmsnorm):
    """The pre-modulation norm: LayerNorm without affine (DiT) or RMSNorm (LightningDiT)."""
    return RMSNorm(dim, affine=False) if rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class RoPE2D(nn.Module):
    """2-D rotary position embedding: half of each head's channels rotate with the row, half with the column."""

    def __init__(self, head_dim, grid_hw, theta=10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        h, w = grid_hw
        freqs = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))   # (hd/4,)
        rows = torch.arange(h).float().repeat_interleave(w)
        cols = torch.arange(w).float().repeat(h)
        ang = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)                 # (T, hd/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x):                                                  # (N, H, T, hd)
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)               # interleaved pairs
        c, s = self.cos, self.sin
        return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias through F.scaled_dot_product_attention (flash on GPU)."""

    def __init__(self, dim, num_heads, qk_norm=False, rmsnorm=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        norm = (lambda: RMSNorm(self.head_dim)) if rmsnorm else (lambda: nn.LayerNorm(self.head_dim))
        self.q_norm = norm() if qk_norm else nn.Identity()                 # timm's LayerNorm(head_dim) as in REPA
        self.k_norm = norm() if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (N, H, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)                        # (N, H, T, hd)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """Linear - tanh-GELU - Linear."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer, 2020) with 2/3 of the hidden width, so parameters match the GELU MLP."""

    def __init__(self, dim, hidden):
        super().__init__()
        hidden = int(2 * hidden / 3)
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero shift / scale / gate modulation from the condition."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=False, rmsnorm=False, swiglu=False):
        super().__init__()
        self.norm1, self.norm2 = _block_norm(dim, rmsnorm), _block_norm(dim, rmsnorm)
        self.attn = Attention(dim, num_heads, qk_norm, rmsnorm)
        self.mlp = (SwiGLU if swiglu else Mlp)(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope=None):                                   # x (N, T, D), c (N, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map to p*p*C values per token."""

    def __init__(self, dim, patch_size, out_channels, rmsnorm=False):
        super().__init__()
        self.norm_final = _block_norm(dim, rmsnorm)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))    # (N, T, p*p*C)


def _pair(v):
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


class DiT(nn.Module):
    """SiT/DiT with adaLN-Zero and REPA projectors; forward returns (velocity, [projections])."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, encoder_depth=8, z_dims=(768,),
                 projector_dim=2048, projector_type="mlp", projector_kernel_size=3,
                 qk_norm=False, rmsnorm=False, swiglu=False, rope=False):
        super().__init__()
        self.input_size = _pair(input_size)
        H, W = self.input_size
        if H % patch_size or W % patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {patch_size}")
        self.grid_size = (H // patch_size, W // patch_size)
        self.patch_size, self.in_channels = patch_size, in_channels
        self.out_channels = in_channels                                    # velocity only, as REPA's SiT
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_classes = int(num_classes)
        self.class_dropout_prob = class_dropout_prob
        self.z_dims = [int(z) for z in (z_dims or [])]
        self.encoder_depth = int(encoder_depth)
        self.projector_type = projector_type
        if self.z_dims and not 1 <= self.encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}] when z_dims is set, got {encoder_depth}")
        if projector_type not in ("mlp", "conv"):
            raise ValueError(f"projector_type must be 'mlp' or 'conv', got {projector_type!r}")

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # num_classes == 0: unconditional, no label table and no CFG
        self.y_embedder = LabelEmbedder(self.num_classes, hidden_size, class_dropout_prob) if self.num_classes else None
        T = self.grid_size[0] * self.grid_size[1]
        # fixed sin-cos embedding; a frozen Parameter (not a buffer) so REPA state dicts and counts match
        self.pos_embed = nn.Parameter(torch.zeros(1, T, hidden_size), requires_grad=False)
        self.rope = RoPE2D(hidden_size // num_heads, self.grid_size) if rope else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, rmsnorm, swiglu)
                                     for _ in range(depth)])
        self.projectors = nn.ModuleList([                                  # (N, T, D) -> (N, T, z) each
            build_mlp_projector(hidden_size, projector_dim, z) if projector_type == "mlp" else
            ConvProjector(hidden_size, z, projector_kernel_size, self.grid_size) for z in self.z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, rmsnorm)
        self.grad_checkpointing = False                                    # recompute blocks in backward
        self.initialize_weights()

    def initialize_weights(self):
        """REPA/DiT init: xavier linears, N(0, 0.02) label table and time MLP, zero adaLN and output."""
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic_init)
        pe = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data                               # patch embedding initialised like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:                                          # adaLN-Zero: every block starts as identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)                     # the output starts at zero
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        h, w = self.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x, y):
        """ValueError for a wrong latent shape or label tensor. Label values are checked where data enters
        (train.py, the samplers), not here: no device sync per step."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected latents (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"latent size {x.shape[-2]}x{x.shape[-1]} does not match the model's input_size "
                             f"{self.input_size}")
        if (y is None) != (self.y_embedder is None):
            raise ValueError("unconditional model (num_classes=0): pass y=None" if y is not None else
                             f"class-conditional model (num_classes={self.num_classes}): labels y are required")
        if y is not None and (y.dtype.is_floating_point or y.dtype == torch.bool or y.shape != (x.shape[0],)):
            raise ValueError(f"labels must be an integer tensor of shape ({x.shape[0]},), "
                             f"got {y.dtype} {tuple(y.shape)}")

    def forward(self, x, t, y=None, force_drop_ids=None):
        """x (N, C, H, W), t (N,) in [0, 1] (0 data, 1 noise), y (N,) int -> ((N, C, H, W), [(N, T, z)])."""
        self._check_inputs(x, y)
        x = self.x_embedder(x) + self.pos_embed                            # (N, T, D)
        c = self.t_embedder(t)                                             # (N, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training, force_drop_ids)      # (N, D)
        zs = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, self.rope, use_reentrant=False)  # recomputed
            else:
                x = block(x, c, self.rope)                                 # (N, T, D)
            if i + 1 == self.encoder_depth:
                zs = [p(x) for p in self.projectors]                       # [(N, T, z)] REPA projections
        x = self.final_layer(x, c)                                         # (N, T, p*p*C)
        return self.unpatchify(x), zs                                      # (N, C, H, W)


# DiT's registry, S/1 .. XL/4: depth, width, heads, and REPA's alignment depth (encoder_depth)
DiT_CONFIGS = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=width, num_heads=heads, encoder_depth=enc, patch_size=patch)
    for size, (depth, width, heads, enc) in {"S": (12, 384, 6, 4), "B": (12, 768, 12, 4), "L": (24, 1024, 16, 8),
                                             "XL": (28, 1152, 16, 8)}.items()
    for patch in (1, 2, 4)
}


def build_dit(name, **overrides):
    """DiT from a DiT_CONFIGS preset, with optional keyword overrides."""
    if name not in DiT_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(DiT_CONFIGS)}")
    return DiT(**{**DiT_CONFIGS[name], **overrides})


DiT_MODELS = {name: functools.partial(build_dit, name) for name in DiT_CONFIGS}   # DiT's registry view


#################################################################################
#                    6. REPA: projectors, targets, DoG, loss                    #
#################################################################################
# REPA (Yu et al., 2025) aligns the DiT's tokens after block encoder_depth, through a projector, with
# a frozen encoder's patch tokens; REPA-DoG (§4) band-passes those targets first.

def build_mlp_projector(hidden_size, projector_dim, z_dim):
    """REPA's projector: D -> projector_dim -> projector_dim -> z_dim with SiLU."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))


class ConvProjector(nn.Module):
    """iREPA's projector: one k x k conv on the (h, w) token grid (keeps spatial structure)."""

    def __init__(self, hidden_size, z_dim, kernel_size, grid_hw):
        super().__init__()
        self.conv = nn.Conv2d(hidden_size, z_dim, kernel_size, padding=kernel_size // 2)
        self.grid_hw = tuple(grid_hw)

    def forward(self, x):                                                  # (N, T, D)
        N, T, D = x.shape
        x = x.transpose(1, 2).reshape(N, D, *_grid_of(T, self.grid_hw))
        return self.conv(x).flatten(2).transpose(1, 2)                     # (N, T, z)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # torchvision's normalisation


def preprocess_repa_images(images, resolution):
    """REPA preprocessing: pixels / 255, ImageNet mean / std, bicubic resize to 224 * resolution / 256."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if images.dtype != torch.uint8 and x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):   # one sync per batch
        raise ValueError("float images must be in [0, 1] (or pass uint8 pixels in [0, 255])")
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    size = 224 * resolution // 256                                         # REPA: 224 at 256 px, 448 at 512 px
    return F.interpolate((x - mean) / std, size=(size, size), mode="bicubic")


@torch.no_grad()
def encode_repa_target(encoder, images, resolution):
    """Patch tokens x_norm_patchtokens (N, T, C) of the frozen encoder for uint8 or [0, 1] images."""
    feats = encoder.forward_features(preprocess_repa_images(images, resolution))
    if isinstance(feats, dict):
        feats = feats["x_norm_patchtokens"]
    return feats.float()                                                   # (N, T, C)


def _grid_of(T, grid_hw=None):
    """Token grid (h, w): the given one, or a square."""
    if grid_hw is not None:
        h, w = grid_hw
        if h * w != T:
            raise ValueError(f"grid {tuple(grid_hw)} does not hold {T} tokens")
        return int(h), int(w)
    s = int(round(math.sqrt(T)))
    if s * s != T:
        raise ValueError(f"{T} tokens are not a square grid; pass grid_hw")
    return s, s


def resize_token_grid(Z, grid_hw, src_grid_hw=None):
    """Resize target tokens (N, T, C) to another grid (bilinear) when the encoder's differs from the DiT's."""
    N, T, C = Z.shape
    h, w = _grid_of(T, src_grid_hw)
    if (h, w) == tuple(grid_hw):
        return Z
    z = Z.transpose(1, 2).reshape(N, C, h, w)
    z = F.interpolate(z.float(), size=tuple(grid_hw), mode="bilinear", align_corners=False)
    return z.flatten(2).transpose(1, 2)                                    # (N, T', C)


def _gaussian_blur_grid(z, sigma):
    """Depthwise separable Gaussian blur of z (N, C, h, w) with reflect padding (radius <= grid - 1)."""
    h, w = z.shape[-2:]
    r = max(1, min(int(math.ceil(3 * sigma)), h - 1, w - 1))
    g = gaussian_kernel1d(sigma, r, z.device).to(z.dtype)
    C = z.shape[1]
    z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(z, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def repa_target(Z, mode="raw", alpha=0.6, sigma1=0.5, sigma2=2.0, grid_hw=None, eps=1e-6):
    """REPA target from tokens Z (N, T, C): 'raw' (REPA), 'zscore' (iREPA) or 'dog' (REPA-DoG, §4).

    zscore: iREPA's spatial normalisation (Z - alpha * mean_T) / (std_T + 1e-6), unbiased std. alpha = 0.6
      as iREPA's latent-diffusion training passes it (iREPA@99ad4ac ldm/train.py --zscore-alpha); 1.0 is
      only its helper's unused default, 0.8 its pixel-space JiT's.
    dog: per channel on the token grid, G_sigma1 * Z - G_sigma2 * Z (Gaussian blurs, reflect padding),
      divided by the spatial std. The DoG has no DC response, but on a finite reflect-padded grid its
      output keeps a small spatial mean; we remove it before dividing, so the target has zero spatial
      mean exactly. The paper does not give its sigmas; sigma1 = 0.5 and sigma2 = 2.0 tokens are ours.
    """
    if mode == "raw":
        return Z
    if mode not in ("zscore", "dog"):
        raise ValueError(f"repa target mode must be 'raw', 'zscore' or 'dog', got {mode!r}")
    with torch.autocast(Z.device.type, enabled=False):          # float32 math, also under bf16 autocast
        Zf = Z.float()
        if mode == "zscore":
            return (Zf - alpha * Zf.mean(dim=1, keepdim=True)) / (Zf.std(dim=1, keepdim=True) + eps)
        N, T, C = Zf.shape
        h, w = _grid_of(T, grid_hw)
        if min(h, w) < 2:
            raise ValueError(f"the DoG target needs a token grid of at least 2x2, got {h}x{w}")
        z = Zf.transpose(1, 2).reshape(N, C, h, w)
        d = (_gaussian_blur_grid(z, sigma1) - _gaussian_blur_grid(z, sigma2)).flatten(2).transpose(1, 2)  # (N, T, C)
        d = d - d.mean(dim=1, keepdim=True)
        return d / (d.std(dim=1, keepdim=True) + eps)


def directional_spectral_energy(Z, grid=None, reduction="mean"):
    """RMS spatial contrast of per-token L2-normalised features = sqrt of their non-DC spectral energy.

    With u_t = Z_t / |Z_t| and an orthonormal 2-D DFT over the grid, sum_{k != 0} |U_k|^2 / T equals
    mean_t |u_t - mean(u)|^2 (Parseval); returns its square root, (N,) or its mean.
    """
    N, T, C = Z.shape
    _grid_of(T, grid)                                                      # validates the grid
    u = F.normalize(Z.float(), dim=-1)
    e = (u - u.mean(dim=1, keepdim=True)).pow(2).sum(-1).mean(-1).sqrt()   # (N,)
    return e.mean() if reduction == "mean" else e


def repa_loss(projected, targets):
    """REPA loss per sample (N,): minus the token-wise cosine, averaged over tokens and encoders."""
    projected, targets = ([v] if torch.is_tensor(v) else list(v) for v in (projected, targets))   # one per encoder
    if len(projected) != len(targets) or not projected:
        raise ValueError(f"repa_loss: {len(projected)} projections vs {len(targets)} targets")
    total = 0.0
    for z_hat, z in zip(projected, targets):
        if z_hat.shape != z.shape:
            raise ValueError(f"repa_loss: projection {tuple(z_hat.shape)} vs target {tuple(z.shape)} "
                             "(resize the target grid with resize_token_grid)")
        cos = (F.normalize(z_hat.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1)   # (N, T)
        total = total - cos.mean(-1)
    return total / len(projected)                                          # (N,)


#################################################################################
#                                7. Flow matching                               #
#################################################################################
# Time convention (REPA): t = 0 is data, t = 1 is noise; x_t = (1 - t) x + t eps and the model
# predicts the velocity v = dx_t/dt = eps - x. Samplers integrate from t = 1 down to t = 0.

def sample_time(n, weighting="uniform", generator=None, device=None):
    """t (n,): U(0,1) ('uniform') or logit-normal(0,1) ('lognormal', REPA: sigma=e^n, t=sigma/(1+sigma))."""
    if weighting == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if weighting == "lognormal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))
    raise ValueError(f"weighting must be 'uniform' or 'lognormal', got {weighting!r}")


def flow_loss(model, x, y=None, t=None, noise=None, weighting="uniform", drop_ids=None, repa_targets=None,
              repa_lambda=0.5, cos_weight=0.0, generator=None):
    """Flow-matching loss dict: per-sample 'mse' (and 'cos', 'repa') (N,), scalar 'loss', and 't'.

    t, noise and drop_ids may be passed explicitly so that the randomness comes from one global
    per-step generator, independent of the number of processes. drop_ids (N,) bool marks labels
    replaced by the null class (CFG dropout); if None the model drops at random in train mode.
    loss = mean(mse) + cos_weight * mean(1 - cos_channels(v, target))   [LightningDiT velocity direction]
           + repa_lambda * mean(repa)                                    [REPA, lambda = 0.5]
    """
    N = x.shape[0]
    dev = x.device if generator is None else generator.device
    if t is None:
        t = sample_time(N, weighting, generator=generator, device=dev)
    t = torch.as_tensor(t, dtype=x.dtype).to(x.device).reshape(-1)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=dev)
    noise = noise.to(device=x.device, dtype=x.dtype)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x + tt * noise                                        # (N, C, H, W)
    target = (noise - x).float()                                           # velocity
    v, zs = model(x_t, t, y, force_drop_ids=drop_ids)
    v = v.float()
    mse = (v - target).pow(2).mean(dim=(1, 2, 3))                          # (N,)
    out = {"mse": mse, "t": t}
    loss = mse.mean()
    if cos_weight:
        cos = (1 - F.cosine_similarity(v, target, dim=1)).mean(dim=(1, 2))  # (N,)
        out["cos"] = cos
        loss = loss + cos_weight * cos.mean()
    if repa_targets is not None and repa_lambda:
        rl = repa_loss(zs, repa_targets)                                   # (N,)
        out["repa"] = rl
        loss = loss + repa_lambda * rl.mean()
    out["loss"] = loss
    return out


#################################################################################
#          8. Samplers (REPA's euler_sampler / euler_maruyama_sampler)          #
#################################################################################

@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode (no label dropout), its mode restored afterwards."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def _sampler_setup(model, y, cfg_scale):
    """The null class index for CFG (None for unconditional models); checks y."""
    nc = model.num_classes
    if nc == 0:
        if y is not None:
            raise ValueError("unconditional model: pass y=None")
        if cfg_scale > 1.0:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        return None
    if y is None:
        raise ValueError("class-conditional model: labels y are required")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= nc):
        raise ValueError(f"class label out of range: got [{int(y.min())}, {int(y.max())}], expected [0, {nc}) "
                         "(the null class is added by classifier-free guidance)")
    return nc


def _guided(model, x, t_cur, y, cfg_scale, use_cfg, dtype, null_class, drift=None):
    """Model velocity (or drift(v, x, t)) at x, t_cur in float64, with CFG on all channels when use_cfg."""
    if use_cfg:
        x_in, y_in = torch.cat([x, x]), torch.cat([y, torch.full_like(y, null_class)])
    else:
        x_in, y_in = x, y
    t_in = torch.full((x_in.shape[0],), float(t_cur), dtype=torch.float64, device=x.device)
    out = model(x_in.to(dtype), t_in.to(dtype), y_in)[0].to(torch.float64)
    if drift is not None:
        out = drift(out, x_in, t_in)
    if use_cfg:
        cond, uncond = out.chunk(2)
        out = uncond + cfg_scale * (cond - uncond)
    return out


@torch.no_grad()
def sample_ode(model, noise, y, steps=50, cfg_scale=1.0, guidance_interval=(0.0, 1.0), heun=False):
    """Probability-flow ODE from t=1 (noise) to t=0 on linspace(1, 0, steps+1); returns float64 latents.

    As REPA's euler_sampler: state in float64, model called in noise.dtype, CFG when cfg_scale > 1 and
    low <= t_cur <= high (null class = num_classes); with heun=True the last step stays Euler and the
    corrector reuses the guidance decision made at t_cur.
    """
    null_class = _sampler_setup(model, y, cfg_scale)
    low, high = guidance_interval
    dtype = noise.dtype
    t_steps = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x_next = noise.to(torch.float64)
    with _eval_mode(model):
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            x_cur = x_next
            use_cfg = bool(cfg_scale > 1.0 and low <= t_cur <= high)
            d_cur = _guided(model, x_cur, t_cur, y, cfg_scale, use_cfg, dtype, null_class)
            x_next = x_cur + (t_next - t_cur) * d_cur
            if heun and i < steps - 1:
                d_prime = _guided(model, x_next, t_next, y, cfg_scale, use_cfg, dtype, null_class)
                x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def _sde_drift(v, x, t):
    """Reverse-SDE drift v - 0.5 g^2 score with g^2 = 2t; score from the velocity (linear path, as REPA)."""
    t = t.view(-1, *([1] * (x.ndim - 1)))
    alpha_ratio = -(1 - t)                                                 # alpha_t / d(alpha_t)/dt
    var = t ** 2 - alpha_ratio * t
    score = (alpha_ratio * v - x) / var
    return v - 0.5 * (2 * t) * score


@torch.no_grad()
def sample_sde(model, noise, y, steps=250, cfg_scale=1.0, guidance_interval=(0.0, 1.0), generator=None):
    """Euler-Maruyama (REPA's euler_maruyama_sampler): diffusion 2t on linspace(1, 0.04, steps), then a
    final noise-free mean step from 0.04 to 0. The float64 noise comes from the global RNG (REPA), or from
    `generator`, a list with one torch.Generator per sample, so that it does not depend on the batch."""
    null_class = _sampler_setup(model, y, cfg_scale)
    low, high = guidance_interval
    dtype = noise.dtype
    t_steps = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x_next = noise.to(torch.float64)
    with _eval_mode(model):
        for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
            dt = t_next - t_cur
            x_cur = x_next
            use_cfg = bool(cfg_scale > 1.0 and low <= t_cur <= high)
            eps = torch.randn_like(x_cur) if generator is None else torch.stack(
                [torch.randn(x_cur.shape[1:], generator=g, dtype=torch.float64) for g in generator]).to(x_cur.device)
            d_cur = _guided(model, x_cur, t_cur, y, cfg_scale, use_cfg, dtype, null_class, drift=_sde_drift)
            x_next = x_cur + d_cur * dt + torch.sqrt(2 * t_cur) * eps * torch.sqrt(torch.abs(dt))
        t_cur, t_next = t_steps[-2], t_steps[-1]
        use_cfg = bool(cfg_scale > 1.0 and low <= t_cur <= high)
        d_cur = _guided(model, x_next, t_cur, y, cfg_scale, use_cfg, dtype, null_class, drift=_sde_drift)
        return x_next + (t_next - t_cur) * d_cur


#################################################################################
#                                 9. Dead leaves                                #
#################################################################################
# Dead leaves (Matheron 1968; Lee, Mumford & Huang 2001): opaque random shapes with radii drawn
# from p(r) ~ r^-3 occlude each other, which gives scale invariance and a ~1/f^2 power spectrum,
# the statistics that make natural images' spectra a power law. 10 classes = 5 palettes x 2 shapes.

DEADLEAVES_PALETTES = (
    ((0.90, 0.25, 0.15), (0.95, 0.60, 0.10), (0.60, 0.10, 0.10), (1.00, 0.85, 0.40)),   # fire
    ((0.10, 0.30, 0.80), (0.20, 0.65, 0.90), (0.05, 0.10, 0.35), (0.60, 0.85, 1.00)),   # sea
    ((0.15, 0.55, 0.20), (0.55, 0.80, 0.25), (0.05, 0.25, 0.10), (0.80, 0.90, 0.50)),   # forest
    ((0.15, 0.15, 0.15), (0.50, 0.50, 0.50), (0.85, 0.85, 0.85), (0.35, 0.30, 0.30)),   # ash
    ((0.55, 0.20, 0.65), (0.90, 0.45, 0.75), (0.25, 0.05, 0.35), (0.95, 0.80, 0.95)),   # bloom
)
DEADLEAVES_SHAPES = ("disk", "square")


def deadleaves_image(index, size=64, seed=0, num_classes=10, r_min=None, r_max=0.5, n_shapes=300):
    """Deterministic dead-leaves image for (index, seed): (uint8 (size, size, 3), label).

    Radii are fractions of the image side; r_min defaults to max(0.02, 3 / size), no sub-pixel leaves.
    """
    r_min = max(0.02, 3.0 / size) if r_min is None else r_min
    label = index % num_classes
    palette = np.asarray(DEADLEAVES_PALETTES[(label // 2) % len(DEADLEAVES_PALETTES)])
    shape = DEADLEAVES_SHAPES[label % 2]
    rng = np.random.default_rng([seed, index])
    s = 2 * size                                               # render at 2x, then box-filter down
    yy, xx = np.meshgrid((np.arange(s) + 0.5) / s, (np.arange(s) + 0.5) / s, indexing="ij")
    img = np.zeros((s, s, 3))
    covered = np.zeros((s, s), dtype=bool)
    # inverse-CDF sample of p(r) ~ r^-3 on [r_min, r_max]
    u = rng.random(n_shapes)
    radii = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5
    centers = rng.random((n_shapes, 2)) * 1.2 - 0.1
    colors = palette[rng.integers(0, len(palette), n_shapes)] * rng.uniform(0.8, 1.2, (n_shapes, 1))
    for r, (cy, cx), col in zip(radii, centers, colors):       # front to back: first leaf on top
        if shape == "disk":
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            m = (np.abs(yy - cy) < r * 0.8) & (np.abs(xx - cx) < r * 0.8)
        m &= ~covered
        img[m] = col
        covered |= m
        if covered.all():
            break
    img[~covered] = palette[0] * 0.5
    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


class DeadLeaves(torch.utils.data.Dataset):
    """The embedded procedural dataset: `length` dead-leaves images in [-1, 1] with class labels."""

    def __init__(self, length=10000, image_size=64, seed=0, num_classes=10):
        self.length, self.image_size, self.seed, self.num_classes = length, image_size, seed, num_classes

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        img, label = deadleaves_image(i, self.image_size, self.seed, self.num_classes)
        return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0, label


#################################################################################
#       Appendix: interop (pretrained weights and other codebases' files)       #
#################################################################################

def fetch_weights(url, path, what, filename=None, flag="its path"):
    """A local weights file: an explicit path, else the torch hub cache, else a download into that cache.
    Offline, the error names the URL, the cache file and the flag that passes a path."""
    if path is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what} weights not found at {path}")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename or os.path.basename(url))
    if not os.path.exists(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(url, cached, progress=False)
        except Exception as e:
            raise RuntimeError(f"could not download {what} weights from {url} ({type(e).__name__}: {e}). "
                               f"Offline: put the file at {cached} or pass {flag}") from None
    return cached


LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def lpips_files(path=None, vgg_path=None):
    """Local files of the LPIPS v0.1 linear heads and of VGG16 (fetch_weights: given path, cache or download)."""
    return (fetch_weights(LPIPS_URL, path, "LPIPS v0.1 linear-head", "lpips_v0.1_vgg.pth", "--lpips-path"),
            fetch_weights(VGG16_URL, vgg_path, "VGG16", flag="--vgg-path"))


def load_lpips(path=None, vgg_path=None):
    """LPIPS-VGG with pretrained weights: linear heads from `path` and VGG16 from `vgg_path`, else the
    torch hub cache, else their public URLs. Offline without them: a RuntimeError saying how to
    provide them or to train with --lpips-weight 0."""
    try:
        lin, vgg = lpips_files(path, vgg_path)
    except (RuntimeError, FileNotFoundError) as e:
        raise RuntimeError(f"{e}. Or pass --lpips-weight 0 to train without LPIPS.") from None
    return LPIPS.from_state_dicts(torch.load(lin, map_location="cpu", weights_only=True),
                                  torch.load(vgg, map_location="cpu", weights_only=True))


_SAFETENSORS_DTYPES = {k: v for k, v in dict(
    F64=torch.float64, F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16, I64=torch.int64, I32=torch.int32,
    I16=torch.int16, I8=torch.int8, U8=torch.uint8, BOOL=torch.bool, U16=getattr(torch, "uint16", None),
    U32=getattr(torch, "uint32", None), U64=getattr(torch, "uint64", None),
    F8_E4M3=getattr(torch, "float8_e4m3fn", None), F8_E5M2=getattr(torch, "float8_e5m2", None),
).items() if v is not None}


def load_safetensors(path, with_metadata=False):
    """Read a .safetensors file without the safetensors package -> {name: tensor} on the CPU.

    Format (huggingface/safetensors): a u64 little-endian header length N, N bytes of JSON {name: {"dtype",
    "shape", "data_offsets": [begin, end]}, optional "__metadata__": {str: str}}, then little-endian data,
    offsets counted from its first byte. with_metadata=True returns (tensors, metadata dict).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file ({len(raw)} bytes; the 8-byte header length is missing)")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ValueError(f"{path}: truncated or not a safetensors file (header of {n} bytes, {len(raw) - 8} follow)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))              # the format requires UTF-8
        metadata = header.pop("__metadata__", None) or {}
    except (ValueError, TypeError, AttributeError) as e:      # also UnicodeDecodeError, or not an object
        raise ValueError(f"{path}: the safetensors header is not a valid JSON object ({e})") from None
    data, out = memoryview(raw)[8 + n:], {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], map(int, info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r} "
                             f"(supported: {sorted(_SAFETENSORS_DTYPES)})")
        dt = _SAFETENSORS_DTYPES[dtype]
        if end > len(data):
            raise ValueError(f"{path}: truncated: tensor {name!r} ends at byte {end} "
                             f"of a {len(data)}-byte data section")
        if min(shape, default=0) < 0 or not 0 <= begin <= end:
            raise ValueError(f"{path}: tensor {name!r} has a bad shape {shape} or data_offsets {[begin, end]}")
        nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        if end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype} "
                             f"(expected {nbytes})")
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=dt) if nbytes else torch.empty(0, dtype=dt)
        if sys.byteorder == "big":                             # the file is little-endian
            t = t.view(torch.uint8).view(-1, t.element_size()).flip(1).contiguous().view(dt)
        out[name] = t.reshape(shape)                           # an own, writable copy
    return (out, dict(metadata)) if with_metadata else out


def _weights_in(path_or_state_dict, names):
    """A state dict: the given one, or read from a .safetensors / torch file, or the first of `names` in a folder."""
    if isinstance(path_or_state_dict, dict):
        return path_or_state_dict
    p = os.fspath(path_or_state_dict)
    if os.path.isdir(p):
        found = [os.path.join(p, n) for n in names if os.path.exists(os.path.join(p, n))]
        if not found:
            raise FileNotFoundError(f"no {' or '.join(names)} in {p}")
        p = found[0]
    if not os.path.exists(p):
        raise FileNotFoundError(f"weights file not found: {p}")
    return load_safetensors(p) if p.endswith(".safetensors") else torch.load(p, map_location="cpu", weights_only=True)


def _check_fit(sd, expected, what, preset, hint=""):
    """Raise one clear error when state dict `sd` does not fit the {key: shape} `expected`."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in sd if k in expected and tuple(sd[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} do not fit VAE preset {preset!r}: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another shape "
                         f"(e.g. {[(k, tuple(sd[k].shape), tuple(expected[k])) for k in wrong[:3]]}){hint}")


_OLD_ATTN_KEYS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def convert_diffusers_vae_keys(state_dict):
    """Map old diffusers attention names (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0."""
    out = {}
    for k, v in state_dict.items():
        parts = k.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _OLD_ATTN_KEYS:
            k = ".".join(parts[:-2] + [_OLD_ATTN_KEYS[parts[-2]], parts[-1]])
        if ".attentions." in k and v.ndim == 4 and v.shape[-2:] == (1, 1) and k.endswith("weight") \
                and "group_norm" not in k:
            v = v[:, :, 0, 0]                                  # 1x1-conv attention weights of very old files
        out[k] = v
    return out


def load_sd_vae(path_or_state_dict, preset="f8d4"):
    """Load diffusers-format AutoencoderKL weights (e.g. stabilityai/sd-vae-ft-ema) into a VAE.

    path_or_state_dict: a diffusion_pytorch_model.bin / .safetensors file, its folder, or a state dict (old
    or new attention key names); asymmetric downsampling padding. f8d4 stores SD's scale as latent_std = 1 / 0.18215.
    """
    sd = _weights_in(path_or_state_dict, ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"))
    sd = convert_diffusers_vae_keys(sd)
    vae = build_vae(preset, downsample_padding="asymmetric") if isinstance(preset, str) else VAE(**preset)
    own = {k: v.shape for k, v in vae.state_dict().items() if k not in ("latent_mean", "latent_std")}
    _check_fit({k: v for k, v in sd.items() if k not in ("latent_mean", "latent_std")}, own, "weights", preset)
    vae.load_state_dict(sd, strict=False)
    if preset == "f8d4" and "latent_std" not in sd:
        vae.latent_std.fill_(1 / 0.18215)
    return vae.eval()


# Our parameter names -> the authors' (modules/vae.py: VAEEncoder / VAEDecoder / EncoderDecoder;
# modules/layers.py: ResidualBlock2D, DownSampleBlock2D, UpSampleBlock2D; modules/transformer.py: Attention).
_OFFICIAL_KEY_RULES = [(re.compile(a), b) for a, b in (
    (r"^quant_conv\.", "post_encoder_conv."),
    (r"^post_quant_conv\.", "pre_decoder_conv."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.encoder_blocks.\1.blocks."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
     r"encoder.encoder_blocks.\1.downsample.downsample_conv."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.decoder_blocks.\1.blocks."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"decoder.decoder_blocks.\1.upsample.upsample.1."),
    (r"^(encoder|decoder)\.mid_block\.", r"\1.attn_block."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.out_norm."),
    (r"\.group_norm\.", ".groupnorm."),
    (r"\.to_(q|k|v)\.", r".\1_proj."),
    (r"\.to_out\.0\.", ".out_proj."),
    (r"\.conv_shortcut\.", ".identity_conv."),
)]


def _official_vae_key(key):
    """The authors' state-dict name (model.safetensors) of one of our VAE parameter names."""
    for pattern, repl in _OFFICIAL_KEY_RULES:
        key = pattern.sub(repl, key)
    return key


def _official_config_guess(sd):
    """VAE kwargs read off the authors' weights (channels, ResNets per level, latent channels), or None."""
    is_conv = lambda w: torch.is_tensor(w) and w.ndim == 4                     # noqa: E731
    first_convs = (sd.get(f"encoder.encoder_blocks.{i}.blocks.0.conv1.weight") for i in range(len(sd)))
    channels = tuple(int(w.shape[0]) for w in itertools.takewhile(is_conv, first_convs))
    if not channels or not is_conv(sd.get("decoder.conv_in.weight")):
        return None
    layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.encoder_blocks.0.blocks.")})
    return dict(channels=channels, layers_per_block=layers, latent_channels=int(sd["decoder.conv_in.weight"].shape[1]))


def load_official_vae(path_or_state_dict, preset="f16d16", scale_factor=None):
    """Load the authors' VAE weights (forever208/SpectrumMatching) into a VAE that reproduces theirs.

    path_or_state_dict: their model.safetensors (accelerate's save_state; model_1 / model_2 are LPIPS and
    the discriminator), its folder, or a state dict with their key names. preset: a VAE_CONFIGS name, a
    dict of VAE kwargs, or None to read the layout off the weights. Downsampling is always symmetric.
    encode / decode then equal their encode's mu / logvar and forward_dec.

    The latent scale is not in the weights: their stage 2 multiplies z by `scaling_constants` from
    configs/ldm_*.yaml (imagenet 0.9515730, celeba256 0.9010), no shift. Pass it as scale_factor to
    store latent_std = 1 / scale_factor (latent_mean stays 0); else latent_std = 1.
    """
    sd = _weights_in(path_or_state_dict, ("model.safetensors", "pytorch_model.bin"))
    if sd and all(k.startswith("module.") for k in sd):        # saved from a DDP-wrapped model
        sd = {k[len("module."):]: v for k, v in sd.items()}
    guess = _official_config_guess(sd)
    if preset is None:
        if guess is None:
            raise ValueError("load_official_vae: cannot read the VAE layout off these weights "
                             "(no encoder.encoder_blocks.*); pass preset=")
        preset = guess
    if isinstance(preset, dict) and preset.get("downsample_padding", "symmetric") != "symmetric":
        raise ValueError("load_official_vae: the authors' VAE pads its downsampling symmetrically; "
                         f"got downsample_padding={preset['downsample_padding']!r}")
    vae = build_vae(preset, downsample_padding="symmetric") if isinstance(preset, str) else \
        VAE(**{**preset, "downsample_padding": "symmetric"})
    own = vae.state_dict()
    ours = {_official_vae_key(k): k for k in own if k not in ("latent_mean", "latent_std")}  # theirs -> ours
    hint = f"; these weights look like {guess}" if guess else ""
    _check_fit(sd, {k: own[k2].shape for k, k2 in ours.items()}, "the authors' VAE weights", preset, hint)
    vae.load_state_dict({ours[k]: v for k, v in sd.items()}, strict=False)
    if scale_factor is not None:
        if not scale_factor > 0:
            raise ValueError(f"load_official_vae: scale_factor must be positive, got {scale_factor}")
        vae.latent_std.fill_(1.0 / scale_factor)
    return vae.eval()


_REPA_SIT_DEFAULTS = dict(
    input_size=32, patch_size=2, in_channels=4, hidden_size=1152, decoder_hidden_size=None, encoder_depth=8,
    depth=28, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, z_dims=[768],
    projector_dim=2048, qk_norm=False, projection_layer_type="mlp", proj_kwargs_kernel_size=3,
)
_REPA_SIT_IGNORED = {"path_type", "use_cfg", "fused_attn", "eval_mode"}


def load_repa_sit(state_dict, which="ema", **repa_kwargs):
    """Build a DiT from REPA's SiT(...) kwargs and load a REPA train.py state dict (raw, or its 'ema'/'model')."""
    unknown = set(repa_kwargs) - set(_REPA_SIT_DEFAULTS) - _REPA_SIT_IGNORED
    if unknown:
        raise TypeError(f"load_repa_sit: unknown REPA SiT arguments {sorted(unknown)}")
    kw = {**_REPA_SIT_DEFAULTS, **repa_kwargs}
    if kw["decoder_hidden_size"] not in (None, kw["hidden_size"]):
        raise ValueError("REPA SiT with decoder_hidden_size != hidden_size cannot run its forward; not supported")
    if "ema" in state_dict or "model" in state_dict:
        state_dict = state_dict[which] if which in state_dict else state_dict["ema" if "ema" in state_dict else "model"]
    sd = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        k = k.replace(".projection_layer.", ".conv." if kw["projection_layer_type"] == "conv" else ".")
        sd[k] = v
    same = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
            "class_dropout_prob", "num_classes", "encoder_depth", "z_dims", "projector_dim", "qk_norm")
    model = DiT(**{k: kw[k] for k in same}, projector_type=kw["projection_layer_type"],
                projector_kernel_size=kw["proj_kwargs_kernel_size"])
    key = "y_embedder.embedding_table.weight"
    if key in sd and model.y_embedder is not None and sd[key].shape[0] == model.num_classes:
        # REPA with class_dropout_prob=0 has no null row; append an (unused) zero row
        sd[key] = torch.cat([sd[key], sd[key].new_zeros(1, sd[key].shape[1])])
    model.load_state_dict(sd, strict=True)
    return model.eval()


def resample_abs_pos_embed(pos_embed, new_hw, num_prefix_tokens=1, old_hw=None):
    """Resample absolute position embeddings (1, P + h*w, D) to a new grid, keeping the P prefix tokens.

    Antialiased bicubic interpolation of the (h, w) grid (align_corners=False), as timm's
    resample_abs_pos_embed that REPA applies to DINOv2 at load time; old_hw defaults to a square grid.
    Returns (1, P + new_h*new_w, D) in the input dtype (interpolated in float32).
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, dim), got {tuple(pos_embed.shape)}")
    T = pos_embed.shape[1] - num_prefix_tokens
    h, w = (math.isqrt(T),) * 2 if old_hw is None else (int(old_hw[0]), int(old_hw[1]))
    if T < 1 or h * w != T:
        raise ValueError(f"{T} position tokens (after {num_prefix_tokens} prefix tokens) do not form "
                         f"{'a square grid; pass old_hw' if old_hw is None else f'the grid {h}x{w}'}")
    new_hw = (int(new_hw[0]), int(new_hw[1]))
    if (h, w) == new_hw:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    g = grid.float().reshape(1, h, w, D).permute(0, 3, 1, 2)                 # (1, D, h, w)
    g = F.interpolate(g, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
    g = g.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)         # (1, h'*w', D)
    return torch.cat([prefix, g], dim=1)


def repa_token_grid(resolution, patch_size=14):
    """Token grid side of the target encoder at a training resolution: images are resized to
    224 * resolution / 256 (preprocess_repa_images), so 16 at 256 px and 32 at 512 px as REPA."""
    return (224 * resolution // 256) // patch_size


def resample_encoder_pos_embed(encoder, resolution):
    """Resample a ViT encoder's pos_embed once to its token grid at `resolution` (REPA's load-time step),
    so DINOv2's per-call interpolate_pos_encoding returns it unchanged. No-op without pos_embed."""
    pe = getattr(encoder, "pos_embed", None)
    if pe is None:
        return encoder
    n = repa_token_grid(resolution, int(getattr(encoder, "patch_size", 14)))
    if n < 1:
        raise ValueError(f"resolution {resolution} gives no {getattr(encoder, 'patch_size', 14)}-pixel patches")
    pe.data = resample_abs_pos_embed(pe.data, (n, n), num_prefix_tokens=1)
    return encoder


def load_dinov2(name="dinov2_vitb14", path=None, device="cpu", resolution=256):
    """Frozen DINOv2 target encoder via torch.hub (path: a local clone of facebookresearch/dinov2).

    Its position embeddings (37x37 grid, trained at 518 px) are resampled once to the token grid at
    `resolution` (16x16 at 256 px, 32x32 at 512 px) with antialiased bicubic interpolation, as REPA's
    load_encoders (utils.py) does with timm's resample_abs_pos_embed; pass the training image size.
    """
    try:
        if path is not None:
            enc = torch.hub.load(path, name, source="local")
        else:
            enc = torch.hub.load("facebookresearch/dinov2", name, trust_repo=True, skip_validation=True)
    except Exception as e:                                                 # offline, missing cache, bad name
        raise RuntimeError(
            f"could not load the REPA target encoder {name!r} ({type(e).__name__}: {e}). Offline: run torch.hub.load("
            f"'facebookresearch/dinov2', '{name}') on a machine with network and copy $TORCH_HOME/hub (default "
            "~/.cache/torch/hub) here, pass path=<a clone of facebookresearch/dinov2>, or train without alignment "
            "(--repa-encoder none).") from None
    enc = resample_encoder_pos_embed(enc, resolution)
    return enc.to(device).eval().requires_grad_(False)
