"""
Train Spectrum Matching latent diffusion.

    python train.py                                   # quickstart: the whole pipeline on dead leaves, CPU
    torchrun --nproc_per_node=8 train.py --config imagenet --stage vae --data-path DIR
    torchrun --nproc_per_node=8 train.py --config imagenet --stage latents --data-path DIR
    torchrun --nproc_per_node=8 train.py --config imagenet --stage dit --model DiT-XL/2

Stages: vae (stage 1), latents (encode the dataset once), dit (stage 2), all (vae, latents, dit,
samples, metrics; each skipped when its finished output exists, resumed when interrupted), probe (the
diffusability probe of one autoencoder), compare (stage 1 and the probe per --reg preset and seed);
the last two are evaluate.py's run_probe and run_compare.

Defaults come from one named configuration (--config, listed in CONFIGS below); every flag overrides
it, and `--config NAME --help` prints the values that will really be used. The resolved configuration
is logged at start and stored in every checkpoint.

World-size invariance: every random number of a step (data order, flips, posterior noise, DSM k,
flow-matching t and noise, label dropout) is drawn for the *global* batch from a generator seeded
by (seed, step), and each rank takes its slice. The same step therefore sees the same samples and
noise on 1 or N processes (and with any --micro-batch), and a resume needs no RNG state.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import sm

# -----------------------------------------------------------------------------
# Named configurations: all defaults live here. `imagenet` is the published protocol (stage 1 from
# the authors' configs, stage 2 from REPA); `quickstart` is the whole method on 2 CPU cores in ~10 min.
CONFIGS = {}
CONFIGS["imagenet"] = dict(
    stage="all", out="runs/imagenet", seed=0, num_workers=4,
    dataset="imagenet", data_path=None, image_size=256, dataset_size=None, hflip=False,
    # stage 1: autoencoder (authors' f16d16; 8 GPUs x 16 images)
    vae="f16d16", reg="dsm", vae_batch=128, vae_steps=1_000_000, vae_lr=5e-5, warmup=2000,
    lpips_weight=0.5, disc_weight=0.5, disc_start=50_001, disc_lr=5e-5, disc_warmup=2000,
    esm_delta=1.0, dsm_block=8, dsm_group=16, latent_norm="scalar", stats_samples=200_000, official_scale=0.9515730,
    # stage 2: SiT-B/2 with REPA (REPA's B/2 setting)
    model="DiT-B/2", depth=None, width=None, dit_batch=256, dit_steps=400_000, dit_lr=1e-4, ema=0.9999,
    class_dropout=0.1, weighting="uniform", cos_weight=0.0, micro_batch=0, precision="fp32",
    repa_encoder="dinov2_vitb14", repa_target="dog", repa_lambda=None, zscore_alpha=0.6, dog_sigmas=(0.5, 2.0),
    projector="mlp", sample_steps=50, cfg_scale=1.0, num_fid_samples=50_000,
    log_every=100, ckpt_every=10_000, keep_every=50_000, vis_every=10_000,
    # diffusability probe / comparison (None: from --budget, see PROBE_BUDGETS)
    budget="short", seeds=(0, 1, 2), probe_images=None, probe_eval=None, probe_out=None,
)
CONFIGS["quickstart"] = dict(
    CONFIGS["imagenet"], out="runs/quickstart", dataset="deadleaves", image_size=32, dataset_size=4096,
    vae="tiny", reg="esm+dsm", vae_batch=32, vae_steps=600, vae_lr=1e-3, warmup=50, stats_samples=4096,
    dsm_group=8, num_workers=2,
    model="DiT-S/2", depth=6, width=256, dit_batch=64, dit_steps=1500, dit_lr=5e-4, ema=0.995,
    repa_encoder="none", weighting="lognormal", num_fid_samples=512,
    log_every=25, ckpt_every=250, keep_every=0, vis_every=500,
)
# The authors' other stage-1 recipes (their configs; ESM and DSM were trained separately)
CONFIGS["imagenet-kl"] = dict(CONFIGS["imagenet"], out="runs/imagenet-kl", reg="kl", vae_steps=600_000)   # SD-VAE
CONFIGS["celebahq"] = dict(CONFIGS["imagenet"], out="runs/celebahq", dataset="folder", reg="esm", vae_batch=48,
                           vae_steps=500_000, dsm_group=12, stats_samples=50_000)   # 4 GPUs x 12 images
CONFIGS["celebahq-dsm"] = dict(CONFIGS["celebahq"], out="runs/celebahq-dsm", reg="dsm")
# -----------------------------------------------------------------------------

REG_PRESETS = {  # stage-1 regularisers; every weight can be overridden by its flag
    "kl":      dict(kl_weight=1e-6, esm_weight=0.0, dsm=False, eq_prob=0.0),   # SD-VAE
    "esm":     dict(kl_weight=0.0, esm_weight=0.01, dsm=False, eq_prob=0.0),   # authors' ESM config
    "dsm":     dict(kl_weight=0.0, esm_weight=0.0, dsm=True, eq_prob=0.0),     # authors' DSM config
    "esm+dsm": dict(kl_weight=0.0, esm_weight=0.01, dsm=True, eq_prob=0.0),    # this project's combination
    "eq":      dict(kl_weight=1e-6, esm_weight=0.0, dsm=False, eq_prob=0.5),   # EQ-VAE baseline
}
# --budget: flag defaults of the diffusability probe and comparison (evaluate.run_probe / run_compare; their
# fixed constants are evaluate.PROBE_*). short: a compare run (stage 1 + probe) took ~5.5 min on 2 idle CPU
# cores, so 15 runs ~80 min (README); long: more
PROBE_BUDGETS = {
    "short": dict(vae_steps=300, dit_steps=500, probe_images=2048, probe_eval=512, sample_steps=25),
    "long": dict(vae_steps=600, dit_steps=3000, probe_images=4096, probe_eval=1024, sample_steps=50),
}
DSM_KS = (0, 8, 10, 12)

# settings that define a training run: a resume must not change them (steps may grow)
RUN_KEYS = {
    "vae": ("dataset", "data_path", "image_size", "dataset_size", "vae", "reg", "kl_weight", "esm_weight",
            "esm_delta", "dsm_block", "dsm_group", "eq_prob", "lpips_weight", "disc_weight", "disc_start", "disc_lr",
            "disc_warmup", "vae_batch", "vae_lr", "warmup", "seed", "latent_norm"),
    "dit": ("model", "depth", "width", "dit_batch", "dit_lr", "ema", "weighting", "cos_weight", "class_dropout",
            "unconditional", "repa_encoder", "repa_target", "zscore_alpha", "dog_sigmas", "projector", "qk_norm",
            "rmsnorm", "swiglu", "rope", "repa_lambda", "encoder_depth", "seed", "hflip"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the docstring as written and every flag's default under the chosen --config."""


def build_parser(defaults):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)

    def a(*names, **kw):
        kw.setdefault("help", "default: %(default)s")
        return p.add_argument(*names, **kw)
    a("--config", choices=list(CONFIGS), help="named configuration that sets the defaults (quickstart)")
    a("--stage", choices=["all", "vae", "latents", "dit", "probe", "compare"],
      help="all: the whole pipeline; probe: the diffusability probe of one autoencoder (--vae-ckpt or --sd-vae); "
           "compare: stage 1 and the probe for every --reg preset and --seeds, mean +- std")
    a("--out", help="run folder: checkpoints, latents, pictures, metrics")
    a("--seed", type=int)
    a("--resume", action="store_true", help="continue from the run folder's checkpoint")
    a("--bench", action="store_true", help="measure steps/s of the chosen stage and exit")
    a("--num-workers", type=int)
    # data
    a("--dataset", choices=["deadleaves", "imagenet", "folder"],
      help="imagenet: class subfolders (ImageFolder layout); folder: a flat folder of images")
    a("--data-path")
    a("--image-size", type=int)
    a("--dataset-size", type=int, help="number of dead-leaves images")
    a("--hflip", action=argparse.BooleanOptionalAction,
      help="random horizontal flips for the latents / REPA images (DiT's convention; REPA has none)")
    a("--scan-images", action="store_true", help="decode every image once before training and list the bad ones")
    a("--skip-bad-images", action="store_true",
      help="leave out images that cannot be decoded (logged) instead of stopping")
    # stage 1
    a("--vae", help=f"VAE preset: {', '.join(sm.VAE_CONFIGS)}")
    a("--reg", choices=list(REG_PRESETS), help="stage-1 regulariser preset (sets the weights below)")
    a("--kl-weight", type=float, help="default: from --reg")
    a("--esm-weight", type=float, help="default: from --reg")
    a("--esm-delta", type=float)
    a("--dsm-block", type=int)
    a("--dsm-group", type=int, help="images per DSM k draw (the authors: one draw per GPU batch of 16)")
    a("--eq-prob", type=float, help="default: from --reg")
    a("--lpips-weight", type=float)
    a("--lpips-path", help="LPIPS v0.1 vgg.pth (linear heads); default: torch hub cache or download")
    a("--vgg-path", help="torchvision VGG16 weights vgg16-397923af.pth; default: torch hub cache or download")
    a("--disc-weight", type=float)
    a("--disc-start", type=int, help="first step of the GAN phase (then VAE on even, discriminator on odd steps)")
    a("--disc-lr", type=float)
    a("--disc-warmup", type=int, help="discriminator lr warm-up, in discriminator updates")
    a("--vae-batch", type=int, help="global batch size")
    a("--vae-steps", type=int)
    a("--vae-lr", type=float)
    a("--warmup", type=int)
    a("--latent-norm", choices=["scalar", "channel"], help="one latent std for all channels (authors) or per channel")
    a("--stats-samples", type=int, help="images for the latent statistics")
    # latents / stage 2
    a("--vae-ckpt", help="stage-1 checkpoint (default: OUT/vae.pt)")
    a("--sd-vae", help="diffusers AutoencoderKL weights (sd-vae-ft-ema) instead of a stage-1 checkpoint")
    a("--official-vae", help="the authors' model.safetensors (or its folder) instead of a stage-1 checkpoint; its "
                             "preset is --vae and its latent scale --official-scale")
    a("--official-scale", type=float, help="the authors' latent scale (their configs/ldm_*.yaml: imagenet 0.9515730)")
    a("--model", help="DiT preset, e.g. DiT-B/2")
    a("--depth", type=int, help="override the preset's depth (small demos)")
    a("--width", type=int, help="override the preset's hidden size (small demos; 64 channels per head)")
    a("--dit-batch", type=int, help="global batch size")
    a("--dit-steps", type=int)
    a("--dit-lr", type=float)
    a("--ema", type=float, help="EMA decay")
    a("--weighting", choices=["uniform", "lognormal"])
    a("--cos-weight", type=float, help="LightningDiT velocity-direction loss weight")
    a("--class-dropout", type=float)
    a("--unconditional", action="store_true")
    a("--repa-encoder", help="dinov2_vitb14 (torch.hub), tiny (random, tests) or none")
    a("--repa-target", choices=["raw", "zscore", "dog"])
    a("--zscore-alpha", type=float, help="iREPA's alpha for --repa-target zscore")
    a("--dog-sigmas", type=float, nargs=2, help="REPA-DoG sigma1 sigma2 (tokens)")
    a("--projector", choices=["mlp", "conv"], help="REPA MLP or iREPA 3x3 conv projector")
    for opt in ("qk-norm", "rmsnorm", "swiglu", "rope"):
        a(f"--{opt}", action="store_true", help="LightningDiT option (off: REPA's SiT)")
    a("--repa-lambda", type=float, help="REPA loss weight; default: 0.5 (REPA, DoG), 1.0 with --repa-target zscore "
                                        "(iREPA's latent-diffusion config, which also uses --projector conv)")
    a("--encoder-depth", type=int)
    a("--compile", action="store_true")
    a("--grad-checkpoint", action="store_true", help="recompute DiT blocks in the backward pass (saves memory)")
    a("--micro-batch", type=int,
      help="images per forward on each rank; gradients are accumulated over the rank's share (0: no split). "
           "Equal to the unsplit step except in stage 1's GAN phase, where the adaptive weight and the "
           "discriminator's BatchNorm see one micro-batch at a time")
    a("--precision", choices=["fp32", "bf16"],
      help="encoding the latents and sampling: fp32 (TF32 allowed; REPA) or bf16 autocast on CUDA (training "
           "always uses bf16 autocast on CUDA)")
    a("--sample-steps", type=int)
    a("--cfg-scale", type=float)
    a("--num-fid-samples", type=int, help="samples for the final metrics of --stage all")
    # diffusability probe
    a("--budget", choices=list(PROBE_BUDGETS), help="probe / compare steps and image counts (PROBE_BUDGETS); "
                                                     "explicit flags override them")
    a("--seeds", type=int, nargs="+", help="--stage compare: seeds per preset")
    a("--probe-images", type=int, help="images encoded to train the probe's DiT (default: from --budget)")
    a("--probe-eval", type=int, help="held-out images for the probe's metrics, split in two halves (even)")
    a("--probe-out", help="probe folder (default OUT/probe-seed<seed>)")
    # logging
    a("--log-every", type=int)
    a("--ckpt-every", type=int)
    a("--keep-every", type=int, help="keep a step-numbered snapshot (dit-0400000.pt) every N steps (0: none)")
    a("--vis-every", type=int)
    a("--max-steps", type=int, help="stop after this many steps in this invocation (tests)")
    p.set_defaults(**defaults)
    return p


POSITIVE = ("image_size", "vae_batch", "vae_steps", "dit_batch", "dit_steps", "log_every", "ckpt_every",
            "vis_every", "stats_samples", "dataset_size", "sample_steps", "num_fid_samples", "dsm_block",
            "dsm_group", "depth", "width", "encoder_depth", "max_steps", "probe_images", "probe_eval")
NON_NEGATIVE = ("warmup", "disc_start", "disc_warmup", "keep_every", "micro_batch", "num_workers",
                "lpips_weight", "disc_weight", "kl_weight", "esm_weight", "repa_lambda", "cos_weight")


def get_args(argv=None):
    """Parse the command line over the chosen --config; validate every number; resolve the --reg weights."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", choices=list(CONFIGS), default="quickstart")
    config = pre.parse_known_args(argv)[0].config
    args = build_parser(CONFIGS[config]).parse_args(argv)
    args.config = config
    given = vars(build_parser({}).parse_args(argv))                         # no defaults: what the user typed
    args.explicit = sorted(k for k, v in given.items() if v not in (None, False) and k != "config")
    for k, v in REG_PRESETS[args.reg].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.repa_lambda is None:
        args.repa_lambda = 1.0 if args.repa_target == "zscore" else 0.5
    validate_args(args)
    return args


def validate_args(args):
    """One clear error for every setting that cannot work, before any work is done."""
    for k in POSITIVE:
        v = getattr(args, k, None)
        if v is not None and v < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be at least 1, got {v}")
    for k in NON_NEGATIVE:
        v = getattr(args, k, None)
        if v is not None and v < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 0, got {v}")
    for k in ("vae_lr", "dit_lr", "disc_lr"):
        if not getattr(args, k) > 0:
            raise ValueError(f"--{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    for k in ("ema", "class_dropout", "eq_prob"):
        if not 0 <= getattr(args, k) <= 1:
            raise ValueError(f"--{k.replace('_', '-')} must be in [0, 1], got {getattr(args, k)}")
    if args.vae not in sm.VAE_CONFIGS:
        raise ValueError(f"unknown VAE preset {args.vae!r}; choose from {', '.join(sm.VAE_CONFIGS)}")
    if args.model not in sm.DiT_MODELS:
        raise ValueError(f"unknown model {args.model!r}; choose from {', '.join(sm.DiT_MODELS)}")
    if args.repa_encoder not in ("none", "tiny") and not args.repa_encoder.startswith("dinov2_"):
        raise ValueError(f"unknown --repa-encoder {args.repa_encoder!r}: a DINOv2 hub name (dinov2_vitb14), "
                         "tiny or none")
    if args.dataset == "deadleaves" and args.data_path:
        raise ValueError(f"--data-path {args.data_path} is given but the dataset is deadleaves (procedural, no "
                         "files): pass --dataset imagenet (class subfolders) or --dataset folder (flat)")
    latents_from_stage1 = args.stage == "latents" and "dataset" not in args.explicit   # takes stage 1's dataset
    if args.dataset != "deadleaves" and not args.data_path and not latents_from_stage1 \
            and args.stage in ("all", "vae", "latents", "compare", "probe"):
        raise ValueError(f"--dataset {args.dataset} needs --data-path")
    if args.skip_bad_images and args.dataset == "deadleaves":
        raise ValueError("--skip-bad-images applies to image files (--dataset imagenet or folder)")
    if args.cfg_scale < 1 or (args.unconditional and args.cfg_scale != 1):
        raise ValueError(f"--cfg-scale must be >= 1 (1: no guidance), and 1 for an unconditional model; got "
                         f"{args.cfg_scale}")
    if args.probe_eval is not None and (args.probe_eval < 4 or args.probe_eval % 2):
        raise ValueError(f"--probe-eval must be even and at least 4 (two halves), got {args.probe_eval}")
    if any(s < 0 for s in args.seeds):
        raise ValueError(f"--seeds must be >= 0, got {list(args.seeds)}")


def check_output_folder(out):
    """Fail now, not after hours of earlier stages, when the run folder cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written: {e.strerror or e}") from None


def same_run(saved_args, args, stage, path):
    """Refuse to resume `path` with other training-defining settings than it was started with."""
    def norm(v):
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, str) and os.path.sep in v:
            return os.path.abspath(v)
        return v
    diff = [f"--{k.replace('_', '-')} {saved_args[k]!r} -> {getattr(args, k)!r}" for k in RUN_KEYS[stage]
            if k in saved_args and norm(saved_args[k]) != norm(getattr(args, k, None))]
    if diff:
        raise ValueError(f"{path} was trained with other settings: {'; '.join(diff)}. Resume with the original "
                         "settings, or start a new run with another --out")


# ----------------------------------------------------------------------------- distributed

class Dist:
    """Rank, world size and device; NCCL on CUDA, gloo on CPU, under torchrun."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def autocast(self, precision="bf16"):
        """bf16 autocast on CUDA when precision is 'bf16'; float32 (TF32 allowed) otherwise and on CPU."""
        if self.device.type == "cuda" and precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, t):
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def all_reduce_mean(self, t):
        """Average of t over ranks (a new tensor)."""
        return self.all_reduce(t.clone()) / self.world if self.world > 1 else t

    def all_gather_list(self, items):
        """Concatenation of every rank's Python list, in rank order."""
        if self.world == 1:
            return list(items)
        out = [None] * self.world
        dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def shard(self, t):
        """This rank's slice of a global-batch tensor."""
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def wrap(self, model):
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.local_rank] if self.device.type == "cuda"
                                                   else None)


def micro_batches(n, micro):
    """Slices that split this rank's n images into micro-batches of at most `micro` (0: one slice)."""
    micro = micro or n
    return [slice(i, min(i + micro, n)) for i in range(0, n, micro)]


def accumulation(runner, n, micro):
    """(slice, weight, context) per micro-batch: gradients of weight * mean-loss add up to the full-batch mean;
    DDP synchronises only on the last micro-batch."""
    parts = micro_batches(n, micro)
    no_sync = getattr(runner, "no_sync", None)
    for j, s in enumerate(parts):
        last = j == len(parts) - 1
        yield s, (s.stop - s.start) / n, (contextlib.nullcontext() if last or no_sync is None else no_sync())


def step_generator(seed, step, stream=0):
    """CPU generator for one step's global random numbers, identical on every rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def crash_point(where, step):
    """Fault injection for the crash tests: SIGKILL this process when SM_CRASH_AT == f"{where}:{step}"."""
    if os.environ.get("SM_CRASH_AT") == f"{where}:{step}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def log(d, *msg):
    if d.main:
        print(*msg, flush=True)


def tqdm_bar(d, start, total, desc):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=desc, disable=not d.main, dynamic_ncols=True)


def log_configuration(d, args, stage):
    """The resolved settings of this run, once at start (what --help would show, after every override)."""
    import textwrap
    given = f" (overridden: {', '.join(args.explicit)})" if args.explicit else ""
    body = " ".join(f"{k}={v}" for k, v in vars(args).items() if k != "explicit")
    log(d, f"stage {stage}: config {args.config}{given}\n" + textwrap.fill(body, 118, initial_indent="  ",
                                                                           subsequent_indent="  "))


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


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".jpx")


def to_rgb(im):
    """Any Pillow image -> 8-bit RGB. 16-bit and 32-bit integer greyscale are rescaled (v / 257) instead of
    clipped at 255; float images in [0, 1] are scaled by 255; alpha is dropped (as torchvision and ADM)."""
    from PIL import Image
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0                                          # 65535 -> 255
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(a[..., None], 3, axis=2))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def read_rgb(path):
    """Decode an image file to an RGB PIL image; the error names the file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def load_image(path, image_size):
    """Read an image file, center-cropped to (image_size, image_size, 3) uint8."""
    return center_crop_arr(read_rgb(path), image_size)


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def image_files(folder):
    """Every image file in folder and its subfolders, hidden files and folders skipped, in sorted path order."""
    found = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]       # pruned while walking
        found.append((dirpath, sorted(n for n in names if _is_image(n))))
    return [os.path.join(dirpath, n) for dirpath, names in sorted(found) for n in names]


def _images_in(folder):
    return sorted(n for n in os.listdir(folder) if _is_image(n))


class ImageFiles(torch.utils.data.Dataset):
    """Images from class subfolders (`imagenet`, ImageFolder order) or a flat folder (`folder`, label 0).

    skip_bad: an image that cannot be decoded is logged once and replaced by the next index's image
    (deterministic, so every rank and world size sees the same batch); drop() removes known-bad files.
    """

    def __init__(self, root, image_size, classes=True, skip_bad=False, recursive=False):
        if root is None or not os.path.isdir(root):
            raise FileNotFoundError(f"dataset folder not found: {root} (pass --data-path)")
        self.root, self.image_size, self.skip_bad, self.files, self.labels = root, image_size, skip_bad, [], []
        subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        top = _images_in(root)
        if classes:
            if not subdirs:
                raise ValueError(f"{root} has no class subfolders: --dataset imagenet expects ROOT/CLASS/IMAGE "
                                 f"(ImageFolder layout)" + (f"; it holds {len(top)} images directly, use "
                                                            "--dataset folder for a flat folder" if top else ""))
            if top:
                raise ValueError(f"{root} mixes {len(top)} images with {len(subdirs)} subfolders: --dataset imagenet "
                                 "expects only class subfolders (ROOT/CLASS/IMAGE), --dataset folder only images")
            self.classes, empty = subdirs, []
            for i, c in enumerate(self.classes):
                n0 = len(self.files)
                self.files += image_files(os.path.join(root, c))
                self.labels += [i] * (len(self.files) - n0)
                if len(self.files) == n0:
                    empty.append(c)
            if empty:
                raise ValueError(f"{len(empty)} class folders of {root} hold no images ({', '.join(empty[:5])}"
                                 f"{', ...' if len(empty) > 5 else ''}): remove them or fix the layout")
        else:
            self.classes = []
            self.files = image_files(root) if recursive else [os.path.join(root, n) for n in top]
            self.labels = [0] * len(self.files)
            if not self.files and subdirs and not recursive:
                raise ValueError(f"{root} has no images at its top level but {len(subdirs)} subfolders: for class "
                                 "subfolders use --dataset imagenet")
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found in {root}")
        self.num_classes = len(self.classes)
        self._warned = set()

    def __len__(self):
        return len(self.files)

    def drop(self, bad):
        """Remove the files in `bad` (paths) from the dataset."""
        bad = set(bad)
        self.select([i for i, f in enumerate(self.files) if f not in bad])

    def select(self, indices):
        """Keep only the files at these indices, in this order."""
        self.files, self.labels = [self.files[i] for i in indices], [self.labels[i] for i in indices]

    def __getitem__(self, i):
        for j in range(len(self.files)):
            k = (i + j) % len(self.files)
            try:
                img = load_image(self.files[k], self.image_size)
            except ValueError as e:
                if not self.skip_bad:
                    raise
                if k not in self._warned:
                    self._warned.add(k)
                    print(f"warning: skipping {e}", file=sys.stderr, flush=True)
                continue
            return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0, self.labels[k]
        raise ValueError(f"no image of {self.root} can be decoded")


def build_dataset(name, path=None, image_size=256, train=True, seed=0, length=None, skip_bad=False, subset=None):
    """Dataset of (image in [-1, 1] (3, H, W), label). train=False draws dead leaves from another seed and
    ImageNet's val/ split. subset=(start, count): image files at positions start.. of a permutation seeded by
    `seed` (disjoint subsets of one folder for the probe)."""
    if name == "deadleaves":
        ds = sm.DeadLeaves(length or 4096, image_size, seed=seed if train else seed + 10_000)
        ds.num_classes = 10
        return ds
    if name in ("imagenet", "folder"):
        if name == "imagenet" and path is not None and os.path.isdir(os.path.join(path, "train" if train else "val")):
            path = os.path.join(path, "train" if train else "val")
        ds = ImageFiles(path, image_size, classes=name == "imagenet", skip_bad=skip_bad)
        if subset is not None:
            start, count = subset
            if start + count > len(ds):
                raise ValueError(f"{path} has {len(ds)} images; {start + count} are needed here")
            ds.select(torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[start:start + count]
                      .tolist())
        return ds
    raise ValueError(f"unknown dataset {name!r}; choose deadleaves, imagenet or folder")


def open_dataset(args, d, train=True):
    """The training dataset of these settings, scanned first with --scan-images, and described in the log."""
    ds = build_dataset(args.dataset, args.data_path, args.image_size, train, args.seed, args.dataset_size,
                       args.skip_bad_images, getattr(args, "subset", None))
    if args.scan_images and isinstance(ds, ImageFiles):
        bad, mine = [], range(d.rank, len(ds.files), d.world)
        bar = tqdm_bar(d, 0, len(mine), "scanning images")
        for i in mine:
            try:
                read_rgb(ds.files[i])
            except ValueError as e:
                bad.append((ds.files[i], str(e)))
            bar.update(1)
        bar.close()
        bad = d.all_gather_list(bad)
        if bad and not args.skip_bad_images:
            raise ValueError(f"{len(bad)} of {len(ds.files)} images cannot be decoded, e.g. "
                             + "; ".join(m for _, m in bad[:5]) + ". Fix them or pass --skip-bad-images")
        if bad:
            ds.drop([f for f, _ in bad])
            log(d, f"--skip-bad-images: left out {len(bad)} images that cannot be decoded: "
                   + ", ".join(f for f, _ in bad[:10]))
    where = f" at {ds.root}" if isinstance(ds, ImageFiles) else " (procedural)"
    log(d, f"dataset {args.dataset}{where}: {len(ds)} images, {getattr(ds, 'num_classes', 0)} classes, "
           f"{args.image_size} px")
    return ds


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's indices for steps start..: the global batch of step s is positions s*B..(s+1)*B-1 of
    a stream of per-epoch permutations seeded by (seed, epoch), whatever the number of ranks."""

    def __init__(self, n, global_batch, d, seed, start_step=0):
        if global_batch % d.world:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {d.world}")
        self.n, self.B, self.d, self.seed, self.start = n, global_batch, d, seed, start_step
        self.local = global_batch // d.world

    def __iter__(self):
        step, perm, epoch = self.start, None, -1
        while True:
            lo = step * self.B + self.d.rank * self.local
            for p in range(lo, lo + self.local):
                if p // self.n != epoch:
                    epoch = p // self.n
                    perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
                yield int(perm[p % self.n])
            step += 1


def make_loader(ds, global_batch, d, seed, start_step, num_workers):
    sampler = GlobalBatchSampler(len(ds), global_batch, d, seed, start_step)
    return iter(torch.utils.data.DataLoader(ds, batch_size=global_batch // d.world, sampler=sampler,
                                            num_workers=num_workers, pin_memory=d.device.type == "cuda",
                                            persistent_workers=num_workers > 0))


# ----------------------------------------------------------------------------- pictures

def to_uint8(x):
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, ncol=8):
    """Save uint8 images (N, H, W, 3) as one PNG grid with 2-pixel gaps."""
    from PIL import Image
    n, h, w, _ = images.shape
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + 2) + 2, min(n, ncol) * (w + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = im
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)


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
    for v, color in series.values():
        v = np.asarray(v, float)
        xs = L + np.arange(len(v)) / max(len(v) - 1, 1) * (W - R - L)
        ys = H - B - (v - lo) / (hi - lo) * (H - T - B)
        dr.line(list(zip(xs.tolist(), ys.tolist())), fill=color, width=2)
    for i, (name, (_, color)) in enumerate(series.items()):
        dr.line([W - R + 10, T + 10 + 18 * i, W - R + 30, T + 10 + 18 * i], fill=color, width=3)
        dr.text((W - R + 35, T + 4 + 18 * i), name, fill="black")
    dr.text((L, 12), title, fill="black")
    dr.text((L, H - B + 8), f"{xlabel}", fill="black")
    dr.text((4, T), f"{hi:.3g}", fill="black")
    dr.text((4, H - B - 10), f"{lo:.3g}", fill="black")
    dr.text((4, (T + H - B) // 2), ylabel, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path)


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

def code_version():
    """git commit of this project ('+dirty' with uncommitted changes to tracked files), else 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        run = functools.partial(subprocess.run, cwd=here, capture_output=True, text=True, timeout=10)
        head = run(["git", "rev-parse", "HEAD"])
        if head.returncode != 0:
            return "unknown"
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_write(path, write, binary=True, before_replace=None):
    """write(f) into a temporary file beside `path`, fsync, then rename it over `path`: a crash at any point
    leaves the old file or the new one, never a torn file. before_replace(tmp) runs before the rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)                                      # as open() would, not mkstemp's 0600
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(obj, path, before_replace=None):
    """torch.save(obj) to path atomically (see atomic_write), removing the temporaries of a killed writer."""
    folder, name = os.path.split(os.path.abspath(path))
    for old in os.listdir(folder) if os.path.isdir(folder) else []:
        if old.startswith(name + ".") and old.endswith(".tmp"):
            os.remove(os.path.join(folder, old))
    atomic_write(path, lambda f: torch.save(obj, f), before_replace=before_replace)


def _json_default(v):
    """Tensors, arrays, numpy scalars and paths as JSON values."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def write_json(obj, path):
    """Write JSON atomically (tensors and arrays as lists)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=_json_default) + "\n"), binary=False)


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
    vae = sm.VAE(**ckpt["vae_config"], preset=ckpt.get("preset"))
    vae.load_state_dict(ckpt["model"])
    vae.esm_delta = ckpt.get("args", {}).get("esm_delta", 1.0)
    vae.latent_norm = ckpt.get("latent_norm", "channel")
    return vae.eval()


def checkpoint_state(d, step, **parts):
    return dict(step=step, rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                                    cuda=torch.cuda.get_rng_state_all() if d.device.type == "cuda" else None),
                **parts)


def host_values(terms, gnorm, d):
    """Loss terms of the global batch (averaged over ranks) and the gradient norm as Python floats, with a
    single device sync."""
    vals = d.all_reduce_mean(torch.stack([v.detach().float().reshape(()) for v in terms.values()] +
                                         [gnorm.float()])).tolist()
    return dict(zip(terms, vals[:-1])), vals[-1]


def kept(path, saved_step):
    """What a failure message truthfully says about the run's checkpoint."""
    if saved_step is None:
        return "no checkpoint of this run was written yet"
    return f"the last good checkpoint {path} (step {saved_step}) is kept; --resume continues from it"


def check_finite(step, terms, gnorm, kept_msg):
    """Stop with a message naming the step and the loss terms when training diverged."""
    if not math.isfinite(gnorm) or not all(math.isfinite(v) for v in terms.values()):
        desc = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        raise FloatingPointError(f"non-finite loss or gradient at step {step}: {desc}, grad norm {gnorm:.4g}; "
                                 f"{kept_msg}")


def all_finite(*modules):
    """True when every floating-point parameter and buffer is finite (one device sync)."""
    flags = [torch.isfinite(t).all() for m in modules for t in m.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all())


def save_run(d, obj, path, modules, kept_msg, keep_every=0):
    """Write a training checkpoint atomically (rank 0), never with non-finite weights, plus a step-numbered
    snapshot (e.g. dit-0400000.pt) when the step is a multiple of keep_every."""
    step = obj["step"]
    if not all_finite(*modules):                               # every rank checks its own (identical) copy
        raise FloatingPointError(f"the weights became non-finite before step {step} although the loss was finite; "
                                 f"{kept_msg}")
    if d.main:
        obj["args"] = {k: v for k, v in obj["args"].items() if k != "explicit"}
        save_checkpoint(obj, path, before_replace=lambda tmp: crash_point("checkpoint", step))
        if keep_every and step % keep_every == 0:
            stem, ext = os.path.splitext(path)
            save_checkpoint(obj, f"{stem}-{step:07d}{ext}")
    d.barrier()


def prepare_output(path, resume):
    """Refuse to overwrite a finished or unfinished run unless --resume is given."""
    if os.path.exists(path) and not resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue it, or choose another --out "
                              f"(nothing was overwritten)")


def is_finished(ckpt, total_steps, path, d):
    """True (and said) when the checkpoint is a finished run of exactly total_steps."""
    done = ckpt is not None and ckpt.get("finished") and ckpt["step"] == total_steps
    if done:
        log(d, f"stage {ckpt['kind']}: {path} is finished, skipping")
    return bool(done)


def resume_point(path, kind, args, d, total_steps, quickstart=False):
    """The checkpoint to continue (None: start afresh), after checking it belongs to this run.

    A finished run is skipped when total_steps equals its step, and extended when total_steps is larger.
    """
    prepare_output(path, args.resume or quickstart)
    if not os.path.exists(path):
        if args.resume:
            log(d, f"stage {kind}: --resume, but there is no {path} yet: starting a new run")
        return None
    ckpt = load_checkpoint(path, kind)
    same_run(ckpt.get("args", {}), args, kind, path)
    if total_steps < ckpt["step"]:
        raise ValueError(f"{path} is at step {ckpt['step']}, beyond --{kind}-steps {total_steps}: pass "
                         f"--{kind}-steps {ckpt['step']} or more")
    return ckpt


# ----------------------------------------------------------------------------- stage 1: VAE

def dsm_runs(ks):
    """[(start, end, k)] runs of equal DSM k in a per-image list."""
    runs, start = [], 0
    for i in range(1, len(ks) + 1):
        if i == len(ks) or ks[i] != ks[start]:
            runs.append((start, i, ks[start]))
            start = i
    return runs


class VAEStep(nn.Module):
    """One stage-1 forward: encode, sample, DSM mask / EQ scaling, decode (wrapped in DDP)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, eps, ks, block, eq_factor, eq_min_size=1):
        mean, logvar = self.vae.encode(x)
        z = self.vae.sample(mean, logvar, eps)
        masked = [sm.dsm_mask(x[a:b], z[a:b], k, block) for a, b, k in dsm_runs(ks)]   # k = 0: unchanged
        target, z_in = (torch.cat(t) for t in zip(*masked))
        if eq_factor is not None:
            target, z_in = sm.eq_vae_scale(target, z_in, eq_factor, self.vae.factor, eq_min_size)
        return self.vae.decode(z_in), target, mean, logvar, z


def vae_batch_randomness(args, step, B, latent_shape):
    """All random numbers of a stage-1 step for the global batch: flips, posterior noise, one DSM k per group
    of --dsm-group images (the authors draw one k per GPU batch), the EQ-VAE scale."""
    g = step_generator(args.seed, step, stream=1)
    flip = torch.rand(B, generator=g) < 0.5
    eps = torch.randn((B,) + latent_shape, generator=g)
    groups = -(-B // args.dsm_group)
    draws = torch.randint(len(DSM_KS), (groups,), generator=g).tolist()
    ks = [DSM_KS[draws[i // args.dsm_group]] if args.dsm else 0 for i in range(B)]
    use_eq, f = torch.rand(2, generator=g).tolist()
    eq = 0.25 + 0.75 * f if use_eq < args.eq_prob else None
    return flip, eps, ks, eq


def vae_batch(x, args, step, latent_shape, d):
    """This rank's images (flipped), posterior noise and DSM k for `step`: its slice of the global batch."""
    flip, eps, ks, eq = vae_batch_randomness(args, step, args.vae_batch, latent_shape)
    x = torch.where(d.shard(flip).view(-1, 1, 1, 1), x.flip(-1), x).to(d.device, non_blocking=True)
    return x, d.shard(eps).to(d.device), ks[d.rank * len(x):(d.rank + 1) * len(x)], eq


def lr_at(updates, base, warmup):
    """The authors' constant_with_warmup: base * updates / warmup after `updates` earlier updates, then base."""
    return base * min(1.0, updates / max(1, warmup))


def generator_turn(step, disc_start):
    """The authors' schedule: the VAE every step before disc_start, then on even steps (discriminator on odd)."""
    return step < disc_start or step % 2 == 0


def disc_updates_before(step, disc_start):
    """Number of discriminator updates made before `step` (odd steps from disc_start on)."""
    first = disc_start + (disc_start % 2 == 0)                 # first odd step >= disc_start
    return max(0, (step - first + 1) // 2)


def generator_updates_before(step, disc_start):
    """Number of VAE updates made before `step`."""
    return step - disc_updates_before(step, disc_start)


def vae_losses(runner, vae, disc, lpips, x, eps, ks, eq, args, step, d):
    """Stage-1 generator objective: L1 + LPIPS on the (DSM-masked) image, KL, ESM (§3.2), adaptive GAN."""
    eq_min = 32 if lpips is not None or step >= args.disc_start else 1    # LPIPS / PatchGAN input size
    rec, target, mean, logvar, z = runner(x, eps, ks, args.dsm_block, eq, eq_min)
    rec, target = rec.float(), target.float()
    terms = {"l1": (rec - target).abs().mean()}
    if lpips is not None:
        terms["lpips"] = lpips(rec, target).mean()
    rec_loss = terms["l1"] + args.lpips_weight * terms.get("lpips", 0.0)
    loss = rec_loss
    if args.kl_weight > 0:
        terms["kl"] = sm.kl_loss(mean.float(), logvar.float())
        loss = loss + args.kl_weight * terms["kl"]
    if args.esm_weight > 0:
        terms["esm"] = sm.esm_loss(x, z, delta=args.esm_delta, blur_sigma=vae.esm_blur)
        loss = loss + args.esm_weight * terms["esm"]
    if step >= args.disc_start:                                # generator side: D frozen, outside DDP
        disc.requires_grad_(False)
        terms["gan"] = -disc(rec).mean()
        disc.requires_grad_(True)
        terms["gan_weight"] = sm.adaptive_gan_weight(rec_loss, terms["gan"], vae.decoder.conv_out.weight,
                                                     args.disc_weight, reduce=d.all_reduce_mean)
        loss = loss + terms["gan_weight"] * terms["gan"]
    terms["loss"] = loss
    return terms


def averaged(parts):
    """Weighted sum of the micro-batches' loss terms (each a mean over its images)."""
    return {k: sum(w * t[k].detach() for w, t in parts) for k in parts[0][1]}


def vae_generator_step(runner, vae, disc, lpips, opt, x, eps, ks, eq, args, step, d, kept_msg):
    """One VAE update on this rank's images, accumulated over --micro-batch slices."""
    for gr in opt.param_groups:
        gr["lr"] = lr_at(generator_updates_before(step, args.disc_start), args.vae_lr, args.warmup)
    vae.train()
    opt.zero_grad(set_to_none=True)
    parts = []
    for s, w, ctx in accumulation(runner, len(x), args.micro_batch):
        with ctx:
            with d.autocast():
                terms = vae_losses(runner, vae, disc, lpips, x[s], eps[s], ks[s], eq, args, step, d)
            (w * terms["loss"]).backward()
        parts.append((w, terms))
    gnorm = torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    terms, gnorm = host_values(averaged(parts), gnorm, d)
    check_finite(step, terms, gnorm, kept_msg)
    opt.step()
    return terms


def discriminator_step(vae_step, disc_ddp, disc, opt_d, x, eps, ks, eq, args, step, d, kept_msg):
    """One discriminator update (odd steps of the GAN phase): hinge loss, the masked image is "real"."""
    for gr in opt_d.param_groups:                              # linear warm-up counted in discriminator updates
        gr["lr"] = lr_at(disc_updates_before(step, args.disc_start), args.disc_lr, args.disc_warmup)
    disc.train()
    opt_d.zero_grad(set_to_none=True)
    parts = []
    for s, w, ctx in accumulation(disc_ddp, len(x), args.micro_batch):
        with torch.no_grad(), d.autocast():
            rec, target, *_ = vae_step(x[s], eps[s], ks[s], args.dsm_block, eq, 32)
        with ctx:
            with d.autocast():
                d_loss = sm.hinge_d_loss(disc_ddp(target.float()), disc_ddp(rec.float()))
            (w * d_loss).backward()
        parts.append((w, {"disc": d_loss}))
    gnorm = torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
    terms, gnorm = host_values(averaged(parts), gnorm, d)
    check_finite(step, terms, gnorm, kept_msg)
    opt_d.step()
    return terms


def load_lpips_or_none(args, d):
    """LPIPS-VGG when --lpips-weight > 0 (its weights were found by preflight)."""
    return sm.load_lpips(args.lpips_path, args.vgg_path).to(d.device) if args.lpips_weight > 0 else None


def resolve_lpips(args, d):
    """Before any checkpoint is compared or written: with the LPIPS / VGG weights offline, the quickstart
    config trains without LPIPS (said, and recorded as --lpips-weight 0, so a rerun resumes); any other config
    stops with the message that says how to provide them."""
    if args.lpips_weight <= 0:
        return
    try:
        sm.lpips_files(args.lpips_path, args.vgg_path)
    except (RuntimeError, FileNotFoundError) as e:
        if args.config != "quickstart" or "lpips_weight" in args.explicit:
            raise RuntimeError(f"{e}. Or pass --lpips-weight 0 to train without LPIPS.") from None
        log(d, f"quickstart: LPIPS weights unavailable, training with --lpips-weight 0 ({e})")
        args.lpips_weight = 0.0


def check_vae_sizes(vae, args):
    vae.check_size(torch.zeros(1, 3, args.image_size, args.image_size))
    if args.dsm:
        for name, s in (("image", args.image_size), ("latent", args.image_size // vae.factor)):
            if s % args.dsm_block:
                raise ValueError(f"DSM: the {name} size {s} is not divisible by --dsm-block {args.dsm_block}")


def vae_state(args, d, ckpt, out):
    """VAE, discriminator and their optimisers (the authors' AdamW), restored from ckpt when resuming; a resumed
    run keeps the architecture it recorded."""
    torch.manual_seed(args.seed)
    vae = sm.build_vae(args.vae) if ckpt is None else sm.VAE(**ckpt["vae_config"], preset=ckpt["preset"])
    vae = vae.to(d.device)
    check_vae_sizes(vae, args)
    disc = sm.PatchGAN().to(d.device)
    if d.world > 1 and d.device.type == "cuda":
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.999), weight_decay=0.005)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, betas=(0.9, 0.999), weight_decay=0.005)
    if ckpt is None:
        return vae, disc, opt, opt_d, 0, []
    vae.load_state_dict(ckpt["model"]), disc.load_state_dict(ckpt["disc"])
    opt.load_state_dict(ckpt["opt"]), opt_d.load_state_dict(ckpt["opt_d"])
    log(d, f"stage vae: resuming {out} at step {ckpt['step']}")
    return vae, disc, opt, opt_d, ckpt["step"], ckpt["history"]


def log_batch(d, global_batch, micro):
    local = global_batch // d.world
    log(d, f"batch: global {global_batch}, per rank {local}, micro-batch {micro or local}, "
           f"{len(micro_batches(local, micro))} accumulation steps")


def show_progress(bar, d, terms, step, s0, t0):
    """Loss terms and steps/s in the rank-0 progress bar."""
    if d.main:
        bar.set_postfix({**{k: f"{v:.4f}" for k, v in terms.items()},
                         "steps/s": f"{(step - s0) / (time.time() - t0):.2f}"})


def train_vae(args, d, quickstart=False):
    """Stage 1 (§3): the autoencoder with the --reg regulariser, the authors' GAN schedule, atomic checkpoints."""
    out = os.path.join(args.out, "vae.pt")
    ckpt = resume_point(out, "vae", args, d, args.vae_steps, quickstart)
    if is_finished(ckpt, args.vae_steps, out, d):
        return out
    log_configuration(d, args, "vae")
    ds = open_dataset(args, d)
    vae, disc, opt, opt_d, step, history = vae_state(args, d, ckpt, out)
    saved = step if ckpt is not None else None
    lpips = load_lpips_or_none(args, d)
    vae_step = VAEStep(vae)
    runner, disc_ddp = d.wrap(vae_step), d.wrap(disc)
    loader = make_loader(ds, args.vae_batch, d, args.seed, step, args.num_workers)
    latent_shape = (vae.latent_channels, args.image_size // vae.factor, args.image_size // vae.factor)
    log_batch(d, args.vae_batch, args.micro_batch)
    vis_x = torch.stack([ds[i][0] for i in range(min(16, len(ds)))]).to(d.device)
    last = min(args.vae_steps, step + args.max_steps) if args.max_steps else args.vae_steps
    bar = tqdm_bar(d, step, args.vae_steps, "stage vae")
    t0, s0 = time.time(), step
    while step < last:
        crash_point("step", step)
        x, eps, ks, eq = vae_batch(next(loader)[0], args, step, latent_shape, d)
        if generator_turn(step, args.disc_start):
            terms = vae_generator_step(runner, vae, disc, lpips, opt, x, eps, ks, eq, args, step, d, kept(out, saved))
        else:
            terms = discriminator_step(vae_step, disc_ddp, disc, opt_d, x, eps, ks, eq, args, step, d,
                                       kept(out, saved))
        step += 1
        bar.update(1)
        if step % args.log_every == 0:
            history.append(dict(step=step, k=float(np.mean(ks)), **terms))
            show_progress(bar, d, terms, step, s0, t0)
        if step % args.vis_every == 0 or step == args.vae_steps:
            vae_pictures(vae, vis_x, args, d, step)
        if (step % args.ckpt_every == 0 or step == last) and step < args.vae_steps:   # the last one comes below
            save_run(d, vae_checkpoint(args, d, vae, disc, opt, opt_d, step, history), out, (vae, disc),
                     kept(out, saved), args.keep_every)
            saved = step
    bar.close()
    if step == args.vae_steps:
        latent_statistics(vae, ds, args, d)
        save_run(d, vae_checkpoint(args, d, vae, disc, opt, opt_d, step, history, finished=True), out, (vae, disc),
                 kept(out, saved), args.keep_every)
    return out


def vae_checkpoint(args, d, vae, disc, opt, opt_d, step, history, finished=False):
    return dict(kind="vae", preset=args.vae, vae_config=vae.config, model=vae.state_dict(), finished=finished,
                args=vars(args).copy(), history=history, latent_norm=args.latent_norm,
                **checkpoint_state(d, step, disc=disc.state_dict(), opt=opt.state_dict(), opt_d=opt_d.state_dict()))


@torch.no_grad()
def vae_pictures(vae, x, args, d, step):
    """Reconstruction grid (inputs over reconstructions) and the spectrum plot, on rank 0."""
    if not d.main:
        return
    vae.eval()
    mean, logvar = vae.encode(x)
    rec = vae.decode(mean)
    n = min(8, len(x))
    save_grid(np.concatenate([to_uint8(x[:n]), to_uint8(rec[:n])]), os.path.join(args.out, "reconstructions.png"), n)
    rep = spectrum_report(x, vae.sample(mean, logvar), args.esm_delta, vae.esm_blur)
    plot_spectra(rep, os.path.join(args.out, "spectrum.png"), args.esm_delta)


@torch.no_grad()
def latent_statistics(vae, ds, args, d):
    """Mean and std of posterior samples z ~ N(mean, exp(logvar)) over up to --stats-samples images, in closed
    form (E z = mean, E z^2 = mean^2 + exp(logvar)), in float32 on every rank. --latent-norm scalar pools
    all channels into one mean and std (the authors); channel keeps one per channel."""
    vae.eval()
    n = min(args.stats_samples, len(ds))
    idx = list(range(d.rank, n, d.world))
    acc = torch.zeros(3, vae.latent_channels, dtype=torch.float64, device=d.device)   # count, sum, sum of squares
    for i in range(0, len(idx), 64):
        x = torch.stack([ds[j][0] for j in idx[i:i + 64]]).to(d.device)
        mean, logvar = vae.encode(x)
        mean, var = mean.double(), logvar.double().exp()
        acc[0] += mean.shape[0] * mean.shape[2] * mean.shape[3]
        acc[1] += mean.sum(dim=(0, 2, 3))
        acc[2] += (mean.pow(2) + var).sum(dim=(0, 2, 3))
    d.all_reduce(acc)
    if args.latent_norm == "scalar":                          # pooled over channels
        acc = acc.sum(dim=1, keepdim=True).expand(3, vae.latent_channels)
    mu = acc[1] / acc[0]
    vae.latent_std.copy_((acc[2] / acc[0] - mu ** 2).clamp_min(1e-12).sqrt().float())
    vae.latent_mean.copy_(mu.float() if args.latent_norm == "channel" else torch.zeros_like(mu))   # authors: no shift
    log(d, f"latent statistics ({args.latent_norm}) over {n} images: mean "
           f"{[round(v, 4) for v in vae.latent_mean.tolist()]}, std {[round(v, 4) for v in vae.latent_std.tolist()]}")


def bench_vae(args, d):
    """steps/s of a stage-1 step with and without ESM+DSM (overhead target: <= 3%), interleaved, median."""
    vae = sm.build_vae(args.vae).to(d.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-5)
    B, S = args.vae_batch // d.world, args.image_size
    x = torch.rand(B, 3, S, S, device=d.device) * 2 - 1
    eps = torch.randn(B, vae.latent_channels, S // vae.factor, S // vae.factor, device=d.device)
    runner = VAEStep(vae)
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)

    def step(esm, k):
        sync()
        t = time.time()
        with d.autocast():
            rec, target, mean, logvar, z = runner(x, eps, [k] * B, args.dsm_block, None)
            loss = (rec.float() - target.float()).abs().mean()
            if esm:
                loss = loss + 0.01 * sm.esm_loss(x, z, blur_sigma=vae.esm_blur)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
        return time.time() - t

    variants = {"plain": (False, 0), "esm+dsm": (True, 12)}
    times = {name: [] for name in variants}
    reps = 20 if d.device.type == "cuda" else 5
    for r in range(reps + 1):                                  # interleaved; the first round is warm-up
        for name, (esm, k) in variants.items():
            dt = step(esm, k)
            if r:
                times[name].append(dt)
    sec = {name: float(np.median(v)) for name, v in times.items()}
    overhead = sec["esm+dsm"] / sec["plain"] - 1
    z = eps.clone().requires_grad_(True)                       # the spectral terms alone, forward + backward
    alone = []
    for _ in range(10):
        sync()
        t = time.time()
        sm.esm_loss(x, z, blur_sigma=vae.esm_blur).backward()
        sm.dsm_mask(x, z.detach(), 12, args.dsm_block)
        sync()
        alone.append(time.time() - t)
    log(d, f"bench vae {args.vae} {S}px batch {B} on {d.device}: plain {1 / sec['plain']:.3f} steps/s, "
           f"esm+dsm {1 / sec['esm+dsm']:.3f} steps/s, step overhead {100 * overhead:+.2f}% (median of {reps} "
           f"interleaved steps); ESM+DSM alone {1e3 * np.median(alone):.2f} ms = "
           f"{100 * np.median(alone) / sec['plain']:.2f}% of a step")
    return sec


# ----------------------------------------------------------------------------- latents

def load_stage1_vae(args, d):
    """The autoencoder for latents: --sd-vae weights, or a finished stage-1 checkpoint (default OUT/vae.pt).
    Without an explicit --dataset, the dataset settings of the stage-1 run are used."""
    if args.sd_vae:
        src = sd_vae_source(args.sd_vae)
        return vae_from_source(src, d.device), src
    if args.official_vae:
        src = dict(kind="official", path=os.path.abspath(args.official_vae), preset=args.vae,
                   scale=args.official_scale)
        return vae_from_source(src, d.device), src
    path = args.vae_ckpt or os.path.join(args.out, "vae.pt")
    ckpt = load_checkpoint(path, "vae")
    if not ckpt.get("finished"):
        raise ValueError(f"{path} is an unfinished stage-1 run (step {ckpt['step']} of "
                         f"{ckpt.get('args', {}).get('vae_steps', '?')}): finish it with --stage vae --resume first")
    if "dataset" not in args.explicit:
        for k in ("dataset", "data_path", "image_size", "dataset_size"):
            if k in ckpt.get("args", {}) and k not in args.explicit:
                setattr(args, k, ckpt["args"][k])
    return build_vae_from_checkpoint(ckpt).to(d.device), dict(kind="ckpt", path=os.path.abspath(path),
                                                               step=ckpt["step"])


def sd_vae_source(path):
    """The record of diffusers' SD-VAE weights at path as an autoencoder source (see vae_from_source)."""
    return dict(kind="sd", path=os.path.abspath(path), preset="f8d4")


def vae_from_source(src, device):
    """Rebuild the autoencoder recorded in a latents folder or DiT checkpoint."""
    if src["kind"] in ("sd", "official"):                     # one latent scale, no shift: scalar
        vae = (sm.load_sd_vae(src["path"], src["preset"]) if src["kind"] == "sd" else
               sm.load_official_vae(src["path"], src["preset"], scale_factor=src["scale"]))
        vae.latent_norm = "scalar"
        return vae.to(device)
    return build_vae_from_checkpoint(load_checkpoint(src["path"], "vae")).to(device)


def check_latent_norm(vae, meta, where):
    """Refuse to decode latents normalised with other statistics than this autoencoder's."""
    same = all(np.allclose(getattr(vae, k).cpu().numpy(), meta[k], rtol=1e-5, atol=1e-7)
               for k in ("latent_mean", "latent_std"))
    if not same:
        raise ValueError(f"{where}: the latents were normalised with mean {meta['latent_mean']} / std "
                         f"{meta['latent_std']}, but the autoencoder has {vae.latent_mean.tolist()} / "
                         f"{vae.latent_std.tolist()}: decode with the autoencoder they were encoded with")


def check_up_to_date(record_path, key, ckpt_path, folder):
    """Refuse to reuse an output made from an earlier step of a checkpoint that has since been extended."""
    with open(record_path) as f:
        made_from = json.load(f).get(key) or {}
    if made_from.get("path") != os.path.abspath(ckpt_path) or not os.path.exists(ckpt_path):
        return
    now = load_checkpoint(ckpt_path)["step"]
    if made_from.get("step") is not None and made_from["step"] != now:
        raise ValueError(f"{folder} was made from {ckpt_path} at step {made_from['step']}, which is now at step "
                         f"{now}: remove {folder} (and what was made from it) to redo it, or use another --out")


def open_latent_files(folder, files, spec, d):
    """The latents folder's .npy files {name: (shape, dtype)}, memory-mapped on every rank: rank 0 starts them
    afresh unless partial.json records the same settings (then the rows marked in done.npy are kept)."""
    partial = os.path.join(folder, "partial.json")
    if d.main:
        os.makedirs(folder, exist_ok=True)
        old = None
        if os.path.exists(partial):
            with open(partial) as f:
                old = json.load(f)
        if old != spec:                                       # nothing to resume: start the files afresh
            for name, (shape, dtype) in files.items():
                np.lib.format.open_memmap(os.path.join(folder, name + ".npy"), "w+", dtype, shape).flush()
            write_json(spec, partial)
        else:
            log(d, f"stage latents: resuming {folder}")
    d.barrier()
    return {n: np.load(os.path.join(folder, n + ".npy"), mmap_mode="r+") for n in files}


@torch.no_grad()
def encode_rows(vae, ds, arrays, args, d):
    """Encode this rank's rows not yet done (rank r: rows r, r + world, ...) into the memory-mapped arrays."""
    N = len(ds)
    idx = [i for i in range(d.rank, N, d.world) if not arrays["done"][i]]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=args.vae_batch // d.world,
                                         num_workers=args.num_workers)
    bar = tqdm_bar(d, N - len(idx) * d.world, N, "stage latents")
    pos = 0
    for b, (x, y) in enumerate(loader):
        rows = idx[pos:pos + len(x)]
        pos += len(x)
        x = x.to(d.device)
        for f, xf in enumerate([x, x.flip(-1)] if args.hflip else [x]):
            with d.autocast(args.precision):
                mean, logvar = vae.encode(xf)
            mom = torch.stack([mean.float(), torch.exp(0.5 * logvar.float())], 1)      # (b, 2, C, h, w)
            arrays["moments"][rows, f] = mom.cpu().numpy()
        arrays["labels"][rows] = y.numpy()
        if "images" in arrays:
            arrays["images"][rows] = to_uint8(x)
        for name in arrays:                                # rows first, then their done marks
            if name != "done":
                arrays[name].flush()
        arrays["done"][rows] = True
        arrays["done"].flush()
        bar.update(len(x) * d.world)
        crash_point("latents", b + 1)
    bar.close()


def encode_latents(args, d, quickstart=False):
    """Encode the dataset once, in float32 (--precision bf16 to speed up): posterior (mean, std) of each image
    (and of its flip with --hflip), labels, and (for REPA) the center-cropped uint8 images, as memory-mapped
    .npy files. An interrupted run resumes: done.npy marks the rows written, partial.json their settings."""
    folder = os.path.join(args.out, "latents")
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        if quickstart or args.resume:
            check_up_to_date(meta_path, "vae", os.path.join(args.out, "vae.pt"), folder)
            log(d, f"stage latents: {folder} is finished, skipping")
            return folder
        raise FileExistsError(f"{meta_path} exists: pass --resume to reuse it or choose another --out")
    vae, source = load_stage1_vae(args, d)
    vae.eval()
    ds = open_dataset(args, d)
    vae.check_size(torch.zeros(1, 3, args.image_size, args.image_size))
    N, C, h = len(ds), vae.latent_channels, args.image_size // vae.factor
    views = 2 if args.hflip else 1
    keep_images = args.repa_encoder != "none"
    files = dict(moments=((N, views, 2, C, h, h), np.float32), labels=((N,), np.int64), done=((N,), np.bool_))
    if keep_images:
        files["images"] = ((N, args.image_size, args.image_size, 3), np.uint8)
    spec = dict(num_images=N, latent_shape=[C, h, h], image_size=args.image_size, vae=source,
                dataset=args.dataset, data_path=args.data_path, keep_images=keep_images, hflip=args.hflip,
                precision=args.precision)
    arrays = open_latent_files(folder, files, spec, d)
    encode_rows(vae, ds, arrays, args, d)
    d.barrier()
    if d.main:
        meta = dict(spec, has_images=keep_images, num_classes=getattr(ds, "num_classes", 0),
                    latent_norm=getattr(vae, "latent_norm", "channel"),
                    latent_mean=vae.latent_mean.tolist(), latent_std=vae.latent_std.tolist())
        write_json(meta, meta_path)                            # meta.json marks the stage finished
        os.remove(os.path.join(folder, "partial.json"))
    d.barrier()
    return folder


class LatentData(torch.utils.data.Dataset):
    """Rows of the latents folder: (moments (V, 2, C, h, w), label, image uint8 (H, W, 3) or 0)."""

    def __init__(self, folder, with_images):
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"no finished latents in {folder}: run --stage latents first")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.folder, self.with_images = folder, with_images
        if with_images and not self.meta["has_images"]:
            raise ValueError(f"{folder} was encoded without images, which REPA needs: rerun --stage latents "
                             "with --repa-encoder set")
        self.arrays = None

    def __len__(self):
        return self.meta["num_images"]

    def check_labels(self, num_classes):
        """Labels are checked once here, where the data enters, not in every forward."""
        labels = np.load(os.path.join(self.folder, "labels.npy"), mmap_mode="r")
        if num_classes and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{self.folder}: labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes})")

    def __getitem__(self, i):
        if self.arrays is None:                            # open lazily, once per worker
            names = ["moments", "labels"] + (["images"] if self.with_images else [])
            self.arrays = {n: np.load(os.path.join(self.folder, n + ".npy"), mmap_mode="r") for n in names}
        img = torch.from_numpy(np.array(self.arrays["images"][i])) if self.with_images else 0
        return torch.from_numpy(np.array(self.arrays["moments"][i])), int(self.arrays["labels"][i]), img


# ----------------------------------------------------------------------------- stage 2: DiT

class TinyEncoder(nn.Module):
    """Small random ViT-like target encoder for tests and offline demos (DINOv2's output format)."""

    def __init__(self, patch_size=14, embed_dim=32, depth=1, num_heads=2):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(embed_dim, num_heads, 2 * embed_dim, dropout=0.0,
                                                                batch_first=True, norm_first=True)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward_features(self, x):
        x = self.patch_embed(x)                                            # (N, C, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                   # (N, T, C)
        x = x + torch.from_numpy(sm.get_2d_sincos_pos_embed(self.embed_dim, (h, w))).float().to(x.device)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return {"x_norm_clstoken": x[:, 0], "x_norm_patchtokens": x[:, 1:]}

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]


def load_repa_encoder(name, device, seed=0, resolution=256):
    """Frozen REPA target encoder: a torch.hub DINOv2 name, 'tiny' (random, for tests) or 'none'."""
    if name == "none":
        return None
    if name == "tiny":
        torch.manual_seed(seed + 99)
        return TinyEncoder(patch_size=8, embed_dim=32).to(device).eval().requires_grad_(False)
    return sm.load_dinov2(name, device=device, resolution=resolution)


def dit_config(args, meta, enc_dim):
    """Constructor keyword arguments of the DiT preset for these latents."""
    C, h, _ = meta["latent_shape"]
    cfg = dict(input_size=h, in_channels=C, num_classes=0 if args.unconditional else meta["num_classes"],
               class_dropout_prob=args.class_dropout, z_dims=[enc_dim] if enc_dim else [])
    if args.depth:
        cfg["depth"] = args.depth
    if args.width:
        cfg["hidden_size"], cfg["num_heads"] = args.width, max(1, args.width // 64)
    if args.encoder_depth:
        cfg["encoder_depth"] = args.encoder_depth
    elif args.depth:
        cfg["encoder_depth"] = max(1, args.depth // 3)
    if args.projector != "mlp":
        cfg["projector_type"] = args.projector
    cfg.update({k: True for k in ("qk_norm", "rmsnorm", "swiglu", "rope") if getattr(args, k)})
    preset = sm.DiT_CONFIGS[args.model]                        # spell out the preset's sizes
    return {**{k: preset[k] for k in ("depth", "hidden_size", "num_heads", "encoder_depth")}, **cfg}


def dit_batch_randomness(args, step, B, latent_shape):
    """All random numbers of a stage-2 step for the global batch (flips only with --hflip)."""
    g = step_generator(args.seed, step, stream=2)
    flip = (torch.rand(B, generator=g) < 0.5).long()
    eps = torch.randn((B,) + tuple(latent_shape), generator=g)
    t = sm.sample_time(B, args.weighting, generator=g)
    noise = torch.randn((B,) + tuple(latent_shape), generator=g)
    drop = torch.rand(B, generator=g) < args.class_dropout
    return flip * int(args.hflip), eps, t, noise, drop


def repa_targets_for(encoder, images, flip, args, grid):
    """Target tokens (b, T, C) for uint8 images (b, H, W, 3), flipped like their latents."""
    x = images.permute(0, 3, 1, 2)
    x = torch.where(flip.view(-1, 1, 1, 1).bool(), x.flip(-1), x)
    return repa_targets_for_tokens(sm.encode_repa_target(encoder, x, args.image_size), args, grid)


def repa_targets_for_tokens(Z, args, grid):
    """Encoder tokens -> the DiT's token grid -> the --repa-target transform."""
    return sm.repa_target(sm.resize_token_grid(Z, grid), args.repa_target, alpha=args.zscore_alpha,
                          sigma1=args.dog_sigmas[0], sigma2=args.dog_sigmas[1], grid_hw=grid)


@torch.no_grad()
def update_ema(ema, model, decay):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach().float(), alpha=1 - decay)


def dit_losses(runner, model, encoder, mom, y, img, flip, eps, t, noise, drop, lat_mean, lat_std, args):
    """Flow matching + REPA (§4) on posterior samples of the stored moments, normalised for stage 2."""
    mom = mom[torch.arange(len(mom)), flip]                                 # (b, 2, C, h, w): the drawn view
    z = (mom[:, 0] + mom[:, 1] * eps - lat_mean) / lat_std
    targets = None
    if encoder is not None:
        targets = [repa_targets_for(encoder, img, flip, args, model.grid_size)]
    return sm.flow_loss(runner, z, y, t=t, noise=noise, drop_ids=drop, repa_targets=targets,
                        repa_lambda=args.repa_lambda, cos_weight=args.cos_weight)


def dit_step(runner, model, ema, encoder, opt, batch, rnd, lat, args, step, d, kept_msg):
    """One DiT update on this rank's share, accumulated over --micro-batch slices, then the EMA."""
    mom, y, img = (v.to(d.device, non_blocking=True) if torch.is_tensor(v) else v for v in batch)
    flip, eps, t, noise, drop = (v.to(d.device) for v in rnd)
    y = None if model.num_classes == 0 else y
    model.train()
    opt.zero_grad(set_to_none=True)
    parts = []
    for s, w, ctx in accumulation(runner, len(mom), args.micro_batch):
        with ctx:
            with d.autocast():
                terms = dit_losses(runner, model, encoder, mom[s], None if y is None else y[s],
                                   img[s] if torch.is_tensor(img) else None, flip[s], eps[s], t[s], noise[s],
                                   drop[s], *lat, args)
            (w * terms["loss"]).backward()
        parts.append((w, {k: v.mean() for k, v in terms.items() if k != "t"}))
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    logged, gnorm = host_values(averaged(parts), gnorm, d)
    check_finite(step, logged, gnorm, kept_msg)
    opt.step()
    update_ema(ema, model, args.ema)
    return logged


def latents_image_size(args, d):
    """The image size recorded with the latents (the REPA encoder's input size follows it)."""
    meta_path = os.path.join(args.out, "latents", "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no finished latents in {os.path.dirname(meta_path)}: run --stage latents first")
    with open(meta_path) as f:
        size = json.load(f)["image_size"]
    if size != args.image_size:
        log(d, f"stage dit: the latents were encoded at {size} px; REPA uses that size (not --image-size "
               f"{args.image_size})")
    return size


def open_latents(args, d, encoder):
    """The latents folder of this run, checked against the settings, and the DiT's constructor arguments."""
    data = LatentData(os.path.join(args.out, "latents"), encoder is not None)
    meta = data.meta
    if args.hflip and len(np.load(os.path.join(data.folder, "moments.npy"), mmap_mode="r")[0]) < 2:
        raise ValueError(f"--hflip needs latents encoded with --hflip (both views); {data.folder} has one view")
    cfg = dit_config(args, meta, encoder.embed_dim if encoder is not None else 0)
    data.check_labels(cfg["num_classes"])
    log(d, f"latents {data.folder}: {len(data)} images of {meta.get('dataset')}, {meta['num_classes']} classes, "
           f"latent shape {tuple(meta['latent_shape'])}, {meta.get('latent_norm', 'channel')} normalisation")
    return data, meta, cfg


def dit_state(args, d, cfg, ckpt, out):
    """DiT, its EMA and AdamW (REPA: lr 1e-4, no weight decay), restored from ckpt when resuming."""
    torch.manual_seed(args.seed)
    model = sm.build_dit(args.model, **cfg).to(d.device)
    model.grad_checkpointing = args.grad_checkpoint
    ema = sm.build_dit(args.model, **cfg).to(d.device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.dit_lr, weight_decay=0.0)
    if ckpt is None:
        return model, ema, opt, 0, []
    if ckpt["model_name"] != args.model or ckpt["dit_config"] != cfg:
        raise ValueError(f"{out} holds {ckpt['model_name']} {ckpt['dit_config']}, not {args.model} {cfg}")
    model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["opt"])
    log(d, f"stage dit: resuming {out} at step {ckpt['step']}")
    return model, ema, opt, ckpt["step"], ckpt["history"]


def dit_checkpoint(args, d, cfg, meta, model, ema, opt, step, history):
    return dict(kind="dit", model_name=args.model, dit_config=cfg, model=model.state_dict(), ema=ema.state_dict(),
                finished=step == args.dit_steps, args=vars(args).copy(), history=history,
                latent_mean=meta["latent_mean"], latent_std=meta["latent_std"],
                latent_norm=meta.get("latent_norm", "channel"), vae=meta["vae"], image_size=meta["image_size"],
                **checkpoint_state(d, step, opt=opt.state_dict()))


@torch.no_grad()
def dit_pictures(ema, vae, meta, cfg, args, d):
    """A grid of 16 EMA samples (fixed keys, classes 0, 1, ...) on rank 0."""
    if not d.main:
        return
    labels = None if cfg["num_classes"] == 0 else [i % cfg["num_classes"] for i in range(16)]
    z0 = sample_latents(ema, range(16), labels, meta["latent_shape"], args.seed, d.device, steps=args.sample_steps,
                        cfg_scale=args.cfg_scale)
    save_grid(to_uint8(decode_latents(vae, z0, meta)), os.path.join(args.out, "samples.png"), 8)


def train_dit(args, d, quickstart=False):
    """Stage 2 (§4): flow matching with REPA on the encoded latents, EMA, atomic checkpoints."""
    out = os.path.join(args.out, "dit.pt")
    ckpt = resume_point(out, "dit", args, d, args.dit_steps, quickstart)
    if is_finished(ckpt, args.dit_steps, out, d):
        return out
    log_configuration(d, args, "dit")
    args.image_size = latents_image_size(args, d)               # REPA sees the images the latents came from
    encoder = load_repa_encoder(args.repa_encoder if args.repa_lambda > 0 else "none", d.device, args.seed,
                                args.image_size)
    data, meta, cfg = open_latents(args, d, encoder)
    model, ema, opt, step, history = dit_state(args, d, cfg, ckpt, out)
    saved = step if ckpt is not None else None
    if encoder is not None:
        log_repa_target_energy(encoder, data, args, model.grid_size, d)
    lat = [torch.tensor(meta[k], device=d.device).view(1, -1, 1, 1) for k in ("latent_mean", "latent_std")]
    runner = d.wrap(model)
    runner = torch.compile(runner) if args.compile else runner
    loader = make_loader(data, args.dit_batch, d, args.seed, step, args.num_workers)
    vae = vae_from_source(meta["vae"], d.device).eval() if d.main else None
    if vae is not None:
        check_latent_norm(vae, meta, data.folder)
    log_batch(d, args.dit_batch, args.micro_batch)
    last = min(args.dit_steps, step + args.max_steps) if args.max_steps else args.dit_steps
    bar = tqdm_bar(d, step, args.dit_steps, "stage dit")
    t0, s0 = time.time(), step
    while step < last:
        crash_point("step", step)
        rnd = [d.shard(a) for a in dit_batch_randomness(args, step, args.dit_batch, meta["latent_shape"])]
        terms = dit_step(runner, model, ema, encoder, opt, next(loader), rnd, lat, args, step, d, kept(out, saved))
        step += 1
        bar.update(1)
        if step % args.log_every == 0:
            history.append(dict(step=step, **terms))
            show_progress(bar, d, terms, step, s0, t0)
        if step % args.vis_every == 0 or step == args.dit_steps:
            dit_pictures(ema, vae, meta, cfg, args, d)
        if step % args.ckpt_every == 0 or step == last:
            save_run(d, dit_checkpoint(args, d, cfg, meta, model, ema, opt, step, history), out, (model, ema),
                     kept(out, saved), args.keep_every)
            saved = step
    bar.close()
    if ckpt is not None and step == ckpt["step"] == args.dit_steps:   # resumed at exactly --dit-steps: finish
        save_run(d, dit_checkpoint(args, d, cfg, meta, model, ema, opt, step, history), out, (model, ema),
                 kept(out, saved), args.keep_every)
    return out


@torch.no_grad()
def log_repa_target_energy(encoder, data, args, grid, d):
    """Directional spectral energy of the raw and transformed REPA targets of 16 images, once at start."""
    probe = torch.from_numpy(np.array(np.load(os.path.join(data.folder, "images.npy"), mmap_mode="r")[:16]))
    Z = sm.resize_token_grid(sm.encode_repa_target(encoder, probe.permute(0, 3, 1, 2).to(d.device),
                                                   args.image_size), grid)
    log(d, f"REPA target {args.repa_target}: directional spectral energy raw "
           f"{float(sm.directional_spectral_energy(Z)):.4f}, target "
           f"{float(sm.directional_spectral_energy(repa_targets_for_tokens(Z, args, grid))):.4f}")


def sample_generator(seed, index, stream=0):
    """CPU generator for sample `index` of run `seed`: keyed by the triple (seed, index, stream) through
    numpy's SeedSequence hash, so no two seeds share noise and the key does not depend on the batch or rank.
    Streams: 0 initial noise, 1 SDE noise, 2 random label."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and sample index must be >= 0, got seed {seed}, index {index}")
    key = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(key))


def sample_noise(indices, seed, latent_shape):
    """Initial noise (N, C, h, w) float32 of the sample indices (stream 0)."""
    return torch.stack([torch.randn(tuple(latent_shape), generator=sample_generator(seed, i, 0)) for i in indices])


def sample_labels(indices, seed, num_classes, mode="random"):
    """Class of each sample: 'random' uniform in [0, num_classes) from its key (stream 2), as REPA's
    generate.py draws torch.randint labels; 'balanced' i % num_classes. None for unconditional models."""
    if num_classes == 0:
        return None
    if mode == "balanced":
        return [int(i) % num_classes for i in indices]
    if mode == "random":
        return [int(torch.randint(num_classes, (1,), generator=sample_generator(seed, i, 2))) for i in indices]
    raise ValueError(f"labels must be 'random' or 'balanced', got {mode!r}")


def sample_latents(model, indices, labels, latent_shape, seed, device, steps=50, cfg_scale=1.0,
                   sampler="ode", guidance_interval=(0.0, 1.0), heun=False):
    """Latents (N, C, h, w) float32 of the sample indices; noise and SDE noise of sample i come from the
    key (seed, i), so they do not depend on the batch composition or the number of processes."""
    noise = sample_noise(indices, seed, latent_shape).to(device)           # (N, C, h, w)
    y = None if labels is None else torch.as_tensor(labels, device=device)
    with torch.no_grad():
        if sampler == "sde":                                               # one noise stream per sample
            g = [sample_generator(seed, i, 1) for i in indices]
            return sm.sample_sde(model, noise, y, steps=steps, cfg_scale=cfg_scale,
                                 guidance_interval=guidance_interval, generator=g).float()
        if sampler != "ode":
            raise ValueError(f"sampler must be 'ode' or 'sde', got {sampler!r}")
        return sm.sample_ode(model, noise, y, steps=steps, cfg_scale=cfg_scale,
                             guidance_interval=guidance_interval, heun=heun).float()


@torch.no_grad()
def ema_dit(ckpt, device):
    """The EMA DiT of a 'dit' checkpoint, in eval mode."""
    model = sm.build_dit(ckpt["model_name"], **ckpt["dit_config"]).to(device)
    model.load_state_dict(ckpt["ema"])
    return model.eval()


def decode_latents(vae, z, meta):
    """Normalised latents -> images in [-1, 1] (float32 latents; SD-VAE: z * (1 / 0.18215))."""
    mean = torch.tensor(meta["latent_mean"], device=z.device).view(1, -1, 1, 1)
    std = torch.tensor(meta["latent_std"], device=z.device).view(1, -1, 1, 1)
    return vae.decode(z.float() * std + mean).clamp(-1, 1)


def samples_to_uint8(x):
    """Decoded samples in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3) as REPA's generate.py:
    clamp(255 * (x + 1) / 2, 0, 255) truncated (to_uint8 rounds instead; it stores dataset images)."""
    x = torch.clamp(255.0 * ((x.float() + 1) / 2), 0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def bench(args, d):
    """--bench: steps/s (and on CUDA MFU and memory) of stage vae, or of stage dit on random latents of the
    --vae preset's shape; nothing is read or written."""
    if args.stage == "vae":
        return bench_vae(args, d)
    if args.stage == "dit":
        cfg = sm.VAE_CONFIGS[args.vae]
        f = 2 ** (len(cfg["channels"]) - 1)
        return bench_dit(args, d, (cfg["latent_channels"], args.image_size // f, args.image_size // f))
    raise ValueError("--bench measures --stage vae or --stage dit")


def bench_dit(args, d, latent_shape):
    """Images/s of forward+backward+step; on CUDA also MFU against the measured bf16 matmul rate."""
    C, h, _ = latent_shape
    B = args.dit_batch // d.world
    cfg = dit_config(args, dict(latent_shape=latent_shape, num_classes=1000), 768 if args.repa_encoder != "none" else 0)
    model = sm.build_dit(args.model, **cfg).to(d.device)
    runner = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    z = torch.randn(B, C, h, h, device=d.device)
    y = torch.randint(0, 1000, (B,), device=d.device)
    tgt = [torch.randn(B, model.grid_size[0] * model.grid_size[1], 768, device=d.device)] if cfg["z_dims"] else None
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    n = 20 if d.device.type == "cuda" else 3
    times = []
    for i in range(n + 3):
        sync()
        t = time.time()
        with d.autocast():
            loss = sm.flow_loss(runner, z, y, repa_targets=tgt)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        times.append(time.time() - t)
    sec = float(np.median(times[3:]))
    T = model.grid_size[0] * model.grid_size[1]
    per_token = sum(p.numel() for n, p in model.blocks.named_parameters() if "adaLN" not in n)
    per_sample = sum(p.numel() for n, p in model.blocks.named_parameters() if "adaLN" in n)   # runs on c only
    D, L = model.hidden_size, len(model.blocks)
    # fwd + bwd = 3x forward: block matmuls per token, adaLN per sample, attention scores and values
    flops = 3 * B * (2 * per_token * T + 2 * per_sample + 4 * L * T * T * D)
    msg = f"bench {args.model} latents {tuple(latent_shape)} batch {B} on {d.device}: {B / sec:.1f} images/s"
    if d.device.type == "cuda":
        a = torch.randn(8192, 8192, device=d.device, dtype=torch.bfloat16)
        a @ a                                                   # warm-up (cuBLAS initialisation)
        sync()
        t = time.time()
        for _ in range(20):
            a @ a
        sync()
        peak = 20 * 2 * 8192 ** 3 / (time.time() - t)
        msg += f", {flops / sec / 1e12:.1f} TFLOP/s, MFU {100 * flops / sec / peak:.1f}% of measured bf16 matmul " \
               f"{peak / 1e12:.0f} TFLOP/s, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    log(d, msg)
    return B / sec


# ----------------------------------------------------------------------------- the whole pipeline

def run_all(args, d):
    """Quickstart: stage vae, latents, dit, then samples and metrics.json; finished stages are skipped."""
    t0 = time.time()
    train_vae(args, d, quickstart=True)
    encode_latents(args, d, quickstart=True)
    train_dit(args, d, quickstart=True)
    import evaluate
    import sample
    npz = os.path.join(args.out, "samples", "samples.npz")
    if os.path.exists(npz):
        check_up_to_date(os.path.join(args.out, "samples", "samples.json"), "checkpoint",
                         os.path.join(args.out, "dit.pt"), os.path.dirname(npz))
    else:
        sample.generate(os.path.join(args.out, "dit.pt"), args.num_fid_samples, os.path.dirname(npz), d,
                        steps=args.sample_steps, cfg_scale=args.cfg_scale, seed=args.seed, precision=args.precision)
    if d.main:
        metrics = evaluate.pipeline_metrics(args, npz, d.device)
        metrics["minutes"] = (time.time() - t0) / 60
        write_json(metrics, os.path.join(args.out, "metrics.json"))
        log(d, json.dumps(metrics, indent=1))
    d.barrier()
    return args.out


# ----------------------------------------------------------------------------- before the first step

def preflight(args, d):
    """Check what would otherwise fail only after hours of work: the run folder, LPIPS, the REPA encoder. (The
    dataset's layout is checked when a stage opens it, before its first step: listing ImageNet once is enough.)"""
    check_output_folder(args.out)
    if args.stage in ("all", "vae", "compare"):
        resolve_lpips(args, d)
    if args.stage in ("all", "dit") and args.repa_lambda > 0:
        load_repa_encoder(args.repa_encoder, "cpu", args.seed, args.image_size)   # offline hub fails now


def main(argv=None):
    args = get_args(argv)
    d = Dist()
    try:
        if args.bench:
            return bench(args, d)
        preflight(args, d)
        if args.stage == "vae":
            train_vae(args, d)
        elif args.stage == "latents":
            encode_latents(args, d)
        elif args.stage == "dit":
            train_dit(args, d)
        elif args.stage in ("probe", "compare"):
            import evaluate                                # evaluation protocols: downstream, in evaluate.py
            if args.stage == "probe":
                evaluate.run_probe(args, d)
            else:
                evaluate.run_compare(args, d)
        else:
            run_all(args, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)   # bad input, not bugs


def cli(main_fn, name):
    """Run a script's main: user errors print one line `name: error: ...` and exit 2, as argparse does."""
    try:
        main_fn()
    except USER_ERRORS as e:
        print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    cli(main, "train.py")
