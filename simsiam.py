"""SimSiam: Exploring Simple Siamese Representation Learning. Chen & He, CVPR 2021, arXiv:2011.10566.

Two augmented views x1, x2 of an image go through one encoder f (backbone + projection MLP) to give z1, z2; a
prediction MLP h maps each to p1 = h(z1), p2 = h(z2). The loss pulls each prediction towards the other view's
projection, through which no gradient flows (the stop-gradient, Eq. 3-4):
    L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,    D(p, z) = -cos(p, z)
No negative pairs, no momentum encoder, no large batch: without the stop-gradient the outputs collapse to a
constant (Sec. 4.1, Fig. 2; try --no-stop-grad). Closest sibling: `diff simsiam.py byol.py` (BYOL adds an EMA
target network). Follows facebookresearch/simsiam (main_simsiam.py, simsiam/builder.py); every deviation from
it is marked "Deviation:" below and listed in the README.

    python simsiam.py                                   # built-in shapes: a few minutes on a laptop CPU
    python simsiam.py --data cifar10                    # CIFAR recipe (App. D), downloads into ./data once
    python simsiam.py --data /path/to/imagenet          # ImageNet recipe (Sec. 4) on one GPU
    torchrun --nproc_per_node=8 simsiam.py --data /path/to/imagenet   # 8 GPUs, --batch-size is the global 512

Result on the built-in shapes, 2-core CPU, tiny backbone: `python simsiam.py` (10 epochs, 4 minutes) lifts kNN
top-1 from 33% (random init, seed 0; pixels: 22%) to 49% (linear probe 54% -> 72%); `--epochs 40` (12.5
minutes) reaches 96.6% (linear 98.4%). The README has Fashion-MNIST and throughput; GPU numbers are still to be
measured.
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
    ViewAug,
    alignment_uniformity,
    autocast_for,
    build_backbone,
    check_finite,
    collapse_std,
    cosine_lr,
    evaluate,
    finished,
    int_at_least,
    load_checkpoint,
    load_data,
    nonnegative_float,
    nonnegative_int,
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
parser.add_argument("--output-dir", default=None, help="run folder (default runs/simsiam-<data>-<time>)")
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
parser.add_argument("--proj-layers", type=positive_int, default=None, help="projection MLP depth: 3 ImageNet, 2 CIFAR")
parser.add_argument("--dim", type=positive_int, default=2048, help="projection / prediction output size")
parser.add_argument("--pred-dim", type=positive_int, default=512, help="prediction MLP hidden size (bottleneck)")
parser.add_argument(
    "--fix-pred-lr",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="keep the predictor at the base lr, no decay (Sec. 4.2, 'h with fixed lr')",
)
parser.add_argument(
    "--stop-grad",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="--no-stop-grad: the collapsing ablation of Sec. 4.1",
)

RECIPES = {
    # Sec. 4 / main_simsiam.py: ResNet-50, batch 512, SGD lr 0.05 * bs/256, momentum 0.9, wd 1e-4, 100 epochs.
    # kNN as DINO reports it (k 20, T 0.07).
    "imagenet": dict(
        arch="resnet50", epochs=100, batch_size=512, lr=0.05, wd=1e-4, proj_layers=3, knn_k=20, knn_t=0.07
    ),
    # App. D (CIFAR-10): CIFAR ResNet-18, 2-layer projection MLP, 2048-d, no blur (quoted in PatrickHua/SimSiam#3).
    # lr 0.03, wd 5e-4, batch 512, 800 epochs as reported in facebookresearch/simsiam#9. kNN k 200, T 0.1 as in
    # the MoCo CIFAR demo / InstDisc.
    "small": dict(arch="resnet18", epochs=800, batch_size=512, lr=0.03, wd=5e-4, proj_layers=2, knn_k=200, knn_t=0.1),
    # `python simsiam.py`: the built-in shapes as a few-minute demo (pick_recipe uses the tiny backbone on CPUs).
    # Deviation: batch 256, lr 0.3, wd 1e-4 (as solo-learn's CIFAR SimSiam: higher lr, lower wd), so that 10
    # short epochs show learning; with the paper's lr 0.03 the tiny net barely moves in that budget.
    "builtin": dict(epochs=10, batch_size=256, lr=0.3, wd=1e-4),
}


# ---- AUGMENTATION RECIPE -----------------------------------------------------------------------------------
def view_recipe(size, small):
    """MoCo v2's augmentation for both views (main_simsiam.py): crop scale (0.2, 1), colour jitter
    (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur sigma in [0.1, 2] with p 0.5, flip.
    No blur on small images (App. D). Deviation: blur is a Gaussian kernel of 10% of the image side (as SimCLR)
    rather than PIL's GaussianBlur(radius=sigma)."""
    view = ViewAug(
        size,
        scale=(0.2, 1.0),
        jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8,
        gray_p=0.2,
        blur_p=0.0 if small else 0.5,
        blur_sigma=(0.1, 2.0),
    )
    return [view, view]


# ---- MODEL -------------------------------------------------------------------------------------------------
class SimSiam(nn.Module):
    """Encoder f = backbone + projection MLP, and prediction MLP h (Sec. 3 'Baseline settings', builder.py)."""

    def __init__(self, backbone, proj_layers=3, dim=2048, pred_dim=512):
        super().__init__()
        self.backbone = backbone
        d = backbone.out_dim  # 2048 for ResNet-50, 512 for ResNet-18: the projector's hidden width
        # Projection MLP: (Linear, BN, ReLU) x (layers - 1), then Linear + BN without affine on the output.
        # Linear layers have no bias since BN follows. Deviation: the official output Linear keeps a frozen
        # bias, which the following BN subtracts away; leaving it out is the same function.
        layers = []
        for _ in range(proj_layers - 1):
            layers += [nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True)]
        self.projector = nn.Sequential(*layers, nn.Linear(d, dim, bias=False), nn.BatchNorm1d(dim, affine=False))
        # Prediction MLP: a bottleneck dim -> pred_dim -> dim, with BN on the hidden layer only (Sec. 3).
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )

    def forward(self, x1, x2):
        # Each view is its own forward pass, so BN statistics are per view, as in the official code.
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))  # (N, dim)
        return self.predictor(z1), self.predictor(z2), z1, z2


def make_backbone(args, small):
    """The backbone of f, with the last BN of each residual branch starting at 0: simsiam/builder.py builds
    base_encoder(num_classes=dim, zero_init_residual=True)."""
    return build_backbone(args.arch, args.image_size, small, zero_init_residual=True)


def make_optimizer(model, args):
    """main_simsiam.py: SGD, momentum 0.9, weight decay on every parameter; the predictor in its own group, whose
    lr stays at the base lr with --fix-pred-lr (`fix_lr`). The lr is set every step from `learning_rate`."""
    groups = [
        {"params": [*model.backbone.parameters(), *model.projector.parameters()], "fix_lr": False},
        {"params": model.predictor.parameters(), "fix_lr": args.fix_pred_lr},
    ]
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.wd)


def learning_rate(step, steps_per_epoch, args, fixed=False):
    """Sec. 4 / main_simsiam.py: base lr x BatchSize / 256, cosine decay to 0 with no warmup; `fixed` (the
    predictor with --fix-pred-lr, Sec. 4.2, Table 1): the base lr throughout. Deviation: the official
    adjust_learning_rate sets the cosine once per epoch; this sets it every step."""
    lr = args.lr * args.batch_size / 256
    return lr if fixed else cosine_lr(step, args.epochs * steps_per_epoch, lr)


# ---- LOSS --------------------------------------------------------------------------------------------------
def simsiam_loss(p1, p2, z1, z2, stop_grad=True):
    """Eq. 4: L = D(p1, sg z2)/2 + D(p2, sg z1)/2 with D(p, z) = -cos(p, z) averaged over the batch (Eq. 1).
    sg = detach: z is a constant target for p, so the gradient reaches the encoder only through p."""
    if stop_grad:
        z1, z2 = z1.detach(), z2.detach()
    return -(F.cosine_similarity(p1, z2, dim=-1).mean() + F.cosine_similarity(p2, z1, dim=-1).mean()) / 2


def main():
    args = parser.parse_args()
    # ---- SETUP -------------------------------------------------------------------------------------------
    env = setup(args.device, args.seed)
    data = load_data(args.data, args.data_dir, env.device)
    recipe = pick_recipe(RECIPES, data, env, args)
    small = recipe != "imagenet"  # CIFAR-scale images: CIFAR stem, no blur
    resume = prepare_output_dir(args, "simsiam", env)
    config = dict(vars(args), input_mean=list(data.mean), input_std=list(data.std))  # what backbone.pt expects
    out, autocast = Path(args.output_dir), autocast_for(env, args.dtype)

    # ---- DATA, MODEL, OPTIMIZER --------------------------------------------------------------------------
    loader = TrainLoader(data, view_recipe(args.image_size, small), args.batch_size, env, args.seed, args.workers)
    backbone = make_backbone(args, small)
    model = SimSiam(backbone, args.proj_layers, args.dim, args.pred_dim)
    if env.world_size > 1 and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    model = model.to(env.device, memory_format=torch.channels_last)
    embed = nn.Sequential(model.backbone, model.projector)  # z, the output the loss sees (alignment, uniformity)
    optimizer = make_optimizer(model, args)  # SGD, weight decay on every parameter, the predictor in its own group
    train_model = torch.compile(model) if args.compile else model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )

    # ---- RESUME ------------------------------------------------------------------------------------------
    step, steps_per_epoch = 0, len(loader)
    if resume:
        ckpt = load_checkpoint(resume, "simsiam", config, model)
        model.load_state_dict(ckpt["model"])
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
                    "method": "simsiam",
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
        f"simsiam: {data.describe(recipe)}, {steps_per_epoch} steps/epoch, "
        f"{env.world_size} process(es) on {env.device}, starting at step {step}\n{json.dumps(config)}"
    )
    if env.is_main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    stds = []  # collapse diagnostic of each step of the epoch
    while step < last_step:
        epoch, stds = step // steps_per_epoch, []
        for x1, x2 in loader.epoch(epoch, start=step % steps_per_epoch):
            lr_now = learning_rate(step, steps_per_epoch, args)  # cosine, no warmup (Sec. 4), every step
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps_per_epoch, args, fixed=group["fix_lr"])
            with autocast():  # Alg. 1: z1, z2 = f(x1), f(x2); p1, p2 = h(z1), h(z2)
                p1, p2, z1, z2 = train_model(x1, x2)
            # Alg. 1: L = D(p1, z2)/2 + D(p2, z1)/2, in float32 whatever the autocast dtype.
            loss = simsiam_loss(p1.float(), p2.float(), z1.float(), z2.float(), args.stop_grad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            logger.step(step, epoch, loss, lr_now)
            stds.append(collapse_std(z1))  # Sec. 4.1: std of z/||z||; stays on the device
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
