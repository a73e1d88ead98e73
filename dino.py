"""DINO: Emerging Properties in Self-Supervised Vision Transformers. Caron et al., ICCV 2021, arXiv:2104.14294.

Self-distillation with no labels. A student g_s (backbone + DINO head) and a teacher g_t of the same shape, whose
weights are an exponential moving average of the student's, each map an image to K scores. Multi-crop (Sec. 3.1):
the teacher sees only the 2 global crops, the student every crop (2 global + N local ones of a lower resolution).
The teacher's output is centred and sharpened, and the student learns to match it (Eq. 1-3, Alg. 1):
    P_t(x) = softmax((g_t(x) - c) / tau_t),  P_s(x) = softmax(g_s(x) / tau_s),  tau_t < tau_s
    L = mean over pairs (x in globals, x' in all crops, x' != x) of H(P_t(x), P_s(x')),  H(a, b) = -a . log b
    after the loss: c <- m c + (1 - m) mean of g_t over the global batch (Eq. 4);
    after each step: teacher <- lambda teacher + (1 - lambda) student, lambda cosine-ramped from 0.996 to 1
Centring keeps one dimension from dominating; sharpening keeps the output from going uniform (Sec. 5.3); the
teacher's entropy and the student-teacher KL, logged per epoch, tell the two collapses apart (dino#43).
Closest sibling: `diff byol.py dino.py` (BYOL regresses normalised projections through a predictor; DINO has no
predictor and matches the centred, sharpened teacher's softmax on multi-crop views). Follows facebookresearch/dino
(main_dino.py, vision_transformer.py, utils.py); every deviation from it is marked "Deviation:" below and listed
in the README.

    python dino.py                                      # built-in shapes: a few minutes on a laptop CPU
    python dino.py --data cifar10                       # small-image recipe (solo-learn's), downloads once
    python dino.py --data /path/to/imagenet             # ImageNet recipe (ViT-S/16, 2x224 + 8x96 crops) on one GPU
    torchrun --nproc_per_node=8 dino.py --data /path/to/imagenet      # 8 GPUs, --batch-size is the global 512

Result on the built-in shapes (tiny backbone, CPU): after 200 of the demo's 390 steps the teacher's kNN top-1 is
45.95 / 42.75 / 36.4% for seeds 0 / 1 / 2 against 38.8 / 33.5 / 31.4% for the random init with data BN
statistics; the same run with the EMA removed (the teacher frozen at its init) ends at 40.75% (seed 0). README,
"DINO on the built-in data". GPU numbers are still to be measured.
"""

import argparse
import copy
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
    cosine_lr,
    evaluate,
    finished,
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
parser.add_argument("--output-dir", default=None, help="run folder (default runs/dino-<data>-<time>)")
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
    "--optimizer", default=None, choices=["adamw", "lars", "sgd"], help="adamw (ViT), lars, sgd (recipe)"
)
parser.add_argument(
    "--warmup-epochs", type=nonnegative_int, default=None, help="linear lr warmup, then cosine (recipe)"
)
parser.add_argument("--min-lr", type=nonnegative_float, default=None, help="lr at the end of the cosine (recipe)")
parser.add_argument("--wd-end", type=nonnegative_float, default=None, help="weight decay at the end, cosine (recipe)")
parser.add_argument("--lars-eta", type=positive_float, default=None, help="LARS trust coefficient (recipe)")
parser.add_argument("--lars-clip", action=argparse.BooleanOptionalAction, default=None, help="LARC clip (recipe)")
parser.add_argument("--clip-grad", type=nonnegative_float, default=None, help="per-tensor grad norm cap; 0: off")
parser.add_argument(
    "--freeze-last-layer", type=nonnegative_int, default=None, help="epochs with the head's last layer frozen (recipe)"
)
parser.add_argument("--out-dim", type=int_at_least(2), default=None, help="K, the head's output size (recipe)")
parser.add_argument("--hidden-dim", type=positive_int, default=None, help="DINO head MLP hidden size (recipe)")
parser.add_argument("--bottleneck-dim", type=positive_int, default=256, help="DINO head bottleneck (L2-normalised)")
parser.add_argument(
    "--norm-last-layer",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="weight-normalised last layer with its norm fixed at 1",
)
parser.add_argument(
    "--use-bn-in-head",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="BN after the head's hidden layers (recipe)",
)
parser.add_argument(
    "--momentum-teacher", type=in_range(0, 1), default=None, help="teacher EMA rate at step 0, cosine to 1 (recipe)"
)
parser.add_argument("--teacher-temp", type=positive_float, default=None, help="tau_t after its warmup (recipe)")
parser.add_argument("--warmup-teacher-temp", type=positive_float, default=None, help="tau_t at epoch 0 (recipe)")
parser.add_argument(
    "--warmup-teacher-temp-epochs",
    type=nonnegative_int,
    default=None,
    help="linear tau_t warmup (recipe); a shorter run ends before tau_t reaches --teacher-temp",
)
parser.add_argument("--student-temp", type=positive_float, default=0.1, help="tau_s")
parser.add_argument("--center-momentum", type=in_range(0, 1), default=0.9, help="m of the centre's EMA; 1: no centring")
parser.add_argument("--drop-path", type=in_range(0, 1), default=None, help="student's stochastic depth (ViT)")
parser.add_argument(
    "--crop-min", type=in_range(0, 1, lo_open=True), default=None, help="global crops' smallest area (recipe)"
)
parser.add_argument("--local-crops", type=nonnegative_int, default=None, help="N local crops (recipe)")
parser.add_argument("--local-size", type=positive_int, default=None, help="local crops' side in pixels (recipe)")
parser.add_argument(
    "--local-scale-min", type=in_range(0, 1, lo_open=True), default=None, help="local crops' smallest area (recipe)"
)
parser.add_argument(
    "--local-scale-max", type=in_range(0, 1, lo_open=True), default=None, help="local crops' largest area (recipe)"
)

RECIPES = {
    # main_dino.py defaults, the README's ViT-S/16 100-epoch run on 8 GPUs x 64 images: AdamW lr 5e-4 * bs/256,
    # 10 warmup epochs, cosine to 1e-6; wd cosine 0.04 -> 0.4; per-tensor grad clip 3.0; K 65536; teacher
    # momentum 0.996 -> 1; tau_t 0.04 (no warmup: --warmup_teacher_temp_epochs defaults to 0); drop path 0.1;
    # 2 x 224 crops from (0.4, 1) + 8 x 96 from (0.05, 0.4). `--optimizer lars`: utils.LARS's defaults (eta 1e-3,
    # no clipping, momentum 0.9). The README's better ViT-S (2 nodes x 8 GPUs x 64 images): --batch-size 1024
    # --epochs 300 --teacher-temp 0.07 --warmup-teacher-temp-epochs 30 --no-norm-last-layer. kNN k 20, T 0.07.
    "imagenet": dict(arch="vit_small", epochs=100, batch_size=512, optimizer="adamw", lr=5e-4, min_lr=1e-6)
    | dict(warmup_epochs=10, wd=0.04, wd_end=0.4, clip_grad=3.0, out_dim=65536, momentum_teacher=0.996)
    | dict(teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0, drop_path=0.1)
    | dict(crop_min=0.4, local_crops=8, local_size=96, local_scale_min=0.05, local_scale_max=0.4)
    | dict(knn_k=20, knn_t=0.07, lars_eta=1e-3, lars_clip=False, hidden_dim=2048, freeze_last_layer=1)
    | dict(use_bn_in_head=False),
    # Deviation: no official small-image recipe; solo-learn's CIFAR DINO (scripts/pretrain/cifar/dino.yaml,
    # solo/methods/dino.py defaults): CIFAR ResNet-18, batch 256, LARS lr 0.3 * bs/256 (eta 0.02, LARC clip, bias
    # and norm excluded), wd 1e-6 (constant), 10 warmup epochs, cosine to 0, 1000 epochs; K 4096, head 2048 -> 256;
    # teacher momentum 0.9995 -> 1; tau_t 0.07 throughout (warmup_teacher_temperature_epochs defaults to 0 in the
    # omegaconf solo-learn that dino.yaml belongs to; its older argparse scripts warmed up from 0.04 over 50
    # epochs), no grad clip, last layer frozen 1 epoch; two 32-px crops from
    # (0.08, 1), no blur, solarize 0 / 0.2 (augmentations/asymmetric.yaml). `--local-crops N` adds N local crops as
    # solo-learn's only multi-crop CIFAR recipe (scripts/pretrain/cifar-multicrop/augmentations/swav.yaml, 6 x 18
    # px from (0.08, 0.5), its globals from (0.2, 1)). kNN k 200, T 0.1 (InstDisc).
    "small": dict(arch="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.3, min_lr=0.0)
    | dict(warmup_epochs=10, wd=1e-6, wd_end=1e-6, lars_eta=0.02, lars_clip=True, clip_grad=0.0, out_dim=4096)
    | dict(momentum_teacher=0.9995, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0)
    | dict(drop_path=0.0, crop_min=0.08, local_crops=0, local_size=18, local_scale_min=0.08, local_scale_max=0.5)
    | dict(knn_k=200, knn_t=0.1, hidden_dim=2048, freeze_last_layer=1, use_bn_in_head=False),
    # `python dino.py`: the built-in shapes as a few-minute demo (pick_recipe uses the tiny backbone on CPUs).
    # Deviation (ours, small data): the small-image recipe for 10 epochs of batch 256 with K 1024, changed where
    # trials of 100-300 steps (README, "DINO on the built-in data") showed the tiny net learning. Teacher momentum
    # 0.98 -> 1 (the official 0.996 / 0.9995 leave the evaluated teacher near its init for the whole demo; 0.99 lags
    # the student by 4-8 kNN points at 200-390 steps; 0.97 and 0.96 collapsed on some seeds: with the teacher's EMA
    # window close to the centre's 10 steps, the centre lags the teacher's drift). No lr warmup and no frozen last
    # layer (with both, one epoch each, the student's kNN was 38.5% at 100 steps and 47.1% at 200; without, 45.8%
    # at 150). byol.py's demo LARS form (the ImageNet eta 1e-3, no clipping; wd 1e-6 kept) at lr 3.0 (2.0: teacher
    # 41.0% at 150 steps, 3.0: 42.7%; solo-learn's eta 0.02 with clipping at lr 0.3: 36.3% at 100). BN in the
    # head (main_dino.py / solo-learn --use_bn_in_head): the tiny net's features share most of their direction
    # (mean cosine 0.77), so without BN the teacher's scores barely differ between images and it stayed uniform.
    # tau_t 0.04 from the start (main_dino.py's; 0.07 left the teacher uniform). Global crops from 30% of the area
    # and no local crops, as byol.py's demo (a small crop of a 32-px image holds a fragment of one shape).
    "builtin": dict(epochs=10, batch_size=256, warmup_epochs=0, freeze_last_layer=0, out_dim=1024, local_crops=0)
    | dict(momentum_teacher=0.98, optimizer="lars", lr=3.0, lars_eta=1e-3, lars_clip=False, use_bn_in_head=True)
    | dict(teacher_temp=0.04, warmup_teacher_temp_epochs=0, crop_min=0.3),
}


# ---- AUGMENTATION RECIPE -----------------------------------------------------------------------------------
def view_recipe(size, small, crop_min, local_crops, local_size, local_scale=(0.05, 0.4)):
    """main_dino.py DataAugmentationDINO: every crop flipped, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
    grayscale p 0.2 (torchvision's ColorJitter); global crop 1 of `size` from (crop_min, 1) blurred with p 1.0,
    global crop 2 blurred with p 0.1 and solarized with p 0.2; `local_crops` crops of `local_size` from
    `local_scale` (main_dino.py: (0.05, 0.4)) blurred with p 0.5. No blur on small images (solo-learn's CIFAR
    recipe). The list is ordered globals first, so crops of one size are adjacent (one backbone pass each).
    Deviation: crops are resized bilinearly with antialiasing (the official code uses bicubic), and blur is a
    Gaussian kernel of 10% of the image side with sigma in [0.1, 2] (SimCLR's), not PIL's
    GaussianBlur(radius=sigma) (utils.py GaussianBlur)."""
    jitter = (0.4, 0.4, 0.2, 0.1)
    global1 = ViewAug(size, scale=(crop_min, 1.0), jitter=jitter, blur_p=0.0 if small else 1.0)
    global2 = ViewAug(size, scale=(crop_min, 1.0), jitter=jitter, blur_p=0.0 if small else 0.1, solarize_p=0.2)
    local = ViewAug(local_size, scale=local_scale, jitter=jitter, blur_p=0.0 if small else 0.5)
    return [global1, global2] + [local] * local_crops


# ---- MODEL -------------------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """vision_transformer.py DINOHead: a 3-layer MLP (GELU; with `use_bn`, BN after each hidden Linear, as
    --use_bn_in_head) to a 256-d bottleneck, L2 normalisation, then a weight-normalised Linear(256, K, no bias)
    whose norm g starts at 1 and, with `norm_last_layer`, stays there (the weight is v / ||v|| per output). MLP
    weights trunc-normal(0.02) with zero biases; the last layer keeps PyTorch's default init (it is built after the
    official _init_weights runs)."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True, use_bn=False):
        super().__init__()
        bn = (lambda: [nn.BatchNorm1d(hidden_dim)]) if use_bn else list
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            *bn(),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            *bn(),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # (K, 1): the norm of each output's weight
        g.data.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x):
        """(n, K) scores in float32 whatever the autocast dtype: the MLP runs in it, the L2 normalisation and the
        K-wide last layer outside it (on CUDA that product runs in TF32, which setup() allows: 10-bit inputs, as
        fp16's). Deviation: main_dino.py runs the whole head in fp16 (10-bit mantissa); bf16 (7 bits) would round
        the scores 8x more coarsely before the loss divides them by tau_t = 0.04."""
        z = self.mlp(x)
        with torch.autocast(z.device.type, enabled=False):
            return self.last_layer(F.normalize(z.float(), dim=-1))


def multi_crop(backbone, head, crops):
    """utils.py MultiCropWrapper: one backbone pass per run of equal-size crops (concatenated), then one head pass
    over all the features. Returns (len(crops) * n, K), crop by crop."""
    feats, i = [], 0
    while i < len(crops):
        j = i + 1
        while j < len(crops) and crops[j].shape[-1] == crops[i].shape[-1]:
            j += 1
        feats.append(backbone(torch.cat(crops[i:j])))
        i = j
    return head(torch.cat(feats))


class DINO(nn.Module):
    """Student (backbone, head) and teacher (teacher_backbone, teacher_head), Alg. 1; `center` is c (Eq. 4).
    The teacher gets no gradient; `update_teacher` moves it towards the student, `update_center` moves c."""

    def __init__(
        self,
        backbone,
        teacher_backbone,
        out_dim,
        hidden_dim=2048,
        bottleneck_dim=256,
        norm_last_layer=True,
        use_bn=False,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = DINOHead(backbone.out_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer, use_bn)
        # main_dino.py: the teacher starts with the student's weights (teacher_without_ddp.load_state_dict)
        self.teacher_backbone = teacher_backbone.requires_grad_(False)
        self.teacher_backbone.load_state_dict(backbone.state_dict())
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, crops):
        s = multi_crop(self.backbone, self.head, crops)  # (n_crops * n, K): every crop through the student
        with torch.no_grad():  # only the 2 global crops pass through the teacher; its BN uses batch statistics
            t = multi_crop(self.teacher_backbone, self.teacher_head, crops[:2])  # (2n, K)
        return s, t

    @torch.no_grad()
    def update_teacher(self, momentum):
        """main_dino.py: theta_t <- lambda theta_t + (1 - lambda) theta_s for every parameter (BN running
        statistics are the teacher's own)."""
        student = [*self.backbone.parameters(), *self.head.parameters()]
        teacher = [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)

    @torch.no_grad()
    def update_center(self, t, momentum):
        """Eq. 4, DINOLoss.update_center: c <- m c + (1 - m) mean of the teacher outputs over the global batch
        (summed over processes by all_reduce). `t`: this process's (2n, K) teacher outputs."""
        batch_center, n = t.sum(0, keepdim=True), len(t)
        if dist.is_initialized():
            dist.all_reduce(batch_center)
            n *= dist.get_world_size()
        self.center.copy_(self.center * momentum + batch_center / n * (1 - momentum))


def teacher_momentum(step, total, base):
    """main_dino.py momentum_schedule (utils.cosine_scheduler from base to 1, per step):
    lambda = 1 - (1 - base) * (cos(pi k / K) + 1) / 2."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2


def weight_decay_at(step, total, args):
    """main_dino.py wd_schedule: cosine from wd to wd_end over training (utils.cosine_scheduler, no warmup)."""
    return cosine_lr(step, total, args.wd, final=args.wd_end)


def clip_gradients(params, clip):
    """utils.py clip_gradients: each tensor's gradient scaled to norm at most `clip` (not a global norm), as
    g <- g * min(clip / (||g|| + 1e-6), 1), without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    scales = [(clip / (n + 1e-6)).clamp(max=1.0) for n in torch._foreach_norm(grads)]
    torch._foreach_mul_(grads, scales)


def make_backbone(args, small, drop_path=0.0):
    """The backbone of the student (drop_path: its stochastic depth) or the teacher (none). ViTs as DINO's
    vision_transformer.py builds them (common.ViT: 6 heads for ViT-S, trunc-normal(0.02) init, a learned position
    embedding, interpolated for crops of another size; patch 16, or 4 on small images). ResNets as torchvision
    builds them (main_dino.py: torchvision_models.__dict__[arch](), no zero-init of residual branches)."""
    return build_backbone(args.arch, args.image_size, small, drop_path=drop_path)


def make_optimizer(model, args):
    """main_dino.py with utils.get_params_groups: the student's parameters in two groups, weights (regularised:
    their decay follows `weight_decay_at`) and biases and norm parameters (ndim <= 1; no decay); `param_groups`
    makes the same split (and also excludes them from LARS adaptation, as solo-learn's exclude_bias_n_norm).
    AdamW (ViT, the default), SGD momentum 0.9 (the README's ResNet-50), or LARS (solo-learn's CIFAR recipe:
    common.LARS with eta and LARC clipping). The teacher and a fixed last-layer norm have requires_grad off and
    are left out. The lr and the decay are set every step."""
    groups = param_groups(model, args.wd)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    return LARS(groups, eta=args.lars_eta, clip=args.lars_clip)


def learning_rate(step, steps_per_epoch, args):
    """main_dino.py lr_schedule: base lr x BatchSize / 256, linear warmup, then cosine to min_lr.
    Deviation: the warmup starts at lr / W, not 0 (common.cosine_lr)."""
    lr = args.lr * args.batch_size / 256
    return cosine_lr(
        step, args.epochs * steps_per_epoch, lr, warmup=args.warmup_epochs * steps_per_epoch, final=args.min_lr
    )


# ---- LOSS --------------------------------------------------------------------------------------------------
def teacher_temperature(epoch, args):
    """DINOLoss.teacher_temp_schedule, per epoch: linspace(warmup_teacher_temp, teacher_temp, W) over the first W
    epochs, then teacher_temp."""
    w = args.warmup_teacher_temp_epochs
    if epoch >= w:
        return args.teacher_temp
    return args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp) * epoch / max(w - 1, 1)


def dino_loss(s, t, center, teacher_temp, student_temp=0.1):
    """Eq. 3 / DINOLoss.forward: H(P_t(x), P_s(x')) = -sum_k P_t log P_s for each global crop x (teacher) and each
    other crop x' (student), averaged over the batch, then over the pairs. s: (n_crops * n, K) student scores,
    t: (2n, K) teacher scores, crop by crop; the teacher's softmax is centred, sharpened and a constant (sg)."""
    n_crops = len(s) // (len(t) // 2)
    log_p_s = F.log_softmax(s / student_temp, dim=-1).chunk(n_crops)
    p_t = F.softmax((t - center) / teacher_temp, dim=-1).detach().chunk(2)
    terms = [-(q * log_p_s[v]).sum(-1).mean() for i, q in enumerate(p_t) for v in range(n_crops) if v != i]
    return sum(terms) / len(terms)


def teacher_entropy(t, center, teacher_temp):
    """Mean entropy of the teacher's P_t (dino#43): ln K when the teacher is uniform (not sharpened enough),
    0 when one dimension dominates (not centred enough). The loss minus it is the mean KL(P_t || P_s), which goes
    to 0 in both collapses."""
    log_p = F.log_softmax((t - center) / teacher_temp, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def diagnostics(diags):
    """The epoch's mean teacher entropy and mean student-teacher KL (loss - entropy), dino#43."""
    entropy, loss = torch.stack(diags).mean(0).tolist()
    return {"eval/teacher_entropy": entropy, "eval/student_teacher_kl": loss - entropy}


def main():
    args = parser.parse_args()
    # ---- SETUP -------------------------------------------------------------------------------------------
    # Deviation: one process and CPUs are allowed (main_dino.py requires DDP on GPUs). The global RNG (drop path)
    # is seeded with --seed on every rank, as utils.fix_random_seeds(args.seed): the ranks' masks repeat there too
    env = setup(args.device, args.seed)
    data = load_data(args.data, args.data_dir, env.device)
    recipe = pick_recipe(RECIPES, data, env, args)
    small = recipe != "imagenet"  # CIFAR-scale images: CIFAR stem, no blur
    if args.drop_path >= 1:
        raise UserError(f"--drop-path {args.drop_path}: a rate below 1 drops some paths; 1 would drop them all")
    if args.local_scale_min > args.local_scale_max:
        raise UserError(f"--local-scale-min {args.local_scale_min} is above --local-scale-max {args.local_scale_max}")
    if args.local_crops and args.local_size > args.image_size:
        raise UserError(f"--local-size {args.local_size} is larger than the global crops' {args.image_size} px")
    patch = 4 if small else 16  # a ViT's patch side (build_backbone)
    if args.local_crops and args.arch.startswith("vit") and args.local_size < patch:
        raise UserError(f"--local-size {args.local_size} is below the ViT's {patch}-px patch; raise it")
    resume = prepare_output_dir(args, "dino", env)
    config = dict(vars(args), input_mean=list(data.mean), input_std=list(data.std))  # what backbone.pt expects
    out, autocast = Path(args.output_dir), autocast_for(env, args.dtype)

    # ---- DATA, MODEL, OPTIMIZER --------------------------------------------------------------------------
    local_scale = (args.local_scale_min, args.local_scale_max)
    views = view_recipe(args.image_size, small, args.crop_min, args.local_crops, args.local_size, local_scale)
    loader = TrainLoader(data, views, args.batch_size, env, args.seed, args.workers)
    backbone = make_backbone(args, small, drop_path=args.drop_path)  # the student's; stochastic depth
    model = DINO(
        backbone,
        make_backbone(args, small),
        args.out_dim,
        args.hidden_dim,
        args.bottleneck_dim,
        args.norm_last_layer,
        args.use_bn_in_head,
    )
    if env.world_size > 1 and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    model = model.to(env.device, memory_format=torch.channels_last)
    # the teacher's bottleneck, L2-normalised before its last layer (alignment, uniformity): what DINO evaluates
    embed = nn.Sequential(model.teacher_backbone, model.teacher_head.mlp)
    optimizer = make_optimizer(model, args)  # the student's two groups: regularised weights, biases and norms
    train_model = torch.compile(model) if args.compile else model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )

    # ---- RESUME ------------------------------------------------------------------------------------------
    step, steps_per_epoch = 0, len(loader)
    if resume:
        ckpt = load_checkpoint(resume, "dino", config, model)
        model.load_state_dict(ckpt["model"])  # student, teacher and centre
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["aug_rng"]) == env.world_size:  # else (another process count) the run goes on, not bitwise
            loader.gen.set_state(ckpt["aug_rng"][env.rank])
        torch.set_rng_state(ckpt["rng"])
        # Deviation: main_dino.py does not restore RNG states; drop path draws from the device's RNG, so CUDA's
        # state is in ckpt.pt for an exact resume
        if env.device.type == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], env.device)
        step = ckpt["step"]

    def save():
        """ckpt.pt (all a resume needs) and backbone.pt (the teacher's, torchvision keys), written atomically."""
        check_finite(model, optimizer, env, step, out)  # a diverged run keeps its last good checkpoint
        states = [loader.gen.get_state()] * env.world_size  # every rank's augmentation RNG, gathered to rank 0
        if env.world_size > 1:
            dist.all_gather_object(states, loader.gen.get_state())
        checksums = rank_checksums(model, env)  # equal on every rank, or the ranks drifted apart
        if env.is_main:
            save_atomic(
                {
                    "method": "dino",
                    "config": config,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "aug_rng": states,
                    "rank_checksums": checksums,
                    "rng": torch.get_rng_state(),
                    **({"cuda_rng": torch.cuda.get_rng_state(env.device)} if env.device.type == "cuda" else {}),
                },
                out / "ckpt.pt",
            )
            save_atomic(model.teacher_backbone.state_dict(), out / "backbone.pt")  # what DINO evaluates

    # ---- TRAIN -------------------------------------------------------------------------------------------
    total_steps = args.epochs * steps_per_epoch
    last_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    if resume and finished(resume, step, last_step, total_steps, env):  # nothing left to train: exit 0
        return
    logger, stop = Logger(out, env, last_step, args.batch_size, step), StopSignal()  # drops rows of steps to redo
    logger.print(
        f"dino: {data.describe(recipe)}, {steps_per_epoch} steps/epoch, "
        f"{env.world_size} process(es) on {env.device}, starting at step {step}\n{json.dumps(config)}"
    )
    if env.is_main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    student = [*model.backbone.parameters(), *model.head.parameters()]
    diags = []  # (teacher entropy, loss) of each step of the epoch
    while step < last_step:
        epoch, diags = step // steps_per_epoch, []
        for crops in loader.epoch(epoch, start=step % steps_per_epoch):
            lr_now = learning_rate(step, steps_per_epoch, args)  # warmup, then cosine to min_lr, every step
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            optimizer.param_groups[0]["weight_decay"] = weight_decay_at(step, total_steps, args)  # regularised only
            with autocast():  # Alg. 1: student on every crop, teacher on the 2 global crops
                s, t = train_model(crops)
            temp = teacher_temperature(epoch, args)
            # Eq. 3 in float32 whatever the autocast dtype (the scores are float32: DINOHead.forward). Deviation:
            # main_dino.py runs fp16 autocast with a GradScaler; bf16 needs no scaler. Then the centre, from this
            # step's teacher outputs
            loss = dino_loss(s.float(), t.float(), model.center, temp, args.student_temp)
            diags.append(torch.stack([teacher_entropy(t.float(), model.center, temp), loss.detach()]))
            model.update_center(t.float(), args.center_momentum)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                clip_gradients(student, args.clip_grad)  # per tensor, before the last layer is cancelled
            if epoch < args.freeze_last_layer:  # utils.cancel_gradients_last_layer: no step, no decay, no moment
                for p in model.head.last_layer.parameters():
                    p.grad = None
            optimizer.step()
            model.update_teacher(teacher_momentum(step, total_steps, args.momentum_teacher))  # EMA after the step
            logger.step(step, epoch, loss, lr_now)
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
            row = {"epoch": epoch, "step": step, **diagnostics(diags)}
            if args.eval_every > 0 and (epoch + 1) % args.eval_every == 0:
                row |= evaluate(model.teacher_backbone, data, env, args, autocast)
                row |= alignment_uniformity(embed, data, loader.views, env, autocast, workers=args.workers)
            logger.write([row])
            logger.print(json.dumps(row))
            save()
            logger.restart_clock()

    # ---- EVAL AND SAVE -----------------------------------------------------------------------------------
    save()
    row = {"epoch": max(step - 1, 0) // steps_per_epoch, "step": step, "final": True}
    if diags:
        row |= diagnostics(diags)
    if args.eval_every >= 0:
        row |= evaluate(model.teacher_backbone, data, env, args, autocast, linear=True)  # the teacher (Sec. 3.1)
        row |= alignment_uniformity(embed, data, loader.views, env, autocast, workers=args.workers)
    logger.write([row])
    logger.print(json.dumps(row))


if __name__ == "__main__":
    run(main)
