"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations. Chen, Kornblith, Norouzi &
Hinton, ICML 2020, arXiv:2002.05709 (v1). v2: Big Self-Supervised Models are Strong Semi-Supervised Learners,
Chen et al., NeurIPS 2020, arXiv:2006.10029.

Two augmented views of each of N images go through one encoder f (backbone) and projection MLP g, giving 2N
vectors z. Each z must pick out its partner view among the other 2N - 1, with cosine similarity over a
temperature tau: the NT-Xent loss (Sec. 2.1, Eq. 1), the other 2(N - 1) views being the negatives:
    l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)
Under torchrun the negatives come from the global batch: z is gathered from every process WITH its gradient.
--version v1 (arXiv:2002.05709): 2-layer head. --version v2 (arXiv:2006.10029, Sec. 2): 3-layer head (the
exported backbone.pt plus the head's first layer is where v2 fine-tunes from), square-root lr scaling, wd 1e-4.
Closest sibling: `diff simclr.py moco.py` (MoCo takes its negatives from a queue of momentum-encoder keys).
Follows google-research/simclr (objective.py, model_util.py / tf2/model.py, data_util.py, run.py); every
deviation from it is marked "Deviation:" below and listed in the README.

    python simclr.py                                    # built-in shapes: a few minutes on a laptop CPU
    python simclr.py --data cifar10 --version v2        # CIFAR recipe (the official README's), downloads once
    python simclr.py --data /path/to/imagenet           # ImageNet recipe (Sec. 4 / App. B) on one GPU
    torchrun --nproc_per_node=8 simclr.py --data /path/to/imagenet    # 8 GPUs, --batch-size is the global 4096

Result on the built-in shapes, 2-core CPU, tiny backbone: `python simclr.py --max-steps 200` (200 of the demo's
390 steps) reaches kNN top-1 63.2% (linear probe 78.8%) for v1 and 48.0% (70.5%) for v2, against 33.0% (54.2%)
for the random-init network (seed 0; pixels: 22.0%). GPU numbers are still to be measured.
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
parser.add_argument("--lr", type=positive_float, default=None, help="base lr, scaled by --lr-scaling (recipe)")
parser.add_argument("--wd", type=nonnegative_float, default=None, help="weight decay (recipe)")
parser.add_argument("--workers", type=nonnegative_int, default=8, help="DataLoader workers per process (image folders)")
parser.add_argument("--output-dir", default=None, help="run folder (default runs/simclr-<data>-<time>)")
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
parser.add_argument("--lars-eta", type=positive_float, default=None, help="LARS trust coefficient (recipe)")
parser.add_argument("--lars-clip", action=argparse.BooleanOptionalAction, default=None, help="LARC clip (recipe)")
parser.add_argument("--version", default="v1", choices=["v1", "v2"], help="v1: arXiv:2002.05709, v2: 2006.10029")
parser.add_argument("--lr-scaling", default=None, choices=["linear", "sqrt"], help="lr*bs/256 or lr*sqrt(bs)")
parser.add_argument("--temperature", type=positive_float, default=None, help="NT-Xent tau (recipe)")
parser.add_argument(
    "--color-strength", type=nonnegative_float, default=None, help="colour distortion strength s (recipe)"
)
parser.add_argument("--proj-layers", type=positive_int, default=None, help="projection head depth: v1 2, v2 3 (recipe)")
parser.add_argument("--dim", type=positive_int, default=128, help="projection output size")

# run.py defaults: LARS (momentum 0.9, eta 1e-3; biases and BN excluded), 10 warmup epochs then cosine, tau 0.1.
IMAGENET = dict(arch="resnet50", epochs=100, batch_size=4096, warmup_epochs=10, lars_eta=1e-3, lars_clip=False)
IMAGENET |= dict(temperature=0.1, color_strength=1.0, knn_k=20, knn_t=0.07)  # kNN as DINO reports it
# README's CIFAR-10 command: CIFAR ResNet-18, batch 512, 1000 epochs, lr 1.0 (linear scaling), tau 0.5, colour
# strength 0.5, no blur; wd 1e-6 in the v1 README and 1e-4 in the v2 README. kNN k 200, T 0.1 (InstDisc).
SMALL = dict(arch="resnet18", epochs=1000, batch_size=512, lr=1.0, lr_scaling="linear", warmup_epochs=10)
SMALL |= dict(lars_eta=1e-3, lars_clip=False, temperature=0.5, color_strength=0.5, knn_k=200, knn_t=0.1)
# `python simclr.py`: the built-in shapes as a few-minute demo (pick_recipe uses the tiny backbone on CPUs).
# Deviation: 10 epochs, batch 256, 1 warmup epoch, so that the short demo spends most of its steps after warmup.
BUILTIN = dict(epochs=10, batch_size=256, warmup_epochs=1)
RECIPES = {
    # v1 Sec. 4 / App. B.1: lr 0.3 * bs/256, wd 1e-6; 2-layer head.
    "v1": {
        "imagenet": IMAGENET | dict(lr=0.3, lr_scaling="linear", wd=1e-6, proj_layers=2),
        "small": SMALL | dict(wd=1e-6, proj_layers=2),
        "builtin": BUILTIN,
    },
    # v2 (Sec. 2 and its README): square-root scaling lr 0.075 * sqrt(bs) (the same 4.8 as 0.3 * 4096/256, but
    # better at small batches, v1 App. B.1), wd 1e-4, 3-layer head.
    "v2": {
        "imagenet": IMAGENET | dict(lr=0.075, lr_scaling="sqrt", wd=1e-4, proj_layers=3),
        "small": SMALL | dict(wd=1e-4, proj_layers=3),
        "builtin": BUILTIN,
    },
}


# ---- AUGMENTATION RECIPE -----------------------------------------------------------------------------------
def view_recipe(size, small, version, strength=1.0):
    """SimCLR's augmentation for both views (App. A, data_util.py): crop area (0.08, 1), flip, colour jitter
    (0.8s, 0.8s, 0.8s, 0.2s) in random order with p 0.8, grayscale p 0.2, Gaussian blur sigma in [0.1, 2] with
    a kernel of 10% of the side and p 0.5. No blur on small images (README: --use_blur=False for CIFAR). Colour
    ops are tf.image's: contrast to each channel's own mean, saturation scaled in HSV, clipped after each op; the
    blur pads with zeros. Brightness: v1 (tag 1.0, data_util.py L.125) adds U[-0.8s, 0.8s]
    (tf.image.random_brightness); v2 (data_util.py L.41-46, impl='simclrv2') multiplies by U[max(0, 1-0.8s), 1+0.8s].
    Deviation: sigma is drawn per image (batch_random_blur draws one sigma per view and per core's batch); for
    s > 1.25, tf.image.random_contrast/saturation refuse the negative lower bound, ours draw U[0, 1+0.8s]. Crops
    are torchvision's RandomResizedCrop (10 tries); data_util.py's sample_distorted_bounding_box makes 100 tries and
    its min_object_covered=0.1 of the whole image keeps areas >= 0.1 (L.285-294)."""
    s = strength
    brightness = "add" if version == "v1" else "multiply"
    jitter = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    view = ViewAug(
        size, scale=(0.08, 1.0), jitter=jitter, blur_p=0.0 if small else 0.5, color="tf", brightness=brightness
    )
    return [view, view]


# ---- MODEL -------------------------------------------------------------------------------------------------
class SimCLR(nn.Module):
    """Encoder f (backbone) and projection head g (Sec. 2.1): (Linear, BN, ReLU) x (layers - 1), then Linear and
    a BN with a scale but no offset (model_util.py linear_layer: no dense bias next to BN, BN center=False on the
    output layer). v1 (model_util.py) has 2 layers, v2 (tf2/model.py) 3; hidden width = the backbone's output."""

    def __init__(self, backbone, proj_layers=2, dim=128):
        super().__init__()
        self.backbone = backbone
        d = backbone.out_dim
        layers = []
        for _ in range(proj_layers - 1):
            layers += [nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True)]
        last_bn = nn.BatchNorm1d(dim)
        last_bn.bias.requires_grad_(False)  # center=False: the offset stays 0
        self.projector = nn.Sequential(*layers, nn.Linear(d, dim, bias=False), last_bn)

    def forward(self, x1, x2):
        # Both views in one pass, as the official code concatenates them: BN statistics over all 2N views.
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        return z.chunk(2)


def make_backbone(args, small):
    """The encoder f, with the last BN of each residual branch (basic and bottleneck blocks) starting at 0:
    resnet.py residual_block / bottleneck_block, batch_norm_relu(..., init_zero=True)."""
    return build_backbone(args.arch, args.image_size, small, zero_init_residual=True)


def make_optimizer(model, args):
    """LARS as model_util.py get_optimizer builds it: momentum 0.9 (run.py), eta 1e-3 (lars_optimizer.py
    EETA_DEFAULT), 'batch_normalization' and 'bias' variables excluded from weight decay and adaptation
    (param_groups), and lars_optimizer.py's default classic momentum: the lr inside the momentum buffer. The lr is
    set every step from `learning_rate`."""
    return LARS(param_groups(model, args.wd), eta=args.lars_eta, clip=args.lars_clip, lr_in_momentum=True)


def learning_rate(step, steps_per_epoch, args):
    """App. B.1 / model_util.py learning_rate_schedule: base lr x BatchSize / 256 (linear) or base lr x
    sqrt(BatchSize) (square root, v2); linear warmup, then cosine decay to 0, set every step. Deviation: the
    warmup starts at lr / W, not 0 (common.cosine_lr)."""
    lr = args.lr * (args.batch_size / 256 if args.lr_scaling == "linear" else math.sqrt(args.batch_size))
    return cosine_lr(step, args.epochs * steps_per_epoch, lr, warmup=args.warmup_epochs * steps_per_epoch)


# ---- LOSS --------------------------------------------------------------------------------------------------
def simclr_loss(z1, z2, temperature, shares=None):
    """NT-Xent (Eq. 1) as objective.py computes it. With z normalised and the global batch Z1, Z2 gathered from
    every process (with gradient), view-1 anchors score [z1 . Z2, z1 . Z1 - 1e9 * self] / tau, whose positive is
    the partner in Z2 (index: local index + rank * N), and view-2 anchors symmetrically; the loss is the sum of
    the two cross-entropies, each a mean over the local anchors (objective.py: loss_a + loss_b, i.e. 2x the
    paper's mean over 2N anchors). With DDP averaging gradients this is the one-process global-batch gradient.
    `shares`: a list that gets each cross-entropy's hardest_negative_share (no gradient, stays on the device)."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    big1, big2 = gather(z1, grad=True), gather(z2, grad=True)  # (W*N, dim): every process's views
    n = len(z1)
    rank = process_rank()
    labels = torch.arange(n, device=z1.device) + rank * n  # where each anchor's own views sit in the gathered batch
    self_mask = F.one_hot(labels, len(big1)) * 1e9  # LARGE_NUM: a view is not its own negative
    logits_ab, logits_aa = z1 @ big2.T / temperature, z1 @ big1.T / temperature - self_mask
    logits_ba, logits_bb = z2 @ big1.T / temperature, z2 @ big2.T / temperature - self_mask
    logits_a, logits_b = torch.cat([logits_ab, logits_aa], 1), torch.cat([logits_ba, logits_bb], 1)
    if shares is not None:  # the self-logits (-1e9) weigh 0 among the negatives
        shares += [hardest_negative_share(logits_a, labels), hardest_negative_share(logits_b, labels)]
    loss_a, loss_b = F.cross_entropy(logits_a, labels), F.cross_entropy(logits_b, labels)
    return loss_a + loss_b


def main():
    args = parser.parse_args()
    # ---- SETUP -------------------------------------------------------------------------------------------
    env = setup(args.device, args.seed)
    data = load_data(args.data, args.data_dir, env.device)
    recipe = pick_recipe(RECIPES[args.version], data, env, args)
    small = recipe != "imagenet"  # CIFAR-scale images: CIFAR stem, no blur
    resume = prepare_output_dir(args, "simclr", env)
    config = dict(vars(args), input_mean=list(data.mean), input_std=list(data.std))  # what backbone.pt expects
    out, autocast = Path(args.output_dir), autocast_for(env, args.dtype)

    # ---- DATA, MODEL, OPTIMIZER --------------------------------------------------------------------------
    views = view_recipe(args.image_size, small, args.version, args.color_strength)
    loader = TrainLoader(data, views, args.batch_size, env, args.seed, args.workers)
    backbone = make_backbone(args, small)
    model = SimCLR(backbone, args.proj_layers, args.dim)
    if env.world_size > 1 and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the paper's global BN (Sec. 3)
    model = model.to(env.device, memory_format=torch.channels_last)
    embed = nn.Sequential(model.backbone, model.projector)  # z, the output the loss sees (alignment, uniformity)
    optimizer = make_optimizer(model, args)  # LARS, lr inside the momentum; no decay or adaptation on BN and bias
    train_model = torch.compile(model) if args.compile else model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )

    # ---- RESUME ------------------------------------------------------------------------------------------
    step, steps_per_epoch = 0, len(loader)
    if resume:
        ckpt = load_checkpoint(resume, "simclr", config, model)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["aug_rng"]) == env.world_size:  # else (another process count) the run goes on, not bitwise
            loader.gen.set_state(ckpt["aug_rng"][env.rank])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]

    def save():
        """ckpt.pt (all a resume needs) and backbone.pt (torchvision keys), each written atomically; v2 also
        head1.pt, the first projection layer (Linear + BN, then ReLU), where v2 fine-tunes from (v2 Sec. 2)."""
        check_finite(model, optimizer, env, step, out)  # a diverged run keeps its last good checkpoint
        states = [loader.gen.get_state()] * env.world_size  # every rank's augmentation RNG, gathered to rank 0
        if env.world_size > 1:
            dist.all_gather_object(states, loader.gen.get_state())
        checksums = rank_checksums(model, env)  # equal on every rank, or the ranks drifted apart
        if env.is_main:
            save_atomic(
                {
                    "method": "simclr",
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
            if args.version == "v2":
                save_atomic(model.projector[:3].state_dict(), out / "head1.pt")

    # ---- TRAIN -------------------------------------------------------------------------------------------
    total_steps = args.epochs * steps_per_epoch
    last_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    if resume and finished(resume, step, last_step, total_steps, env):  # nothing left to train: exit 0
        return
    logger, stop = Logger(out, env, last_step, args.batch_size, step), StopSignal()  # drops rows of steps to redo
    logger.print(
        f"simclr {args.version}: {data.describe(recipe)}, {steps_per_epoch} steps/epoch, "
        f"{env.world_size} process(es) on {env.device}, starting at step {step}\n{json.dumps(config)}"
    )
    if env.is_main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    stds, shares = [], []  # collapse diagnostic and hardest negative's share of each step of the epoch
    while step < last_step:
        epoch, stds, shares = step // steps_per_epoch, [], []
        for x1, x2 in loader.epoch(epoch, start=step % steps_per_epoch):
            lr_now = learning_rate(step, steps_per_epoch, args)  # warmup, then cosine to 0, every step (App. B.1)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            with autocast():  # Alg. 1: z = g(f(x)) for both views
                z1, z2 = train_model(x1, x2)
            # Alg. 1 / Eq. 1: NT-Xent over the global batch, in float32 whatever the autocast dtype.
            loss = simclr_loss(z1.float(), z2.float(), args.temperature, shares)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            logger.step(step, epoch, loss, lr_now)
            stds.append(collapse_std(z1))  # SimSiam Sec. 4.1: std of z/||z||; stays on the device
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
