"""MoCo: Momentum Contrast for Unsupervised Visual Representation Learning. He et al., CVPR 2020,
arXiv:1911.05722 (v1). v2: Improved Baselines with Momentum Contrastive Learning, Chen et al., arXiv:2003.04297.
v3: An Empirical Study of Training Self-Supervised Vision Transformers, Chen, Xie & He, ICCV 2021,
arXiv:2104.02057.

A query encoder f_q embeds one view of an image as q; a key encoder f_k, a momentum (EMA) copy of f_q that
gets no gradient (Eq. 2: theta_k <- m theta_k + (1 - m) theta_q, before the keys are computed), embeds the other
view as the positive key k+. InfoNCE (Eq. 1) picks k+ out of it and K negatives at temperature tau:
    L_q = -log exp(q . k+ / tau) / (exp(q . k+ / tau) + sum_i exp(q . k_i / tau))
--version v1: the negatives are a FIFO queue of the last K keys of all processes (Sec. 3.2); fc head; Shuffling
    BN across processes (Sec. 3.3); InstDisc augmentation; tau 0.07, step lr schedule.
--version v2 (arXiv:2003.04297): v1 + an MLP head, blur in the augmentation, tau 0.2, cosine lr schedule.
--version v3 (arXiv:2104.02057, Alg. 1): no queue: the negatives are the other keys of the global batch; a
    prediction head on the query side; symmetric loss 2 tau (ctr(q1, k2) + ctr(q2, k1)); BN heads, LARS with
    warmup (ResNet) or AdamW (ViT, with the patch projection frozen at random init and a fixed sin-cos position
    embedding, Sec. 4.2), momentum ramped from m to 1; BYOL's asymmetric augmentation.
Closest sibling: `diff simclr.py moco.py` (SimCLR takes its negatives from the batch, with one encoder).
Follows facebookresearch/moco (main_moco.py, moco/builder.py; the CIFAR demo colab/moco_cifar10_demo.ipynb) and
facebookresearch/moco-v3 (main_moco.py, moco/builder.py, moco/optimizer.py, vits.py, CONFIG.md); every
deviation from them is marked "Deviation:" below and listed in the README.

    python moco.py --version v2                         # built-in shapes: a few minutes on a laptop CPU
    python moco.py --version v2 --data cifar10          # the official CIFAR demo's recipe, downloads once
    python moco.py --version v3 --data /path/to/imagenet --arch vit_small   # ImageNet, ViT-S (Sec. 4)
    torchrun --nproc_per_node=8 moco.py --version v2 --data /path/to/imagenet   # --batch-size: the global 256

Result on the built-in shapes, 2-core CPU, tiny backbone: `--max-steps 200` (200 of the demo's 390 steps)
reaches kNN top-1 55.5% (linear probe 77.1%) for v1, 41.4% (66.4%) for v2 and 48.3% (76.9%) for v3, against
33.0% (54.2%) for the random-init network (seed 0; pixels: 22.0%). GPU numbers are still to be measured.
"""

import argparse
import copy
import functools
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import (
    ARCHS,
    LARS,
    Logger,
    StopSignal,
    TrainLoader,
    UserError,
    ViewAug,
    alignment_uniformity,
    autocast_for,
    build_backbone,
    check_finite,
    collapse_std,
    cosine_lr,
    epoch_mean,
    evaluate,
    finished,
    gather,
    hardest_negative_share,
    in_range,
    int_at_least,
    load_checkpoint,
    load_data,
    nonnegative_float,
    nonnegative_int,
    param_groups,
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
parser.add_argument("--arch", default=None, choices=ARCHS, help="backbone (recipe)")
parser.add_argument("--image-size", type=positive_int, default=None, help="crop side (recipe: native or 224)")
parser.add_argument("--epochs", type=positive_int, default=None, help="(recipe)")
parser.add_argument("--batch-size", type=positive_int, default=None, help="global batch over all processes (recipe)")
parser.add_argument(
    "--lr", type=positive_float, default=None, help="base lr; the run uses lr * batch-size / 256 (recipe)"
)
parser.add_argument("--wd", type=nonnegative_float, default=None, help="weight decay (recipe)")
parser.add_argument("--workers", type=nonnegative_int, default=8, help="DataLoader workers per process (image folders)")
parser.add_argument("--output-dir", default=None, help="run folder (default runs/moco-<data>-<time>)")
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
parser.add_argument(
    "--warmup-epochs", type=nonnegative_int, default=None, help="linear lr warmup, then the schedule (recipe)"
)
parser.add_argument("--lars-eta", type=positive_float, default=None, help="LARS trust coefficient (recipe, v3 ResNet)")
parser.add_argument("--lars-clip", action=argparse.BooleanOptionalAction, default=None, help="LARC clip (recipe)")
parser.add_argument("--version", default="v2", choices=["v1", "v2", "v3"], help="see the docstring")
parser.add_argument("--optimizer", default=None, choices=["sgd", "lars", "adamw"], help="(recipe)")
parser.add_argument("--schedule", default=None, choices=["step", "cosine"], help="step: x0.1 at 60%%, 80%% (recipe)")
parser.add_argument("--temperature", type=positive_float, default=None, help="InfoNCE tau (recipe)")
parser.add_argument("--moco-m", type=in_range(0, 1), default=None, help="key-encoder momentum m (recipe)")
parser.add_argument("--moco-m-cos", action=argparse.BooleanOptionalAction, default=None, help="ramp m to 1 (recipe)")
parser.add_argument("--queue-size", type=positive_int, default=None, help="K, keys in the queue (v1/v2; recipe)")
parser.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None, help="both views as query")
parser.add_argument(
    "--bn-splits",
    type=positive_int,
    default=None,
    help="split-BN sub-batches (v1/v2; default 8 on one process, 1 under torchrun)",
)
parser.add_argument(
    "--crop-min", type=in_range(0, 1, lo_open=True), default=None, help="smallest crop area fraction (recipe)"
)
parser.add_argument("--dim", type=positive_int, default=None, help="output size: 128 v1/v2, 256 v3 (recipe)")
parser.add_argument("--hidden-dim", type=positive_int, default=4096, help="v3 MLP hidden size")

# main_moco.py: ResNet-50, batch 256, SGD lr 0.03 (the README: scale linearly with the batch), momentum 0.9, wd
# 1e-4, 200 epochs, K 65536, m 0.999.
V1 = dict(arch="resnet50", epochs=200, batch_size=256, lr=0.03, wd=1e-4, optimizer="sgd", warmup_epochs=0)
V1 |= dict(queue_size=65536, moco_m=0.999, moco_m_cos=False, symmetric=False, dim=128, crop_min=0.2)
V1 |= dict(knn_k=20, knn_t=0.07)  # kNN as DINO reports it
# colab/moco_cifar10_demo.ipynb: CIFAR ResNet-18, batch 512, lr 0.06 (= 0.03 * 512/256), wd 5e-4, 200 epochs,
# K 4096, m 0.99, tau 0.1, 8 split-BN sub-batches on one GPU, crop (0.08, 1), no blur; kNN k 200, T 0.1.
DEMO = dict(arch="resnet18", epochs=200, batch_size=512, lr=0.03, wd=5e-4, queue_size=4096, moco_m=0.99)
DEMO |= dict(temperature=0.1, crop_min=0.08, knn_k=200, knn_t=0.1)
# moco-v3 main_moco.py + CONFIG.md (ResNet-50, 100 epochs): batch 4096, LARS lr 0.6 * bs/256 (eta 1e-3, ndim <= 1
# excluded), wd 1e-6, 10 warmup epochs, tau 1.0, m 0.99 ramped to 1, crop (0.2, 1).
V3 = dict(arch="resnet50", epochs=100, batch_size=4096, lr=0.6, wd=1e-6, optimizer="lars", lars_eta=1e-3)
V3 |= dict(lars_clip=False, warmup_epochs=10, schedule="cosine", temperature=1.0, moco_m=0.99, moco_m_cos=True)
V3 |= dict(symmetric=True, dim=256, crop_min=0.2, knn_k=20, knn_t=0.07)
# CONFIG.md (ViT-Small/Base): AdamW lr 1.5e-4 * bs/256, wd 0.1, 300 epochs, 40 warmup epochs, tau 0.2, crop
# (0.08, 1), patch projection frozen (--stop-grad-conv1). Used whenever --arch is a ViT.
V3_VIT = dict(epochs=300, lr=1.5e-4, wd=0.1, optimizer="adamw", warmup_epochs=40, temperature=0.2, crop_min=0.08)
# `python moco.py`: the built-in shapes as a few-minute demo (pick_recipe uses the tiny backbone on CPUs).
# Deviation: 10 epochs, batch 256 (v3: 1 warmup epoch), so that 10 short epochs show learning.
BUILTIN = dict(epochs=10, batch_size=256)
RECIPES = {
    "v1": {
        "imagenet": V1 | dict(schedule="step", temperature=0.07),
        # the demo's settings with v1's head, augmentation (crop (0.2, 1)) and step schedule
        "small": V1 | DEMO | dict(schedule="step", crop_min=0.2),
        "builtin": BUILTIN,
    },
    "v2": {
        "imagenet": V1 | dict(schedule="cosine", temperature=0.2),
        "small": V1 | DEMO | dict(schedule="cosine"),
        "builtin": BUILTIN,
    },
    "v3": {
        "imagenet": V3,
        # no official CIFAR recipe: solo-learn's CIFAR MoCo v3 (scripts/pretrain/cifar/mocov3.yaml): ResNet-18,
        # batch 256, LARS lr 0.3 (eta 0.02, LARC clip), wd 1e-6, 1000 epochs, tau 0.2, crop (0.08, 1), no blur.
        "small": V3
        | dict(arch="resnet18", epochs=1000, batch_size=256, lr=0.3, lars_eta=0.02, lars_clip=True)
        | dict(temperature=0.2, crop_min=0.08, knn_k=200, knn_t=0.1),
        "builtin": BUILTIN | dict(warmup_epochs=1),
    },
}


# ---- AUGMENTATION RECIPE -----------------------------------------------------------------------------------
def view_recipe(size, small, version, crop_min):
    """v1 (main_moco.py, InstDisc's): crop (crop_min, 1), grayscale p 0.2, then colour jitter (0.4, 0.4, 0.4, 0.4)
    always (in this order: a hue shift changes the luma of the colour image), flip. v2 (main_moco.py
    --aug-plus): crop, jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, blur sigma in [0.1, 2] with p 0.5,
    flip. v3 (moco-v3 main_moco.py, BYOL's recipe in torchvision's ops): jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
    grayscale p 0.2, blur p 1.0 on view 1 and 0.1 + solarize p 0.2 on view 2. No blur on small images (the
    CIFAR demo). Colour ops are torchvision's ColorJitter. Deviation: blur is a Gaussian kernel of 10% of the
    image side (as SimCLR) rather than PIL's GaussianBlur(radius=sigma) (moco/loader.py)."""
    scale = (crop_min, 1.0)
    if version == "v1":
        view = ViewAug(size, scale=scale, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_first=True)
        return [view, view]
    if version == "v2":
        view = ViewAug(size, scale=scale, jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.0 if small else 0.5)
        return [view, view]
    view1 = ViewAug(size, scale=scale, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.0 if small else 1.0)
    view2 = ViewAug(size, scale=scale, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.0 if small else 0.1, solarize_p=0.2)
    return [view1, view2]


# ---- MODEL -------------------------------------------------------------------------------------------------
class SplitBatchNorm(nn.BatchNorm2d):
    """One process emulating Shuffling BN (the CIFAR demo's SplitBatchNorm): in training, BN statistics are
    computed over `splits` interleaved sub-batches, as `splits` GPUs would each compute over their share; the
    running statistics are the mean over sub-batches. In eval it is a plain BatchNorm2d (same state_dict keys)."""

    def __init__(self, num_features, splits):
        super().__init__(num_features)
        self.splits = splits

    def forward(self, x):
        if not self.training or self.splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.splits
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        # (n, c, h, w) -> (n/s, s*c, h, w): image i falls in sub-batch i mod s, each with its own statistics
        y = F.batch_norm(
            x.reshape(n // s, s * c, h, w),
            mean,
            var,
            self.weight.repeat(s),
            self.bias.repeat(s),
            True,
            self.momentum,
            self.eps,
        )
        self.running_mean.copy_(mean.view(s, c).mean(0))
        self.running_var.copy_(var.view(s, c).mean(0))
        self.num_batches_tracked.add_(1)
        return y.view(n, c, h, w)


def mlp(layers, in_dim, hidden_dim, out_dim, last_bn=True):
    """moco-v3 builder.py _build_mlp: bias-free Linear layers, BN + ReLU after each hidden one, and a BN without
    affine parameters after the last if `last_bn`."""
    mods = []
    for i in range(layers):
        d1, d2 = in_dim if i == 0 else hidden_dim, out_dim if i == layers - 1 else hidden_dim
        mods.append(nn.Linear(d1, d2, bias=False))
        if i < layers - 1:
            mods += [nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*mods)


def shuffled_keys(encode, x):
    """Shuffling BN (Sec. 3.3; builder.py _batch_shuffle_ddp / _batch_unshuffle_ddp): the global key batch is
    permuted before the key encoder, so each process's BN statistics mix images from all processes and the
    query cannot cheat through them; the keys are then put back in order. One permutation for all ranks (drawn
    on rank 0, broadcast); with one process it shuffles within the batch (the demo's single-GPU version)."""
    n, rank = len(x), process_rank()
    x_all = gather(x)
    perm = torch.randperm(len(x_all), device=x.device)
    if dist.is_initialized():
        dist.broadcast(perm, 0)
    k_all = gather(encode(x_all[perm[rank * n : (rank + 1) * n]]))  # the keys in shuffled order
    return k_all[perm.argsort()[rank * n : (rank + 1) * n]]  # this rank's own images' keys, in order


class MoCo(nn.Module):
    """Query encoder (backbone, projector, and for v3 predictor) and key encoder (momentum_backbone,
    momentum_projector, no gradient), plus for v1/v2 the queue of keys (K, dim) and its pointer."""

    def __init__(self, backbone, version="v2", dim=128, hidden_dim=4096, queue_size=65536, symmetric=False):
        super().__init__()
        self.backbone, self.version, self.symmetric = backbone, version, symmetric or version == "v3"
        d = backbone.out_dim
        if version == "v1":
            self.projector = nn.Linear(d, dim)  # the ResNet's fc, output 128 (Sec. 3.3)
        elif version == "v2":
            self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, dim))  # v2 MLP head
        else:
            vit = hasattr(backbone, "blocks")
            # builder.py: ResNet projector 2 layers, predictor 2 layers without last BN; ViT 3 and 2 with it.
            self.projector = mlp(3 if vit else 2, d, hidden_dim, dim)
            self.predictor = mlp(2, dim, hidden_dim, dim, last_bn=vit)
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)  # initialised as a copy
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        if version != "v3":  # builder.py: a random start, each key L2-normalised
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        else:
            self.queue = None

    def query(self, x):
        q = self.projector(self.backbone(x))
        return self.predictor(q) if self.version == "v3" else q

    def key(self, x):
        encode = lambda v: F.normalize(self.momentum_projector(self.momentum_backbone(v)), dim=1)  # noqa: E731
        return encode(x) if self.version == "v3" else shuffled_keys(encode, x)  # v3: SyncBN, no shuffle

    def forward(self, x1, x2):
        # Each view is its own forward pass, so BN statistics are per view. Asymmetric: q from view 1, k from 2.
        q1, q2 = self.query(x1), self.query(x2) if self.symmetric else None
        with torch.no_grad():
            k1, k2 = self.key(x1) if self.symmetric else None, self.key(x2)
        return q1, q2, k1, k2

    @torch.no_grad()
    def update_momentum_encoder(self, m):
        """Eq. 2: theta_k <- m theta_k + (1 - m) theta_q, before the keys are computed (builder.py)."""
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]
        torch._foreach_lerp_(target, online, 1.0 - m)

    @torch.no_grad()
    def enqueue(self, keys):
        """Sec. 3.2 / builder.py _dequeue_and_enqueue: the newest keys (all processes') replace the oldest,
        FIFO; the pointer wraps at K. Indices stay on the device: no host sync."""
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))


def init_vit(vit):
    """moco-v3 vits.py VisionTransformerMoCo.__init__: Linear weights Xavier-uniform with zero biases, except qkv,
    whose Q, K and V are each initialised as a d x d matrix (bound sqrt(6 / (d + d)), not Xavier over the fused
    3d x d); class token N(0, 1e-6); the patch projection Xavier-uniform over fan-in c p^2 and fan-out dim (its
    scale is permanent once frozen; vits.py writes 3 p^2 for RGB) with a zero bias. The sin-cos position
    embedding is set by the ViT itself (sincos_pos)."""
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if name.endswith("qkv"):
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    w = vit.patch_embed.weight  # (dim, c, p, p)
    bound = math.sqrt(6.0 / (w[0].numel() + w.shape[0]))
    nn.init.uniform_(w, -bound, bound)
    nn.init.zeros_(vit.patch_embed.bias)


def make_backbone(args, small, norm_layer=None):
    """The encoder f. v1/v2: torchvision's default init (moco builder.py base_encoder(num_classes=dim)). v3:
    ResNets with zero_init_residual (moco-v3 main_moco.py); ViTs as vits.py (Sec. 4.2): 12 heads, ViT-S too
    (moco-v3#7: better than DeiT's 6 at the same cost; vits.py has no ViT-Tiny, so its 12 heads of 16 channels
    are our choice), a fixed sin-cos position embedding, `init_vit`, and the
    patch projection frozen at its random init (--stop-grad-conv1)."""
    vit = args.arch.startswith("vit")
    backbone = build_backbone(
        args.arch,
        args.image_size,
        small,
        zero_init_residual=args.version == "v3",
        norm_layer=norm_layer,
        sincos_pos=vit,
        heads=12 if vit else None,
    )
    if vit:
        init_vit(backbone)
        backbone.patch_embed.requires_grad_(False)
    return backbone


def make_optimizer(model, args):
    """v1/v2 (moco main_moco.py): SGD, momentum 0.9, weight decay on every parameter. v3 (moco-v3 main_moco.py):
    ResNet: LARS of moco/optimizer.py (momentum 0.9, trust coefficient 1e-3, no decay or adaptation for ndim <= 1,
    the lr outside the momentum buffer); ViT: AdamW, weight decay on every parameter. v1/v2 pass every parameter,
    as main_moco.py does (the key encoder's get no gradient, so SGD skips them); v3 leaves out those without
    gradient (the key encoder, a frozen patch projection). The lr is set every step from `learning_rate`."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=args.wd)
    if args.optimizer == "lars":
        return LARS(param_groups(model, args.wd), eta=args.lars_eta, clip=args.lars_clip)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0, weight_decay=args.wd)


def learning_rate(step, steps_per_epoch, args):
    """base lr x BatchSize / 256 (moco-v3 main_moco.py). Deviation: v1/v2 scale too, as the moco README advises
    (0.015 at batch 128); its main_moco.py takes --lr as given. v1: x 0.1 at 60% and 80% of training; v2: cosine
    to 0 (per epoch in main_moco.py; Deviation: per step); v3: linear warmup, then cosine to 0 (main_moco.py
    adjust_learning_rate, per step; Deviation: the warmup starts at lr / W, not 0, common.cosine_lr)."""
    lr, total = args.lr * args.batch_size / 256, args.epochs * steps_per_epoch
    if args.schedule == "step":
        return step_lr(step, total, lr)
    return cosine_lr(step, total, lr, warmup=args.warmup_epochs * steps_per_epoch)


def momentum_at(step, total, m, cos):
    """v1/v2: a constant m. v3 (main_moco.py adjust_moco_momentum, per step): 1 - (1 - m)(1 + cos(pi t/T))/2."""
    return 1 - (1 - m) * (math.cos(math.pi * step / total) + 1) / 2 if cos else m


def step_lr(step, total, base, milestones=(0.6, 0.8)):
    """v1 (main_moco.py --schedule 120 160 of 200 epochs): lr x 0.1 at 60% and at 80% of training."""
    return base * 0.1 ** sum(step >= round(m * total) for m in milestones)


# ---- LOSS --------------------------------------------------------------------------------------------------
def queue_loss(q, k, queue, temperature, shares=None):
    """Eq. 1 with the queue (builder.py forward): logits [q . k+, q . queue] / tau, the positive at index 0.
    `shares`: a list that gets the hardest_negative_share of the logits (no gradient, stays on the device)."""
    q = F.normalize(q, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / temperature
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    if shares is not None:
        shares.append(hardest_negative_share(logits, labels))
    return F.cross_entropy(logits, labels)


def batch_loss(q, k, temperature, shares=None):
    """v3 Alg. 1 ctr(q, k) (builder.py contrastive_loss): logits q . K / tau against the keys K of the whole
    global batch (gathered, no gradient), the positive of local query i at i + N * rank; scaled by 2 tau."""
    q, big_k = F.normalize(q, dim=1), gather(F.normalize(k, dim=1))
    rank = process_rank()
    labels = torch.arange(len(q), device=q.device) + rank * len(q)
    logits = q @ big_k.T / temperature
    if shares is not None:  # the other images' keys are the negatives
        shares.append(hardest_negative_share(logits, labels))
    return F.cross_entropy(logits, labels) * 2 * temperature


def moco_loss(q1, q2, k1, k2, queue, temperature, shares=None):
    """v1/v2: L(q1, k2), or with --symmetric (the demo) L(q1, k2) + L(q2, k1); v3: ctr(q1, k2) + ctr(q2, k1).
    `shares`: a list that gets each term's hardest_negative_share."""
    if queue is None:
        return batch_loss(q1, k2, temperature, shares) + batch_loss(q2, k1, temperature, shares)
    loss = queue_loss(q1, k2, queue, temperature, shares)
    return loss + queue_loss(q2, k1, queue, temperature, shares) if q2 is not None else loss


def main():
    args = parser.parse_args()
    # ---- SETUP -------------------------------------------------------------------------------------------
    env = setup(args.device, args.seed)
    data = load_data(args.data, args.data_dir, env.device)
    recipes = dict(RECIPES[args.version])
    if args.version == "v3" and (args.arch or "").startswith("vit"):  # the ViT settings of CONFIG.md
        recipes |= {k: recipes[k] | V3_VIT for k in ("imagenet", "small")}
    recipe = pick_recipe(recipes, data, env, args)
    small = recipe != "imagenet"  # CIFAR-scale images: CIFAR stem, no blur
    if args.bn_splits is None:  # split BN only emulates, on one process, what Shuffling BN does across several
        args.bn_splits = 8 if env.world_size == 1 and args.version != "v3" else 1
    resume = prepare_output_dir(args, "moco", env)
    config = dict(vars(args), input_mean=list(data.mean), input_std=list(data.std))  # what backbone.pt expects
    out, autocast = Path(args.output_dir), autocast_for(env, args.dtype)

    # ---- DATA, MODEL, OPTIMIZER --------------------------------------------------------------------------
    views = view_recipe(args.image_size, small, args.version, args.crop_min)
    loader = TrainLoader(data, views, args.batch_size, env, args.seed, args.workers)
    keys_per_step = args.batch_size * (2 if args.symmetric and args.version != "v3" else 1)
    if args.version != "v3" and args.queue_size % keys_per_step:
        raise UserError(f"--queue-size {args.queue_size} is not a multiple of the {keys_per_step} keys per step")
    if (args.batch_size // env.world_size) % args.bn_splits:
        raise UserError(f"--bn-splits {args.bn_splits} does not divide the per-process batch")
    norm = functools.partial(SplitBatchNorm, splits=args.bn_splits) if args.bn_splits > 1 else None
    backbone = make_backbone(args, small, norm)
    model = MoCo(backbone, args.version, args.dim, args.hidden_dim, args.queue_size, args.symmetric)
    if env.world_size > 1 and env.device.type == "cuda" and args.version == "v3":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # v3 uses SyncBN; v1/v2 Shuffling BN instead
    model = model.to(env.device, memory_format=torch.channels_last)
    embed = nn.Sequential(model.backbone, model.projector)  # z, the output the loss sees (alignment, uniformity)
    optimizer = make_optimizer(model, args)  # v1/v2: SGD; v3: LARS (ResNet) or AdamW (ViT)
    train_model = torch.compile(model) if args.compile else model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )

    # ---- RESUME ------------------------------------------------------------------------------------------
    step, steps_per_epoch = 0, len(loader)
    if resume:
        ckpt = load_checkpoint(resume, "moco", config, model)
        model.load_state_dict(ckpt["model"])  # both encoders and the queue
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["aug_rng"]) == env.world_size:  # else (another process count) the run goes on, not bitwise
            loader.gen.set_state(ckpt["aug_rng"][env.rank])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]

    def save():
        """ckpt.pt (all a resume needs) and backbone.pt (torchvision keys), each written atomically."""
        check_finite(model, optimizer, env, step, out)  # a diverged run keeps its last good checkpoint
        states = [loader.gen.get_state()] * env.world_size  # every rank's augmentation RNG, gathered to rank 0
        if env.world_size > 1:
            dist.all_gather_object(states, loader.gen.get_state())
        checksums = rank_checksums(model, env)  # equal on every rank, or the ranks drifted apart
        if env.is_main:
            save_atomic(
                {
                    "method": "moco",
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
            save_atomic(model.backbone.state_dict(), out / "backbone.pt")  # the query encoder's backbone

    # ---- TRAIN -------------------------------------------------------------------------------------------
    total_steps = args.epochs * steps_per_epoch
    last_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    if resume and finished(resume, step, last_step, total_steps, env):  # nothing left to train: exit 0
        return
    logger, stop = Logger(out, env, last_step, args.batch_size, step), StopSignal()  # drops rows of steps to redo
    logger.print(
        f"moco {args.version}: {data.describe(recipe)}, {steps_per_epoch} steps/epoch, "
        f"{env.world_size} process(es) on {env.device}, starting at step {step}\n{json.dumps(config)}"
    )
    if env.is_main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    stds, shares = [], []  # collapse diagnostic and hardest negative's share of each step of the epoch
    while step < last_step:
        epoch, stds, shares = step // steps_per_epoch, [], []
        for x1, x2 in loader.epoch(epoch, start=step % steps_per_epoch):
            lr_now = learning_rate(step, steps_per_epoch, args)  # v1: steps; v2: cosine; v3: warmup + cosine
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            model.update_momentum_encoder(momentum_at(step, total_steps, args.moco_m, args.moco_m_cos))  # Eq. 2
            with autocast():  # Alg. 1: q = f_q(x_q), k = f_k(x_k) for the views used as queries / keys
                q1, q2, k1, k2 = train_model(x1, x2)
            # Eq. 1 (InfoNCE), in float32 whatever the autocast dtype.
            f32 = lambda t: None if t is None else t.float()  # noqa: E731
            loss = moco_loss(f32(q1), f32(q2), f32(k1), f32(k2), model.queue, args.temperature, shares)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if model.queue is not None:  # Alg. 1: enqueue the keys of every process after the loss
                model.enqueue(gather(torch.cat([k.float() for k in (k1, k2) if k is not None])))
            logger.step(step, epoch, loss, lr_now)
            stds.append(collapse_std(q1))  # SimSiam Sec. 4.1: std of q/||q||; stays on the device
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
            row["eval/hardest_negative_share"] = epoch_mean(shares, env)  # over the epoch's anchors, all ranks
            if args.eval_every > 0 and (epoch + 1) % args.eval_every == 0:
                row |= evaluate(model.backbone, data, env, args, autocast)
                row |= alignment_uniformity(embed, data, loader.views, env, autocast, workers=args.workers)
            logger.write([row])
            logger.print(json.dumps(row))
            save()
            logger.restart_clock()

    # ---- EVAL AND SAVE -----------------------------------------------------------------------------------
    save()
    row = {"epoch": max(step - 1, 0) // steps_per_epoch, "step": step, "final": True}
    if stds:
        row["eval/collapse_std"] = torch.stack(stds).mean().item()
        row["eval/hardest_negative_share"] = epoch_mean(shares, env)
    if args.eval_every >= 0:
        row |= evaluate(model.backbone, data, env, args, autocast, linear=True)
        row |= alignment_uniformity(embed, data, loader.views, env, autocast, workers=args.workers)
    logger.write([row])
    logger.print(json.dumps(row))


if __name__ == "__main__":
    run(main)
