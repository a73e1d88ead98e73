"""InvaSpread: Unsupervised Embedding Learning via Invariant and Spreading Instance Feature. Ye, Zhang, Yuen &
Chang, CVPR 2019, arXiv:1904.03436.

Instance discrimination inside the batch (Sec. 3.1): two augmented views of each of B images go through one
encoder f (backbone, fc -> 128, L2) as a batch of 2B; each feature f_i must recognise its partner view (i +- B)
and be rejected by every other instance. With the other side held constant (sg, BatchAverage.py `.data`):
    P(j|i) = exp(f_i . sg f_j / tau) / sum_{k != i} exp(f_i . sg f_k / tau)
    L = -1/(2B) sum_i [ log P(pos(i)|i) + sum_{j not in {i, pos(i)}} log(1 - P(j|i)) ]
This is BatchAverage.py's symmetric 2B form: both views are augmented and every one of the 2B features is an
anchor. It generalises the paper's loss, written for B original images x_i and one augmented copy x^_i of each
(Fig. 2): -sum_i log P(i|x^_i) - sum_i sum_{j != i} log(1 - P(i|x_j)), candidates the B original features.
The positive is pulled in (invariance) and each negative's probability pushed to 0 (spreading), no memory bank.
Under torchrun the negatives come from the global batch: the features are gathered from every process WITHOUT
gradient (they are the sg side), so the loss and its gradients equal one process on the global batch when BN
sees the global batch too: on GPUs (SyncBatchNorm). On CPUs (gloo has no SyncBatchNorm) BN normalises each
process's share, so the features, hence loss and gradients, differ from one process's.
Closest sibling: `diff invaspread.py simclr.py` (SimCLR: an MLP projection head, and NT-Xent, a cross-entropy
whose other side also carries gradient); `diff instdisc.py invaspread.py` (InstDisc: a memory bank of one vector
per image in place of the batch's second view). Follows mangye16/Unsupervised_Embedding_Learning (demo_seen.py,
BatchAverage.py, models/resnet_cifar.py, utils.py); every deviation from it is marked "Deviation:" below and
listed in the README.

    python invaspread.py                                # built-in shapes: a few minutes on a laptop CPU
    python invaspread.py --data cifar10                 # demo_seen.py's CIFAR recipe, downloads once
    python invaspread.py --data stl10                   # demo_seen.py's STL-10 recipe (96 px, train+unlabeled)
    python invaspread.py --data /path/to/imagenet       # no official ImageNet recipe: InstDisc's schedule (README)
    torchrun --nproc_per_node=8 invaspread.py --data /path/to/imagenet  # 8 GPUs, --batch-size is the global 256

Result on the built-in shapes, 2-core CPU, tiny backbone: `python invaspread.py --max-steps 100` (100 of the
demo's 390 steps) reaches kNN top-1 76.4% (linear probe 89.9%) against 33.0% (54.2%) for the random-init network
(seed 0; pixels: 22.0%); 60 steps give 51.9 / 55.0 / 45.8% for seeds 0 / 1 / 2. GPU numbers are still to be
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
    epoch_mean,
    evaluate,
    extract_features,
    finished,
    gather,
    hardest_negative_share,
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
parser.add_argument("--lr", type=positive_float, default=None, help="lr, used as given: no batch scaling (recipe)")
parser.add_argument("--wd", type=nonnegative_float, default=None, help="weight decay (recipe)")
parser.add_argument("--workers", type=nonnegative_int, default=8, help="DataLoader workers per process (image folders)")
parser.add_argument("--output-dir", default=None, help="run folder (default runs/invaspread-<data>-<time>)")
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
parser.add_argument("--temperature", type=positive_float, default=None, help="tau of P(j|i) (recipe)")
parser.add_argument("--dim", type=positive_int, default=128, help="embedding size (fc output, demo_seen.py --low-dim)")

# demo_seen.py (CIFAR-10 and STL-10 alike): CIFAR ResNet-18 (models/resnet_cifar.py), batch 128 (drop_last), SGD
# lr 0.03 (not scaled with the batch), momentum 0.9, wd 5e-4 on every parameter, tau 0.1 (--batch-t), 301 epochs
# (range(start_epoch, start_epoch + 301)), lr x 0.1 from epoch 120, x 0.05 from 160, x 0.01 from 200
# (adjust_learning_rate). kNN k 200, sigma = tau (utils.py kNN called with args.batch_t).
SMALL = dict(arch="resnet18", epochs=301, batch_size=128, lr=0.03, wd=5e-4, temperature=0.1, knn_k=200, knn_t=0.1)
SMALL |= dict(lr_drops=((120, 0.1), (160, 0.05), (200, 0.01)))
# Deviation: there is no official ImageNet recipe (README: CIFAR-10, STL-10 and the fine-grained unseen-category
# sets only). Ours takes InstDisc's ImageNet schedule (lemniscate.pytorch main.py: batch 256, SGD lr 0.03,
# momentum 0.9, wd 1e-4, 200 epochs, lr x 0.1 at 120 and x 0.01 at 160) with ResNet-50 (InstDisc's released
# network, lemniscate.pytorch README), and keeps InvaSpread's own tau 0.1 and augmentation. kNN as DINO reports it.
IMAGENET = dict(arch="resnet50", epochs=200, batch_size=256, lr=0.03, wd=1e-4, temperature=0.1, knn_k=20, knn_t=0.07)
IMAGENET |= dict(lr_drops=((120, 0.1), (160, 0.01)))
# `python invaspread.py`: the built-in shapes as a few-minute demo (pick_recipe uses the tiny backbone on CPUs).
# Deviation (ours, for a short CPU demo; other values not compared): 10 epochs, batch 256, lr 0.1, x 0.1 at
# epoch 8.
BUILTIN = dict(epochs=10, batch_size=256, lr=0.1, lr_drops=((8, 0.1),))
RECIPES = {"imagenet": IMAGENET, "small": SMALL, "builtin": BUILTIN}


# ---- AUGMENTATION RECIPE -----------------------------------------------------------------------------------
def view_recipe(size):
    """demo_seen.py transform_train, for both views (datasets/cifar.py applies it twice per image):
    RandomResizedCrop(size, scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.4) always applied (no RandomApply),
    then RandomGrayscale(0.2) (jitter first, as lemniscate's cifar.py; its main.py puts grayscale first), then
    a flip; torchvision's colour semantics, no blur. The same recipe at 224 px for image folders. Deviation:
    colour ops computed on the device in float, not by PIL on uint8."""
    view = ViewAug(size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2, color="torchvision")
    return [view, view]


# ---- MODEL -------------------------------------------------------------------------------------------------
class InvaSpread(nn.Module):
    """Encoder f: backbone, then one fc to the embedding (models/resnet_cifar.py: nn.Linear(512, low_dim), with
    bias), L2-normalised in the loss (the network's Normalize(2)). No MLP head, no BN after the fc."""

    def __init__(self, backbone, dim=128):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Linear(backbone.out_dim, dim)

    def forward(self, x1, x2):
        # Both views in one pass, as demo_seen.py concatenates them (inputs = cat(inputs1, inputs2)).
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        return z.chunk(2)


def make_backbone(args, small):
    """CIFAR ResNet-18 (3x3 stride-1 conv1, no max-pool) for small images. Deviation: torchvision's init
    (Kaiming fan-out convs) where models/resnet_cifar.py keeps PyTorch's default layer init (its init loop is
    commented out), and global average pooling where demo_seen.py pools a fixed 4x4 (CIFAR) or 7x7 window (STL-10:
    avg_pool2d(out, 7) of the 12x12 map keeps only its top-left 7x7)."""
    return build_backbone(args.arch, args.image_size, small)


def make_optimizer(model, args):
    """demo_seen.py: SGD, momentum 0.9, weight decay on every parameter. The lr is set every step from
    `learning_rate`."""
    return torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=args.wd)


def learning_rate(step, steps_per_epoch, args):
    """demo_seen.py adjust_learning_rate: the lr as given (no scaling with the batch), replaced by lr x factor
    from each (epoch, factor) of `lr_drops` on (x 0.1, x 0.05, x 0.01 from epochs 120, 160, 200); per epoch."""
    epoch, factor = step // steps_per_epoch, 1.0
    for start, f in args.lr_drops:
        factor = f if epoch >= start else factor
    return args.lr * factor


# ---- LOSS --------------------------------------------------------------------------------------------------
def invaspread_loss(z1, z2, temperature, shares=None):
    """BatchAverage.py BatchCriterion (negM 1) on the global batch. The anchors are this process's 2N features
    [z1; z2]; the other side is every process's features, gathered WITHOUT gradient (BatchAverage.py multiplies
    by `x.data`), in the order one process would hold them, [Z1; Z2] (2WN rows). Anchor i's positive is its other
    view (i +- WN); P(j|i) is a softmax over every j != i (the positive included); the loss is
    -[log P(pos|i) + sum over the other 2WN - 2 rows of log(1 - P(j|i))], averaged over the anchors
    (BatchAverage.py divides by x.size(0) = 2B). With DDP averaging gradients over processes, the mean over the
    local anchors gives exactly the one-process gradient on the global batch. `shares`: a list that gets the
    hardest_negative_share of P(.|i) over the anchors (no gradient, stays on the device)."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    big1, big2 = gather(z1), gather(z2)  # (W*N, dim): every process's views, constants (sg)
    n, big_n = len(z1), len(big1)
    idx = torch.arange(n, device=z1.device) + process_rank() * n  # where this process's images sit in Z1 (and Z2)
    anchors, keys = torch.cat([z1, z2]), torch.cat([big1, big2])  # (2N, dim), (2WN, dim)
    labels = torch.cat([idx + big_n, idx])  # each anchor's other view: i +- WN
    self_mask = F.one_hot(torch.cat([idx, idx + big_n]), 2 * big_n) * 1e9  # the denominator leaves out only i
    logits = anchors @ keys.T / temperature - self_mask
    if shares is not None:  # max_j P(j|i) / sum_j P(j|i) over the negatives: the self-logit (-1e9) weighs 0
        shares.append(hardest_negative_share(logits, labels))
    log_p = F.log_softmax(logits, dim=1)  # (2N, 2WN): log P(j|i)
    p_neg = log_p.exp().masked_fill(F.one_hot(labels, 2 * big_n).bool(), 0.0)  # P(j|i) of the negatives; 0 else
    log_pos = log_p.gather(1, labels[:, None]).squeeze(1)  # log P(pos|i): invariance
    log_neg = torch.log1p(-p_neg).sum(1)  # sum_j log(1 - P(j|i)): spreading
    return -(log_pos + log_neg).mean()


def embedding_knn(embed, data, env, args, autocast):
    """utils.py kNN (demo_seen.py's protocol): the test images' 128-d L2-normalised embeddings against the
    training images' (data.bank, recomputed without augmentation), the top-k neighbours voting with weight
    exp(s / T) (k 200, T = tau 0.1 in the small recipe); {"eval/embed_knn_top1": top-1}. Deviation: the paper
    reports this kNN; the project's common protocol, eval/knn_top1, is on the backbone's features (evaluate)."""
    if data.test is None or len(data.test) == 0:
        return {}
    kw = dict(size=args.image_size, workers=args.workers, autocast=autocast)
    train_f, test_f = (extract_features(embed, split, data, env, **kw) for split in (data.bank, data.test))
    y, y_test = data.bank.labels, data.test.labels
    return {"eval/embed_knn_top1": knn_top1(train_f, y, test_f, y_test, data.num_classes, args.knn_k, args.knn_t, env)}


def main():
    args = parser.parse_args()
    # ---- SETUP -------------------------------------------------------------------------------------------
    env = setup(args.device, args.seed)
    data = load_data(args.data, args.data_dir, env.device)
    recipe = pick_recipe(RECIPES, data, env, args)
    small = recipe != "imagenet"  # CIFAR-scale images: CIFAR stem
    resume = prepare_output_dir(args, "invaspread", env)
    # Deviation: inputs normalised by each data set's own mean/std; demo_seen.py uses CIFAR's for STL-10 too.
    config = dict(vars(args), input_mean=list(data.mean), input_std=list(data.std))  # what backbone.pt expects
    out, autocast = Path(args.output_dir), autocast_for(env, args.dtype)

    # ---- DATA, MODEL, OPTIMIZER --------------------------------------------------------------------------
    views = view_recipe(args.image_size)
    loader = TrainLoader(data, views, args.batch_size, env, args.seed, args.workers)
    backbone = make_backbone(args, small)
    model = InvaSpread(backbone, args.dim)
    if env.world_size > 1 and env.device.type == "cuda":
        # Deviation: one BN over the global batch of both views; demo_seen.py's nn.DataParallel splits [x1; x2]
        # over 4 GPUs, so each BN sees a quarter of the batch, all of one view (per-view statistics).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(env.device, memory_format=torch.channels_last)
    embed = nn.Sequential(model.backbone, model.projector)  # z, the output the loss sees (kNN, alignment, uniformity)
    optimizer = make_optimizer(model, args)  # SGD, weight decay on every parameter
    train_model = torch.compile(model) if args.compile else model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )

    # ---- RESUME ------------------------------------------------------------------------------------------
    step, steps_per_epoch = 0, len(loader)
    if resume:
        ckpt = load_checkpoint(resume, "invaspread", config, model)
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
                    "method": "invaspread",
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
        f"invaspread: {data.describe(recipe)}, {steps_per_epoch} steps/epoch, "
        f"{env.world_size} process(es) on {env.device}, starting at step {step}\n{json.dumps(config)}"
    )
    if env.is_main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    stds, shares = [], []  # collapse diagnostic and hardest negative's share of each step of the epoch
    while step < last_step:
        epoch, stds, shares = step // steps_per_epoch, [], []
        for x1, x2 in loader.epoch(epoch, start=step % steps_per_epoch):
            lr_now = learning_rate(step, steps_per_epoch, args)  # step decays at fixed epochs (demo_seen.py)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            with autocast():  # Fig. 2: f(x) for both views, one batch of 2N
                z1, z2 = train_model(x1, x2)
            # Sec. 3.1 / BatchAverage.py over the global batch. z comes out of autocast (bf16 on GPUs); the loss
            # casts it to float32 and computes the similarities, softmax and logs there.
            loss = invaspread_loss(z1.float(), z2.float(), args.temperature, shares)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            logger.step(step, epoch, loss, lr_now)  # under torchrun: rank 0's loss, the mean over its 2N anchors
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
                row |= embedding_knn(embed, data, env, args, autocast)
                row |= alignment_uniformity(embed, data, loader.views, env, autocast, workers=args.workers)
            logger.write([row])
            logger.print(json.dumps(row))
            save()
            logger.restart_clock()

    # ---- EVAL AND SAVE -----------------------------------------------------------------------------------
    # Deviation: demo_seen.py reports the best epoch's kNN; here every evaluation is logged, and the paper's number
    # is the maximum of eval/embed_knn_top1 over metrics.jsonl.
    save()
    row = {"epoch": max(step - 1, 0) // steps_per_epoch, "step": step, "final": True}
    if stds:
        row["eval/collapse_std"] = torch.stack(stds).mean().item()
        row["eval/hardest_negative_share"] = epoch_mean(shares, env)
    if args.eval_every >= 0:
        row |= evaluate(model.backbone, data, env, args, autocast, linear=True)
        row |= embedding_knn(embed, data, env, args, autocast)
        row |= alignment_uniformity(embed, data, loader.views, env, autocast, workers=args.workers)
    logger.write([row])
    logger.print(json.dumps(row))


if __name__ == "__main__":
    run(main)
