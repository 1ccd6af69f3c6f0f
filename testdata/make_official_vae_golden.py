"""Golden data from the authors' own VAE / discriminator code (forever208/SpectrumMatching).

Run by hand only (the tests never run this; their code and its packages are NOT project dependencies):

    python3 -m venv --system-site-packages /tmp/smenv
    /tmp/smenv/bin/pip install safetensors torch-dct matplotlib      # their utils_DCT imports the last two
    # export the two branches' .py files, e.g. from a clone:
    #   for b in SDVAE_and_ESM DSM; do mkdir -p /tmp/sm/$b; git archive $b '*.py' | tar -x -C /tmp/sm/$b; done
    /tmp/smenv/bin/python testdata/make_official_vae_golden.py /tmp/sm/SDVAE_and_ESM /tmp/sm/DSM

Their modules/__init__.py imports the whole LDM (lpips, transformers, ...), so the script imports only
modules/{layers,transformer,vae,discriminator,config}.py and utils_DCT.py, from each branch in turn.

Writes testdata/official_vae_golden.pt and testdata/safetensors_golden.safetensors (see testdata/README.md).
"""
import importlib.util
import os
import sys
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "official_vae_golden.pt")
OUT_ST = os.path.join(HERE, "safetensors_golden.safetensors")

# A reduced LDMConfig (their configs use 32 groups and wider channels): three levels (f4), two ResNets
# per encoder level (three per decoder level), 8 -> 16 and 16 -> 8 channel changes (identity_conv).
VAE_KW = dict(in_channels=3, out_channels=3, latent_channels=4, residual_layers_per_block=2, attention_layers=1,
              attention_residual_connections=True, post_encoder_latent_proj=True, pre_decoder_latent_proj=True,
              vae_channels_per_block=(8, 16, 16), vae_up_down_factor=2, vae_up_down_kernel_size=3,
              quantize=False, groupnorm_groups=4, norm_eps=1e-6, dropout=0.0)
SM_PRESET = dict(channels=(8, 16, 16), layers_per_block=2, latent_channels=4, norm_groups=4)
DISC_KW = dict(input_channels=3, start_dim=4, depth=3, kernel_size=4, leaky_relu_slope=0.2)
DISC_SEED = 7
SCALE = 0.9515730                           # configs/ldm_*.yaml scaling_constants: imagenet
DSM_K, BLK, DELTA = 10, 8, 1.0


def safetensors_golden_tensors():
    """Deterministic tensors of every dtype the reader must support (the tests rebuild them)."""
    a = torch.arange(-6, 6, dtype=torch.float64).reshape(3, 4) / 7
    return {
        "f64": a, "f32": a.float(), "f16": a.half(), "bf16": a.bfloat16(),
        "i64": torch.tensor([-(2 ** 40), -1, 0, 2 ** 40 + 3]), "i32": torch.tensor([[-(2 ** 30), 7], [0, 2 ** 30]],
                                                                               dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 254, 255], dtype=torch.uint8), "bool": torch.tensor([[True, False, True]]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    }


def load_branch(root, tag):
    """Import modules/{layers,transformer,vae,discriminator,config}.py of one branch as package `tag`."""
    for name in ("utils_DCT",):
        sys.modules.pop(name, None)
    sys.path.insert(0, root)
    pkg = types.ModuleType(tag)
    pkg.__path__ = [os.path.join(root, "modules")]
    sys.modules[tag] = pkg
    mods = {}
    for name in ("config", "layers", "transformer", "vae", "discriminator"):
        spec = importlib.util.spec_from_file_location(f"{tag}.{name}", os.path.join(root, "modules", name + ".py"))
        m = importlib.util.module_from_spec(spec)
        sys.modules[f"{tag}.{name}"] = m
        spec.loader.exec_module(m)
        mods[name] = m
    sys.path.remove(root)
    return mods


def perturb(vae):
    """Move every parameter off its init so that no zero / one hides a bug; push one logvar below -30."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=g))
                m.bias.add_(0.05 * torch.randn(m.bias.shape, generator=g))
        C = VAE_KW["latent_channels"]
        vae.post_encoder_conv.bias[C + 1] -= 40.0          # logvar channel 1 -> clamped at -30


def main():
    esm_root, dsm_root = sys.argv[1], sys.argv[2]
    esm = load_branch(esm_root, "sm_esm")
    dsm = load_branch(dsm_root, "sm_dsm")
    torch.manual_seed(0)
    vae = dsm["vae"].VAE(dsm["config"].LDMConfig(**VAE_KW)).eval()
    perturb(vae)
    vae_esm = esm["vae"].VAE(esm["config"].LDMConfig(**VAE_KW)).eval()
    vae_esm.load_state_dict(vae.state_dict())               # same architecture, other forward()

    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    out = {"vae_kwargs": VAE_KW, "sm_preset": SM_PRESET, "x": x,
           "state_dict": {k: v.clone() for k, v in vae.state_dict().items()}}
    with torch.no_grad():
        out["moments"] = vae.forward_enc(x)                 # encoder + post_encoder_conv, before chunk/clamp
        enc = vae.encode(x, return_stats=True, scale_factor=1.0)
        out["mean"], out["logvar"] = enc["mu"], enc["logvar"]
        out["decoded"] = vae.decode(enc["mu"], scale_factor=1.0)
        assert (out["logvar"][:, 1] == -30.0).all() and (out["moments"][:, 5] < -30).all()

        # their scaled encode / decode: posterior = s * (mu + sigma * eps), decode(z) = forward_dec(z / s)
        torch.manual_seed(11)
        scaled = vae.encode(x, scale_factor=SCALE)["posterior"]
        sigma = torch.exp(0.5 * enc["logvar"])             # may be channels-last: draw eps as they do
        torch.manual_seed(11)
        out["eps"] = torch.randn_like(sigma, device=sigma.device, dtype=sigma.dtype).contiguous()
        out["scale_factor"], out["scaled_posterior"] = SCALE, scaled
        out["scaled_decoded"] = vae.decode(scaled, scale_factor=SCALE)

        # ESM-branch forward (stage1_vae_trainer.py): unmasked posterior, KL, ESM with center="mean"
        torch.manual_seed(11)
        fe = vae_esm(x, delta=DELTA)
        assert torch.equal(fe["posterior"], enc["mu"] + sigma * out["eps"])
        out["esm_branch"] = {k: fe[k] for k in ("posterior", "reconstruction", "kl_loss", "sm_rgb", "sm_delta")}
        out["esm_branch"]["delta"] = DELTA

        # DSM-branch forward (vae_trainer.py): block-DCT low-pass of image and latent with k = DSM_K
        torch.manual_seed(11)
        fd = vae(x, DSM_K, BLK, delta=DELTA)
        out["dsm_branch"] = {k: fd[k] for k in ("img", "posterior", "reconstruction", "kl_loss", "sm_rgb", "sm_delta")}
        out["dsm_branch"].update(k=DSM_K, blk_sz=BLK, delta=DELTA)

    # their discriminator, freshly initialised as in stage1_vae_trainer.py: PatchGAN(...).apply(init_weights)
    torch.manual_seed(DISC_SEED)
    disc = dsm["discriminator"].PatchGAN(**DISC_KW).apply(dsm["discriminator"].init_weights)
    xd = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    out["disc"] = {"kwargs": DISC_KW, "seed": DISC_SEED, "x": xd,
                   "state_dict": {k: v.clone() for k, v in disc.state_dict().items()}}
    with torch.no_grad():
        out["disc"]["logits_train"] = disc.train()(xd)       # BatchNorm on batch statistics
        out["disc"]["logits_eval"] = disc.eval()(xd)
    out["versions"] = {"torch": str(torch.__version__), "esm_branch": os.path.basename(os.path.normpath(esm_root)),
                       "dsm_branch": os.path.basename(os.path.normpath(dsm_root))}
    torch.save(out, OUT)
    print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes")

    from safetensors.torch import save_file
    save_file(safetensors_golden_tensors(), OUT_ST, metadata={"format": "pt", "note": "sm golden"})
    print(f"wrote {OUT_ST}: {os.path.getsize(OUT_ST)} bytes")


if __name__ == "__main__":
    main()
