"""Tests for sm.py and the scripts: tiny models, small images, CPU. Run: python -m pytest -q"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sm
import train

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "testdata")
torch.set_num_threads(1)          # bitwise-reproducible runs across processes (DDP tests compare them)


#################################################################################
#                               Spectral toolkit                                #
#################################################################################

@pytest.mark.parametrize("h,w", [(8, 8), (16, 12), (5, 7), (1, 4)])
def test_dct_orthonormal_round_trip(h, w):
    for n in (h, w):
        C = sm.dct_matrix(n)
        assert torch.allclose(C @ C.T, torch.eye(n), atol=1e-6)
    x = torch.randn(3, 2, h, w)
    X = sm.dct2(x)
    assert torch.allclose(sm.idct2(X), x, atol=1e-5)
    assert torch.allclose(X.pow(2).sum(), x.pow(2).sum(), rtol=1e-5)      # Parseval


def test_dct_matches_scipy():
    from scipy.fft import dctn
    x = np.random.default_rng(0).standard_normal((6, 10))
    ref = dctn(x, type=2, norm="ortho")
    assert np.allclose(sm.dct2(torch.tensor(x, dtype=torch.float32)).numpy(), ref, atol=1e-5)


def test_radial_spectrum_single_basis_function():
    """A single DCT basis image puts its whole power (1 per channel) into the bin of its radius."""
    H = W = 16
    u, v = 3, 4                                                           # radius 5
    X = torch.zeros(1, 2, H, W)
    X[:, :, u, v] = 1.0
    s = sm.radial_spectrum(sm.idct2(X), n_bins=16)
    r_max = math.sqrt(15 ** 2 + 15 ** 2)
    b = int(5 / r_max * 16)
    rr = torch.sqrt(torch.arange(H)[:, None].float() ** 2 + torch.arange(W)[None].float() ** 2)
    count = int((torch.clamp(torch.floor(rr / r_max * 16), 0, 15) == b).sum())
    floor = 1e-8                                                          # the clamp of the other coefficients
    assert s.shape == (1, 16)
    assert s[0, b].item() == pytest.approx((1.0 + (count - 1) * floor) / (count + 1e-8), rel=1e-5)
    others = torch.cat([s[0, :b], s[0, b + 1:]])
    assert others.max().item() < 1e-7


def test_radial_spectrum_ignores_mean():
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(sm.radial_spectrum(x), sm.radial_spectrum(x + 5.0), atol=1e-6)


#################################################################################
#                          Encoding Spectrum Matching                           #
#################################################################################

def test_esm_zero_for_resized_image():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = F.interpolate(x, size=(8, 8), mode="bicubic", align_corners=False)
    assert sm.esm_loss(x, z, delta=0.0, blur_sigma=0.0).abs().item() < 1e-6
    assert sm.esm_loss(x, z, delta=1.0, blur_sigma=0.0).item() > 1e-4     # flattening moves the target


def test_esm_gradient_steps_lower_loss():
    torch.manual_seed(0)
    x = torch.from_numpy(sm.deadleaves_image(0, 32)[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    losses = []
    for _ in range(30):
        loss = sm.esm_loss(x, z)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert losses[-1] < 0.5 * losses[0]


def test_esm_is_a_kl():
    """Non-negative, and equal to the KL computed by hand from spectrum_profiles."""
    torch.manual_seed(1)
    x, z = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 8, 16, 16)
    s_t, s_z, _ = sm.spectrum_profiles(x, z, delta=1.0, blur_sigma=1.2)
    assert torch.allclose(s_t.sum(-1), torch.ones(3), atol=1e-5)
    kl = (s_t * (s_t + 1e-8).log() - s_t * (s_z + 1e-8).log()).sum(-1).mean()
    loss = sm.esm_loss(x, z)
    assert loss.item() >= 0 and loss.item() == pytest.approx(kl.item(), rel=1e-6)


#################################################################################
#                          Decoding Spectrum Matching                           #
#################################################################################

def test_dsm_identity_at_k0():
    x, z = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8, 8)
    xm, zm = sm.dsm_mask(x, z, 0)
    assert xm is x and zm is z


@pytest.mark.parametrize("k,zeros", [(8, 36), (10, 49), (12, 58), (1, 1), (14, 63)])
def test_dsm_zero_counts(k, zeros):
    assert int((sm.dsm_keep_mask(k, 8) == 0).sum()) == zeros


@pytest.mark.parametrize("k", [8, 10, 12])
def test_dsm_masked_tiles_have_no_energy_outside_triangle(k):
    torch.manual_seed(0)
    x, z = torch.randn(2, 3, 16, 24), torch.randn(2, 4, 8, 16)
    for t in sm.dsm_mask(x, z, k):
        B, C, H, W = t.shape
        tiles = t.reshape(B, C, H // 8, 8, W // 8, 8).transpose(3, 4)
        coeffs = sm.dct2(tiles)
        outside = coeffs * (1 - sm.dsm_keep_mask(k))
        assert outside.abs().max() < 1e-5
        inside = coeffs * sm.dsm_keep_mask(k)
        assert inside.abs().max() > 0.1
    xm, _ = sm.dsm_mask(x, z, k)
    xmm, _ = sm.dsm_mask(xm, z, k)
    assert torch.allclose(xm, xmm, atol=1e-5)                             # a projection


def test_dsm_keeps_low_frequency_tiles():
    """A tile made only of kept basis functions passes unchanged."""
    X = torch.zeros(1, 1, 8, 8)
    X[..., 0, 0], X[..., 1, 2], X[..., 3, 0] = 2.0, -1.0, 0.5
    x = sm.idct2(X)
    xm, _ = sm.dsm_mask(x, x, 12)
    assert torch.allclose(xm, x, atol=1e-5)


@pytest.mark.parametrize("k", [-1, 15, 2.5])
def test_dsm_bad_k(k):
    with pytest.raises(ValueError, match="k must be an integer"):
        sm.dsm_mask(torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 8, 8), k)


def test_dsm_bad_size():
    with pytest.raises(ValueError, match="not divisible by the DSM block size 8"):
        sm.dsm_mask(torch.zeros(1, 3, 12, 16), torch.zeros(1, 4, 8, 8), 8)
    with pytest.raises(ValueError, match="4x4 is not divisible"):
        sm.dsm_mask(torch.zeros(1, 3, 16, 16), torch.zeros(1, 4, 4, 4), 8)


#################################################################################
#                                     VAE                                       #
#################################################################################

@pytest.mark.parametrize("preset", list(sm.VAE_CONFIGS))
def test_vae_preset_shapes(preset):
    cfg = sm.VAE_CONFIGS[preset]
    f = 2 ** (len(cfg["channels"]) - 1)
    with torch.device("meta"):
        vae = sm.build_vae(preset)
        x = torch.empty(1, 3, 2 * f, 3 * f)
        mean, logvar = vae.encode(x)
        assert mean.shape == logvar.shape == (1, cfg["latent_channels"], 2, 3)
        assert vae.decode(mean).shape == x.shape
    assert vae.factor == f


def test_vae_sd_parameter_count():
    with torch.device("meta"):
        n = sum(p.numel() for p in sm.build_vae("f8d4").parameters())
    assert n == 83_653_863                                                # SD-VAE (sd-vae-ft-ema)


def _golden_vae(key="state_dict"):
    g = torch.load(os.path.join(DATA, "sd_vae_golden.pt"), weights_only=True)
    c = g["config"]
    preset = dict(channels=c["block_out_channels"], layers_per_block=c["layers_per_block"],
                  latent_channels=c["latent_channels"], norm_groups=c["norm_num_groups"])
    return sm.load_sd_vae(g[key], preset=preset), g


@pytest.mark.parametrize("key", ["state_dict", "state_dict_old_keys"])
def test_vae_matches_diffusers(key):
    """Golden values from diffusers' AutoencoderKL (testdata/make_vae_golden.py)."""
    vae, g = _golden_vae(key)
    with torch.no_grad():
        mean, logvar = vae.encode(g["x"])
        assert torch.allclose(mean, g["mean"], atol=1e-4)
        assert torch.allclose(logvar, g["logvar"], atol=1e-4)
        assert torch.allclose(vae.decode(g["mean"]), g["decoded"], atol=1e-4)


def test_load_sd_vae_from_file_and_errors(tmp_path):
    vae, g = _golden_vae()
    p = tmp_path / "diffusion_pytorch_model.bin"
    torch.save(g["state_dict"], p)
    vae2 = sm.load_sd_vae(tmp_path, preset=dict(vae.config))
    assert torch.equal(vae2.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="do not fit VAE preset"):
        sm.load_sd_vae(g["state_dict"], preset="tiny")
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model"):
        sm.load_sd_vae(tmp_path / "nothing_here" if (tmp_path / "e").mkdir() else tmp_path / "e")
    (tmp_path / "w.safetensors").write_bytes(b"")
    try:
        import safetensors  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="safetensors package is not installed"):
            sm.load_sd_vae(tmp_path / "w.safetensors")


def test_vae_bad_image_size():
    vae = sm.build_vae("tiny")
    with pytest.raises(ValueError, match="not divisible by the VAE downsampling factor 4"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 1, 32, 32))


#################################################################################
#                                Stage-1 losses                                 #
#################################################################################

def test_lpips_random_weights_shape_and_identity():
    torch.manual_seed(0)
    lp = sm.LPIPS()
    for l in lp.lins:
        torch.nn.init.uniform_(l.weight, 0, 1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = lp(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert lp(x, x).abs().max() < 1e-6


def test_lpips_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError, match="--lpips-weight 0"):
        sm.load_lpips()
    with pytest.raises(RuntimeError, match="not found at"):
        sm.load_lpips(path=str(tmp_path / "missing.pth"))


def test_patchgan_and_hinge():
    d = sm.PatchGAN()
    out = d(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)
    assert sm.hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert sm.hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.randn(5))
    rec, gen = (3 * w).sum(), (w * 1.5).sum()
    assert sm.adaptive_gan_weight(rec, gen, w, scale=1.0).item() == pytest.approx(2.0, rel=1e-3)
    assert sm.adaptive_gan_weight((1e9 * w).sum(), gen, w, scale=0.5).item() == pytest.approx(0.5e4)


def test_kl_loss_closed_form():
    assert sm.kl_loss(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).item() == 0.0
    mean, logvar = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), math.log(3.0))
    assert sm.kl_loss(mean, logvar).item() == pytest.approx(0.5 * (4 + 3 - 1 - math.log(3)), rel=1e-6)


def test_eq_vae_scale_shapes():
    x, z = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 8, 8)
    xs, zs = sm.eq_vae_scale(x, z, 0.5, 4)
    assert zs.shape == (2, 4, 4, 4) and xs.shape == (2, 3, 16, 16)


#################################################################################
#                            Dead leaves and data                               #
#################################################################################

def test_deadleaves_deterministic_and_labelled():
    a, la = sm.deadleaves_image(7, 32, seed=3)
    b, lb = sm.deadleaves_image(7, 32, seed=3)
    c, _ = sm.deadleaves_image(7, 32, seed=4)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and la == lb == 7 and not np.array_equal(a, c)
    ds = sm.DeadLeaves(20, 16)
    x, y = ds[13]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 and y == 3


def test_deadleaves_power_law_spectrum():
    """Dead leaves have a natural-image-like spectrum: power falls roughly like 1/f^2."""
    x = torch.stack([sm.DeadLeaves(16, 64)[i][0] for i in range(16)])
    p = sm.radial_spectrum(x, n_bins=16).mean(0)[1:12]
    f = torch.arange(1, 12).float() + 0.5
    slope = np.polyfit(np.log(f.numpy()), np.log(p.numpy()), 1)[0]
    assert -3.2 < slope < -1.5


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        train.build_dataset("folder", str(tmp_path / "empty"), 32)
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        train.build_dataset("folder", str(tmp_path / "nope"), 32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    ds = train.build_dataset("folder", str(bad), 32)
    with pytest.raises(ValueError, match="broken.png"):
        ds[0]


def test_image_folder_center_crop(tmp_path):
    from PIL import Image
    root = tmp_path / "imnet"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.full((50, 80, 3), 200 if c == "a" else 10, np.uint8)).save(root / c / "x.png")
    ds = train.build_dataset("imagenet", str(root), 32)
    assert len(ds) == 2 and ds.num_classes == 2
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and y == 1


#################################################################################
#                                 Checkpoints                                   #
#################################################################################

def test_checkpoint_atomic_and_typed(tmp_path):
    p = tmp_path / "c.pt"
    sm.save_checkpoint({"kind": "vae", "x": 1}, p)
    assert sm.load_checkpoint(p, "vae")["x"] == 1
    with pytest.raises(ValueError, match="is a 'vae' checkpoint, but a 'dit' checkpoint is needed"):
        sm.load_checkpoint(p, "dit")

    def boom(tmp):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        sm.save_checkpoint({"kind": "vae", "x": 2}, p, before_replace=boom)
    assert sm.load_checkpoint(p, "vae")["x"] == 1                         # old file intact
    assert os.listdir(tmp_path) == ["c.pt"]                               # no temporary left behind
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        sm.load_checkpoint(tmp_path / "junk.pt")
