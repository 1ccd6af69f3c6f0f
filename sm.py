"""
Spectrum Matching latent diffusion in one file.

Ning et al., 2026, "Spectrum Matching: a Unified Perspective for Superior Diffusability in Latent
Diffusion". The file follows the data: images and latents are compared through their spectra, the
autoencoder is trained to match them, a diffusion transformer learns the latents, and samplers turn
noise back into latents. Top to bottom:

  1. Spectra               dct2 / idct2, radial_spectrum, gaussian_blur
  2. Spectrum Matching     esm_loss (Encoding SM, §3.2), dsm_mask (Decoding SM, §3.3)
  3. Autoencoder           SD-VAE layout (diffusers AutoencoderKL), VAE_CONFIGS
  4. Stage-1 objective     LPIPS-VGG, PatchGAN, KL, EQ-VAE, REG_PRESETS, stage1_loss, EMA, latent stats
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

import collections
import functools
import itertools
import json
import math
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

@functools.cache
def dct_matrix(n, device=None):
    """Orthonormal DCT-II matrix C (n, n), so that dct(x) = C @ x; cached per (n, device), do not modify."""
    with torch.inference_mode(False):                    # built outside inference mode, so autograd can use it later
        k = torch.arange(n, dtype=torch.float64)[:, None]
        i = torch.arange(n, dtype=torch.float64)[None, :]
        c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
        c[0] /= math.sqrt(2.0)
        return c.to(device=device, dtype=torch.float32)


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


@functools.cache
def _radial_bins(h, w, n_bins, device):
    """(bin index (h*w,), coefficients per bin (n_bins,)) by radius sqrt(u^2 + v^2), DC at (0, 0); cached."""
    with torch.inference_mode(False):                    # as dct_matrix
        u = torch.arange(h, dtype=torch.float32)[:, None]
        v = torch.arange(w, dtype=torch.float32)[None, :]
        r_max = max(math.sqrt((h - 1) ** 2 + (w - 1) ** 2), 1.0)        # the largest radius
        bins = torch.floor(torch.sqrt(u ** 2 + v ** 2) / r_max * n_bins).clamp(0, n_bins - 1).long().flatten()
        counts = torch.bincount(bins, minlength=n_bins).clamp_min(1).float()
        return bins.to(device), counts.to(device)


def radial_spectrum(x, n_bins=16):
    """Radially binned DCT power spectrum (B, n_bins) of x (B, C, H, W), channel-averaged (§3.1)."""
    x = x.float()
    x = x - x.mean(dim=(-2, -1), keepdim=True)                            # remove each (sample, channel) mean
    p = dct2(x).pow(2).mean(dim=1).clamp_min(1e-8).flatten(1)             # (B, H*W) channel-averaged power
    bins, counts = _radial_bins(*x.shape[-2:], n_bins, p.device)         # (H*W,), (n_bins,)
    sums = p.new_zeros(len(p), n_bins).index_add_(1, bins[1:], p[:, 1:])  # without the DC entry
    return sums / (counts + 1e-8)


def gaussian_kernel1d(sigma, radius, device=None):
    """Normalised Gaussian taps exp(-i^2 / (2 sigma^2)), i = -radius..radius, float32 (2 radius + 1,)."""
    i = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    g = torch.exp(-i ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def gaussian_blur(x, sigma, kernel_size, padding="constant"):
    """Depthwise separable Gaussian blur of x (B, C, H, W), odd kernel_size, zero or "reflect" padding."""
    r, C = kernel_size // 2, x.shape[1]
    g = gaussian_kernel1d(sigma, r, x.device).to(x.dtype)                # the 2-D kernel g g^T sums to 1
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=padding), g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=padding), g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


#################################################################################
#                              2. Spectrum Matching                             #
#################################################################################

def spectrum_profiles(x, z, delta=1.0, n_bins=16, blur_sigma=1.2, blur_kernel=7):
    """Normalised log spectra (target, latent, image) (B, n_bins) of ESM (§3.2), in float32; image: unflattened."""
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
    """Encoding Spectrum Matching (§3.2): KL(target || latent) of normalised log radial spectra, for images x
    (B, 3, H, W) and latents z (B, C, h, w); target: x's spectrum at z's size, flattened by f**delta."""
    s_x, s_z, _ = spectrum_profiles(x, z, delta, n_bins, blur_sigma, blur_kernel)
    kl = (s_x * (torch.log(s_x + 1e-8) - torch.log(s_z + 1e-8))).sum(dim=-1)
    return kl.mean()


def dsm_keep_mask(k, block=8, device=None):
    """(block, block) 0/1 mask of the DCT coefficients DSM keeps: u + v < 2(block-1) - (k-1)."""
    u = torch.arange(block, device=device)[:, None]
    v = torch.arange(block, device=device)[None, :]
    return ((u + v) < 2 * (block - 1) - (k - 1)).float()


def dsm_mask(x, z, k, block=8):
    """Decoding Spectrum Matching (§3.3): the block-DCT low-pass dsm_keep_mask on image and latent (k = 0: none)."""
    if k != int(k) or not 0 <= k <= 2 * block - 2:
        raise ValueError(f"dsm_mask: k must be an integer in [0, {2 * block - 2}] for block {block}")
    if k == 0:
        return x, z
    out = []
    for t in (x, z):                                           # (B, C, H, W): every block x block tile low-passed
        B, C, H, W = t.shape
        if H % block or W % block:
            raise ValueError(f"dsm_mask: spatial size {H}x{W} is not divisible by the DSM block size {block}")
        tiles = t.reshape(B, C, H // block, block, W // block, block).transpose(3, 4)  # (B, C, nh, nw, b, b)
        coeffs = dct2(tiles) * dsm_keep_mask(k, block, t.device)
        out.append(idct2(coeffs).to(t.dtype).transpose(3, 4).reshape(B, C, H, W))
    return tuple(out)


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


def build_level(cin, cout, n, groups, resampler=None, name="downsamplers"):
    """One encoder / decoder level: n ResNet blocks cin -> cout, then resampler(cout) (the down- or upsampler) if
    given; a Sequential under diffusers' names (resnets.i, then downsamplers.0 or upsamplers.0)."""
    return nn.Sequential(collections.OrderedDict([
        ("resnets", nn.Sequential(*[ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n)])),
        (name, nn.Sequential(*([resampler(cout)] if resampler is not None else [])))]))


class Encoder(nn.Module):
    """Images -> 2C posterior moments; a stride-2 downsample after every level but the last."""

    def __init__(self, channels, layers_per_block, latent_channels, groups=32, downsample_padding="asymmetric"):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        down = functools.partial(Downsample, padding=downsample_padding)
        levels = []
        for i, c in enumerate(channels):                       # level i: channels[i-1] (conv_in's at i = 0) -> c
            levels.append(build_level(channels[max(i - 1, 0)], c, layers_per_block, groups,
                                      down if i < len(channels) - 1 else None))
        self.down_blocks = nn.Sequential(*levels)
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = _group_norm(channels[-1], groups)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):                                      # (B, 3, H, W)
        h = self.mid_block(self.down_blocks(self.conv_in(x)))
        return self.conv_out(F.silu(self.conv_norm_out(h)))    # (B, 2C, H/f, W/f)


class Decoder(nn.Module):
    """Latents -> images; levels in reverse with one more ResNet block each, nearest x2 upsampling."""

    def __init__(self, channels, layers_per_block, latent_channels, groups=32):
        super().__init__()
        rev = list(reversed(channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups)
        levels = []
        for i, c in enumerate(rev):                            # level i: rev[i-1] (conv_in's at i = 0) -> c
            levels.append(build_level(rev[max(i - 1, 0)], c, layers_per_block + 1, groups,
                                      Upsample if i < len(rev) - 1 else None, "upsamplers"))
        self.up_blocks = nn.Sequential(*levels)
        self.conv_norm_out = _group_norm(channels[0], groups)
        self.conv_out = nn.Conv2d(channels[0], 3, 3, padding=1)

    def forward(self, z):                                      # (B, C, h, w)
        h = self.up_blocks(self.mid_block(self.conv_in(z)))
        return self.conv_out(F.silu(self.conv_norm_out(h)))    # (B, 3, h*f, w*f), no output nonlinearity


class VAE(nn.Module):
    """KL autoencoder with the SD-VAE layout; latents are normalised with latent_mean / latent_std."""

    def __init__(self, channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 esm_blur=1.2, norm_groups=32, downsample_padding="asymmetric", quant_conv=True,
                 post_quant_conv=True, scramble=None, preset=None):
        super().__init__()
        if downsample_padding not in ("asymmetric", "symmetric"):
            raise ValueError(f"VAE: downsample_padding must be 'asymmetric' or 'symmetric', got {downsample_padding!r}")
        self.config = dict(channels=tuple(channels), layers_per_block=layers_per_block,
                           latent_channels=latent_channels, esm_blur=esm_blur, norm_groups=norm_groups,
                           downsample_padding=downsample_padding, quant_conv=bool(quant_conv),
                           post_quant_conv=bool(post_quant_conv))
        if scramble is not None:                               # the probe's positive control (permute_latent)
            self.config["scramble"] = int(scramble)
        self.scramble = scramble
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
        """Raise a clear error when x is not (B, 3, H, W) with H, W multiples of the downsampling factor."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"VAE expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} is not divisible by the VAE downsampling "
                             f"factor {self.factor}")

    def encode(self, x):
        """Images in [-1, 1] (B, 3, H, W) -> posterior (mean, logvar), each (B, C, H/f, W/f)."""
        self.check_size(x)
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return self.permute_latent(mean), self.permute_latent(logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        """Latents (B, C, h, w) -> images (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(self.permute_latent(z, inverse=True)))

    def permute_latent(self, z, inverse=False):
        """A fixed shuffle of the latent grid's positions when `scramble` (its seed) is set, else z: the same
        information and reconstructions with the spatial structure (and so the spectrum) destroyed. A control
        for the diffusability probe, not a regulariser: keep it off when training."""
        if self.scramble is None:
            return z
        perm = torch.randperm(z.shape[-2] * z.shape[-1], generator=torch.Generator().manual_seed(self.scramble))
        perm = torch.argsort(perm) if inverse else perm
        return z.flatten(2)[..., perm.to(z.device)].view_as(z)      # (B, C, h, w), the same for every image

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

    def forward(self, x, eps=None, ks=None, block=8, eq_factor=None, eq_min_size=1):
        """The stage-1 forward -> (rec, target, mean, logvar, z): encode, sample with eps, DSM-mask image and
        latent per image (ks: one k per image, 0 = unmasked, §3.3), EQ-VAE scaling, decode the latent."""
        mean, logvar = self.encode(x)
        z = self.sample(mean, logvar, eps)                     # (B, C, h, w)
        target, z_in = x, z
        if ks is not None and any(ks):
            if len(ks) != len(x):
                raise ValueError(f"VAE.forward: {len(ks)} DSM ks for {len(x)} images")
            runs = [(k, len(list(run))) for k, run in itertools.groupby(ks)]     # one dsm_mask per run of equal k
            sizes = [n for _, n in runs]
            parts = [dsm_mask(xs, zs, k, block) for (k, _), xs, zs in zip(runs, x.split(sizes), z.split(sizes))]
            target, z_in = (torch.cat(t) for t in zip(*parts))
        if eq_factor is not None:
            target, z_in = eq_vae_scale(target, z_in, eq_factor, self.factor, eq_min_size)
        return self.decode(z_in), target, mean, logvar, z


def build_vae(preset="f8d4", **overrides):
    """VAE from a VAE_CONFIGS preset, with optional overrides."""
    if preset not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose from {sorted(VAE_CONFIGS)}")
    return VAE(**{**VAE_CONFIGS[preset], **overrides}, preset=preset)


#################################################################################
#                             4. Stage-1 objective                              #
#################################################################################

class LPIPS(nn.Module):
    """LPIPS v0.1 with VGG16 features (Zhang et al., 2018); inputs in [-1, 1], output (B,)."""

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16
        feats = vgg16(weights=None).features
        cuts = (4, 9, 16, 23, 30)                              # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        self.slices = nn.ModuleList([feats[a:b] for a, b in zip((0,) + cuts[:-1], cuts)])
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512)])
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
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)            # unit channel vectors
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((nx - ny) ** 2).mean(dim=(2, 3))
        return total[:, 0]


class PatchGAN(nn.Module):
    """PatchGAN discriminator (Isola et al., 2017) as the authors' modules/discriminator.py, with their init_weights:
    conv weights N(0, 0.2^2) (VQGAN: 0.02), BatchNorm weights N(1, 0.02^2), biases 0 (BatchNorm) or PyTorch's."""

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
    """Hinge loss mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))), no 1/2 (the authors' stage1_vae_trainer.py)."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def adaptive_gan_weight(rec_loss, gen_loss, last_layer, scale=0.5, max_weight=1e4, reduce=None, loss_scale=1.0):
    """VQGAN's adaptive weight as the authors': scale * min(|grad L_rec| / max(|grad L_gen|, 1e-8), max_weight) at the
    decoder's last layer, detached; reduce(g) averages the gradients over ranks first; loss_scale (fp16's) keeps them
    from underflowing and is divided out."""
    g_rec = torch.autograd.grad(rec_loss * loss_scale, last_layer, retain_graph=True)[0].float() / loss_scale
    g_gen = torch.autograd.grad(gen_loss * loss_scale, last_layer, retain_graph=True)[0].float() / loss_scale
    if reduce is not None:
        g_rec, g_gen = reduce(g_rec), reduce(g_gen)
    w = g_rec.norm() / g_gen.norm().clamp_min(1e-8)
    return w.clamp(max=max_weight).detach() * scale


def kl_loss(mean, logvar):
    """KL(q(z|x) || N(0, I)), summed over latent dims, averaged over the batch (as in LDM)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()


def eq_vae_scale(x, z, factor, vae_factor, min_image_size=1):
    """EQ-VAE scale equivariance (Kouzelis et al., 2025): z bilinearly downscaled by `factor`, x to the matching
    size; the image keeps at least min_image_size pixels per side (LPIPS and PatchGAN need about 32)."""
    h, w = z.shape[-2:]
    lo = -(-min_image_size // vae_factor)                      # ceil: smallest latent side allowed
    hs, ws = min(h, max(1, lo, round(h * factor))), min(w, max(1, lo, round(w * factor)))
    z_s = F.interpolate(z, size=(hs, ws), mode="bilinear", align_corners=False)
    x_s = F.interpolate(x, size=(hs * vae_factor, ws * vae_factor), mode="bilinear", align_corners=False)
    return x_s, z_s


REG_PRESETS = {            # stage-1 regularisers: weights of KL and ESM, DSM on/off, EQ-VAE probability
    "kl":      dict(kl_weight=1e-6, esm_weight=0.0, dsm=False, eq_prob=0.0),   # SD-VAE
    "esm":     dict(kl_weight=0.0, esm_weight=0.01, dsm=False, eq_prob=0.0),   # the authors' ESM config
    "dsm":     dict(kl_weight=0.0, esm_weight=0.0, dsm=True, eq_prob=0.0),     # the authors' DSM config
    "esm+dsm": dict(kl_weight=0.0, esm_weight=0.01, dsm=True, eq_prob=0.0),    # this project's combination
    "eq":      dict(kl_weight=1e-6, esm_weight=0.0, dsm=False, eq_prob=0.5),   # EQ-VAE baseline
}
DSM_KS = (0, 8, 10, 12)    # the DSM ks the authors draw from (one per GPU batch), 0 = unmasked


def stage1_loss(vae, x, eps, ks, w, lpips=None, disc=None, eq_factor=None, forward=None, reduce=None,
                loss_scale=1.0):
    """The authors' stage-1 generator objective -> dict of terms incl. "loss": L1 + LPIPS on the (DSM-masked, EQ-
    scaled) image, KL, ESM (§3.2) and with disc -D(rec) times the adaptive weight (its arguments reduce, loss_scale).
    w: dict or namespace of the *_weight's, esm_delta, dsm_block; forward: the VAE or DDP(VAE)."""
    w = w if isinstance(w, dict) else vars(w)
    eq_min = 32 if lpips is not None or disc is not None else 1            # LPIPS / PatchGAN input size
    rec, target, mean, logvar, z = (forward or vae)(x, eps, ks, w["dsm_block"], eq_factor, eq_min)
    rec, target = rec.float(), target.float()
    t = {"l1": (rec - target).abs().mean()}
    if lpips is not None:
        t["lpips"] = lpips(rec, target).mean()
    rec_loss = loss = t["l1"] + w["lpips_weight"] * t.get("lpips", 0.0)
    if w["kl_weight"] > 0:
        t["kl"] = kl_loss(mean.float(), logvar.float())
        loss = loss + w["kl_weight"] * t["kl"]
    if w["esm_weight"] > 0:
        t["esm"] = esm_loss(x, z, delta=w["esm_delta"], blur_sigma=vae.esm_blur)
        loss = loss + w["esm_weight"] * t["esm"]
    if disc is not None:                                       # generator side: D frozen
        disc.requires_grad_(False)
        t["gan"] = -disc(rec).mean()
        disc.requires_grad_(True)
        t["gan_weight"] = adaptive_gan_weight(rec_loss, t["gan"], vae.decoder.conv_out.weight, w["disc_weight"],
                                              reduce=reduce, loss_scale=loss_scale)
        loss = loss + t["gan_weight"] * t["gan"]
    t["loss"] = loss
    return t


def discriminator_loss(vae, disc, x, eps, ks, block=8, eq_factor=None):
    """Hinge loss of the discriminator: the (DSM-masked) image is "real", its reconstruction "fake"."""
    with torch.no_grad():
        rec, target, *_ = vae(x, eps, ks, block, eq_factor, 32)
    return hinge_d_loss(disc(target.float()), disc(rec.float()))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach().float(), alpha=1 - decay)


def latent_moments(mean, logvar):
    """(3, C) float64 per channel of z ~ N(mean, exp(logvar)) (B, C, h, w): count, sum E z, sum E z^2 (additive)."""
    mean, var = mean.double(), logvar.double().exp()
    count = torch.full_like(mean[0, :, 0, 0], mean.numel() / mean.shape[1])
    return torch.stack([count, mean.sum(dim=(0, 2, 3)), (mean.pow(2) + var).sum(dim=(0, 2, 3))])


def latent_stats(moments, per_channel=False):
    """(latent_mean, latent_std) (C,) float32 of summed latent_moments: pooled, mean 0 (the authors'), or per channel."""
    m = moments.double()
    if not per_channel:
        m = m.sum(dim=1, keepdim=True).expand_as(m)
    mu = m[1] / m[0]
    std = (m[2] / m[0] - mu ** 2).clamp_min(1e-12).sqrt()
    return (mu if per_channel else torch.zeros_like(mu)).float(), std.float()


#################################################################################
#                     5. DiT / SiT (REPA's SiT, adaLN-Zero)                     #
#################################################################################
# Layout and parameter names follow REPA's SiT (Yu et al., 2025; models/sit.py), itself DiT
# (Peebles & Xie, 2023) with a velocity output and projectors, so REPA checkpoints load as they are.

def modulate(x, shift, scale):
    """adaLN modulation of tokens x (N, T, D) by per-sample shift / scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def get_2d_sincos_pos_embed(dim, grid_hw):
    """Fixed 2-D sin-cos position embedding (h*w, dim): [sin | cos] of the column, then of the row (MAE / DiT)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_hw[0]), np.arange(grid_hw[1]), indexing="ij")
    return np.concatenate([f(np.outer(g.reshape(-1), omega)) for g in (cols, rows) for f in (np.sin, np.cos)], axis=1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (N, T, D) with a strided conv."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x):                                                  # (N, C, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)                     # (N, T, D)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> 256 sinusoidal frequencies [cos | sin] -> Linear-SiLU-Linear (N, D)."""

    def __init__(self, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):                                                  # (N,)
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32, device=t.device) / 128)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype))   # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D); one extra row (index num_classes) is the null class for CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        if force_drop_ids is None and train and self.dropout_prob > 0:     # else the caller's mask, or none
            force_drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids.bool(), self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias through F.scaled_dot_product_attention (flash on GPU)."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()   # timm's, as REPA's qk_norm
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (N, H, T, hd)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)   # (N, H, T, hd)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


def _norm(dim):
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero shift / scale / gate modulation from the condition."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1, self.norm2 = _norm(dim), _norm(dim)
        self.attn = Attention(dim, num_heads, qk_norm)
        hidden = int(dim * mlp_ratio)                                      # timm's Mlp: fc1 - tanh-GELU - fc2
        self.mlp = nn.Sequential(collections.OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(approximate="tanh"),
                                                         fc2=nn.Linear(hidden, dim)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):                                               # x (N, T, D), c (N, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map to p*p*C values per token."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = _norm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))    # (N, T, p*p*C)


class DiT(nn.Module):
    """SiT/DiT with adaLN-Zero and REPA projectors; forward returns (velocity, [projections])."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, encoder_depth=8, z_dims=(768,),
                 projector_dim=2048, projector_type="mlp", projector_kernel_size=1, qk_norm=False):
        super().__init__()
        H, W = (input_size, input_size) if np.ndim(input_size) == 0 else input_size
        self.input_size = (int(H), int(W))
        if H % patch_size or W % patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {patch_size}")
        self.grid_size = (H // patch_size, W // patch_size)
        self.patch_size, self.in_channels = patch_size, in_channels
        self.num_classes = int(num_classes)
        self.z_dims, self.encoder_depth = [int(z) for z in (z_dims or [])], int(encoder_depth)
        if self.z_dims and not 1 <= self.encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}] when z_dims is set, got {encoder_depth}")

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # num_classes == 0: unconditional, no label table and no CFG
        self.y_embedder = LabelEmbedder(self.num_classes, hidden_size, class_dropout_prob) if self.num_classes else None
        T = self.grid_size[0] * self.grid_size[1]
        # fixed sin-cos embedding; a frozen Parameter (not a buffer) so REPA state dicts and counts match
        self.pos_embed = nn.Parameter(torch.zeros(1, T, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.projectors = nn.ModuleList([                                  # (N, T, D) -> (N, T, z) each
            ConvProjector(hidden_size, z, projector_kernel_size, self.grid_size) if projector_type == "conv" else
            build_mlp_projector(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)      # the velocity, as REPA's SiT
        self.grad_checkpointing = False                                    # recompute blocks in backward
        self.initialize_weights()

    def initialize_weights(self):
        """REPA/DiT init: xavier linears, N(0, 0.02) label table and time MLP, zero adaLN and output."""
        for m in self.modules():                                           # every Linear here has a bias
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        pe = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data                               # patch embedding initialised like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                  self.final_layer.linear]:
            nn.init.zeros_(m.weight)                                       # adaLN-Zero: blocks start as identity,
            nn.init.zeros_(m.bias)                                         # the output at zero

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c = self.patch_size, self.in_channels
        h, w = self.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x, y):
        """ValueError for a wrong latent shape or label tensor (values: checked by the samplers, no sync here)."""
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
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)  # recomputed
            else:
                x = block(x, c)                                            # (N, T, D)
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
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
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
    h, w = (math.isqrt(T), math.isqrt(T)) if grid_hw is None else grid_hw
    if h * w != T:
        raise ValueError(f"{T} tokens are not a square grid; pass grid_hw" if grid_hw is None else
                         f"grid {tuple(grid_hw)} does not hold {T} tokens")
    return int(h), int(w)


def resize_token_grid(Z, grid_hw):
    """Resize target tokens (N, T, C) on a square grid to the DiT's grid (bilinear) when the two differ."""
    N, T, C = Z.shape
    h, w = _grid_of(T)
    if (h, w) == tuple(grid_hw):
        return Z
    z = Z.transpose(1, 2).reshape(N, C, h, w)
    z = F.interpolate(z.float(), size=tuple(grid_hw), mode="bilinear", align_corners=False)
    return z.flatten(2).transpose(1, 2)                                    # (N, T', C)


def repa_target(Z, mode="raw", alpha=0.6, sigma1=0.5, sigma2=2.0, grid_hw=None, eps=1e-6):
    """REPA target from tokens Z (N, T, C): 'raw' (REPA), 'zscore' (iREPA@99ad4ac, alpha as its --zscore-alpha) or
    'dog' (REPA-DoG, §4: a DoG per channel on the token grid; the paper gives no sigmas, 0.5 and 2.0 are ours)."""
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
        z = Zf.transpose(1, 2).reshape(N, C, h, w)
        blur = lambda s: gaussian_blur(z, s, 2 * max(1, min(math.ceil(3 * s), h - 1, w - 1)) + 1, "reflect")  # noqa
        d = (blur(sigma1) - blur(sigma2)).flatten(2).transpose(1, 2)                  # (N, T, C)
        d = d - d.mean(dim=1, keepdim=True)
        return d / (d.std(dim=1, keepdim=True) + eps)


def directional_spectral_energy(Z, grid=None, reduction="mean"):
    """sqrt(mean_t |u_t - mean(u)|^2) for u_t = Z_t / |Z_t| (N,) or its mean: by Parseval, the root of the non-DC
    spectral energy of the L2-normalised tokens (orthonormal 2-D DFT over the grid, / T)."""
    _grid_of(Z.shape[1], grid)                                             # validates the grid
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
              repa_lambda=0.5, generator=None):
    """Flow-matching loss dict: per-sample 'mse' and 'repa' (N,), 't', and 'loss' = mean(mse) + repa_lambda mean(repa);
    t, noise and drop_ids (N,) bool (null class) are drawn here (from `generator`) unless given."""
    dev = x.device if generator is None else generator.device
    if t is None:
        t = sample_time(len(x), weighting, generator=generator, device=dev)
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
    if repa_targets is not None and repa_lambda:
        out["repa"] = repa_loss(zs, repa_targets)                          # (N,)
        loss = loss + repa_lambda * out["repa"].mean()
    out["loss"] = loss
    return out


#################################################################################
#          8. Samplers (REPA's euler_sampler / euler_maruyama_sampler)          #
#################################################################################

@torch.no_grad()
def _integrate(model, noise, y, t_steps, cfg_scale, guidance_interval, heun=False, sde=False, generator=None):
    """REPA's samplers from t_steps[0] to t_steps[-1] -> float64 latents: float64 state, model in noise.dtype, CFG
    when cfg_scale > 1 and low <= t_cur <= high (Heun's corrector reuses that decision); the last step is Euler."""
    nc = model.num_classes
    if nc == 0 and cfg_scale > 1.0:
        raise ValueError("classifier-free guidance needs a class-conditional model")
    if nc and y is None:
        raise ValueError("class-conditional model: labels y are required")
    if nc and y.numel() and (int(y.min()) < 0 or int(y.max()) >= nc):
        raise ValueError(f"class label out of range: got [{int(y.min())}, {int(y.max())}], expected [0, {nc}) "
                         "(the null class is added by classifier-free guidance)")
    low, high = guidance_interval

    def velocity(x, t, use_cfg):                                           # or the SDE drift, at x, t in float64
        x_in, y_in = (torch.cat([x, x]), torch.cat([y, torch.full_like(y, nc)])) if use_cfg else (x, y)
        t_in = torch.full((x_in.shape[0],), float(t), dtype=torch.float64, device=x.device)
        out = model(x_in.to(noise.dtype), t_in.to(noise.dtype), y_in)[0].to(torch.float64)
        # reverse-SDE drift v - 0.5 g^2 score, g^2 = 2t, score = -(x + (1 - t) v) / t on the linear path (REPA)
        out = x_in + (2 - float(t)) * out if sde else out
        if not use_cfg:
            return out
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    x_next, was_training = noise.to(torch.float64), model.training
    model.eval()                                                           # no label dropout
    try:
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            x_cur, last = x_next, i == len(t_steps) - 2
            use_cfg = bool(cfg_scale > 1.0 and low <= t_cur <= high)
            d_cur = velocity(x_cur, t_cur, use_cfg)
            x_next = x_cur + (t_next - t_cur) * d_cur
            if heun and not last:
                d_prime = velocity(x_next, t_next, use_cfg)
                x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
            if sde and not last:                                           # one torch.Generator per sample
                eps = torch.randn_like(x_cur) if generator is None else torch.stack([torch.randn(
                    x_cur.shape[1:], generator=g, dtype=torch.float64) for g in generator]).to(x_cur.device)
                x_next = x_next + torch.sqrt(2 * t_cur) * eps * torch.sqrt(torch.abs(t_next - t_cur))
    finally:
        model.train(was_training)
    return x_next


def sample_ode(model, noise, y, steps=50, cfg_scale=1.0, guidance_interval=(0.0, 1.0), heun=False):
    """Probability-flow ODE from t=1 (noise) to t=0 on linspace(1, 0, steps+1), Euler or Heun (REPA's euler_sampler)."""
    t_steps = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return _integrate(model, noise, y, t_steps, cfg_scale, guidance_interval, heun=heun)


def sample_sde(model, noise, y, steps=250, cfg_scale=1.0, guidance_interval=(0.0, 1.0), generator=None):
    """Euler-Maruyama (REPA's euler_maruyama_sampler) with diffusion 2t on linspace(1, 0.04, steps), then a mean step
    to 0; noise from the global RNG (REPA) or `generator`, one torch.Generator per sample (batch-independent)."""
    t_steps = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    return _integrate(model, noise, y, t_steps, cfg_scale, guidance_interval, sde=True, generator=generator)


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


def deadleaves_image(index, size=64, seed=0, num_classes=10, r_min=None, r_max=0.5, n_shapes=300):
    """Deterministic dead-leaves image for (index, seed): (uint8 (size, size, 3), label); radii in image sides."""
    r_min = max(0.02, 3.0 / size) if r_min is None else r_min
    label = index % num_classes
    palette = np.asarray(DEADLEAVES_PALETTES[(label // 2) % len(DEADLEAVES_PALETTES)])
    shape = ("disk", "square")[label % 2]
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
    Offline, the FileNotFoundError names the URL, the cache file and the flag that passes a path."""
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
            raise FileNotFoundError(f"could not download {what} weights from {url} ({type(e).__name__}: {e}). "
                               f"Offline: put the file at {cached} or pass {flag}") from None
    return cached


LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def load_lpips(path=None, vgg_path=None):
    """LPIPS-VGG with its v0.1 linear heads (path) and VGG16 (vgg_path), else from the cache or the web."""
    try:
        lin = fetch_weights(LPIPS_URL, path, "LPIPS v0.1 linear-head", "lpips_v0.1_vgg.pth", "--lpips-path")
        vgg = fetch_weights(VGG16_URL, vgg_path, "VGG16", flag="--vgg-path")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}. Or pass --lpips-weight 0 to train without LPIPS.") from None
    return LPIPS.from_state_dicts(torch.load(lin, map_location="cpu", weights_only=True),
                                  torch.load(vgg, map_location="cpu", weights_only=True))


_SAFETENSORS_DTYPES = {k: getattr(torch, v) for k, v in dict(
    F64="float64", F32="float32", F16="float16", BF16="bfloat16", I64="int64", I32="int32", I16="int16", I8="int8",
    U8="uint8", BOOL="bool", U16="uint16", U32="uint32", U64="uint64", F8_E4M3="float8_e4m3fn", F8_E5M2="float8_e5m2",
).items() if hasattr(torch, v)}


def load_safetensors(path, with_metadata=False):
    """Read a .safetensors file without the safetensors package -> {name: tensor} (and its metadata); format: a u64
    header length N, N bytes of UTF-8 JSON {name: {dtype, shape, data_offsets}, "__metadata__"}, little-endian data."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        n = int.from_bytes(raw[:8], "little")
        if len(raw) < 8 or n > len(raw) - 8:
            raise ValueError(f"{len(raw)} bytes: too short for the 8-byte length and its {n}-byte header")
        header = json.loads(raw[8:8 + n].decode("utf-8"))
        metadata, data, out = header.pop("__metadata__", None) or {}, memoryview(raw)[8 + n:], {}
        for name, info in header.items():
            dt, (begin, end) = _SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            if not 0 <= begin <= end <= len(data):
                raise ValueError(f"tensor {name!r} at bytes {begin}..{end} of a {len(data)}-byte data section")
            t = torch.frombuffer(bytearray(data[begin:end]), dtype=dt) if end > begin else torch.empty(0, dtype=dt)
            if sys.byteorder == "big":
                t = t.view(torch.uint8).view(-1, t.element_size()).flip(1).contiguous().view(dt)
            out[name] = t.reshape(info["shape"])               # an own, writable copy
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{os.fspath(path)}: not a valid safetensors file ({type(e).__name__}: {e})") from None
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
    return load_safetensors(p) if p.endswith(".safetensors") else torch.load(p, map_location="cpu", weights_only=True)


def _load_vae_weights(vae, sd, what):
    """Load a state dict (latent statistics optional) into the VAE; one short ValueError when it does not fit."""
    own, sd = vae.state_dict(), {"latent_mean": vae.latent_mean, "latent_std": vae.latent_std, **sd}
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} do not fit VAE preset {vae.preset or vae.config}: {len(missing)} missing (e.g. "
                         f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of "
                         f"another shape (e.g. {wrong[:3]})")
    vae.load_state_dict(sd)
    return vae.eval()


def _renamed(key, rules):
    """A state-dict name with every (pattern, replacement) rule applied in turn."""
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


# Old diffusers attention names (query / key / value / proj_attn) -> ours.
_OLD_ATTN_KEY_RULES = [(re.compile(rf"(\.attentions\.\d+)\.{a}\."), rf"\1.{b}.")
                       for a, b in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))]


def load_sd_vae(path_or_state_dict, preset="f8d4"):
    """Load diffusers AutoencoderKL weights (a .bin / .safetensors file, its folder or a state dict) into a VAE; for
    f8d4, SD's latent scale 0.18215 is stored as latent_std = 1 / 0.18215."""
    sd = _weights_in(path_or_state_dict, ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"))
    vae = build_vae(preset, downsample_padding="asymmetric") if isinstance(preset, str) else VAE(**preset)
    vae = _load_vae_weights(vae, {_renamed(k, _OLD_ATTN_KEY_RULES): v for k, v in sd.items()}, "weights")
    if preset == "f8d4" and "latent_std" not in sd:
        vae.latent_std.fill_(1 / 0.18215)
    return vae


# The authors' parameter names -> ours (modules/vae.py: VAEEncoder / VAEDecoder / EncoderDecoder;
# modules/layers.py: ResidualBlock2D, DownSampleBlock2D, UpSampleBlock2D; modules/transformer.py: Attention).
_OFFICIAL_KEY_RULES = [(re.compile(a), b) for a, b in (
    (r"^module\.", ""),                                                   # saved from a DDP-wrapped model
    (r"^post_encoder_conv\.", "quant_conv."),
    (r"^pre_decoder_conv\.", "post_quant_conv."),
    (r"^encoder\.encoder_blocks\.(\d+)\.blocks\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.encoder_blocks\.(\d+)\.downsample\.downsample_conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"^decoder\.decoder_blocks\.(\d+)\.blocks\.", r"decoder.up_blocks.\1.resnets."),
    (r"^decoder\.decoder_blocks\.(\d+)\.upsample\.upsample\.1\.", r"decoder.up_blocks.\1.upsamplers.0.conv."),
    (r"^(encoder|decoder)\.attn_block\.", r"\1.mid_block."),
    (r"^(encoder|decoder)\.out_norm\.", r"\1.conv_norm_out."),
    (r"\.groupnorm\.", ".group_norm."),
    (r"\.(q|k|v)_proj\.", r".to_\1."),
    (r"\.out_proj\.", ".to_out.0."),
    (r"\.identity_conv\.", ".conv_shortcut."),
)]


def load_official_vae(path_or_state_dict, preset="f16d16", scale_factor=None):
    """Load the authors' VAE weights (forever208/SpectrumMatching: model.safetensors, its folder or a state dict) into
    a VAE (preset: a VAE_CONFIGS name or kwargs; symmetric padding) that reproduces theirs. Their latent scale is
    not in the weights: scale_factor stores latent_std = 1 / scale_factor (latent_mean 0), else latent_std = 1."""
    sd = _weights_in(path_or_state_dict, ("model.safetensors", "pytorch_model.bin"))
    vae = build_vae(preset, downsample_padding="symmetric") if isinstance(preset, str) else \
        VAE(**{**preset, "downsample_padding": "symmetric"})
    sd = {_renamed(k, _OFFICIAL_KEY_RULES): v for k, v in sd.items()}
    vae = _load_vae_weights(vae, sd, "the authors' VAE weights")
    if scale_factor is not None:
        if not scale_factor > 0:
            raise ValueError(f"load_official_vae: scale_factor must be positive, got {scale_factor}")
        vae.latent_std.fill_(1.0 / scale_factor)
    return vae


def load_repa_sit(state_dict, projection_layer_type="mlp", proj_kwargs_kernel_size=3, **repa_kwargs):
    """Build a DiT from REPA's SiT(...) kwargs (ours and theirs share names and defaults, but the projector's) and
    load a REPA train.py state dict (raw, or a checkpoint's 'ema' entry)."""
    for k in ("path_type", "use_cfg", "fused_attn", "eval_mode", "decoder_hidden_size"):   # not in the weights
        repa_kwargs.pop(k, None)
    model = DiT(**repa_kwargs, projector_type=projection_layer_type, projector_kernel_size=proj_kwargs_kernel_size)
    sd = {k.removeprefix("module.").removeprefix("_orig_mod.").replace(".projection_layer.", ".conv." if
          projection_layer_type == "conv" else "."): v for k, v in state_dict.get("ema", state_dict).items()}
    key = "y_embedder.embedding_table.weight"
    if key in sd and model.y_embedder is not None and sd[key].shape[0] == model.num_classes:
        # REPA with class_dropout_prob=0 has no null row; append an (unused) zero row
        sd[key] = torch.cat([sd[key], sd[key].new_zeros(1, sd[key].shape[1])])
    model.load_state_dict(sd, strict=True)
    return model.eval()


def resample_abs_pos_embed(pos_embed, new_hw, num_prefix_tokens=1, old_hw=None):
    """Position embeddings (1, P + h*w, D) -> (1, P + h'*w', D), P prefix tokens kept: antialiased bicubic on the
    grid in float32, as timm's resample_abs_pos_embed (REPA's DINOv2 step); old_hw defaults to a square."""
    h, w = _grid_of(pos_embed.shape[1] - num_prefix_tokens, old_hw)
    new_hw = (int(new_hw[0]), int(new_hw[1]))
    if (h, w) == new_hw:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    g = grid.float().reshape(1, h, w, D).permute(0, 3, 1, 2)                 # (1, D, h, w)
    g = F.interpolate(g, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
    g = g.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)         # (1, h'*w', D)
    return torch.cat([prefix, g], dim=1)


def load_dinov2(name="dinov2_vitb14", path=None, device="cpu", resolution=256):
    """Frozen DINOv2 encoder via torch.hub (path: a local clone), its position embeddings resampled once to the
    token grid preprocess_repa_images makes at `resolution` (16x16 at 256 px), as REPA's load_encoders; resolution
    None keeps the hub model as it is (FD-DINOv2)."""
    try:
        if path is not None:
            enc = torch.hub.load(path, name, source="local")
        else:
            enc = torch.hub.load("facebookresearch/dinov2", name, trust_repo=True, skip_validation=True)
    except Exception as e:                                                 # offline, missing cache, bad name
        raise FileNotFoundError(
            f"could not load the DINOv2 encoder {name!r} ({type(e).__name__}: {e}). Offline: run torch.hub.load("
            f"'facebookresearch/dinov2', '{name}') on a machine with network and copy $TORCH_HOME/hub (default "
            "~/.cache/torch/hub) here, pass path=<a clone of facebookresearch/dinov2>, or train without alignment "
            "(--repa-encoder none).") from None
    if resolution is not None:
        n = (224 * resolution // 256) // enc.patch_size                    # preprocess_repa_images' size / patch
        enc.pos_embed.data = resample_abs_pos_embed(enc.pos_embed.data, (n, n), num_prefix_tokens=1)
    return enc.to(device).eval().requires_grad_(False)
