"""Tests for evaluate.py (to be merged into test_sm.py). Tiny inputs, random weights.

Golden file testdata/eval_goldens.npz comes from pytorch-fid 0.3.0 (scipy 1.13.1) via
testdata/make_eval_goldens.py (see its docstring for the exact command); weights are
evaluate.random_inception_state_dict(0) on both sides.
"""

import functools
import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate

GOLDEN = Path(__file__).resolve().parent / "testdata" / "eval_goldens.npz"
FD_CASES = ["full", "rankdef", "dead_one", "dead_same", "fallback", "shift"]


@functools.lru_cache(maxsize=1)
def _net():
    """Random-weight FID Inception, built once per test session."""
    return evaluate.load_inception(evaluate.random_inception_state_dict(0))


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
    g = np.load(GOLDEN)
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
    g = np.load(GOLDEN)
    out = _net()(torch.from_numpy(g["images"]).permute(0, 3, 1, 2))     # uint8 NCHW
    for key in ("pool", "logits", "spatial"):
        np.testing.assert_allclose(out[key].numpy(), g[key], atol=1e-4, rtol=1e-4)


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


def test_mixed_image_sizes_are_resized_like_inception():
    rng = np.random.RandomState(0)
    ims = [torch.from_numpy(rng.randint(0, 256, (3, h, w), dtype=np.uint8)) for h, w in ((32, 32), (40, 24))]
    batch = evaluate.collate_images(ims)
    assert batch.shape == (2, 3, 299, 299)
    feats = _net()(batch)["pool"]
    each = torch.cat([_net()(im[None])["pool"] for im in ims])
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
                             "--save-stats", str(tmp_path / "ref_stats.npz"),
                             "--inception", str(tmp_path / "inc.pth"), "--batch-size", "5",
                             "--json", str(tmp_path / "r.json")])
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "swd_mean"):
        assert np.isfinite(res[key]), key
    assert json.loads((tmp_path / "r.json").read_text())["fid"] == pytest.approx(res["fid"])
    assert "fid" in capsys.readouterr().out
    cached = evaluate.open_input(tmp_path / "ref_stats.npz")       # --save-stats output
    assert "images" not in cached and cached["stats"]["pool"].shape == (5, 2048)
    assert cached["stats"]["mu_s"].shape == (2023,)


def test_cli_bad_input_exits_with_message(tmp_path):
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="at least 2 images"):
        evaluate.main([str(tmp_path / "one.npz"), str(tmp_path / "one.npz")])


def test_vae_and_spectrum_modes_with_stub_modules(tmp_path, monkeypatch):
    """--vae / --spectrum plumbing with tiny stand-ins for sm and train (no weights)."""
    class StubVAE(torch.nn.Module):
        factor, esm_delta, esm_blur = 4, 1.0, 1.2

        def encode(self, x):
            z = torch.nn.functional.avg_pool2d(x, 4).repeat(1, 2, 1, 1)[:, :4]
            return z, torch.zeros_like(z)

        def decode(self, z):
            return torch.nn.functional.interpolate(z[:, :3], scale_factor=4)

    def fake_profiles(x, z, delta=1.0, n_bins=16, blur_sigma=1.2):
        s = torch.softmax(torch.randn(x.shape[0], n_bins), -1)
        return s, s.roll(1, -1), s

    try:                                             # the real spectral helpers when sm imports
        import sm as real_sm
        dsm_mask, profiles = real_sm.dsm_mask, real_sm.spectrum_profiles
    except Exception:
        dsm_mask, profiles = (lambda x, z, k: (x * (1 - k / 16), z)), fake_profiles
    stub_sm = types.SimpleNamespace(
        load_checkpoint=lambda p, kind=None, map_location="cpu": {"kind": "vae"},
        build_vae_from_checkpoint=lambda ckpt: StubVAE(),
        dsm_mask=dsm_mask, spectrum_profiles=profiles,
        directional_spectral_energy=lambda Z, grid=None: Z.float().pow(2).mean(),
        load_lpips=lambda path=None: (_ for _ in ()).throw(RuntimeError("offline")))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1, 0

    stub_train = types.SimpleNamespace(build_dataset=lambda *a, **k: Data())
    monkeypatch.setitem(sys.modules, "sm", stub_sm)
    monkeypatch.setitem(sys.modules, "train", stub_train)

    def offline(path=None):
        raise RuntimeError("no weights")
    monkeypatch.setattr(evaluate, "_find_weights", offline)
    base = ["--vae", "x.pt", "--dataset", "deadleaves", "--num-images", "4", "--batch-size", "2"]
    res = evaluate.main(base + ["--json", str(tmp_path / "vae.json")])
    assert {"psnr", "ssim", "dsm0_psnr", "dsm12_psnr"} <= set(res)
    assert res["num_images"] == 4 and "rfid" not in res                 # no Inception offline
    spec = evaluate.main(base + ["--spectrum", "--json", str(tmp_path / "spec.json")])
    assert len(spec["spectra"]["latent"]) == 16 and spec["kl_target_latent"] >= 0
    assert (tmp_path / "spec.png").is_file()


def test_psnr_ssim_identity():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(evaluate.ssim(x, x), torch.ones(2), atol=1e-5)
    assert (evaluate.psnr(x, x) > 100).all()
    assert evaluate.psnr(x, (x + 0.1).clamp(0, 1)).mean() < 30
