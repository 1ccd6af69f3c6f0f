"""Tests for sm.py and the scripts: tiny models, small images, CPU. Run: python -m pytest -q

The first part is the specification of sm.py alone (`python -m pytest -q -k "not scripts"`, seconds); from
the banner "The scripts' building blocks" on, tests run or import train.py, sample.py and evaluate.py."""

import argparse
import functools
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
import sample
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


@pytest.mark.parametrize("h,w", [(16, 16), (16, 12), (5, 9)])
def test_radial_bins_partition_the_plane_by_radius(h, w):
    """Every coefficient is in exactly one bin, bins grow with the radius sqrt(u^2 + v^2), DC is in the first
    bin and the farthest coefficient in the last."""
    bins, counts = sm._radial_bins(h, w, 16, "cpu")
    bins = bins.view(h, w)
    r = torch.sqrt(torch.arange(h)[:, None].float() ** 2 + torch.arange(w)[None].float() ** 2)
    order = torch.argsort(r.flatten())
    assert torch.all(torch.diff(bins.flatten()[order]) >= 0)                      # monotone in the radius
    assert bins[0, 0] == 0 and bins[-1, -1] == 15
    assert torch.equal(counts, torch.bincount(bins.flatten(), minlength=16).clamp_min(1).float())


def test_esm_properties():
    """ESM is a KL (>= 0) that ignores the order of the latent channels and of the batch, and flattening
    (delta > 0) moves the target's mass to high frequencies. Its values against the authors' code are in
    test_official_vae_forward_scale_kl_esm_dsm."""
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    z = torch.randn(3, 8, 16, 16)
    base = sm.esm_loss(x, z)
    assert base >= 0
    torch.testing.assert_close(sm.esm_loss(x, z[:, torch.randperm(8)]), base, rtol=1e-5, atol=1e-7)
    p = torch.randperm(3)
    torch.testing.assert_close(sm.esm_loss(x[p], z[p]), base, rtol=1e-5, atol=1e-7)
    targets = [sm.spectrum_profiles(x, z, delta=dl)[0].mean(0) for dl in (0.0, 1.0, 2.0)]
    high = [float(t[8:].sum()) for t in targets]
    assert high[0] < high[1] < high[2]


def test_gaussian_blur_is_a_zero_padded_gaussian():
    from scipy.ndimage import convolve
    x = torch.rand(1, 2, 16, 16)
    g = np.exp(-(np.arange(-3, 4)[:, None] ** 2 + np.arange(-3, 4)[None] ** 2) / (2 * 1.2 ** 2))
    blurred = convolve(x[0, 1].double().numpy(), g / g.sum(), mode="constant")
    assert np.allclose(sm.gaussian_blur(x, 1.2, 7)[0, 1].numpy(), blurred, atol=1e-6)


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
    a, _ = sm.dsm_mask(x, z, np.int64(10))                                # numpy / torch integers are fine
    b, _ = sm.dsm_mask(x, z, torch.tensor(10))
    assert torch.equal(a, b)


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
    xm, _ = sm.dsm_mask(x, x, 8)                                          # k = 8 keeps u + v <= 6
    assert torch.allclose(xm, x, atol=1e-5)
    xm, _ = sm.dsm_mask(x, x, 12)                                         # k = 12 keeps u + v <= 2 only
    assert not torch.allclose(xm, x, atol=1e-3)


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
        sm.load_sd_vae(tmp_path / "empty_folder" if (tmp_path / "empty_folder").mkdir() is None else None)
    st = tmp_path / "st"                                    # .safetensors without the safetensors package
    st.mkdir()
    write_safetensors(st / "diffusion_pytorch_model.safetensors", g["state_dict"])
    vae3 = sm.load_sd_vae(st, preset=dict(vae.config))
    assert all(torch.equal(a, b) for a, b in zip(vae3.state_dict().values(), vae.state_dict().values()))
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="w.safetensors: not a safetensors file"):
        sm.load_sd_vae(tmp_path / "w.safetensors")


def test_vae_bad_image_size():
    vae = sm.build_vae("tiny")
    with pytest.raises(ValueError, match="not divisible by the VAE downsampling factor 4"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 1, 32, 32))


def test_downsample_padding_formulas():
    """Stride-2 3x3 conv: symmetric = zero pad 1 on every side (the authors' DownSampleBlock2D);
    asymmetric = zero pad right/bottom only (diffusers): y[i, j] = sum_ab w[a, b] x[2i + a - p, 2j + b - p]."""
    x = torch.arange(36, dtype=torch.float64).reshape(1, 1, 6, 6) ** 1.5
    w = torch.arange(9, dtype=torch.float64).reshape(3, 3) - 3.5
    expect = {}
    for pad, p in (("symmetric", 1), ("asymmetric", 0)):
        y = np.zeros((3, 3))
        for i in range(3):
            for j in range(3):
                for a in range(3):
                    for b in range(3):
                        r, c = 2 * i + a - p, 2 * j + b - p
                        if 0 <= r < 6 and 0 <= c < 6:
                            y[i, j] += w[a, b].item() * x[0, 0, r, c].item()
        d = sm.Downsample(1, pad).double()
        with torch.no_grad():
            d.conv.weight.copy_(w.view(1, 1, 3, 3))
            d.conv.bias.zero_()
            expect[pad] = d(x)[0, 0].numpy()
        np.testing.assert_allclose(expect[pad], y, rtol=1e-12)
    assert np.abs(expect["symmetric"] - expect["asymmetric"]).max() > 1.0


@pytest.mark.parametrize("preset,shape", [("f32d64", (64, 8, 8)), ("f64d256", (256, 4, 4))])
def test_authors_large_presets(preset, shape):
    """configs/ldm_f32d64.yaml and ldm_f64d256.yaml: 256 px images -> 8x8x64 and 4x4x256 latents."""
    with torch.device("meta"):
        vae = sm.build_vae(preset)
        mean, logvar = vae.encode(torch.empty(1, 3, 256, 256))
        assert mean.shape == logvar.shape == (1,) + shape
        assert vae.decode(mean).shape == (1, 3, 256, 256)
    chans = [l.resnets[0].conv1.out_channels for l in vae.encoder.down_blocks]
    assert tuple(chans) == sm.VAE_CONFIGS[preset]["channels"]


def _official_golden():
    return torch.load(os.path.join(DATA, "official_vae_golden.pt"), weights_only=True)


def test_official_vae_matches_authors_code():
    """Golden outputs of the authors' own modules/vae.py (testdata/make_official_vae_golden.py)."""
    g = _official_golden()
    vae = sm.load_official_vae(g["state_dict"], preset=g["sm_preset"])
    with torch.no_grad():
        mean, logvar = vae.encode(g["x"])
        assert (mean - g["mean"]).abs().max() < 1e-5
        assert (logvar - g["logvar"]).abs().max() < 1e-5
        assert (logvar[:, 1] == -30.0).all()                   # their clamp, hit on purpose
        assert (vae.decode(g["mean"]) - g["decoded"]).abs().max() < 1e-5


def test_official_vae_forward_scale_kl_esm_dsm():
    """Their VAE.forward (both branches) and scaled encode/decode, from the same mean, logvar and eps."""
    g = _official_golden()
    e, d = g["esm_branch"], g["dsm_branch"]
    vae = sm.load_official_vae(g["state_dict"], preset=g["sm_preset"], scale_factor=g["scale_factor"])
    with torch.no_grad():
        mean, logvar = vae.encode(g["x"])
        z = vae.sample(mean, logvar, g["eps"])
        assert (z - e["posterior"]).abs().max() < 1e-5
        assert (vae.decode(z) - e["reconstruction"]).abs().max() < 1e-5
        assert (vae.normalize(z) - g["scaled_posterior"]).abs().max() < 1e-5        # z * scale_factor
        assert (vae.decode(vae.denormalize(g["scaled_posterior"])) - g["scaled_decoded"]).abs().max() < 1e-5
        assert sm.kl_loss(mean, logvar).item() == pytest.approx(e["kl_loss"].mean().item(), rel=1e-6)
        assert sm.esm_loss(g["x"], z, delta=e["delta"]).item() == pytest.approx(e["sm_delta"].item(), rel=1e-5)
        assert sm.esm_loss(g["x"], z, delta=0.0).item() == pytest.approx(e["sm_rgb"].item(), rel=1e-5)
        x_k, z_k = sm.dsm_mask(g["x"], z, d["k"], d["blk_sz"])
        assert (x_k - d["img"]).abs().max() < 1e-5 and (z_k - d["posterior"]).abs().max() < 1e-5
        assert (vae.decode(z_k) - d["reconstruction"]).abs().max() < 1e-5


def test_official_vae_from_safetensors_and_errors(tmp_path):
    g = _official_golden()
    write_safetensors(tmp_path / "model.safetensors", g["state_dict"], metadata={"format": "pt"})
    ref = sm.load_official_vae(g["state_dict"], preset=g["sm_preset"])
    for src in (tmp_path, tmp_path / "model.safetensors"):     # accelerate's checkpoint folder, or the file
        vae = sm.load_official_vae(src, preset=g["sm_preset"])
        assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), ref.state_dict().values()))
    ddp = {"module." + k: v for k, v in g["state_dict"].items()}
    assert torch.equal(sm.load_official_vae(ddp, g["sm_preset"]).decoder.conv_out.bias, ref.decoder.conv_out.bias)
    guessed = sm.load_official_vae(g["state_dict"], preset=None).config
    assert guessed["channels"] == (8, 16, 16) and guessed["layers_per_block"] == 2 and guessed["latent_channels"] == 4
    with pytest.raises(ValueError, match=r"preset 'f16d16': 96 missing .*, 4 unexpected .*, 195 of another "
                                         r"shape .*look like \{'channels': \(8, 16, 16\)"):
        sm.load_official_vae(g["state_dict"])
    sd = dict(g["state_dict"])
    del sd["pre_decoder_conv.weight"]
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['pre_decoder_conv.weight'\]\)"):
        sm.load_official_vae(sd, g["sm_preset"])
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin in"):
        sm.load_official_vae(tmp_path / "ckpt" if (tmp_path / "ckpt").mkdir() is None else None)
    with pytest.raises(ValueError, match="pads its downsampling symmetrically"):
        sm.load_official_vae(g["state_dict"], dict(g["sm_preset"], downsample_padding="asymmetric"))
    with pytest.raises(ValueError, match="scale_factor must be positive"):
        sm.load_official_vae(g["state_dict"], g["sm_preset"], scale_factor=0.0)
    odd = {"encoder.encoder_blocks.0.blocks.0.conv1.weight": torch.zeros(()), "decoder.conv_in.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="do not fit VAE preset 'tiny'"):          # no layout to guess: no hint
        sm.load_official_vae(odd, "tiny")


# .safetensors written from the format spec (huggingface/safetensors README), independently of sm.py
_ST_CODES = {torch.float64: ("F64", "<f8"), torch.float32: ("F32", "<f4"), torch.float16: ("F16", "<f2"),
             torch.bfloat16: ("BF16", "<i2"), torch.int64: ("I64", "<i8"), torch.int32: ("I32", "<i4"),
             torch.int16: ("I16", "<i2"), torch.int8: ("I8", "|i1"), torch.uint8: ("U8", "|u1"),
             torch.bool: ("BOOL", "|u1")}


def write_safetensors(path, tensors, metadata=None):
    """u64 little-endian header size, JSON header padded with spaces to 8 bytes, little-endian data."""
    header, blobs, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        code, np_dtype = _ST_CODES[t.dtype]
        t = t.detach().cpu().contiguous()
        a = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()        # bf16 as its bit pattern
        blob = a.astype(np_dtype).tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def _safetensors_golden_tensors():
    """Same recipe as safetensors_golden_tensors() in testdata/make_official_vae_golden.py."""
    a = torch.arange(-6, 6, dtype=torch.float64).reshape(3, 4) / 7
    return {
        "f64": a, "f32": a.float(), "f16": a.half(), "bf16": a.bfloat16(),
        "i64": torch.tensor([-(2 ** 40), -1, 0, 2 ** 40 + 3]),
        "i32": torch.tensor([[-(2 ** 30), 7], [0, 2 ** 30]], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 254, 255], dtype=torch.uint8), "bool": torch.tensor([[True, False, True]]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    }


def _assert_same_tensors(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def test_safetensors_reader_matches_the_package(tmp_path):
    """A file written by the safetensors package (0.8.0), and one written here from the spec."""
    want = _safetensors_golden_tensors()
    got, meta = sm.load_safetensors(os.path.join(DATA, "safetensors_golden.safetensors"), with_metadata=True)
    _assert_same_tensors(got, want)
    assert meta == {"format": "pt", "note": "sm golden"}
    write_safetensors(tmp_path / "own.safetensors", want)
    _assert_same_tensors(sm.load_safetensors(tmp_path / "own.safetensors"), want)
    got["f32"] += 1                                            # writable, not tied to the file
    assert got["f32"][0, 0].item() == pytest.approx(1 - 6 / 7)


def test_safetensors_reader_reads_unsigned_and_float8(tmp_path):
    """U16 / U32 / U64 and F8 tensors, written as raw little-endian bytes."""
    assert sys.byteorder == "little"
    want = {"u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
            "u32": torch.tensor([2 ** 32 - 1], dtype=torch.uint32), "u64": torch.tensor([[5, 7]], dtype=torch.uint64),
            "e4m3": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
            "e5m2": torch.tensor([0.25, -3.0]).to(torch.float8_e5m2)}
    codes = {"u16": "U16", "u32": "U32", "u64": "U64", "e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}
    header, blobs, offset = {}, b"", 0
    for k, t in want.items():
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": codes[k], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs, offset = blobs + blob, offset + len(blob)
    h = json.dumps(header).encode()
    (tmp_path / "u.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + blobs)
    got = sm.load_safetensors(tmp_path / "u.safetensors")
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape
        assert torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), k


def test_safetensors_reader_errors(tmp_path):
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": torch.ones(4, 4), "b": torch.zeros(3, dtype=torch.int64)})
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    h16 = json.dumps({"__metadata__": {"a": "b"}}).encode("utf-16")          # valid JSON, but not UTF-8
    cases = {
        raw[:5]: "not a safetensors file",
        raw[:-3]: r"truncated: tensor 'b' ends at byte 88 of a 85-byte data section",
        raw[:8 + n - 4]: "truncated or not a safetensors file",
        raw[:8] + b"{" * n + raw[8 + n:]: "header is not a valid JSON object",
        raw[:8] + b"[]" + b" " * (n - 2) + raw[8 + n:]: "header is not a valid JSON object",
        raw.replace(b'"F32"', b'"C64"'): "unsupported dtype 'C64'",
        raw.replace(b'[4, 4]', b'[4, 5]'): r"tensor 'a': 64 bytes for shape \[4, 5\] of F32 \(expected 80\)",
        raw.replace(b'[4, 4]', b'[-4,4]'): r"tensor 'a' has a bad shape \[-4, 4\]",
        len(h16).to_bytes(8, "little") + h16: "header is not a valid JSON object",      # the format says UTF-8
        raw.replace(b'"shape"', b'"shapf"'): "tensor 'a' has a malformed header entry",
    }
    for bad, msg in cases.items():
        p.write_bytes(bad)
        with pytest.raises(ValueError, match=f"x.safetensors: .*{msg}"):
            sm.load_safetensors(p)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        sm.load_official_vae(tmp_path / "missing.safetensors")


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


def test_lpips_matches_reference_package():
    """Golden values from the lpips package: real v0.1 heads, seeded random VGG16 (testdata/README.md)."""
    from torchvision.models import vgg16
    g = torch.load(os.path.join(DATA, "lpips_golden.pt"), weights_only=True)
    torch.manual_seed(g["vgg_seed"])
    lp = sm.LPIPS.from_state_dicts(g["lin"], vgg16(weights=None).state_dict())
    with torch.no_grad():
        assert torch.allclose(lp(g["x"], g["y"]), g["d"], rtol=1e-5, atol=1e-6)


def test_lpips_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError, match="--lpips-weight 0"):
        sm.load_lpips()
    with pytest.raises(RuntimeError, match="not found at"):
        sm.load_lpips(path=str(tmp_path / "missing.pth"))


def test_patchgan_matches_authors_code():
    """The authors' PatchGAN(...).apply(init_weights) after the same seed: same weights, same logits."""
    g = _official_golden()["disc"]
    k = g["kwargs"]
    torch.manual_seed(g["seed"])
    d = sm.PatchGAN(k["input_channels"], k["start_dim"], k["depth"], k["kernel_size"], k["leaky_relu_slope"])
    ours = {"model." + n[len("main."):]: v for n, v in d.state_dict().items()}          # their Sequential: model
    _assert_same_tensors(ours, g["state_dict"])
    with torch.no_grad():
        assert (d.train()(g["x"]) - g["logits_train"]).abs().max() < 1e-5             # batch statistics
        assert (d.eval()(g["x"]) - g["logits_eval"]).abs().max() < 1e-5


def test_patchgan_shape_and_init_statistics():
    """256 px -> 30x30 logits; conv weights ~ N(0, 0.2^2), BatchNorm weights ~ N(1, 0.02^2), biases as theirs.

    For n i.i.d. N(mu, s^2) draws the sample mean has sd s/sqrt(n) and the sample std about s/sqrt(2n):
    5 sd bounds (a false failure has probability < 1e-6 per check)."""
    with torch.device("meta"):
        assert sm.PatchGAN()(torch.empty(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    torch.manual_seed(0)
    d = sm.PatchGAN()
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1] and len(bns) == 3
    for mods, mu, s in ((convs, 0.0, 0.2), (bns, 1.0, 0.02)):
        for m in mods:
            w = m.weight.detach().double().flatten()
            n = w.numel()
            assert abs(w.mean().item() - mu) < 5 * s / math.sqrt(n), (m, n)
            assert abs(w.std().item() - s) < 5 * s / math.sqrt(2 * n), (m, n)
    assert all(torch.equal(b.bias, torch.zeros_like(b.bias)) for b in bns)
    for c in (convs[0], convs[-1]):                            # PyTorch's default U(-1/sqrt(fan_in), ...)
        fan_in = c.weight[0].numel()
        assert c.bias.abs().max() <= 1 / math.sqrt(fan_in) and c.bias.abs().max() > 0
    assert all(c.bias is None for c in convs[1:-1])
    torch.manual_seed(0)
    w = sm.PatchGAN(init_std=0.02).main[0].weight.detach().double()                  # VQGAN / DCGAN's 0.02
    assert abs(w.std().item() - 0.02) < 5 * 0.02 / math.sqrt(2 * w.numel())


def test_hinge_closed_form():
    """mean(relu(1 - real)) + mean(relu(1 + fake)), without a 1/2 (the authors' stage1_vae_trainer.py)."""
    r, f = torch.randn(3, 1, 5, 5), torch.randn(3, 1, 5, 5)
    want = np.maximum(0, 1 - r.double().numpy()).mean() + np.maximum(0, 1 + f.double().numpy()).mean()
    assert sm.hinge_d_loss(r, f).item() == pytest.approx(want, rel=1e-6)
    assert sm.hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 2.0
    assert sm.hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert sm.hinge_d_loss(torch.full((4,), -1.0), torch.full((4,), 0.5)).item() == 3.5


def test_adaptive_weight_closed_form():
    """rec = <A, W>, gen = <B, W> have gradients A and B: weight = scale * min(|A| / max(|B|, 1e-8), 1e4)."""
    W = torch.nn.Parameter(torch.randn(3, 4))
    A, B = torch.randn(3, 4), torch.randn(3, 4)
    want = (A.double().norm() / B.double().norm()).item()
    assert sm.adaptive_gan_weight((A * W).sum(), (B * W).sum(), W, 0.5).item() == pytest.approx(0.5 * want, rel=1e-6)
    assert sm.adaptive_gan_weight((A * W).sum(), (B * W).sum(), W, 1.0, reduce=lambda g: 3 * g).item() \
        == pytest.approx(want, rel=1e-6)
    tiny = 1e-9 * B                                            # |grad gen| < 1e-8: divided by 1e-8 instead
    w = sm.adaptive_gan_weight((1e-6 * A * W).sum(), (tiny * W).sum(), W, 1.0, max_weight=1e9).item()
    assert w == pytest.approx(1e-6 * A.double().norm().item() / 1e-8, rel=1e-5)
    assert sm.adaptive_gan_weight((1e9 * A * W).sum(), (B * W).sum(), W, 0.5).item() == 0.5e4     # clamp
    out = sm.adaptive_gan_weight((A * W).sum(), (B * W).sum(), W)
    assert not out.requires_grad


def test_kl_loss_closed_form():
    assert sm.kl_loss(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).item() == 0.0
    mean, logvar = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), math.log(3.0))
    assert sm.kl_loss(mean, logvar).item() == pytest.approx(0.5 * (4 + 3 - 1 - math.log(3)), rel=1e-6)


def test_eq_vae_scale_shapes():
    x, z = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 8, 8)
    xs, zs = sm.eq_vae_scale(x, z, 0.5, 4)
    assert zs.shape == (2, 4, 4, 4) and xs.shape == (2, 3, 16, 16)
    xs, zs = sm.eq_vae_scale(x, z, 0.25, 4, min_image_size=24)             # LPIPS / PatchGAN need room
    assert zs.shape == (2, 4, 6, 6) and xs.shape == (2, 3, 24, 24)
    xs, zs = sm.eq_vae_scale(x, z, 0.3, 4, min_image_size=64)
    assert zs.shape == z.shape and xs.shape == x.shape


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


#################################################################################
#                                 DiT / SiT                                     #
#################################################################################

GOLDEN_REPA = os.path.join(DATA, "repa_sit_golden.pt")


def tiny_dit(**kw):
    """Tiny conditional DiT on 8x8x4 latents (16 tokens)."""
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10,
               encoder_depth=1, z_dims=[16], projector_dim=32)
    cfg.update(kw)
    torch.manual_seed(0)
    return sm.DiT(**cfg)


def perturb(model, std=0.2):
    """Make the zero-initialised adaLN / output weights nonzero, so outputs depend on everything."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_adaln_zero_init_outputs_zeros():
    m = tiny_dit()
    v, zs = m(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 9]))
    assert v.shape == (3, 4, 8, 8) and torch.count_nonzero(v) == 0
    assert len(zs) == 1 and zs[0].shape == (3, 16, 16)


def test_preset_parameter_counts():
    """REPA's SiT-B/2 and SiT-XL/2 (ImageNet 256, SD-VAE latents): ~130M / ~675M, plus one 768-d projector."""
    counts = {}
    with torch.device("meta"):
        for name in ("DiT-B/2", "DiT-XL/2"):
            for z in ([768], []):
                counts[name, len(z)] = sum(p.numel() for p in sm.DiT_MODELS[name](z_dims=z).parameters())
    assert counts["DiT-B/2", 0] == 130_500_112 and counts["DiT-B/2", 1] == 137_845_008
    assert counts["DiT-XL/2", 0] == 675_111_184 and counts["DiT-XL/2", 1] == 683_242_512
    assert len(sm.DiT_MODELS) == 12 and {"DiT-S/1", "DiT-L/4"} <= set(sm.DiT_MODELS)


def test_cfg_one_equals_conditional_prediction():
    """With cfg 1 the sampler uses the conditional velocity alone; with cfg > 1 it differs."""
    m = perturb(tiny_dit()).eval()
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    z1 = sm.sample_ode(m, noise, y, steps=1, cfg_scale=1.0)
    with torch.no_grad():
        v = m(noise, torch.ones(2), y)[0].double()
    assert torch.allclose(z1, noise.double() - v, atol=1e-6)               # one Euler step from t = 1 to 0
    z2 = sm.sample_ode(m, noise, y, steps=1, cfg_scale=2.0)
    with torch.no_grad():
        vu = m(noise, torch.ones(2), torch.full((2,), 10))[0].double()
    assert torch.allclose(z2, noise.double() - (vu + 2.0 * (v - vu)), atol=1e-6)
    z3 = sm.sample_ode(m, noise, y, steps=1, cfg_scale=2.0, guidance_interval=(0.0, 0.5))
    assert torch.allclose(z3, z1)                                          # t = 1 is outside the interval


class ExactVelocity(torch.nn.Module):
    """The exact flow-matching velocity for data N(mu, s^2 I) under x_t = (1-t) x + t eps."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s, self.num_classes = mu, s, 0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        t = t.double().view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.s ** 2 + t ** 2
        e_eps = t * (x.double() - (1 - t) * self.mu) / var                 # E[eps | x_t]
        e_x0 = self.mu + (1 - t) * self.s ** 2 * (x.double() - (1 - t) * self.mu) / var
        return (e_eps - e_x0).to(x.dtype), []


def test_ode_with_exact_velocity_recovers_data():
    """Point mass (s -> 0): every noise is transported onto the data point; Gaussian: the right law."""
    mu = torch.full((1, 1, 4, 4), 0.7, dtype=torch.float64)
    noise = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    out = sm.sample_ode(ExactVelocity(mu, 1e-4), noise, None, steps=50)
    assert (out - mu).abs().max() < 1e-3
    out = sm.sample_ode(ExactVelocity(mu, 0.5), torch.randn(4000, 1, 4, 4, dtype=torch.float64), None, steps=40,
                        heun=True)
    assert abs(out.mean().item() - 0.7) < 0.02 and abs(out.std().item() - 0.5) < 0.02
    torch.manual_seed(0)
    out = sm.sample_sde(ExactVelocity(mu, 0.5), torch.randn(4000, 1, 4, 4, dtype=torch.float64), None, steps=100)
    assert abs(out.mean().item() - 0.7) < 0.03 and abs(out.std().item() - 0.5) < 0.05


def test_repa_loss_identical_features_is_minus_one():
    z = torch.randn(2, 16, 8)
    assert torch.allclose(sm.repa_loss([z], [z * 3.0]), torch.full((2,), -1.0), atol=1e-6)
    assert torch.allclose(sm.repa_loss([z], [-z]), torch.full((2,), 1.0), atol=1e-6)
    with pytest.raises(ValueError, match="resize_token_grid"):
        sm.repa_loss([z], [torch.randn(2, 4, 8)])


def test_zscore_and_dog_targets_have_zero_spatial_mean():
    Z = torch.randn(2, 64, 12) + 3.0
    for t in (sm.repa_target(Z, "zscore", alpha=1.0), sm.repa_target(Z, "dog")):
        assert t.shape == Z.shape
        assert t.mean(dim=1).abs().max() < 1e-5
        assert torch.allclose(t.std(dim=1), torch.ones(2, 12), atol=1e-3)
    zs = sm.repa_target(Z, "zscore")                                       # alpha 0.6 keeps 40% of the mean
    assert torch.allclose(zs, (Z - 0.6 * Z.mean(1, keepdim=True)) / (Z.std(1, keepdim=True) + 1e-6))
    assert torch.equal(sm.repa_target(Z, "raw"), Z)
    with pytest.raises(ValueError, match="'raw', 'zscore' or 'dog'"):
        sm.repa_target(Z, "fft")


def test_dog_is_a_band_pass():
    """DoG removes a constant, damps a slow ramp and the checkerboard, and passes a period-4 pattern."""
    h = 8
    ii, jj = torch.meshgrid(torch.arange(h).float(), torch.arange(h).float(), indexing="ij")
    grid = lambda a: a.reshape(1, 1, h, h)
    bp = lambda a: sm._gaussian_blur_grid(grid(a), 0.5) - sm._gaussian_blur_grid(grid(a), 2.0)
    gain = lambda a: (bp(a).std() / a.std()).item()
    assert bp(torch.ones(h, h)).abs().max() < 1e-6
    g_ramp, g_mid, g_check = gain(ii / h), gain(torch.cos(math.pi / 2 * ii)), gain((ii + jj) % 2 * 2 - 1)
    assert g_mid > 0.5 and g_mid > 1.5 * g_ramp and g_mid > 1.5 * g_check


def test_directional_spectral_energy_matches_fft():
    torch.manual_seed(0)
    Z = torch.randn(3, 36, 5)
    u = F.normalize(Z, dim=-1).transpose(1, 2).reshape(3, 5, 6, 6)
    U = torch.fft.fft2(u, norm="ortho")
    energy = U.abs().pow(2).sum(dim=(1, 2, 3)) - U[:, :, 0, 0].abs().pow(2).sum(1)
    assert torch.allclose(sm.directional_spectral_energy(Z, reduction="none"), (energy / 36).sqrt(), atol=1e-5)
    assert sm.directional_spectral_energy(torch.ones(2, 16, 4)).item() < 1e-6


@pytest.mark.parametrize("opts", [dict(qk_norm=True), dict(rmsnorm=True), dict(swiglu=True), dict(rope=True),
                                  dict(qk_norm=True, rmsnorm=True, swiglu=True, rope=True),
                                  dict(projector_type="conv")])
def test_lightningdit_options_forward_backward(opts):
    m = perturb(tiny_dit(**opts)).train()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    out = sm.flow_loss(m, x, y, repa_targets=[torch.randn(2, 16, 16)], cos_weight=0.1)
    out["loss"].backward()
    assert set(out) == {"mse", "cos", "repa", "t", "loss"} and torch.isfinite(out["loss"])
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_conv_projector_is_a_conv_on_the_token_grid():
    """iREPA's projector on a non-square grid equals conv2d of the (h, w) token image, and says so when the
    tokens do not fill its grid."""
    torch.manual_seed(0)
    proj = sm.ConvProjector(8, 5, 3, (2, 3))
    x = torch.randn(2, 6, 8)                                               # (N, T, D), T = 2 x 3
    img = x.transpose(1, 2).reshape(2, 8, 2, 3)                            # token t = row * 3 + column
    want = F.conv2d(img, proj.conv.weight, proj.conv.bias, padding=1).flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj(x), want)
    with pytest.raises(ValueError, match=r"grid \(2, 3\) does not hold 4 tokens"):
        proj(torch.randn(2, 4, 8))
    m = tiny_dit(projector_type="conv", input_size=(8, 12))               # a 4 x 6 DiT grid
    assert m.projectors[0].grid_hw == m.grid_size == (4, 6)


def test_timestep_embedding_is_even_and_cached_dct_survives_inference_mode():
    with pytest.raises(ValueError, match="frequency_embedding_size must be even"):
        sm.TimestepEmbedder(16, 255)
    sm._DCT_CACHE.clear()
    sm._BIN_CACHE.clear()
    x, z = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.inference_mode():                                           # fills the caches first
        sm.esm_loss(x, z.detach())
    sm.esm_loss(x, z).backward()                                           # the cached matrices work in autograd
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_lightningdit_options_do_what_they_say():
    """Each option changes the computation in its own way (an ignored option would fail here)."""
    torch.manual_seed(0)
    h = torch.randn(2, 16, 64)
    att = sm.Attention(64, 4, qk_norm=True)
    base = att(h)
    att.qkv.weight.data[:128] *= 10                                        # scale q and k: normalised away
    att.qkv.bias.data[:128] *= 10
    torch.testing.assert_close(att(h), base, rtol=0, atol=1e-4)          # up to LayerNorm's eps (1e-5) / var
    plain = sm.Attention(64, 4)
    before = plain(h)
    plain.qkv.weight.data[:128] *= 10
    plain.qkv.bias.data[:128] *= 10
    assert (plain(h) - before).abs().max() > 1e-2
    shifted = h + 3.0                                                      # LayerNorm ignores a common shift
    torch.testing.assert_close(sm._block_norm(64, False)(shifted), sm._block_norm(64, False)(h), rtol=1e-4, atol=1e-4)
    assert (sm._block_norm(64, True)(shifted) - sm._block_norm(64, True)(h)).abs().max() > 0.1   # RMSNorm does not
    gelu, glu = sm.DiTBlock(64, 4).mlp, sm.DiTBlock(64, 4, swiglu=True).mlp
    assert isinstance(glu, sm.SwiGLU) and abs(sum(p.numel() for p in glu.parameters()) /
                                              sum(p.numel() for p in gelu.parameters()) - 1) < 0.01
    a, b = perturb(tiny_dit()), tiny_dit(rope=True)                       # same weights, RoPE on
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert (a.eval()(x, t, y)[0] - b.eval()(x, t, y)[0]).abs().max() > 1e-3
    conv = tiny_dit(projector_type="conv")
    assert isinstance(conv.projectors[0], sm.ConvProjector) and "projectors.0.conv.weight" in conv.state_dict()


def test_rope_is_relative():
    """RoPE attention scores depend only on the offset between positions."""
    rope = sm.RoPE2D(8, (4, 4))
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8)
    s = rope(q) @ rope(k).transpose(-1, -2)                                # (1, 1, 16, 16)
    assert torch.allclose(s[0, 0, 0, 5], s[0, 0, 5, 10], atol=1e-5)        # (0,0)->(1,1) and (1,1)->(2,2)
    assert not torch.allclose(s[0, 0, 0, 5], s[0, 0, 0, 6], atol=1e-3)


def test_unconditional_model():
    m = perturb(tiny_dit(num_classes=0))
    assert m.y_embedder is None
    out = sm.flow_loss(m, torch.randn(2, 4, 8, 8), None)
    assert torch.isfinite(out["loss"])
    assert sm.sample_ode(m, torch.randn(2, 4, 8, 8), None, steps=2).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class-conditional"):
        sm.sample_ode(m, torch.randn(2, 4, 8, 8), None, steps=2, cfg_scale=2.0)


def test_bad_labels_and_sizes():
    m = tiny_dit()
    x = torch.randn(2, 4, 8, 8)
    m.eval()
    m(x, torch.rand(2), torch.tensor([0, 10]))                             # the null class is fine inside CFG
    with pytest.raises(ValueError, match=r"got \[0, 10\], expected \[0, 10\)"):
        sm.sample_ode(m, x, torch.tensor([0, 10]), steps=2)                # but not as a user label
    with pytest.raises(ValueError, match="does not match the model's input_size"):
        m(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"expected latents \(N, 4, H, W\)"):
        m(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape"):
        m(x, torch.rand(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        sm.DiT(input_size=9, patch_size=2)


def _repa_golden():
    return torch.load(GOLDEN_REPA, weights_only=False)


def test_repa_golden_forward():
    """Golden values from REPA's own SiT (testdata/README_stage2.md)."""
    g = _repa_golden()
    for prefix, sd_key, kw_key in (("", "state_dict", "kwargs"), ("qk_", "qk_state_dict", "qk_kwargs")):
        m = sm.load_repa_sit(g[sd_key], **g[kw_key])
        with torch.no_grad():
            v, zs = m(g["x"], g["t"], g["y"])
        assert torch.allclose(v, g[prefix + "v"], atol=1e-4)
        for a, b in zip(zs, g[prefix + "zs"]):
            assert torch.allclose(a, b, atol=1e-4)


def test_load_repa_sit_checkpoint_entries():
    g = _repa_golden()
    ckpt = {"model": {f"module.{k}": torch.zeros_like(v) for k, v in g["state_dict"].items()},
            "ema": g["state_dict"], "opt": {}, "args": None}
    m = sm.load_repa_sit(ckpt, **g["kwargs"])
    assert torch.equal(m.final_layer.linear.weight, g["state_dict"]["final_layer.linear.weight"])
    m2 = sm.load_repa_sit(ckpt, which="model", **g["kwargs"])
    assert torch.count_nonzero(m2.final_layer.linear.weight) == 0
    with pytest.raises(TypeError, match="unknown REPA SiT arguments"):
        sm.load_repa_sit(ckpt, hidden=3)


@pytest.mark.parametrize("name", ["euler_cfg1", "euler_cfg1.5_interval", "heun_cfg1.5_interval",
                                  "sde_cfg1.5_interval_seed1234"])
def test_repa_golden_samplers(name):
    """Same model and noise as REPA's euler_sampler / euler_maruyama_sampler give the same latents."""
    g = _repa_golden()
    m = sm.load_repa_sit(g["state_dict"], **g["kwargs"])
    c = g["samplers"][name]
    if name.startswith("sde"):
        torch.manual_seed(c["seed"])                                       # REPA draws from the global RNG
        out = sm.sample_sde(m, g["noise"], g["ys"], steps=c["steps"], cfg_scale=c["cfg_scale"],
                            guidance_interval=c["guidance_interval"])
    else:
        out = sm.sample_ode(m, g["noise"], g["ys"], steps=c["steps"], cfg_scale=c["cfg_scale"],
                            guidance_interval=c["guidance_interval"], heun=c["heun"])
    assert out.dtype == torch.float64
    assert torch.allclose(out, g["samples"][name].detach(), atol=1e-4)


def test_flow_loss_explicit_randomness():
    m = perturb(tiny_dit())
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    t, noise, drop = torch.tensor([0.0, 0.5, 1.0]), torch.randn(3, 4, 8, 8), torch.tensor([False, True, False])
    out = sm.flow_loss(m, x, y, t=t, noise=noise, drop_ids=drop)
    with torch.no_grad():
        xt = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        v = m.eval()(xt, t, torch.tensor([1, 10, 3]))[0]                   # dropped label -> null class
    assert torch.allclose(out["mse"], (v - (noise - x)).pow(2).mean((1, 2, 3)), atol=1e-6)
    tl = sm.sample_time(10000, "lognormal", generator=torch.Generator().manual_seed(0))
    assert 0 < tl.min() and tl.max() < 1 and abs(torch.logit(tl).std().item() - 1) < 0.03


def test_tiny_dit_training_lowers_flow_loss():
    """A few dozen steps on fixed dead-leaves-like latents lower the flow-matching loss."""
    torch.manual_seed(0)
    m = tiny_dit(z_dims=[], hidden_size=64)
    x = F.avg_pool2d(torch.stack([sm.DeadLeaves(8, 32)[i][0] for i in range(8)]), 4)
    x = torch.cat([x, x.mean(1, keepdim=True)], 1) * 2                     # (8, 4, 8, 8) "latents"
    y = torch.arange(8) % 10
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    evaluate = lambda: sm.flow_loss(m, x, y, t=torch.linspace(0.05, 0.95, 8), noise=torch.randn(
        x.shape, generator=torch.Generator().manual_seed(5)))["loss"].item()
    before = evaluate()
    for _ in range(60):
        loss = sm.flow_loss(m, x, y, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert evaluate() < 0.7 * before


def test_load_dinov2_offline_error(monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(RuntimeError, match="--repa-encoder none"):
        sm.load_dinov2()


POS_CASES = ["sq37_to16", "sq37_to32", "sq37_to10x14", "r12x20_to16", "r6x4_to9x7"]


@pytest.mark.parametrize("case", POS_CASES)
def test_resample_abs_pos_embed_matches_timm(case):
    """Golden from timm's resample_abs_pos_embed (REPA's load-time DINOv2 step): antialiased bicubic."""
    g = np.load(os.path.join(DATA, "pos_embed_golden.npz"))
    old = tuple(int(v) for v in g[f"{case}_old_hw"])
    got = sm.resample_abs_pos_embed(torch.from_numpy(g[f"{case}_input"]), tuple(g[f"{case}_new_hw"]),
                                    num_prefix_tokens=int(g[f"{case}_prefix"]), old_hw=None if old == (0, 0) else old)
    np.testing.assert_allclose(got.numpy(), g[f"{case}_output"], atol=1e-6, rtol=0)


def test_resample_abs_pos_embed_identity_and_errors():
    pe = torch.randn(1, 1 + 16 * 16, 4)
    assert sm.resample_abs_pos_embed(pe, (16, 16)) is pe                    # same grid: untouched
    out = sm.resample_abs_pos_embed(pe.double(), (8, 8))
    assert out.dtype == torch.float64 and torch.equal(out[:, :1], pe[:, :1].double())   # prefix kept
    with pytest.raises(ValueError, match="square grid; pass old_hw"):
        sm.resample_abs_pos_embed(torch.randn(1, 1 + 12, 4), (4, 4))
    with pytest.raises(ValueError, match="grid 5x5"):
        sm.resample_abs_pos_embed(pe, (4, 4), old_hw=(5, 5))


def test_load_dinov2_resamples_pos_embed_once(monkeypatch):
    """load_dinov2 resamples the 37x37 grid once to the token grid of the preprocessed images, so
    DINOv2's per-call interpolate_pos_encoding (which returns pos_embed when the counts match) is a no-op."""
    class FakeDINOv2(torch.nn.Module):
        patch_size = 14

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.pos_embed = torch.nn.Parameter(torch.randn(1, 1 + 37 * 37, 8, generator=g))   # DINOv2: 518 px / 14

    original = FakeDINOv2().pos_embed.detach().clone()
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: FakeDINOv2())
    for resolution, n in ((256, 16), (512, 32), (None, 16)):
        enc = sm.load_dinov2() if resolution is None else sm.load_dinov2(resolution=resolution)
        assert enc.pos_embed.shape == (1, 1 + n * n, 8) and not enc.pos_embed.requires_grad
        torch.testing.assert_close(enc.pos_embed.data, sm.resample_abs_pos_embed(original, (n, n)), rtol=0, atol=0)
        size = sm.preprocess_repa_images(torch.zeros(1, 3, resolution or 256, resolution or 256, dtype=torch.uint8),
                                         resolution or 256).shape[-1]
        assert (size // FakeDINOv2.patch_size) ** 2 == enc.pos_embed.shape[1] - 1   # tokens the encoder will see


#################################################################################
#      The scripts' building blocks: checkpoints, image folders, REPA encoder   #
#################################################################################
# From here on, tests run or import train.py, sample.py or evaluate.py (keyword "scripts"); the tests above
# are the specification of sm.py alone.

def test_vae_padding_config_and_old_configs():
    assert sm.build_vae("f8d4").config["downsample_padding"] == "asymmetric"          # SD-VAE (diffusers)
    for p in ("f16d16", "f16d32", "f32d64", "f64d256", "tiny"):
        assert sm.VAE_CONFIGS[p]["downsample_padding"] == "symmetric"                # the authors' layout
    vae = sm.build_vae("tiny")
    old = {k: v for k, v in vae.config.items() if k not in ("downsample_padding", "quant_conv", "post_quant_conv")}
    ckpt = dict(kind="vae", preset="tiny", vae_config=old, model=vae.state_dict())   # saved before the field
    rebuilt = train.build_vae_from_checkpoint(ckpt)
    assert rebuilt.config["downsample_padding"] == "asymmetric"
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():                                      # same weights, other padding: other latents
        assert (rebuilt.encode(x)[0] - vae.encode(x)[0]).abs().max() > 1e-3
        assert torch.equal(rebuilt.decode(vae.encode(x)[0]), vae.eval().decode(vae.encode(x)[0]))
    assert train.build_vae_from_checkpoint(dict(ckpt, vae_config=vae.config)).config == vae.config
    assert sm.load_sd_vae(sm.build_vae("tiny").state_dict(), "tiny").config["downsample_padding"] == "asymmetric"
    with pytest.raises(ValueError, match="downsample_padding must be one of"):
        sm.build_vae("tiny", downsample_padding="same")
    bare = sm.build_vae("tiny", quant_conv=False, post_quant_conv=False)
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in bare.state_dict())


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


def test_hidden_files_and_folders_are_skipped(tmp_path):
    """Class folders, recursive folders (evaluate's input) and the folder's sha256 all read the same visible
    images: hidden files and hidden folders (e.g. .ipynb_checkpoints) are left out."""
    from PIL import Image
    for rel in ("a/x.png", "a/.ipynb_checkpoints/x.png", "a/.y.png", "a/sub/z.png", "b/w.png"):
        (tmp_path / "r" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "r" / rel)
    root = tmp_path / "r"
    classes = train.ImageFiles(str(root), 8, classes=True)
    assert [os.path.relpath(f, root) for f in classes.files] == ["a/x.png", "a/sub/z.png", "b/w.png"]   # folder by folder
    assert classes.labels == [0, 0, 1]
    flat = train.ImageFiles(str(root / "a"), 8, classes=False, recursive=True)
    assert [os.path.relpath(f, root / "a") for f in flat.files] == ["x.png", "sub/z.png"]
    listing = "".join(f"{evaluate.sha256_file(root / 'a' / r)}  {r}\n" for r in ("sub/z.png", "x.png"))
    assert evaluate.sha256_input(root / "a") == hashlib.sha256(listing.encode()).hexdigest()


def test_checkpoint_atomic_and_typed(tmp_path):
    p = tmp_path / "c.pt"
    train.save_checkpoint({"kind": "vae", "x": 1}, p)
    assert train.load_checkpoint(p, "vae")["x"] == 1
    with pytest.raises(ValueError, match="is a 'vae' checkpoint, but a 'dit' checkpoint is needed"):
        train.load_checkpoint(p, "dit")

    def boom(tmp):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint({"kind": "vae", "x": 2}, p, before_replace=boom)
    assert train.load_checkpoint(p, "vae")["x"] == 1                         # old file intact
    assert os.listdir(tmp_path) == ["c.pt"]                               # no temporary left behind
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train.load_checkpoint(tmp_path / "junk.pt")


def test_encode_repa_target_with_tiny_encoder():
    enc = train.TinyEncoder(patch_size=8, embed_dim=16).eval()
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    Z = sm.encode_repa_target(enc, imgs, 32)                               # resized to 28 px -> 3x3 tokens
    assert Z.shape == (2, 9, 16)
    assert sm.resize_token_grid(Z, (4, 4)).shape == (2, 16, 16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sm.encode_repa_target(enc, imgs.float(), 32)


#################################################################################
#           Evaluation: Inception, FID, IS, precision/recall, SWD, CLI          #
#################################################################################

GOLDEN_EVAL = Path(DATA) / "eval_goldens.npz"
FD_CASES = ["full", "rankdef", "dead_one", "dead_same", "fallback", "shift"]


GOLDEN_ADM = Path(DATA) / "adm_inception_golden.npz"
ADM_CASES = ["s256", "s32", "s48x80"]


@functools.lru_cache(maxsize=2)
def _net(resize="adm"):
    """Random-weight FID Inception, built once per test session and protocol."""
    return evaluate.load_inception(evaluate.random_inception_state_dict(0), resize=resize)


def _random_stats(d, seed, n=None):
    rng = np.random.RandomState(seed)
    x = rng.randn(n or 3 * d, d) @ rng.randn(d, d) + rng.randn(d)
    return x.mean(0), np.cov(x, rowvar=False)


def _save_png_folder(folder, images):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")


# ---------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------

def test_frechet_diagonal_closed_form():
    rng = np.random.RandomState(0)
    mu1, mu2 = rng.randn(16), rng.randn(16)
    v1, v2 = rng.rand(16) + 0.1, rng.rand(16) + 0.1
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    got = evaluate.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_zero_for_identical_and_symmetric():
    mu1, s1 = _random_stats(24, 1)
    mu2, s2 = _random_stats(24, 2)
    assert abs(evaluate.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)
    ab = evaluate.frechet_distance(mu1, s1, mu2, s2)
    ba = evaluate.frechet_distance(mu2, s2, mu1, s1)
    assert ab > 0 and ab == pytest.approx(ba, rel=1e-9)


@pytest.mark.parametrize("case", FD_CASES)
def test_frechet_golden_parity_with_pytorch_fid(case):
    g = np.load(GOLDEN_EVAL)
    args = [g[f"fd_{case}_{k}"] for k in ("mu1", "sigma1", "mu2", "sigma2")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = evaluate.frechet_distance(*args)
    assert got == pytest.approx(float(g[f"fd_{case}_value"]), rel=1e-6)
    fell_back = any("singular" in str(w.message) for w in caught)
    assert fell_back == bool(g[f"fd_{case}_fallback"])        # same eps fallback decision


def test_frechet_dimension_mismatch_errors():
    mu1, s1 = _random_stats(8, 0)
    mu2, s2 = _random_stats(6, 1)
    with pytest.raises(ValueError, match="different"):
        evaluate.frechet_distance(mu1, s1, mu2, s2)
    with pytest.raises(ValueError, match="dimension"):
        evaluate.frechet_distance(mu1, s1, mu1, s2)
    with pytest.raises(ValueError, match="NaN"):
        evaluate.frechet_distance(mu1 * np.nan, s1, mu1, s1)


# ---------------------------------------------------------------------------------------
# Inception features
# ---------------------------------------------------------------------------------------

def test_inception_golden_features_match_pytorch_fid():
    g = np.load(GOLDEN_EVAL)
    out = _net("pytorch-fid")(torch.from_numpy(g["images"]).permute(0, 3, 1, 2))     # uint8 NCHW
    for key in ("pool", "logits", "spatial"):
        np.testing.assert_allclose(out[key].numpy(), g[key], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ADM_CASES)
def test_tf1_resize_matches_torch_fidelity(case):
    """ADM's TF1 bilinear resize (src = dst * in / out): torch-fidelity's TF1-exact resize, same floats."""
    g = np.load(GOLDEN_ADM)
    x = torch.from_numpy(g[f"{case}_images"]).permute(0, 3, 1, 2).float()          # 0..255
    r = evaluate.resize_bilinear_tf1(x, (299, 299))
    assert r.shape == (x.shape[0], 3, 299, 299)
    np.testing.assert_allclose(r[:, :, ::23, ::23].numpy(), g[f"{case}_resized_slice"], atol=3e-5, rtol=0)
    np.testing.assert_allclose(r[:, :, 150].numpy(), g[f"{case}_resized_row"], atol=3e-5, rtol=0)
    assert r.double().sum().item() == pytest.approx(float(g[f"{case}_resized_sum"]), rel=1e-9)
    assert (r.double() ** 2).sum().item() == pytest.approx(float(g[f"{case}_resized_sqsum"]), rel=1e-9)


@pytest.mark.parametrize("case", ADM_CASES)
def test_inception_adm_features_match_torch_fidelity(case):
    """resize='adm' (default) = ADM's graph input: golden features of torch-fidelity's TF-compatible
    Inception with the same weights. Tolerance 1e-5 of each feature's scale: float32 sums of 10^3-10^4
    products through ~20 layers, summed in another order."""
    g = np.load(GOLDEN_ADM)
    x8 = torch.from_numpy(g[f"{case}_images"]).permute(0, 3, 1, 2)
    out = _net()(x8)
    for key in ("pool", "logits_unbiased", "logits", "spatial"):
        ref = g[f"{case}_{key}"]
        np.testing.assert_allclose(out[key].numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=key)
    assert (_net("pytorch-fid")(x8)["pool"] - out["pool"]).abs().max() > 1e-2       # the protocols differ
    with pytest.raises(ValueError, match="resize must be one of"):
        evaluate.load_inception(evaluate.random_inception_state_dict(0), resize="tf2")


def test_inception_shapes_dtypes_determinism():
    torch.manual_seed(0)
    x8 = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8)
    a = _net()(x8)
    assert a["pool"].shape == (3, 2048) and a["logits"].shape == (3, 1008)
    assert a["spatial"].shape == (3, 7 * 17 * 17)
    b = _net()(x8.float() / 255.0)                                    # float [0,1] input
    one = _net()(x8[1:2])                                             # batch independence
    for k in a:
        assert torch.isfinite(a[k]).all()
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[k][1:2], one[k], atol=1e-4, rtol=1e-4)
    assert not _net().training


def test_load_inception_offline_error_names_locations(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="--inception") as e:
        evaluate.load_inception(None)
    assert str(tmp_path / "hub" / "checkpoints") in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        evaluate.load_inception(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------
# Statistics, IS, precision/recall
# ---------------------------------------------------------------------------------------

def test_statistics_roundtrip_npz(tmp_path):
    feats = np.random.RandomState(0).randn(50, 8).astype(np.float32)
    with pytest.warns(UserWarning, match="biased"):
        mu, sigma = evaluate.compute_statistics(feats)
    assert mu.dtype == np.float64 and sigma.shape == (8, 8)
    path = tmp_path / "stats.npz"
    evaluate.save_stats(path, {"mu": mu, "sigma": sigma, "num_images": 50})
    back = evaluate.load_stats(path)
    np.testing.assert_array_equal(back["mu"], mu)
    np.testing.assert_array_equal(back["sigma"], sigma)
    assert evaluate.frechet_distance(back["mu"], back["sigma"], mu, sigma) == pytest.approx(0, abs=1e-9)
    adm = tmp_path / "adm_ref.npz"                                   # ADM batch: stats + images
    np.savez(adm, mu=mu, sigma=sigma, arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    src = evaluate.open_input(adm)
    assert len(src["images"]) == 3 and src["images"][2].shape == (3, 8, 8)
    np.testing.assert_array_equal(src["stats"]["mu"], mu)


def test_too_few_images_error():
    with pytest.raises(ValueError, match="at least 2"):
        evaluate.compute_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        evaluate.inception_score(np.zeros((1, 10)))


def test_inception_score_extremes():
    assert evaluate.inception_score(np.zeros((20, 1008)))[0] == pytest.approx(1.0)
    onehot = np.full((20, 1008), -1e4)
    onehot[np.arange(20), np.arange(20)] = 0.0                        # distinct confident classes
    mean, std = evaluate.inception_score(onehot, splits=10)
    assert mean == pytest.approx(2.0, rel=1e-6) and std < 1e-6        # 2 images per split


def test_inception_score_adm_split_size():
    """ADM's splits: consecutive chunks of 5,000 (the last may be shorter), not a fixed number of splits."""
    onehot = np.full((12, 20), -1e4)
    onehot[np.arange(12), np.arange(12)] = 0.0                        # 12 distinct confident classes
    mean, std = evaluate.inception_score(onehot, split_size=5)        # chunks of 5, 5, 2: IS 5, 5, 2
    assert mean == pytest.approx(4.0, rel=1e-9) and std == pytest.approx(math.sqrt(2.0), rel=1e-9)
    y = np.full((7000, 2), -1e4)
    y[:5000, 0] = y[5000:, 1] = 0.0                                   # 5,000 of class 0, then 2,000 of class 1
    assert evaluate.inception_score(y)[0] == pytest.approx(1.0, abs=1e-9)     # each 5,000-chunk is one class
    h = -(1 / 7 * math.log(1 / 7) + 6 / 7 * math.log(6 / 7))          # 10 splits of 700: one mixes 100 + 600
    assert evaluate.inception_score(y, splits=10)[0] == pytest.approx((9 + math.exp(h)) / 10, rel=1e-9)


def test_knn_radii_and_precision_recall():
    from scipy.spatial.distance import cdist
    rng = np.random.RandomState(0)
    real = rng.randn(40, 5).astype(np.float32)
    d = cdist(real, real, "sqeuclidean")
    expected = np.sort(d, axis=1)[:, 3]                              # 3rd neighbour, self excluded
    np.testing.assert_allclose(evaluate.knn_radii(real, 3, batch_size=7), expected, rtol=1e-4, atol=1e-5)
    p, r = evaluate.precision_recall(real, real.copy(), batch_size=9)
    assert p == 1.0 and r == 1.0
    far = real + 100.0
    assert evaluate.precision_recall(real, far, batch_size=16) == (0.0, 0.0)
    fake = rng.randn(30, 5).astype(np.float32) * 0.5
    assert evaluate.precision_recall(real, fake, batch_size=8) == \
        pytest.approx(evaluate.precision_recall(real, fake, batch_size=4096))


# ---------------------------------------------------------------------------------------
# SWD
# ---------------------------------------------------------------------------------------

def test_swd_small_sets():
    rng = np.random.RandomState(0)
    a = rng.randint(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    b = rng.randint(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    smooth = np.repeat(np.repeat(a[:, ::4, ::4], 4, 1), 4, 2)         # blocky images
    same = evaluate.swd(a, a)
    diff = evaluate.swd(a, b)
    far = evaluate.swd(a, smooth)
    assert set(same["levels"]) == {32, 16}
    # patches are drawn at random positions, so equal sets give a small, non-zero SWD
    assert same["mean"] < far["mean"] and diff["mean"] < far["mean"]
    as_float = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # float NCHW [0,1]
    assert evaluate.swd(as_float, smooth)["mean"] == pytest.approx(far["mean"], rel=1e-5)
    with pytest.raises(ValueError, match="sizes"):
        evaluate.swd(a, a[:, :16, :16])


# ---------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------

def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        evaluate.open_input(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    _save_png_folder(corrupt, np.zeros((2, 8, 8, 3), np.uint8))
    (corrupt / "bad.png").write_bytes(b"not a png at all")
    ds = evaluate.open_input(corrupt)["images"]
    with pytest.raises(ValueError, match="bad.png"):
        [ds[i] for i in range(len(ds))]
    np.savez(tmp_path / "nokeys.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="arr_0.*mu"):
        evaluate.open_input(tmp_path / "nokeys.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        evaluate.open_input(tmp_path / "float.npz")
    with pytest.raises(ValueError, match="not found"):
        evaluate.open_input(tmp_path / "nothing.npz")


@pytest.mark.parametrize("resize", evaluate.RESIZE_PROTOCOLS)
def test_mixed_image_sizes_are_resized_like_inception(resize):
    rng = np.random.RandomState(0)
    ims = [torch.from_numpy(rng.randint(0, 256, (3, h, w), dtype=np.uint8)) for h, w in ((32, 32), (40, 24))]
    batch = evaluate.collate_images(ims, resize=resize)
    assert batch.shape == (2, 3, 299, 299)
    feats = _net(resize)(batch)["pool"]
    each = torch.cat([_net(resize)(im[None])["pool"] for im in ims])
    torch.testing.assert_close(feats, each, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def test_cli_folder_vs_npz_and_cached_stats(tmp_path, capsys):
    torch.save(evaluate.random_inception_state_dict(0), tmp_path / "inc.pth")
    rng = np.random.RandomState(0)
    _save_png_folder(tmp_path / "samples", rng.randint(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.randint(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evaluate.main([str(tmp_path / "samples"), str(tmp_path / "ref.npz"), "--swd",
                             "--save-stats", str(tmp_path / "ref_stats.npz"), "--allow-small",
                             "--inception", str(tmp_path / "inc.pth"), "--batch-size", "5",
                             "--json", str(tmp_path / "r.json")])
    for key in ("fid-5", "sfid-5", "inception_score", "precision-5", "recall-5", "swd_mean"):
        assert np.isfinite(res[key]), key
    assert json.loads((tmp_path / "r.json").read_text())["fid-5"] == pytest.approx(res["fid-5"])
    assert "fid-5" in capsys.readouterr().out
    cached = evaluate.open_input(tmp_path / "ref_stats.npz")       # --save-stats output
    assert "images" not in cached and cached["stats"]["pool"].shape == (5, 2048)
    assert cached["stats"]["mu_s"].shape == (2023,)


def test_cli_bad_input_names_the_problem(tmp_path):
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(train.USER_ERRORS, match="at least 2 images"):
        evaluate.main([str(tmp_path / "one.npz"), str(tmp_path / "one.npz")])


def _biased_inception(tmp_path, images=None):
    """Random Inception weights, saved to a .pth. With images: fc rows 0..N-1 make image i confidently
    class i (W_c = 50 d_c' / |d_c'|^2, d_c' = pool_c - mean pool without its mean direction, so
    pool_i @ W_i = 50), and the fc bias +1000 on class 0 would make every image class 0."""
    state = evaluate.random_inception_state_dict(0)
    if images is not None:
        pool = _net()(torch.from_numpy(images).permute(0, 3, 1, 2))["pool"].double()   # fc does not change pool
        u = pool.mean(0) / pool.mean(0).norm()
        d = pool - pool.mean(0)
        d = d - (d @ u)[:, None] * u                                       # (N, 2048), orthogonal to the mean
        w = torch.zeros(1008, 2048, dtype=torch.float64)
        w[:len(d)] = 50 * d / (d * d).sum(1, keepdim=True)
        state["fc.weight"], state["fc.bias"] = w.float(), torch.zeros(1008)
        state["fc.bias"][0] = 1000.0
    torch.save(state, tmp_path / "inc.pth")
    return state, str(tmp_path / "inc.pth")


def test_metric_key_labels():
    assert evaluate.metric_key("fid", 50000, 10000) == "fid"
    assert evaluate.metric_key("fid", 2048, None) == "fid"
    assert evaluate.metric_key("fid", 512, 10000) == "fid-512"
    assert evaluate.metric_key("sfid", 512, 512) == "sfid-512"
    assert evaluate.metric_key("fid", 50000, 1000) == "fid-50000-ref1000"
    assert evaluate.metric_key("fid", 512, 1000) == "fid-512-ref1000"


def test_cli_small_sample_refusal_labels_and_unbiased_is(tmp_path, capsys, monkeypatch):
    """FID / sFID / P-R refused below 2,048 images unless --allow-small, then labelled with the size; the
    Inception Score is ADM's: softmax(pool_3 @ W) without the fc bias."""
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *a, **k: 1.0)   # 2048-d eigh: slow, tested above
    rng = np.random.RandomState(1)
    x = rng.randint(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    state, inc = _biased_inception(tmp_path, x)
    np.savez(tmp_path / "s.npz", arr_0=x)
    np.savez(tmp_path / "r.npz", arr_0=rng.randint(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    base = [str(tmp_path / "s.npz"), str(tmp_path / "r.npz"), "--inception", inc, "--json", str(tmp_path / "o.json")]
    with pytest.raises(train.USER_ERRORS, match=r"6 samples and 6 reference images.*--allow-small.*fid-6"):
        evaluate.main(base)
    assert not (tmp_path / "o.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evaluate.main(base + ["--allow-small"])
    assert {"fid-6", "sfid-6", "precision-6", "recall-6"} <= set(res) and "fid" not in res
    assert set(json.loads((tmp_path / "o.json").read_text())) >= {"fid-6", "sfid-6", "protocol"}
    assert "fid-6" in capsys.readouterr().out
    pool = _net()(torch.from_numpy(x).permute(0, 3, 1, 2))["pool"].double()
    unbiased = (pool @ state["fc.weight"].double().T).numpy()                # float64 reference, no bias
    assert res["inception_score"] == pytest.approx(evaluate.inception_score(unbiased)[0], rel=1e-4)
    assert res["inception_score"] > 3                                      # with the bias it would be ~1
    assert evaluate.inception_score(unbiased + state["fc.bias"].double().numpy())[0] == pytest.approx(1.0)


def test_cli_protocol_record_side_file_and_default_output(tmp_path, monkeypatch, capsys):
    """The JSON (written next to SAMPLES by default, not in the cwd) carries the protocol: features, sizes,
    sha256 of every input, code version and sample.py's side file; stdout shows it above the table."""
    import re
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *a, **k: 1.0)   # 2048-d eigh: slow, tested above
    _, inc = _biased_inception(tmp_path)
    rng = np.random.RandomState(2)
    np.savez(tmp_path / "s.npz", arr_0=rng.randint(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.randint(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    side = {"sampler": "ode", "steps": 50, "nfe": 99, "cfg_scale": 1.5, "guidance_interval": [0.0, 0.7],
            "precision": "bf16", "num_samples": 5, "labels": "uniform", "seed": 0, "checkpoint": "dit.pt"}
    (tmp_path / "s.json").write_text(json.dumps(side))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()       # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate.main([str(tmp_path / "s.npz"), str(tmp_path / "ref.npz"), "--inception", inc, "--allow-small",
                       "--no-pr", "--save-stats", str(tmp_path / "ref_stats.npz")])
    assert os.listdir(tmp_path / "cwd") == [] and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    prot = json.loads((tmp_path / "s.metrics.json").read_text())["protocol"]
    assert prot["features"] == "adm" and prot["num_samples"] == 5 and prot["num_reference"] == 5
    assert prot["reference_file"] == str(tmp_path / "ref.npz") and prot["reference_sha256"] == sha(tmp_path / "ref.npz")
    assert prot["samples_sha256"] == sha(tmp_path / "s.npz") and prot["inception_sha256"] == sha(inc)
    assert prot["samples"] == side and prot["is_split_size"] == 5000
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", prot["code_version"])
    out = capsys.readouterr().out
    assert out.index("protocol") < out.index("metric") and f"reference_sha256: {sha(tmp_path / 'ref.npz')}" in out
    # a folder's digest is the sha256 of its sha256sum listing, and changes with any image
    folder = tmp_path / "imgs"
    _save_png_folder(folder, rng.randint(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    listing = "".join(f"{sha(folder / n)}  {n}\n" for n in ("000.png", "001.png"))
    assert evaluate.sha256_input(folder) == hashlib.sha256(listing.encode()).hexdigest()
    # cached statistics remember their protocol; mixing protocols is refused
    with pytest.raises(train.USER_ERRORS, match="not comparable"):
        evaluate.main([str(tmp_path / "s.npz"), str(tmp_path / "ref_stats.npz"), "--inception", inc,
                       "--allow-small", "--resize", "pytorch-fid"])
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(train.USER_ERRORS, match="side file"):
        evaluate.main([str(tmp_path / "s.npz"), str(tmp_path / "ref.npz"), "--inception", inc, "--allow-small"])


def test_json_and_stats_writes_are_atomic(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        train.write_json({"x": object()}, path)                         # not serialisable: old file kept

    def crash(f):
        f.write("half a file")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        train.atomic_write(path, crash, binary=False)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
    train.write_json({"a": np.float32(1.5)}, path)
    assert json.loads(path.read_text()) == {"a": 1.5}
    evaluate.save_stats(tmp_path / "st", {"mu": np.zeros(3), "sigma": np.eye(3)})   # np.savez adds .npz
    assert np.array_equal(np.load(tmp_path / "st.npz")["sigma"], np.eye(3))
    assert evaluate.default_json_path(tmp_path / "x" / "samples.npz") == str(tmp_path / "x" / "samples.metrics.json")
    assert evaluate.default_json_path(tmp_path) == str(tmp_path.parent / tmp_path.name) + ".metrics.json"


def test_vae_and_spectrum_modes(tmp_path, monkeypatch):
    """--vae and --spectrum on a random tiny VAE checkpoint and dead leaves (Inception, LPIPS offline)."""
    torch.manual_seed(0)
    vae = sm.build_vae("tiny")
    train.save_checkpoint(dict(kind="vae", preset="tiny", vae_config=vae.config, model=vae.state_dict(),
                            args={"esm_delta": 1.0}), tmp_path / "vae.pt")

    def offline(*a, **k):
        raise RuntimeError("no weights offline")
    monkeypatch.setattr(evaluate, "_find_weights", offline)
    monkeypatch.setattr(sm, "load_lpips", offline)
    base = ["--vae", str(tmp_path / "vae.pt"), "--dataset", "deadleaves", "--image-size", "32",
            "--num-images", "8", "--batch-size", "4"]
    res = evaluate.main(base + ["--json", str(tmp_path / "vae.json")])
    assert {"psnr", "ssim", "dsm0_psnr", "dsm4_psnr", "dsm12_psnr"} <= set(res)
    assert res["protocol"]["checkpoint_sha256"] == evaluate.sha256_file(tmp_path / "vae.pt")
    assert res["protocol"]["num_images"] == 8 and res["protocol"]["features"] is None
    assert res["num_images"] == 8 and "rfid" not in res and "lpips" not in res
    assert res["dsm0_psnr"] == pytest.approx(res["psnr"], rel=1e-5)       # k = 0 is the plain reconstruction
    spec = evaluate.main(base + ["--spectrum"])                             # default: next to the checkpoint
    assert len(spec["spectra"]["latent"]) == 16 and spec["kl_target_latent"] >= 0
    assert spec["directional_spectral_energy"] > 0
    assert (tmp_path / "vae.spectrum.png").is_file()
    assert json.loads((tmp_path / "vae.spectrum.json").read_text())["protocol"]["dataset"] == "deadleaves"
    with pytest.raises(train.USER_ERRORS, match="is a 'dit' checkpoint, but a 'vae' checkpoint is needed"):
        train.save_checkpoint({"kind": "dit"}, tmp_path / "dit.pt")
        evaluate.main(["--vae", str(tmp_path / "dit.pt"), "--dataset", "deadleaves"])


def test_psnr_ssim_identity():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(evaluate.ssim(x, x), torch.ones(2), atol=1e-5)
    assert (evaluate.psnr(x, x) > 100).all()
    y = torch.full((1, 3, 8, 8), 0.5)
    assert evaluate.psnr(y, y + 0.1).item() == pytest.approx(20.0, rel=1e-5)   # 10 log10(1 / 0.01)


#################################################################################
#             Whole pipeline: DDP invariance, crashes, resume, bad input        #
#################################################################################

TINY = ["--image-size", "32", "--dataset-size", "64", "--vae", "tiny", "--vae-batch", "8", "--vae-steps", "6",
        "--vae-lr", "2e-4", "--warmup", "2", "--lpips-weight", "0", "--stats-samples", "64", "--log-every", "1",
        "--ckpt-every", "3", "--vis-every", "100", "--num-workers", "0",
        "--model", "DiT-S/2", "--depth", "2", "--dit-batch", "8", "--dit-steps", "6", "--dit-lr", "2e-4",
        "--ema", "0.9", "--repa-encoder", "tiny", "--repa-target", "dog", "--sample-steps", "2"]


def run_script(args, nproc=1, env=None, check=True, script="train.py"):
    """Run a script as a subprocess (torchrun for nproc > 1) with one thread per process."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                              if nproc > 1 else []) + [os.path.join(HERE, script)] + list(args)
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE, **(env or {}))
    p = subprocess.run(cmd, cwd=HERE, env=e, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def params_of(path, key="model"):
    return torch.load(path, map_location="cpu", weights_only=False)[key]


def assert_same_params(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One single-process run of stages vae, latents and dit on tiny settings (the reference)."""
    out = tmp_path_factory.mktemp("ref")
    for stage in ("vae", "latents", "dit"):
        run_script(["--stage", stage, "--out", str(out)] + TINY)
    return out


def test_tiny_pipeline_outputs(tiny_run):
    vae = train.load_checkpoint(tiny_run / "vae.pt", "vae")
    assert vae["finished"] and vae["step"] == 6 and len(vae["history"]) == 6
    assert torch.all(vae["model"]["latent_std"] > 0) and not torch.all(vae["model"]["latent_std"] == 1)
    for f in ("reconstructions.png", "spectrum.png", "samples.png", "latents/meta.json", "latents/moments.npy"):
        assert (tiny_run / f).is_file(), f
    meta = json.loads((tiny_run / "latents" / "meta.json").read_text())
    assert meta["latent_shape"] == [4, 8, 8] and meta["num_images"] == 64 and meta["has_images"]
    mom = np.load(tiny_run / "latents" / "moments.npy")
    assert mom.shape == (64, 1, 2, 4, 8, 8) and (mom[:, :, 1] > 0).all()              # no flips: REPA
    dit = train.load_checkpoint(tiny_run / "dit.pt", "dit")
    assert dit["finished"] and {"mse", "repa", "loss"} <= set(dit["history"][-1])


class FakeDist:
    """The rank / world-size view of train.Dist without a process group (for slicing checks)."""
    device = torch.device("cpu")

    def __init__(self, rank, world):
        self.rank, self.world, self.main = rank, world, rank == 0

    shard = train.Dist.shard


def test_global_batches_are_world_size_invariant():
    """The same step sees the same images, flips, posterior noise, DSM k, t, noise and label drops on 1 or 2
    ranks: the 2-rank slices concatenate to the 1-rank batch, bitwise."""
    args = train.get_args(TINY + ["--vae-batch", "32", "--dsm-group", "8", "--dit-batch", "8"])
    shape = (4, 8, 8)
    for step in range(3):
        one = train.vae_batch(torch.zeros(32, 3, 8, 8), args, step, shape, FakeDist(0, 1))
        two = [train.vae_batch(torch.zeros(16, 3, 8, 8), args, step, shape, FakeDist(r, 2)) for r in range(2)]
        assert torch.equal(one[1], torch.cat([t[1] for t in two]))                       # posterior noise
        assert one[2] == two[0][2] + two[1][2] and one[3] == two[0][3] == two[1][3]      # DSM k, EQ scale
        g = train.dit_batch_randomness(args, step, 8, shape)
        for r in range(2):
            for a, b in zip(g, train.dit_batch_randomness(args, step, 8, shape)):
                assert torch.equal(FakeDist(r, 2).shard(a), FakeDist(r, 2).shard(b))
        x = torch.arange(32.0).view(32, 1, 1, 1).expand(32, 3, 8, 8)                        # images tagged by index
        flipped = [train.vae_batch(x[16 * r:16 * (r + 1)], args, step, shape, FakeDist(r, 2))[0] for r in range(2)]
        assert torch.equal(train.vae_batch(x, args, step, shape, FakeDist(0, 1))[0], torch.cat(flipped))
    for world in (2, 4):                                                                  # data order
        ref = list(iter_steps(train.GlobalBatchSampler(50, 8, FakeDist(0, 1), 3), 8, 20))
        parts = [list(iter_steps(train.GlobalBatchSampler(50, 8, FakeDist(r, world), 3), 8 // world, 20))
                 for r in range(world)]
        assert ref == [sum((p[i] for p in parts), []) for i in range(20)]


def iter_steps(sampler, per_step, steps):
    it = iter(sampler)
    for _ in range(steps):
        yield [next(it) for _ in range(per_step)]


GRAD_SCRIPT = """
import sys, torch, sm, train
torch.set_num_threads(1)
stage, out, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
args = train.get_args(rest)
args.vae_lr = args.dit_lr = 0.0                               # AdamW at lr 0: the gradients stay in .grad
d = train.Dist()
if stage == "vae":
    ds = train.build_dataset("deadleaves", None, 32, True, args.seed, 64)
    torch.manual_seed(0)
    model = sm.build_vae("tiny")
    runner, opt = d.wrap(train.VAEStep(model)), torch.optim.AdamW(model.parameters(), lr=0.0)
    loader = train.make_loader(ds, args.vae_batch, d, args.seed, 0, 0)
    x, eps, ks, eq = train.vae_batch(next(loader)[0], args, 0, (4, 8, 8), d)
    train.vae_generator_step(runner, model, sm.PatchGAN(), None, opt, x, eps, ks, eq, args, 0, d, "")
else:
    data = train.LatentData(args.out + "/latents", True)
    enc = train.load_repa_encoder("tiny", d.device, 0)
    cfg = train.dit_config(args, data.meta, enc.embed_dim)
    torch.manual_seed(0)
    model, ema = sm.build_dit(args.model, **cfg), sm.build_dit(args.model, **cfg)
    runner, opt = d.wrap(model), torch.optim.AdamW(model.parameters(), lr=0.0)
    loader = train.make_loader(data, args.dit_batch, d, args.seed, 0, 0)
    rnd = [d.shard(a) for a in train.dit_batch_randomness(args, 0, args.dit_batch, data.meta["latent_shape"])]
    lat = [torch.tensor(data.meta[k]).view(1, -1, 1, 1) for k in ("latent_mean", "latent_std")]
    train.dit_step(runner, model, ema, enc, opt, next(loader), rnd, lat, args, 0, d, "")
if d.main:
    torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
"""


@pytest.mark.parametrize("stage", ["vae", "dit"])
def test_gradients_equal_over_ranks_and_micro_batches(tiny_run, tmp_path, stage):
    """One step's gradient on the same global batch: 1 process = 2 gloo processes (DDP average) = 1 process
    in micro-batches of 3 (8 = 3 + 3 + 2, weighted accumulation). Float32 sums taken in another order differ
    by about sqrt(n) * 6e-8 relative (~1e-5 for n ~ 1e4 terms); another image, noise draw or weighting would
    change the gradient by O(1), so 1e-3 of each tensor's largest entry separates the two."""
    script = tmp_path / "grads.py"
    script.write_text(GRAD_SCRIPT)
    base = ["--out", str(tiny_run), "--config", "quickstart"] + TINY

    def grads(name, nproc, *extra):
        run_script([stage, str(tmp_path / name)] + base + list(extra), nproc=nproc, script=str(script))
        return torch.load(tmp_path / name)
    ref = grads("one.pt", 1)
    assert sum(bool(g.abs().max() > 0) for g in ref.values()) > 10             # a real, non-zero gradient
    floor = 1e-6 * max(g.abs().max() for g in ref.values())    # gradients that cancel to ~0 (a bias before a
    for other in (grads("two.pt", 2), grads("micro.pt", 1, "--micro-batch", "3")):   # norm) keep their rounding
        assert other.keys() == ref.keys()
        for k in ref:
            assert (other[k] - ref[k]).abs().max() <= 1e-3 * ref[k].abs().max() + floor, k


def adam_drift_bound(lrs, beta1=0.9, beta2=0.999):
    """Largest possible distance between the parameters of two Adam runs whose gradients differ only by float
    noise: where a gradient is ~0, noise decides the sign of m/sqrt(v), so each step may move the runs apart
    by 2 lr_t B_t, with B_t >= |m_hat / sqrt(v_hat)| (Cauchy-Schwarz over the moment sums)."""
    total = 0.0
    for t, lr in enumerate(lrs, start=1):
        ratio = sum((beta1 ** 2 / beta2) ** j for j in range(t))
        b = (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(ratio) * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        total += 2 * lr * b
    return total


def test_adam_drift_bound_is_tight_at_step_one():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.tensor([1.0, -1.0])                          # opposite signs: the largest gap
    opt.step()
    assert (p[0] - p[1]).abs().item() == pytest.approx(adam_drift_bound([0.1]), rel=1e-3)


def vae_lrs(steps=6, lr=2e-4, warmup=2):
    return [train.lr_at(s, lr, warmup) for s in range(steps)]


@pytest.mark.parametrize("stage", ["vae", "dit"])
def test_ddp_matches_single_process(tiny_run, tmp_path, stage):
    """End to end on 2 gloo processes: the first step's loss equals 1 process's (same weights, same batch: float
    rounding only), every step was taken, and the weights end within the Adam drift bound. The bound holds for
    any gradients, so it only catches gross faults; the batches (bitwise) and the gradient (above) carry the
    exact invariance."""
    if stage == "dit":                                                     # reuse the reference latents
        import shutil
        shutil.copytree(tiny_run / "latents", tmp_path / "latents")
    run_script(["--stage", stage, "--out", str(tmp_path)] + TINY, nproc=2)
    one, two = (train.load_checkpoint(p / f"{stage}.pt") for p in (tiny_run, tmp_path))
    assert two["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-5)
    steps = [next(iter(c["opt"]["state"].values()))["step"] for c in (one, two)]
    assert steps[0] == steps[1] == 6                                       # every step taken
    lrs = vae_lrs() if stage == "vae" else [2e-4] * 6
    assert_params_within(tiny_run / f"{stage}.pt", tmp_path / f"{stage}.pt", adam_drift_bound(lrs))
    if stage == "vae":                                                     # statistics of the 2-process weights
        check_latent_statistics(tmp_path / "vae.pt")


def assert_params_within(path_a, path_b, bound):
    a, b = params_of(path_a), params_of(path_b)
    assert a.keys() == b.keys()
    names = [k for k in a if not k.startswith("latent_")]                 # parameters (statistics: below)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in names)
    assert worst <= bound, (worst, bound)


def check_latent_statistics(path):
    """Stored latent statistics equal those one process computes from the stored weights."""
    ckpt = train.load_checkpoint(path, "vae")
    vae = train.build_vae_from_checkpoint(ckpt)
    stored = vae.latent_mean.clone(), vae.latent_std.clone()
    args = argparse.Namespace(**ckpt["args"])
    ds = train.build_dataset(args.dataset, args.data_path, args.image_size, True, args.seed, args.dataset_size)
    train.latent_statistics(vae, ds, args, train.Dist())
    torch.testing.assert_close(vae.latent_mean, stored[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vae.latent_std, stored[1], rtol=1e-5, atol=1e-6)


def test_ddp_latents_match_single_process(tiny_run, tmp_path):
    import shutil
    shutil.copy(tiny_run / "vae.pt", tmp_path / "vae.pt")
    run_script(["--stage", "latents", "--out", str(tmp_path)] + TINY, nproc=2)
    for name in ("moments", "labels", "images"):                           # per-image encodes: float32 rounding
        a, b = np.load(tiny_run / "latents" / f"{name}.npy"), np.load(tmp_path / "latents" / f"{name}.npy")
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5), name


def test_resume_on_other_world_size(tiny_run, tmp_path):
    """3 steps on 2 processes, then --resume on 1 process: within the Adam drift bound of an uninterrupted run."""
    run_script(["--stage", "vae", "--out", str(tmp_path), "--max-steps", "3"] + TINY, nproc=2)
    assert train.load_checkpoint(tmp_path / "vae.pt")["step"] == 3
    run_script(["--stage", "vae", "--out", str(tmp_path), "--resume"] + TINY)
    assert_params_within(tiny_run / "vae.pt", tmp_path / "vae.pt", adam_drift_bound(vae_lrs()))
    check_latent_statistics(tmp_path / "vae.pt")


@pytest.mark.parametrize("crash", ["step:4", "checkpoint:6"])
def test_sigkill_and_resume(tiny_run, tmp_path, crash):
    """SIGKILL between steps or while the checkpoint is written; --resume ends as the uninterrupted run."""
    p = run_script(["--stage", "vae", "--out", str(tmp_path)] + TINY, env={"SM_CRASH_AT": crash}, check=False)
    assert p.returncode == -9
    ckpt = train.load_checkpoint(tmp_path / "vae.pt", "vae")                  # never torn
    assert ckpt["step"] == 3 and not ckpt["finished"]
    run_script(["--stage", "vae", "--out", str(tmp_path), "--resume"] + TINY)
    assert_same_params(params_of(tiny_run / "vae.pt"), params_of(tmp_path / "vae.pt"), 1e-6)
    assert sorted(os.listdir(tmp_path)) == ["reconstructions.png", "spectrum.png", "vae.pt"]   # no temporaries


def test_sigkill_dit_and_resume(tiny_run, tmp_path):
    import shutil
    shutil.copytree(tiny_run / "latents", tmp_path / "latents")
    p = run_script(["--stage", "dit", "--out", str(tmp_path)] + TINY, env={"SM_CRASH_AT": "step:5"}, check=False)
    assert p.returncode == -9 and train.load_checkpoint(tmp_path / "dit.pt")["step"] == 3
    run_script(["--stage", "dit", "--out", str(tmp_path), "--resume"] + TINY)
    for key in ("model", "ema"):
        assert_same_params(params_of(tiny_run / "dit.pt", key), params_of(tmp_path / "dit.pt", key), 1e-6)


def test_latents_resume_after_sigkill(tiny_run, tmp_path):
    import shutil
    shutil.copy(tiny_run / "vae.pt", tmp_path / "vae.pt")
    p = run_script(["--stage", "latents", "--out", str(tmp_path)] + TINY, env={"SM_CRASH_AT": "latents:3"},
                   check=False)
    assert p.returncode == -9 and not (tmp_path / "latents" / "meta.json").exists()
    assert np.load(tmp_path / "latents" / "done.npy").sum() == 24           # 3 batches of 8 written
    run_script(["--stage", "latents", "--out", str(tmp_path), "--resume"] + TINY)
    for name in ("moments", "labels", "images"):
        a, b = np.load(tiny_run / "latents" / f"{name}.npy"), np.load(tmp_path / "latents" / f"{name}.npy")
        assert np.allclose(a, b, atol=1e-6), name
    assert not (tmp_path / "latents" / "partial.json").exists()


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = sm.esm_loss

    def esm_then_nan(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 5 else out
    monkeypatch.setattr(sm, "esm_loss", esm_then_nan)
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step 4: .*esm=nan"):
        train.main(["--stage", "vae", "--out", str(tmp_path)] + TINY)
    ckpt = train.load_checkpoint(tmp_path / "vae.pt", "vae")
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_stage_bad_inputs(tiny_run, tmp_path, monkeypatch):
    def main(*extra):
        train.main(["--out", str(tmp_path)] + TINY + list(extra))
    with pytest.raises(ValueError, match="image size 30x30 is not divisible by the VAE downsampling factor 4"):
        main("--stage", "vae", "--image-size", "30")
    with pytest.raises(ValueError, match="DSM: the image size 36 is not divisible by --dsm-block 8"):
        main("--stage", "vae", "--image-size", "36")
    with pytest.raises(ValueError, match="unknown VAE preset 'f4d99'"):
        main("--stage", "vae", "--vae", "f4d99")
    with pytest.raises(FileNotFoundError, match="no finished latents"):
        main("--stage", "dit")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        main("--stage", "latents")
    with pytest.raises(ValueError, match="is a 'dit' checkpoint, but a 'vae' checkpoint is needed"):
        main("--stage", "latents", "--vae-ckpt", str(tiny_run / "dit.pt"))
    with pytest.raises(FileExistsError, match="pass --resume"):
        train.main(["--stage", "vae", "--out", str(tiny_run)] + TINY)
    with pytest.raises(ValueError, match="other settings: --vae 'tiny' -> 'f8d4'"):
        train.main(["--stage", "vae", "--out", str(tiny_run), "--resume"] + TINY + ["--vae", "f8d4"])
    with pytest.raises(ValueError, match="global batch 7 is not divisible"):
        d = train.Dist()
        d.world = 2
        train.GlobalBatchSampler(10, 7, d, 0)

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(RuntimeError, match="--repa-encoder none"):
        main("--stage", "dit", "--repa-encoder", "dinov2_vitb14")
    with pytest.raises(SystemExit):
        train.main(["--stage", "unknown"])


def test_sample_script_grid_npz_and_world_size(tiny_run, tmp_path):
    """sample.py writes a grid and an ADM npz; 1 and 2 ranks give the same images."""
    ckpt = str(tiny_run / "dit.pt")
    run_script(["--ckpt", ckpt, "--steps", "2", "--out", str(tmp_path / "g")], script="sample.py")
    assert (tmp_path / "g" / "sample_grid.png").is_file()
    args = ["--ckpt", ckpt, "--steps", "3", "--num-samples", "10", "--batch-size", "4"]
    run_script(args + ["--out", str(tmp_path / "one")], script="sample.py")
    run_script(args + ["--out", str(tmp_path / "two")], nproc=2, script="sample.py")
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("one", "two"))
    assert a.shape == (10, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    sde = ["--ckpt", ckpt, "--sampler", "sde", "--steps", "3", "--num-samples", "6"]
    run_script(sde + ["--batch-size", "6", "--out", str(tmp_path / "sde6")], script="sample.py")
    run_script(sde + ["--batch-size", "2", "--out", str(tmp_path / "sde2")], nproc=2, script="sample.py")
    c, e = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("sde6", "sde2"))
    assert np.array_equal(c, e) and not np.array_equal(c, a[:6])           # batch / rank independent SDE
    assert len(list((tmp_path / "one" / "images").glob("*.png"))) == 10              # + config.json
    p = run_script(["--ckpt", str(tiny_run / "vae.pt")], script="sample.py", check=False)
    assert p.returncode != 0 and "is a 'vae' checkpoint, but a 'dit' checkpoint is needed" in p.stderr
    p = run_script(["--ckpt", ckpt, "--classes", "10"], script="sample.py", check=False)
    assert p.returncode != 0 and "class 10 is outside [0, 10)" in p.stderr


@pytest.mark.parametrize("reg", list(train.REG_PRESETS))
def test_every_regulariser_and_the_gan_train(tmp_path, reg):
    """Each --reg preset runs, logs its own loss terms, and the GAN (from step 1) updates the discriminator."""
    extra = ["--eq-prob", "1"] if reg == "eq" else []                     # scale every step
    train.main(["--stage", "vae", "--out", str(tmp_path)] + TINY + ["--reg", reg, "--vae-steps", "5", "--disc-start",
                                                                    "1", "--disc-warmup", "1", "--stats-samples", "8"]
               + extra)                                                # D updates at lr 0 (warm-up), then full lr
    ckpt = train.load_checkpoint(tmp_path / "vae.pt", "vae")
    first, last = ckpt["history"][0], ckpt["history"][-1]
    preset = train.REG_PRESETS[reg]
    assert ("esm" in last) == (preset["esm_weight"] > 0) and ("kl" in last) == (preset["kl_weight"] > 0)
    assert "gan" not in first and "disc" in ckpt["history"][1] and "gan" in last      # G, D, G from disc-start 1
    assert all(math.isfinite(v) for v in last.values())
    assert ckpt["finished"] and ckpt["args"]["reg"] == reg
    init = initial_discriminator()
    assert all(not torch.equal(init[k], ckpt["disc"][k]) for k in init if k.endswith("weight"))


def initial_discriminator():
    """The PatchGAN weights train.py starts from with --seed 0 --vae tiny (same initialisation order)."""
    torch.manual_seed(0)
    sm.build_vae("tiny")
    return sm.PatchGAN().state_dict()


def test_discriminator_untouched_before_disc_start(tiny_run):
    ckpt = train.load_checkpoint(tiny_run / "vae.pt", "vae")
    init = initial_discriminator()
    assert all(torch.equal(init[k], ckpt["disc"][k]) for k in init)


def test_whole_pipeline_stage_all(tiny_run, tmp_path):
    """--stage all on tiny settings: skips the finished stages, samples, writes metrics.json; rerun is a no-op."""
    import shutil
    for name in ("vae.pt", "dit.pt"):
        shutil.copy(tiny_run / name, tmp_path / name)
    shutil.copytree(tiny_run / "latents", tmp_path / "latents")
    args = ["--stage", "all", "--out", str(tmp_path), "--num-fid-samples", "16"] + TINY
    p = run_script(args)
    assert "stage vae: " in p.stdout and "is finished, skipping" in p.stdout
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert {"psnr", "ssim", "spectrum_kl", "dsm_psnr", "dit_val_loss", "swd"} <= set(m)
    assert 0 < m["psnr"] < 60 and 0 <= m["spectrum_kl"] and m["dit_val_loss"] > 0 and m["num_eval_images"] == 16
    assert np.load(tmp_path / "samples" / "samples.npz")["arr_0"].shape == (16, 32, 32, 3)
    assert (tmp_path / "samples" / "samples_grid.png").is_file()
    before = (tmp_path / "samples" / "samples.npz").stat().st_mtime_ns
    run_script(args)
    assert (tmp_path / "samples" / "samples.npz").stat().st_mtime_ns == before


def test_pipeline_metrics_label_small_fid_and_protocol(tiny_run, tmp_path, monkeypatch):
    """The quickstart's metrics (train.py --stage all) use --allow-small semantics: fid-<n> / rfid-<n>."""
    monkeypatch.setattr(evaluate, "_try_inception", lambda *a, **k: _net())
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *a, **k: 1.0)   # 2048-d eigh: slow, tested above
    args = train.get_args(["--stage", "all", "--out", str(tiny_run), "--num-fid-samples", "4"] + TINY)
    np.savez(tmp_path / "samples.npz", arr_0=np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*biased")               # labelled: no small-sample warning
        res = evaluate.pipeline_metrics(args, str(tmp_path / "samples.npz"), torch.device("cpu"))
    assert res["fid-4"] == 1.0 and res["rfid-4"] == 1.0 and "fid" not in res and res["num_eval_images"] == 4
    assert res["protocol"]["features"] == "adm" and res["protocol"]["num_samples"] == 4
    assert res["protocol"]["samples_sha256"] == evaluate.sha256_file(tmp_path / "samples.npz")
    json.dumps(res)                                                        # train.py writes it as JSON


#################################################################################
#        What a real run meets: divergence, bad settings, resume, image files   #
#################################################################################

def test_diverged_weights_never_replace_a_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A finite loss whose update blows the weights up: the checkpoint of step 3 stays, the message says so."""
    real = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, base, warmup: float("inf") if step == 5 else real(step, base,
                                                                                                         warmup))
    with pytest.raises(FloatingPointError, match=r"non-finite before step 6 .*vae.pt \(step 3\) is kept"):
        train.main(["--stage", "vae", "--out", str(tmp_path)] + TINY)
    ckpt = train.load_checkpoint(tmp_path / "vae.pt", "vae")
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    monkeypatch.setattr(train, "lr_at", lambda step, base, warmup: float("inf") if step == 1 else real(step, base,
                                                                                                         warmup))
    with pytest.raises(FloatingPointError, match="no checkpoint of this run was written yet"):
        train.main(["--stage", "vae", "--out", str(tmp_path / "b")] + TINY)
    assert not (tmp_path / "b" / "vae.pt").exists()


def test_non_finite_ema_is_not_saved(tiny_run, tmp_path, monkeypatch):
    import shutil
    shutil.copytree(tiny_run / "latents", tmp_path / "latents")
    real, calls = train.update_ema, {"n": 0}

    def poisoned(ema, model, decay):
        real(ema, model, decay)
        calls["n"] += 1
        if calls["n"] == 5:
            next(ema.parameters()).data.fill_(float("nan"))
    monkeypatch.setattr(train, "update_ema", poisoned)
    with pytest.raises(FloatingPointError, match=r"before step 6 .*dit.pt \(step 3\) is kept"):
        train.main(["--stage", "dit", "--out", str(tmp_path)] + TINY)
    assert train.load_checkpoint(tmp_path / "dit.pt", "dit")["step"] == 3


@pytest.mark.parametrize("flag,value,message", [
    ("--vae-steps", "0", "--vae-steps must be at least 1"), ("--vae-batch", "0", "--vae-batch must be at least 1"),
    ("--ckpt-every", "0", "--ckpt-every must be at least 1"), ("--image-size", "0", "--image-size must be at least 1"),
    ("--dit-lr", "-1", "--dit-lr must be > 0"), ("--ema", "1.5", r"--ema must be in \[0, 1\]"),
    ("--micro-batch", "-2", "--micro-batch must be >= 0"), ("--model", "DiT-Q/3", "unknown model 'DiT-Q/3'"),
    ("--data-path", "/some/images", "--data-path /some/images is given but the dataset is deadleaves"),
    ("--repa-encoder", "clip", "unknown --repa-encoder 'clip'"), ("--cfg-scale", "0.5", "--cfg-scale must be >= 1")])
def test_bad_settings_fail_up_front(tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        train.main(["--out", str(tmp_path / "run")] + TINY + [flag, value])
    assert not (tmp_path / "run").exists()                                 # nothing was started


def test_user_errors_are_one_line(tmp_path):
    p = run_script(["--out", str(tmp_path)] + TINY + ["--vae-steps", "0"], check=False)
    assert p.returncode == 2 and p.stderr.strip() == "train.py: error: --vae-steps must be at least 1, got 0"
    (tmp_path / "file").write_text("x")
    p = run_script(["--stage", "all", "--out", str(tmp_path / "file" / "run")] + TINY, check=False)
    assert p.returncode == 2 and "cannot be written" in p.stderr and "Traceback" not in p.stderr
    p = run_script(["--ckpt", str(tmp_path / "no.pt"), "--num-samples", "2"], check=False, script="sample.py")
    assert p.returncode == 2 and p.stderr.strip().startswith("sample.py: error: ") and "no.pt" in p.stderr \
        and len(p.stderr.strip().splitlines()) == 1
    p = run_script([str(tmp_path / "file"), str(tmp_path / "file")], check=False, script="evaluate.py")
    assert p.returncode == 2 and p.stderr.strip().startswith("evaluate.py: error: ") \
        and len(p.stderr.strip().splitlines()) == 1


def test_resume_refuses_changed_settings_and_extends_finished_runs(tiny_run, tmp_path, capsys):
    import shutil
    shutil.copy(tiny_run / "vae.pt", tmp_path / "vae.pt")
    main = lambda *extra: train.main(["--stage", "vae", "--out", str(tmp_path), "--resume"] + TINY + list(extra))
    with pytest.raises(ValueError, match=r"other settings: --image-size 32 -> 64; --reg 'esm\+dsm' -> 'kl'"):
        main("--reg", "kl", "--image-size", "64")
    with pytest.raises(ValueError, match="at step 6, beyond --vae-steps 4"):
        main("--vae-steps", "4")
    main()                                                                  # finished: nothing to do
    assert "is finished, skipping" in capsys.readouterr().out
    main("--vae-steps", "8")                                                # extend a finished run
    ckpt = train.load_checkpoint(tmp_path / "vae.pt", "vae")
    assert ckpt["step"] == 8 and ckpt["finished"] and ckpt["opt"]["state"][0]["step"] == 8
    train.main(["--stage", "vae", "--out", str(tmp_path / "new"), "--resume"] + TINY + ["--vae-steps", "1"])
    assert "there is no" in capsys.readouterr().out and train.load_checkpoint(tmp_path / "new" / "vae.pt")["finished"]


def test_unfinished_run_finishes_on_resume_at_its_step(tmp_path):
    train.main(["--stage", "vae", "--out", str(tmp_path), "--max-steps", "3"] + TINY)
    assert not train.load_checkpoint(tmp_path / "vae.pt")["finished"]
    with pytest.raises(ValueError, match=r"unfinished stage-1 run \(step 3 of 6\)"):
        train.main(["--stage", "latents", "--out", str(tmp_path)] + TINY)
    train.main(["--stage", "vae", "--out", str(tmp_path), "--resume"] + TINY + ["--vae-steps", "3"])
    ckpt = train.load_checkpoint(tmp_path / "vae.pt")
    assert ckpt["finished"] and ckpt["step"] == 3 and not torch.all(ckpt["model"]["latent_std"] == 1)


def _folder_dataset(root, n=16, size=32, bad=()):
    from PIL import Image
    root.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    for name in bad:
        (root / name).write_bytes(b"\x89PNG broken")
    return root


def test_later_stages_inherit_the_dataset_and_print_it(tmp_path, capsys):
    data = _folder_dataset(tmp_path / "imgs")
    run = ["--out", str(tmp_path / "run")] + TINY + ["--vae-steps", "2", "--dataset-size", "16"]
    train.main(["--stage", "vae", "--dataset", "folder", "--data-path", str(data)] + run)
    assert f"dataset folder at {data}: 16 images, 0 classes, 32 px" in capsys.readouterr().out
    train.main(["--stage", "latents"] + run)                                # no --dataset: the stage-1 data
    meta = json.loads((tmp_path / "run" / "latents" / "meta.json").read_text())
    assert meta["dataset"] == "folder" and meta["num_images"] == 16 and meta["data_path"] == str(data)


def test_bad_images_scan_and_skip(tmp_path, capsys):
    data = _folder_dataset(tmp_path / "imgs", bad=("zz_broken.png",))
    run = ["--stage", "vae", "--dataset", "folder", "--data-path", str(data)] + TINY + ["--vae-steps", "2"]
    with pytest.raises(ValueError, match=r"1 of 17 images cannot be decoded, e\.g\. cannot read image .*zz_broken"):
        train.main(run + ["--out", str(tmp_path / "a"), "--scan-images"])
    assert not (tmp_path / "a" / "vae.pt").exists()
    train.main(run + ["--out", str(tmp_path / "b"), "--scan-images", "--skip-bad-images"])
    assert "left out 1 images" in capsys.readouterr().out
    ds = train.build_dataset("folder", str(data), 32, skip_bad=True)        # without a scan: skipped when met
    x, _ = ds[16]
    assert torch.equal(x, ds[0][0]) and "skipping cannot read image" in capsys.readouterr().err
    with pytest.raises(ValueError, match="zz_broken.png"):
        train.build_dataset("folder", str(data), 32)[16]


def test_folder_layouts_are_checked(tmp_path):
    flat = _folder_dataset(tmp_path / "flat")
    with pytest.raises(ValueError, match="has no class subfolders.*use --dataset folder"):
        train.build_dataset("imagenet", str(flat), 32)
    _folder_dataset(flat / "thumbnails", n=2)
    with pytest.raises(ValueError, match="mixes 16 images with 1 subfolders"):
        train.build_dataset("imagenet", str(flat), 32)
    classes = tmp_path / "classes"
    _folder_dataset(classes / "cat", n=2)
    (classes / "dog").mkdir()
    with pytest.raises(ValueError, match="1 class folders .* hold no images \\(dog\\)"):
        train.build_dataset("imagenet", str(classes), 32)
    with pytest.raises(ValueError, match="no images at its top level but 2 subfolders.*--dataset imagenet"):
        train.build_dataset("folder", str(classes), 32)


def test_every_pillow_mode_arrives_as_8bit_rgb(tmp_path):
    from PIL import Image
    g16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    cases = {
        "L.png": (Image.fromarray(np.full((8, 8), 77, np.uint8)), 77),
        "I16.png": (Image.fromarray(g16), np.rint(g16 / 257.0)),
        "RGBA.png": (Image.fromarray(np.dstack([np.full((8, 8, 3), 200, np.uint8), np.zeros((8, 8, 1), np.uint8)])),
                     200),
        "P.png": (Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).convert("P", palette=Image.ADAPTIVE), 90),
        "1.png": (Image.fromarray(np.full((8, 8), 255, np.uint8)).convert("1"), 255),
        "CMYK.jpg": (Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).convert("CMYK"), 128),
        "F.tif": (Image.fromarray(np.full((8, 8), 0.5, np.float32)), 128),
        "LA.png": (Image.fromarray(np.full((8, 8), 33, np.uint8)).convert("LA"), 33),
    }
    for name, (im, want) in cases.items():
        im.save(tmp_path / name)
        got = np.asarray(train.read_rgb(tmp_path / name))
        assert got.dtype == np.uint8 and got.shape == (8, 8, 3), name
        want = np.broadcast_to(np.asarray(want, dtype=np.float64)[..., None] if np.ndim(want) else want, got.shape)
        tol = 2 if name.endswith(".jpg") else 0                                    # JPEG's colour transform
        assert np.abs(got.astype(int) - want).max() <= tol, name


def test_checkpoints_are_readable_by_the_group(tmp_path):
    old = os.umask(0o022)
    try:
        train.save_checkpoint({"kind": "vae"}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


#################################################################################
#                 Stage 1 as the authors train it (train.py side)               #
#################################################################################

def test_gan_schedule_alternates_after_disc_start(tmp_path):
    """--disc-start 3 --vae-steps 10: the VAE on steps 0-2 and the even steps after, the discriminator on odd
    steps 3, 5, 7, 9: 6 generator and 4 discriminator updates; the discriminator lr warms up per update."""
    train.main(["--stage", "vae", "--out", str(tmp_path)] + TINY + ["--disc-start", "3", "--vae-steps", "10",
                                                                    "--disc-warmup", "8", "--stats-samples", "8"])
    ckpt = train.load_checkpoint(tmp_path / "vae.pt", "vae")
    assert ckpt["opt"]["state"][0]["step"] == 6 and ckpt["opt_d"]["state"][0]["step"] == 4
    assert ckpt["opt_d"]["param_groups"][0]["lr"] == pytest.approx(5e-5 * 3 / 8)   # 4th update: 3 before it
    kinds = [("disc" in h, "l1" in h) for h in ckpt["history"]]
    assert kinds == [(False, True)] * 3 + [(True, False), (False, True)] * 3 + [(True, False)]
    assert [train.disc_updates_before(s, 3) for s in range(3, 11)] == [0, 1, 1, 2, 2, 3, 3, 4]


def test_dsm_k_is_drawn_per_group(tmp_path):
    args = train.get_args(TINY + ["--vae-batch", "32", "--dsm-group", "16"])
    seen = set()
    for step in range(40):
        _, _, ks, _ = train.vae_batch_randomness(args, step, 32, (4, 8, 8))
        assert len(set(ks[:16])) == 1 and len(set(ks[16:])) == 1 and set(ks) <= set(train.DSM_KS)
        seen.add((ks[0], ks[16]))
    assert len(seen) > 8                                                   # two independent draws per batch
    x, eps = torch.randn(4, 3, 32, 32), torch.zeros(4, 4, 8, 8)
    rec, target, *_ = train.VAEStep(sm.build_vae("tiny"))(x, eps, [0, 0, 8, 8], 8, None)   # two runs of k
    torch.testing.assert_close(target[:2], x[:2])
    torch.testing.assert_close(target[2:], sm.dsm_mask(x[2:], eps[2:], 8)[0])


def test_scalar_latent_norm_round_trip(tiny_run):
    ckpt = train.load_checkpoint(tiny_run / "vae.pt", "vae")
    vae = train.build_vae_from_checkpoint(ckpt)
    assert ckpt["latent_norm"] == "scalar" and vae.latent_norm == "scalar"
    assert torch.all(vae.latent_std == vae.latent_std[0]) and torch.all(vae.latent_mean == vae.latent_mean[0])
    meta = json.loads((tiny_run / "latents" / "meta.json").read_text())
    assert meta["latent_norm"] == "scalar" and meta["latent_std"] == vae.latent_std.tolist()
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    v = train.build_vae_from_checkpoint(ckpt).double()
    torch.testing.assert_close(v.denormalize(v.normalize(z)), z, rtol=1e-12, atol=1e-12)
    other = dict(meta, latent_std=[s * 2 for s in meta["latent_std"]])
    with pytest.raises(ValueError, match="decode with the autoencoder they were encoded with"):
        train.check_latent_norm(vae, other, "latents")


#################################################################################
#                                  sample.py                                    #
#################################################################################

def _write_sample_ckpt(folder, ema_edit=None):
    """A tiny perturbed DiT ('dit' checkpoint, step 7) and a tiny VAE ('vae'), as train.py writes them."""
    folder = Path(folder)
    torch.manual_seed(0)
    vae = sm.build_vae("tiny")
    vae.latent_mean.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    vae.latent_std.fill_(1.5)
    train.save_checkpoint(dict(kind="vae", vae_config=vae.config, model=vae.state_dict(), preset="tiny", step=1,
                            finished=True, args={}), folder / "vae.pt")
    cfg = dict(input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=32, num_heads=4, encoder_depth=1,
               z_dims=[], class_dropout_prob=0.1)
    torch.manual_seed(0)
    ema = perturb(sm.build_dit("DiT-S/2", **cfg)).state_dict()
    if ema_edit:
        ema_edit(ema)
    train.save_checkpoint(dict(kind="dit", model_name="DiT-S/2", dit_config=cfg, model=ema, ema=ema, step=7,
                            finished=True, vae=dict(kind="ckpt", path=str(folder / "vae.pt")),
                            latent_mean=vae.latent_mean.tolist(), latent_std=vae.latent_std.tolist(), image_size=32),
                       folder / "dit.pt")
    return folder / "dit.pt"


@pytest.fixture(scope="module")
def sample_ckpt(tmp_path_factory):
    return _write_sample_ckpt(tmp_path_factory.mktemp("sample_ckpt"))


def _generate(ckpt, out, n=4, **kw):
    kw = dict(dict(steps=2, batch_size=2), **kw)
    return np.load(sample.generate(str(ckpt), n, str(out), train.Dist(), **kw))["arr_0"]


def _cli_error(argv):
    """The user error sample.py stops with (train.cli prints it as one line `sample.py: error: ...`)."""
    with pytest.raises(train.USER_ERRORS) as e:
        sample.main([str(a) for a in argv])
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_sample_keys_seed_and_index():
    """Sample i's noise comes from the key (seed, i): no two seeds share noise (the old seed + i scheme
    gave seed 0 sample 1 == seed 1 sample 0), any subset of indices draws the same rows."""
    shape = (4, 8, 8)
    a, b = train.sample_noise(range(40), 0, shape), train.sample_noise(range(40), 1, shape)
    assert torch.equal(a[[5, 17]], train.sample_noise([5, 17], 0, shape))           # batch / order independent
    # independent N(0, I_256) rows are ~sqrt(512) = 22.6 apart; a shared row would be at distance 0
    assert torch.cdist(a.flatten(1), b.flatten(1)).min() > 10
    within = torch.cdist(a.flatten(1), a.flatten(1)) + 100 * torch.eye(40)
    assert within.min() > 10
    m = tiny_dit()                                     # adaLN-Zero: zero velocity, the ODE returns its noise
    z0, z1 = (train.sample_latents(m, [0, 1], [3, 3], shape, s, "cpu", steps=1) for s in (0, 1))
    assert torch.equal(z0, a[:2]) and torch.equal(z1, b[:2]) and not torch.equal(z0[1], z1[0])
    g = [train.sample_generator(0, 3, s) for s in (0, 1, 2)]
    draws = [torch.randn(8, generator=x) for x in g]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    # labels: uniform over the classes (counts of 2000 draws within 5 binomial sds), keyed too
    y = train.sample_labels(range(2000), 0, 10)
    counts = np.bincount(y, minlength=10)
    assert len(counts) == 10 and np.all(np.abs(counts - 200) < 5 * math.sqrt(2000 * 0.1 * 0.9))
    assert y[100:110] == train.sample_labels(range(100, 110), 0, 10) != train.sample_labels(range(100, 110), 1, 10)
    assert train.sample_labels(range(12), 0, 5, "balanced") == [i % 5 for i in range(12)]
    assert train.sample_labels(range(3), 0, 0) is None
    with pytest.raises(ValueError, match="must be >= 0"):
        train.sample_generator(-1, 0)


def test_sample_batch_size_and_seed(sample_ckpt, tmp_path):
    """SDE with CFG and random labels: batch sizes 2 and 3 give identical samples; seed 1 shares none with seed 0."""
    kw = dict(sampler="sde", steps=3, cfg_scale=1.5, guidance_interval=(0.0, 0.7))
    a = _generate(sample_ckpt, tmp_path / "b2", n=7, batch_size=2, **kw)
    b = _generate(sample_ckpt, tmp_path / "b3", n=7, batch_size=3, **kw)
    assert a.shape == (7, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    c = _generate(sample_ckpt, tmp_path / "seed1", n=7, seed=1, **kw)
    assert not any(np.array_equal(x, z) for x in a for z in c)


def test_sample_one_vs_two_gloo_processes(sample_ckpt, tmp_path):
    """1 and 2 gloo processes write the same samples.npz (SDE noise and random labels keyed per sample)."""
    args = ["--ckpt", str(sample_ckpt), "--num-samples", "5", "--batch-size", "2", "--protocol", "repa",
            "--steps", "3"]
    run_script(args + ["--out", str(tmp_path / "one")], script="sample.py")
    run_script(args + ["--out", str(tmp_path / "two")], nproc=2, script="sample.py")
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("one", "two"))
    assert a.shape == (5, 32, 32, 3) and np.array_equal(a, b)
    ja, jb = (json.loads((tmp_path / d / "samples.json").read_text()) for d in ("one", "two"))
    assert ja == jb


def test_sample_protocol_presets_overrides_and_record(sample_ckpt, tmp_path, capsys):
    fields = ("sampler", "steps", "cfg_scale", "guidance_interval", "heun", "protocol")
    pick = lambda p: tuple(p[k] for k in fields)                                       # noqa: E731
    assert pick(sample.resolve_protocol()) == ("ode", 50, 1.0, (0.0, 1.0), False, "ode50")
    assert pick(sample.resolve_protocol("repa")) == ("sde", 250, 1.8, (0.0, 0.7), False, "repa")   # REPA README
    assert pick(sample.resolve_protocol("nocfg")) == ("sde", 250, 1.0, (0.0, 1.0), False, "nocfg")
    assert pick(sample.resolve_protocol("repa", steps=4, guidance_low=0.1)) == \
        ("sde", 4, 1.8, (0.1, 0.7), False, "repa-custom")
    assert sample.resolve_protocol("repa", cfg_scale=1.8, sampler="sde")["protocol"] == "repa"  # same as preset
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    assert "repa: sde, 250 steps, cfg 1.8, interval [0.0, 0.7]" in " ".join(capsys.readouterr().out.split())
    # CLI: preset + override, default --out next to the checkpoint, the protocol printed and recorded
    import shutil
    ckpt = str(shutil.copy(sample_ckpt, tmp_path / "dit.pt"))
    sample.main(["--ckpt", ckpt, "--num-samples", "3", "--protocol", "nocfg", "--steps", "2", "--batch-size", "2"])
    assert "protocol nocfg-custom: Euler-Maruyama SDE, 2 steps, no guidance, 2 NFE/sample; labels random, " \
           "precision fp32, seed 0" in capsys.readouterr().out
    (out,) = tmp_path.glob("samples-nocfg-custom-*-seed0-3")
    rec = json.loads((out / "samples.json").read_text())
    assert {"sampler", "steps", "nfe", "cfg_scale", "guidance_interval", "precision", "num_samples", "labels", "seed",
            "checkpoint", "code_version", "protocol"} <= set(rec)
    assert (rec["sampler"], rec["steps"], rec["nfe"], rec["cfg_scale"], rec["guidance_interval"]) == \
        ("sde", 2, 2, 1.0, [0.0, 1.0])
    assert (rec["precision"], rec["num_samples"], rec["labels"], rec["seed"], rec["protocol"]) == \
        ("fp32", 3, "random", 0, "nocfg-custom")
    assert rec["checkpoint"]["path"] == os.path.abspath(ckpt) and rec["checkpoint"]["step"] == 7
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", rec["code_version"])
    assert np.load(out / "samples.npz")["arr_0"].shape == (3, 32, 32, 3)
    assert os.path.basename(sample.default_out(
        ckpt, dict(protocol="repa", labels="random", precision="fp32", seed=3), 50000)) == "samples-repa-seed3-50000"


@pytest.mark.parametrize("sampler,steps,cfg,interval,heun", [
    ("ode", 5, 1.0, (0.0, 1.0), False), ("ode", 4, 1.5, (0.25, 0.75), False), ("ode", 5, 1.5, (0.0, 0.5), True),
    ("sde", 6, 1.5, (0.3, 0.7), False), ("sde", 1, 2.0, (0.0, 1.0), False), ("sde", 4, 1.0, (0.0, 0.7), False)])
def test_sampler_nfe_counts_model_evaluations(sampler, steps, cfg, interval, heun):
    """samples.json's nfe = the rows the samplers actually push through the model, per sample."""
    m = perturb(tiny_dit())
    rows = []
    m.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    noise, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    if sampler == "ode":
        sm.sample_ode(m, noise, y, steps=steps, cfg_scale=cfg, guidance_interval=interval, heun=heun)
    else:
        sm.sample_sde(m, noise, y, steps=steps, cfg_scale=cfg, guidance_interval=interval)
    assert sum(rows) == 3 * sample.sampler_nfe(sampler, steps, cfg, interval, heun)


def test_sample_pixels_as_repa_and_dataset_round_trip():
    """Samples: REPA's uint8(clamp(255 (x + 1) / 2, 0, 255)) truncates; dataset images (x = img / 127.5 - 1)
    go back exactly through to_uint8, which rounds."""
    k = torch.arange(256, dtype=torch.float64)
    x = ((2 * k + 1) / 255 - 1).float().view(1, 1, 1, 256).expand(1, 3, 1, 256)    # 255 (x+1)/2 = k + 1/2
    out = train.samples_to_uint8(x)
    assert out.shape == (1, 1, 256, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0, 0, :, 0], np.minimum(np.arange(256), 255))          # truncated: k
    ends = train.samples_to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5))
    assert ends[0, 0, :, 0].tolist() == [0, 0, 127, 255, 255]
    img = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    assert np.array_equal(train.to_uint8(img.float() / 127.5 - 1.0), img.permute(0, 2, 3, 1).numpy())


def test_sample_precision_fp32_default_and_bf16(sample_ckpt, tmp_path):
    """The DiT and the decoder run in float32 unless --precision bf16 (autocast); recorded in samples.json."""
    seen = []

    def hook(mod, inp, out):
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            seen.append(out.dtype)
    h = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        _generate(sample_ckpt, tmp_path / "fp32", n=2, steps=1)
        fp32, seen[:] = set(seen), []
        _generate(sample_ckpt, tmp_path / "bf16", n=2, steps=1, precision="bf16")
        bf16 = set(seen)
    finally:
        h.remove()
    assert fp32 == {torch.float32} and bf16 == {torch.bfloat16}
    for name in ("fp32", "bf16"):
        assert json.loads((tmp_path / name / "samples.json").read_text())["precision"] == name


def test_sample_resume_only_with_the_same_configuration(sample_ckpt, tmp_path):
    out, img = tmp_path / "s", tmp_path / "s" / "images"
    first = _generate(sample_ckpt, out, n=4)
    cfg = json.loads((img / "config.json").read_text())
    assert (cfg["steps"], cfg["seed"], cfg["labels"], cfg["checkpoint"]["step"]) == (2, 0, "random", 7)
    assert "num_samples" not in cfg
    stamps = {p.name: p.stat().st_mtime_ns for p in img.glob("*.png")}
    more = _generate(sample_ckpt, out, n=6, batch_size=3)                              # same settings: resume
    assert np.array_equal(more[:4], first) and more.shape[0] == 6
    assert all((img / n).stat().st_mtime_ns == t for n, t in stamps.items())           # kept, not redrawn
    for kw, diff in ((dict(cfg_scale=1.5), "cfg_scale: 1.0 -> 1.5"), (dict(seed=1), "seed: 0 -> 1"),
                     (dict(steps=3), "steps: 2 -> 3"), (dict(labels="balanced", n=10), "labels: random -> balanced"),
                     (dict(precision="bf16"), "precision: fp32 -> bf16"), (dict(sampler="sde"), "sampler: ode -> sde")):
        with pytest.raises(FileExistsError, match=f"holds samples of another configuration .*{re.escape(diff)}.*"
                                                  "use a fresh --out"):
            _generate(sample_ckpt, out, **kw)
    # the same checkpoint path with other weights
    (tmp_path / "c").mkdir()
    ckpt = _write_sample_ckpt(tmp_path / "c")
    _generate(ckpt, tmp_path / "c" / "s", n=2)
    _write_sample_ckpt(tmp_path / "c", ema_edit=lambda sd: sd["final_layer.linear.bias"].add_(1.0))
    with pytest.raises(FileExistsError, match="checkpoint.sha256"):
        _generate(ckpt, tmp_path / "c" / "s", n=2)
    (img / "config.json").unlink()                                                     # PNGs of unknown origin
    with pytest.raises(FileExistsError, match="holds 6 PNGs but no config.json"):
        _generate(sample_ckpt, out)
    assert "use a fresh --out" in _cli_error(["--ckpt", sample_ckpt, "--num-samples", 2, "--out", out])


def test_sample_non_finite_weights_and_samples(sample_ckpt, tmp_path, monkeypatch):
    bad = _write_sample_ckpt(tmp_path, ema_edit=lambda sd: sd["final_layer.linear.weight"].view(-1)[0].fill_(math.nan))
    msg = _cli_error(["--ckpt", bad, "--num-samples", 2, "--out", tmp_path / "x"])
    assert f"{bad}: the EMA weights are not finite" in msg and "final_layer.linear.weight" in msg
    real = train.sample_latents

    def nan_at_3(model, indices, *a, **k):                                            # sample 3 diverges
        z = real(model, indices, *a, **k)
        z[[j for j, i in enumerate(indices) if i == 3]] = math.inf
        return z
    monkeypatch.setattr(train, "sample_latents", nan_at_3)
    out = tmp_path / "s"
    msg = _cli_error(["--ckpt", sample_ckpt, "--num-samples", 4, "--batch-size", 2, "--steps", 1, "--out", out])
    assert "non-finite samples (NaN/Inf latents or pixels) at indices [3]" in msg
    assert (out / "images" / "000001.png").exists() and not (out / "images" / "000002.png").exists()
    assert not (out / "samples.npz").exists()


@pytest.mark.parametrize("extra,msg", [
    (["--steps", 0], "--steps must be >= 1, got 0"),
    (["--num-samples", -1], "--num-samples must be >= 0, got -1"),
    (["--num-samples", 2, "--batch-size", 0], "--batch-size must be >= 1, got 0"),
    (["--cfg-scale", 0.5], "--cfg-scale must be >= 1 (1 = no guidance), got 0.5"),
    (["--guidance-low", 0.8, "--guidance-high", 0.7], "0 <= --guidance-low <= --guidance-high <= 1, got [0.8, 0.7]"),
    (["--guidance-high", 1.5], "got [0.0, 1.5]"),
    (["--protocol", "repa", "--heun"], "--heun applies to the ODE sampler only"),
    (["--seed", -1], "--seed must be >= 0, got -1"),
    (["--num-samples", 15, "--labels", "balanced"], "--labels balanced needs --num-samples divisible by the 10 "
                                                    "classes, got 15"),
    (["--model", "SiT-B/2", "--qk-norm"], "--model, --qk-norm apply only with --repa-ckpt"),
    (["--classes", 10], "class 10 is outside [0, 10)"),
])
def test_sample_bad_arguments_one_line_errors(sample_ckpt, tmp_path, extra, msg):
    assert msg in _cli_error(["--ckpt", sample_ckpt, "--out", tmp_path] + extra)


def test_sample_repa_checkpoint(tmp_path, monkeypatch):
    """A checkpoint of REPA's train.py ({'model', 'ema', 'opt', 'args', 'steps'}, REPA's key names) with
    diffusers SD-VAE weights: the EMA SiT samples, decoded as REPA's generate.py, vae.decode(z / 0.18215)."""
    import argparse
    g, gv = _repa_golden(), torch.load(os.path.join(DATA, "sd_vae_golden.pt"), weights_only=True)
    k = g["kwargs"]
    monkeypatch.setitem(sample.SIT_MODELS, "SiT-T/2", dict(depth=k["depth"], hidden_size=k["hidden_size"],
                        decoder_hidden_size=k["decoder_hidden_size"], num_heads=k["num_heads"],
                        patch_size=k["patch_size"], projector_dim=k["projector_dim"]))
    tiny = dict(channels=(16, 32), layers_per_block=1, latent_channels=4, norm_groups=8)
    monkeypatch.setitem(sm.VAE_CONFIGS, "f8d4", dict(tiny, esm_blur=0.0))           # the golden's tiny SD-VAE
    ckpt = tmp_path / "0001234.pt"
    torch.save(dict(model={n: torch.zeros_like(v) for n, v in g["state_dict"].items()}, ema=g["state_dict"], opt={},
                    args=argparse.Namespace(model="SiT-T/2", encoder_depth=2), steps=1234), ckpt)
    (tmp_path / "vae").mkdir()
    torch.save(gv["state_dict"], tmp_path / "vae" / "diffusion_pytorch_model.bin")
    repa = ["--repa-ckpt", ckpt, "--sd-vae", tmp_path / "vae", "--model", "SiT-T/2", "--resolution", 16,
            "--encoder-depth", 2, "--projector-embed-dims", "16,8"]
    sample.main([str(a) for a in repa + ["--num-samples", 3, "--protocol", "repa", "--steps", 3,
                                         "--out", tmp_path / "s"]])
    got = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    # expected, from the pieces: REPA's SiT, the keyed noise and labels, z / 0.18215, REPA's pixels
    m = sm.load_repa_sit(g["state_dict"], **k)
    vae = sm.load_sd_vae(gv["state_dict"], preset=tiny)
    idx = [0, 1, 2]
    z = train.sample_latents(m, idx, train.sample_labels(idx, 0, 1000), (4, 8, 8), 0, "cpu", steps=3,
                             cfg_scale=1.8, sampler="sde", guidance_interval=(0.0, 0.7))
    with torch.no_grad():
        x = vae.decode(z / 0.18215).numpy()
    want = np.clip(255 * (x + 1) / 2, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert got.shape == want.shape == (3, 16, 16, 3)
    # z * (1 / 0.18215) vs z / 0.18215 differ by float32 rounding, which may move a value across an integer
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01 and want.std() > 10
    rec = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert rec["checkpoint"]["step"] == 1234 and rec["checkpoint"]["format"] == "repa"
    assert rec["nfe"] == 1 + 2 + 2                                   # SDE t = 1, 0.52, 0.04; CFG on t <= 0.7
    assert "does not fit --model SiT-T/2" in _cli_error(repa[:-1] + ["16", "--num-samples", 1, "--out", tmp_path / "e"])
    assert "--repa-ckpt needs --sd-vae" in _cli_error(repa[:2] + ["--num-samples", 1, "--out", tmp_path / "e"])
    assert "REPA checkpoint not found" in _cli_error(["--repa-ckpt", tmp_path / "no.pt", "--sd-vae", tmp_path / "vae"])


def test_keep_every_snapshots_and_grad_checkpoint(tiny_run, tmp_path):
    """--keep-every 3 keeps dit-0000003.pt and dit-0000006.pt beside dit.pt; --grad-checkpoint recomputes the
    blocks but gives the same gradient."""
    import shutil
    shutil.copytree(tiny_run / "latents", tmp_path / "latents")
    train.main(["--stage", "dit", "--out", str(tmp_path), "--keep-every", "3"] + TINY)
    assert sorted(p.name for p in tmp_path.glob("dit*.pt")) == ["dit-0000003.pt", "dit-0000006.pt", "dit.pt"]
    assert train.load_checkpoint(tmp_path / "dit-0000003.pt", "dit")["step"] == 3
    m = perturb(tiny_dit()).train()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    grads = []
    for ckpt in (False, True):
        m.grad_checkpointing = ckpt
        m.zero_grad()
        m(x, t, y, force_drop_ids=torch.zeros(3, dtype=torch.bool))[0].square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_official_vae_as_latents_source(tmp_path):
    """--official-vae: the authors' weights encode the latents, with their scalar scale as the statistics."""
    g = torch.load(os.path.join(DATA, "official_vae_golden.pt"), weights_only=False)
    vae = sm.load_official_vae(g["state_dict"], g["sm_preset"], scale_factor=0.5)
    assert torch.allclose(vae.latent_std, torch.full_like(vae.latent_std, 2.0)) and not vae.latent_mean.any()
    args = train.get_args(TINY + ["--official-vae", str(tmp_path / "missing.safetensors")])
    assert args.official_scale == pytest.approx(0.9515730)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        train.load_stage1_vae(args, FakeDist(0, 1))


@pytest.mark.parametrize("config,steps,batch", [("quickstart", 600, 32), ("imagenet", 1000000, 128),
                                                ("celebahq", 500000, 48)])
def test_help_prints_the_defaults_of_the_chosen_config(capsys, config, steps, batch):
    with pytest.raises(SystemExit):
        train.get_args(["--config", config, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"--vae-steps VAE_STEPS default: {steps}" in out and f"--vae-batch VAE_BATCH global batch size " \
                                                                f"(default: {batch})" in out
    args = train.get_args(["--config", config] + ([] if config == "quickstart" else ["--data-path", "/data"]))
    assert (args.vae_steps, args.vae_batch, args.config) == (steps, batch, config)


#################################################################################
#               Diffusability probe (issue 12): gap, floor, EQ error            #
#################################################################################

def test_probe_downsample2_is_average_pooling():
    """Bilinear x0.5 with align_corners=False samples midway between pixel pairs: 2x2 average pooling."""
    x = torch.randn(2, 3, 16, 12)
    assert torch.allclose(evaluate.downsample2(x), F.avg_pool2d(x, 2), atol=1e-6)
    with pytest.raises(evaluate.EvalError, match="even sizes"):
        evaluate.downsample2(torch.randn(1, 3, 15, 16))


class _PointwiseAE:
    """Autoencoder-like object (factor 1): E(x) = f(A x), D(z) = A^-1 f^-1(z), A a 3x3 channel mix."""

    def __init__(self, f=lambda v: v, f_inv=lambda v: v):
        g = torch.Generator().manual_seed(0)
        self.A = torch.eye(3) + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64).float()
        self.A_inv, self.f, self.f_inv = torch.linalg.inv(self.A.double()).float(), f, f_inv

    def encode(self, x):
        z = self.f(torch.einsum("ij,njhw->nihw", self.A, x))
        return z, torch.zeros_like(z)

    def decode(self, z):
        return torch.einsum("ij,njhw->nihw", self.A_inv, self.f_inv(z))


def test_probe_equivariance_error_zero_for_equivariant_autoencoder():
    """down2 acts on each channel alone and A mixes channels pixel by pixel, so they commute:
    D(down2(E x)) = A^-1 down2(A x) = down2(x) exactly; only float32 rounding is left. A pointwise
    nonlinearity (cube) does not commute with averaging: same perfect reconstruction, nonzero error."""
    x = torch.rand(4, 3, 16, 16) * 1.6 - 0.8                           # inside [-1, 1]: the clamp is inactive
    lin = _PointwiseAE()
    assert torch.allclose(lin.decode(lin.encode(x)[0]), x, atol=1e-5)
    assert evaluate.equivariance_error(lin, x) < 1e-5
    cube = _PointwiseAE(lambda v: v ** 3, lambda v: torch.sign(v) * v.abs() ** (1 / 3))
    assert torch.allclose(cube.decode(cube.encode(x)[0]), x, atol=1e-4)
    assert evaluate.equivariance_error(cube, x) > 0.02


def _deadleaves_latents(n, seed):
    """Toy latents of dead-leaves images: 4x4 average pooling (3, 8, 8), normalised; decode: nearest x4."""
    ds = sm.DeadLeaves(n, 32, seed=seed)
    x = torch.stack([ds[i][0] for i in range(n)])
    return F.avg_pool2d(x, 4) / 0.5


def _toy_decode(z):
    return F.interpolate(z * 0.5, scale_factor=4, mode="nearest").clamp(-1, 1)


def test_probe_generation_gap_floor_and_noise():
    m = 64
    real = _deadleaves_latents(2 * m, seed=1)
    # samples = the real latents of half A: the latent FD is exactly 0 (identical statistics); the SWD is not 0
    # (it draws other random patches of the same images) but it lacks the image-sampling part of the floor
    same = evaluate.generation_gap(real[:m], real, _toy_decode)
    assert same["num_images"] == m and same["floor_swd"] > 0 and same["latent_fd_floor"] > 0
    assert same["latent_fd"] < 1e-9 * same["latent_fd_floor"]
    assert same["gap_ratio"] < 0.7
    # samples = fresh real latents (another draw of the same distribution): at the floor
    other = evaluate.generation_gap(_deadleaves_latents(m, seed=2), real, _toy_decode)
    assert other["floor_swd"] == same["floor_swd"]                       # same halves, same SWD seed
    assert 0.5 < other["gap_ratio"] < 2 and 0.3 < other["latent_fd_ratio"] < 3
    # samples = Gaussian noise of the latents' shape: far above the floor in both spaces
    noise = evaluate.generation_gap(torch.randn(m, *real.shape[1:], generator=torch.Generator().manual_seed(0)),
                                    real, _toy_decode)
    assert noise["gap_ratio"] > 3 and noise["latent_fd_ratio"] > 3
    with pytest.raises(evaluate.EvalError, match="m samples"):
        evaluate.generation_gap(real[:m - 1], real, _toy_decode)


def test_probe_latent_features_projection():
    z = torch.randn(10, 4, 8, 8)                                          # D = 256 > 64: projected
    f = evaluate.latent_features(z)
    assert f.shape == (10, 64) and np.array_equal(f, evaluate.latent_features(z))
    # orthonormal directions keep lengths of vectors inside their span, and never lengthen any vector
    assert (np.linalg.norm(f, axis=1) <= z.flatten(1).double().norm(dim=1).numpy() + 1e-9).all()
    small = torch.randn(10, 2, 4, 4)                                     # D = 32 <= 64: the flat latents
    assert np.allclose(evaluate.latent_features(small), small.flatten(1).double().numpy())


def _probe_args(tiny_run, out, *extra):
    return train.get_args(["--stage", "probe", "--vae-ckpt", str(tiny_run / "vae.pt"), "--out", str(out),
                           "--probe-images", "32", "--probe-eval", "16", "--dit-steps", "5", "--depth", "2",
                           "--width", "64", "--dit-batch", "8", "--sample-steps", "2", "--log-every", "1",
                           "--num-workers", "0", "--vae-batch", "8"] + list(extra))


def test_probe_deterministic_for_a_seed_and_seed_dependent(tiny_run, tmp_path):
    d = train.Dist()
    r = {name: evaluate.run_probe(_probe_args(tiny_run, tmp_path / name, "--seed", seed), d)
         for name, seed in (("a", "0"), ("b", "0"), ("c", "1"))}
    keys = [k for k, _ in evaluate.PROBE_METRICS]
    assert all(math.isfinite(r["a"][k]) for k in keys)
    assert all(r["a"][k] == r["b"][k] for k in keys) and r["a"]["val_curve"] == r["b"]["val_curve"]
    assert r["a"]["gap_swd"] != r["c"]["gap_swd"] and r["a"]["dit_val_loss"] != r["c"]["dit_val_loss"]
    for k in ("psnr", "ssim", "spectrum_kl", "equivariance_error", "floor_swd"):   # images fixed: seed-free
        assert r["a"][k] == r["c"][k], k
    assert [s for s, _ in r["a"]["val_curve"]] == [1, 2, 3, 4, 5] and len(r["a"]["train_curve"]) == 5
    folder = tmp_path / "a" / "probe-seed0"
    saved = json.loads((folder / "probe.json").read_text())
    p = saved["protocol"]
    assert (p["dit_steps"], p["probe_images"], p["eval_images"], p["seed"], p["dataset"]) == (5, 32, 16, 0,
                                                                                              "deadleaves")
    assert p["budget"] == "short" and p["code_version"] and (folder / "probe.png").is_file()
    with pytest.raises(FileExistsError, match="--resume"):
        evaluate.run_probe(_probe_args(tiny_run, tmp_path / "a"), d)
    assert evaluate.run_probe(_probe_args(tiny_run, tmp_path / "a", "--resume"), d)["gap_swd"] == r["a"]["gap_swd"]


def test_probe_through_the_cli_on_one_and_two_processes(tiny_run, tmp_path):
    """`train.py --stage probe` under torchrun: one probe.json from rank 0, the same protocol and, for what does
    not depend on the DiT (fixed images, the autoencoder), the same numbers as one process. The first step's
    loss (the same weights, rows and noise; only the all-reduce order differs) agrees to float32 rounding;
    later DiT numbers go through Adam, so they are checked for their curve steps and finiteness."""
    args = ["--stage", "probe", "--vae-ckpt", str(tiny_run / "vae.pt"), "--probe-images", "32", "--probe-eval",
            "16", "--dit-steps", "5", "--dit-batch", "8", "--depth", "2", "--width", "64", "--sample-steps", "2",
            "--num-workers", "0", "--log-every", "1"]
    r = {}
    for n in (1, 2):
        run_script(args + ["--out", str(tmp_path / str(n))], nproc=n)
        files = sorted(p.name for p in (tmp_path / str(n) / "probe-seed0").iterdir())
        assert "probe.json" in files and "probe.png" in files and not [f for f in files if ".tmp" in f]
        r[n] = json.loads((tmp_path / str(n) / "probe-seed0" / "probe.json").read_text())
    for k in ("psnr", "ssim", "spectrum_kl", "equivariance_error", "floor_swd"):
        assert r[1][k] == r[2][k], k
    assert [s for s, _ in r[2]["val_curve"]] == [1, 2, 3, 4, 5] == [s for s, _ in r[1]["val_curve"]]
    assert all(math.isfinite(r[2][k]) for k, _ in evaluate.PROBE_METRICS)
    (s1, l1), (s2, l2) = r[1]["train_curve"][0], r[2]["train_curve"][0]
    assert s1 == s2 == 1 and l2 == pytest.approx(l1, rel=1e-5)
    p1, p2 = ({k: v for k, v in r[n]["protocol"].items() if k not in ("minutes", "date")} for n in (1, 2))
    assert p1 == p2


def test_probe_bad_input(tmp_path):
    with pytest.raises(ValueError, match="--probe-eval must be even"):
        train.get_args(["--stage", "probe", "--probe-eval", "7"])
    with pytest.raises(FileNotFoundError, match="--vae-ckpt, --sd-vae or --official-vae"):
        evaluate.run_probe(train.get_args(["--stage", "probe", "--out", str(tmp_path)]), train.Dist())


def test_compare_table_mean_and_sample_std():
    runs = {"kl": {0: dict(gap_ratio=1.0, psnr=20.0), 1: dict(gap_ratio=2.0, psnr=22.0),
                   2: dict(gap_ratio=3.0, psnr=24.0)}, "esm": {0: dict(gap_ratio=5.0, psnr=21.0)}}
    table, summary = evaluate.compare_table(runs)
    assert summary["kl"]["gap_ratio"]["mean"] == 2.0 and summary["kl"]["gap_ratio"]["std"] == 1.0   # ddof 1
    assert summary["kl"]["psnr"]["std"] == 2.0 and summary["esm"]["gap_ratio"]["std"] == 0.0
    assert "| kl | 2 ± 1 | 22 ± 2 |" in table and "| esm | 5 ± 0 | 21 ± 0 |" in table


def test_quickstart_lpips_fallback_is_recorded_and_resumes(tmp_path, monkeypatch, capsys):
    """Offline, the quickstart trains without LPIPS, records --lpips-weight 0 and a rerun resumes; any other
    config stops before any work with the way out."""
    def offline(*a, **k):
        raise RuntimeError("no network")
    monkeypatch.setattr(sm, "fetch_weights", offline)
    tiny = [a for i, a in enumerate(TINY) if a != "--lpips-weight" and TINY[i - 1] != "--lpips-weight"]
    run = ["--stage", "vae", "--out", str(tmp_path)] + tiny + ["--vae-steps", "2"]
    train.main(run)
    assert "training with --lpips-weight 0" in capsys.readouterr().out
    assert train.load_checkpoint(tmp_path / "vae.pt")["args"]["lpips_weight"] == 0.0
    train.main(run + ["--resume", "--vae-steps", "3"])                    # the same settings: it extends
    assert train.load_checkpoint(tmp_path / "vae.pt")["step"] == 3
    with pytest.raises(RuntimeError, match="--lpips-weight 0"):
        train.main(["--config", "imagenet", "--stage", "vae", "--data-path", str(tmp_path), "--out",
                    str(tmp_path / "in")])
    assert not (tmp_path / "in" / "vae.pt").exists()


def test_extended_stage_makes_later_outputs_stale(tiny_run, tmp_path):
    """--stage all never mixes an extended vae.pt with latents (or a DiT with samples) made before."""
    import shutil
    shutil.copy(tiny_run / "vae.pt", tmp_path / "vae.pt")
    train.main(["--stage", "latents", "--out", str(tmp_path)] + TINY)
    train.main(["--stage", "vae", "--out", str(tmp_path), "--resume"] + TINY + ["--vae-steps", "7"])
    with pytest.raises(ValueError, match=r"made from .*vae.pt at step 6, which is now at step 7"):
        train.main(["--stage", "all", "--out", str(tmp_path)] + TINY + ["--vae-steps", "7"])


def test_dit_resumed_at_its_step_is_finished(tiny_run, tmp_path):
    import shutil
    shutil.copytree(tiny_run / "latents", tmp_path / "latents")
    train.main(["--stage", "dit", "--out", str(tmp_path), "--max-steps", "3"] + TINY)
    assert not train.load_checkpoint(tmp_path / "dit.pt")["finished"]
    train.main(["--stage", "dit", "--out", str(tmp_path), "--resume"] + TINY + ["--dit-steps", "3"])
    ckpt = train.load_checkpoint(tmp_path / "dit.pt")
    assert ckpt["finished"] and ckpt["step"] == 3


def test_gathered_features_keep_the_sample_order(monkeypatch):
    """Rank r holds samples r, r + world, ...; the gathered features are in sample order again (IS splits)."""
    world, n = 3, 10
    parts = [{"pool": np.arange(n)[r::world, None].astype(np.float32)} for r in range(world)]
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), parts))
    got = evaluate._gather(parts[0], world)["pool"][:, 0]
    assert got.tolist() == list(range(n))


def test_image_file_subsets_are_disjoint(tmp_path):
    data = _folder_dataset(tmp_path / "imgs", n=16)
    a = train.build_dataset("folder", str(data), 32, seed=0, subset=(0, 10))
    b = train.build_dataset("folder", str(data), 32, seed=0, subset=(10, 6))
    assert len(a) == 10 and len(b) == 6 and not set(a.files) & set(b.files)
    assert a.files == train.build_dataset("folder", str(data), 32, seed=0, subset=(0, 10)).files   # seeded
    with pytest.raises(ValueError, match="has 16 images; 17 are needed"):
        train.build_dataset("folder", str(data), 32, subset=(10, 7))


#################################################################################
#   `python -m pytest -q -k "not scripts"`: the specification of sm.py alone    #
#################################################################################
# Tests that run or import the scripts (train.py, sample.py, evaluate.py) carry the keyword "scripts", so
# the fast subset checks the library by itself in seconds; the full suite adds the pipelines.
# This block stays at the end of the file: it tags the tests defined above it.

def _script_users():
    """Names of the module's functions (tests, fixtures, helpers) that reach the scripts, directly or through
    another such function: a fixed point over their sources."""
    import inspect
    funcs = {n: inspect.unwrap(f._get_wrapped_function() if hasattr(f, "_get_wrapped_function") else f)
             for n, f in globals().items() if callable(f)}             # fixtures and lru_cache helpers unwrapped
    src = {n: inspect.getsource(f) for n, f in funcs.items()
           if inspect.isfunction(f) and f.__module__ == __name__ and not n.startswith("_script")}
    users = {n for n, s in src.items() if re.search(r"\b(train|evaluate|sample)\.|run_script", s)}
    while True:
        more = {n for n, s in src.items() if n not in users and any(re.search(rf"\b{u}\b", s) for u in users)}
        if not more:
            return users
        users |= more


for _name in _script_users():
    if _name.startswith("test_"):
        globals()[_name].scripts = True
with open(__file__) as _f:                                  # a test below this block would escape the tag
    assert "\ndef test_" not in _f.read().split("def _script_users():")[-1], "define tests above _script_users"
