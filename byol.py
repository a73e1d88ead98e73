"""BYOL: Bootstrap Your Own Latent. Grill et al., NeurIPS 2020, arXiv:2006.07733.

Two augmented views x1, x2 of an image go through an online network (backbone + projection MLP, giving z1, z2,
then a prediction MLP q) and through a target network (backbone + projection MLP, giving z'1, z'2) whose weights
are an exponential moving average (EMA) of the online ones (Sec. 3.1). Each online prediction regresses the
other view's target projection, through which no gradient flows (Eq. 2, symmetrised in Eq. 4):
    L = l(q(z1), sg(z'2)) + l(q(z2), sg(z'1)),    l(p, z) = || p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)
    after each step: target <- tau * target + (1 - tau) * online, tau rising from tau_base to 1 (Sec. 3.1)
No negative pairs. Closest sibling: `diff simsiam.py byol.py` (SimSiam is BYOL without the EMA target).
Follows deepmind-research/byol (byol_experiment.py, configs/byol.py, utils/networks.py, utils/augmentations.py,
utils/schedules.py); every deviation from it is marked "Deviation:" below and listed in the README.

    python byol.py                                      # built-in shapes: a few minutes on a laptop CPU
    python byol.py --data cifar10                       # small-image recipe (solo-learn's), downloads once
    python byol.py --data /path/to/imagenet             # ImageNet recipe (Sec. 3.3) on one GPU
    torchrun --nproc_per_node=8 byol.py --data /path/to/imagenet      # 8 GPUs, --batch-size is the global 4096

Result on the built-in shapes, 2-core CPU, tiny backbone, seed 0: 200 of the demo's 390 steps
(`python byol.py --max-steps 200`) lift kNN top-1 from 33.0% (random init; pixels: 22.0%) to 52.3% (linear probe
54.2% -> 75.7%). GPU numbers are still to be measured.
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
    ViewAug,
    alignment_uniformity,
    autocast_for,
    build_backbone,
    check_finite,
    collapse_std,
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
parser.add_argument("--output-dir", default=None, help="run folder (default runs/byol-<data>-<time>)")
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
parser.add_argument("--dim", type=positive_int, default=256, help="projection / prediction output size")
parser.add_argument("--hidden-dim", type=positive_int, default=4096, help="projection / prediction MLP hidden size")
parser.add_argument(
    "--tau-base", type=in_range(0, 1), default=None, help="EMA rate at step 0, cosine-ramped to 1 (recipe)"
)
parser.add_argument(
    "--crop-min", type=in_range(0, 1, lo_open=True), default=None, help="smallest crop area fraction (recipe)"
)

RECIPES = {
    # Sec. 3.3 / configs/byol.py at 1000 epochs: ResNet-50, batch 4096, LARS (eta 1e-3, biases and BN excluded)
    # lr 0.2 * bs/256, wd 1.5e-6, 10 warmup epochs then cosine, tau_base 0.996. The config's presets for shorter
    # runs: 300 epochs --lr 0.3 --wd 1e-6 --tau-base 0.99; 100: --lr 0.45 --wd 1e-6 --tau-base 0.99; 40: --lr 0.45
    # --wd 1e-6 --tau-base 0.97. kNN as DINO reports it (k 20, T 0.07).
    "imagenet": dict(
        arch="resnet50",
        epochs=1000,
        batch_size=4096,
        lr=0.2,
        wd=1.5e-6,
        warmup_epochs=10,
        lars_eta=1e-3,
        lars_clip=False,
        tau_base=0.996,
        crop_min=0.08,
        knn_k=20,
        knn_t=0.07,
    ),
    # No official CIFAR recipe (the README's small setup is Imagenette at 128 px): solo-learn's CIFAR BYOL
    # (scripts/pretrain/cifar/byol.yaml): CIFAR ResNet-18, batch 256, LARS lr 1.0 * bs/256 with eta 0.02 and LARC
    # clipping, wd 1e-5, 1000 epochs, 10 warmup epochs, tau 0.99 -> 1, no blur. kNN k 200, T 0.1 (InstDisc).
    "small": dict(
        arch="resnet18",
        epochs=1000,
        batch_size=256,
        lr=1.0,
        wd=1e-5,
        warmup_epochs=10,
        lars_eta=0.02,
        lars_clip=True,
        tau_base=0.99,
        crop_min=0.08,
        knn_k=200,
        knn_t=0.1,
    ),
    # `python byol.py`: the built-in shapes as a few-minute demo (pick_recipe uses the tiny backbone on CPUs).
    # Deviation: 10 epochs, 1 warmup epoch, LARS lr 2.0 with the official eta 1e-3 (no clipping), wd 1e-4: in
    # 200-step trials solo-learn's clipped LARS left the tiny net below its random-init kNN accuracy. Crops from
    # 30% of the area, not 8%: a small crop of a 32 px image holds a fragment of one shape, and BYOL, with no
    # negatives and a lagging target, starts slowest of the methods here; in 200-step trials (seed 0) kNN top-1
    # went from 36.5% with crops from 8% to 41.3% from 20% and 42.4% from 30% (random init: 33.0%; single-thread
    # trials). A lower tau_base (0.9, 0.97) or SGD in place of LARS did not help.
    "builtin": dict(
        epochs=10, batch_size=256, warmup_epochs=1, lr=2.0, wd=1e-4, lars_eta=1e-3, lars_clip=False, crop_min=0.3
    ),
}


# ---- AUGMENTATION RECIPE -----------------------------------------------------------------------------------
def view_recipe(size, small, crop_min):
    """BYOL's asymmetric augmentation (Table 6, utils/augmentations.py L.27-66): crop scale (crop_min, 1), flip,
    colour jitter (0.4, 0.4, 0.2, 0.1) in random order with p 0.8, grayscale p 0.2; blur p 1.0 on view 1 and 0.1
    on view 2 (sigma in [0.1, 2], kernel 10% of the side), solarize p 0 on view 1 and 0.2 on view 2. No blur on
    small images (solo-learn's CIFAR recipe). Colour ops as utils/augmentations.py writes them (tf.image's):
    brightness adds U[-0.4, 0.4] (L.239-240, 261-263), contrast pulls each channel to its own mean (L.243-247),
    saturation scales S in HSV and clips (L.250-251), each op clipped to [0, 1] (L.313-316); blur pads with zeros
    (padding 'SAME', L.427). Deviation: crops are torchvision's RandomResizedCrop (10 tries, else a centre crop);
    utils/dataset.py draws one box and clamps its sides to the image (L.206-233)."""
    scale, jitter = (crop_min, 1.0), (0.4, 0.4, 0.2, 0.1)  # crop_min: 0.08, except in the built-in demo
    tf = dict(color="tf", brightness="add")
    view1 = ViewAug(size, scale=scale, jitter=jitter, blur_p=0.0 if small else 1.0, **tf)
    view2 = ViewAug(size, scale=scale, jitter=jitter, blur_p=0.0 if small else 0.1, solarize_p=0.2, **tf)
    return [view1, view2]


# ---- MODEL -------------------------------------------------------------------------------------------------
def mlp(in_dim, hidden_dim, out_dim):
    """utils/networks.py MLP: Linear (with bias) -> BN -> ReLU -> Linear (no bias). Projector and predictor."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )


class BYOL(nn.Module):
    """Online network (backbone, projector, predictor) and target network (target_backbone, target_projector),
    Sec. 3.1 and Fig. 2. The target gets no gradient; `update_target` moves it towards the online network."""

    def __init__(self, backbone, hidden_dim=4096, dim=256):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.out_dim, hidden_dim, dim)
        self.predictor = mlp(dim, hidden_dim, dim)
        # Deviation: the target starts as a copy of the online network; the official code initialises it from
        # another random seed. The EMA forgets the start either way (Sec. 3.1: "initialised randomly").
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x1, x2):
        # Each view is its own forward pass, so BN statistics are per view.
        p1, p2 = self.predictor(self.projector(self.backbone(x1))), self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():  # the target runs BN in training mode (batch statistics), as the official code
            z1, z2 = self.target_projector(self.target_backbone(x1)), self.target_projector(self.target_backbone(x2))
        return p1, p2, z1, z2

    @torch.no_grad()
    def update_target(self, tau):
        """Sec. 3.1: xi <- tau * xi + (1 - tau) * theta for every weight; BN running statistics are the
        target's own (byol_experiment.py keeps the target's BN state apart and averages only parameters)."""
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = [*self.target_backbone.parameters(), *self.target_projector.parameters()]
        torch._foreach_lerp_(target, online, 1.0 - tau)


def target_tau(step, total, tau_base):
    """Sec. 3.2 (utils/schedules.py target_ema): tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total) + 1) / 2


def make_backbone(args, small):
    """The encoder f. Haiku's ResNet BlockV1 (hk.nets.ResNet.BlockGroup, which utils/networks.py builds on) starts
    the last BN scale of each bottleneck block at 0 (batchnorm_2, scale_init=jnp.zeros); its basic blocks
    (ResNet-18/34) keep 1. Here: torchvision's zero_init_residual for the bottleneck ResNet-50 only."""
    return build_backbone(args.arch, args.image_size, small, zero_init_residual=args.arch == "resnet50")


def make_optimizer(model, args):
    """LARS as byol_experiment.py _optimizer builds it (utils/optimizers.py lars; configs/byol.py: momentum 0.9,
    eta 1e-3): biases and norm parameters excluded from weight decay and adaptation (exclude_bias_and_norm, here
    param_groups), the lr outside the momentum buffer (optax.scale(-lr) after scale_by_lars). The target's
    parameters have requires_grad off and so are not in the optimizer. The lr is set every step."""
    return LARS(param_groups(model, args.wd), eta=args.lars_eta, clip=args.lars_clip)


def learning_rate(step, steps_per_epoch, args):
    """utils/schedules.py learning_schedule: base lr x BatchSize / 256, linear warmup, then cosine decay to 0.
    Deviation: the warmup starts at lr / W, not 0 (common.cosine_lr)."""
    lr = args.lr * args.batch_size / 256
    return cosine_lr(step, args.epochs * steps_per_epoch, lr, warmup=args.warmup_epochs * steps_per_epoch)


# ---- LOSS --------------------------------------------------------------------------------------------------
def byol_loss(p1, p2, z1, z2):
    """Eq. 2 and 4: l(p, z) = 2 - 2 cos(p, z) for each view's prediction against the other view's target
    projection, summed over the two directions and averaged over the batch (byol_experiment.py). The targets
    come from no_grad, the stop-gradient sg(z')."""
    z1, z2 = z1.detach(), z2.detach()
    return (4 - 2 * F.cosine_similarity(p1, z2, dim=-1) - 2 * F.cosine_similarity(p2, z1, dim=-1)).mean()


def main():
    args = parser.parse_args()
    # ---- SETUP -------------------------------------------------------------------------------------------
    env = setup(args.device, args.seed)
    data = load_data(args.data, args.data_dir, env.device)
    recipe = pick_recipe(RECIPES, data, env, args)
    small = recipe != "imagenet"  # CIFAR-scale images: CIFAR stem, no blur
    resume = prepare_output_dir(args, "byol", env)
    config = dict(vars(args), input_mean=list(data.mean), input_std=list(data.std))  # what backbone.pt expects
    out, autocast = Path(args.output_dir), autocast_for(env, args.dtype)

    # ---- DATA, MODEL, OPTIMIZER --------------------------------------------------------------------------
    views = view_recipe(args.image_size, small, args.crop_min)
    loader = TrainLoader(data, views, args.batch_size, env, args.seed, args.workers)
    backbone = make_backbone(args, small)
    model = BYOL(backbone, args.hidden_dim, args.dim)
    if env.world_size > 1 and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    model = model.to(env.device, memory_format=torch.channels_last)
    embed = nn.Sequential(model.backbone, model.projector)  # z, the output the loss sees (alignment, uniformity)
    optimizer = make_optimizer(model, args)  # LARS, lr outside the momentum; no decay or adaptation on BN and bias
    train_model = torch.compile(model) if args.compile else model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )

    # ---- RESUME ------------------------------------------------------------------------------------------
    step, steps_per_epoch = 0, len(loader)
    if resume:
        ckpt = load_checkpoint(resume, "byol", config, model)
        model.load_state_dict(ckpt["model"])  # online and target networks
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
                    "method": "byol",
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
            save_atomic(model.backbone.state_dict(), out / "backbone.pt")  # the online backbone (Sec. 3.3)

    # ---- TRAIN -------------------------------------------------------------------------------------------
    total_steps = args.epochs * steps_per_epoch
    last_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    if resume and finished(resume, step, last_step, total_steps, env):  # nothing left to train: exit 0
        return
    logger, stop = Logger(out, env, last_step, args.batch_size, step), StopSignal()  # drops rows of steps to redo
    logger.print(
        f"byol: {data.describe(recipe)}, {steps_per_epoch} steps/epoch, "
        f"{env.world_size} process(es) on {env.device}, starting at step {step}\n{json.dumps(config)}"
    )
    if env.is_main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    stds = []  # collapse diagnostic of each step of the epoch
    while step < last_step:
        epoch, stds = step // steps_per_epoch, []
        for x1, x2 in loader.epoch(epoch, start=step % steps_per_epoch):
            lr_now = learning_rate(step, steps_per_epoch, args)  # warmup, then cosine to 0, every step (Sec. 3.3)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            with autocast():  # Fig. 2: online q(g(f(x))) and target g'(f'(x)) for both views
                p1, p2, z1, z2 = train_model(x1, x2)
            # Eq. 4: L = l(p1, sg z'2) + l(p2, sg z'1), in float32 whatever the autocast dtype.
            loss = byol_loss(p1.float(), p2.float(), z1.float(), z2.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.update_target(target_tau(step, total_steps, args.tau_base))  # Sec. 3.1: EMA after each step
            logger.step(step, epoch, loss, lr_now)
            stds.append(collapse_std(z1))  # SimSiam Sec. 4.1: std of z'/||z'||; stays on the device
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
    if args.eval_every >= 0:
        row |= evaluate(model.backbone, data, env, args, autocast, linear=True)
        row |= alignment_uniformity(embed, data, loader.views, env, autocast, workers=args.workers)
    logger.write([row])
    logger.print(json.dumps(row))


if __name__ == "__main__":
    run(main)
