"""
Train Spectrum Matching latent diffusion: the autoencoder (stage 1), its latents, the DiT (stage 2).

    python train.py                                              # quickstart: dead leaves, CPU, ~20 min
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data-path /data/imagenet
    torchrun --nproc_per_node=8 train.py --dataset imagenet --variant kl --stage vae --data-path DIR

--dataset chooses the recipe (RECIPES below: deadleaves is the quickstart, imagenet and celebahq the
published ones) and --variant one of its variants; every recipe entry is a flag that overrides it
(`--vae-steps 1000`), and `--dataset NAME ... --help` lists the values that will be used.

Stages: all (vae, latents, dit, then samples and metrics; a finished stage is skipped, an interrupted one
resumed, the latents encoded again), vae, latents, dit. Every random number of a step is drawn for the global
batch from a generator seeded by (seed, step) and each rank takes its slice, so a step sees the same data and
noise on any number of processes and a resume needs no RNG state.
"""

import argparse
import ast
import contextlib
import glob
import itertools
import json
import math
import os
import signal
import sys
import textwrap
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import sm

# -----------------------------------------------------------------------------
# Recipes: every default lives here. imagenet is the published protocol (stage 1: the authors' configs;
# stage 2: REPA's SiT-B with patch 1 on f16 latents, 256 tokens as REPA's SiT-B/2 on f8 latents).
RECIPES = {}
RECIPES["imagenet"] = dict(
    out="runs/imagenet", seed=0, num_workers=4, data_path=None, image_size=256, dataset_size=None, jpeg_quality=75,
    # stage 1: the authors' f16d16 DSM autoencoder, 8 GPUs x 16 images
    vae="f16d16", reg="dsm", vae_batch=128, vae_steps=1_000_000, vae_lr=5e-5, warmup=2000,
    lpips_weight=0.5, disc_weight=0.5, disc_start=50_001, disc_lr=5e-5, disc_warmup=2000,
    kl_weight=None, esm_weight=None, eq_prob=None, esm_delta=1.0, dsm_block=8, dsm_group=16,
    latent_norm="scalar", stats_samples=200_000, lpips_path=None, vgg_path=None,
    # latents: our stage-1 checkpoint (default OUT/vae.pt), or SD-VAE / the authors' released weights
    vae_ckpt=None, sd_vae=None, official_vae=None, official_scale=None,
    # stage 2: SiT-B/1 + REPA-DoG on DINOv2 ViT-B/14 (REPA: batch 256, AdamW 1e-4, EMA 0.9999, 400k steps)
    model="DiT-B/1", depth=None, width=None, encoder_depth=None, dit_batch=256, dit_steps=400_000,
    dit_lr=1e-4, ema=0.9999, class_dropout=0.1, unconditional=False, weighting="uniform",
    repa_encoder="dinov2_vitb14", repa_target="dog", repa_lambda=None, zscore_alpha=0.6, dog_sigmas=(0.5, 2.0),
    projector="mlp", projector_kernel=1, qk_norm=False,
    precision="bf16", compile=False, grad_checkpoint=False,
    sample_steps=50, cfg_scale=1.0, num_fid_samples=50_000,
    log_every=100, ckpt_every=10_000, keep_every=50_000, vis_every=10_000, max_steps=None,
)
RECIPES["deadleaves"] = dict(
    RECIPES["imagenet"], out="runs/deadleaves", image_size=32, dataset_size=4096, jpeg_quality=0, num_workers=2,
    vae="tiny", reg="esm+dsm", vae_batch=32, vae_steps=600, vae_lr=1e-3, warmup=50, stats_samples=4096,
    lpips_weight=0.0,                                           # no pretrained weights: the same run offline
    dsm_group=8, model="DiT-S/2", depth=6, width=256, dit_batch=64, dit_steps=1500, dit_lr=5e-4, ema=0.995,
    repa_encoder="none", weighting="lognormal", num_fid_samples=512,
    log_every=25, ckpt_every=250, keep_every=0, vis_every=500,
)
RECIPES["celebahq"] = dict(RECIPES["imagenet"], out="runs/celebahq", reg="esm", vae_batch=48, vae_steps=500_000,
                           dsm_group=12, stats_samples=50_000)   # the authors' ESM run: 4 GPUs x 12 images
VARIANTS = {                                                     # --variant: the authors' other stage-1 runs
    "imagenet": {"kl": dict(reg="kl", vae_steps=600_000)},       # SD-VAE's objective, the baseline
    "celebahq": {"dsm": dict(reg="dsm")},
}
SHOWN = ("data_path", "image_size", "vae", "reg", "vae_batch", "vae_steps", "model", "dit_batch", "dit_steps",
         "repa_encoder", "repa_target", "precision", "out")       # printed before any work
# settings that define a run: a resume must not change them (steps may grow)
RUN_KEYS = {
    "vae": ("dataset", "image_size", "dataset_size", "jpeg_quality", "vae", "reg", "kl_weight", "esm_weight",
            "esm_delta", "dsm_block", "dsm_group", "eq_prob", "lpips_weight", "disc_weight", "disc_start",
            "disc_lr", "disc_warmup", "vae_batch", "vae_lr", "warmup", "seed", "latent_norm"),
    "dit": ("model", "depth", "width", "encoder_depth", "dit_batch", "dit_lr", "ema", "weighting", "class_dropout",
            "unconditional", "repa_encoder", "repa_target", "zscore_alpha", "dog_sigmas", "projector",
            "projector_kernel", "qk_norm", "repa_lambda", "seed"),
}


# ----------------------------------------------------------------------------- command line

def base_recipe(dataset, variant=None):
    """RECIPES[dataset] with its variant applied, and the run's own settings."""
    if dataset not in RECIPES:
        raise ValueError(f"unknown --dataset {dataset!r}: choose {', '.join(RECIPES)}")
    if variant is not None and variant not in VARIANTS.get(dataset, {}):
        raise ValueError(f"--dataset {dataset} has no variant {variant!r}; it has: "
                         f"{', '.join(VARIANTS.get(dataset, {})) or 'none'}")
    r = dict(dataset=dataset, variant=variant, stage="all", resume=False, bench=False, **RECIPES[dataset])
    r.update(VARIANTS.get(dataset, {}).get(variant, {}))
    r["out"] += f"-{variant}" if variant else ""
    return r


def recipe(dataset="deadleaves", variant=None, checked=True, **overrides):
    """The resolved settings of a run: the recipe, its variant, the overrides, the regulariser's weights; validated
    unless checked=False (--help shows them before the checks)."""
    r = base_recipe(dataset, variant)
    unknown = sorted(set(overrides) - set(r))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; the recipe has: {', '.join(r)}")
    cfg = argparse.Namespace(**{**r, **overrides})
    cfg.explicit = sorted(set(overrides) - {"stage", "resume", "bench"})
    if cfg.reg not in sm.REG_PRESETS:
        raise ValueError(f"unknown --reg {cfg.reg!r}; choose from {', '.join(sm.REG_PRESETS)}")
    for k, v in sm.REG_PRESETS[cfg.reg].items():               # the regulariser's weights, unless set
        if getattr(cfg, k, None) is None:
            setattr(cfg, k, v)
    if cfg.repa_lambda is None:                                # REPA / DoG 0.5; iREPA's latent config 1.0
        cfg.repa_lambda = 1.0 if cfg.repa_target == "zscore" else 0.5
    if checked:
        validate(cfg)
    return cfg


def parse_value(flag, text, default):
    """The text of a flag, typed like the recipe's default (None: a number if it reads as one, else the text)."""
    if isinstance(default, str) or flag[2:].replace("-", "_") in PATHS:
        return text
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{flag} takes true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        v = text
    v = float(v) if isinstance(default, float) and type(v) is int else v
    if default is not None and type(v) is not type(default):
        raise ValueError(f"{flag} takes a {type(default).__name__}, got {text!r}")
    return v


def get_args(argv=None):
    """Every recipe entry is a flag: --name value (or --name=value; a bare --name sets a boolean)."""
    words = [w for a in (sys.argv[1:] if argv is None else argv) for w in (a.split("=", 1) if a[:2] == "--" else [a])]
    wants_help = bool({"-h", "--help"} & set(words))
    words = [w for w in words if w not in ("-h", "--help")]
    first = dict(zip(words, words[1:]))
    r = base_recipe(first.get("--dataset", "deadleaves"), first.get("--variant"))
    given = {}
    while words:
        flag, key = words[0], words[0][2:].replace("-", "_")
        if not flag.startswith("--") or key not in r:
            raise ValueError(f"unknown argument {flag} (run train.py --help for the recipe's entries)")
        n = len(r[key]) if isinstance(r[key], tuple) else 1
        if isinstance(r[key], bool) and (len(words) == 1 or words[1].startswith("--")):
            words.insert(1, "true")                             # a bare --resume, --compile ...
        vals, words = words[1:1 + n], words[1 + n:]
        if len(vals) < n or any(v.startswith("--") for v in vals):
            raise ValueError(f"{flag} needs {n} value{'s' if n > 1 else ''}")
        vals = [parse_value(flag, v, x) for v, x in zip(vals, r[key] if n > 1 else [r[key]])]
        given[key] = tuple(vals) if n > 1 else vals[0]
    if wants_help:                                             # the values this command line would use
        cfg = recipe(**given, checked=False)                   # the regulariser's weights filled in
        entries = "\n".join(f"  {k} = {getattr(cfg, k)!r}" for k in r)
        print(__doc__ + f"\nrecipe {r['dataset']}{' / ' + r['variant'] if r['variant'] else ''}; every entry is a "
              f"flag (--vae-steps 1000 sets vae_steps):\n{entries}")
        sys.exit(0)
    return recipe(**given)


PATHS = ("data_path", "out", "vae_ckpt", "sd_vae", "official_vae", "lpips_path", "vgg_path", "variant")
POSITIVE = ("image_size", "vae_batch", "vae_steps", "dit_batch", "dit_steps", "log_every", "ckpt_every",
            "vis_every", "stats_samples", "dataset_size", "sample_steps", "num_fid_samples", "dsm_block",
            "dsm_group", "depth", "width", "encoder_depth", "max_steps")
CHOICES = dict(stage=("all", "vae", "latents", "dit"), latent_norm=("scalar", "channel"),
               weighting=("uniform", "lognormal"), repa_target=("raw", "zscore", "dog"), projector=("mlp", "conv"),
               precision=("bf16", "fp16", "fp32"))
NON_NEGATIVE = ("seed", "warmup", "disc_start", "disc_warmup", "keep_every", "num_workers",
                "lpips_weight", "disc_weight", "kl_weight", "esm_weight", "repa_lambda", "jpeg_quality")


def validate(cfg):
    """One clear error for every setting that cannot work, before any work is done."""
    for k in POSITIVE + NON_NEGATIVE:
        v, lo = getattr(cfg, k), 1 if k in POSITIVE else 0
        if v is not None and v < lo:
            raise ValueError(f"--{k.replace('_', '-')} must be {'at least 1' if lo else '>= 0'}, got {v}")
    for k, v in dict(vae_lr=cfg.vae_lr, dit_lr=cfg.dit_lr, disc_lr=cfg.disc_lr, dog_sigmas=min(cfg.dog_sigmas),
                     official_scale=cfg.official_scale).items():
        if v is not None and not v > 0:
            raise ValueError(f"--{k.replace('_', '-')} must be > 0, got {getattr(cfg, k)}")
    for k in ("ema", "class_dropout", "eq_prob"):
        if not 0 <= getattr(cfg, k) <= 1:
            raise ValueError(f"--{k.replace('_', '-')} must be in [0, 1], got {getattr(cfg, k)}")
    if cfg.vae not in sm.VAE_CONFIGS:
        raise ValueError(f"unknown VAE preset {cfg.vae!r}; choose from {', '.join(sm.VAE_CONFIGS)}")
    if cfg.model not in sm.DiT_CONFIGS:
        raise ValueError(f"unknown model {cfg.model!r}; choose from {', '.join(sm.DiT_CONFIGS)}")
    if cfg.repa_encoder != "none" and not cfg.repa_encoder.startswith("dinov2_"):
        raise ValueError(f"unknown --repa-encoder {cfg.repa_encoder!r}: a DINOv2 hub name (dinov2_vitb14) or none")
    for k, choices in CHOICES.items():
        if getattr(cfg, k) not in choices:
            raise ValueError(f"--{k.replace('_', '-')} must be one of {', '.join(map(str, choices))}; got "
                             f"{getattr(cfg, k)!r}")
    if cfg.projector_kernel % 2 == 0:
        raise ValueError(f"--projector-kernel must be odd (a token grid of the same size), got {cfg.projector_kernel}")
    if cfg.jpeg_quality > 95:
        raise ValueError(f"--jpeg-quality must be in 1..95 (0: the original pixels), got {cfg.jpeg_quality}")
    if cfg.dataset == "deadleaves" and (cfg.data_path or cfg.jpeg_quality):
        raise ValueError("--data-path and --jpeg-quality apply to image folders, but the dataset is deadleaves "
                         "(procedural, no files): pass --dataset imagenet or --dataset celebahq")
    sources = [k for k in ("vae_ckpt", "sd_vae", "official_vae") if getattr(cfg, k)]
    if len(sources) > 1:
        raise ValueError(f"--{' and --'.join(s.replace('_', '-') for s in sources)}: choose one autoencoder")
    if cfg.dataset != "deadleaves" and not cfg.data_path and cfg.stage in ("all", "vae", "latents") and not cfg.bench:
        raise ValueError(f"--dataset {cfg.dataset} needs --data-path")
    if cfg.dataset != "deadleaves" and cfg.dataset_size is not None:
        raise ValueError(f"--dataset-size is the number of dead-leaves images; --dataset {cfg.dataset} uses every "
                         "image of its folder")
    if cfg.cfg_scale < 1 or (cfg.unconditional and cfg.cfg_scale != 1):
        raise ValueError(f"--cfg-scale must be >= 1 (1: no guidance), and 1 for an unconditional model; got "
                         f"{cfg.cfg_scale}")


def describe(cfg):
    """The recipe's name and the values that matter, printed before any work."""
    name = cfg.dataset + (f" / {cfg.variant}" if cfg.variant else "")
    over = f" (set: {', '.join(cfg.explicit)})" if cfg.explicit else ""
    body = ", ".join(f"{k}={getattr(cfg, k)}" for k in SHOWN)
    return f"recipe {name}{over}: stage {cfg.stage}\n" + textwrap.fill(body, 110, initial_indent="  ",
                                                                       subsequent_indent="  ")


# ----------------------------------------------------------------------------- distributed

class Dist:
    """Rank, world size and device; NCCL on CUDA, gloo on CPU, under torchrun."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            self.device = torch.device("cpu")
        if ("RANK" in os.environ or self.world > 1) and not dist.is_initialized():   # under torchrun, even 1 process
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.group, self.main = dist.is_initialized(), self.rank == 0

    def autocast(self, precision):
        """bf16 / fp16 autocast on CUDA; float32 (TF32 allowed) for fp32 and on CPU."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                              enabled=self.device.type == "cuda" and precision != "fp32")

    def scaler(self, precision):
        """fp16's loss scaling (a pass-through otherwise)."""
        return torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and precision == "fp16")

    def barrier(self):
        if self.group:
            dist.barrier()

    def all_reduce(self, t):
        if self.group:
            dist.all_reduce(t)
        return t

    def all_reduce_mean(self, t):
        """Average of t over ranks (a new tensor)."""
        return self.all_reduce(t.clone()) / self.world if self.group else t

    def shard(self, t):
        """This rank's slice of a global-batch tensor (or list)."""
        n = len(t) // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def wrap(self, model):
        """DDP over the ranks (on CUDA with this rank's GPU as its device, as DiT), or the model itself."""
        if not self.group:
            return model
        gpu = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=gpu)


def step_generator(seed, step, stream=0):
    """CPU generator for one step's global random numbers, identical on every rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def log(d, *msg):
    if d.main:
        print(*msg, flush=True)


def progress(d, start, total, desc, unit="it"):
    """A tqdm bar on rank 0 (its rate in units/s: steps/s with unit "step")."""
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=desc, unit=unit, disable=not d.main, dynamic_ncols=True)


# ----------------------------------------------------------------------------- data

def center_crop_arr(img, image_size):
    """ADM's center crop: halve with BOX while large, BICUBIC resize the short side, crop the center."""
    from PIL import Image
    while min(*img.size) >= 2 * image_size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = image_size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]


def jpeg_round_trip(arr, quality):
    """uint8 (H, W, 3) saved as JPEG at `quality` and decoded again (the authors' crops are re-saved as JPEG)."""
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return np.array(Image.open(buf).convert("RGB"))


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".jpx")


def read_rgb(path):
    """Decode an image file to an 8-bit RGB PIL image; the error names the file. 16-bit and 32-bit integer greyscale
    are rescaled (v / 257) instead of clipped at 255; float images in [0, 1] are scaled by 255; alpha is dropped
    (as torchvision and ADM)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                if im.mode == "F":
                    a = a * 255.0 if a.size and a.max() <= 1.0 else a
                elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
                    a = a / 257.0                                  # 65535 -> 255
                a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
                return Image.fromarray(np.repeat(a[..., None], 3, axis=2))
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            return im.convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def class_folders(root):
    """The class subfolders of an image folder, sorted: hidden ones and links back up the tree left out."""
    real = os.path.join(os.path.realpath(root), "")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
                  and not real.startswith(os.path.join(os.path.realpath(e.path), "")))


def image_files(folder):
    """Every image in folder and its subfolders, hidden ones and links that loop skipped, in sorted path order."""
    found, seen = [], set()
    for dirpath, dirnames, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:                                   # a link back up the tree: walked once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        found.append((dirpath, sorted(n for n in names if _is_image(n))))
    return [os.path.join(dirpath, n) for dirpath, names in sorted(found) for n in names]


class ImageFiles(torch.utils.data.Dataset):
    """Images of a folder: class subfolders (ImageFolder order, labels) or flat (label 0); center-cropped,
    optionally re-saved as JPEG. An image that cannot be decoded stops the run with its name."""

    def __init__(self, root, image_size, jpeg_quality=0):
        if root is None or not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root} (pass --data-path)")
        self.root, self.image_size, self.jpeg_quality = root, image_size, jpeg_quality
        subdirs = class_folders(root)
        top = sorted(n for n in os.listdir(root) if _is_image(n))
        if subdirs and top:
            raise ValueError(f"{root} mixes {len(top)} images with {len(subdirs)} subfolders: expected class folders "
                             "(ROOT/CLASS/IMAGE) or a flat folder of images")
        groups = [image_files(os.path.join(root, c)) for c in subdirs] or [[os.path.join(root, n) for n in top]]
        for c, files in zip(subdirs, groups):
            if not files:
                raise ValueError(f"class folder {os.path.join(root, c)} holds no images: remove it or fix the layout")
        if not groups[0]:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found in {root}")
        self.files = [f for files in groups for f in files]
        self.labels = [i for i, files in enumerate(groups) for _ in files]   # class folders: their order; flat: 0
        self.classes, self.num_classes = subdirs, len(subdirs)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = center_crop_arr(read_rgb(self.files[i]), self.image_size)                 # uint8 (H, W, 3)
        img = jpeg_round_trip(img, self.jpeg_quality) if self.jpeg_quality else img
        return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0, self.labels[i]


def split_folder(path, split):
    """ROOT/train or ROOT/val when they exist; a folder without either is the training split only."""
    sub = os.path.join(path, split)
    if os.path.isdir(sub):
        return sub
    if split == "train" and not os.path.isdir(os.path.join(path, "val")):
        return path
    raise FileNotFoundError(f"{path} has no {split}/ folder: expected ROOT/train/ and ROOT/val/ side by side, or a "
                            "folder of training images only (pass the root, not ROOT/train)")


def build_dataset(name, path=None, image_size=256, split="train", seed=0, length=None, jpeg_quality=0):
    """(image in [-1, 1] (3, H, W), label): dead leaves (val: another seed) or the images of ROOT/<split>."""
    if name == "deadleaves":
        return sm.DeadLeaves(length or 4096, image_size, seed=seed if split == "train" else seed + 10_000)
    return ImageFiles(split_folder(path, split), image_size, jpeg_quality)


def open_dataset(cfg, d):
    """The training set of a run, described in the log."""
    ds = build_dataset(cfg.dataset, cfg.data_path, cfg.image_size, "train", cfg.seed, cfg.dataset_size,
                       cfg.jpeg_quality)
    where = f" at {ds.root}" if isinstance(ds, ImageFiles) else " (procedural)"
    log(d, f"dataset {cfg.dataset} train{where}: {len(ds)} images, {ds.num_classes} classes, {cfg.image_size} px"
           + (f", re-saved as JPEG {cfg.jpeg_quality}" if cfg.jpeg_quality and cfg.dataset != "deadleaves" else ""))
    return ds


def uniform_subset(size, n, seed):
    """n of the indices 0..size-1, drawn uniformly without replacement by a generator seeded with seed, in order."""
    return sorted(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def global_batches(n, global_batch, d, seed, start_step=0):
    """This rank's indices for steps start_step..: the global batch of step s is positions s*B..(s+1)*B-1 of
    a stream of per-epoch permutations seeded by (seed, epoch), whatever the number of ranks."""
    local, epoch, perm = global_batch // d.world, -1, None
    for step in itertools.count(start_step):
        lo = step * global_batch + d.rank * local
        for p in range(lo, lo + local):
            if p // n != epoch:
                epoch = p // n
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
            yield int(perm[p % n])


def _worker_init(_):
    for sig in (signal.SIGTERM, signal.SIGINT):               # the main process decides when to stop
        signal.signal(sig, signal.SIG_IGN)


def make_loader(ds, global_batch, d, seed, start_step, num_workers):
    if global_batch % d.world:
        raise ValueError(f"global batch {global_batch} is not divisible by the world size {d.world}")
    sampler = global_batches(len(ds), global_batch, d, seed, start_step)
    return iter(torch.utils.data.DataLoader(ds, batch_size=global_batch // d.world, sampler=sampler,
                                            num_workers=num_workers, pin_memory=d.device.type == "cuda",
                                            persistent_workers=num_workers > 0, worker_init_fn=_worker_init))


# ----------------------------------------------------------------------------- pictures

def to_uint8(x):
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, ncol=8):
    """Save uint8 images (N, H, W, 3) as one PNG grid with 2-pixel white gaps (torchvision's make_grid; one image:
    itself)."""
    from PIL import Image
    from torchvision.utils import make_grid
    grid = make_grid(torch.from_numpy(images).permute(0, 3, 1, 2), nrow=ncol, padding=2, pad_value=255)
    atomic_write(path, lambda f: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG"))


def plot_lines(series, path, title="", xlabel="", ylabel=""):
    """Tiny PNG line plot with PIL: series = {name: (values, (r, g, b))}."""
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 640, 400, 60, 150, 40, 40
    im = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(im)
    allv = np.concatenate([np.asarray(v, float) for v, _ in series.values()])
    lo, hi = float(allv.min()), float(allv.max())
    hi = hi if hi > lo else lo + 1
    dr.rectangle([L, T, W - R, H - B], outline="black")
    for i, (name, (v, color)) in enumerate(series.items()):
        v = np.asarray(v, float)
        xs = L + np.arange(len(v)) / max(len(v) - 1, 1) * (W - R - L)
        ys = H - B - (v - lo) / (hi - lo) * (H - T - B)
        dr.line(list(zip(xs.tolist(), ys.tolist())), fill=color, width=2)
        dr.line([W - R + 10, T + 10 + 18 * i, W - R + 30, T + 10 + 18 * i], fill=color, width=3)
        dr.text((W - R + 35, T + 4 + 18 * i), name, fill="black")
    for xy, text in (((L, 12), title), ((L, H - B + 8), xlabel), ((4, T), f"{hi:.3g}"), ((4, H - B - 10), f"{lo:.3g}"),
                     ((4, (T + H - B) // 2), ylabel)):
        dr.text(xy, text, fill="black")
    atomic_write(path, lambda f: im.save(f, format="PNG"))


def spectrum_report(x, z, delta, blur):
    """Mean normalised log spectra of images, latents and the delta target, and KL(target || latent)."""
    s_t, s_z, s_x = sm.spectrum_profiles(x, z, delta=delta, blur_sigma=blur)
    return dict(image=s_x.mean(0).tolist(), latent=s_z.mean(0).tolist(), target=s_t.mean(0).tolist(),
                kl=float(sm.esm_loss(x, z, delta=delta, blur_sigma=blur)))


def plot_spectra(rep, path, delta):
    plot_lines({"image": (rep["image"], (40, 40, 40)), f"target (delta={delta:g})": (rep["target"], (220, 120, 0)),
                "latent": (rep["latent"], (30, 90, 220))}, path,
               title=f"normalised log radial spectra   KL(target||latent) = {rep['kl']:.4f}",
               xlabel="frequency bin (low -> high)", ylabel="share")


# ----------------------------------------------------------------------------- checkpoints

def atomic_write(path, write, binary=True):
    """write(f) into PATH.<pid>.tmp, fsync, rename it over PATH: a crash at any point leaves the old file or the new
    one, and concurrent writers never share a temporary. A full disk is one line that names the path; the old file
    is kept."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == 28:                       # ENOSPC
            raise ValueError(f"no space left on the device of {path}; the previous file (if any) is kept") from None
        raise


def save_checkpoint(obj, path):
    """torch.save(obj) to path atomically (see atomic_write), removing the temporaries of a killed writer (the run
    folder's lock says there is no other)."""
    for old in glob.glob(glob.escape(os.fspath(path)) + ".*.tmp"):
        os.remove(old)
    atomic_write(path, lambda f: torch.save(obj, f))


_LOCKS = {}                                                   # run folder -> the open, locked file


def lock_run_folder(out, d):
    """Take an exclusive lock on the run folder for this job (the kernel releases it when the process ends,
    killed or not); a second job on the same folder is refused by name."""
    import fcntl
    out = os.path.abspath(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written: {e.strerror or e}") from None
    if d.main and out not in _LOCKS:
        f = open(os.path.join(out, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.truncate(0)
            print(os.getpid(), os.uname().nodename, file=f, flush=True)
            _LOCKS[out] = f
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "?"
            f.close()
    ok = torch.tensor([float(out in _LOCKS or not d.main)], device=d.device)
    if d.all_reduce(ok).item() < d.world:
        raise FileExistsError(f"{out} is being written by another run (pid, host: {owner if d.main else '?'}): wait "
                              "for it to end, or choose another --out")


STOP = {"signal": None}                                       # set by SIGTERM / SIGINT (see main)
RESUMABLE = 75                                                # exit status: stopped cleanly, resumable


@contextlib.contextmanager
def stop_signals():
    """While inside, SIGTERM / SIGINT ask the loops to stop after their current step (stop_requested)."""
    old = {sig: signal.signal(sig, lambda num, frame: STOP.update(signal=signal.Signals(num).name))
           for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        STOP["signal"] = None


def stop_requested(d):
    """True on every rank when any rank was asked to stop (SLURM's SIGTERM before its SIGKILL, or Ctrl-C)."""
    flag = torch.tensor([float(STOP["signal"] is not None)], device=d.device)
    return d.all_reduce(flag).item() > 0


def stop_now(d, what, by=None):
    log(d, f"{what}; stopped by {by or 'signal ' + str(STOP['signal'])} (exit status {RESUMABLE}: the same command "
           "continues, with --resume for a single train.py stage)")
    raise SystemExit(RESUMABLE)


def write_json(obj, path):
    """Write JSON atomically (tensors, arrays and numpy scalars by their tolist())."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=lambda v: v.tolist()) + "\n"),
                 binary=False)


def read_json(path):
    """A JSON file written by this project; a damaged one is one line that names it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): remove it to redo what wrote it") from None


def load_checkpoint(path, kind=None):
    """Load a checkpoint written by train.py and check that it is of the expected kind ('vae', 'dit')."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by this project (no 'kind' entry)")
    if kind is not None and ckpt["kind"] != kind:
        raise ValueError(f"{path} is a {ckpt['kind']!r} checkpoint, but a {kind!r} checkpoint is needed here")
    return ckpt


def resume_point(path, kind, cfg, d, total_steps):
    """(The checkpoint to continue or None: start afresh, whether it is finished), checked to belong to this run."""
    if not os.path.exists(path):
        if cfg.resume:
            log(d, f"stage {kind}: --resume, but there is no {path} yet: starting a new run")
        return None, False
    if not (cfg.resume or cfg.stage == "all"):
        raise FileExistsError(f"{path} exists: pass --resume to continue it, or choose another --out "
                              "(nothing was overwritten)")
    ckpt = load_checkpoint(path, kind)
    saved = ckpt.get("args", {})
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v          # noqa: E731
    diff = [f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in RUN_KEYS[kind]
            if k in saved and norm(saved[k]) != norm(getattr(cfg, k, None))]
    if diff:
        raise ValueError(f"{path} was trained with other settings: {'; '.join(diff)}. Resume with the original "
                         "settings, or start a new run with another --out")
    if total_steps < ckpt["step"]:
        raise ValueError(f"{path} is at step {ckpt['step']}, beyond --{kind}-steps {total_steps}: pass "
                         f"--{kind}-steps {ckpt['step']} or more")
    finished = ckpt.get("finished") and ckpt["step"] == total_steps
    log(d, f"stage {kind}: {path} is finished, skipping" if finished else
           f"stage {kind}: resuming {path} at step {ckpt['step']}")
    return ckpt, finished


def finish_update(opt, scaler, terms, d, step, path, saved):
    """After the backward pass: clip at 1.0, average the logged terms over ranks, stop on a non-finite loss
    (naming the step and the kept checkpoint), step the optimiser. Returns the terms as floats."""
    scaler.unscale_(opt)
    gnorm = torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
    terms = {k: v.detach().float().mean() for k, v in terms.items()}
    vals = d.all_reduce_mean(torch.stack([*terms.values(), gnorm.float()])).tolist()
    terms, gnorm = dict(zip(terms, vals[:-1])), vals[-1]
    if not all(math.isfinite(v) for v in terms.values()) or not (math.isfinite(gnorm) or scaler.is_enabled()):
        kept = (f"the last good checkpoint {path} (step {saved}) is kept; --resume continues from it"
                if saved is not None else "no checkpoint of this run was written yet")
        desc = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        raise FloatingPointError(f"non-finite loss or gradient at step {step}: {desc}, grad norm {gnorm:.4g}; {kept}")
    scaler.step(opt)                                          # fp16: skipped when the scaled gradient overflowed
    scaler.update()
    return terms


def save_run(d, obj, path, modules, keep_every=0):
    """Write a training checkpoint atomically on rank 0, never with non-finite weights, plus a step-numbered
    snapshot (e.g. dit-0400000.pt) when the step is a multiple of keep_every; then, when a stop was requested,
    stop (stop_now)."""
    flags = [torch.isfinite(t).all() for m in modules for t in m.state_dict().values() if t.is_floating_point()]
    if not bool(torch.stack(flags).all()):
        raise FloatingPointError(f"the weights became non-finite before step {obj['step']} although the loss was "
                                 f"finite; {path} was not overwritten")
    if d.main:
        save_checkpoint(obj, path)
        if keep_every and obj["step"] % keep_every == 0:
            stem, ext = os.path.splitext(path)
            save_checkpoint(obj, f"{stem}-{obj['step']:07d}{ext}")
    d.barrier()
    if stop_requested(d):
        stop_now(d, f"stage {obj['kind']}: {path} saved at step {obj['step']}")


def settings(cfg):
    return {k: v for k, v in vars(cfg).items() if k != "explicit"}


# ----------------------------------------------------------------------------- stage 1: autoencoder

def vae_batch_randomness(cfg, step, B, latent_shape):
    """All random numbers of a stage-1 step for the global batch: flips, posterior noise, one DSM k per
    --dsm-group images (the authors draw one k per GPU batch), the EQ-VAE scale."""
    g = step_generator(cfg.seed, step, stream=1)
    flip = torch.rand(B, generator=g) < 0.5
    eps = torch.randn((B,) + tuple(latent_shape), generator=g)
    draws = torch.randint(len(sm.DSM_KS), (-(-B // cfg.dsm_group),), generator=g).tolist()
    ks = [sm.DSM_KS[draws[i // cfg.dsm_group]] if cfg.dsm else 0 for i in range(B)]
    use_eq, f = torch.rand(2, generator=g).tolist()
    return flip, eps, ks, (0.25 + 0.75 * f if use_eq < cfg.eq_prob else None)


def lr_at(updates, base, warmup):
    """The authors' constant_with_warmup: base * updates / warmup after `updates` earlier updates, then base."""
    return base if updates >= warmup else base * updates / warmup


def disc_updates_before(step, disc_start):
    """Discriminator updates made before `step`: the odd steps from disc_start on (the VAE takes the even)."""
    first = disc_start + (disc_start % 2 == 0)
    return max(0, (step - first + 1) // 2)


def train_vae(cfg, d):
    """Stage 1 (§3): the autoencoder with the cfg.reg regulariser, the authors' GAN schedule, then the latent
    statistics (a resumable step of their own, after the trained weights are saved)."""
    path = os.path.join(cfg.out, "vae.pt")
    lpips = sm.load_lpips(cfg.lpips_path, cfg.vgg_path).to(d.device) if cfg.lpips_weight > 0 else None
    ckpt, finished = resume_point(path, "vae", cfg, d, cfg.vae_steps)
    if finished:
        return path
    later = [f for f in ("latents", "dit.pt") if os.path.exists(os.path.join(cfg.out, f))]
    if cfg.stage == "all" and ckpt is not None and ckpt.get("finished") and later:   # before training on, not after
        raise ValueError(f"{path} is finished at step {ckpt['step']}; training it on to {cfg.vae_steps} would leave "
                         f"{' and '.join(later)} of {cfg.out} stale: remove them (they are made again), or train it "
                         "on in another --out (a copy of vae.pt)")
    ds = open_dataset(cfg, d)
    torch.manual_seed(cfg.seed)                                # a resumed run keeps the architecture it recorded
    vae = sm.build_vae(cfg.vae) if ckpt is None else sm.VAE(**ckpt["vae_config"], preset=ckpt["preset"])
    vae.check_size(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
    for name, s in (("image", cfg.image_size), ("latent", cfg.image_size // vae.factor)):
        if cfg.dsm and s % cfg.dsm_block:
            raise ValueError(f"DSM: the {name} size {s} is not divisible by --dsm-block {cfg.dsm_block}")
    vae = vae.to(d.device)
    disc = sm.PatchGAN().to(d.device)
    if d.group and d.device.type == "cuda":
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.999), weight_decay=0.005)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.9, 0.999), weight_decay=0.005)
    step, history, saved = 0, [], None
    if ckpt is not None:
        vae.load_state_dict(ckpt["model"]), disc.load_state_dict(ckpt["disc"])
        opt.load_state_dict(ckpt["opt"]), opt_d.load_state_dict(ckpt["opt_d"])
        step, history, saved = ckpt["step"], ckpt["history"], ckpt["step"]
    vae_ddp, disc_ddp = d.wrap(vae), d.wrap(disc)
    scaler, scaler_d = d.scaler(cfg.precision), d.scaler(cfg.precision)
    if ckpt is not None and ckpt.get("scaler"):                # fp16's loss scale, as it was
        scaler.load_state_dict(ckpt["scaler"]), scaler_d.load_state_dict(ckpt["scaler_d"])
    loader = make_loader(ds, cfg.vae_batch, d, cfg.seed, step, cfg.num_workers)
    latent_shape = (vae.latent_channels, cfg.image_size // vae.factor, cfg.image_size // vae.factor)
    vis = torch.stack([ds[i][0] for i in range(min(8, len(ds)))]).to(d.device)
    last = min(cfg.vae_steps, step + cfg.max_steps) if cfg.max_steps else cfg.vae_steps
    log(d, f"stage vae: global batch {cfg.vae_batch}, {cfg.vae_batch // d.world} per rank")
    bar = progress(d, step, cfg.vae_steps, "stage vae", "step")
    while step < last:
        flip, eps, ks, eq = vae_batch_randomness(cfg, step, cfg.vae_batch, latent_shape)
        x = next(loader)[0]
        x = torch.where(d.shard(flip).view(-1, 1, 1, 1), x.flip(-1), x).to(d.device)
        mean_k = float(np.mean(ks))                            # of the global batch, logged
        eps, ks = d.shard(eps).to(d.device), d.shard(ks)
        gan = step >= cfg.disc_start
        if not gan or step % 2 == 0:                           # the autoencoder's turn
            opt.param_groups[0]["lr"] = lr_at(step - disc_updates_before(step, cfg.disc_start), cfg.vae_lr, cfg.warmup)
            vae.train()
            with d.autocast(cfg.precision):
                terms = sm.stage1_loss(vae, x, eps, ks, vars(cfg), lpips, disc if gan else None, eq, forward=vae_ddp,
                                       reduce=d.all_reduce_mean, loss_scale=scaler.get_scale())
            opt.zero_grad()
            scaler.scale(terms["loss"]).backward()
            terms = finish_update(opt, scaler, terms, d, step, path, saved)
        else:                                                  # the discriminator's turn (odd steps)
            opt_d.param_groups[0]["lr"] = lr_at(disc_updates_before(step, cfg.disc_start), cfg.disc_lr, cfg.disc_warmup)
            with d.autocast(cfg.precision):
                loss = sm.discriminator_loss(vae, disc_ddp, x, eps, ks, cfg.dsm_block, eq)
            opt_d.zero_grad()
            scaler_d.scale(loss).backward()
            terms = finish_update(opt_d, scaler_d, {"disc": loss}, d, step, path, saved)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            history.append(dict(step=step, k=mean_k, **terms))
            bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()})
        if step % cfg.vis_every == 0 or step == cfg.vae_steps:
            vae_pictures(vae, vis, cfg, d)
        if step % cfg.ckpt_every == 0 or step == last or stop_requested(d):     # a stop: saved, then stopped
            ckpt = dict(kind="vae", preset=vae.preset, vae_config=vae.config, model=vae.state_dict(),
                        disc=disc.state_dict(), opt=opt.state_dict(), opt_d=opt_d.state_dict(), step=step,
                        scaler=scaler.state_dict(), scaler_d=scaler_d.state_dict(), finished=False,
                        args=settings(cfg), history=history, latent_norm=cfg.latent_norm)
            save_run(d, ckpt, path, (vae, disc), cfg.keep_every)
            saved = step
    bar.close()
    if step < cfg.vae_steps:                                   # a --max-steps slice ends resumable
        stop_now(d, f"stage vae: {path} saved at step {step} of {cfg.vae_steps}", "--max-steps")
    # trained: the latent statistics, then the finished checkpoint
    mean, std = latent_statistics(vae, ds, d, cfg.stats_samples, cfg.seed, cfg.latent_norm)
    vae.latent_mean.copy_(mean), vae.latent_std.copy_(std)
    save_run(d, dict(ckpt, model=vae.state_dict(), finished=True, args=settings(cfg)), path, (vae, disc))
    return path


@torch.no_grad()
def vae_pictures(vae, x, cfg, d):
    """Reconstruction grid (inputs over reconstructions) and the spectrum plot, on rank 0."""
    if not d.main:
        return
    vae.eval()
    mean, logvar = vae.encode(x)
    save_grid(np.concatenate([to_uint8(x), to_uint8(vae.decode(mean))]), os.path.join(cfg.out, "reconstructions.png"),
              len(x))
    rep = spectrum_report(x, vae.sample(mean, logvar), cfg.esm_delta, vae.esm_blur)
    plot_spectra(rep, os.path.join(cfg.out, "spectrum.png"), cfg.esm_delta)


@torch.no_grad()
def latent_statistics(vae, ds, d, num_images, seed, norm="scalar"):
    """Latent mean and std over a seeded uniform subset of num_images images, in closed form (sm.latent_moments),
    summed over ranks: one std for all channels (norm "scalar", the authors) or per channel ("channel")."""
    vae.eval()
    n = min(num_images, len(ds))
    idx = uniform_subset(len(ds), n, seed)[d.rank::d.world]
    acc = torch.zeros(3, vae.latent_channels, dtype=torch.float64, device=d.device)
    bar = progress(d, 0, len(idx), "latent statistics")
    for i in range(0, len(idx), 64):
        x = torch.stack([ds[j][0] for j in idx[i:i + 64]]).to(d.device)
        acc += sm.latent_moments(*vae.encode(x))
        bar.update(len(x))
    bar.close()
    mean, std = sm.latent_stats(d.all_reduce(acc), per_channel=norm == "channel")
    log(d, f"latent statistics ({norm}) over {n} images: mean {[round(v, 4) for v in mean.tolist()]}, "
           f"std {[round(v, 4) for v in std.tolist()]}")
    return mean, std


# ----------------------------------------------------------------------------- the autoencoder of a run

def load_vae(path, device="cpu", step=None):
    """The autoencoder of a finished 'vae' checkpoint, in eval mode, with its latent statistics; with `step`, refused
    when the checkpoint has trained on since (latents encoded at `step` would no longer match it)."""
    ckpt = load_checkpoint(path, "vae")
    if step is not None and ckpt["step"] != step:
        raise ValueError(f"latents were encoded with {path} at step {step}, which is now at step {ckpt['step']}: "
                         "re-encode them (remove the run's latents folder)")
    vae = sm.VAE(**ckpt["vae_config"], preset=ckpt.get("preset"))
    vae.load_state_dict(ckpt["model"])
    return vae.to(device).eval()


def vae_source(cfg, d, ds):
    """The record of the autoencoder that encodes a run's latents: our checkpoint (its path relative to the
    run folder, and its step), SD-VAE, or the authors' weights with their latent scale (computed from the
    data unless official_scale is given)."""
    if cfg.sd_vae:
        return dict(kind="sd", path=os.path.abspath(cfg.sd_vae), preset="f8d4")
    if cfg.official_vae:
        scale = cfg.official_scale
        if scale is None:
            vae = sm.load_official_vae(cfg.official_vae, cfg.vae, scale_factor=1.0).to(d.device)
            scale = 1.0 / float(latent_statistics(vae, ds, d, cfg.stats_samples, cfg.seed)[1][0])
        return dict(kind="official", path=os.path.abspath(cfg.official_vae), preset=cfg.vae, scale=scale)
    path = cfg.vae_ckpt or os.path.join(cfg.out, "vae.pt")
    ckpt = load_checkpoint(path, "vae")
    if not ckpt.get("finished"):
        raise ValueError(f"{path} is an unfinished stage-1 run (step {ckpt['step']} of "
                         f"{ckpt.get('args', {}).get('vae_steps', '?')}): finish it with --stage vae --resume first")
    trained = {k: ckpt["args"].get(k) for k in ("dataset", "image_size")}
    if trained != {k: getattr(cfg, k) for k in trained}:
        raise ValueError(f"{path} was trained on {trained['dataset']} at {trained['image_size']} px, but this run's "
                         f"recipe is {cfg.dataset} at {cfg.image_size} px: pass --dataset {trained['dataset']} (and "
                         f"its --data-path)")
    return dict(kind="ckpt", path=os.path.relpath(os.path.abspath(path), os.path.abspath(cfg.out)), step=ckpt["step"])


def vae_from_source(src, run_dir, device="cpu"):
    """The autoencoder a source record names (a checkpoint path relative to run_dir), with the statistics
    the latents were normalised with; refuses a checkpoint that has trained on since."""
    if src["kind"] == "sd":
        return sm.load_sd_vae(src["path"], src["preset"]).to(device).eval()
    if src["kind"] == "official":
        return sm.load_official_vae(src["path"], src["preset"], scale_factor=src["scale"]).to(device).eval()
    return load_vae(os.path.join(run_dir, src["path"]), device, src["step"])


# ----------------------------------------------------------------------------- latents

@torch.no_grad()
def encode_latents(cfg, d):
    """Encode the training set once, in float32, without flips (REPA): posterior (mean, std) of each image, labels
    and, for REPA, the uint8 images, as memory-mapped .npy files. meta.json, written last, marks them finished; an
    interrupted encoding starts again (it costs minutes on GPUs, a fraction of one DiT epoch)."""
    folder = os.path.join(cfg.out, "latents")
    meta_path = os.path.join(folder, "meta.json")
    data_settings = dict(dataset=cfg.dataset, image_size=cfg.image_size, dataset_size=cfg.dataset_size,
                         jpeg_quality=cfg.jpeg_quality)      # what defines the rows (a data path may move)
    if os.path.exists(meta_path):
        if not (cfg.resume or cfg.stage == "all"):
            raise FileExistsError(f"{meta_path} exists: pass --resume to reuse it or choose another --out")
        meta = read_json(meta_path)
        made = os.path.abspath(os.path.join(cfg.out, meta["vae"]["path"]))
        wanted = os.path.abspath(cfg.sd_vae or cfg.official_vae or cfg.vae_ckpt or os.path.join(cfg.out, "vae.pt"))
        recorded = dict({k: meta.get(k) for k in data_settings}, autoencoder=made)
        diff = [f"{k}: {recorded[k]!r} -> {v!r}" for k, v in dict(data_settings, autoencoder=wanted).items()
                if recorded[k] != v]
        if diff:
            raise ValueError(f"{folder} was encoded with other settings ({'; '.join(diff)}): remove it to encode "
                             "again, or choose another --out")
        vae_from_source(meta["vae"], cfg.out)                  # still the autoencoder it was made with
        log(d, f"stage latents: {folder} is finished, skipping")
        return folder
    ds = open_dataset(cfg, d)
    src = vae_source(cfg, d, ds)
    vae = vae_from_source(src, cfg.out, d.device)
    N, C, h = len(ds), vae.latent_channels, cfg.image_size // vae.factor
    with_images = cfg.repa_encoder != "none"
    files = dict(moments=((N, 2, C, h, h), np.float32), labels=((N,), np.int64))
    if with_images:
        files["images"] = ((N, cfg.image_size, cfg.image_size, 3), np.uint8)
    paths = {n: os.path.join(folder, n + ".npy") for n in files}
    rewritten = sum(os.path.getsize(p) for p in paths.values() if os.path.exists(p))   # of an interrupted encoding
    check_space(folder, sum(math.prod(shape) * np.dtype(t).itemsize for shape, t in files.values()) - rewritten)
    if d.main:
        for name, (shape, dtype) in files.items():
            np.lib.format.open_memmap(paths[name], "w+", dtype, shape).flush()
    d.barrier()
    arrays = {n: np.load(p, mmap_mode="r+") for n, p in paths.items()}
    idx = list(range(d.rank, N, d.world))
    bs = max(1, cfg.vae_batch // d.world)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=bs, num_workers=cfg.num_workers,
                                         worker_init_fn=_worker_init)
    common = -(-(N // d.world) // bs)                          # batches every rank has: the stop check is collective
    bar = progress(d, 0, N, "stage latents")
    for i, (x, y) in enumerate(loader):
        rows = idx[i * bs:(i + 1) * bs]
        x = x.to(d.device)
        mean, logvar = vae.encode(x)
        arrays["moments"][rows] = torch.stack([mean, torch.exp(0.5 * logvar)], 1).float().cpu().numpy()
        arrays["labels"][rows] = y.numpy()
        if with_images:
            arrays["images"][rows] = to_uint8(x)
        bar.update(len(x) * d.world)
        if i < common and stop_requested(d):
            stop_now(d, f"stage latents: {folder} is not finished and will be encoded again")
    bar.close()
    for a in arrays.values():
        a.flush()
    d.barrier()
    if d.main:                                                 # meta.json marks the stage finished
        write_json(dict(num_images=N, latent_shape=[C, h, h], vae=src, **data_settings, seed=cfg.seed,
                        data_path=cfg.data_path and os.path.abspath(cfg.data_path), has_images=with_images,
                        num_classes=ds.num_classes), meta_path)
    d.barrier()
    if stop_requested(d):
        stop_now(d, f"stage latents: {folder} finished")
    return folder


def check_space(folder, need):
    """Refuse up front when the folder's disk cannot hold `need` bytes."""
    os.makedirs(folder, exist_ok=True)
    free = __import__("shutil").disk_usage(folder).free
    if free < need:
        raise ValueError(f"no space left on {folder}: needed ~{need / 2**20:.0f} MB, {free / 2**20:.0f} MB free")


class LatentData(torch.utils.data.Dataset):
    """Rows of a latents folder: (posterior mean and std (2, C, h, w), label, image uint8 (H, W, 3) or 0)."""

    def __init__(self, folder, with_images):
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"no finished latents in {folder}: run --stage latents first")
        self.meta, self.folder, self.with_images, self.arrays = read_json(meta_path), folder, with_images, None
        if with_images and not self.meta["has_images"]:
            raise ValueError(f"{folder} was encoded without images, which REPA needs: rerun --stage latents with "
                             "--repa-encoder set")
        self.names = ["moments", "labels"] + (["images"] if with_images else [])
        for name in self.names:
            path = os.path.join(folder, name + ".npy")
            try:
                rows = len(np.load(path, mmap_mode="r"))
            except (OSError, ValueError, EOFError) as e:
                raise ValueError(f"{path} is not a readable array ({e}): re-encode (remove {folder})") from None
            if rows != self.meta["num_images"]:
                raise ValueError(f"{path} has {rows} rows, meta.json says {self.meta['num_images']}: re-encode "
                                 f"(remove {folder})")

    def __len__(self):
        return self.meta["num_images"]

    def __getitem__(self, i):
        if self.arrays is None:                                # opened lazily, once per worker
            self.arrays = {n: np.load(os.path.join(self.folder, n + ".npy"), mmap_mode="r") for n in self.names}
        img = torch.from_numpy(np.array(self.arrays["images"][i])) if self.with_images else 0
        return torch.from_numpy(np.array(self.arrays["moments"][i])), int(self.arrays["labels"][i]), img


# ----------------------------------------------------------------------------- stage 2: DiT

def dit_config(cfg, meta, enc_dim):
    """Constructor arguments of the DiT preset for these latents (the preset's sizes spelt out)."""
    C, h, _ = meta["latent_shape"]
    preset = sm.DiT_CONFIGS[cfg.model]
    depth = cfg.depth or preset["depth"]
    out = dict(depth=depth, hidden_size=cfg.width or preset["hidden_size"],
               num_heads=max(1, cfg.width // 64) if cfg.width else preset["num_heads"],
               encoder_depth=cfg.encoder_depth or (max(1, depth // 3) if cfg.depth else preset["encoder_depth"]),
               input_size=h, in_channels=C, num_classes=0 if cfg.unconditional else meta["num_classes"],
               class_dropout_prob=cfg.class_dropout, z_dims=[enc_dim] if enc_dim else [])
    if cfg.projector != "mlp":
        out.update(projector_type=cfg.projector, projector_kernel_size=cfg.projector_kernel)
    if cfg.qk_norm:
        out["qk_norm"] = True
    return out


def dit_batch_randomness(cfg, step, B, latent_shape):
    """All random numbers of a stage-2 step for the global batch: posterior noise, t, noise, label dropout."""
    g = step_generator(cfg.seed, step, stream=2)
    eps = torch.randn((B,) + tuple(latent_shape), generator=g)
    t = sm.sample_time(B, cfg.weighting, generator=g)
    noise = torch.randn((B,) + tuple(latent_shape), generator=g)
    drop = torch.rand(B, generator=g) < cfg.class_dropout
    return eps, t, noise, drop


def repa_targets(encoder, images, cfg, grid):
    """REPA target tokens (b, T, C) for uint8 images (b, H, W, 3)."""
    x = images.permute(0, 3, 1, 2)
    Z = sm.resize_token_grid(sm.encode_repa_target(encoder, x, x.shape[-1]), grid)
    return sm.repa_target(Z, cfg.repa_target, alpha=cfg.zscore_alpha, sigma1=cfg.dog_sigmas[0],
                          sigma2=cfg.dog_sigmas[1], grid_hw=grid)


def train_dit(cfg, d):
    """Stage 2 (§4): flow matching with REPA on the encoded latents, EMA, atomic checkpoints."""
    path = os.path.join(cfg.out, "dit.pt")
    data = LatentData(os.path.join(cfg.out, "latents"), cfg.repa_encoder != "none" and cfg.repa_lambda > 0)
    meta = data.meta
    if cfg.cfg_scale > 1 and not meta["num_classes"]:
        raise ValueError(f"--cfg-scale {cfg.cfg_scale} (guidance) needs class labels; {data.folder} has none (a flat "
                         "image folder): pass --cfg-scale 1")
    ckpt, finished = resume_point(path, "dit", cfg, d, cfg.dit_steps)
    if ckpt is not None and ckpt.get("vae") != meta["vae"]:    # a resume must not cross a re-encoding
        raise ValueError(f"{path} was trained on latents of {ckpt.get('vae')}, but {data.folder} now holds latents "
                         f"of {meta['vae']}: continue on the old latents, or start a new run with another --out")
    if finished:
        return path
    encoder = (sm.load_dinov2(cfg.repa_encoder, device=d.device, resolution=meta["image_size"])
               if data.with_images else None)
    vae = vae_from_source(meta["vae"], cfg.out, d.device)     # the one source of the latent statistics
    mcfg = dit_config(cfg, meta, encoder.embed_dim if encoder is not None else 0)
    log(d, f"latents {data.folder}: {len(data)} images, {meta['num_classes']} classes, shape "
           f"{tuple(meta['latent_shape'])}; {cfg.model} {mcfg}")
    torch.manual_seed(cfg.seed)
    model = sm.build_dit(cfg.model, **mcfg).to(d.device)
    model.grad_checkpointing = cfg.grad_checkpoint
    ema = sm.build_dit(cfg.model, **mcfg).to(d.device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.dit_lr, weight_decay=0.0)
    step, history, saved = 0, [], None
    if ckpt is not None:
        if ckpt["dit_config"] != mcfg:                         # e.g. latents of another class count, same autoencoder
            raise ValueError(f"{path} holds {ckpt['model_name']} {ckpt['dit_config']}, not {cfg.model} {mcfg}")
        model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["opt"])
        step, history, saved = ckpt["step"], ckpt["history"], ckpt["step"]
    runner = torch.compile(d.wrap(model)) if cfg.compile else d.wrap(model)
    scaler = d.scaler(cfg.precision)
    if ckpt is not None and ckpt.get("scaler"):                # fp16's loss scale, as it was
        scaler.load_state_dict(ckpt["scaler"])
    loader = make_loader(data, cfg.dit_batch, d, cfg.seed, step, cfg.num_workers)
    last = min(cfg.dit_steps, step + cfg.max_steps) if cfg.max_steps else cfg.dit_steps
    log(d, f"stage dit: global batch {cfg.dit_batch}, {cfg.dit_batch // d.world} per rank")
    bar = progress(d, step, cfg.dit_steps, "stage dit", "step")
    while step < last:
        mom, y, img = (v.to(d.device) for v in next(loader))
        eps, t, noise, drop = (d.shard(v).to(d.device) for v in
                               dit_batch_randomness(cfg, step, cfg.dit_batch, meta["latent_shape"]))
        z = vae.normalize(mom[:, 0] + mom[:, 1] * eps)         # posterior sample, normalised for stage 2
        y = y if model.num_classes else None
        with d.autocast(cfg.precision):
            targets = [repa_targets(encoder, img, cfg, model.grid_size)] if encoder else None
            terms = sm.flow_loss(runner, z, y, t=t, noise=noise, drop_ids=drop, repa_targets=targets,
                                 repa_lambda=cfg.repa_lambda)
        opt.zero_grad()
        scaler.scale(terms["loss"]).backward()
        terms.pop("t")                                         # per-sample times: not a logged term
        terms = finish_update(opt, scaler, terms, d, step, path, saved)
        sm.update_ema(ema, model, cfg.ema)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            history.append(dict(step=step, **terms))
            bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()})
        if step % cfg.vis_every == 0 or step == cfg.dit_steps:
            dit_pictures(ema, vae, meta, cfg, d)
        if step % cfg.ckpt_every == 0 or step == last or stop_requested(d):     # a stop: saved, then stopped
            save_run(d, dict(kind="dit", model_name=cfg.model, dit_config=mcfg, model=model.state_dict(),
                             ema=ema.state_dict(), opt=opt.state_dict(), scaler=scaler.state_dict(), step=step,
                             finished=step == cfg.dit_steps, args=settings(cfg), history=history, vae=meta["vae"],
                             latent_shape=meta["latent_shape"], image_size=meta["image_size"]), path, (model, ema),
                     cfg.keep_every)
            saved = step
    bar.close()
    if step < cfg.dit_steps:                                   # a --max-steps slice ends resumable
        stop_now(d, f"stage dit: {path} saved at step {step} of {cfg.dit_steps}", "--max-steps")
    if ckpt is not None and step == ckpt["step"] == cfg.dit_steps:   # resumed at exactly dit_steps: finish it
        dit_pictures(ema, vae, meta, cfg, d)
        save_run(d, dict(ckpt, finished=True, args=settings(cfg)), path, (model, ema))
    return path


@torch.no_grad()
def dit_pictures(ema, vae, meta, cfg, d):
    """16 EMA samples (Euler ODE, fixed noise, classes 0, 1, ...) as samples.png, on rank 0."""
    if not d.main:
        return
    noise = torch.randn((16, *meta["latent_shape"]), generator=torch.Generator().manual_seed(cfg.seed)).to(d.device)
    y = torch.arange(16, device=d.device) % ema.num_classes if ema.num_classes else None
    z = sm.sample_ode(ema, noise, y, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale)
    save_grid(to_uint8(vae.decode(vae.denormalize(z.float())).clamp(-1, 1)), os.path.join(cfg.out, "samples.png"), 8)


# ----------------------------------------------------------------------------- benchmark

def bench(cfg, d):
    """--bench: training steps of the stage on random data of the recipe's per-rank batch -> images/s and FLOPs per
    image and step, printed with, on CUDA, TFLOP/s and peak memory. FLOPs: forward + backward, counted by torch's
    FlopCounterMode in a warm-up step with attention in its math form (every device counts it). Stage 1 alternates
    the generator step (LPIPS: a random VGG offline, the same FLOPs; the GAN term) and the discriminator step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    if cfg.stage not in ("vae", "dit"):
        raise ValueError("--bench measures --stage vae or --stage dit")
    S, B = cfg.image_size, (cfg.vae_batch if cfg.stage == "vae" else cfg.dit_batch) // d.world
    vae = sm.build_vae(cfg.vae).to(d.device)
    h, enc = S // vae.factor, 768 if cfg.repa_encoder != "none" else 0
    x = torch.rand(B, 3, S, S, device=d.device) * 2 - 1
    if cfg.stage == "vae":                                      # [(module, loss function)] per turn
        lpips = sm.LPIPS().to(d.device).eval().requires_grad_(False) if cfg.lpips_weight else None
        disc = sm.PatchGAN().to(d.device)
        eps = torch.randn(B, vae.latent_channels, h, h, device=d.device)
        w = dict(vars(cfg), disc_weight=cfg.disc_weight or 0.5)
        name = f"{cfg.vae} + LPIPS + PatchGAN" if lpips else f"{cfg.vae} + PatchGAN"
        turns = [(vae, lambda: sm.stage1_loss(vae, x, eps, [8] * B, w, lpips, disc)["loss"]),
                 (disc, lambda: sm.discriminator_loss(vae, disc, x, eps, [8] * B, cfg.dsm_block))]
    else:
        model = sm.build_dit(cfg.model, **dit_config(cfg, dict(latent_shape=[vae.latent_channels, h, h],
                                                                 num_classes=1000), enc)).to(d.device)
        runner = torch.compile(model) if cfg.compile else model
        z = torch.randn(B, vae.latent_channels, h, h, device=d.device)
        y = torch.randint(0, 1000, (B,), device=d.device)
        tgt = [torch.randn(B, model.grid_size[0] * model.grid_size[1], enc, device=d.device)] if enc else None
        name, turns = cfg.model, [(model, lambda: sm.flow_loss(runner, z, y, repa_targets=tgt)["loss"])]
    cuda = d.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-5) for m, _ in turns]
    times, flops = [], 0
    for i in range(len(turns) * (3 + (20 if cuda else 3))):      # the first 3 of each turn are warm-up
        (_, loss_fn), opt, counted = turns[i % len(turns)], opts[i % len(turns)], i < len(turns)
        counter = FlopCounterMode(display=False) if counted else contextlib.nullcontext()
        math_sdpa = sdpa_kernel(SDPBackend.MATH) if counted else contextlib.nullcontext()
        sync()
        t = time.time()
        with counter, math_sdpa:                               # one context: it restarts its count on entry
            with d.autocast(cfg.precision):
                loss = loss_fn()
            opt.zero_grad()
            loss.backward()
        opt.step()
        sync()
        times.append(time.time() - t)
        flops += counter.get_total_flops() if counted else 0
    sec, flops = float(np.mean(times[3 * len(turns):])), flops / len(turns)    # per step (a batch)
    msg = (f"bench {cfg.stage} {name} {S}px batch {B} on {d.device}: {B / sec:.2f} images/s, "
           f"{flops / B / 1e9:.1f} GFLOPs per image per step")
    if cuda:
        msg += f", {flops / sec / 1e12:.1f} TFLOP/s, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    log(d, msg)
    return dict(images_per_s=B / sec, flops_per_image=flops / B)


# ----------------------------------------------------------------------------- the whole pipeline

def run(cfg, d, stages=("vae", "latents", "dit")):
    """Train the stages of a run in order; returns {stage: output path}."""
    lock_run_folder(cfg.out, d)
    steps = dict(vae=train_vae, latents=encode_latents, dit=train_dit)
    return {s: steps[s](cfg, d) for s in stages}


def run_all(cfg, d):
    """The whole method: stage 1, latents, stage 2, then samples and their metrics (metrics.json)."""
    import evaluate                                            # the only import of later scripts, here
    import sample
    t0 = time.time()
    if cfg.dataset != "deadleaves":                            # before hours of work: the metrics' held-out images,
        split_folder(cfg.data_path, "val")                     # and the class folders guidance needs
        if cfg.cfg_scale > 1 and not class_folders(split_folder(cfg.data_path, "train")):
            raise ValueError(f"--cfg-scale {cfg.cfg_scale} (guidance) needs class folders; {cfg.data_path} is flat")
    external = cfg.sd_vae or cfg.official_vae or cfg.vae_ckpt                # stage 1 is not this run's
    dit = run(cfg, d, ("latents", "dit") if external else ("vae", "latents", "dit"))["dit"]
    samples, made = os.path.join(cfg.out, "samples"), os.path.join(cfg.out, "samples", "images", "config.json")
    if d.main and os.path.exists(made):                        # samples of an earlier DiT of this run: kept aside
        old = read_json(made)
        if old.get("sha256") != sample.load(dit, "cpu")[2]["sha256"]:
            stem, i = f"{samples}-step{old.get('step')}-{str(old.get('sha256'))[:8]}", 1
            aside = stem
            while os.path.exists(aside):                       # kept aside before (the same DiT made again)
                i += 1
                aside = f"{stem}-{i}"
            os.replace(samples, aside)
            log(d, f"{samples} held samples of another DiT (step {old.get('step')}): moved to {aside}")
    d.barrier()
    sample.generate(dit, cfg.num_fid_samples, samples, d, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                    seed=cfg.seed)
    if d.main:
        metrics = evaluate.evaluate_run(cfg.out, d, cfg.data_path)
        log(d, f"done in {(time.time() - t0) / 60:.1f} min: {os.path.join(cfg.out, 'metrics.json')}\n"
               + json.dumps(metrics, indent=1))
    d.barrier()


def main(argv=None):
    cfg = get_args(argv)
    d = Dist()
    try:
        with stop_signals():
            log(d, describe(cfg))
            if cfg.bench:
                return bench(cfg, d)
            if cfg.stage == "all":
                return run_all(cfg, d)
            return run(cfg, d, (cfg.stage,))
    finally:
        traceback.clear_frames(sys.exc_info()[2])   # free a failed stage's DataLoader now: its workers ignore SIGTERM


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)   # bad input, not bugs


def cli(main_fn, name):
    """Run a script's main: user errors print one line `name: error: ...` and exit 2, as argparse does; the process
    group (under torchrun) is destroyed at the end."""
    try:
        main_fn()
    except USER_ERRORS as e:
        msg = str(e).strip()
        if msg.startswith("Caught "):                          # raised in a DataLoader worker: its own message
            msg = msg.splitlines()[-1].split(": ", 1)[-1]
        print(f"{name}: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.modules["train"] = sys.modules["__main__"]            # sample.py and evaluate.py share this module's stop flag
    cli(main, "train.py")
