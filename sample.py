"""
Sample from a trained DiT (the EMA weights) and decode with its autoencoder, or sample a checkpoint of
REPA's / iREPA's train.py directly.

    python sample.py --ckpt runs/quickstart/dit.pt                       # a PNG grid, cheap protocol ode50
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --num-samples 50000 --protocol repa
    torchrun --nproc_per_node=8 sample.py --repa-ckpt 4000000.pt --sd-vae sd-vae-ft-ema --model SiT-XL/2 \\
        --encoder-depth 8 --projector-embed-dims 768 --num-samples 50000 --protocol repa

Protocols (--protocol; explicit --sampler/--steps/--cfg-scale/--guidance-low/--guidance-high/--heun override):
  ode50  Euler ODE, 50 steps, no guidance (the default, cheap)
  repa   REPA's README command for SiT-XL/2 (sihyun-yu/REPA@67f7145, README "generate.py ... --mode=sde
         --num-steps=250 --cfg-scale=1.8 --guidance-high=0.7"): Euler-Maruyama SDE, 250 steps, CFG 1.8 on
         t in [0, 0.7]
  nocfg  Euler-Maruyama SDE, 250 steps, no guidance
Labels: --labels random (uniform, as REPA's generate.py) or balanced (sample i has class i % num_classes).
Precision: float32 (TF32 matmuls on CUDA) as REPA's generate.py, or --precision bf16 (autocast).

Sample i draws its noise, its random label and its SDE noise from generators keyed by (seed, i, stream),
so the images depend neither on the batch size nor on the number of processes, and two seeds share no
noise. Batches are fixed blocks of indices dealt round-robin to the ranks.

Writes OUT/images/NNNNNN.png, OUT/images/config.json (the configuration that made them), OUT/samples.npz
(arr_0, ADM format), OUT/samples.json (the protocol, for evaluate.py) and OUT/samples_grid.png. Default
OUT: CKPT_DIR/samples-<protocol>-seed<seed>-<N>. An interrupted run resumes (existing PNGs are kept)
only when config.json matches; another configuration is refused.
"""

import argparse
import contextlib
import hashlib
import json
import os

import numpy as np
import torch

import sm
import train

HERE = os.path.dirname(os.path.abspath(__file__))

# protocol presets: one word for sampler, steps, CFG scale, guidance interval (low, high) and Heun
PROTOCOLS = {
    "ode50": dict(sampler="ode", steps=50, cfg_scale=1.0, guidance_interval=(0.0, 1.0), heun=False),
    "repa": dict(sampler="sde", steps=250, cfg_scale=1.8, guidance_interval=(0.0, 0.7), heun=False),
    "nocfg": dict(sampler="sde", steps=250, cfg_scale=1.0, guidance_interval=(0.0, 1.0), heun=False),
}
DEFAULT_PROTOCOL = "ode50"

# REPA's SiT_models (models/sit.py): (depth, hidden_size, num_heads); decoder_hidden_size = hidden_size
# (REPA's SiT-S leaves it at 768, which its forward cannot run)
_SIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
SIT_MODELS = {f"SiT-{s}/{p}": dict(depth=d, hidden_size=w, decoder_hidden_size=w, num_heads=h, patch_size=p)
              for s, (d, w, h) in _SIT_SIZES.items() for p in (2, 4, 8)}
REPA_DEFAULTS = dict(model="SiT-XL/2", resolution=256, num_classes=1000, encoder_depth=8, projector_embed_dims="768",
                     qk_norm=False, projection_layer_type="mlp", proj_kernel_size=3)
PIXELS = "uint8(clamp(255 * (x + 1) / 2, 0, 255)), as REPA's generate.py"


# ----------------------------------------------------------------------------- protocol

def resolve_protocol(name=DEFAULT_PROTOCOL, sampler=None, steps=None, cfg_scale=None, guidance_low=None,
                     guidance_high=None, heun=None):
    """Fields of preset `name` with the given (non-None) values overriding them; 'protocol' is the name,
    or '<name>-custom' when an override changes a field."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    p = dict(PROTOCOLS[name])
    low, high = p["guidance_interval"]
    given = dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale, heun=heun)
    p.update({k: v for k, v in given.items() if v is not None})
    p["guidance_interval"] = (float(low if guidance_low is None else guidance_low),
                              float(high if guidance_high is None else guidance_high))
    p["steps"], p["cfg_scale"], p["heun"] = int(p["steps"]), float(p["cfg_scale"]), bool(p["heun"])
    p["protocol"] = name if all(p[k] == v for k, v in PROTOCOLS[name].items()) else f"{name}-custom"
    return p


def check_protocol(p):
    """Raise ValueError for settings the samplers cannot run."""
    if p["sampler"] not in ("ode", "sde"):
        raise ValueError(f"--sampler must be 'ode' or 'sde', got {p['sampler']!r}")
    if p["steps"] < 1:
        raise ValueError(f"--steps must be >= 1, got {p['steps']}")
    if not p["cfg_scale"] >= 1.0:
        raise ValueError(f"--cfg-scale must be >= 1 (1 = no guidance), got {p['cfg_scale']}")
    low, high = p["guidance_interval"]
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"the guidance interval needs 0 <= --guidance-low <= --guidance-high <= 1, "
                         f"got [{low}, {high}]")
    if p["heun"] and p["sampler"] != "ode":
        raise ValueError("--heun applies to the ODE sampler only (--sampler ode)")


def sampler_nfe(sampler, steps, cfg_scale=1.0, guidance_interval=(0.0, 1.0), heun=False):
    """Model evaluations per sample of sm.sample_ode / sm.sample_sde: a guided step costs 2 (conditional
    and unconditional), the Heun corrector runs on every step but the last."""
    low, high = guidance_interval
    if sampler == "ode":
        t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1].tolist()
    else:
        t = torch.linspace(1.0, 0.04, steps, dtype=torch.float64).tolist()      # the last one is the mean step
    per_step = [2 if cfg_scale > 1.0 and low <= tc <= high else 1 for tc in t]
    return sum(per_step) + (sum(per_step[:-1]) if sampler == "ode" and heun else 0)


def precision_context(precision, device):
    """float32 (TF32 matmuls on CUDA as set by train.Dist, like REPA's generate.py --tf32) or bf16 autocast."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"--precision must be 'fp32' or 'bf16', got {precision!r}")
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- models

def state_fingerprint(state_dict):
    """sha256 (16 hex digits) of a state dict's names, dtypes, shapes and bytes: the checkpoint's identity."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k} {t.dtype} {tuple(state_dict[k].shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_finite_weights(state_dict, path):
    """Raise ValueError naming the checkpoint when its EMA weights hold NaN or Inf."""
    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: the EMA weights are not finite (NaN/Inf in {len(bad)} tensors, e.g. "
                         f"{', '.join(bad[:3])}); sample an earlier checkpoint")


def _vae_source(ckpt, vae_ckpt=None, sd_vae=None):
    """The autoencoder of a 'dit' checkpoint, or the one given by --sd-vae / --vae-ckpt."""
    if sd_vae:
        return train.sd_vae_source(sd_vae)
    if vae_ckpt:
        return dict(kind="ckpt", path=os.path.abspath(vae_ckpt))
    return ckpt["vae"]


def load_dit(ckpt_path, device, vae_ckpt=None, sd_vae=None):
    """(EMA DiT in eval mode, autoencoder, checkpoint dict) from a 'dit' checkpoint."""
    ckpt = train.load_checkpoint(ckpt_path, "dit")
    check_finite_weights(ckpt["ema"], ckpt_path)
    model = train.ema_dit(ckpt, device)
    vae = train.vae_from_source(_vae_source(ckpt, vae_ckpt, sd_vae), device).eval()
    train.check_latent_norm(vae, ckpt, ckpt_path)              # decode with the statistics it was trained on
    return model, vae, ckpt


def _torch_load_repa(path):
    """A REPA train.py checkpoint ({'model', 'ema', 'opt', 'args': Namespace, 'steps'}) or a bare state dict."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"REPA checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:                                        # other pickled objects in 'args': trust the file
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def load_repa(ckpt_path, device, sd_vae, **repa):
    """(EMA SiT, SD-VAE, info) for a checkpoint of REPA's / iREPA's train.py, built from REPA's generate.py
    flags (REPA_DEFAULTS); its latents are decoded as REPA does, vae.decode(z / 0.18215)."""
    unknown = set(repa) - set(REPA_DEFAULTS)
    if unknown:
        raise TypeError(f"load_repa: unknown arguments {sorted(unknown)}")
    r = {**REPA_DEFAULTS, **{k: v for k, v in repa.items() if v is not None}}
    if not sd_vae:
        raise ValueError("--repa-ckpt needs --sd-vae DIR (REPA decodes with stabilityai/sd-vae-ft-ema)")
    if r["model"] not in SIT_MODELS:
        raise ValueError(f"unknown --model {r['model']!r}; choose from {', '.join(SIT_MODELS)}")
    try:
        z_dims = [int(z) for z in str(r["projector_embed_dims"]).split(",")]
    except ValueError:
        raise ValueError(f"--projector-embed-dims must be comma-separated integers, got "
                         f"{r['projector_embed_dims']!r}") from None
    ckpt = _torch_load_repa(ckpt_path)
    sd = ckpt.get("ema", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{ckpt_path} holds no state dict (expected REPA's {{'ema': ...}} or a state dict)")
    check_finite_weights(sd, ckpt_path)
    vae = sm.load_sd_vae(sd_vae, "f8d4").to(device).eval()
    if r["resolution"] % vae.factor:
        raise ValueError(f"--resolution {r['resolution']} is not divisible by the VAE factor {vae.factor}")
    kw = dict(SIT_MODELS[r["model"]], input_size=r["resolution"] // vae.factor, num_classes=r["num_classes"],
              encoder_depth=r["encoder_depth"], z_dims=z_dims, qk_norm=bool(r["qk_norm"]),
              projection_layer_type=r["projection_layer_type"], proj_kwargs_kernel_size=r["proj_kernel_size"])
    try:
        model = sm.load_repa_sit(sd, **kw)
    except RuntimeError as e:                                # load_state_dict: missing / unexpected / shapes
        raise ValueError(f"{ckpt_path} does not fit --model {r['model']} --resolution {r['resolution']} "
                         f"--encoder-depth {r['encoder_depth']} --projector-embed-dims {r['projector_embed_dims']} "
                         f"--num-classes {r['num_classes']}: {' '.join(str(e).split())[:300]}") from None
    step = ckpt.get("steps") if isinstance(ckpt, dict) else None
    info = dict(latent_mean=vae.latent_mean.tolist(), latent_std=vae.latent_std.tolist(), step=step,
                repa=dict(r, z_dims=z_dims), sha256=state_fingerprint(sd))
    return model.to(device).eval(), vae, info


def _load_source(ckpt_path, device, vae_ckpt=None, sd_vae=None, repa=None):
    """Model, VAE, decode meta (latent_mean / latent_std), checkpoint record and VAE record."""
    if repa is not None:
        model, vae, info = load_repa(ckpt_path, device, sd_vae, **repa)
        ck = dict(path=os.path.abspath(ckpt_path), step=info["step"], format="repa", repa=info["repa"],
                  sha256=info["sha256"])
        return model, vae, info, ck, train.sd_vae_source(sd_vae)
    model, vae, ckpt = load_dit(ckpt_path, device, vae_ckpt, sd_vae)
    ck = dict(path=os.path.abspath(ckpt_path), step=ckpt.get("step"), format="sm",
              sha256=state_fingerprint(ckpt["ema"]))
    return model, vae, ckpt, ck, _vae_source(ckpt, vae_ckpt, sd_vae)


def _latent_shape(model):
    return (model.in_channels,) + tuple(model.input_size)


def _decode(model, vae, meta, idx, labels, seed, proto, precision, device):
    """uint8 images (N, H, W, 3) of sample indices idx; FloatingPointError naming non-finite samples."""
    with precision_context(precision, device):
        z = train.sample_latents(model, idx, labels, _latent_shape(model), seed, device, steps=proto["steps"],
                                 cfg_scale=proto["cfg_scale"], sampler=proto["sampler"],
                                 guidance_interval=proto["guidance_interval"], heun=proto["heun"])
        x = train.decode_latents(vae, z, meta).float()                     # (N, 3, H, W)
    ok = torch.isfinite(z.flatten(1)).all(1) & torch.isfinite(x.flatten(1)).all(1)
    if not ok.all():
        bad = [int(i) for i, good in zip(idx, ok.tolist()) if not good]
        raise FloatingPointError(f"non-finite samples (NaN/Inf latents or pixels) at indices {bad[:20]}"
                                 f"{' ...' if len(bad) > 20 else ''}; nothing written for them")
    return train.samples_to_uint8(x)


# ----------------------------------------------------------------------------- resume bookkeeping

def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_resume(img_dir, config):
    """Raise FileExistsError when img_dir holds PNGs of another configuration (or of an unknown one)."""
    path = os.path.join(img_dir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = _flat(json.load(f))
        new = _flat(json.loads(json.dumps(config)))
        diff = [f"{k}: {old.get(k, '-')} -> {new.get(k, '-')}" for k in sorted(set(old) | set(new))
                if k not in ("checkpoint.path", "protocol") and old.get(k) != new.get(k)]   # fields, not names
        if diff:
            raise FileExistsError(f"{img_dir} holds samples of another configuration ({'; '.join(diff)}); "
                                  "use a fresh --out")
        return
    pngs = [f for f in os.listdir(img_dir) if f.endswith(".png")] if os.path.isdir(img_dir) else []
    if pngs:
        raise FileExistsError(f"{img_dir} holds {len(pngs)} PNGs but no config.json saying how they were made; "
                              "use a fresh --out")


def default_out(ckpt_path, config, num_samples):
    """CKPT_DIR/samples-<protocol>[-balanced][-bf16][-<hash>]-seed<seed>-<N>; the hash (of the settings)
    only for custom protocols or another autoencoder, so that different settings get different folders."""
    name = f"samples-{config['protocol']}"
    name += "-balanced" if config["labels"] == "balanced" else ""
    name += "-bf16" if config["precision"] == "bf16" else ""
    if config["protocol"].endswith("-custom") or config.get("vae_override"):
        keep = {k: v for k, v in config.items() if k != "checkpoint"}
        name += "-" + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), f"{name}-seed{config['seed']}-{num_samples}")


def describe(proto, labels, precision, seed):
    low, high = proto["guidance_interval"]
    cfg = f"CFG {proto['cfg_scale']:g} on t in [{low:g}, {high:g}]" if proto["cfg_scale"] > 1 else "no guidance"
    solver = {"sde": "Euler-Maruyama SDE", "ode": "Heun ODE" if proto["heun"] else "Euler ODE"}[proto["sampler"]]
    return (f"protocol {proto['protocol']}: {solver}, {proto['steps']} steps, {cfg}, "
            f"{sampler_nfe(**{k: proto[k] for k in PROTOCOLS['ode50']})} NFE/sample; labels {labels}, "
            f"precision {precision}, seed {seed}")


# ----------------------------------------------------------------------------- sampling

def generate(ckpt_path, num_samples, out, d, steps=50, cfg_scale=1.0, seed=0, sampler="ode", heun=False,
             guidance_interval=(0.0, 1.0), batch_size=64, vae_ckpt=None, sd_vae=None, labels="random",
             precision="fp32", protocol=None, repa=None):
    """Write out/images/NNNNNN.png for samples 0..num_samples-1, out/samples.npz (arr_0, ADM format) and
    out/samples.json. protocol: the preset name to record (default: the preset these settings equal, or
    'custom'); repa: REPA generate.py flags (REPA_DEFAULTS) when ckpt_path is a REPA / iREPA checkpoint."""
    from PIL import Image
    proto = dict(sampler=sampler, steps=int(steps), cfg_scale=float(cfg_scale), heun=bool(heun),
                 guidance_interval=tuple(float(v) for v in guidance_interval))
    if protocol is None:
        protocol = next((n for n, p in PROTOCOLS.items() if p == proto), "custom")
    proto["protocol"] = protocol
    check_protocol(proto)
    _check_counts(num_samples, batch_size, seed, labels, precision)
    if num_samples < 1:
        raise ValueError(f"generate needs num_samples >= 1, got {num_samples}")
    model, vae, meta, ck, vae_src = _load_source(ckpt_path, d.device, vae_ckpt, sd_vae, repa)
    nc = model.num_classes
    if labels == "balanced" and nc and num_samples % nc:
        raise ValueError(f"--labels balanced needs --num-samples divisible by the {nc} classes, got {num_samples}")
    label_mode = labels if nc else "none"
    config = dict(checkpoint=ck, vae=vae_src, seed=seed, **proto, labels=label_mode, precision=precision,
                  pixels=PIXELS)
    img_dir = os.path.join(out, "images")
    check_resume(img_dir, config)                            # read-only on every rank: the same verdict
    d.barrier()
    if d.main:
        os.makedirs(img_dir, exist_ok=True)
        train.write_json(config, os.path.join(img_dir, "config.json"))
        print(f"sample.py: {describe(proto, label_mode, precision, seed)} -> {out}", flush=True)
    d.barrier()
    n_batches = (num_samples + batch_size - 1) // batch_size
    bar = train.tqdm_bar(d, 0, num_samples, "sampling")
    for b in range(d.rank, n_batches, d.world):
        block = range(b * batch_size, min((b + 1) * batch_size, num_samples))
        idx = [i for i in block if not os.path.exists(os.path.join(img_dir, f"{i:06d}.png"))]   # resume
        if idx:                                                # keyed per sample: any subset draws the same
            y = train.sample_labels(idx, seed, nc, labels)
            images = _decode(model, vae, meta, idx, y, seed, proto, precision, d.device)
            for im, i in zip(images, idx):
                p = os.path.join(img_dir, f"{i:06d}.png")
                train.atomic_write(p, lambda f: Image.fromarray(im).save(f, format="PNG"))
        bar.update(len(block) * d.world)
    bar.close()
    d.barrier()
    npz = os.path.join(out, "samples.npz")
    if d.main:
        arr = np.stack([np.array(Image.open(os.path.join(img_dir, f"{i:06d}.png")).convert("RGB"))
                        for i in range(num_samples)])
        train.atomic_write(npz, lambda f: np.savez(f, arr_0=arr))
        ncol = nc if labels == "balanced" and 1 < nc <= 16 else 8     # balanced: one class per column
        train.save_grid(arr[:8 * ncol], os.path.join(out, "samples_grid.png"), ncol)
        low, high = proto["guidance_interval"]
        record = dict(protocol=protocol, sampler=sampler, steps=proto["steps"], heun=proto["heun"],
                      nfe=sampler_nfe(sampler, proto["steps"], proto["cfg_scale"], (low, high), proto["heun"]),
                      cfg_scale=proto["cfg_scale"], guidance_interval=[low, high], precision=precision,
                      tf32=precision == "fp32" and d.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32,
                      num_samples=num_samples, labels=label_mode, num_classes=nc, seed=seed,
                      checkpoint=dict(path=ck["path"], step=ck["step"], sha256=ck["sha256"], format=ck["format"]),
                      vae=vae_src, pixels=PIXELS, image_shape=list(arr.shape[1:]), code_version=train.code_version())
        train.write_json(record, os.path.join(out, "samples.json"))
        print(f"wrote {num_samples} samples to {img_dir}, {npz} (arr_0 {arr.shape} uint8) and samples.json")
    d.barrier()
    return npz


def grid(ckpt_path, path, d, classes=None, per_class=8, steps=50, cfg_scale=1.0, seed=0, sampler="ode",
         heun=False, guidance_interval=(0.0, 1.0), vae_ckpt=None, sd_vae=None, precision="fp32", repa=None):
    """A PNG grid: one row per class (or rows of unconditional samples), fixed seed."""
    proto = dict(sampler=sampler, steps=int(steps), cfg_scale=float(cfg_scale), heun=bool(heun),
                 guidance_interval=tuple(float(v) for v in guidance_interval), protocol="grid")
    check_protocol(proto)
    model, vae, meta, _, _ = _load_source(ckpt_path, d.device, vae_ckpt, sd_vae, repa)
    nc = model.num_classes
    classes = list(range(min(8, nc))) if classes is None and nc else (classes or [None] * 8)
    for c in classes:
        if c is not None and not 0 <= c < nc:
            raise ValueError(f"class {c} is outside [0, {nc}) of this model")
    idx = list(range(len(classes) * per_class))
    labels = None if nc == 0 else [classes[i // per_class] for i in idx]
    images = _decode(model, vae, meta, idx, labels, seed, proto, precision, d.device)
    train.save_grid(images, path, per_class)
    print(f"wrote {path}")
    return path


def _check_counts(num_samples, batch_size, seed, labels, precision):
    if num_samples < 0:
        raise ValueError(f"--num-samples must be >= 0, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if labels not in ("random", "balanced"):
        raise ValueError(f"--labels must be 'random' or 'balanced', got {labels!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be 'fp32' or 'bf16', got {precision!r}")


def build_parser():
    """sample.py's flags; the sampler settings default to the chosen --protocol's."""
    table = "; ".join(f"{n}: {p['sampler']}, {p['steps']} steps, cfg {p['cfg_scale']}, interval "
                      f"{list(p['guidance_interval'])}" for n, p in PROTOCOLS.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a 'dit' checkpoint written by train.py")
    src.add_argument("--repa-ckpt", help="a checkpoint of REPA's / iREPA's train.py (its 'ema'); needs --sd-vae")
    p.add_argument("--num-samples", type=int, default=0, help="0: write a PNG grid only")
    p.add_argument("--out", default=None, help="output folder (default: CKPT_DIR/samples-<protocol>-seed<seed>-<N>; "
                                               "for a grid, the checkpoint's folder)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default=DEFAULT_PROTOCOL, help=table)
    p.add_argument("--sampler", choices=["ode", "sde"], default=None, help="(default: the protocol's)")
    p.add_argument("--steps", type=int, default=None, help="(default: the protocol's)")
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=None,
                   help="Heun instead of Euler for the ODE (default: the protocol's)")
    p.add_argument("--cfg-scale", type=float, default=None, help="(default: the protocol's; 1 = no guidance)")
    p.add_argument("--guidance-low", type=float, default=None, help="(default: the protocol's)")
    p.add_argument("--guidance-high", type=float, default=None, help="(default: the protocol's)")
    p.add_argument("--labels", choices=["random", "balanced"], default="random",
                   help="random: uniform as REPA's generate.py; balanced: sample i has class i %% num_classes")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 (TF32 matmuls on CUDA) as REPA's generate.py, or bf16 autocast")
    p.add_argument("--classes", type=int, nargs="*", help="classes of the grid rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (the same on every rank)")
    p.add_argument("--vae-ckpt", help="override the autoencoder recorded in the checkpoint")
    p.add_argument("--sd-vae", help="decode with diffusers AutoencoderKL weights (a folder or file) instead")
    r = p.add_argument_group("REPA checkpoints (--repa-ckpt; flags and defaults of REPA's generate.py)")
    r.add_argument("--model", choices=list(SIT_MODELS), default=None, help=f"(default {REPA_DEFAULTS['model']})")
    r.add_argument("--resolution", type=int, default=None, help=f"image size (default {REPA_DEFAULTS['resolution']})")
    r.add_argument("--num-classes", type=int, default=None, help=f"(default {REPA_DEFAULTS['num_classes']})")
    r.add_argument("--encoder-depth", type=int, default=None, help=f"(default {REPA_DEFAULTS['encoder_depth']})")
    r.add_argument("--projector-embed-dims", default=None,
                   help=f"comma-separated (default {REPA_DEFAULTS['projector_embed_dims']}, as REPA's README)")
    r.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None, help="(default off)")
    r.add_argument("--projection-layer-type", choices=["mlp", "conv"], default=None, help="iREPA (default mlp)")
    r.add_argument("--proj-kernel-size", type=int, default=None, help="iREPA conv projector (default 3)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    d = train.Dist()
    try:
        repa = {k: getattr(args, k) for k in REPA_DEFAULTS}
        if args.ckpt:
            given = [f"--{k.replace('_', '-')}" for k, v in repa.items() if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} apply only with --repa-ckpt")
            repa = None
        ckpt = args.ckpt or args.repa_ckpt
        proto = resolve_protocol(args.protocol, args.sampler, args.steps, args.cfg_scale, args.guidance_low,
                                 args.guidance_high, args.heun)
        check_protocol(proto)
        _check_counts(args.num_samples, args.batch_size, args.seed, args.labels, args.precision)
        kw = dict(steps=proto["steps"], cfg_scale=proto["cfg_scale"], seed=args.seed, sampler=proto["sampler"],
                  heun=proto["heun"], guidance_interval=proto["guidance_interval"], vae_ckpt=args.vae_ckpt,
                  sd_vae=args.sd_vae, precision=args.precision, repa=repa)
        if args.num_samples > 0:
            out = args.out
            if out is None:
                config = dict(protocol=proto["protocol"], labels=args.labels, precision=args.precision,
                              seed=args.seed, vae_override=bool(repa is None and (args.vae_ckpt or args.sd_vae)),
                              **{k: proto[k] for k in PROTOCOLS[DEFAULT_PROTOCOL]},
                              vae=[args.vae_ckpt, args.sd_vae])
                out = default_out(ckpt, config, args.num_samples)
            generate(ckpt, args.num_samples, out, d, batch_size=args.batch_size, labels=args.labels,
                     protocol=proto["protocol"], **kw)
        elif d.main:
            out = args.out or os.path.dirname(os.path.abspath(ckpt))
            print(f"sample.py: {describe(proto, 'one class per row', args.precision, args.seed)}", flush=True)
            grid(ckpt, os.path.join(out, "sample_grid.png"), d, classes=args.classes, **kw)
    finally:
        if d.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    train.cli(main, "sample.py")
