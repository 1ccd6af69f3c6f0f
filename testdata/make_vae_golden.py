"""Generate golden reference data for an SD-VAE-compatible AutoencoderKL.

Run by hand only (tests never run this; diffusers is NOT a project dependency):

    python3 -m venv --system-site-packages /tmp/refenv
    /tmp/refenv/bin/pip install diffusers
    /tmp/refenv/bin/python testdata/make_vae_golden.py      # from the repo root

Writes testdata/sd_vae_golden.pt and testdata/sd_vae_keys.txt.

Contents of sd_vae_golden.pt (torch.load(..., weights_only=True) works):
    config               dict of AutoencoderKL constructor kwargs + scaling_factor
    state_dict           vae.state_dict(), current diffusers key names
                         (attention: group_norm / to_q / to_k / to_v / to_out.0)
    state_dict_old_keys  the same tensors under the OLD diffusers attention names
                         (query / key / value / proj_attn; group_norm unchanged;
                         weights are 2-D Linear weights, identical shapes)
    old_to_new_keys      {old_key: new_key} for the renamed attention keys only
    x                    (2, 3, 16, 16) float32 input in [-1, 1]
    moments              raw encoder+quant_conv output (2, 8, 8, 8), BEFORE chunk/clamp
    mean, logvar         posterior = vae.encode(x).latent_dist; logvar is clamped to [-30, 20]
    decoded              vae.decode(mean).sample, (2, 3, 16, 16)
    diffusers_version, torch_version
"""
import os

import torch
import diffusers
from diffusers import AutoencoderKL

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "sd_vae_golden.pt")
KEYS_TXT = os.path.join(HERE, "sd_vae_keys.txt")

CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    # (32, 64) with 32 groups is ~2.6 MB; (32, 32) would drop conv_shortcut and make every
    # GroupNorm a 1-channel-per-group norm. (16, 32) / 8 groups keeps both code paths
    # exercised (2 and 4 channels per group, 16->32 and 32->16 channel changes) at ~0.7 MB.
    block_out_channels=(16, 32),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
    scaling_factor=0.18215,
)

# Old (pre-"Attention" refactor) diffusers names for the VAE mid-block attention,
# taken from ModelMixin._fix_state_dict_keys_on_load (diffusers/models/modeling_utils.py):
# pure renames, no reshape, so old weights are 2-D nn.Linear weights.
OLD_TO_NEW_SUFFIX = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


def main():
    torch.manual_seed(0)
    vae = AutoencoderKL(**CONFIG).eval()

    # Perturb every parameter so that no (near-)zero/one init hides a bug.
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, mod in vae.named_modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
        gn_params = {id(m.weight) for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)}
        gn_params |= {id(m.bias) for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)}
        for name, p in vae.named_parameters():
            if id(p) in gn_params:
                continue
            p.add_(0.05 * torch.randn(p.shape, generator=g))

    gx = torch.Generator().manual_seed(42)
    x = torch.rand((2, 3, 16, 16), generator=gx) * 2.0 - 1.0

    with torch.no_grad():
        moments = vae._encode(x)  # encoder + quant_conv (pre-clamp)
        posterior = vae.encode(x).latent_dist
        mean = posterior.mean.contiguous()
        logvar = posterior.logvar.contiguous()
        decoded = vae.decode(mean).sample

    sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}

    # Find the deprecated-attention-block paths exactly as diffusers does.
    attn_paths = [n for n, m in vae.named_modules() if getattr(m, "_from_deprecated_attn_block", False)]
    old_to_new = {}
    for path in attn_paths:
        for old, new in OLD_TO_NEW_SUFFIX.items():
            for wb in ("weight", "bias"):
                nk = f"{path}.{new}.{wb}"
                if nk in sd:
                    old_to_new[f"{path}.{old}.{wb}"] = nk
    new_to_old = {v: k for k, v in old_to_new.items()}
    sd_old = {new_to_old.get(k, k): v for k, v in sd.items()}  # shares storage with sd

    # Sanity check: diffusers' own loader fix-up maps the old dict back to the new one.
    fixed = vae._fix_state_dict_keys_on_load(dict(sd_old))
    assert set(fixed) == set(sd), "old->new rename does not round-trip"
    vae2 = AutoencoderKL(**CONFIG).eval()
    vae2.load_state_dict(fixed, strict=True)
    with torch.no_grad():
        assert torch.equal(vae2.decode(mean).sample, decoded)

    out = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in CONFIG.items()},
        "state_dict": sd,
        "state_dict_old_keys": sd_old,
        "old_to_new_keys": old_to_new,
        "x": x,
        "moments": moments,
        "mean": mean,
        "logvar": logvar,
        "decoded": decoded,
        "diffusers_version": str(diffusers.__version__),
        "torch_version": str(torch.__version__),
    }
    torch.save(out, OUT)

    with open(KEYS_TXT, "w") as f:
        f.write(f"# diffusers {diffusers.__version__} AutoencoderKL state_dict, config={CONFIG}\n")
        f.write(f"# {len(sd)} tensors, {sum(v.numel() for v in sd.values())} elements\n")
        for k, v in sd.items():
            f.write(f"{k}\t{tuple(v.shape)}\n")
        f.write("# old diffusers attention names -> new (same shapes, 2-D Linear weights)\n")
        for k, v in old_to_new.items():
            f.write(f"{k}\t->\t{v}\n")

    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes), {KEYS_TXT}")
    print("mean", tuple(mean.shape), "logvar range", logvar.min().item(), logvar.max().item(),
          "decoded std", decoded.std().item())


if __name__ == "__main__":
    main()
