"""
Sample a trained DiT (EMA weights, decoded by its autoencoder) or a checkpoint of REPA's / iREPA's train.py.

    python sample.py                                               # a grid from runs/deadleaves/dit.pt
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --num-samples 50000 --protocol repa
    torchrun --nproc_per_node=8 sample.py --repa-ckpt 4000000.pt sd-vae-ft-ema --num-samples 50000

--num-samples N writes OUT/images/NNNNNN.png (resumable), OUT/samples.npz (arr_0, ADM's), OUT/samples.json (the
protocol) and a grid. Sample i draws its noise, label and SDE noise from generators keyed by (seed, i, stream): the
images depend neither on the batch size nor on the number of processes.
"""

import argparse
import hashlib
import json
import math
import os
import subprocess

import numpy as np
import torch

import sm
import train

DEFAULT_CKPT = os.path.join("runs", "deadleaves", "dit.pt")              # what `python train.py` writes
PROTOCOLS = {                          # repa: REPA's README command for SiT-XL/2 (sihyun-yu/REPA@67f7145)
    "ode50": dict(sampler="ode", steps=50, cfg_scale=1.0, guidance_interval=(0.0, 1.0), heun=False),
    "repa": dict(sampler="sde", steps=250, cfg_scale=1.8, guidance_interval=(0.0, 0.7), heun=False),
    "nocfg": dict(sampler="sde", steps=250, cfg_scale=1.0, guidance_interval=(0.0, 1.0), heun=False),
}
PIXELS = "uint8(clamp(255 * (x + 1) / 2, 0, 255)), as REPA's generate.py"
SIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}                      # REPA's SiT-S/B/L/XL: heads by hidden size


#################################################################################
#                  The protocol: keyed randomness, presets, checks              #
#################################################################################

def sample_generator(seed, index, stream=0):
    """CPU generator keyed by (seed >= 0, index, stream); streams: 0 initial noise, 1 SDE noise, 2 random label."""
    key = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(key))


def sample_labels(indices, seed, num_classes, mode="random"):
    """Class of each sample: 'random' uniform from its key (as REPA's randint), 'balanced' i % num_classes."""
    if num_classes == 0:
        return None
    if mode == "balanced":
        return [int(i) % num_classes for i in indices]
    return [int(torch.randint(num_classes, (1,), generator=sample_generator(seed, i, 2))) for i in indices]


@torch.no_grad()
def sample_latents(model, indices, labels, latent_shape, seed, device, steps=50, cfg_scale=1.0, sampler="ode",
                   guidance_interval=(0.0, 1.0), heun=False):
    """Latents (N, C, h, w) float32 of the sample indices; noise and SDE noise keyed per sample."""
    noise = torch.stack([torch.randn(tuple(latent_shape), generator=sample_generator(seed, i, 0)) for i in indices])
    noise = noise.to(device)                                                    # (N, C, h, w)
    y = None if labels is None else torch.as_tensor(labels, device=device)
    kw = dict(steps=steps, cfg_scale=cfg_scale, guidance_interval=guidance_interval)
    if sampler == "sde":                                                        # one SDE noise stream per sample
        return sm.sample_sde(model, noise, y, generator=[sample_generator(seed, i, 1) for i in indices], **kw).float()
    return sm.sample_ode(model, noise, y, heun=heun, **kw).float()


def samples_to_uint8(x):
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), truncated as REPA's generate.py (train.to_uint8 rounds)."""
    return torch.clamp(255.0 * ((x.float() + 1) / 2), 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def resolve_protocol(name="ode50", **overrides):
    """(name, or '<name>-custom' if a field differs; preset `name` with the given (not None) fields overriding it)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    p = {**PROTOCOLS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return name if p == PROTOCOLS[name] else f"{name}-custom", p


def check(p, num_classes, num_samples=1, batch_size=1, seed=0, labels="random", precision="fp32", classes=()):
    """Every setting that cannot run, checked once, before anything is written: ValueError naming the flag."""
    low, high = p["guidance_interval"]
    problems = [
        (p["sampler"] not in ("ode", "sde"), f"--sampler must be 'ode' or 'sde', got {p['sampler']!r}"),
        (p["steps"] < 1, f"--steps must be >= 1, got {p['steps']}"),
        (not p["cfg_scale"] >= 1.0, f"--cfg-scale must be >= 1 (1 = no guidance), got {p['cfg_scale']}"),
        (p["cfg_scale"] > 1 and not num_classes, f"--cfg-scale {p['cfg_scale']} (guidance) needs a class-conditional "
                                                   "model; this one is unconditional"),
        (not 0.0 <= low <= high <= 1.0, f"--guidance-interval needs 0 <= low <= high <= 1, got [{low}, {high}]"),
        (p["heun"] and p["sampler"] != "ode", "--heun applies to the ODE sampler only (--sampler ode)"),
        (num_samples < 1, f"--num-samples must be >= 1 (0: a grid only), got {num_samples}"),
        (batch_size < 1, f"--batch-size must be >= 1, got {batch_size}"),
        (seed < 0, f"--seed must be >= 0, got {seed}"),
        (labels not in ("random", "balanced"), f"--labels must be 'random' or 'balanced', got {labels!r}"),
        (precision not in ("fp32", "bf16"), f"--precision must be 'fp32' or 'bf16', got {precision!r}"),
        (labels == "balanced" and num_classes and num_samples % num_classes,
         f"--labels balanced needs --num-samples divisible by the {num_classes} classes, got {num_samples}"),
    ] + [(not 0 <= c < num_classes, f"class {c} is outside [0, {num_classes}) of this model") for c in classes]
    for bad, msg in problems:
        if bad:
            raise ValueError(msg)


#################################################################################
#          Sampling a checkpoint: models, grids, N samples, the CLI             #
#################################################################################

def load_repa(path, device, sd_vae, **given):
    """(EMA SiT, SD-VAE, record) of a REPA / iREPA train.py checkpoint or state dict: the SiT's sizes from its weights,
    num_heads / num_classes from `given`, its saved args or REPA's sizes. Latents are z * 0.18215, as REPA's."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)       # REPA saves its args, a Namespace
        sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt.get("ema", ckpt).items()
              if "projectors." not in k}                                    # REPA's alignment heads: not sampled
        D, C, p, _ = sd["x_embedder.proj.weight"].shape
        kw = dict(input_size=math.isqrt(sd["pos_embed"].shape[1]) * p, patch_size=p, in_channels=C, hidden_size=D,
                  depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), z_dims=[],
                  mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D, qk_norm="blocks.0.attn.q_norm.weight" in sd,
                  num_heads=SIT_HEADS.get(D), num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)
        kw["num_classes"] = getattr(ckpt.get("args"), "num_classes", kw["num_classes"])    # REPA's --num-classes
        kw.update(given)
        if kw["num_heads"] is None:
            raise ValueError(f"hidden size {D} is none of REPA's SiT sizes; give --repa-args num_heads=N")
        model = sm.load_repa_sit(sd, **kw)
    except Exception as e:                                                  # the user's file: one line
        raise ValueError(f"{path} is no REPA / iREPA SiT checkpoint that fits {given or 'its saved args'} "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    record = dict(step=ckpt.get("steps"), vae=dict(kind="sd", path=os.path.abspath(sd_vae)), repa=kw)
    return model.to(device).eval(), sm.load_sd_vae(sd_vae, "f8d4").to(device).eval(), record


def code_version():
    """git commit of this project ('-dirty' with uncommitted changes to tracked files), else 'unknown'."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"], timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):                  # no git, not a checkout, or too slow
        return "unknown"


def load_dit(path, device="cpu"):
    """(EMA DiT in eval mode, its autoencoder with the latents' statistics, the checkpoint) of a 'dit' checkpoint;
    the autoencoder is found relative to the checkpoint's run folder."""
    ckpt = train.load_checkpoint(path, "dit")
    model = sm.build_dit(ckpt["model_name"], **ckpt["dit_config"])
    model.load_state_dict(ckpt["ema"])
    vae = train.vae_from_source(ckpt["vae"], os.path.dirname(os.path.abspath(path)), device)
    return model.to(device).eval(), vae, ckpt


def load(ckpt, device, repa=None):
    """(EMA model, its VAE, record) of a train.py 'dit' checkpoint, or with repa (load_repa's keywords) a REPA one."""
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"no checkpoint at {ckpt}" + ": run 'python train.py' first" * (ckpt == DEFAULT_CKPT))
    model, vae, c = load_dit(ckpt, device) if repa is None else load_repa(ckpt, device, **repa)
    record = dict(format="repa" if repa else "sm", step=c.get("step"), vae=c.get("vae"), repa=c.get("repa"))
    sd, h = model.state_dict(), hashlib.sha256()
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{ckpt}: the EMA weights are not finite (NaN/Inf in {len(bad)} tensors, e.g. "
                         f"{', '.join(bad[:3])}); sample an earlier checkpoint")
    for k in sorted(sd):                                 # the identity of the weights: names, dtypes, shapes, bytes
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k} {t.dtype} {tuple(t.shape)};".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return model, vae, dict(checkpoint=os.path.abspath(ckpt), sha256=h.hexdigest()[:16], **record)


@torch.no_grad()
def draw(model, vae, idx, labels, seed, p, precision, device):
    """uint8 images (N, H, W, 3) of the sample indices idx; FloatingPointError naming non-finite samples."""
    with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
        z = sample_latents(model, idx, labels, (model.in_channels, *model.input_size), seed, device, **p)
        x = vae.decode(vae.denormalize(z)).float()                              # (N, 3, H, W)
    bad = [int(i) for i, zi, xi in zip(idx, z, x) if not (zi.isfinite().all() and xi.isfinite().all())]
    if bad:
        raise FloatingPointError(f"non-finite samples (NaN/Inf latents or pixels) at indices {bad}; none written")
    return samples_to_uint8(x)


def grid(ckpt, path, d, classes=None, per_class=8, seed=0, precision="fp32", protocol="ode50", repa=None, **overrides):
    """A PNG grid: a row per class (default the first 8) or 8 unconditional rows."""
    name, p = resolve_protocol(protocol, **overrides)
    model, vae, _ = load(ckpt, d.device, repa)
    nc = model.num_classes
    classes = list(classes) if classes else list(range(min(8, nc))) if nc else [None] * 8
    check(p, nc, seed=seed, precision=precision, classes=[c for c in classes if c is not None])
    idx = list(range(len(classes) * per_class))
    labels = None if nc == 0 else [classes[i // per_class] for i in idx]
    train.save_grid(draw(model, vae, idx, labels, seed, p, precision, d.device), path, per_class)
    settings = dict(protocol=name, **p, seed=seed, precision=precision)
    print("sample.py:", " ".join(f"{k}={v}" for k, v in settings.items()), "->", path)


def check_output(out, config, nbytes):
    """Refuse a folder with PNGs of another (or an unknown) configuration, or a disk with less than nbytes free."""
    img = os.path.join(out, "images")
    pngs = [f for f in os.listdir(img) if f.endswith(".png")] if os.path.isdir(img) else []
    if pngs and not os.path.exists(os.path.join(img, "config.json")):
        raise FileExistsError(f"{img} holds {len(pngs)} PNGs but no config.json that says how; use a fresh --out")
    if pngs:                                                    # a config.json without PNGs is simply replaced
        old, new = train.read_json(os.path.join(img, "config.json")), json.loads(json.dumps(config))
        diff = [f"{k}: {old.get(k, '-')} -> {new.get(k, '-')}" for k in sorted(set(old) | set(new))
                if k not in ("checkpoint", "protocol") and old.get(k) != new.get(k)]     # fields, not names
        if diff:
            raise FileExistsError(f"{img} holds samples of other settings ({'; '.join(diff)}); use a fresh --out "
                                  f"(train.py: move {out} aside)")
    train.check_space(out, nbytes)


def generate(ckpt, num_samples, out, d, seed=0, batch_size=64, labels="random", precision="fp32", protocol="ode50",
             repa=None, **overrides):
    """Samples 0..N-1 -> out/images/NNNNNN.png (resumable), out/samples.npz (arr_0, ADM's) and out/samples.json."""
    from PIL import Image
    name, p = resolve_protocol(protocol, **overrides)
    out = out or os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"samples-{name}-seed{seed}-{num_samples}")
    model, vae, source = load(ckpt, d.device, repa)
    nc = model.num_classes
    check(p, nc, num_samples, batch_size, seed, labels, precision)
    config = dict(source, seed=seed, protocol=name, **p, labels=labels if nc else "none", precision=precision,
                  pixels=PIXELS)
    check_output(out, config, num_samples * math.prod(model.input_size) * vae.factor ** 2 * 3 * 2)   # PNGs + npz
    d.barrier()
    img = os.path.join(out, "images")
    if d.main:
        os.makedirs(img, exist_ok=True)
        train.write_json(config, os.path.join(img, "config.json"))
        settings = {k: v for k, v in config.items() if k not in source and k != "pixels"}
        print("sample.py:", " ".join(f"{k}={v}" for k, v in settings.items()), "->", out, flush=True)
    d.barrier()
    png = [os.path.join(img, f"{i:06d}.png") for i in range(num_samples)]
    blocks = [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
    bar = train.progress(d, 0, num_samples, "sampling")
    mine = blocks[d.rank::d.world]                                      # fixed blocks, dealt round-robin to ranks
    for r in range(-(-len(blocks) // d.world)):                         # the same number of rounds on every rank
        idx = [i for i in mine[r] if not os.path.exists(png[i])] if r < len(mine) else []   # resume: keyed draws
        if idx:
            images = draw(model, vae, idx, sample_labels(idx, seed, nc, labels), seed, p, precision, d.device)
            for i, im in zip(idx, images):
                train.atomic_write(png[i], lambda f: Image.fromarray(im).save(f, format="PNG"))
        bar.update(sum(len(b) for b in blocks[r * d.world:(r + 1) * d.world]))
        if train.stop_requested(d):                                     # SIGTERM / SIGINT: the PNGs so far are kept
            train.stop_now(d, f"sample.py: {img} keeps the images written so far")
    bar.close()
    d.barrier()
    npz = os.path.join(out, "samples.npz")
    if d.main:
        arr = np.stack([np.array(Image.open(f).convert("RGB")) for f in png])           # (N, H, W, 3) uint8
        train.atomic_write(npz, lambda f: np.savez(f, arr_0=arr))
        ncol = nc if labels == "balanced" and 1 < nc <= 16 else 8                   # balanced: a class per column
        train.save_grid(arr[:8 * ncol], os.path.join(out, "samples_grid.png"), ncol)
        tf32 = precision == "fp32" and d.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        train.write_json(dict(config, tf32=tf32, num_samples=num_samples, num_classes=nc,
                              image_shape=list(arr.shape[1:]), code_version=code_version()),
                         os.path.join(out, "samples.json"))
        print(f"wrote {num_samples} samples to {img}, {npz} (arr_0 {arr.shape} uint8) and samples.json")
    d.barrier()
    return npz


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help=f"a 'dit' checkpoint written by train.py (default {DEFAULT_CKPT})")
    src.add_argument("--repa-ckpt", nargs=2, metavar=("CKPT", "SD_VAE"), help="a checkpoint of REPA's / iREPA's "
                     "train.py (or its EMA state dict) and the diffusers SD-VAE weights it decodes with")
    parser.add_argument("--repa-args", type=lambda s: {k: int(v) for k, v in (kv.split("=") for kv in s.split(","))},
                        help="what a --repa-ckpt's shapes and args do not say, e.g. num_heads=16,num_classes=1000")
    parser.add_argument("--num-samples", type=int, default=0, help="0: a PNG grid only")
    parser.add_argument("--out", help="output folder (default CKPT_DIR/samples-...; a grid: the checkpoint's folder)")
    parser.add_argument("--protocol", default="ode50", help="; ".join(f"{n}: {p}" for n, p in PROTOCOLS.items()))
    parser.add_argument("--sampler", help="ode or sde (default: the protocol's, as the next four)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg-scale", type=float, help="1: no guidance")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), help="CFG on t in it")
    parser.add_argument("--heun", action=argparse.BooleanOptionalAction, help="Heun's ODE steps")
    parser.add_argument("--labels", default="random", help="random (uniform, as REPA) or balanced (i %% num_classes)")
    parser.add_argument("--precision", default="fp32", help="fp32 (TF32 matmuls on CUDA) or bf16 (autocast)")
    parser.add_argument("--classes", type=int, nargs="*", help="the grid's rows (default: classes 0-7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (the same on every rank)")
    a = parser.parse_args(argv)
    if a.repa_args and not a.repa_ckpt:
        raise ValueError("--repa-args applies only with --repa-ckpt")
    ckpt = a.repa_ckpt[0] if a.repa_ckpt else a.ckpt or DEFAULT_CKPT
    kw = dict(seed=a.seed, precision=a.precision, protocol=a.protocol, sampler=a.sampler, steps=a.steps, heun=a.heun,
              cfg_scale=a.cfg_scale, guidance_interval=a.guidance_interval and tuple(a.guidance_interval),
              repa=dict(sd_vae=a.repa_ckpt[1], **(a.repa_args or {})) if a.repa_ckpt else None)
    d = train.Dist()
    if a.num_samples:
        with train.stop_signals():
            generate(ckpt, a.num_samples, a.out, d, batch_size=a.batch_size, labels=a.labels, **kw)
    elif d.main:
        out = a.out or os.path.dirname(os.path.abspath(ckpt))
        grid(ckpt, os.path.join(out, "sample_grid.png"), d, classes=a.classes, **kw)


if __name__ == "__main__":
    train.cli(main, "sample.py")
