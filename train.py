"""
Train Spectrum Matching latent diffusion.

    python train.py                                   # quickstart: the whole pipeline on dead leaves, CPU
    torchrun --nproc_per_node=8 train.py --stage vae --dataset imagenet --data-path DIR --vae f16d16 --reg esm+dsm
    torchrun --nproc_per_node=8 train.py --stage latents --vae-ckpt runs/in256/vae.pt ...
    torchrun --nproc_per_node=8 train.py --stage dit --model DiT-XL/2 --repa-encoder dinov2_vitb14 --repa-target dog

Stages: vae (stage 1), latents (encode the dataset once), dit (stage 2), all (vae, latents, dit,
samples, metrics; each skipped when its finished output exists, resumed when interrupted).

World-size invariance: every random number of a step (data order, flips, posterior noise, DSM k,
flow-matching t and noise, label dropout) is drawn for the *global* batch from a generator seeded
by (seed, step), and each rank takes its slice. The same step therefore sees the same samples and
noise on 1 or N processes, and a resume needs no RNG state to continue exactly.
"""

import argparse
import contextlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import sm

# -----------------------------------------------------------------------------
# defaults: the paper's ImageNet-256 settings (stage 1 from the authors' configs, stage 2 from REPA)
DEFAULTS = dict(
    stage="all", out="runs/quickstart", seed=0,
    dataset="deadleaves", data_path=None, image_size=256, dataset_size=10000,
    # stage 1: autoencoder
    vae="f16d16", reg="esm+dsm", vae_batch=128, vae_steps=1_000_000, vae_lr=5e-5, warmup=2000,
    lpips_weight=0.5, disc_weight=0.5, disc_start=50001, stats_samples=50000,
    # stage 2: diffusion transformer (SiT + REPA)
    model="DiT-B/2", depth=None, width=None, dit_batch=256, dit_steps=400_000, dit_lr=1e-4, ema=0.9999,
    repa_encoder="dinov2_vitb14", repa_target="dog", repa_lambda=0.5, weighting="uniform",
    sample_steps=50, cfg_scale=1.0, num_fid_samples=50000,
    log_every=100, ckpt_every=10_000, vis_every=10_000,
)
# the quickstart: `python train.py` on dead leaves, 2 CPU cores, about 10 minutes
QUICKSTART = dict(
    image_size=32, dataset_size=4096,
    vae="tiny", vae_batch=32, vae_steps=600, vae_lr=1e-3, warmup=50, stats_samples=4096,
    model="DiT-S/2", depth=6, width=256, dit_batch=64, dit_steps=1500, dit_lr=5e-4, ema=0.995,
    repa_encoder="none", weighting="lognormal", num_fid_samples=512,
    log_every=25, ckpt_every=250, vis_every=500,
)
# -----------------------------------------------------------------------------

REG_PRESETS = {  # stage-1 regularisers (authors' training configs); every weight can be overridden
    "kl":      dict(kl_weight=1e-6, esm_weight=0.0, dsm=False, eq_prob=0.0),
    "esm":     dict(kl_weight=0.0, esm_weight=0.01, dsm=False, eq_prob=0.0),
    "dsm":     dict(kl_weight=0.0, esm_weight=0.0, dsm=True, eq_prob=0.0),
    "esm+dsm": dict(kl_weight=0.0, esm_weight=0.01, dsm=True, eq_prob=0.0),
    "eq":      dict(kl_weight=1e-6, esm_weight=0.0, dsm=False, eq_prob=0.5),
}
DSM_KS = (0, 8, 10, 12)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--stage", choices=["all", "vae", "latents", "dit", "compare"],
      help="all: the whole pipeline; compare: the pipeline once per --reg preset, one table")
    a("--out", help="run folder: checkpoints, latents, pictures, metrics")
    a("--seed", type=int)
    a("--resume", action="store_true", help="continue from the run folder's checkpoint")
    a("--bench", action="store_true", help="measure steps/s of the chosen stage and exit")
    a("--num-workers", type=int, default=2)
    # data
    a("--dataset", choices=["deadleaves", "imagenet", "folder"])
    a("--data-path")
    a("--image-size", type=int)
    a("--dataset-size", type=int, help="number of dead-leaves images")
    # stage 1
    a("--vae", help=f"VAE preset: {', '.join(sm.VAE_CONFIGS)}")
    a("--reg", choices=list(REG_PRESETS))
    a("--kl-weight", type=float)
    a("--esm-weight", type=float)
    a("--esm-delta", type=float, default=1.0)
    a("--dsm-block", type=int, default=8)
    a("--eq-prob", type=float)
    a("--lpips-weight", type=float)
    a("--lpips-path", help="LPIPS v0.1 vgg.pth (linear heads); default: torch hub cache or download")
    a("--vgg-path", help="torchvision VGG16 weights vgg16-397923af.pth; default: torch hub cache or download")
    a("--disc-weight", type=float)
    a("--disc-start", type=int)
    a("--vae-batch", type=int, help="global batch size")
    a("--vae-steps", type=int)
    a("--vae-lr", type=float)
    a("--warmup", type=int)
    a("--stats-samples", type=int, help="samples for the per-channel latent statistics")
    # latents / stage 2
    a("--vae-ckpt", help="stage-1 checkpoint (default: OUT/vae.pt)")
    a("--sd-vae", help="diffusers AutoencoderKL weights (sd-vae-ft-ema) instead of a stage-1 checkpoint")
    a("--model", help="DiT preset, e.g. DiT-B/2")
    a("--depth", type=int, help="override the preset's depth (small demos)")
    a("--width", type=int, help="override the preset's hidden size (small demos; 64 channels per head)")
    a("--dit-batch", type=int, help="global batch size")
    a("--dit-steps", type=int)
    a("--dit-lr", type=float)
    a("--ema", type=float, help="EMA decay")
    a("--weighting", choices=["uniform", "lognormal"])
    a("--cos-weight", type=float, default=0.0, help="LightningDiT velocity-direction loss weight")
    a("--class-dropout", type=float, default=0.1)
    a("--unconditional", action="store_true")
    a("--repa-encoder", help="dinov2_vitb14 (torch.hub), tiny (random, tests) or none")
    a("--repa-target", choices=["raw", "zscore", "dog"])
    a("--zscore-alpha", type=float, default=0.6, help="iREPA's alpha for --repa-target zscore")
    a("--dog-sigmas", type=float, nargs=2, default=(0.5, 2.0), help="REPA-DoG sigma1 sigma2 (tokens)")
    a("--projector", choices=["mlp", "conv"], default="mlp", help="REPA MLP or iREPA 3x3 conv projector")
    for opt in ("qk-norm", "rmsnorm", "swiglu", "rope"):
        a(f"--{opt}", action="store_true", help="LightningDiT option (off: REPA's SiT)")
    a("--repa-lambda", type=float)
    a("--encoder-depth", type=int)
    a("--compile", action="store_true")
    a("--sample-steps", type=int)
    a("--cfg-scale", type=float)
    a("--num-fid-samples", type=int, help="samples for the final metrics of --stage all")
    # logging
    a("--log-every", type=int)
    a("--ckpt-every", type=int)
    a("--vis-every", type=int)
    a("--max-steps", type=int, help="stop after this many steps in this invocation (tests)")
    args = p.parse_args(argv)
    quick = (args.stage in (None, "all", "compare")) and args.dataset in (None, "deadleaves")
    for k, v in {**DEFAULTS, **(QUICKSTART if quick else {})}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k, v in REG_PRESETS[args.reg].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


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

    def autocast(self):
        """bf16 autocast on CUDA, nothing on CPU."""
        if self.device.type == "cuda":
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

    def shard(self, t):
        """This rank's slice of a global-batch tensor."""
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def wrap(self, model):
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.local_rank] if self.device.type == "cuda"
                                                   else None)


def step_generator(seed, step, stream=0):
    """CPU generator for one step's global random numbers, identical on every rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def crash_point(where, step):
    """Fault injection for the crash tests: SIGKILL this process when SM_CRASH_AT == f"{where}:{step}"."""
    if os.environ.get("SM_CRASH_AT") == f"{where}:{step}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def save(obj, path, step):
    """Atomic checkpoint write (rank 0 only, then a barrier)."""
    sm.save_checkpoint(obj, path, before_replace=lambda tmp: crash_point("checkpoint", step))


def log(d, *msg):
    if d.main:
        print(*msg, flush=True)


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


def load_image(path, image_size):
    """Read an image file, center-cropped to (image_size, image_size, 3) uint8; errors name the file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return center_crop_arr(im, image_size)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


class ImageFiles(torch.utils.data.Dataset):
    """Images from `imagenet` (class subfolders, ImageFolder order) or a flat `folder` (label 0)."""

    def __init__(self, root, image_size, classes=True):
        if root is None or not os.path.isdir(root):
            raise FileNotFoundError(f"dataset folder not found: {root} (pass --data-path)")
        self.image_size, self.files, self.labels = image_size, [], []
        if classes:
            self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
            for i, c in enumerate(self.classes):
                for dirpath, _, names in sorted(os.walk(os.path.join(root, c))):
                    for n in sorted(names):
                        if n.lower().endswith(IMAGE_EXTS):
                            self.files.append(os.path.join(dirpath, n))
                            self.labels.append(i)
        else:
            self.classes = []
            self.files = sorted(os.path.join(root, n) for n in os.listdir(root) if n.lower().endswith(IMAGE_EXTS))
            self.labels = [0] * len(self.files)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found in {root}")
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = load_image(self.files[i], self.image_size)
        return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0, self.labels[i]


def build_dataset(name, path=None, image_size=256, train=True, seed=0, length=None):
    """Dataset of (image in [-1, 1] (3, H, W), label). train=False draws dead leaves from another seed."""
    if name == "deadleaves":
        ds = sm.DeadLeaves(length or 4096, image_size, seed=seed if train else seed + 10_000)
        ds.num_classes = 10
        return ds
    if name in ("imagenet", "folder"):
        if name == "imagenet" and path is not None and os.path.isdir(os.path.join(path, "train" if train else "val")):
            path = os.path.join(path, "train" if train else "val")
        return ImageFiles(path, image_size, classes=name == "imagenet")
    raise ValueError(f"unknown dataset {name!r}; choose deadleaves, imagenet or folder")


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

def checkpoint_state(d, step, **parts):
    return dict(step=step, rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                                    cuda=torch.cuda.get_rng_state_all() if d.device.type == "cuda" else None),
                **parts)


def host_values(terms, gnorm):
    """Loss terms and the gradient norm as Python floats, with a single device sync."""
    vals = torch.stack([v.detach().float().reshape(()) for v in terms.values()] + [gnorm.float()]).tolist()
    return dict(zip(terms, vals[:-1])), vals[-1]


def check_finite(step, terms, gnorm):
    """Stop with a message naming the step and the loss terms when training diverged."""
    if not math.isfinite(gnorm) or not all(math.isfinite(v) for v in terms.values()):
        desc = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        raise FloatingPointError(f"non-finite loss or gradient at step {step}: {desc}, grad norm {gnorm:.4g}; "
                                 "the last good checkpoint was kept")


def prepare_output(path, resume):
    """Refuse to overwrite a finished or unfinished run unless --resume is given."""
    if os.path.exists(path) and not resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue it, or choose another --out "
                              f"(nothing was overwritten)")


# ----------------------------------------------------------------------------- stage 1: VAE

class VAEStep(nn.Module):
    """One stage-1 forward: encode, sample, DSM mask / EQ scaling, decode (wrapped in DDP)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, eps, k, block, eq_factor, eq_min_size=1):
        mean, logvar = self.vae.encode(x)
        z = self.vae.sample(mean, logvar, eps)
        target, z_in = sm.dsm_mask(x, z, k, block)             # k = 0: unchanged
        if eq_factor is not None:
            target, z_in = sm.eq_vae_scale(target, z_in, eq_factor, self.vae.factor, eq_min_size)
        return self.vae.decode(z_in), target, mean, logvar, z


def vae_batch_randomness(args, step, B, latent_shape):
    """All random numbers of a stage-1 step for the global batch."""
    g = step_generator(args.seed, step, stream=1)
    flip = torch.rand(B, generator=g) < 0.5
    eps = torch.randn((B,) + latent_shape, generator=g)
    k = DSM_KS[int(torch.randint(len(DSM_KS), (1,), generator=g))] if args.dsm else 0
    use_eq, f = torch.rand(2, generator=g).tolist()
    eq = 0.25 + 0.75 * f if use_eq < args.eq_prob else None
    return flip, eps, k, eq


def lr_at(step, base, warmup):
    return base * min(1.0, (step + 1) / max(1, warmup))


def train_vae(args, d, quickstart=False):
    out = os.path.join(args.out, "vae.pt")
    prepare_output(out, args.resume or quickstart)
    ckpt = sm.load_checkpoint(out, "vae") if os.path.exists(out) else None
    if ckpt is not None:
        if ckpt["preset"] != args.vae:
            raise ValueError(f"{out} holds a {ckpt['preset']!r} VAE, but --vae {args.vae} was asked for")
        if ckpt.get("finished"):
            log(d, f"stage vae: {out} is finished, skipping")
            return out
    ds = build_dataset(args.dataset, args.data_path, args.image_size, True, args.seed, args.dataset_size)
    torch.manual_seed(args.seed)
    vae = sm.build_vae(args.vae).to(d.device)
    vae.check_size(torch.zeros(1, 3, args.image_size, args.image_size))
    if args.dsm:
        for name, s in (("image", args.image_size), ("latent", args.image_size // vae.factor)):
            if s % args.dsm_block:
                raise ValueError(f"DSM: the {name} size {s} is not divisible by --dsm-block {args.dsm_block}")
    disc = sm.PatchGAN().to(d.device)
    if d.world > 1 and d.device.type == "cuda":
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    lpips = None
    if args.lpips_weight > 0:
        try:
            lpips = sm.load_lpips(args.lpips_path, args.vgg_path).to(d.device)
        except RuntimeError as e:
            if not quickstart:
                raise
            log(d, f"LPIPS unavailable offline, training without it: {e}")
            args.lpips_weight = 0.0
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.999), weight_decay=0.005)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.vae_lr, betas=(0.9, 0.999), weight_decay=0.005)
    step, history = 0, []
    if ckpt is not None:
        vae.load_state_dict(ckpt["model"]), disc.load_state_dict(ckpt["disc"])
        opt.load_state_dict(ckpt["opt"]), opt_d.load_state_dict(ckpt["opt_d"])
        step, history = ckpt["step"], ckpt["history"]
        log(d, f"stage vae: resuming {out} at step {step}")
    if args.bench:
        return bench_vae(args, d)
    runner, disc_ddp = d.wrap(VAEStep(vae)), d.wrap(disc)
    loader = make_loader(ds, args.vae_batch, d, args.seed, step, args.num_workers)
    latent_shape = (vae.latent_channels, args.image_size // vae.factor, args.image_size // vae.factor)
    vis_x = torch.stack([ds[i][0] for i in range(min(16, len(ds)))]).to(d.device)
    last = min(args.vae_steps, step + args.max_steps) if args.max_steps else args.vae_steps
    bar = tqdm_bar(d, step, args.vae_steps, "stage vae")
    t0, s0 = time.time(), step
    while step < last:
        crash_point("step", step)
        x, _ = next(loader)
        flip, eps, k, eq = vae_batch_randomness(args, step, args.vae_batch, latent_shape)
        x = torch.where(d.shard(flip).view(-1, 1, 1, 1), x.flip(-1), x).to(d.device, non_blocking=True)
        eps = d.shard(eps).to(d.device)
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, args.vae_lr, args.warmup)
        vae.train()
        with d.autocast():
            eq_min = 32 if lpips is not None or step >= args.disc_start else 1   # LPIPS / PatchGAN input size
            rec, target, mean, logvar, z = runner(x, eps, k, args.dsm_block, eq, eq_min)
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
            gan_on = step >= args.disc_start
            if gan_on:                                         # generator side: D frozen, outside DDP
                disc.requires_grad_(False)
                terms["gan"] = -disc(rec).mean()
                disc.requires_grad_(True)
                w = sm.adaptive_gan_weight(rec_loss, terms["gan"], vae.decoder.conv_out.weight, args.disc_weight,
                                           reduce=d.all_reduce_mean)
                loss = loss + w * terms["gan"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        terms, gnorm = host_values(terms, gnorm)
        check_finite(step, terms, gnorm)
        opt.step()
        if gan_on:                                             # discriminator: the masked image is "real"
            with d.autocast():
                d_loss = sm.hinge_d_loss(disc_ddp(target.detach()), disc_ddp(rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            terms["disc"] = float(d_loss.detach())
            check_finite(step, terms, float(torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)))
            opt_d.step()
        step += 1
        bar.update(1)
        if step % args.log_every == 0:
            history.append(dict(step=step, k=k, **terms))
        if step % args.log_every == 0 and d.main:
            bar.set_postfix({**{k_: f"{v:.4f}" for k_, v in terms.items()}, "k": k,
                             "steps/s": f"{(step - s0) / (time.time() - t0):.2f}"})
        if step % args.vis_every == 0 or step == args.vae_steps:
            vae_pictures(vae, vis_x, args, d, step)
        if step % args.ckpt_every == 0 or step == last:
            if step == args.vae_steps:
                latent_statistics(vae, ds, args, d)
            if d.main:
                save(dict(kind="vae", preset=args.vae, vae_config=vae.config, model=vae.state_dict(),
                          finished=step == args.vae_steps, args=vars(args), history=history,
                          **checkpoint_state(d, step, disc=disc.state_dict(), opt=opt.state_dict(),
                                             opt_d=opt_d.state_dict())), out, step)
            d.barrier()
    bar.close()
    return out


def tqdm_bar(d, start, total, desc):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=desc, disable=not d.main, dynamic_ncols=True)


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
    """Per-channel mean and std of posterior samples z ~ N(mean, exp(logvar)) over up to --stats-samples
    images, in closed form (E z = mean, E z^2 = mean^2 + exp(logvar)), so no sampling noise (all ranks)."""
    vae.eval()
    n = min(args.stats_samples, len(ds))
    idx = list(range(d.rank, n, d.world))
    acc = torch.zeros(3, vae.latent_channels, dtype=torch.float64, device=d.device)   # count, sum, sum of squares
    for i in range(0, len(idx), 64):
        x = torch.stack([ds[j][0] for j in idx[i:i + 64]]).to(d.device)
        with d.autocast():
            mean, logvar = vae.encode(x)
        mean, var = mean.double(), logvar.double().exp()
        acc[0] += mean.shape[0] * mean.shape[2] * mean.shape[3]
        acc[1] += mean.sum(dim=(0, 2, 3))
        acc[2] += (mean.pow(2) + var).sum(dim=(0, 2, 3))
    d.all_reduce(acc)
    mu = acc[1] / acc[0]
    vae.latent_mean.copy_(mu.float())
    vae.latent_std.copy_((acc[2] / acc[0] - mu ** 2).clamp_min(1e-12).sqrt().float())
    log(d, f"latent statistics over {n} images: mean {[round(v, 4) for v in vae.latent_mean.tolist()]}, "
           f"std {[round(v, 4) for v in vae.latent_std.tolist()]}")


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
            rec, target, mean, logvar, z = runner(x, eps, k, args.dsm_block, None)
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
    """The autoencoder for latents: --sd-vae weights, or a finished stage-1 checkpoint (default OUT/vae.pt)."""
    if args.sd_vae:
        return sm.load_sd_vae(args.sd_vae, "f8d4").to(d.device), dict(kind="sd", path=os.path.abspath(args.sd_vae),
                                                                      preset="f8d4")
    path = args.vae_ckpt or os.path.join(args.out, "vae.pt")
    ckpt = sm.load_checkpoint(path, "vae")
    if not ckpt.get("finished"):
        raise ValueError(f"{path} is an unfinished stage-1 run (step {ckpt['step']}); finish it with --stage vae "
                         "--resume first")
    return sm.build_vae_from_checkpoint(ckpt).to(d.device), dict(kind="ckpt", path=os.path.abspath(path))


def vae_from_source(src, device):
    """Rebuild the autoencoder recorded in a latents folder or DiT checkpoint."""
    if src["kind"] == "sd":
        return sm.load_sd_vae(src["path"], src["preset"]).to(device)
    return sm.build_vae_from_checkpoint(sm.load_checkpoint(src["path"], "vae")).to(device)


def encode_latents(args, d, quickstart=False):
    """Encode the dataset once: posterior (mean, std) of each image and its flip, labels, and (for REPA)
    the center-cropped uint8 images, as memory-mapped .npy files. An interrupted run resumes: done.npy
    marks the rows written, partial.json the settings they were written with."""
    folder = os.path.join(args.out, "latents")
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        if quickstart or args.resume:
            log(d, f"stage latents: {folder} is finished, skipping")
            return folder
        raise FileExistsError(f"{meta_path} exists: pass --resume to reuse it or choose another --out")
    vae, source = load_stage1_vae(args, d)
    vae.eval()
    ds = build_dataset(args.dataset, args.data_path, args.image_size, True, args.seed, args.dataset_size)
    vae.check_size(torch.zeros(1, 3, args.image_size, args.image_size))
    N, C, h = len(ds), vae.latent_channels, args.image_size // vae.factor
    keep_images = args.repa_encoder != "none"
    files = dict(moments=((N, 2, 2, C, h, h), np.float32), labels=((N,), np.int64), done=((N,), np.bool_))
    if keep_images:
        files["images"] = ((N, args.image_size, args.image_size, 3), np.uint8)
    spec = dict(num_images=N, latent_shape=[C, h, h], image_size=args.image_size, vae=source,
                dataset=args.dataset, keep_images=keep_images)
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
    arrays = {n: np.load(os.path.join(folder, n + ".npy"), mmap_mode="r+") for n in files}
    idx = [i for i in range(d.rank, N, d.world) if not arrays["done"][i]]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=args.vae_batch // d.world,
                                         num_workers=args.num_workers)
    bar = tqdm_bar(d, N - len(idx) * d.world, N, "stage latents")
    pos = 0
    with torch.no_grad():
        for b, (x, y) in enumerate(loader):
            rows = idx[pos:pos + len(x)]
            pos += len(x)
            x = x.to(d.device)
            for f, xf in enumerate((x, x.flip(-1))):
                with d.autocast():
                    mean, logvar = vae.encode(xf)
                mom = torch.stack([mean.float(), torch.exp(0.5 * logvar.float())], 1)      # (b, 2, C, h, w)
                arrays["moments"][rows, f] = mom.cpu().numpy()
            arrays["labels"][rows] = y.numpy()
            if keep_images:
                arrays["images"][rows] = to_uint8(x)
            for name in files:                                 # rows first, then their done marks
                if name != "done":
                    arrays[name].flush()
            arrays["done"][rows] = True
            arrays["done"].flush()
            bar.update(len(x) * d.world)
            crash_point("latents", b + 1)
    bar.close()
    d.barrier()
    if d.main:
        meta = dict(spec, has_images=keep_images, num_classes=getattr(ds, "num_classes", 0),
                    latent_mean=vae.latent_mean.tolist(), latent_std=vae.latent_std.tolist())
        write_json(meta, meta_path)                            # meta.json marks the stage finished
        os.remove(partial)
    d.barrier()
    return folder


def write_json(obj, path):
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class LatentData(torch.utils.data.Dataset):
    """Rows of the latents folder: (moments (2, 2, C, h, w), label, image uint8 (H, W, 3) or 0)."""

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

    def __getitem__(self, i):
        if self.arrays is None:                            # open lazily, once per worker
            names = ["moments", "labels"] + (["images"] if self.with_images else [])
            self.arrays = {n: np.load(os.path.join(self.folder, n + ".npy"), mmap_mode="r") for n in names}
        img = torch.from_numpy(np.array(self.arrays["images"][i])) if self.with_images else 0
        return torch.from_numpy(np.array(self.arrays["moments"][i])), int(self.arrays["labels"][i]), img


# ----------------------------------------------------------------------------- stage 2: DiT

def load_repa_encoder(name, device, seed=0):
    """Frozen REPA target encoder: a torch.hub DINOv2 name, 'tiny' (random, for tests) or 'none'."""
    if name == "none":
        return None
    if name == "tiny":
        torch.manual_seed(seed + 99)
        return sm.TinyEncoder(patch_size=8, embed_dim=32).to(device).eval().requires_grad_(False)
    return sm.load_dinov2(name, device=device)


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
    with torch.device("meta"):                                 # spell out the preset's sizes
        m = build_dit(args.model, cfg)
    cfg.update(depth=len(m.blocks), hidden_size=m.hidden_size, num_heads=m.num_heads, encoder_depth=m.encoder_depth)
    return cfg


def build_dit(name, cfg):
    if name not in sm.DiT_MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sm.DiT_MODELS)}")
    return sm.DiT_MODELS[name](**cfg)


def dit_batch_randomness(args, step, B, latent_shape):
    """All random numbers of a stage-2 step for the global batch."""
    g = step_generator(args.seed, step, stream=2)
    flip = (torch.rand(B, generator=g) < 0.5).long()
    eps = torch.randn((B,) + tuple(latent_shape), generator=g)
    t = sm.sample_time(B, args.weighting, generator=g)
    noise = torch.randn((B,) + tuple(latent_shape), generator=g)
    drop = torch.rand(B, generator=g) < args.class_dropout
    return flip, eps, t, noise, drop


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


def train_dit(args, d, quickstart=False):
    if args.bench:                                             # random latents of the --vae preset's shape
        cfg = sm.VAE_CONFIGS[args.vae]
        f = 2 ** (len(cfg["channels"]) - 1)
        return bench_dit(args, d, (cfg["latent_channels"], args.image_size // f, args.image_size // f))
    out = os.path.join(args.out, "dit.pt")
    prepare_output(out, args.resume or quickstart)
    encoder = load_repa_encoder(args.repa_encoder if args.repa_lambda > 0 else "none", d.device, args.seed)
    data = LatentData(os.path.join(args.out, "latents"), encoder is not None)
    meta = data.meta
    latent_shape = meta["latent_shape"]
    cfg = dit_config(args, meta, encoder.embed_dim if encoder is not None else 0)
    torch.manual_seed(args.seed)
    model = build_dit(args.model, cfg).to(d.device)
    ema = build_dit(args.model, cfg).to(d.device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.dit_lr, weight_decay=0.0)
    step, history = 0, []
    if os.path.exists(out):
        ckpt = sm.load_checkpoint(out, "dit")
        if ckpt["model_name"] != args.model or ckpt["dit_config"] != cfg:
            raise ValueError(f"{out} holds {ckpt['model_name']} {ckpt['dit_config']}, not {args.model} {cfg}")
        if ckpt.get("finished"):
            log(d, f"stage dit: {out} is finished, skipping")
            return out
        model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["opt"])
        step, history = ckpt["step"], ckpt["history"]
        log(d, f"stage dit: resuming {out} at step {step}")
    if encoder is not None:
        with torch.no_grad():
            probe = torch.from_numpy(np.array(np.load(os.path.join(data.folder, "images.npy"), mmap_mode="r")[:16]))
            Z = sm.resize_token_grid(sm.encode_repa_target(encoder, probe.permute(0, 3, 1, 2).to(d.device),
                                                           args.image_size),
                                     model.grid_size)
        log(d, f"REPA target {args.repa_target}: directional spectral energy raw "
               f"{float(sm.directional_spectral_energy(Z)):.4f}, target "
               f"{float(sm.directional_spectral_energy(repa_targets_for_tokens(Z, args, model.grid_size))):.4f}")
    lat_mean = torch.tensor(meta["latent_mean"], device=d.device).view(1, -1, 1, 1)
    lat_std = torch.tensor(meta["latent_std"], device=d.device).view(1, -1, 1, 1)
    runner = d.wrap(model)
    runner = torch.compile(runner) if args.compile else runner
    loader = make_loader(data, args.dit_batch, d, args.seed, step, args.num_workers)
    vae = vae_from_source(meta["vae"], d.device).eval() if d.main else None
    last = min(args.dit_steps, step + args.max_steps) if args.max_steps else args.dit_steps
    bar = tqdm_bar(d, step, args.dit_steps, "stage dit")
    t0, s0 = time.time(), step
    while step < last:
        crash_point("step", step)
        mom, y, img = next(loader)
        flip, eps, t, noise, drop = (d.shard(a) for a in dit_batch_randomness(args, step, args.dit_batch, latent_shape))
        mom = mom[torch.arange(len(mom)), flip].to(d.device, non_blocking=True)        # (b, 2, C, h, w)
        z = (mom[:, 0] + mom[:, 1] * eps.to(d.device) - lat_mean) / lat_std
        y = None if cfg["num_classes"] == 0 else y.to(d.device)
        model.train()
        with d.autocast():
            targets = None
            if encoder is not None:
                targets = [repa_targets_for(encoder, img.to(d.device), flip.to(d.device), args, model.grid_size)]
            terms = sm.flow_loss(runner, z, y, t=t.to(d.device), noise=noise.to(d.device), drop_ids=drop.to(d.device),
                                 repa_targets=targets, repa_lambda=args.repa_lambda, cos_weight=args.cos_weight)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        logged, gnorm = host_values({k_: v.mean() for k_, v in terms.items() if k_ != "t"}, gnorm)
        check_finite(step, logged, gnorm)
        opt.step()
        update_ema(ema, model, args.ema)
        step += 1
        bar.update(1)
        if step % args.log_every == 0:
            history.append(dict(step=step, **logged))
        if step % args.log_every == 0 and d.main:
            bar.set_postfix({**{k_: f"{v:.4f}" for k_, v in logged.items()},
                             "steps/s": f"{(step - s0) / (time.time() - t0):.2f}"})
        if d.main and (step % args.vis_every == 0 or step == args.dit_steps):
            labels = None if cfg["num_classes"] == 0 else [i % cfg["num_classes"] for i in range(16)]
            z0 = sample_latents(ema, range(16), labels, latent_shape, args.seed, d.device,
                                steps=args.sample_steps, cfg_scale=args.cfg_scale)
            save_grid(to_uint8(decode_latents(vae, z0, meta)), os.path.join(args.out, "samples.png"), 8)
        if step % args.ckpt_every == 0 or step == last:
            if d.main:
                save(dict(kind="dit", model_name=args.model, dit_config=cfg, model=model.state_dict(),
                          ema=ema.state_dict(), finished=step == args.dit_steps, args=vars(args), history=history,
                          latent_mean=meta["latent_mean"], latent_std=meta["latent_std"],
                          vae=meta["vae"], image_size=meta["image_size"],
                          **checkpoint_state(d, step, opt=opt.state_dict())), out, step)
            d.barrier()
    bar.close()
    return out


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


def bench_dit(args, d, latent_shape):
    """Images/s of forward+backward+step; on CUDA also MFU against the measured bf16 matmul rate."""
    C, h, _ = latent_shape
    B = args.dit_batch // d.world
    cfg = dit_config(args, dict(latent_shape=latent_shape, num_classes=1000), 768 if args.repa_encoder != "none" else 0)
    model = build_dit(args.model, cfg).to(d.device)
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
    if not os.path.exists(npz):
        sample.generate(os.path.join(args.out, "dit.pt"), args.num_fid_samples, os.path.dirname(npz), d,
                        steps=args.sample_steps, cfg_scale=args.cfg_scale, seed=args.seed)
    if d.main:
        metrics = evaluate.pipeline_metrics(args, npz, d.device)
        metrics["minutes"] = (time.time() - t0) / 60
        write_json(metrics, os.path.join(args.out, "metrics.json"))
        log(d, json.dumps(metrics, indent=1))
    d.barrier()
    return args.out


COMPARE_METRICS = (("psnr", "PSNR"), ("ssim", "SSIM"), ("spectrum_kl", "spectrum KL"), ("dsm_psnr", "DSM PSNR"),
                   ("dit_val_loss", "DiT val loss"), ("swd", "SWD"), ("fid", "FID"))


def run_compare(args, d):
    """The quickstart budget once per --reg preset, same seed; one table of diffusability metrics."""
    root, rows = args.out, {}
    for reg in REG_PRESETS:
        a = argparse.Namespace(**vars(args))
        for k, v in REG_PRESETS[reg].items():
            setattr(a, k, v)
        a.reg, a.out = reg, os.path.join(root, reg.replace("+", "_"))
        run_all(a, d)
        with open(os.path.join(a.out, "metrics.json")) as f:
            rows[reg] = json.load(f)
    if d.main:
        cols = [(k, name) for k, name in COMPARE_METRICS if any(k in r for r in rows.values())]
        lines = ["| reg | " + " | ".join(name for _, name in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for reg, r in rows.items():
            lines.append(f"| {reg} | " + " | ".join(f"{r[k]:.4g}" if k in r else "-" for k, _ in cols) + " |")
        table = "\n".join(lines)
        with open(os.path.join(root, "compare.md"), "w") as f:
            f.write(table + "\n")
        print(table)
    return rows


def main(argv=None):
    args = get_args(argv)
    d = Dist()
    try:
        if args.stage == "vae":
            train_vae(args, d)
        elif args.stage == "latents":
            encode_latents(args, d)
        elif args.stage == "dit":
            train_dit(args, d)
        elif args.stage == "compare":
            run_compare(args, d)
        else:
            run_all(args, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
