"""CMC: Contrastive Multiview Coding. Tian, Krishnan & Isola, ECCV 2020, arXiv:1906.05849.

One random crop of an image, converted to CIE Lab on the device, gives two views: its lightness L (1 channel) and
its colour ab (2 channels). Each view has its own encoder (backbone, fc -> 128, L2): f_l = f_1(L), f_ab = f_2(ab);
and its own memory bank of one embedding per training image, V_l and V_ab, kept as InstDisc keeps its one.
Each view is scored against the *other* view's bank (Sec. 3.2, "contrasting two views"), the positive being the
image's own row and the noise K rows drawn uniformly, and the two losses add (Eq. 3, NCEAverage.py):
    L = L_l + L_ab,   L_l: f_l against V_ab (Z_l),   L_ab: f_ab against V_l (Z_ab)
each with InstDisc's NCE (Eq. 10-12; each view its own normalising constant Z, set once from the first batch),
or, with --softmax, the cross-entropy over the K + 1 candidates (NCESoftmaxLoss; --nce-k 0: over the whole bank).
After the loss both banks move: v <- normalize(m v + (1 - m) f), m = 0.5. Closest sibling: `diff instdisc.py
cmc.py` (two views, two encoders, two banks, cross-view scores). Follows HobbitLong/CMC (train_CMC.py,
dataset.py, NCE/NCEAverage.py, NCE/NCECriterion.py, models/resnet.py, LinearProbing.py); every deviation from
it is marked "Deviation:" below and listed in the README.

    python cmc.py                                       # built-in shapes: a few minutes on a laptop CPU
    python cmc.py --data cifar10                        # small-image recipe (ours: see RECIPES), downloads once
    python cmc.py --data /path/to/imagenet              # train_CMC.py --model resnet50v2 on one GPU
    torchrun --nproc_per_node=8 cmc.py --data /path/to/imagenet       # 8 GPUs, --batch-size is the global 128

kNN and the linear probe see the two backbones' features concatenated (LinearProbing.py). Result on the
built-in shapes, 2-core CPU, tiny backbones, after 100 of the demo's 390 steps: kNN 38.0 / 36.2 / 32.8% for
seeds 0 / 1 / 2 against 31.2 / 32.3 / 29.2% for the networks they start from (linear probe 69.9 / 63.7 / 62.4%
against 52.0 / 55.2 / 50.4%), with the demo's two deviations (banks filled from the starting encoders, BN on the
embeddings; see RECIPES); with lemniscate's random rows every recipe tried fell below its start. The README ("CMC
on the CPU") has the details. GPU numbers are still to be measured.
"""

import argparse
import dataclasses
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
parser.add_argument("--arch", default=None, choices=ARCHS, help="backbone of each encoder (recipe)")
parser.add_argument("--image-size", type=positive_int, default=None, help="crop side (recipe: native or 224)")
parser.add_argument("--epochs", type=positive_int, default=None, help="(recipe)")
parser.add_argument("--batch-size", type=positive_int, default=None, help="global batch over all processes (recipe)")
parser.add_argument("--lr", type=positive_float, default=None, help="lr, not scaled with the batch (recipe)")
parser.add_argument("--wd", type=nonnegative_float, default=None, help="weight decay (recipe)")
parser.add_argument("--workers", type=nonnegative_int, default=8, help="DataLoader workers per process (image folders)")
parser.add_argument("--output-dir", default=None, help="run folder (default runs/cmc-<data>-<time>)")
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
parser.add_argument("--dim", type=positive_int, default=128, help="embedding size of each view (--feat_dim)")
parser.add_argument("--nce-k", type=nonnegative_int, default=None, help="noise rows K; 0: the whole bank (recipe)")
parser.add_argument("--nce-t", type=positive_float, default=None, help="temperature tau (recipe)")
parser.add_argument(
    "--nce-m", type=in_range(0, 1, hi_open=True), default=0.5, help="memory bank momentum m (1 would freeze the bank)"
)
parser.add_argument(
    "--softmax",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="cross-entropy over the K + 1 candidates (NCESoftmaxLoss) instead of NCE (recipe)",
)
parser.add_argument(
    "--crop-min", type=in_range(0, 1, lo_open=True), default=None, help="smallest crop area fraction (recipe)"
)
parser.add_argument(
    "--embed-bn",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="BatchNorm1d on each fc output before the L2 normalisation (recipe; not CMC's)",
)
parser.add_argument(
    "--bank-init",
    default=None,
    choices=["random", "embed"],
    help="random: lemniscate's U(-s, s) rows; embed: each row the starting encoder's embedding, one extra forward "
    "pass over the training set (recipe: the built-in demo's; not CMC's)",
)

# train_CMC.py --model resnet50v2 (two ResNet-50s of width 1: torchvision's resnet50 apart from conv1): batch
# 128, SGD lr 0.03 (momentum 0.9, wd 1e-4), 240 epochs, lr x0.1 after epochs 120, 160 and 200; NCE with K 16384
# (the code's default; the README's released weights used 4096), tau 0.07, m 0.5; crops from 8% of the area for
# ResNets on ImageNet (parse_option: crop_low 0.08 unless AlexNet). kNN as DINO reports it (k 20, T 0.07).
IMAGENET = dict(arch="resnet50", epochs=240, batch_size=128, lr=0.03, wd=1e-4, nce_k=16384, nce_t=0.07)
IMAGENET |= dict(softmax=False, crop_min=0.08, knn_k=20, knn_t=0.07, embed_bn=False, bank_init="random")
RECIPES = {
    "imagenet": IMAGENET,
    # Deviation: no official small-image recipe; ours. Two CIFAR-stem ResNet-18s (resnet18v2), InstDisc's cifar.py batch
    # 128 and wd 5e-4, crops from 20% (train_CMC.py's default crop_low), tau 0.1 (the CMC README's STL-10
    # value). The softmax over K 4096 sampled rows, not NCE: NCE's Z is a Monte Carlo estimate fixed at step 0
    # and proportional to N, poor on small data sets, where the maintainer advises the softmax with fewer
    # negatives (HobbitLong/CMC#12: "Probably you do not need NCE as your dataset is very small. Maybe you can
    # just try softmax instead?"; #50: CMC on CIFAR, "use softmax and less negative samples"). Fewer negatives
    # also draw the image itself as a negative less often (CMC#56): with K 4096 of CIFAR's 50k, 8% of the rows
    # hold it at least once; with 16384, 28%.
    "small": dict(arch="resnet18", epochs=240, batch_size=128, lr=0.03, wd=5e-4, nce_k=4096, nce_t=0.1)
    | dict(softmax=True, crop_min=0.2, knn_k=200, knn_t=0.1, embed_bn=False, bank_init="random"),
    # `python cmc.py`: the built-in shapes as a few-minute demo (pick_recipe uses the tiny backbones on CPUs).
    # Deviation (ours, small data and a few epochs): 10 epochs of batch 256 at the official lr 0.03, with the banks'
    # rows starting as the starting encoders' embeddings (`fill_banks`) and a BatchNorm1d before each embedding's
    # L2 normalisation (`CMC`). A run of a few epochs refreshes each row a few times, so lemniscate's random rows
    # stay most of every positive: with them the tiny encoders fell below their starting kNN accuracy in every
    # trial (lr 0.01-0.3, tau 0.07-0.5, K 4096 or the whole bank, m 0 or 0.5, batch 128-512, up to 10 epochs).
    # Filled rows alone do not help: the tiny net's features share one direction, so all images' starting
    # embeddings nearly coincide, and so would the rows; the BatchNorm spreads them. In 100-step trials (seed 0,
    # kNN from a start of 31.2%): both 38.0%; BN alone 23.9%; filled rows alone 20.8%; both at lr 0.1 35.9%.
    "builtin": dict(epochs=10, batch_size=256, lr=0.03, embed_bn=True, bank_init="embed"),
}


# ---- AUGMENTATION RECIPE -----------------------------------------------------------------------------------
def view_recipe(size, crop_min):
    """One crop per image, both views from it (train_CMC.py get_train_loader): RandomResizedCrop(224, scale
    (crop_min, 1)), flip, then RGB -> Lab (`lab_views`, on the device). No colour jitter or grayscale: the
    colour is what the ab view holds."""
    return [ViewAug(size, scale=(crop_min, 1.0), jitter_p=0.0, gray_p=0.0)]


# skimage.color.rgb2lab (dataset.py RGB2Lab), illuminant D65, 2-degree observer: sRGB -> linear -> XYZ -> Lab.
XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
D65 = (0.95047, 1.0, 1.08883)
# train_CMC.py get_train_loader: each Lab channel minus the midpoint of its range over all sRGB colours, divided
# by half the range (L [0, 100], a [-86.183, 98.233], b [-107.857, 94.478]), so each lies in [-1, 1].
LAB_MEAN = ((0 + 100) / 2, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = ((100 - 0) / 2, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)


def rgb_to_lab(x):
    """(B, 3, H, W) sRGB in [0, 1] -> CIE Lab (B, 3, H, W), L in [0, 100], as skimage.color.rgb2lab computes it:
    linear = ((x + 0.055) / 1.055)^2.4 above 0.04045, else x / 12.92; (X, Y, Z) = M linear / white;
    f(t) = t^(1/3) above 0.008856, else 7.787 t + 16/116; L = 116 f(Y) - 16, a = 500 (f(X) - f(Y)),
    b = 200 (f(Y) - f(Z)). Deviation: batched on the device in float32, from the float crop; the official code
    converts the PIL-resized uint8 crop with skimage in float64 (the values agree to 0.006)."""
    x = x.float()
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055).clamp(min=0).pow(2.4), x / 12.92)
    r, g, b = lin.unbind(1)
    xyz = [(m[0] * r + m[1] * g + m[2] * b) / w for m, w in zip(XYZ_FROM_RGB, D65)]
    fx, fy, fz = (torch.where(t > 0.008856, t.clamp(min=0.008856).pow(1 / 3), 7.787 * t + 16 / 116) for t in xyz)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def lab_views(x):
    """The two views of one crop (B, 3, H, W), RGB in [0, 1]: L (B, 1, H, W) and ab (B, 2, H, W), normalised as
    train_CMC.py does and split as models/resnet.py does (torch.split(x, [1, 2], dim=1))."""
    lab = rgb_to_lab(x)
    lab = torch.stack([(lab[:, c] - LAB_MEAN[c]) / LAB_STD[c] for c in range(3)], 1)
    x_l, x_ab = lab.split([1, 2], dim=1)
    return x_l.contiguous(memory_format=torch.channels_last), x_ab.contiguous(memory_format=torch.channels_last)


# ---- MODEL -------------------------------------------------------------------------------------------------
class CMC(nn.Module):
    """Two encoders (models/resnet.py ResNetV2: l_to_ab takes L, ab_to_l takes ab), each backbone, fc (with
    bias) to `dim`, L2 normalisation. Deviation (`embed_bn`, the built-in demo's recipe): a BatchNorm1d between
    the fc and the normalisation, which spreads the starting embeddings (see `fill_banks`)."""

    def __init__(self, backbone_l, backbone_ab, dim=128, embed_bn=False):
        super().__init__()
        self.backbone_l, self.backbone_ab = backbone_l, backbone_ab

        def fc(backbone):
            linear = nn.Linear(backbone.out_dim, dim)
            return nn.Sequential(linear, nn.BatchNorm1d(dim)) if embed_bn else linear

        self.fc_l, self.fc_ab = fc(backbone_l), fc(backbone_ab)

    def forward(self, x_l, x_ab):
        f_l = F.normalize(self.fc_l(self.backbone_l(x_l)), dim=1)  # (B, dim), on the unit sphere
        return f_l, F.normalize(self.fc_ab(self.backbone_ab(x_ab)), dim=1)


class BothViews(nn.Module):
    """What evaluation sees: an RGB batch in [0, 1] -> L and ab -> the two backbones' features concatenated
    (LinearProbing.py: torch.cat((feat_l, feat_ab), dim=1)), or with `embed` the two embeddings concatenated
    (the banks' kNN)."""

    def __init__(self, model, embed=False):
        super().__init__()
        self.model, self.embed = model, embed

    def forward(self, x):
        x_l, x_ab = lab_views(x)
        if self.embed:
            return torch.cat(self.model(x_l, x_ab), 1)
        return torch.cat([self.model.backbone_l(x_l), self.model.backbone_ab(x_ab)], 1)


def make_backbone(args, small, in_channels):
    """torchvision's ResNet with its default init (models/resnet.py initialises as torchvision does), conv1
    taking the view's channels (1: L, 2: ab); CIFAR stem on small images. Width 1 (resnet50v2): each loads into
    torchvision's ResNet apart from conv1."""
    return build_backbone(args.arch, args.image_size, small, in_channels=in_channels)


def make_optimizer(model, args):
    """train_CMC.py set_optimizer: SGD over every parameter, momentum 0.9, weight decay on all of them."""
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)


def learning_rate(step, steps_per_epoch, args):
    """Set once per epoch, as the official script does; not scaled with the batch (util.py
    adjust_learning_rate): lr, x0.1 after epoch 120, 160 and 200 of 240. Deviation: the epochs are read on the
    official 240-epoch scale (epoch * 240 / --epochs), so a shorter run keeps the shape; at 240 epochs this is
    the official schedule."""
    epoch = (step // steps_per_epoch) * 240 / args.epochs
    return args.lr * 0.1 ** ((epoch >= 120) + (epoch >= 160) + (epoch >= 200))


# ---- LOSS --------------------------------------------------------------------------------------------------
# Each view's bank and its loss are common.py's MemoryBank (instdisc.py's, with NCE/NCECriterion.py's
# NCESoftmaxLoss as `softmax`): NCE with the view's own Z, or the softmax over the K + 1 rows (over every row with
# --nce-k 0); the cross-view pairing (f_l against V_ab, f_ab against V_l) is in TRAIN below.
def fill_banks(model, bank_l, bank_ab, data, env, args, autocast):
    """Deviation (`--bank-init embed`, the built-in demo's recipe): before the first step, V_l[i] and V_ab[i] are
    set to the starting encoders' embeddings f_l and f_ab of training image i, un-augmented, in train mode
    (`extract_features(train=True)`: BN on the statistics of near-equal batches of at most 256 images per
    process, its running statistics updated too; every rank's rows gathered), re-normalised in float32 (a bf16
    embedding is off unit length by up to 0.4%). With lemniscate's random rows a short run spends its first
    epochs fitting noise targets: on the built-in data the tiny encoders fell below their starting kNN accuracy
    in every recipe tried (README, "CMC on the CPU"). Costs one forward pass over the training set."""
    kw = dict(workers=args.workers, autocast=autocast, train=True)
    both = extract_features(BothViews(model, embed=True), data.train, data, env, args.image_size, **kw)  # (N, 2 dim)
    f_l, f_ab = F.normalize(both.unflatten(1, (2, args.dim)), dim=2).unbind(1)
    bank_l.memory.copy_(f_l)
    bank_ab.memory.copy_(f_ab)


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
    small = recipe != "imagenet"  # CIFAR-scale images: CIFAR stem
    resume = prepare_output_dir(args, "cmc", env)
    if args.nce_k >= len(data.train):
        raise UserError(f"--nce-k {args.nce_k} is not below the {len(data.train)} training images; lower it")
    # What backbone.pt expects: Lab (rgb_to_lab of RGB in [0, 1]) normalised by these, L to "l.", ab to "ab.".
    config = dict(vars(args), input_mean=list(LAB_MEAN), input_std=list(LAB_STD))
    out, autocast = Path(args.output_dir), autocast_for(env, args.dtype)
    data = dataclasses.replace(data, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # views in RGB [0, 1], then Lab

    # ---- DATA, MODEL, OPTIMIZER --------------------------------------------------------------------------
    views = view_recipe(args.image_size, args.crop_min)
    loader = TrainLoader(data, views, args.batch_size, env, args.seed, args.workers, with_indices=True)
    backbone_l, backbone_ab = make_backbone(args, small, 1), make_backbone(args, small, 2)
    model = CMC(backbone_l, backbone_ab, args.dim, args.embed_bn)
    if env.world_size > 1 and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN over the global batch
    model = model.to(env.device, memory_format=torch.channels_last)
    # The bank is not a buffer of the DDP-wrapped model (DDP would broadcast all N rows every step); every rank
    # keeps its own copy, kept identical by applying the global batch's update on every rank.
    bank_l, bank_ab = (
        MemoryBank(len(data.train), args.dim, args.nce_k, args.nce_t, args.nce_m, args.softmax).to(env.device)
        for _ in range(2)
    )  # NCEAverage.py memory_l, memory_ab
    banks = nn.ModuleList([bank_l, bank_ab])
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
        ckpt = load_checkpoint(resume, "cmc", config, model)
        model.load_state_dict(ckpt["model"])
        banks.load_state_dict(ckpt["banks"])  # V_l, V_ab and their Z
        noise_gen.set_state(ckpt["noise_rng"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["aug_rng"]) == env.world_size:  # else (another process count) the run goes on, not bitwise
            loader.gen.set_state(ckpt["aug_rng"][env.rank])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
    elif args.bank_init == "embed":  # the rows start as the starting encoders' embeddings, not noise
        if env.is_main:
            print(f"cmc: filling both banks with the starting encoders' embeddings of {len(data.train)} images")
        fill_banks(model, bank_l, bank_ab, data, env, args, autocast)

    def save():
        """ckpt.pt (all a resume needs: the banks, Z and the noise sampler too) and backbone.pt (both backbones,
        torchvision keys under "l." and "ab."), each written atomically."""
        check_finite(nn.ModuleList([model, banks]), optimizer, env, step, out)  # weights and banks
        states = [loader.gen.get_state()] * env.world_size  # every rank's augmentation RNG, gathered to rank 0
        if env.world_size > 1:
            dist.all_gather_object(states, loader.gen.get_state())
        checksums = rank_checksums(model, env)  # equal on every rank, or the ranks drifted apart
        bank_checksums = rank_checksums(banks, env)  # the same for the banks
        if env.is_main:
            save_atomic(
                {
                    "method": "cmc",
                    "config": config,
                    "step": step,
                    "model": model.state_dict(),
                    "banks": banks.state_dict(),
                    "noise_rng": noise_gen.get_state(),
                    "optimizer": optimizer.state_dict(),
                    "aug_rng": states,
                    "rank_checksums": checksums,
                    "bank_checksums": bank_checksums,
                    "rng": torch.get_rng_state(),
                },
                out / "ckpt.pt",
            )
            backbones = nn.ModuleDict({"l": model.backbone_l, "ab": model.backbone_ab})
            save_atomic(backbones.state_dict(), out / "backbone.pt")

    # ---- TRAIN -------------------------------------------------------------------------------------------
    total_steps = args.epochs * steps_per_epoch
    last_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    if resume and finished(resume, step, last_step, total_steps, env):  # nothing left to train: exit 0
        return
    logger, stop = Logger(out, env, last_step, args.batch_size, step), StopSignal()  # drops rows of steps to redo
    logger.print(
        f"cmc: {data.describe(recipe)}, {steps_per_epoch} steps/epoch, "
        f"{env.world_size} process(es) on {env.device}, starting at step {step}\n{json.dumps(config)}"
    )
    if env.is_main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    rows = slice(process_rank() * loader.per_rank, (process_rank() + 1) * loader.per_rank)  # this rank's noise
    # (f_l, f_ab) of an RGB batch, concatenated; alignment and uniformity take two draws of the one crop recipe
    embed = BothViews(model, embed=True)

    def memory():  # the two banks side by side: (N, 2 dim), the rows of embed's output
        return torch.cat([bank_l.memory, bank_ab.memory], 1)

    stds = []  # collapse diagnostic of each step of the epoch
    while step < last_step:
        epoch, stds = step // steps_per_epoch, []
        for x, idx in loader.epoch(epoch, start=step % steps_per_epoch):
            lr_now = learning_rate(step, steps_per_epoch, args)  # step schedule, per epoch
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            x_l, x_ab = lab_views(x)  # one crop, two views: L (B, 1, H, W) and ab (B, 2, H, W)
            with autocast():  # models/resnet.py: f_l = normalize(fc(l_to_ab(L))), f_ab = the same of ab_to_l(ab)
                f_l, f_ab = train_model(x_l, x_ab)
            # Sec. 3.2: each view against the other view's bank, in float32 whatever the autocast dtype; the same
            # noise rows for both (NCEAverage.py), drawn for the global batch from one generator.
            noise = bank_l.draw_noise(args.batch_size, noise_gen)[rows] if args.nce_k else None
            loss = bank_ab(f_l.float(), idx, noise, step == 0) + bank_l(f_ab.float(), idx, noise, step == 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # The rows of the global batch (every rank's images) move towards the new embeddings, each view's own.
            idx_all = gather(idx)
            bank_l.update(gather(f_l.float()), idx_all)
            bank_ab.update(gather(f_ab.float()), idx_all)
            logger.step(step, epoch, loss, lr_now)
            stds.append(collapse_std(f_l))  # SimSiam Sec. 4.1: std of f_l/||f_l||; stays on the device
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
            check_finite(nn.ModuleList([model, banks]), optimizer, env, step, out)  # before evaluating
            row = {"epoch": epoch, "step": step, "eval/collapse_std": torch.stack(stds).mean().item()}
            if args.eval_every > 0 and (epoch + 1) % args.eval_every == 0:
                row |= evaluate(BothViews(model), data, env, args, autocast)
                row |= alignment_uniformity(embed, data, loader.views * 2, env, autocast, workers=args.workers)
                # lemniscate's cifar.py:161 / main.py (CMC itself has no kNN monitor): the banks are the training
                # set's features (no re-embedding)
                row |= embedding_knn("eval/bank_knn_top1", embed, memory(), data, env, args, autocast)
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
        row |= evaluate(BothViews(model), data, env, args, autocast, linear=True)
        row |= alignment_uniformity(embed, data, loader.views * 2, env, autocast, workers=args.workers)
        row |= embedding_knn("eval/bank_knn_top1", embed, memory(), data, env, args, autocast)
        # lemniscate's cifar.py:178 (test.py kNN with recompute_memory=1): the training set re-embedded without
        # augmentation
        train_f = extract_features(
            embed, data.train, data, env, args.image_size, workers=args.workers, autocast=autocast
        )
        row |= embedding_knn("eval/embed_knn_top1", embed, train_f, data, env, args, autocast)
    logger.write([row])
    logger.print(json.dumps(row))


if __name__ == "__main__":
    run(main)
