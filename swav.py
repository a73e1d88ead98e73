"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments. Caron et al., NeurIPS 2020,
arXiv:2006.09882.

Every crop x_t of an image is embedded as z_t (backbone + projection MLP, L2-normalised) and scored against K
trainable prototypes C (unit vectors): z_t . C. The codes q_s of the assigned (global) crops s are a balanced
soft clustering of the global batch, computed without gradient by three Sinkhorn-Knopp iterations (Sec. 3.1,
Eq. 3: Q* = Diag(u) exp(C^T Z / eps) Diag(v), every prototype given the same share of the batch). Swapped
prediction (Eq. 1-2): each other crop t must predict the code of crop s,
    L = mean_{s assigned} mean_{t != s} -sum_k q_s,k log softmax_k(z_t . C / tau)
Multi-crop (Sec. 3.2): 2 global crops plus N small local crops, which are cheap and are only predicted from.
No negatives and no momentum encoder: the equipartition of the codes prevents collapse. A queue of past
embeddings fills the Sinkhorn batch when the batch is small. Closest sibling: `diff swav.py dino.py` (DINO's
targets are a centred, sharpened EMA teacher's softmax instead of Sinkhorn codes). Follows
facebookresearch/swav (main_swav.py, src/resnet50.py, src/multicropdataset.py, scripts/); every deviation from
it is marked "Deviation:" below and listed in the README.

    python swav.py                                      # built-in shapes: a few minutes on a laptop CPU
    python swav.py --data cifar10                       # solo-learn's CIFAR recipe, downloads into ./data once
    python swav.py --data /path/to/imagenet             # ImageNet recipe: 2x224 + 6x96 crops, LARC
    torchrun --nproc_per_node=8 swav.py --data /path/to/imagenet   # --batch-size is the global 4096

Result on the built-in shapes (tiny backbone, the first 78 of the demo's 390 steps): kNN top-1 49.9 / 40.0 / 38.0%
against 33.0 / 28.7 / 25.0% for the same-seed random-init network, seeds 0 / 1 / 2 (README "SwAV on the CPU").
GPU numbers are still to be measured.
"""

import argparse
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
    evaluate,
    finished,
    gather,
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
parser.add_argument("--image-size", type=positive_int, default=None, help="global crop side (recipe: native or 224)")
parser.add_argument("--epochs", type=positive_int, default=None, help="(recipe)")
parser.add_argument("--batch-size", type=positive_int, default=None, help="global batch over all processes (recipe)")
parser.add_argument(
    "--lr", type=positive_float, default=None, help="base lr; the run uses lr * batch-size / 256 (recipe)"
)
parser.add_argument("--wd", type=nonnegative_float, default=None, help="weight decay (recipe)")
parser.add_argument("--workers", type=nonnegative_int, default=8, help="DataLoader workers per process (image folders)")
parser.add_argument("--output-dir", default=None, help="run folder (default runs/swav-<data>-<time>)")
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
    "--warmup-epochs", type=nonnegative_int, default=None, help="linear lr warmup, then cosine (recipe)"
)
parser.add_argument(
    "--start-warmup", type=nonnegative_float, default=None, help="the warmup's first lr, not scaled (recipe)"
)
parser.add_argument(
    "--final-lr", type=nonnegative_float, default=None, help="the cosine's last lr, not scaled (recipe)"
)
parser.add_argument("--lars-eta", type=positive_float, default=None, help="LARC trust coefficient (recipe)")
parser.add_argument("--lars-clip", action=argparse.BooleanOptionalAction, default=None, help="LARC clip (recipe)")
parser.add_argument(
    "--lars-exclude",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="no decay or adaptation for biases and norm parameters (recipe: off on ImageNet, as main_swav.py)",
)
parser.add_argument("--temperature", type=positive_float, default=None, help="tau of the swapped prediction (recipe)")
# exp(score / eps) with |score| <= 1 overflows float32 once the Sinkhorn sums pass 3e38: eps >= 0.02 is safe.
parser.add_argument("--epsilon", type=in_range(0.02, 100), default=None, help="Sinkhorn entropy weight (recipe)")
parser.add_argument("--sinkhorn-iterations", type=positive_int, default=3, help="Sinkhorn-Knopp iterations")
parser.add_argument("--prototypes", type=int_at_least(2), default=None, help="K, the number of prototypes (recipe)")
parser.add_argument("--dim", type=positive_int, default=128, help="embedding size (feat_dim)")
parser.add_argument("--hidden-dim", type=positive_int, default=2048, help="projection MLP hidden size (hidden_mlp)")
parser.add_argument(
    "--queue-length",
    type=nonnegative_int,
    default=None,
    help="past embeddings added to the Sinkhorn batch, over all processes; 0: none (recipe)",
)
parser.add_argument("--queue-start-epoch", type=nonnegative_int, default=None, help="epoch the queue starts (recipe)")
parser.add_argument(
    "--freeze-prototypes-epochs",
    type=nonnegative_float,
    default=None,
    help="prototypes get no update during this many first epochs (recipe)",
)
parser.add_argument(
    "--crop-min",
    type=in_range(0, 1, lo_open=True),
    default=None,
    help="global crops' smallest area fraction (recipe; else the scripts': 0.14 with local crops, 0.08 without)",
)
parser.add_argument("--local-crops", type=nonnegative_int, default=None, help="number of local crops (recipe)")
parser.add_argument("--local-size", type=positive_int, default=None, help="local crop side in px (recipe)")

# scripts/swav_800ep_pretrain.sh (the paper's 75.3%): ResNet-50, batch 4096 (64 GPUs x 64), base lr 4.8 = 0.3 *
# 4096/256 after 10 warmup epochs from 0.3, cosine to 0.0048; wd 1e-6; LARC (eta 1e-3, no clip) over SGD on every
# parameter; tau 0.1, eps 0.05, K 3000, no queue, prototypes frozen for 313 iterations (one epoch); multi-crop
# 2x224 + 6x96. The 100/200/400-epoch scripts differ only in epochs; the batch-256 ones (lr 0.6, no warmup, queue
# 3840 from epoch 15, 5005 frozen iterations = one epoch) are `--batch-size 256 --lr 0.6 --warmup-epochs 0
# --final-lr 0.0006 --queue-length 3840`. kNN as DINO reports it (k 20, T 0.07).
IMAGENET = dict(arch="resnet50", epochs=800, batch_size=4096, lr=0.3, wd=1e-6, warmup_epochs=10, start_warmup=0.3)
IMAGENET |= dict(final_lr=0.0048, lars_eta=1e-3, lars_clip=False, lars_exclude=False, temperature=0.1, epsilon=0.05)
IMAGENET |= dict(prototypes=3000, queue_length=0, queue_start_epoch=15, freeze_prototypes_epochs=1.0)
IMAGENET |= dict(local_crops=6, local_size=96, knn_k=20, knn_t=0.07)
RECIPES = {
    "imagenet": IMAGENET,
    # No official CIFAR recipe: solo-learn's CIFAR SwAV (scripts/pretrain/cifar/swav.yaml): CIFAR ResNet-18,
    # batch 256, LARS lr 0.6 * bs/256 (eta 0.02, clip, biases and norms excluded; solo/utils/lars.py has LARC's
    # trust ratio), wd 1e-6, 1000 epochs, warmup 10 epochs from 3e-5 then cosine to 0 (solo-learn's scheduler
    # defaults), K 3000, queue 3840 from epoch 50, prototypes frozen 2 epochs, two 32-px crops and no local
    # crops (augmentations/symmetric.yaml). kNN k 200, T 0.1 (InstDisc).
    "small": IMAGENET
    | dict(arch="resnet18", epochs=1000, batch_size=256, lr=0.6, warmup_epochs=10, start_warmup=3e-5, final_lr=0.0)
    | dict(lars_eta=0.02, lars_clip=True, lars_exclude=True, queue_length=3840, queue_start_epoch=50)
    | dict(freeze_prototypes_epochs=2.0, local_crops=0, local_size=16, knn_k=200, knn_t=0.1),
    # `python swav.py`: the built-in shapes as a few-minute demo (pick_recipe uses the tiny backbone on CPUs).
    # Deviation: 10 epochs, batch 256, no warmup (as the batch-256 scripts), eps 0.03 (the swav README's advice
    # when the loss sits at ln K), prototypes frozen for one epoch (the scripts' one epoch), no queue and no local
    # crops (solo-learn's CIFAR SwAV has none in its first 50 epochs), and the ImageNet scripts' LARC (eta 1e-3, no
    # clip) at lr 2.0, as byol.py's demo. Global crops from 30% of the area, not 8%: a crop of 8% of a 32-px image
    # holds a fragment of one shape (byol.py's demo needs the same); with 8% the loss sat at ln K for 200 steps on
    # seed 1 (kNN below random init), with 30% it left ln K on seeds 0-2. K 100, not 3000: the swav authors'
    # advice for 10-class CIFAR-10 (swav#23: try 10-300; swav#118 quotes: an order of magnitude over the classes);
    # K 3000 with 30% crops learned as well in a 117-step trial but ran 20% slower (README "SwAV on the CPU").
    "builtin": dict(epochs=10, batch_size=256, warmup_epochs=0, lr=2.0, lars_eta=1e-3, lars_clip=False)
    | dict(epsilon=0.03, queue_length=0, freeze_prototypes_epochs=1.0, local_crops=0, crop_min=0.3, prototypes=100),
}


# ---- AUGMENTATION RECIPE -----------------------------------------------------------------------------------
def view_recipe(size, local_crops, local_size, crop_min=None):
    """src/multicropdataset.py: every crop is RandomResizedCrop(size, scale), flip, then get_color_distortion
    (ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale p 0.2) and PILRandomGaussianBlur (radius U[0.1, 2],
    p 0.5), the same for global and local crops; solo-learn's CIFAR recipe is the same (symmetric.yaml). Scales:
    with local crops the scripts' (0.14, 1) global and (0.05, 0.14) local; without, (0.08, 1)
    (swav_400ep_2x224_pretrain.sh, solo-learn); `crop_min` (the built-in demo's 0.3) replaces the global crops'
    lower bound. Colour ops are torchvision's. Deviation: blur is a Gaussian kernel of 10% of the crop side (as
    SimCLR) rather than PIL's GaussianBlur(radius=sigma)."""
    color = dict(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0))
    scale = (crop_min or (0.14 if local_crops else 0.08), 1.0)  # crop_min: None except in the built-in demo
    return [ViewAug(size, scale=scale, **color)] * 2 + [ViewAug(local_size, (0.05, 0.14), **color)] * local_crops


# ---- MODEL -------------------------------------------------------------------------------------------------
class SwAV(nn.Module):
    """Backbone, projection MLP (d -> hidden, BN, ReLU -> dim; src/resnet50.py `projection_head`, with biases),
    L2 normalisation, and the prototypes C: Linear(dim, K, no bias), whose rows main_swav.py re-normalises
    before every step (`normalize_prototypes`)."""

    def __init__(self, backbone, hidden_dim=2048, dim=128, prototypes=3000):
        super().__init__()
        self.backbone = backbone
        d = backbone.out_dim  # 2048 for ResNet-50, 512 for ResNet-18
        self.projector = nn.Sequential(
            nn.Linear(d, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim)
        )
        self.prototypes = nn.Linear(dim, prototypes, bias=False)

    def forward(self, *crops):
        # src/resnet50.py forward: one backbone pass per run of crops of one size (concatenated, so BN sees the
        # group), then the head once on every crop together.
        h, start = [], 0
        for end in range(1, len(crops) + 1):
            if end == len(crops) or crops[end].shape[-1] != crops[start].shape[-1]:
                h.append(self.backbone(torch.cat(crops[start:end])))
                start = end
        z = self.projector(torch.cat(h))
        # Scores z . C: (crops * N, K) outside autocast (128 x K: cheap): float32 storage and sums; on CUDA the
        # product runs in TF32 (setup() allows it: 10-bit inputs, as fp16's). z itself leaves the projector's last
        # Linear in bf16 (8-bit). Deviation: main_swav.py's apex O1 computes the scores in fp16; bf16 scores would
        # round 8x more coarsely, and exp(s / eps) at eps 0.05 magnifies that.
        with torch.autocast(z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=1)  # (crops * N, dim)
            return z, self.prototypes(z)

    @torch.no_grad()
    def normalize_prototypes(self):
        """main_swav.py train(): C's rows L2-normalised in place before every forward (Sec. 4: 'we normalize')."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))


def make_backbone(args, small):
    """The backbone as src/resnet50.py builds it: torchvision's init (Kaiming fan-out convs, BN 1 and 0) and no
    zero-init of the residual branches (main_swav.py leaves zero_init_residual False)."""
    if args.arch.startswith("vit") and args.local_crops and args.local_size != args.image_size:
        raise UserError(f"--arch {args.arch} takes {args.image_size}-px crops only; use a ResNet or --local-crops 0")
    return build_backbone(args.arch, args.image_size, small)


def make_optimizer(model, args):
    """main_swav.py: SGD (momentum 0.9, wd on every parameter) wrapped in apex LARC (trust_coefficient 1e-3,
    clip False), whose trust ratio is eta*||w|| / (||g|| + wd*||w||) (`LARS(larc=True)`): nothing is excluded
    (`--no-lars-exclude`; swav's LARC sees model.parameters()). solo-learn's CIFAR recipe: the same trust ratio
    (solo/utils/lars.py), eta 0.02, clip, biases and norms without decay or adaptation. The lr stays outside the
    momentum buffer (torch SGD). The lr is set every step from `learning_rate`."""
    groups = param_groups(model, args.wd, exclude_norm_bias=args.lars_exclude)
    return LARS(groups, eta=args.lars_eta, clip=args.lars_clip, larc=True)


def learning_rate(step, steps_per_epoch, args):
    """main_swav.py lr_schedule, per step: np.linspace(start_warmup, base, warmup steps), then final + (base -
    final)(1 + cos(pi t / T))/2 over the remaining T steps. base = lr x BatchSize / 256. Deviation: main_swav.py
    takes --base_lr as given (4.8 at batch 4096 = 0.3 x 4096/256, the same; swav#37: scale it linearly)."""
    lr, warmup = args.lr * args.batch_size / 256, args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return args.start_warmup + (lr - args.start_warmup) * step / max(1, warmup - 1)
    return cosine_lr(step, args.epochs * steps_per_epoch, lr, warmup=warmup, final=args.final_lr)


# ---- LOSS --------------------------------------------------------------------------------------------------
def all_reduce(x):
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn(scores, epsilon, iterations):
    """Codes of Sec. 3.1 / App. A.1 (main_swav.py distributed_sinkhorn), in float32 whatever the autocast dtype:
    Q = exp(scores / eps)^T (K x B), scaled to sum 1; then `iterations` times: rows to 1/K each, columns to 1/B
    each (B counts every process's columns, queue included); finally Q * B. The sums over columns are
    all-reduced, so several processes compute exactly the codes of one process holding all their columns.
    scores: (B_local, K) -> codes (B_local, K), each row summing to 1 (exact after the last column scaling)."""
    q = torch.exp(scores.float() / epsilon).t()  # (K, B_local)
    k, b = q.shape[0], q.shape[1] * (dist.get_world_size() if dist.is_initialized() else 1)
    q /= all_reduce(q.sum())
    for _ in range(iterations):
        q /= all_reduce(q.sum(1, keepdim=True))  # each prototype's total weight ...
        q /= k  # ... becomes 1/K (equipartition)
        q /= q.sum(0, keepdim=True)  # each sample's total weight ...
        q /= b  # ... becomes 1/B
    return (q * b).t()


def swav_loss(scores, codes, temperature):
    """Eq. 1-2 (main_swav.py train()): for each assigned crop s with codes q_s, the mean over every other crop t
    of the cross-entropy -sum_k q_s,k log softmax(scores_t / tau)_k (batch mean); then the mean over s.
    scores: one (N, K) tensor per crop, assigned crops first; codes: one (N, K) per assigned crop."""
    loss = 0
    for s, q in enumerate(codes):
        others = [t for t in range(len(scores)) if t != s]
        loss += sum(-(q * F.log_softmax(scores[t] / temperature, dim=1)).sum(1).mean() for t in others) / len(others)
    return loss / len(codes)


def main():
    args = parser.parse_args()
    # ---- SETUP -------------------------------------------------------------------------------------------
    env = setup(args.device, args.seed)
    data = load_data(args.data, args.data_dir, env.device)
    recipe = pick_recipe(RECIPES, data, env, args)
    small = recipe != "imagenet"  # CIFAR-scale images: CIFAR stem
    # main_swav.py: queue_length -= queue_length % (batch per GPU x world size), i.e. a multiple of the batch.
    if 0 < args.queue_length < args.batch_size:
        raise UserError(f"--queue-length {args.queue_length} is below --batch-size {args.batch_size}: no queue left")
    if args.local_crops and args.local_size > args.image_size:
        raise UserError(f"--local-size {args.local_size} is larger than the global crops' {args.image_size} px")
    args.queue_length -= args.queue_length % args.batch_size
    resume = prepare_output_dir(args, "swav", env)
    config = dict(vars(args), input_mean=list(data.mean), input_std=list(data.std))  # what backbone.pt expects
    out, autocast = Path(args.output_dir), autocast_for(env, args.dtype)

    # ---- DATA, MODEL, OPTIMIZER --------------------------------------------------------------------------
    views = view_recipe(args.image_size, args.local_crops, args.local_size, args.crop_min)  # 2 global, then local
    loader = TrainLoader(data, views, args.batch_size, env, args.seed, args.workers)
    backbone = make_backbone(args, small)
    model = SwAV(backbone, args.hidden_dim, args.dim, args.prototypes)
    if env.world_size > 1 and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    model = model.to(env.device, memory_format=torch.channels_last)
    embed = nn.Sequential(model.backbone, model.projector)  # z, the output the loss sees (alignment, uniformity)
    optimizer = make_optimizer(model, args)  # LARC over SGD
    train_model = torch.compile(model) if args.compile else model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )
    # main_swav.py: each process keeps a queue of its own past embeddings of the 2 assigned crops, newest first:
    # (2, queue_length / world_size, dim). Not a model buffer: DDP would overwrite it with rank 0's.
    n = args.batch_size // env.world_size
    queue = torch.zeros(2, args.queue_length // env.world_size, args.dim, device=env.device)

    # ---- RESUME ------------------------------------------------------------------------------------------
    step, steps_per_epoch = 0, len(loader)
    if resume:
        ckpt = load_checkpoint(resume, "swav", config, model)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["aug_rng"]) == env.world_size:  # else (another process count) the run goes on, not bitwise
            loader.gen.set_state(ckpt["aug_rng"][env.rank])
            queue.copy_(ckpt["queue"][env.rank])
        else:  # the union of the saved queues, shared out anew
            queue.copy_(ckpt["queue"].transpose(0, 1).flatten(1, 2).chunk(env.world_size, 1)[env.rank])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]

    def save():
        """ckpt.pt (all a resume needs, every rank's queue too) and backbone.pt (torchvision keys), atomically."""
        check_finite(model, optimizer, env, step, out)  # a diverged run keeps its last good checkpoint
        states = [loader.gen.get_state()] * env.world_size  # every rank's augmentation RNG, gathered to rank 0
        if env.world_size > 1:
            dist.all_gather_object(states, loader.gen.get_state())
        queues = gather(queue[None])  # (world, 2, queue_length / world, dim): every rank's own queue
        checksums = rank_checksums(model, env)  # equal on every rank, or the ranks drifted apart
        if env.is_main:
            save_atomic(
                {
                    "method": "swav",
                    "config": config,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "aug_rng": states,
                    "queue": queues,
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
        f"swav: {data.describe(recipe)}, {steps_per_epoch} steps/epoch, "
        f"{env.world_size} process(es) on {env.device}, starting at step {step}\n{json.dumps(config)}"
    )
    if env.is_main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    # main_swav.py --freeze_prototypes_niters: 313 (batch 4096) and 5005 (batch 256) are one ImageNet epoch each.
    # Deviation: given in epochs (solo-learn's form), so one epoch at batch 4096 is 312 steps (drop_last), not 313.
    frozen_steps = math.ceil(args.freeze_prototypes_epochs * steps_per_epoch)
    queue_from = args.queue_start_epoch * steps_per_epoch  # the queue fills from this step ...
    stds, losses, used = [], [], torch.zeros(args.prototypes, device=env.device)  # diagnostics of the epoch

    def diagnostics():
        """swav#62, #12: a loss stuck at ln K (uniform predictions) and how many prototypes the codes use."""
        mean_loss = all_reduce(torch.stack(losses).mean()) / env.world_size
        row = {"eval/collapse_std": torch.stack(stds).mean().item()}
        row["eval/loss_over_ln_k"] = mean_loss.item() / math.log(args.prototypes)
        row["eval/prototypes_used"] = int((all_reduce(used.clone()) > 0).sum())  # argmax of the codes, all ranks
        if abs(row["eval/loss_over_ln_k"] - 1) < 0.01:
            logger.print(
                f"warning: the loss sits at ln K = {math.log(args.prototypes):.3f} (uniform predictions); the swav "
                "README advises a lower --epsilon, a longer --freeze-prototypes-epochs, fewer --local-crops"
            )
        return row

    while step < last_step:
        epoch, stds, losses = step // steps_per_epoch, [], []
        used.zero_()
        for crops in loader.epoch(epoch, start=step % steps_per_epoch):
            lr_now = learning_rate(step, steps_per_epoch, args)  # warmup, then cosine to --final-lr, every step
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            model.normalize_prototypes()
            with autocast():  # multi-res forward: z_t and scores z_t . C of every crop
                z, scores = train_model(*crops)
            scores, z = scores.float().split(n), z.detach().float().split(n)  # per crop, in float32
            with torch.no_grad():  # codes of the 2 global crops (crops_for_assign 0 1), queue columns first
                codes = []
                for s in range(2):
                    batch = scores[s]
                    if len(queue[s]) and step >= queue_from + len(queue[s]) // n:  # ... and is used once full
                        batch = torch.cat([queue[s] @ model.prototypes.weight.t(), batch])  # past z, current C
                    codes.append(sinkhorn(batch, args.epsilon, args.sinkhorn_iterations)[-n:])
                if len(queue[0]) and step >= queue_from:  # newest first, the oldest n rows drop out
                    queue.copy_(torch.cat([torch.stack(z[:2]), queue[:, :-n]], 1))
            loss = swav_loss(scores, codes, args.temperature)  # Eq. 1-2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step < frozen_steps:  # None, not zero: neither weight decay nor momentum may move them
                model.prototypes.weight.grad = None
            optimizer.step()
            logger.step(step, epoch, loss, lr_now)
            stds.append(collapse_std(z[0]))  # SimSiam Sec. 4.1: std of z/||z||; stays on the device
            losses.append(loss.detach())
            used.index_fill_(0, torch.cat([q.argmax(1) for q in codes]), 1.0)
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
            row = {"epoch": epoch, "step": step} | diagnostics()
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
        row |= diagnostics()
    if args.eval_every >= 0:
        row |= evaluate(model.backbone, data, env, args, autocast, linear=True)
        row |= alignment_uniformity(embed, data, loader.views, env, autocast, workers=args.workers)
    logger.write([row])
    logger.print(json.dumps(row))


if __name__ == "__main__":
    run(main)
