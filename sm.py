"""
Spectrum Matching latent diffusion in one file.

Ning et al., 2026, "Spectrum Matching: a Unified Perspective for Superior
Diffusability in Latent Diffusion". Contents, top to bottom:

  1. Spectral toolkit      dct2 / idct2, radial_spectrum
  2. Spectrum Matching     esm_loss (Encoding SM), dsm_mask (Decoding SM)
  3. VAE                   SD-VAE layout (diffusers AutoencoderKL), VAE_CONFIGS, load_sd_vae
  4. Stage-1 losses        LPIPS-VGG, PatchGAN, hinge, adaptive weight, KL, EQ-VAE
  5. DiT / SiT             adaLN-Zero transformer, DiT_MODELS, load_repa_sit
  6. Flow matching         flow_loss, sample_ode, sample_sde
  7. REPA                  target encoders, raw / zscore / DoG targets, repa_loss
  8. Dead leaves           the embedded procedural dataset
  9. Checkpoints           atomic save, typed load

Only the standard library, torch and numpy are imported at module level;
torchvision is imported lazily where a pretrained network needs it. Copy this
file into your project as it is.
"""

import math
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


#################################################################################
#                               1. Spectral toolkit                             #
#################################################################################

_DCT_CACHE = {}


def dct_matrix(n, device=None):
    """Orthonormal DCT-II matrix C (n, n), so that dct(x) = C @ x; cached per (n, device)."""
    key = (n, str(device))
    if key not in _DCT_CACHE:
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
    """Bin index (h, w) of each DCT coefficient by its radius sqrt(u^2 + v^2), DC at (0, 0)."""
    u = torch.arange(h, device=device, dtype=torch.float32)[:, None]
    v = torch.arange(w, device=device, dtype=torch.float32)[None, :]
    r = torch.sqrt(u ** 2 + v ** 2)
    r_max = max(r.max().item(), 1.0)
    return torch.clamp(torch.floor(r / r_max * n_bins), 0, n_bins - 1).long()


def radial_spectrum(x, n_bins=16):
    """Radially binned DCT power spectrum (B, n_bins) of x (B, C, H, W), channel-averaged (§3.1)."""
    x = x.float()
    x = x - x.mean(dim=(-2, -1), keepdim=True)                # remove each (sample, channel) mean
    p = dct2(x).pow(2).mean(dim=1).clamp_min(1e-8)            # (B, H, W) channel-averaged power
    B, H, W = p.shape
    dc = torch.ones(H, W, device=p.device)
    dc[0, 0] = 0.0
    p = p * dc                                                # drop the DC entry
    bins = _radial_bins(H, W, n_bins, p.device).flatten()     # (H*W,)
    sums = p.new_zeros(B, n_bins).index_add_(1, bins, p.flatten(1))
    counts = torch.bincount(bins, minlength=n_bins).clamp_min(1).float()
    return sums / (counts + 1e-8)


#################################################################################
#                             2. Spectrum Matching                              #
#################################################################################

def gaussian_blur(x, sigma, kernel_size):
    """Depthwise Gaussian blur, taps exp(-(i^2+j^2)/(2 sigma^2)) normalised to 1, zero padding."""
    i = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - kernel_size // 2
    g = torch.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype)
    C = x.shape[1]
    return F.conv2d(x, g.expand(C, 1, kernel_size, kernel_size), padding=kernel_size // 2, groups=C)


def spectrum_profiles(x, z, delta=1.0, n_bins=16, blur_sigma=1.2, blur_kernel=7):
    """Normalised log spectra (target, latent, image), each (B, n_bins), as compared by ESM (§3.2).

    target = image spectrum at the latent's resolution, flattened by f**delta;
    image = the same without flattening (delta = 0), for plots.
    """
    x, z = x.float(), z.float()
    h, w = z.shape[-2:]
    if blur_sigma > 0:
        x = gaussian_blur(x, blur_sigma, blur_kernel)         # anti-alias before downsampling
    x_small = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    s_img = radial_spectrum(x_small, n_bins)
    s_lat = radial_spectrum(z, n_bins)
    f = torch.arange(1, n_bins + 1, device=x.device, dtype=torch.float32)
    s_tgt = s_img * f ** delta                                # flatten the power law by f^delta

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
    if not isinstance(k, int) or not 0 <= k <= 2 * block - 2:
        raise ValueError(f"dsm_mask: k must be an integer in [0, {2 * block - 2}] for block {block}, got {k!r}")
    if k == 0:
        return x, z
    return block_lowpass(x, k, block), block_lowpass(z, k, block)


#################################################################################
#                       3. VAE (SD-VAE / AutoencoderKL layout)                  #
#################################################################################
# Parameter names follow diffusers' AutoencoderKL, so SD-VAE weights load as they are.

VAE_CONFIGS = {
    # name:     channels per level,          resnets/level, latent channels, ESM blur sigma
    "f8d4":   dict(channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, esm_blur=0.0),
    "f16d16": dict(channels=(128, 128, 256, 256, 512), layers_per_block=2, latent_channels=16, esm_blur=1.2),
    "f16d32": dict(channels=(128, 128, 256, 256, 512), layers_per_block=2, latent_channels=32, esm_blur=1.2),
    "tiny":   dict(channels=(32, 64, 64), layers_per_block=1, latent_channels=4, esm_blur=1.2),  # f4, CPU demos
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
    def __init__(self, c, groups=32):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([SpatialAttention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 upsampling, then a 3x3 conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, resnets, sampler, name):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if sampler is not None:
            setattr(self, name, nn.ModuleList([sampler]))
        self._sampler = name if sampler is not None else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return getattr(self, self._sampler)[0](x) if self._sampler else x


class Encoder(nn.Module):
    def __init__(self, channels, layers_per_block, latent_channels, groups=32):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        levels, cin = [], channels[0]
        for i, c in enumerate(channels):
            last = i == len(channels) - 1
            res = [ResnetBlock(cin if j == 0 else c, c, groups) for j in range(layers_per_block)]
            levels.append(_Level(res, None if last else Downsample(c), "downsamplers"))
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
    def __init__(self, channels, layers_per_block, latent_channels, groups=32):
        super().__init__()
        rev = list(reversed(channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups)
        levels, cin = [], rev[0]
        for i, c in enumerate(rev):
            last = i == len(rev) - 1
            res = [ResnetBlock(cin if j == 0 else c, c, groups) for j in range(layers_per_block + 1)]
            levels.append(_Level(res, None if last else Upsample(c), "upsamplers"))
            cin = c
        self.up_blocks = nn.ModuleList(levels)
        self.conv_norm_out = _group_norm(channels[0], groups)
        self.conv_out = nn.Conv2d(channels[0], 3, 3, padding=1)

    def forward(self, z):                                      # (B, C, h, w)
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))    # (B, 3, h*f, w*f)


class VAE(nn.Module):
    """KL autoencoder with the SD-VAE layout; latents are normalised with latent_mean / latent_std."""

    def __init__(self, channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 esm_blur=1.2, norm_groups=32, preset=None):
        super().__init__()
        self.config = dict(channels=tuple(channels), layers_per_block=layers_per_block,
                           latent_channels=latent_channels, esm_blur=esm_blur, norm_groups=norm_groups)
        self.preset = preset
        self.factor = 2 ** (len(channels) - 1)
        self.latent_channels = latent_channels
        self.esm_blur = esm_blur
        self.encoder = Encoder(channels, layers_per_block, latent_channels, norm_groups)
        self.decoder = Decoder(channels, layers_per_block, latent_channels, norm_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
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


def _read_state_dict(path):
    """Read a .bin / .pt / .pth / .safetensors file into a state dict."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise RuntimeError(f"{path} is a .safetensors file but the safetensors package is not installed; "
                               "`pip install safetensors`, or use the diffusion_pytorch_model.bin file") from None
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_sd_vae(path_or_state_dict, preset="f8d4"):
    """Load diffusers-format AutoencoderKL weights (e.g. stabilityai/sd-vae-ft-ema) into a VAE.

    path_or_state_dict: a diffusion_pytorch_model.bin / .safetensors file, the folder holding it,
    or a state dict; old and new attention key names are accepted. SD's latent scale 0.18215 is
    stored as latent_std = 1 / 0.18215 for the f8d4 preset.
    """
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        p = os.fspath(sd)
        if os.path.isdir(p):
            for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"):
                if os.path.exists(os.path.join(p, name)):
                    p = os.path.join(p, name)
                    break
            else:
                raise FileNotFoundError(f"no diffusion_pytorch_model.bin or .safetensors in {p}")
        sd = _read_state_dict(p)
    sd = convert_diffusers_vae_keys(sd)
    vae = build_vae(preset) if isinstance(preset, str) else VAE(**preset)
    missing, unexpected = vae.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in ("latent_mean", "latent_std")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit VAE preset {preset!r}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (of {len(missing)} / {len(unexpected)})")
    if preset == "f8d4" and "latent_std" not in sd:
        vae.latent_std.fill_(1 / 0.18215)
    return vae.eval()


#################################################################################
#                               4. Stage-1 losses                               #
#################################################################################

LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


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

    def forward(self, x, y):
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = 0.0
        for s, lin in zip(self.slices, self.lins):
            hx, hy = s(hx), s(hy)
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((nx - ny) ** 2).mean(dim=(2, 3))
        return total[:, 0]


def _fetch(url, path, what, filename=None):
    """Return a local file for url: an explicit path, the torch hub cache, or a download."""
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
                               f"Offline: put the file at {cached} or pass its path") from None
    return cached


def load_lpips(path=None, vgg_path=None):
    """LPIPS-VGG with pretrained weights: linear heads from `path` and VGG16 from `vgg_path`, else the
    torch hub cache, else their public URLs. Offline without them: a RuntimeError saying how to
    provide them or to train with --lpips-weight 0."""
    try:
        lin = torch.load(_fetch(LPIPS_URL, path, "LPIPS v0.1 linear-head", "lpips_v0.1_vgg.pth"), map_location="cpu", weights_only=True)
        vgg = torch.load(_fetch(VGG16_URL, vgg_path, "VGG16"), map_location="cpu", weights_only=True)
    except (RuntimeError, FileNotFoundError) as e:
        raise RuntimeError(f"{e}. Or pass --lpips-weight 0 to train without LPIPS.") from None
    model = LPIPS()
    feats = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
    offset = 0
    for s in model.slices:                                     # slices hold features[a:b] with local indices
        n = len(s)
        s.load_state_dict({f"{int(k.split('.')[0]) - offset}.{k.split('.')[1]}": v for k, v in feats.items()
                           if offset <= int(k.split(".")[0]) < offset + n})
        offset += n
    for i, l in enumerate(model.lins):
        l.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
    return model.eval()


class PatchGAN(nn.Module):
    """PatchGAN discriminator (Isola et al., 2017; as in VQGAN): 3 strided layers, BatchNorm."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        for m in self.modules():                               # DCGAN initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)                                    # (B, 1, h, w) patch logits


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss, gen_loss, last_layer, scale=0.5, max_weight=1e4):
    """VQGAN's adaptive weight ||grad L_rec|| / ||grad L_gen|| at the decoder's last layer, times scale."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gen = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)[0]
    w = g_rec.norm() / (g_gen.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach() * scale


def kl_loss(mean, logvar):
    """KL(q(z|x) || N(0, I)), summed over latent dims, averaged over the batch (as in LDM)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()


def eq_vae_scale(x, z, factor, vae_factor):
    """EQ-VAE scale equivariance (Kouzelis et al., 2025): bilinearly downscale z by `factor`
    and the image to the matching size; the decoder must map one to the other."""
    h, w = z.shape[-2:]
    hs, ws = max(1, round(h * factor)), max(1, round(w * factor))
    z_s = F.interpolate(z, size=(hs, ws), mode="bilinear", align_corners=False)
    x_s = F.interpolate(x, size=(hs * vae_factor, ws * vae_factor), mode="bilinear", align_corners=False)
    return x_s, z_s


from _stage2 import *  # TEMP-STAGE2


#################################################################################
#                                8. Dead leaves                                 #
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


def deadleaves_image(index, size=64, seed=0, num_classes=10, r_min=0.02, r_max=0.5, n_shapes=300):
    """Deterministic dead-leaves image for (index, seed): (uint8 (size, size, 3), label)."""
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
#                                9. Checkpoints                                 #
#################################################################################

def save_checkpoint(obj, path, before_replace=None):
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never a torn file.
    before_replace(tmp_path) is called between writing and renaming (crash tests).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, kind=None, map_location="cpu"):
    """Load a checkpoint written by train.py and check that it is of the expected `kind` ('vae', 'dit')."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by this project (no 'kind' entry)")
    if kind is not None and ckpt["kind"] != kind:
        raise ValueError(f"{path} is a {ckpt['kind']!r} checkpoint, but a {kind!r} checkpoint is needed here")
    return ckpt


def build_vae_from_checkpoint(ckpt):
    """VAE in eval mode from a 'vae' checkpoint dict (EMA-free: the trained weights)."""
    if ckpt.get("kind") != "vae":
        raise ValueError(f"expected a 'vae' checkpoint, got {ckpt.get('kind')!r}")
    vae = VAE(**ckpt["vae_config"], preset=ckpt.get("preset"))
    vae.load_state_dict(ckpt["model"])
    vae.esm_delta = ckpt.get("args", {}).get("esm_delta", 1.0)
    return vae.eval()
