"""CPC: Representation Learning with Contrastive Predictive Coding. van den Oord, Li & Vinyals, arXiv:1807.03748
(v1, Sec. 3.2 on images). v2: Data-Efficient Image Recognition with Contrastive Predictive Coding, Hénaff et al.,
ICML 2020, arXiv:1905.09272 (Sec. 2-4, App. A.2).

Each image is cut into an overlapping G x G grid of patches x_ij; an encoder f maps every patch to a vector, mean-
pooled over its pixels: z_ij = f(x_ij). A masked (causal) convolutional network g_ar summarises the rows above:
c_ij = g_ar({z_uv : u <= i}). From c_ij a linear map W_k per offset k predicts the target of the patch k rows
below, t_{i+k,j} = T(z_{i+k,j}) (a 1x1 conv), and InfoNCE (v1 Eq. 4) makes it pick that target out of every
target of the global batch (all positions of all images):
    L = - sum_k mean_{i,j,n} log exp(p^k_ij . t_{i+k,j}) / sum_{t in batch} exp(p^k_ij . t),   p^k_ij = W_k c_ij
Under torchrun the targets are gathered from every process WITH their gradient (as simclr.py gathers z).
--version v2 (default; arXiv:1905.09272): LayerNorm in the encoder (BN would leak information between the patches
of one image), patch augmentation (colour dropping, flip, a random crop inside each patch), offsets +3..+5
(App. A.2) and predictions in four directions (down, up, right, left: "up to four times as many prediction
tasks"). --version v1 (Sec. 3.2): no normalisation in the encoder ("We did not use Batch-Norm"), each image
flipped with p 0.5 and made greyscale, each patch a random (p - p/16)-side window padded back, offsets +1..+5,
downwards only.
Closest sibling: `diff cpc.py simclr.py` (SimCLR's positive is a second view of the image, CPC's a patch further
down it). Evaluation: kNN and linear probe on the mean of the un-augmented grid's patch latents. No official code
was released: this file follows the papers, the v2 pseudo-code (App. A.2) and the public ports it cites
(wilson1yan/cs294-158-ssl deepul_helper/tasks/cpc.py; pl_bolts' CIFAR recipe); every choice where they leave a
value open is marked "Deviation:" and listed in the README.

    python cpc.py                                       # built-in shapes: a few minutes on a laptop CPU
    python cpc.py --data cifar10                        # 8-px patches at stride 4 of the 32-px images
    python cpc.py --data stl10                          # 16-px patches at stride 8 of 64-px crops
    python cpc.py --data /path/to/imagenet              # 64-px patches at stride 32 of 256-px crops (7 x 7)
    torchrun --nproc_per_node=8 cpc.py --data /path/to/imagenet    # 8 GPUs, --batch-size is the global batch

Result on the built-in shapes, CPU, tiny backbone: `python cpc.py --max-steps 100` (100 of the demo's 936 steps)
reaches kNN top-1 33.3% (linear probe 83.6%) against 27.1% (65.8%) for its random init evaluated the same way
(seed 0; seeds 1, 2: 34.0% vs 28.5%, 36.1% vs 28.1%). GPU numbers are still to be measured.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import (
    ARCHS,
    Logger,
    StopSignal,
    TrainLoader,
    UserError,
    ViewAug,
    autocast_for,
    build_backbone,
    check_finite,
    collapse_std,
    cosine_lr,
    evaluate,
    finished,
    gather,
    int_at_least,
    load_checkpoint,
    load_data,
    nonnegative_float,
    nonnegative_int,
    pick_recipe,
    positive_float,
    positive_int,
    prepare_output_dir,
    process_rank,
    rank_checksums,
    run,
    save_atomic,
    seed_int,
    setup,
)

# ---- ARGUMENTS ---------------------------------------------------------------------------------------------
# Flags left at None take the recipe's value (RECIPES below): CIFAR-scale images get the small-image recipe.
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument(
    "--data",
    default="builtin",
    help="builtin, cifar10, cifar100, stl10, fashion-mnist, or an "
    "image folder DIR/train/<class>/<image> (DIR/val/... used for evaluation)",
)
parser.add_argument("--data-dir", default="data", help="where cifar10/cifar100/stl10/fashion-mnist live")
parser.add_argument("--arch", default=None, choices=ARCHS, help="patch encoder (recipe)")
parser.add_argument("--image-size", type=positive_int, default=None, help="crop side the grid is cut from (recipe)")
parser.add_argument("--epochs", type=positive_int, default=None, help="(recipe)")
parser.add_argument("--batch-size", type=positive_int, default=None, help="global batch over all processes (recipe)")
parser.add_argument("--lr", type=positive_float, default=None, help="Adam lr, not scaled with the batch (recipe)")
parser.add_argument("--wd", type=nonnegative_float, default=None, help="weight decay (recipe)")
parser.add_argument("--workers", type=nonnegative_int, default=8, help="DataLoader workers per process (image folders)")
parser.add_argument("--output-dir", default=None, help="run folder (default runs/cpc-<data>-<time>)")
parser.add_argument("--resume", default=None, help="a ckpt.pt, or 'auto': the output dir's ckpt.pt if any")
parser.add_argument("--seed", type=seed_int, default=0, help="weights: seed; data order: seed; augmentation: seed+rank")
parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto: bf16 on CUDA")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument(
    "--max-steps", type=nonnegative_int, default=None, help="stop after this many steps (schedule unchanged)"
)
parser.add_argument("--log-every", type=positive_int, default=50, help="steps between metric flushes / progress lines")
parser.add_argument(
    "--eval-every",
    type=int_at_least(-1),
    default=1,
    help="epochs between kNN evaluations; 0: only kNN + linear probe at the end; -1: never",
)
parser.add_argument("--knn-k", type=positive_int, default=None, help="kNN neighbours (recipe)")
parser.add_argument("--knn-t", type=positive_float, default=None, help="kNN temperature (recipe)")
parser.add_argument("--version", default="v2", choices=["v1", "v2"], help="v1: arXiv:1807.03748, v2: 1905.09272")
parser.add_argument("--patch-size", type=positive_int, default=None, help="patch side; default image-size / 4")
parser.add_argument(
    "--steps-to-ignore", type=nonnegative_int, default=None, help="offsets start at this + 1 (v1 0, v2 2)"
)
parser.add_argument(
    "--steps-to-predict", type=positive_int, default=None, help="how many offsets, in rows (v1 5, v2 3)"
)
parser.add_argument("--target-dim", type=positive_int, default=64, help="targets t = 1x1 conv(z) (App. A.2: 64)")
parser.add_argument("--context-dim", type=positive_int, default=None, help="PixelCNN bottleneck (recipe; A.2: 256)")

# ImageNet: 256-px crops cut into 64-px patches at stride 32, a 7 x 7 grid (v1 Sec. 3.2); Adam lr 2e-4, batch 512
# (v1 Sec. 3.2: 32 GPUs x 16; Deviation: v1 names no betas, eps or weight decay: torch's defaults, wd 0); kNN as
# DINO. Deviation: v2 uses the same 64/32 geometry here; v2's own patch size and stride (recalled as 80-px patches,
# not verified against the paper's body) are not followed. Deviation: a post-activation torchvision ResNet-50, all
# four stages (as the deepul port; v1: the first three stacks of a ResNet-v2-101, v2: a ResNet-161 third stack);
# 200 epochs and the cosine schedule: the sources leave these open.
IMAGENET = dict(arch="resnet50", image_size=256, epochs=200, batch_size=512, lr=2e-4, wd=0.0, betas=(0.9, 0.999))
IMAGENET |= dict(eps=1e-8, context_dim=256, knn_k=20, knn_t=0.07)
# pl_bolts (CIFAR-10): 8-px patches at stride 4 of 32 px (7 x 7), Adam betas (0.8, 0.999), eps 1e-7, wd 1e-5
# (cpc_module.py configure_optimizers); lr 4e-5, batch 64, 1000 epochs (its docs' CIFAR-10 row, models/
# self_supervised.rst; cpc_module.py's own defaults are lr 1e-4, CLI 1e-5, batch 128); kNN k 200, T 0.1 (InstDisc).
# Deviation: a CIFAR ResNet-18 encoder (the CIFAR stem on 8-px patches; pl_bolts uses its ResNet-101 variant), to
# keep (B * 49)^2 logits per offset and the encoder within one GPU. Deviation: pl_bolts' image-level augmentation
# (flip, RandomTranslateWithReflect(4) p 0.8, ColorJitter(0.4, 0.4, 0.4, 0.2) p 0.8, grayscale p 0.25, no per-patch
# augmentation) is replaced by the paper's per-patch one, its constant lr by a cosine, and its STL-10 recipe (lr
# 1e-4, batch 144, RandomResizedCrop 64 with scale (0.3, 1)) by the CIFAR values on a 64-px whole image: we follow
# the papers' augmentation over the port's.
SMALL = dict(arch="resnet18", epochs=1000, batch_size=64, lr=4e-5, wd=1e-5, betas=(0.8, 0.999), eps=1e-7)
SMALL |= dict(context_dim=256, knn_k=200, knn_t=0.1)
# `python cpc.py`: the built-in shapes as a few-minute demo (pick_recipe uses the tiny backbone on CPUs).
# Deviation: batch 32, lr 2e-3 (pl_bolts' 4e-5 is for 1000 epochs), 3 epochs, a 32-wide PixelCNN, and offsets from
# +1 (v2: +1..+3): with v2's +3..+5 kNN fell below the random init's after 100 steps (README), so the demo learns.
BUILTIN = dict(epochs=3, batch_size=32, lr=2e-3, context_dim=32, steps_to_ignore=0)
RECIPES = {
    # v1 Sec. 3.2: "predict up to five rows" below: offsets +1..+5. No normalisation in the encoder.
    "v1": {
        "imagenet": IMAGENET | dict(steps_to_ignore=0, steps_to_predict=5),
        "small": SMALL | dict(steps_to_ignore=0, steps_to_predict=5),
        "builtin": BUILTIN,
    },
    # v2 App. A.2: steps_to_ignore 2, steps_to_predict 3. Its printed `range(steps_to_ignore, steps_to_predict)`
    # would give one offset; we read it as the deepul port does (deepul_helper/tasks/cpc.py: rows +3, +4, +5).
    # (With 64-px patches at stride 32, row +2 already shares no pixel with row i; +3 is the first with a gap.)
    # LayerNorm in the encoder (Sec. 4.1).
    "v2": {
        "imagenet": IMAGENET | dict(steps_to_ignore=2, steps_to_predict=3),
        "small": SMALL | dict(steps_to_ignore=2, steps_to_predict=3),
        "builtin": BUILTIN,
    },
}
EMB_SCALE = 0.1  # App. A.2: predictions are 0.1 * W_k(c); no temperature
# (axis of the grid, sign): down = rows below (i + k), up, right = columns to the right (j + k), left.
DIRECTIONS = {"v1": [(2, 1)], "v2": [(2, 1), (2, -1), (3, 1), (3, -1)]}


# ---- AUGMENTATION RECIPE -----------------------------------------------------------------------------------
def view_recipe(size, small, version):
    """The image-level view the grid is cut from. ImageNet (v1 Sec. 3.2): a random 256 x 256 crop of the image
    resized to 300 x 300, here a square crop of 73% of the area ((256/300)^2) resized to `size`. Small images: the
    whole image (Deviation: pl_bolts crops STL-10 with RandomResizedCrop 64, scale (0.3, 1)). v1 Sec. 3.2: the
    image flipped with p 0.5 and converted to greyscale (3 equal channels); v2: no colour change or flip here
    (both happen per patch)."""
    scale = (1.0, 1.0) if small else ((256 / 300) ** 2,) * 2
    flip_p, gray_p = (0.5, 1.0) if version == "v1" else (0.0, 0.0)
    return [ViewAug(size, scale=scale, ratio=(1.0, 1.0), flip_p=flip_p, jitter_p=0.0, gray_p=gray_p)]


def patch_grid(x, patch, stride):
    """(N, C, S, S) -> (N, G, G, C, patch, patch), G = (S - patch) // stride + 1, cut with unfold on the device:
    patch (i, j) is x[:, :, i*stride : i*stride + patch, j*stride : j*stride + patch]; i counts rows (top down)."""
    return x.unfold(2, patch, stride).unfold(3, patch, stride).permute(0, 2, 3, 1, 4, 5)


def augment_patches(patches, gen, version="v2"):
    """Patch augmentation, drawn per patch from `gen`, on normalised patches (M, C, p, p):
    - v2 (Sec. 4.1): colour dropping (Doersch et al. 2015): keep one random colour channel, the other two set to 0
      (Deviation: 0 is the mean; Doersch et al. fill the dropped channels with Gaussian noise);
    - v2: a horizontal flip with p 0.5 per patch (our reading of the papers' "flip");
    - v1 and v2: a random window of side p - p/16 of the patch, padded back centred with 0 (v1 Sec. 3.2: "a random
      60x60 subcrop [of each 64x64 crop], pad them back to a 64x64 image"), so its content moves by up to 2 px of 64:
      v2 Sec. 4.1 calls this "spatially jitters individual patches". Deviation: where the pad goes is not given;
      centred is our reading (the deepul port instead zeroes the border around the window in place: no shift).
    Deviation: v2's further augmentations (colour jitter, grayscale, elastic deformations, and the others its
    appendix lists) are left out."""
    m, c, p, _ = patches.shape
    dev = patches.device
    if version == "v2":
        keep = F.one_hot(torch.randint(c, (m,), device=dev, generator=gen), c).to(patches.dtype)
        patches = patches * keep[:, :, None, None]
        flip = torch.rand(m, device=dev, generator=gen) < 0.5
        patches = torch.where(flip[:, None, None, None], patches.flip(-1), patches)
    side = p - max(1, p // 16)
    off = (p - side) // 2  # the window lands at [off, off + side): its content moves by off - top, off - left
    top, left = torch.randint(p - side + 1, (2, m, 1), device=dev, generator=gen)
    pos = torch.arange(p, device=dev)
    rows, cols = (pos + top - off).clamp(0, p - 1), (pos + left - off).clamp(0, p - 1)  # (m, p): source pixel
    n_idx, c_idx = torch.arange(m, device=dev)[:, None, None, None], torch.arange(c, device=dev)[:, None, None]
    moved = patches[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]  # (m, c, p, p), shifted
    inside = (pos >= off) & (pos < off + side)
    return moved * (inside[:, None] & inside).to(patches.dtype)


# ---- MODEL -------------------------------------------------------------------------------------------------
class PixelCNN(nn.Module):
    """The context network g_ar of v2 App. A.2: 5 residual blocks of [1x1 -> hidden, ReLU, 1x3 (same), pad one
    row on top, 2x1 (valid), ReLU, 1x1 -> D] and a final ReLU. The 2x1 valid conv over a top-padded grid gives
    row i a view of rows i-1 and i only, so after 5 blocks c_ij depends on rows <= i (and on every column).
    Deviation: v1 uses it too (v1 Sec. 3.2 says only "a PixelCNN-style autoregressive model"); every layer here and
    in CPC keeps PyTorch's default initialisation (the papers give none)."""

    def __init__(self, dim, hidden=256, blocks=5):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, hidden, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1)),
                nn.ZeroPad2d((0, 0, 1, 0)),  # one row on top: the causal mask
                nn.Conv2d(hidden, hidden, (2, 1)),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, dim, 1),
            )
            for _ in range(blocks)
        )

    def forward(self, z):  # (N, D, G, G) -> (N, D, G, G)
        for block in self.blocks:
            z = z + block(z)
        return F.relu(z)


class CPC(nn.Module):
    """Patch encoder f (backbone), context network g_ar, target map T (1x1 conv) and one prediction map W_k per
    offset and direction (1x1 convs, one per offset as App. A.2's loop over k; not shared across offsets as
    pl_bolts' loss does). Directions (axis, sign) as DIRECTIONS: v2 also predicts up, right and left: the same g_ar
    runs over the grid turned upside down (c_ij sees rows >= i), transposed (columns <= j) or both (columns >= j).
    Deviation: the papers do not say how the other contexts are computed; sharing g_ar across directions and giving
    each direction its own W_k are our choices."""

    def __init__(self, backbone, offsets, directions, target_dim=64, context_dim=256):
        super().__init__()
        self.backbone, self.offsets, self.directions = backbone, offsets, directions
        d = backbone.out_dim
        self.context = PixelCNN(d, context_dim)
        self.target = nn.Conv2d(d, target_dim, 1)
        self.predictors = nn.ModuleList(nn.Conv2d(d, target_dim, 1) for _ in range(len(offsets) * len(directions)))

    def directed_context(self, z, axis, sign):
        """g_ar over the grid turned so that its rows run along `axis` in the direction `sign`, turned back."""
        z = z.transpose(2, 3) if axis == 3 else z
        c = self.context(z.flip(2)).flip(2) if sign < 0 else self.context(z)
        return c.transpose(2, 3) if axis == 3 else c

    def forward(self, patches):
        """patches (N, G, G, C, p, p) -> predictions (K, N, target_dim, G, G) for each (direction, offset) in
        order (direction 1: k1, k2, ...; direction 2: ...), targets (N, target_dim, G, G)."""
        n, g = patches.shape[:2]
        z = self.backbone(patches.flatten(0, 2).contiguous(memory_format=torch.channels_last))  # (N*G*G, D)
        z = z.view(n, g, g, -1).permute(0, 3, 1, 2)  # (N, D, G, G): z_ij, mean-pooled by the backbone
        contexts = [c for a, s in self.directions for c in [self.directed_context(z, a, s)] * len(self.offsets)]
        preds = torch.stack([EMB_SCALE * w(c) for w, c in zip(self.predictors, contexts)])
        return preds, self.target(z)


class GridEncoder(nn.Module):
    """What evaluation sees: images (B, C, S, S) -> the mean of the un-augmented grid's patch latents (B, D) (v1
    Sec. 3.2: the linear classifier sees the 7x7 grid mean-pooled). Deviation: in colour for v1 too, which trains on
    greyscale images; v1 does not say what its classifier saw."""

    def __init__(self, backbone, patch, stride):
        super().__init__()
        self.backbone, self.patch, self.stride = backbone, patch, stride

    def forward(self, x):
        patches = patch_grid(x, self.patch, self.stride)
        z = self.backbone(patches.flatten(0, 2).contiguous(memory_format=torch.channels_last))
        return z.view(len(x), -1, z.shape[-1]).mean(1)


def make_backbone(args, small):
    """The patch encoder f. v2 Sec. 4.1: LayerNorm in place of BatchNorm (BN statistics mix the patches of one
    image, which the task can exploit); as a GroupNorm with one group, i.e. LayerNorm over (C, H, W) with a scale
    and offset per channel. v1 Sec. 3.2: no normalisation ("We did not use Batch-Norm"): nn.Identity where the
    ResNet has BN, so backbone.pt loads into torchvision's resnet(norm_layer=lambda c: nn.Identity()) (no bn keys)."""
    norm = (lambda c: nn.GroupNorm(1, c)) if args.version == "v2" else (lambda c: nn.Identity())
    return build_backbone(args.arch, args.patch_size, small, norm_layer=norm)


def make_optimizer(model, args):
    """Adam (v1 Sec. 3.2; pl_bolts), weight decay on every weight as torch.optim.Adam applies it."""
    return torch.optim.Adam(model.parameters(), lr=args.lr, betas=args.betas, eps=args.eps, weight_decay=args.wd)


def learning_rate(step, steps_per_epoch, args):
    """Deviation: a per-step cosine from --lr to 0 without warmup; the papers do not give a schedule and pl_bolts
    keeps the lr constant."""
    return cosine_lr(step, args.epochs * steps_per_epoch, args.lr)


# ---- LOSS --------------------------------------------------------------------------------------------------
def cpc_loss(preds, targets, offsets, directions):
    """InfoNCE (v1 Eq. 4, v2 App. A.2): each prediction p^k_ij scores against every target of the global batch
    (every position of every image of every process, gathered WITH gradient); its positive is the target at
    (i + k, j) of its own image (up: (i - k, j); right, left: (i, j +- k)). The loss is the sum over (direction,
    offset) of the mean over the local predictions; with DDP averaging gradients this is the one-process
    global-batch gradient (simclr.py). Deviation: the papers do not say which targets are the negatives (the deepul
    port uses its process's batch); we use the whole global batch, so the loss does not depend on the process count."""
    n, d, g, _ = targets.shape
    big = gather(targets.permute(0, 2, 3, 1).reshape(-1, d), grad=True)  # (W*N*G*G, d): row (n, i, j)
    index = torch.arange(n * g * g, device=targets.device).view(n, g, g) + process_rank() * n * g * g
    loss = 0.0
    for p, ((axis, sign), k) in zip(preds, [(d, k) for d in directions for k in offsets]):
        # sign > 0: rows (columns) 0..G-k-1 predict rows k..G-1; sign < 0: k..G-1 predict 0..G-k-1
        src, dst = (slice(None, g - k), slice(k, None)) if sign > 0 else (slice(k, None), slice(None, g - k))
        if axis == 2:
            p, labels = p[:, :, src], index[:, dst]
        else:
            p, labels = p[:, :, :, src], index[:, :, dst]
        logits = p.permute(0, 2, 3, 1).reshape(-1, d) @ big.T  # (N*(G-k)*G, W*N*G*G)
        loss = loss + F.cross_entropy(logits, labels.reshape(-1))
    return loss


def main():
    args = parser.parse_args()
    # ---- SETUP -------------------------------------------------------------------------------------------
    env = setup(args.device, args.seed)
    data = load_data(args.data, args.data_dir, env.device)
    if args.image_size is None and data.name == "stl10":
        args.image_size = 64  # pl_bolts: STL-10 crops of 64 px, 16-px patches at stride 8
    recipe = pick_recipe(RECIPES[args.version], data, env, args)
    small = recipe != "imagenet"  # CIFAR-scale images: CIFAR stem
    args.patch_size = args.patch_size or max(1, args.image_size // 4)
    stride = max(1, args.patch_size // 2)  # half-overlapping patches (v1 Sec. 3.2: 64 px at stride 32)
    offsets = list(range(args.steps_to_ignore + 1, args.steps_to_ignore + args.steps_to_predict + 1))
    grid = (args.image_size - args.patch_size) // stride + 1 if args.patch_size <= args.image_size else 0
    if grid <= offsets[-1]:
        raise UserError(
            f"a {grid} x {grid} grid ({args.patch_size}-px patches at stride {stride} of {args.image_size} px) has "
            f"no row {offsets[-1]} below row 0; lower --steps-to-ignore/--steps-to-predict or --patch-size"
        )
    resume = prepare_output_dir(args, "cpc", env)
    config = dict(vars(args), input_mean=list(data.mean), input_std=list(data.std))  # what backbone.pt expects
    out, autocast = Path(args.output_dir), autocast_for(env, args.dtype)

    # ---- DATA, MODEL, OPTIMIZER --------------------------------------------------------------------------
    views = view_recipe(args.image_size, small, args.version)
    loader = TrainLoader(data, views, args.batch_size, env, args.seed, args.workers)
    backbone = make_backbone(args, small)
    model = CPC(backbone, offsets, DIRECTIONS[args.version], args.target_dim, args.context_dim)  # no BN: no SyncBN
    model = model.to(env.device, memory_format=torch.channels_last)
    encoder = GridEncoder(model.backbone, args.patch_size, stride)  # evaluation: mean-pooled un-augmented grid
    optimizer = make_optimizer(model, args)
    train_model = torch.compile(model) if args.compile else model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )

    # ---- RESUME ------------------------------------------------------------------------------------------
    step, steps_per_epoch = 0, len(loader)
    if resume:
        ckpt = load_checkpoint(resume, "cpc", config, model)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["aug_rng"]) == env.world_size:  # else (another process count) the run goes on, not bitwise
            loader.gen.set_state(ckpt["aug_rng"][env.rank])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]

    def save():
        """ckpt.pt (all a resume needs) and backbone.pt (the patch encoder; torchvision keys), each atomically."""
        check_finite(model, optimizer, env, step, out)  # a diverged run keeps its last good checkpoint
        states = [loader.gen.get_state()] * env.world_size  # every rank's augmentation RNG, gathered to rank 0
        if env.world_size > 1:
            dist.all_gather_object(states, loader.gen.get_state())
        checksums = rank_checksums(model, env)  # equal on every rank, or the ranks drifted apart
        if env.is_main:
            save_atomic(
                {
                    "method": "cpc",
                    "config": config,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "aug_rng": states,
                    "rank_checksums": checksums,
                    "rng": torch.get_rng_state(),
                },
                out / "ckpt.pt",
            )
            save_atomic(model.backbone.state_dict(), out / "backbone.pt")

    # ---- TRAIN -------------------------------------------------------------------------------------------
    total_steps = args.epochs * steps_per_epoch
    last_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    if resume and finished(resume, step, last_step, total_steps, env):  # nothing left to train: exit 0
        return
    logger, stop = Logger(out, env, last_step, args.batch_size, step), StopSignal()  # drops rows of steps to redo
    logger.print(
        f"cpc {args.version}: {data.describe(recipe)}, {grid} x {grid} grid of {args.patch_size}-px patches at "
        f"stride {stride}, offsets {offsets}{' in 4 directions' if args.version == 'v2' else ''}, {steps_per_epoch} "
        f"steps/epoch, {env.world_size} process(es) on {env.device}, starting at step {step}\n{json.dumps(config)}"
    )
    if env.is_main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    stds = []  # collapse diagnostic of each step of the epoch
    while step < last_step:
        epoch, stds = step // steps_per_epoch, []
        for (x,) in loader.epoch(epoch, start=step % steps_per_epoch):
            lr_now = learning_rate(step, steps_per_epoch, args)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            patches = patch_grid(x, args.patch_size, stride)  # (N, G, G, C, p, p)
            # v1 Sec. 3.2, v2 Sec. 4.1: every patch augmented on its own
            patches = augment_patches(patches.flatten(0, 2), loader.gen, args.version).view(patches.shape)
            with autocast():  # z = f(x_ij), c = g_ar(z), p^k = W_k c, t = T(z)
                preds, targets = train_model(patches)
            # InfoNCE over the global batch's targets, in float32 whatever the autocast dtype.
            loss = cpc_loss(preds.float(), targets.float(), offsets, DIRECTIONS[args.version])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            logger.step(step, epoch, loss, lr_now)
            stds.append(collapse_std(targets.detach().permute(0, 2, 3, 1).flatten(0, 2)))  # of the targets t
            step += 1
            if step % args.log_every == 0 or step % steps_per_epoch == 0 or step == last_step:
                logger.flush(steps_per_epoch)
                if stop.requested(env):
                    save()
                    logger.print(f"stopped by a signal at step {step}; continue with --resume auto --output-dir {out}")
                    return
            if step == last_step:
                break
        if step % steps_per_epoch == 0 and step < last_step:  # a full epoch: diagnostics and a checkpoint
            check_finite(model, optimizer, env, step, out)  # before a diverged network is evaluated
            row = {"epoch": epoch, "step": step, "eval/collapse_std": torch.stack(stds).mean().item()}
            if args.eval_every > 0 and (epoch + 1) % args.eval_every == 0:
                row |= evaluate(encoder, data, env, args, autocast)
            logger.write([row])
            logger.print(json.dumps(row))
            save()
            logger.restart_clock()

    # ---- EVAL AND SAVE -----------------------------------------------------------------------------------
    # No eval/alignment, eval/uniformity (issue 13): CPC has no two views whose embeddings the loss pulls together,
    # and two draws of its image-level view are the same image for v2 on small data (README).
    save()
    row = {"epoch": max(step - 1, 0) // steps_per_epoch, "step": step, "final": True}
    if stds:
        row["eval/collapse_std"] = torch.stack(stds).mean().item()
    if args.eval_every >= 0:
        row |= evaluate(encoder, data, env, args, autocast, linear=True)
    logger.write([row])
    logger.print(json.dumps(row))


if __name__ == "__main__":
    run(main)
