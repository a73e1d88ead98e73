"""InstDisc: Unsupervised Feature Learning via Non-Parametric Instance Discrimination. Wu, Xiong, Yu & Lin,
CVPR 2018, arXiv:1805.01978.

Every image is its own class. One augmented view x_i goes through the encoder (backbone, fc -> 128, L2) to give
f_i; a memory bank V (N x 128, one row per training image) stands in for the class weights. The non-parametric
softmax (Sec. 3.1) at temperature tau, approximated by NCE with K noise rows drawn uniformly from the bank and
a normalising constant Z estimated once from the first batch (Sec. 3.2):
    P(i | f) = exp(v_i . f / tau) / Z,   Z = N * mean_j exp(v_j . f / tau)   (set at step 0, then fixed)
    h(i, f) = P(i | f) / (P(i | f) + K / N)
    L = -log h(i, f_i) - sum_{k=1..K} log(1 - h(j_k, f_i)),   j_k ~ U{1..N}
or, with --nce-k 0, the exact softmax over all N rows: L = -log softmax(V f_i / tau)_i. After the loss the
bank moves towards the new features: v_i <- normalize(m v_i + (1 - m) f_i), m = 0.5 (lemniscate's
NCEAverage.py momentum, which stands in for the paper's Sec. 3.3 proximal term: lemniscate has none). Closest
sibling: `diff instdisc.py invaspread.py` (InvaSpread drops the bank and takes its negatives from the batch,
with two views). Follows zhirongw/lemniscate.pytorch (main.py, cifar.py, lib/NCEAverage.py, lib/NCECriterion.py,
lib/LinearAverage.py, lib/alias_multinomial.py, test.py); every deviation from it is marked "Deviation:" below
and listed in the README.

    python instdisc.py                                  # built-in shapes: a few minutes on a laptop CPU
    python instdisc.py --data cifar10                   # cifar.py / the README's CIFAR command (--nce-k 0)
    python instdisc.py --data /path/to/imagenet         # main.py's ImageNet recipe (NCE, K 4096) on one GPU
    torchrun --nproc_per_node=8 instdisc.py --data /path/to/imagenet  # 8 GPUs, --batch-size is the global 256

Result on the built-in shapes, CPU, tiny backbone, the demo's first 400 of 780 steps (batch 128, lr 0.03, tau
0.07, full softmax): kNN 38.5% vs 33.0% for the random-init network (seed 0); InstDisc needs more steps than its
siblings (each bank row is refreshed once per epoch). The README ("InstDisc on the CPU") has seeds 0-2 and the
trials. GPU numbers are still to be measured.
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
    MemoryBank,
    StopSignal,
    TrainLoader,
    UserError,
    ViewAug,
    alignment_uniformity,
    autocast_for,
    build_backbone,
    check_finite,
    collapse_std,
    evaluate,
    extract_features,
    finished,
    gather,
    in_range,
    int_at_least,
    knn_top1,
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
parser.add_argument("--arch", default=None, choices=ARCHS, help="backbone (recipe)")
parser.add_argument("--image-size", type=positive_int, default=None, help="crop side (recipe: native or 224)")
parser.add_argument("--epochs", type=positive_int, default=None, help="(recipe)")
parser.add_argument("--batch-size", type=positive_int, default=None, help="global batch over all processes (recipe)")
parser.add_argument("--lr", type=positive_float, default=None, help="lr, not scaled with the batch (recipe)")
parser.add_argument("--wd", type=nonnegative_float, default=None, help="weight decay (recipe)")
parser.add_argument("--workers", type=nonnegative_int, default=8, help="DataLoader workers per process (image folders)")
parser.add_argument("--output-dir", default=None, help="run folder (default runs/instdisc-<data>-<time>)")
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
parser.add_argument("--dim", type=positive_int, default=128, help="embedding size (--low-dim)")
parser.add_argument("--nce-k", type=nonnegative_int, default=None, help="NCE noise rows K; 0: full softmax (recipe)")
parser.add_argument("--nce-t", type=positive_float, default=None, help="temperature tau (recipe)")
parser.add_argument(
    "--nce-m", type=in_range(0, 1, hi_open=True), default=0.5, help="memory bank momentum m (1 would freeze the bank)"
)
parser.add_argument("--schedule", default=None, choices=["imagenet", "cifar"], help="lr steps (recipe)")

# main.py and its README command: ResNet-18, batch 256, SGD lr 0.03 (momentum 0.9, wd 1e-4), 200 epochs, lr x0.1
# at epoch 120 and x0.01 at 160, NCE with K 4096, tau 0.07. Deviation: kNN as DINO reports it (k 20, T 0.07), so
# every method's ImageNet kNN compares; main.py / the paper use k 200 with sigma = tau (--knn-k 200 --knn-t 0.07).
IMAGENET = dict(arch="resnet18", epochs=200, batch_size=256, lr=0.03, wd=1e-4, nce_k=4096, nce_t=0.07)
IMAGENET |= dict(schedule="imagenet", knn_k=20, knn_t=0.07)
RECIPES = {
    "imagenet": IMAGENET,
    # cifar.py with the README's command `--nce-k 0 --nce-t 0.1 --lr 0.03`: CIFAR ResNet-18, batch 128, wd 5e-4,
    # 200 epochs, lr 0.03 * 0.1 ** ((epoch - 80) // 40) from epoch 80; kNN k 200, sigma = tau 0.1 (test.py).
    "small": dict(arch="resnet18", epochs=200, batch_size=128, lr=0.03, wd=5e-4, nce_k=0, nce_t=0.1, schedule="cifar")
    | dict(knn_k=200, knn_t=0.1),
    # `python instdisc.py`: the built-in shapes as a few-minute demo (pick_recipe uses the tiny backbone on CPUs).
    # Deviation: 10 epochs, tau 0.07 (main.py's, not the CIFAR README's 0.1), batch 128 at cifar.py's lr 0.03.
    "builtin": dict(epochs=10, batch_size=128, lr=0.03, nce_t=0.07),
}


# ---- AUGMENTATION RECIPE -----------------------------------------------------------------------------------
def view_recipe(size, small):
    """One view per image, lemniscate's transforms. ImageNet (main.py:118-123): RandomResizedCrop(224, scale
    (0.2, 1)), RandomGrayscale(0.2) *then* ColorJitter(0.4, 0.4, 0.4, 0.4) (always applied), flip. CIFAR
    (cifar.py:50-57): RandomResizedCrop(32, scale (0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.4) (always) *then*
    RandomGrayscale(0.2), no flip (commented out). ColorJitter's four ops run in a random order per image, as
    torchvision's do. The flip comes last in main.py and with the crop here: a flip commutes with per-pixel
    colour ops, so the views are the same."""
    if small:
        return [ViewAug(size, scale=(0.2, 1.0), flip_p=0.0, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0)]
    return [ViewAug(size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_first=True)]


# ---- MODEL -------------------------------------------------------------------------------------------------
class InstDisc(nn.Module):
    """The encoder (Sec. 3.1, models/resnet.py): backbone, fc (with bias) to `dim`, L2 normalisation."""

    def __init__(self, backbone, dim=128):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_dim, dim)

    def forward(self, x):
        return F.normalize(self.fc(self.backbone(x)), dim=1)  # (B, dim), on the unit sphere


def make_backbone(args, small):
    """torchvision's ResNet with its default init (models/resnet.py, models/resnet_cifar.py: CIFAR stem)."""
    return build_backbone(args.arch, args.image_size, small)


def make_optimizer(model, args):
    """main.py / cifar.py: SGD over every parameter, momentum 0.9, weight decay on all of them."""
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)


def learning_rate(step, steps_per_epoch, args):
    """Set once per epoch, as the official scripts do; not scaled with the batch. 'imagenet' (main.py
    adjust_learning_rate): lr, x0.1 from epoch 120, x0.01 from 160. 'cifar' (cifar.py adjust_learning_rate):
    lr * 0.1 ** ((epoch - 80) // 40) from epoch 80 (x0.1 at 120, x0.01 at 160, x0.001 at 200). Deviation: the
    epochs are read on the official 200-epoch scale (epoch * 200 / --epochs), so a shorter run keeps the shape;
    at 200 epochs this is the official schedule."""
    epoch = (step // steps_per_epoch) * 200 / args.epochs
    if args.schedule == "imagenet":
        return args.lr * 0.1 ** ((epoch >= 120) + (epoch >= 160))
    return args.lr * 0.1 ** max(0, (epoch - 80) // 40)


# ---- LOSS --------------------------------------------------------------------------------------------------
# The loss and the bank are common.py's MemoryBank (shared with cmc.py): NCE against K noise rows with Z set at
# step 0 (lib/NCEAverage.py, NCECriterion.py), or with --nce-k 0 the softmax over all N rows (LinearAverage.py);
# v_i <- normalize(m v_i + (1 - m) f_i) after each step. Its one-step identities are in tests/test_instdisc.py.
def embedding_knn(name, model, train_f, data, env, args, autocast):
    """test.py kNN: the test images' embeddings against train_f (N, dim) (the bank, or the re-embedded training
    set), the top-k neighbours voting with weight exp(s / T); {name: top-1}. Unlabeled rows (STL-10) do not vote."""
    if data.test is None or len(data.test) == 0:
        return {}
    test_f = extract_features(model, data.test, data, env, args.image_size, workers=args.workers, autocast=autocast)
    y, y_test = data.train.labels, data.test.labels
    return {name: knn_top1(train_f, y, test_f, y_test, data.num_classes, args.knn_k, args.knn_t, env)}


def main():
    args = parser.parse_args()
    # ---- SETUP -------------------------------------------------------------------------------------------
    env = setup(args.device, args.seed)
    data = load_data(args.data, args.data_dir, env.device)
    recipe = pick_recipe(RECIPES, data, env, args)
    small = recipe != "imagenet"  # CIFAR-scale images: CIFAR stem, cifar.py's augmentation
    resume = prepare_output_dir(args, "instdisc", env)
    if args.nce_k >= len(data.train):
        raise UserError(f"--nce-k {args.nce_k} is not below the {len(data.train)} training images; lower it")
    config = dict(vars(args), input_mean=list(data.mean), input_std=list(data.std))  # what backbone.pt expects
    out, autocast = Path(args.output_dir), autocast_for(env, args.dtype)

    # ---- DATA, MODEL, OPTIMIZER --------------------------------------------------------------------------
    views = view_recipe(args.image_size, small)
    loader = TrainLoader(data, views, args.batch_size, env, args.seed, args.workers, with_indices=True)
    backbone = make_backbone(args, small)
    model = InstDisc(backbone, args.dim)
    if env.world_size > 1 and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN over the global batch
    model = model.to(env.device, memory_format=torch.channels_last)
    # alignment, uniformity: two draws of the one view, embedded as the loss sees them (f on the sphere)
    embed, au_views = model, loader.views * 2
    # The bank is not a buffer of the DDP-wrapped model (DDP would broadcast all N rows every step); every rank
    # keeps its own copy, kept identical by applying the global batch's update on every rank.
    bank = MemoryBank(len(data.train), args.dim, args.nce_k, args.nce_t, args.nce_m).to(env.device)
    noise_gen = torch.Generator(env.device).manual_seed(args.seed)  # the same on every rank: global-batch noise
    optimizer = make_optimizer(model, args)  # SGD, momentum 0.9, weight decay on every parameter
    train_model = torch.compile(model) if args.compile else model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )

    # ---- RESUME ------------------------------------------------------------------------------------------
    step, steps_per_epoch = 0, len(loader)
    if resume:
        ckpt = load_checkpoint(resume, "instdisc", config, model)
        model.load_state_dict(ckpt["model"])
        bank.load_state_dict(ckpt["bank"])  # V and Z
        noise_gen.set_state(ckpt["noise_rng"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["aug_rng"]) == env.world_size:  # else (another process count) the run goes on, not bitwise
            loader.gen.set_state(ckpt["aug_rng"][env.rank])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]

    def save():
        """ckpt.pt (all a resume needs: the bank, Z and the noise sampler too) and backbone.pt (torchvision
        keys), each written atomically."""
        check_finite(nn.ModuleList([model, bank]), optimizer, env, step, out)  # weights and bank
        states = [loader.gen.get_state()] * env.world_size  # every rank's augmentation RNG, gathered to rank 0
        if env.world_size > 1:
            dist.all_gather_object(states, loader.gen.get_state())
        checksums = rank_checksums(model, env)  # equal on every rank, or the ranks drifted apart
        bank_checksums = rank_checksums(bank, env)  # the same for the banks
        if env.is_main:
            save_atomic(
                {
                    "method": "instdisc",
                    "config": config,
                    "step": step,
                    "model": model.state_dict(),
                    "bank": bank.state_dict(),
                    "noise_rng": noise_gen.get_state(),
                    "optimizer": optimizer.state_dict(),
                    "aug_rng": states,
                    "rank_checksums": checksums,
                    "bank_checksums": bank_checksums,
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
        f"instdisc: {data.describe(recipe)}, {steps_per_epoch} steps/epoch, "
        f"{env.world_size} process(es) on {env.device}, starting at step {step}\n{json.dumps(config)}"
    )
    if env.is_main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    rows = slice(process_rank() * loader.per_rank, (process_rank() + 1) * loader.per_rank)  # this rank's noise
    stds = []  # collapse diagnostic of each step of the epoch
    while step < last_step:
        epoch, stds = step // steps_per_epoch, []
        for x, idx in loader.epoch(epoch, start=step % steps_per_epoch):
            lr_now = learning_rate(step, steps_per_epoch, args)  # step schedule, per epoch
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            with autocast():  # Sec. 3.1: f = normalize(fc(backbone(x)))
                f = train_model(x)
            # Sec. 3.2: NCE (or the full softmax) against the bank, in float32 whatever the autocast dtype. The
            # noise is drawn for the global batch from one generator, so it is the one process's noise.
            noise = bank.draw_noise(args.batch_size, noise_gen)[rows] if args.nce_k else None
            loss = bank(f.float(), idx, noise, step == 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # NCEAverage.py's momentum update: the bank rows of the global batch (every rank's images) move
            # towards the new features.
            bank.update(gather(f.float()), gather(idx))
            logger.step(step, epoch, loss, lr_now)
            stds.append(collapse_std(f))  # SimSiam Sec. 4.1: std of f/||f||; stays on the device
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
            check_finite(nn.ModuleList([model, bank]), optimizer, env, step, out)  # before evaluating
            row = {"epoch": epoch, "step": step, "eval/collapse_std": torch.stack(stds).mean().item()}
            if args.eval_every > 0 and (epoch + 1) % args.eval_every == 0:
                row |= evaluate(model.backbone, data, env, args, autocast)
                row |= alignment_uniformity(embed, data, au_views, env, autocast, workers=args.workers)
                # cifar.py:161 / main.py: the bank is the training set's features (no re-embedding)
                row |= embedding_knn("eval/bank_knn_top1", model, bank.memory, data, env, args, autocast)
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
        row |= alignment_uniformity(embed, data, au_views, env, autocast, workers=args.workers)
        row |= embedding_knn("eval/bank_knn_top1", model, bank.memory, data, env, args, autocast)
        # cifar.py:178 (test.py kNN with recompute_memory=1): the training set re-embedded without augmentation
        train_f = extract_features(
            model, data.train, data, env, args.image_size, workers=args.workers, autocast=autocast
        )
        row |= embedding_knn("eval/embed_knn_top1", model, train_f, data, env, args, autocast)
    logger.write([row])
    logger.print(json.dumps(row))


if __name__ == "__main__":
    run(main)
