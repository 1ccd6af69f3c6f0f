"""
Sample from a trained DiT (the EMA weights) and decode with the checkpoint's autoencoder.

    python sample.py --ckpt runs/quickstart/dit.pt                       # a PNG grid: 8 samples of 8 classes
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --num-samples 50000 --out samples/ --cfg-scale 1.8 \
        --guidance-high 0.7                                               # PNGs + samples.npz for evaluate.py

Sample i starts from noise seeded by seed + i and has class i % num_classes; batches are fixed blocks of
indices dealt round-robin to the ranks, so the images do not depend on the number of processes.
Existing PNGs are kept and skipped, so an interrupted run continues where it stopped.
"""

import argparse
import os

import numpy as np
import torch

import sm
import train


def load_dit(ckpt_path, device, vae_ckpt=None, sd_vae=None):
    """(EMA DiT in eval mode, autoencoder, checkpoint dict) from a 'dit' checkpoint."""
    ckpt = sm.load_checkpoint(ckpt_path, "dit")
    model = train.build_dit(ckpt["model_name"], ckpt["dit_config"])
    model.load_state_dict(ckpt["ema"])
    src = ckpt["vae"]
    if sd_vae:
        src = dict(kind="sd", path=sd_vae, preset="f8d4")
    elif vae_ckpt:
        src = dict(kind="ckpt", path=vae_ckpt)
    vae = train.vae_from_source(src, device).eval()
    return model.to(device).eval(), vae, ckpt


def _latent_shape(model):
    return (model.in_channels,) + tuple(model.input_size)


def generate(ckpt_path, num_samples, out, d, steps=50, cfg_scale=1.0, seed=0, sampler="ode", heun=False,
             guidance_interval=(0.0, 1.0), batch_size=64, vae_ckpt=None, sd_vae=None):
    """Write out/images/NNNNNN.png for samples 0..num_samples-1 and out/samples.npz (arr_0, ADM format)."""
    from PIL import Image
    model, vae, ckpt = load_dit(ckpt_path, d.device, vae_ckpt, sd_vae)
    nc = model.num_classes
    img_dir = os.path.join(out, "images")
    os.makedirs(img_dir, exist_ok=True)
    n_batches = (num_samples + batch_size - 1) // batch_size
    mine = range(d.rank, n_batches, d.world)
    bar = train.tqdm_bar(d, 0, num_samples, "sampling")
    for b in mine:
        idx = list(range(b * batch_size, min((b + 1) * batch_size, num_samples)))
        paths = [os.path.join(img_dir, f"{i:06d}.png") for i in idx]
        if all(os.path.exists(p) for p in paths):
            bar.update(len(idx) * d.world)
            continue
        labels = None if nc == 0 else [i % nc for i in idx]
        with d.autocast():
            z = train.sample_latents(model, idx, labels, _latent_shape(model), seed, d.device, steps=steps,
                                     cfg_scale=cfg_scale, sampler=sampler, guidance_interval=guidance_interval,
                                     heun=heun)
            images = train.to_uint8(train.decode_latents(vae, z, ckpt))
        for im, p in zip(images, paths):
            tmp = p + ".tmp.png"
            Image.fromarray(im).save(tmp)
            os.replace(tmp, p)
        bar.update(len(idx) * d.world)
    bar.close()
    d.barrier()
    npz = os.path.join(out, "samples.npz")
    if d.main:
        arr = np.stack([np.array(Image.open(os.path.join(img_dir, f"{i:06d}.png")).convert("RGB"))
                        for i in range(num_samples)])
        tmp = npz + ".tmp.npz"
        np.savez(tmp, arr_0=arr)
        os.replace(tmp, npz)
        ncol = nc if 1 < nc <= 16 else 8                      # sample i has class i % nc: one class per column
        train.save_grid(arr[:8 * ncol], os.path.join(out, "samples_grid.png"), ncol)
        print(f"wrote {num_samples} samples to {img_dir} and {npz} (arr_0 {arr.shape} uint8)")
    d.barrier()
    return npz


def grid(ckpt_path, path, d, classes=None, per_class=8, steps=50, cfg_scale=1.0, seed=0, sampler="ode",
         heun=False, guidance_interval=(0.0, 1.0), vae_ckpt=None, sd_vae=None):
    """A PNG grid: one row per class (or rows of unconditional samples), fixed seed."""
    model, vae, ckpt = load_dit(ckpt_path, d.device, vae_ckpt, sd_vae)
    nc = model.num_classes
    classes = list(range(min(8, nc))) if classes is None and nc else (classes or [None] * 8)
    for c in classes:
        if c is not None and not 0 <= c < nc:
            raise ValueError(f"class {c} is outside [0, {nc}) of this model")
    idx = list(range(len(classes) * per_class))
    labels = None if nc == 0 else [classes[i // per_class] for i in idx]
    with d.autocast():
        z = train.sample_latents(model, idx, labels, _latent_shape(model), seed, d.device, steps=steps,
                                 cfg_scale=cfg_scale, sampler=sampler, guidance_interval=guidance_interval, heun=heun)
        images = train.to_uint8(train.decode_latents(vae, z, ckpt))
    train.save_grid(images, path, per_class)
    print(f"wrote {path}")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a 'dit' checkpoint written by train.py")
    p.add_argument("--num-samples", type=int, default=0, help="0: write a PNG grid only")
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    p.add_argument("--sampler", choices=["ode", "sde"], default="ode")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--heun", action="store_true", help="Heun instead of Euler for the ODE")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--classes", type=int, nargs="*", help="classes of the grid rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (the same on every rank)")
    p.add_argument("--vae-ckpt", help="override the autoencoder recorded in the checkpoint")
    p.add_argument("--sd-vae", help="decode with diffusers AutoencoderKL weights instead")
    args = p.parse_args(argv)
    d = train.Dist()
    out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    kw = dict(steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, sampler=args.sampler, heun=args.heun,
              guidance_interval=(args.guidance_low, args.guidance_high), vae_ckpt=args.vae_ckpt, sd_vae=args.sd_vae)
    try:
        if args.num_samples > 0:
            generate(args.ckpt, args.num_samples, out, d, batch_size=args.batch_size, **kw)
        elif d.main:
            grid(args.ckpt, os.path.join(out, "sample_grid.png"), d, classes=args.classes, **kw)
    finally:
        if d.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
