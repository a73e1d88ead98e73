"""Plumbing shared by the single-file self-supervised trainers (simsiam.py, ...).

Only what every method needs in the same form lives here; everything an algorithm does (its augmentation
recipe, heads, loss, EMA, queue, ...) stays in its own file. Sections, in order:

    errors      UserError and `run`: bad input ends with one clear line, never a traceback
    data        built-in shapes, CIFAR-10/100, STL-10, Fashion-MNIST, image folders
    augment     per-sample random crop/flip/colour/blur/solarize as batched tensor ops on the device
    loaders     TrainLoader (augmented views per step, exact mid-epoch resume) and feature extraction
    backbones   torchvision ResNets (optional CIFAR stem), a ViT written with einops, a tiny CPU test net
    evaluation  weighted kNN (InstDisc), linear probe on frozen features, collapse diagnostic, alignment and
                uniformity (Wang & Isola), the hardest negative's share of the softmax
    memory bank InstDisc's bank of one embedding per image and its NCE / softmax loss (instdisc.py, cmc.py)
    plumbing    torchrun setup, schedules, LARS, checkpoints, metrics and the progress line

Evaluate any exported backbone, or a baseline (kNN + linear probe):
    python common.py --backbone runs/simsiam-cifar10/backbone.pt --data cifar10
    python common.py --pixels --data builtin          # raw pixels
    python common.py --arch tiny --data builtin       # a randomly initialised backbone
"""

import argparse
import fcntl
import functools
import gzip
import hashlib
import json
import math
import os
import pickle
import signal
import struct
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from einops import rearrange


# ----------------------------------------------------------------------------------------------------------------
# ERRORS
# ----------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A problem with what the user asked for; `run` prints it as one line and exits with status 2."""


def run(main):
    """Call main(); a UserError ends the process with `error: <message>` on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _checked(kind, ok, want):
    """An argparse `type=`: parse the text with `kind` and refuse, as argparse's one `error:` line, a value that
    is not `want`. float() reads 'nan' and 'inf': every float type has bounds, which both fail."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
# Up to 1e30: a float32 tensor times a larger number (an lr, a weight decay) overflows, or torch refuses it.
positive_float = _checked(float, lambda v: 0 < v <= 1e30, "a number in (0, 1e30]")
nonnegative_float = _checked(float, lambda v: 0 <= v <= 1e30, "a number in [0, 1e30]")


def int_at_least(lo):
    return _checked(int, lambda v: v >= lo, f"an integer >= {lo}")


def seed_int(text):
    """--seed: an integer in [0, 2**31); the seeds derived from it (seed + rank, per epoch, per image) stay valid."""
    return _checked(int, lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)")(text)


def in_range(lo, hi, lo_open=False, hi_open=False):
    """A number in [lo, hi]; `lo_open` / `hi_open` leave out lo / hi."""

    def ok(v):
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return _checked(float, ok, f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


# ----------------------------------------------------------------------------------------------------------------
# DATA
# ----------------------------------------------------------------------------------------------------------------
DATASETS = ("builtin", "cifar10", "cifar100", "stl10", "fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian's dataset-fashion-mnist package
BUILTIN_SEED, BUILTIN_TRAIN, BUILTIN_TEST = 0, 10_000, 2_000
SMALL_IMAGE = 96  # images up to this side use the small-image (CIFAR-scale) recipe of each method


@dataclass
class Split:
    """One split: `images` uint8 (N, 3, H, W) on the training device (small data sets) or `files` (folders)."""

    labels: torch.Tensor  # (N,) int64; -1 where unlabeled
    images: torch.Tensor | None = None
    files: list | None = None

    def __len__(self):
        return len(self.labels)


@dataclass
class Data:
    name: str
    image_size: int  # side of the stored images; for folders the median short side of a sample (`size_sample`)
    num_classes: int
    mean: tuple
    std: tuple
    train: Split  # what the self-supervised loss trains on
    bank: Split  # labeled training images: the kNN memory and the linear probe's training set
    test: Split | None  # held-out evaluation images (None: an image folder without val/)
    size_sample: int = 0  # folders: how many files image_size was measured on (0: every image has that side)

    def describe(self, recipe):
        """The start line's account of the data: the recipe and why (pick_recipe compares image_size with
        SMALL_IMAGE), then the image and class counts of the training and evaluation splits."""
        side = (
            f"median short side {self.image_size} px over {self.size_sample} sampled files"
            if self.size_sample
            else f"{self.image_size} px images"
        )
        why = f"{side} {'<=' if self.image_size <= SMALL_IMAGE else '>'} {SMALL_IMAGE}"
        folder = self.train.files is not None
        held_out = f"{'val' if folder else 'test'} {_count(self.test)}" if self.test is not None else "no val/"
        return f"{recipe} recipe ({why}), train {_count(self.train)}, {held_out}"


def _count(split):
    """'N images in C classes', with the unlabeled ones counted apart (STL-10's unlabeled part)."""
    labels = split.labels
    classes, unlabeled = labels[labels >= 0].unique().numel(), int((labels < 0).sum())
    return f"{len(split)} images in {classes} classes" + (f" ({unlabeled} unlabeled)" if unlabeled else "")


def load_data(name, data_dir="data", device="cpu"):
    """Resolve --data: a name from DATASETS or an image folder. Small sets are moved to `device` as uint8."""
    if name == "builtin":
        train, test = make_builtin(BUILTIN_TRAIN, BUILTIN_SEED), make_builtin(BUILTIN_TEST, BUILTIN_SEED + 1)
        splits, classes = (train, train, test), 10
    elif name in ("cifar10", "cifar100"):
        splits, classes = _read_cifar(name, Path(data_dir)), int(name[5:])
    elif name == "stl10":
        splits, classes = _read_stl10(Path(data_dir)), 10
    elif name == "fashion-mnist":
        splits, classes = _read_fashion_mnist(Path(data_dir)), 10
    else:
        return _scan_folder(Path(name))
    (x, y), (xb, yb), (xt, yt) = splits
    train, test = Split(labels=y, images=x.to(device)), Split(labels=yt, images=xt.to(device))
    bank = train if xb is x else Split(labels=yb, images=xb.to(device))  # the same images: one copy on the device
    # Per-channel statistics of the training images, for input normalisation (as CIFAR trainers do).
    mean = tuple(train.images[:10_000].float().mean(dim=(0, 2, 3)).div(255).tolist())
    std = tuple(train.images[:10_000].float().std(dim=(0, 2, 3)).div(255).tolist())
    return Data(name, train.images.shape[-1], classes, mean, std, train, bank, test)


def make_builtin(n, seed, size=32):
    """The built-in data set: ten shape classes (disk, ring, square, frame, triangle, plus, diamond, bars,
    half disk, L). An image shows three copies of its class's shape, each with its own random position, size,
    small rotation and light colour, over a dark background tinted by random low-frequency colour blobs; so
    neither colour nor position tells the class, and pixel-space kNN stays near 26%. Several copies make the
    class visible in most random crops, which is what lets a self-supervised method learn it. Deterministic in
    `seed`. Returns uint8 images (n, 3, size, size) and int64 labels (n,), 10% per class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=g) % 10
    return torch.cat([_draw_shapes(y, g, size) for y in labels.split(1000)]), labels  # chunks: stay in cache


SHAPES = [  # implicit shapes in a unit frame (u, v): disk, ring, square, frame, triangle, plus, diamond, bars,
    # half disk, L
    lambda u, v: u * u + v * v < 1,
    lambda u, v: ((u * u + v * v) > 0.3) & (u * u + v * v < 1),
    lambda u, v: torch.maximum(u.abs(), v.abs()) < 0.8,
    lambda u, v: (torch.maximum(u.abs(), v.abs()) > 0.45) & (torch.maximum(u.abs(), v.abs()) < 0.85),
    lambda u, v: (v < 0.75) & (u.abs() < 0.56 * (v + 0.95)),
    lambda u, v: ((u.abs() < 0.28) & (v.abs() < 0.95)) | ((v.abs() < 0.28) & (u.abs() < 0.95)),
    lambda u, v: u.abs() + v.abs() < 1,
    lambda u, v: (v.abs() > 0.2) & (v.abs() < 0.6) & (u.abs() < 0.9),
    lambda u, v: (u * u + v * v < 1) & (v < 0.1),
    lambda u, v: ((u > -0.85) & (u < -0.35) & (v.abs() < 0.9)) | ((v > 0.4) & (v < 0.9) & (u.abs() < 0.85)),
]


def _draw_shapes(labels, g, size, copies=3):
    n, s = len(labels), 2 * size  # masks are drawn at 2x and averaged: anti-aliased edges
    rand = lambda *shape: torch.rand(*shape, generator=g)
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    order = labels.argsort()  # images grouped by class: each shape is drawn on one contiguous slice
    bounds = torch.cumsum(torch.bincount(labels, minlength=len(SHAPES)), 0).tolist()
    blobs = F.interpolate(rand(n, 3, 4, 4) - 0.5, size=(size, size), mode="bilinear")
    img = 0.35 * rand(n, 1, 1, 1) + 0.4 * blobs  # dark background, random colour blobs
    for _ in range(copies):
        cx, cy = [(0.1 + 0.8 * rand(n, 1, 1)) * s for _ in range(2)]
        r = (0.12 + 0.1 * rand(n, 1, 1)) * s
        th = (rand(n, 1, 1) - 0.5) * 0.7  # +-20 degrees: more would turn plus into X and square into diamond
        cos, sin = (th.cos() / r)[order], (th.sin() / r)[order]
        dx, dy = xx - cx[order], yy - cy[order]
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        mask = torch.cat([shape(u[a:b], v[a:b]) for shape, a, b in zip(SHAPES, [0] + bounds, bounds)]).float()
        alpha = torch.empty(n, 1, size, size)
        alpha[order] = F.avg_pool2d(mask.unsqueeze(1), 2)  # coverage of each pixel by this copy
        img = img + alpha * (0.4 + 0.6 * rand(n, 3, 1, 1) - img)  # a light random colour per copy, on top
    img = img + 0.03 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _missing(name, root, files, hint):
    raise UserError(f"{name} not found: expected {', '.join(files)} under {root} ({hint})")


def _download(name, root):
    """Fetch a torchvision data set into root (first use only); an offline machine gets a clear message."""
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}.get(name)
    try:
        if cls is None:
            torchvision.datasets.STL10(str(root), split="train+unlabeled", download=True)
        else:
            cls(str(root), download=True)
    except Exception as e:  # noqa: BLE001 (network errors come in many types)
        raise UserError(
            f"could not download {name} into {root} ({type(e).__name__}: {e}); "
            f"copy the data set there by hand or pass --data-dir"
        ) from None


def _read_cifar(name, root):
    """CIFAR-10/100 in torchvision's on-disk format (python pickles); downloaded into root if missing."""
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    parts = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if name == "cifar10" else (["train"], ["test"])
    if not all((folder / p).exists() for p in sum(parts, [])):
        _download(name, root)
    key = b"labels" if name == "cifar10" else b"fine_labels"

    def read(files):
        xs, ys = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            xs.append(torch.as_tensor(d[b"data"]).reshape(-1, 3, 32, 32))
            ys.append(torch.as_tensor(d[key]))
        return torch.cat(xs), torch.cat(ys).long()

    train, test = read(parts[0]), read(parts[1])
    return train, train, test


def _read_stl10(root):
    """STL-10 binaries (torchvision's layout): SSL trains on train+unlabeled (105k), kNN/probe use the labeled 5k."""
    folder = root / "stl10_binary"
    names = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"]
    if not all((folder / f).exists() for f in names):
        _download("stl10", root)

    def images(f):  # stored column-major: (N, 3, W, H)
        raw = torch.frombuffer(bytearray((folder / f).read_bytes()), dtype=torch.uint8)
        return raw.reshape(-1, 3, 96, 96).transpose(2, 3).contiguous()

    def labels(f):
        return torch.frombuffer(bytearray((folder / f).read_bytes()), dtype=torch.uint8).long() - 1

    bank = images("train_X.bin"), labels("train_y.bin")
    unlabeled = images("unlabeled_X.bin")
    train = torch.cat([bank[0], unlabeled]), torch.cat([bank[1], torch.full((len(unlabeled),), -1)])
    return train, bank, (images("test_X.bin"), labels("test_y.bin"))


def _read_idx(path):
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def _read_fashion_mnist(root):
    """Fashion-MNIST IDX files from --data-dir or Debian's package; 28x28 grey, repeated to 3 channels."""
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for folder in (root / "fashion-mnist", root, *map(Path, FASHION_MNIST_DIRS)):
        found = [next((folder / (n + s) for s in (".gz", "") if (folder / (n + s)).exists()), None) for n in names]
        if all(found):
            x, y, xt, yt = map(_read_idx, found)
            train = x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), y.long()
            return train, train, (xt.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), yt.long())
    _missing(
        "fashion-mnist",
        f"{root}/fashion-mnist, {root} or {FASHION_MNIST_DIRS[0]}",
        names,
        "apt-get install dataset-fashion-mnist, or copy the IDX files there",
    )


SIZE_SAMPLE = 64  # image folders: image_size is the median short side of this many evenly spaced files


def _scan_folder(root):
    """An ImageNet-style folder: root/train/<class>/<image> (or root/<class>/<image>), root/val/<class>/<image>.
    Names beginning with "." are skipped at every depth (.ipynb_checkpoints, macOS ._name stubs, .git). Val
    labels follow the training class names; val classes that train lacks are left out with a warning."""
    if not root.exists():
        raise UserError(
            f"--data {root}: no such folder; pass an image folder (DIR/train/<class>/<image>) "
            f"or one of {', '.join(DATASETS)}"
        )
    if not root.is_dir():
        raise UserError(f"--data {root} is a file; pass a folder laid out as DIR/train/<class>/<image>")
    train_dir, val_dir = (root / "train" if (root / "train").is_dir() else root), root / "val"
    classes = [c for c in _class_dirs(train_dir) if train_dir / c != val_dir]  # root/val is never a class
    if not classes:
        loose = _images(train_dir, recurse=False)
        raise UserError(
            f"{train_dir} has no class subfolders"
            + (
                f" ({len(loose)} images lie in it directly); put them in one subfolder per class, "
                f"DIR/train/<class>/<image> (a single subfolder for unlabeled images)"
                if loose
                else " and no images; expected DIR/train/<class>/<image>"
            )
        )
    index = {c: label for label, c in enumerate(classes)}  # val is labelled by class name, as train is

    def scan(d, names):
        return [(f, index[c]) for c in names for f in _images(d / c)]

    train_files = scan(train_dir, classes)
    if not train_files:
        raise UserError(
            f"{train_dir} holds {len(classes)} class folders but no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    val_files = []
    if val_dir.is_dir():
        val_classes = _class_dirs(val_dir)
        shared, extra = [c for c in val_classes if c in index], [c for c in val_classes if c not in index]
        if val_classes and not shared:
            raise UserError(
                f"{val_dir} and {train_dir} have no class folder in common (val: {_names(val_classes)}; "
                f"train: {_names(classes)}); name the val/<class> folders as in train/, or remove val/"
            )
        if extra:
            _warn(f"{len(extra)} val classes are not in train/ and are left out of evaluation: {_names(extra)}")
        val_files = scan(val_dir, shared)
        if not val_files:
            loose = _images(val_dir, recurse=False)
            _warn(
                f"{val_dir} holds no images in class subfolders"
                + (f" ({len(loose)} lie in it directly; sort them into val/<class>/)" if loose else "")
                + "; no evaluation"
            )
    side, sampled = _median_side([f for f, _ in train_files])
    labels = lambda fs: torch.tensor([y for _, y in fs], dtype=torch.long)  # noqa: E731
    train = Split(labels(train_files), files=train_files)
    test = Split(labels(val_files), files=val_files) if val_files else None
    return Data(str(root), side, len(classes), IMAGENET_MEAN, IMAGENET_STD, train, train, test, sampled)


def _class_dirs(d):
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def _images(d, recurse=True):
    """Image files under d, sorted, skipping every name that begins with "." (files and folders)."""
    files = []
    for top, dirs, names in os.walk(d) if recurse else [(str(d), [], os.listdir(d))]:
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))  # os.walk descends only into these
        files += sorted(
            os.path.join(top, n)
            for n in names
            if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
        )
    return files


def _names(names, most=8):
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _warn(text):
    if process_rank() == 0:  # load_data runs on every rank; say it once
        print(f"warning: {text}", file=sys.stderr, flush=True)


def _median_side(files):
    """The median short side of up to SIZE_SAMPLE evenly spaced files (from PIL's header read, no decoding),
    and how many were read. A sample, not the first file: one thumbnail that sorts first must not pick the
    small-image recipe for a folder of photos."""
    from PIL import Image

    k = min(SIZE_SAMPLE, len(files))
    sides = []
    for i in sorted({round(j * (len(files) - 1) / max(k - 1, 1)) for j in range(k)}):
        try:
            with Image.open(files[i]) as im:
                sides.append(min(im.size))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot decode image {_decode_error(files[i], e)}; delete or replace the file") from None
    return sorted(sides)[(len(sides) - 1) // 2], len(sides)


# ----------------------------------------------------------------------------------------------------------------
# AUGMENT
# Each op takes a float batch (B, 3, H, W) in [0, 1] and per-sample parameters (tensors of shape (B,)). The
# "torchvision" ops equal torchvision's functional op applied to each image with that image's parameters; the "tf"
# ops equal tf.image's documented formulas (tests/test_augment.py, tests/test_recipes_aug.py).
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewAug:
    """The augmentation recipe of one view; method files declare theirs. Probabilities are per image.

    `color` names whose colour ops a view uses, since the sources differ: "torchvision" (ColorJitter: MoCo,
    SimSiam) multiplies brightness, blends contrast to the grey mean and saturation to grey, and blurs with
    reflect padding; "tf" (tf.image, SimCLR data_util.py and BYOL utils/augmentations.py) pulls each channel to
    its own mean for contrast, scales S in HSV (clipped at 1) for saturation, clips to [0, 1] after each op and
    blurs with zero padding. `brightness` "multiply" scales by U[max(0, 1-s), 1+s]; "add" adds U[-s, s]
    (tf.image.random_brightness: BYOL, SimCLR v1). `gray_first`: RandomGrayscale before the jitter (InstDisc,
    MoCo v1), else after (all others). The two orders differ: grayscale(hue(x)) != grayscale(x)."""

    size: int  # output side in pixels
    scale: tuple = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue strengths (ColorJitter)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0
    color: str = "torchvision"  # "torchvision" or "tf": whose colour ops and blur padding (see above)
    brightness: str = "multiply"  # "multiply" or "add"
    gray_first: bool = False  # grayscale before the colour jitter

    def __post_init__(self):
        if self.color not in ("torchvision", "tf") or self.brightness not in ("multiply", "add"):
            raise ValueError(f"ViewAug: unknown color={self.color!r} or brightness={self.brightness!r}")


def sample_crops(n, height, width, scale, ratio, gen, device="cpu"):
    """RandomResizedCrop.get_params for n images at once: 10 tries of (area, log-ratio), the first that fits,
    else a centre crop clamped to `ratio`. Returns int64 tensors top, left, h, w of shape (n,)."""
    area = height * width
    target = area * torch.empty(n, 10, device=device).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    w = (target * log_r.exp()).sqrt().round().long()
    h = (target / log_r.exp()).sqrt().round().long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.long().argmax(1, keepdim=True)  # index of the first try that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)
    in_ratio = width / height  # fallback: the whole image, cut to the allowed aspect ratio
    fw = width if in_ratio <= ratio[1] else round(height * ratio[1])
    fh = height if in_ratio >= ratio[0] else round(width / ratio[0])
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(2, n, device=device, generator=gen)
    top = torch.where(found, (u[0] * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(found, (u[1] * (width - w + 1)).long(), (width - w) // 2)
    return top, left, h, w


def _resize_matrix(start, length, in_size, out_size):
    """(B, out, in) weights of antialiased bilinear resampling of pixels [start, start+length) to out_size pixels:
    the triangle filter of torch's interpolate(antialias=True), widened by the scale when shrinking."""
    scale = (length.float() / out_size)[:, None, None]
    center = scale * (torch.arange(out_size, device=start.device)[None, :, None] + 0.5)
    rel = torch.arange(in_size, device=start.device)[None, None, :] - start[:, None, None]
    inv = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    w = (1 - (rel + 0.5 - center).abs() * inv).clamp(min=0)
    w = w * ((rel >= 0) & (rel < length[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def resized_crop(x, top, left, h, w, size, flip=None):
    """Crop each image to its box and resize it to size x size (TF.resized_crop, antialias=True), mirrored where
    `flip` is True. Written as two batched matrix products: rows Wy (B,S,H), columns Wx (B,S,W)."""
    wy = _resize_matrix(top, h, x.shape[-2], size)
    wx = _resize_matrix(left, w, x.shape[-1], size)
    if flip is not None:  # mirroring the output columns is free here: reverse the rows of Wx
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    return wy.unsqueeze(1) @ x @ wx.unsqueeze(1).transpose(-1, -2)


def _b(t):  # per-sample parameter (B,) -> broadcastable over (B, C, H, W)
    return t.view(-1, 1, 1, 1)


@functools.lru_cache
def _const(values, device):
    """A small constant tensor on a device, made once: building it in every step would copy host -> device,
    which waits for the GPU (a host sync)."""
    return torch.tensor(values, device=device)


def grayscale(x):
    """ITU-R 601-2 luma (TF.rgb_to_grayscale; tf.image.rgb_to_grayscale uses the same weights), as (B, 1, H, W)."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def adjust_brightness(x, f):
    return (_b(f) * x).clamp(0, 1)


def adjust_contrast(x, f):
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (_b(f) * x + (1 - _b(f)) * mean).clamp(0, 1)


def adjust_saturation(x, f):
    return (_b(f) * x + (1 - _b(f)) * grayscale(x)).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotate the HSV hue by `shift` turns (TF.adjust_hue, and tf.image.adjust_hue: both rotate H in HSV). Hue
    from the max channel, H' = (6H + 6 shift) mod 6; back to RGB with the closed form channel = V - C * clamp(
    min(k, 4 - k), 0, 1), k = (n + H') mod 6, n = 5, 3, 1 for R, G, B. Written with in-place ops, one channel
    at a time: this op is about half of the colour ops' time on a CPU."""
    r, g, b = x.unbind(1)
    vmin, v = torch.aminmax(x, dim=1)
    c = v - vmin
    num = torch.where(v == r, g - b, torch.where(v == g, (b - r) + 2 * c, (r - g) + 4 * c))  # 6H C; 0 where C = 0
    h = num.div_(torch.where(c > 0, c, 1.0)).add_(6 * shift.view(-1, 1, 1)).remainder_(6)
    out = torch.empty_like(x)
    for i, n in enumerate((5.0, 3.0, 1.0)):
        k = (h + n).remainder_(6)
        torch.minimum(k, 4 - k, out=out[:, i]).clamp_(0, 1)
    return out.mul_(c.unsqueeze(1)).neg_().add_(v.unsqueeze(1))


def add_brightness(x, delta):
    """tf.image.adjust_brightness: x + delta (not clipped; the sources clip after each jitter op)."""
    return x + _b(delta)


def adjust_contrast_tf(x, f):
    """tf.image.adjust_contrast: each channel to its own mean, (x - mean) * f + mean (not clipped)."""
    return x + (_b(f) - 1) * (x - x.mean(dim=(2, 3), keepdim=True))  # written so that f = 1 returns x exactly


def adjust_saturation_tf(x, f):
    """tf.image.adjust_saturation: S *= f in HSV, clipped to [0, 1], H and V kept. In RGB, with V the max channel
    and C = V - min: each channel becomes V - (V - x) * C'/C with C' = min(S f, 1) V, i.e. V - (V - x) min(f, V/C)."""
    v = x.amax(1, keepdim=True)
    c = v - x.amin(1, keepdim=True)
    ratio = torch.minimum(_b(f), v / torch.where(c > 0, c, torch.ones_like(c)))  # c = 0: x = V, any ratio works
    return x + (1 - ratio) * (v - x)  # = V - (V - x) ratio, written so that f = 1 returns x exactly


def gaussian_blur(x, sigma, kernel_size, padding="reflect"):
    """Separable Gaussian blur, one sigma per image; sigma <= 0 leaves the image unchanged (a delta kernel).
    padding "reflect": TF.gaussian_blur (torchvision); "zeros": SimCLR data_util.gaussian_blur and BYOL
    utils/augmentations.py (depthwise conv, padding='SAME'), whose borders darken."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t / sigma.clamp(min=1e-6)[:, None]) ** 2)
    k = torch.where((sigma > 0)[:, None], k, (t == 0).float())
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(x.shape[1], 0)  # (B*C, k)
    mode = "reflect" if padding == "reflect" else "constant"
    y = F.pad(x.reshape(1, -1, *x.shape[2:]), [kernel_size // 2] * 4, mode=mode)
    y = F.conv2d(y, k[:, None, None, :], groups=k.shape[0])
    y = F.conv2d(y, k[:, None, :, None], groups=k.shape[0])
    return y.reshape(x.shape)


def solarize(x, apply):
    """Invert pixels >= 0.5 (TF.solarize at threshold 0.5) in the images where `apply` is True."""
    return torch.where(_b(apply) & (x >= 0.5), 1 - x, x)


def sample_jitter(n, view, gen, device="cpu"):
    """ColorJitter.get_params per image: factors U[max(0, 1-s), 1+s] (torchvision's _check_input) for
    brightness (or, for additive brightness, an offset U[-s, s]), contrast and saturation; hue U[-h, h]; a
    uniformly random order of the four ops, all four applied (as every source does). tf.image.random_contrast
    and random_saturation draw U[1-s, 1+s] and refuse s > 1; BYOL's JAX code draws U[1-s, 1+s] (s <= 0.4).
    Returns params (4, n), identities (factor 1, offset 0, hue 0) where the jitter is not applied (prob.
    1 - jitter_p), and order (n, 4): the op index at each position, -1 where the jitter is not applied."""
    u = torch.rand(5, n, device=device, generator=gen)
    apply = u[4] < view.jitter_p
    rows = []
    for i, s in enumerate(view.jitter):
        if i == 3 or (i == 0 and view.brightness == "add"):  # hue, additive brightness: U[-s, s], identity 0
            rows.append(torch.where(apply, s * (2 * u[i] - 1), torch.zeros_like(u[i])))
        else:  # a factor U[max(0, 1-s), 1+s], identity 1
            lo = max(0.0, 1.0 - s)
            rows.append(torch.where(apply, lo + (1.0 + s - lo) * u[i], torch.ones_like(u[i])))
    order = torch.rand(n, 4, device=device, generator=gen).argsort(1)  # (n, 4): op index at each position
    return torch.stack(rows), torch.where(apply[:, None], order, -1)


def apply_jitter(x, params, order, view):
    """The four ops in each image's own order, clipped to [0, 1] after each op as the sources do. On the CPU each
    op runs only on the images that have it at that position (gathered, adjusted, scattered back: four passes per
    jittered image, none for the others). On CUDA (masked form, no host sync) at each position the brightness,
    contrast and saturation ops run on every image, with the identity parameter (exact: they then return their
    input) where that op is not the image's op at that position, and the hue rotation is selected. The two
    forms give the same images (tests/test_augment.py)."""
    brightness = add_brightness if view.brightness == "add" else adjust_brightness
    if view.color == "tf":
        ops = (brightness, adjust_contrast_tf, adjust_saturation_tf, adjust_hue)
    else:
        ops = (brightness, adjust_contrast, adjust_saturation, adjust_hue)
    if _by_subset(x):
        x = x.clone()  # written in place below
        for pos in range(4):
            for i, op in enumerate(ops):
                _on_subset(x, order[:, pos] == i, lambda y, idx, op=op, i=i: op(y, params[i][idx]).clamp(0, 1))
        return x
    identity = (0.0 if view.brightness == "add" else 1.0, 1.0, 1.0)
    for pos in range(4):
        for i, op in enumerate(ops[:3]):
            x = op(x, torch.where(order[:, pos] == i, params[i], identity[i])).clamp(0, 1)
        x = torch.where(_b(order[:, pos] == 3), adjust_hue(x, params[3]), x)
    return x


def sample_view(n, height, width, view, gen, device="cpu", crop=True):
    """Every random parameter of `augment` for n images of height x width, drawn per image from `gen`: crop box
    and flip (if `crop`), jitter parameters and order, grayscale, blur sigma (0: not blurred), solarize."""
    p = {}
    if crop:
        p["crop"] = sample_crops(n, height, width, view.scale, view.ratio, gen, device)
        p["flip"] = torch.rand(n, device=device, generator=gen) < view.flip_p
    if view.jitter_p > 0:
        p["jitter"] = sample_jitter(n, view, gen, device)
    if view.gray_p > 0:
        p["gray"] = torch.rand(n, device=device, generator=gen) < view.gray_p
    if view.blur_p > 0:
        u = torch.rand(2, n, device=device, generator=gen)
        sigma = view.blur_sigma[0] + (view.blur_sigma[1] - view.blur_sigma[0]) * u[0]
        p["blur"] = torch.where(u[1] < view.blur_p, sigma, torch.zeros_like(sigma))
    if view.solarize_p > 0:
        p["solarize"] = torch.rand(n, device=device, generator=gen) < view.solarize_p
    return p


def apply_view(x, view, p, owned=False):
    """One view of a float batch (B, 3, H, W) in [0, 1] with the parameters of `sample_view`, in the sources'
    order: crop + flip, colour jitter and grayscale (in the view's order), blur, solarize. On the CPU each op
    touches only the images it applies to; on CUDA the masked form (see `_by_subset`). `owned`: x is a temporary
    of the caller's, which the CPU's subset ops may then write in place instead of into a copy."""
    if "crop" in p:
        x = resized_crop(x, *p["crop"], view.size, p["flip"]).clamp(0, 1)
    subset = _by_subset(x)
    x = x.clone() if subset and "crop" not in p and not owned else x  # the subset ops write in place

    def gray(x):
        if "gray" not in p:
            return x
        if subset:
            return _on_subset(x, p["gray"], lambda y, idx: grayscale(y).expand_as(y))
        return torch.where(_b(p["gray"]), grayscale(x).expand_as(x), x)

    x = gray(x) if view.gray_first else x
    x = apply_jitter(x, *p["jitter"], view) if "jitter" in p else x
    x = x if view.gray_first else gray(x)
    if "blur" in p:
        pad, k = "zeros" if view.color == "tf" else "reflect", blur_kernel(view.size)
        if subset:
            blurred = p["blur"] > 0  # sigma 0: not blurred
            x = _on_subset(x, blurred, lambda y, idx: gaussian_blur(y, p["blur"][idx], k, pad).clamp(0, 1))
        else:
            x = gaussian_blur(x, p["blur"], k, pad).clamp(0, 1)
    if "solarize" in p:
        if subset:
            x = _on_subset(x, p["solarize"], lambda y, idx: torch.where(y >= 0.5, 1 - y, y))
        else:
            x = solarize(x, p["solarize"])
    return x


def augment(x, view, gen, crop=True):
    """One view of a uint8 batch (B, 3, H, W) on the device: crop + flip (unless the loader already cropped),
    colour jitter, grayscale, blur, solarize; float in [0, 1]. Every parameter is drawn per image from `gen`."""
    return apply_view_uint8(x, view, sample_view(len(x), x.shape[-2], x.shape[-1], view, gen, x.device, crop))


def apply_view_uint8(x, view, p):
    """`apply_view` of a uint8 batch, as float in [0, 1]. On the CPU the parameters are applied to chunks of about
    4 MB of images (8 at 224 px, the whole batch at 32 px): a chunk stays in the cache through the ~30
    elementwise passes of the colour ops, 1.5x faster at 224 px than streaming the whole batch through memory
    for each pass. Same parameters, bitwise the same images (tests/test_augment.py)."""
    n = len(x) if not _by_subset(x) else max(1, _CHUNK_BYTES // (4 * x.shape[1:].numel()))
    if n >= len(x):
        return apply_view(x.div(255), view, p, owned=True)
    chunks = range(0, len(x), n)
    return torch.cat([apply_view(x[i : i + n].div(255), view, _rows(p, i, i + n), owned=True) for i in chunks])


_CHUNK_BYTES = 4 << 20  # float32 bytes per chunk of `apply_view_uint8` on the CPU (within a CPU's L2/L3 cache)


def _cat_rows(params):
    """The parameters of several `sample_view` draws as one batch's (the inverse of `_rows`)."""
    out = {}
    for k, v in params[0].items():
        if k == "jitter":
            out[k] = (torch.cat([p[k][0] for p in params], 1), torch.cat([p[k][1] for p in params]))
        elif isinstance(v, tuple):
            out[k] = tuple(torch.cat(t) for t in zip(*(p[k] for p in params)))
        else:
            out[k] = torch.cat([p[k] for p in params])
    return out


def _rows(p, start, stop):
    """The parameters of `sample_view` for images start..stop-1 (jitter's params are (4, n), the rest lead with n)."""
    q = {k: tuple(t[start:stop] for t in v) if isinstance(v, tuple) else v[start:stop] for k, v in p.items()}
    if "jitter" in p:
        q["jitter"] = (p["jitter"][0][:, start:stop], p["jitter"][1][start:stop])
    return q


def blur_kernel(size):
    """Odd kernel side of about 10% of the image (SimCLR/BYOL): 23 px at 224, 3 px at 32; 1 (no blur) for a 1-px
    image, which reflect padding cannot pad."""
    return min(max(3, int(0.1 * size) // 2 * 2 + 1), 2 * size - 1)


def normalize(x, data):
    """Float [0, 1] -> standardised input in channels_last memory (the layout convolutions run fastest in)."""
    mean, std = (
        _const(tuple(data.mean), x.device).view(1, -1, 1, 1),
        _const(tuple(data.std), x.device).view(1, -1, 1, 1),
    )
    out = torch.empty_like(x, memory_format=torch.channels_last)  # (x - mean) / std written straight into it
    return torch.sub(x, mean, out=out).div_(std)


def _by_subset(x):
    """Whether the colour ops run on the subset of images each applies to (gather, apply, scatter back) rather
    than on the whole batch with the result kept by a mask. The subset saves the work of the images an op skips
    (4-10x on a CPU), but its size depends on the data: on a GPU that costs a host sync per op, so CUDA keeps the
    masked form, whose extra arithmetic is cheap there."""
    return x.device.type == "cpu"


def _on_subset(x, mask, fn):
    """x[mask] = fn(x[mask], idx) in place, idx the indices where `mask` (B,) is True; fn sees only those images."""
    idx = mask.nonzero().squeeze(1)
    if len(idx):
        x.index_copy_(0, idx, fn(x.index_select(0, idx), idx))
    return x


# ----------------------------------------------------------------------------------------------------------------
# LOADERS
# ----------------------------------------------------------------------------------------------------------------
def epoch_order(n, seed, epoch):
    """The global data order of an epoch: one permutation shared by all ranks (from the seed, not seed + rank)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _decode(path):
    """(uint8 RGB (3, H, W), None), or (None, "path (reason)") when the file cannot be decoded. PIL, as the official
    trainers' ImageFolder loader, but every mode and bit depth becomes 8-bit RGB of its true content:
    - 8-bit modes (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, ...): PIL's own convert("RGB"); alpha is dropped.
    - 16-bit grey (I;16, I;16B, ...): v * 255 / 65535, the full 16-bit range (not each image's own min..max, so
      one brightness means the same in every image). PIL's convert("RGB") would clip at 255.
    - I (32-bit integers; PIL opens 16-bit PGM, and some 16-bit PNG/TIFF, as I): read as 16-bit values, the
      same scale; a value outside 0..65535 is an error (no range to read it in).
    - F (32-bit float): [0, 1] when every value lies in [0, 1], else [0, 255]; a negative, non-finite or larger
      value is an error.
    - 16-bit RGB(A) PNG: PIL keeps the high byte, within 1 of v * 255 / 65535.
    - Animations and multi-page files (GIF, APNG, WebP, TIFF): the first frame. Truncated or corrupt files fail.
    torchvision.io.decode_image is not used: it returns uint16 for 16-bit PNGs and every frame of a GIF.
    Deviation: torchvision's ImageFolder loader (the official trainers') clips 16-bit and float images at 255."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # opened at frame 0
            return _to_rgb8(im), None
    except Exception as e:  # noqa: BLE001 (PIL raises many types)
        return None, _decode_error(path, e)


def _to_rgb8(im):
    import numpy as np

    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return TF.pil_to_tensor(im if im.mode == "RGB" else im.convert("RGB"))  # (3, H, W)
    a = np.asarray(im, dtype=np.float64)  # (H, W); native byte order whatever the mode's
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > (255 if im.mode == "F" else 65535):
        raise ValueError(f"mode {im.mode} pixel values {a.min():g}..{a.max():g} lie outside the ranges read")
    scale = (255 if a.max() <= 1 else 1) if im.mode == "F" else 255 / 65535
    grey = torch.from_numpy(np.rint(a * scale).astype(np.uint8))
    return grey.repeat(3, 1, 1)


def _decode_error(path, e):
    return f"{path} ({type(e).__name__}: {' '.join(str(e).split())})"  # one line, whatever PIL said


class _FolderViews(torch.utils.data.Dataset):
    """DataLoader workers decode an image and random-resize-crop + flip it for each view, as uint8; the colour
    ops run batched on the device. Crop randomness comes from a per-item seed, so a resumed epoch is identical.
    `finish=data` (training on the CPU): each item also draws its colour parameters from that generator, and the
    workers' `collate` applies them to the batch and normalises it with data.mean / data.std (the training
    input). On a CPU the "device" is the main process, where the colour ops would run on one core while the
    workers wait; in the workers they run in parallel (README, Throughput)."""

    def __init__(self, files, views, finish=None):
        self.files, self.views, self.finish = files, views, finish

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        index, item_seed = item
        img, err = _decode(self.files[index][0])
        g = torch.Generator().manual_seed(item_seed)
        crops, params = [], []
        for v in self.views:
            if img is None:
                crop = torch.zeros(3, v.size, v.size, dtype=torch.uint8)
            else:
                top, left, h, w = (int(t) for t in sample_crops(1, img.shape[1], img.shape[2], v.scale, v.ratio, g))
                crop = TF.resized_crop(img, top, left, h, w, [v.size, v.size], antialias=True)
                crop = crop.flip(-1) if torch.rand(1, generator=g).item() < v.flip_p else crop
            crops.append(crop)
            params.append(sample_view(1, v.size, v.size, v, g, crop=False) if self.finish else None)
        return crops, params, err or ""

    def collate(self, items):
        """(one batch per view: uint8 crops, or the finished input when `finish`; the items' decode errors)."""
        crops, params, errors = zip(*items)
        views = [torch.stack(c) for c in zip(*crops)]
        if self.finish:
            views = [
                normalize(apply_view_uint8(x, v, _cat_rows([p[i] for p in params])), self.finish)
                for i, (x, v) in enumerate(zip(views, self.views))
            ]
        return views, list(errors)


class _FolderEval(torch.utils.data.Dataset):
    """Resize the short side to size*256/224 and centre-crop `size` (the standard evaluation transform)."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        img, err = _decode(self.files[index][0])
        if img is None:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), err
        img = TF.resize(img, round(self.size * 256 / 224), antialias=True)
        return TF.center_crop(img, [self.size, self.size]), ""


def _check_decoded(errors):
    bad = [e for e in errors if e]
    if bad:
        raise UserError(f"cannot decode image {bad[0]}; delete or replace the file")


class TrainLoader:
    """Per step, this rank's share of the global batch as a list of augmented, normalised views on the
    device. Small data sets are indexed on the device; folders go through DataLoader workers (which, when the
    device is the CPU, also apply the colour ops and normalise: `_FolderViews`). `epoch(e, start)`
    restarts anywhere: the order comes from (seed, epoch) and the augmentation state from `self.gen`.
    `with_indices=True` (a memory bank: InstDisc, CMC) appends the batch's dataset indices, int64 (per_rank,) on
    the device, to each step's list: copied there once per epoch, so no host sync per step."""

    def __init__(self, data, views, batch_size, env, seed, workers=8, with_indices=False):
        n = len(data.train)
        if batch_size % env.world_size:
            raise UserError(f"--batch-size {batch_size} is not divisible by the {env.world_size} processes")
        if batch_size > n:
            raise UserError(f"--batch-size {batch_size} is larger than the data set ({n} images); lower --batch-size")
        if batch_size // env.world_size < 2:  # training-mode batch norm needs two samples
            raise UserError(f"--batch-size {batch_size} leaves one image per process; batch norm needs 2 or more")
        self.data, self.views, self.env, self.seed, self.with_indices = data, views, env, seed, with_indices
        self.batch_size, self.per_rank, self.steps = batch_size, batch_size // env.world_size, n // batch_size
        self.gen = torch.Generator(env.device).manual_seed(seed + env.rank)  # augmentation RNG, seed + rank
        self.loader, self.finished_in_workers = None, env.device.type == "cpu"
        if data.train.images is None:
            self.items = []  # (index, item seed) of this epoch, read by the sampler in the main process
            folder = _FolderViews(data.train.files, views, finish=data if self.finished_in_workers else None)
            self.loader = torch.utils.data.DataLoader(
                folder,
                collate_fn=folder.collate,
                batch_size=self.per_rank,
                sampler=_ListSampler(self),
                num_workers=workers,
                pin_memory=env.device.type == "cuda",
                drop_last=True,
                persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
                generator=torch.Generator(),  # the iterator's base seed: not drawn from the global RNG (exact resume)
            )

    def __len__(self):
        return self.steps

    def indices(self, epoch):
        """This rank's image indices for each step of an epoch: its slice of global batch s of the epoch order."""
        order, lo = epoch_order(len(self.data.train), self.seed, epoch), self.env.rank * self.per_rank
        return [order[s * self.batch_size + lo : s * self.batch_size + lo + self.per_rank] for s in range(self.steps)]

    def finish(self, crops, view):
        """A batch of the workers' crops, coloured and normalised on the device (done in the workers on a CPU)."""
        return crops if self.finished_in_workers else normalize(augment(crops, view, self.gen, crop=False), self.data)

    def epoch(self, epoch, start=0):
        mine = self.indices(epoch)
        on_device = torch.stack(mine).to(self.env.device)[start:]  # one copy per epoch, none per step
        if self.loader is None:
            for idx in on_device:
                x = self.data.train.images[idx]
                views = [normalize(augment(x, v, self.gen), self.data) for v in self.views]
                yield views + [idx] if self.with_indices else views
            return
        base = (self.seed * 1_000_003 + epoch) * 10_000_019 % 2**62  # each image's seed stays a valid int64
        self.items = [(int(i), base + int(i)) for idx in mine[start:] for i in idx]
        for (crops, errors), idx in zip(self.loader, on_device):  # batch s of the sampler's list is mine[start + s]
            _check_decoded(errors)
            views = [self.finish(c.to(self.env.device, non_blocking=True), v) for c, v in zip(crops, self.views)]
            yield views + [idx] if self.with_indices else views


class _ListSampler(torch.utils.data.Sampler):
    def __init__(self, owner):
        self.owner = owner

    def __iter__(self):
        return iter(self.owner.items)

    def __len__(self):
        return len(self.owner.items)


@torch.no_grad()
def extract_features(model, split, data, env, size, batch_size=256, workers=8, autocast=nullcontext, train=False):
    """model(x) for every image of a split (no augmentation), in order, on every rank: each rank embeds the
    images rank, rank + W, rank + 2W, ... and an all_gather puts them back in order. `train`: the model in train
    mode (BN on each batch's statistics, its running statistics updated), else in eval mode; in train mode the
    batches are near-equal (at most `batch_size`), so none is a lone image that BN cannot normalise."""
    n, world = len(split), env.world_size
    idx = torch.arange(env.rank, n, world)
    idx = torch.cat([idx, idx[-1:].expand(math.ceil(n / world) - len(idx))])  # equal lengths for all_gather
    chunks = idx.tensor_split(math.ceil(len(idx) / batch_size)) if train else idx.split(batch_size)
    was_training = model.training
    model.train(train)
    feats = []
    if split.images is not None:
        for chunk in chunks:
            x = split.images[chunk.to(env.device)].float() / 255
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            with autocast():
                feats.append(model(normalize(x, data)).float())
    else:
        loader = torch.utils.data.DataLoader(
            _FolderEval(split.files, size),
            batch_sampler=[chunk.tolist() for chunk in chunks],
            num_workers=workers,
            pin_memory=env.device.type == "cuda",
        )
        for x, errors in loader:
            _check_decoded(errors)
            with autocast():
                feats.append(model(normalize(x.to(env.device).float() / 255, data)).float())
    model.train(was_training)
    feats = torch.cat(feats)
    if world > 1:
        gathered = [torch.empty_like(feats) for _ in range(world)]
        dist.all_gather(gathered, feats)
        feats = torch.stack(gathered, 1).flatten(0, 1)  # row l*W + r came from rank r: the original order
    return feats[:n]


# ----------------------------------------------------------------------------------------------------------------
# BACKBONES
# Each returns pooled features (B, out_dim); `out_dim` is an attribute.
# ----------------------------------------------------------------------------------------------------------------
RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}
VITS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}  # dim, depth, heads (DeiT/DINO)
ARCHS = (*RESNETS, *VITS, "tiny")


def build_backbone(
    arch,
    image_size,
    small,
    zero_init_residual=False,
    in_channels=3,
    norm_layer=None,
    patch_size=None,
    sincos_pos=False,
    heads=None,
    drop_path=0.0,
):
    """ResNets from torchvision (with the CIFAR stem when `small`), ViTs (patch 4 for small images, else 16),
    or the tiny CPU test net. The method file chooses what its source chooses: `zero_init_residual` (the last BN
    of each residual branch starts at 0), a ViT's `heads` (default: VITS, DeiT/DINO's) and `sincos_pos`; a ViT
    starts with DINO's init (ViT docstring), which a method file may replace with its source's; `drop_path`: a
    ViT's stochastic depth rate (DINO's student)."""
    if arch in RESNETS:
        return resnet(arch, small, zero_init_residual, in_channels, norm_layer)
    if arch in VITS:
        dim, depth, default_heads = VITS[arch]
        patch, heads = patch_size or (4 if small else 16), heads or default_heads
        return ViT(
            image_size, patch, dim, depth, heads, in_channels=in_channels, sincos_pos=sincos_pos, drop_path=drop_path
        )
    if arch == "tiny":
        return TinyNet(in_channels, norm_layer=norm_layer)
    raise UserError(f"--arch {arch}: unknown; choose one of {', '.join(ARCHS)}")


def resnet(arch, small=False, zero_init_residual=False, in_channels=3, norm_layer=None):
    """torchvision's ResNet without its classifier (fc = Identity), so that its state_dict loads into
    torchvision.models.<arch>() with only fc missing. CIFAR stem: 3x3 stride-1 conv1 and no max-pool."""
    net = RESNETS[arch](zero_init_residual=zero_init_residual, norm_layer=norm_layer)
    if small or in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits
    if small:
        net.maxpool = nn.Identity()
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


class TinyNet(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (stride 2, 1, 2, 2; 0.4M parameters; 256-d output) for CPU tests and the
    CPU demo only: not a research backbone. About 80x faster than the CIFAR ResNet-18 on a 2-core CPU."""

    def __init__(self, in_channels=3, width=32, norm_layer=None):
        super().__init__()
        layers, c, norm_layer = [], in_channels, norm_layer or nn.BatchNorm2d
        for out, stride in zip((width, 2 * width, 4 * width, 8 * width), (2, 1, 2, 2)):
            layers += [nn.Conv2d(c, out, 3, stride, 1, bias=False), norm_layer(out), nn.ReLU(True)]
            c = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = c

    def forward(self, x):
        return self.features(x)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


def drop_path(x, p, training):
    """Stochastic depth (Huang et al., arXiv:1603.09382) as DINO's vision_transformer.py drop_path: in training,
    each sample's residual branch is dropped with probability p and kept ones are scaled by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = (1 - p + torch.rand(len(x), *(1,) * (x.ndim - 1), device=x.device)).floor_()  # float32 draws
    return x / (1 - p) * keep.to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); `drop_path`: the rate at which each
    sample's residual branches are dropped in training (stochastic depth, DINO's student)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al., arXiv:2010.11929) returning the final-norm CLS token. Init as DINO's
    vision_transformer.py (and timm's): Linear weights, class token and learned position embedding trunc-normal
    with std 0.02, biases 0, LayerNorm 1 and 0, the patch projection PyTorch's default; a method file may replace
    it with its source's (moco.py: MoCo v3's). `sincos_pos`: a fixed 2-D sine-cosine position embedding instead of
    a learned one (MoCo v3). `drop_path`: stochastic depth rising linearly from 0 at the first block to this
    rate at the last (DINO's "stochastic depth decay rule"). Inputs of any size are embedded: the position
    embedding is interpolated to the input's patch grid (DINO's interpolate_pos_encoding), unchanged at the
    native size.

    The head count does not change any weight's shape, so it is kept in the state_dict as the 0-d int64 buffer
    `num_heads`: backbone.pt rebuilds with the right heads, and loading weights into a ViT with other heads is an
    error rather than a silently different network. Drop that entry to load the weights elsewhere (timm etc.)."""

    def __init__(
        self, image_size, patch_size, dim, depth, heads, mlp_ratio=4.0, in_channels=3, sincos_pos=False, drop_path=0.0
    ):
        super().__init__()
        if image_size % patch_size:
            raise UserError(f"image size {image_size} is not a multiple of the ViT patch size {patch_size}")
        if dim % heads:
            raise UserError(f"ViT width {dim} is not a multiple of its {heads} heads")
        grid = image_size // patch_size
        self.heads = heads
        self.register_buffer("num_heads", torch.tensor(heads))
        self._register_load_state_dict_pre_hook(self._check_heads)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim), requires_grad=not sincos_pos)
        self.grid, self.patch_size = grid, patch_size
        rates = torch.linspace(0, drop_path, depth).tolist()  # DINO vision_transformer.py: 0 .. drop_path
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out_dim = dim
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if sincos_pos:
            self.pos_embed.data[0, 1:] = sincos_2d(grid, dim)  # the class token's entry stays 0
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _check_heads(self, sd, prefix, *args):
        key = prefix + "num_heads"
        if key not in sd:  # an export written before the head count was recorded: all had dim // 64 heads
            sd[key] = torch.tensor(self.out_dim // 64)
        if int(sd[key]) != self.heads:
            raise UserError(f"these ViT weights were trained with {int(sd[key])} heads; this ViT has {self.heads}")

    def position_embedding(self, rows, cols):
        """The position embedding for a rows x cols patch grid: the learned one at the native grid; else its patch
        part resized bicubically, as DINO's interpolate_pos_encoding does (scale factors (n + 0.1) / grid, the
        0.1 against rounding down, dino#8), the class token's entry unchanged."""
        if (rows, cols) == (self.grid, self.grid):
            return self.pos_embed
        patch = rearrange(self.pos_embed[:, 1:], "1 (h w) d -> 1 d h w", h=self.grid)
        scale = ((rows + 0.1) / self.grid, (cols + 0.1) / self.grid)
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic")
        return torch.cat([self.pos_embed[:, :1], rearrange(patch, "1 d h w -> 1 (h w) d")], 1)

    def forward(self, x):
        pos = self.position_embedding(x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = rearrange(self.patch_embed(x), "b d h w -> b (h w) d")  # token r * grid + c is patch (row r, col c)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


def sincos_2d(grid, dim, temperature=10_000.0):
    """Fixed 2-D sine-cosine position embedding (grid*grid, dim) of the patch tokens in row-major order, as
    moco-v3 vits.py build_2d_sincos_position_embedding: with f_i = temperature^(-i / (dim/4)), i < dim/4,
    channels [sin(r f), cos(r f), sin(c f), cos(c f)] for the patch at row r, column c. (vits.py's
    meshgrid(grid_w, grid_h) with 'ij' indexing makes its first half, named w, vary along the token rows.)"""
    r, c = torch.meshgrid(torch.arange(grid, dtype=torch.float), torch.arange(grid, dtype=torch.float), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float) / (dim // 4))
    out_r, out_c = r.flatten()[:, None] * omega, c.flatten()[:, None] * omega
    return torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], 1)


def backbone_from_state_dict(sd, image_size):
    """Rebuild the backbone an exported backbone.pt came from, reading the architecture off its weights (and a
    ViT's head count off its `num_heads` entry)."""
    if "conv1.weight" in sd:
        depth = max(int(k.split(".")[1]) for k in sd if k.startswith("layer3.")) + 1
        arch = "resnet50" if "layer1.0.conv3.weight" in sd else {2: "resnet18", 6: "resnet34"}.get(depth)
        if arch is None:
            raise UserError(f"backbone with {depth} blocks in layer3 is not resnet18/34/50")
        return resnet(arch, small=sd["conv1.weight"].shape[-1] == 3, in_channels=sd["conv1.weight"].shape[1])
    if "patch_embed.weight" in sd:
        dim, c, p, _ = sd["patch_embed.weight"].shape
        depth = max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")) + 1
        heads = int(sd["num_heads"]) if "num_heads" in sd else dim // 64  # older exports: dim // 64 heads
        return ViT(image_size, p, dim, depth, heads, in_channels=c)
    if "features.0.weight" in sd:
        return TinyNet(sd["features.0.weight"].shape[1], sd["features.0.weight"].shape[0])
    raise UserError("this file is not a backbone.pt written by these trainers (unknown weight names)")


# ----------------------------------------------------------------------------------------------------------------
# EVALUATION
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def knn_top1(train_f, train_y, test_f, test_y, num_classes, k=200, t=0.1, env=None, chunk=512):
    """Weighted kNN (InstDisc, Wu et al. 2018, Sec. 3.4): cosine similarity to every training feature, the top k
    vote for their class with weight exp(s / t). Test rows are split across ranks; correct counts are summed."""
    keep = train_y >= 0  # unlabeled training images cannot vote
    train_f, train_y = F.normalize(train_f[keep].float(), dim=1), train_y[keep].to(train_f.device)
    test_f, test_y = F.normalize(test_f.float(), dim=1), test_y.to(test_f.device)
    rank, world = (env.rank, env.world_size) if env else (0, 1)
    correct = torch.zeros((), device=test_f.device)
    k = min(k, len(train_f))
    for rows in torch.arange(rank, len(test_f), world, device=test_f.device).split(chunk):
        sim, idx = (test_f[rows] @ train_f.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(rows), num_classes, device=test_f.device)
        votes.scatter_add_(1, train_y[idx], (sim / t).exp())
        correct += (votes.argmax(1) == test_y[rows]).sum()
    if world > 1:
        dist.all_reduce(correct)
    return correct.item() / len(test_f)


def linear_probe(train_f, train_y, test_f, test_y, num_classes, epochs=100, batch_size=1024, lr=0.4, seed=0):
    """Top-1 of a linear classifier on frozen, precomputed features (no augmentation): features standardised
    with the training mean/std (a BatchNorm without affine, as MAE's main_linprobe.py puts before its probe;
    MoCo v3's main_lincls.py has none), then cross-entropy with Nesterov SGD (momentum 0.9, no weight decay) and
    a per-step cosine schedule. The same seed gives the same classifier on every rank, so no communication is
    needed."""
    keep = train_y >= 0
    train_f, train_y = train_f[keep].float(), train_y[keep].to(train_f.device)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f.float() - mean) / std
    g = torch.Generator(train_f.device).manual_seed(seed)
    head = nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    bs = min(batch_size, len(train_f))
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True)
    steps, step = epochs * (len(train_f) // bs), 0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(train_f), device=train_f.device, generator=g)
            for idx in perm[: len(perm) // bs * bs].view(-1, bs):
                opt.param_groups[0]["lr"] = cosine_lr(step, steps, lr)
                loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    with torch.no_grad():
        return (head(test_f).argmax(1) == test_y.to(test_f.device)).float().mean().item()


def collapse_std(z):
    """SimSiam Sec. 4.1 / Fig. 2: std over the batch of the L2-normalised outputs, averaged over dimensions.
    About 1/sqrt(d) for a well-spread output, 0 for a collapsed one (every image mapped to one vector)."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def alignment(z1, z2):
    """Wang & Isola 2020 (arXiv:2005.10242), Sec. 4.1, with alpha = 2: L_align = E ||z1 - z2||^2 over positive pairs
    (the two views of an image), z on the unit sphere. 0 when the views agree, 4 at most."""
    return (z1 - z2).pow(2).sum(1).mean()


def uniformity(z):
    """Wang & Isola 2020, Sec. 4.1, with t = 2: L_uniform = log E exp(-2 ||z_i - z_j||^2) over distinct pairs
    i != j (torch.pdist's pairs in SsnL/align_uniform:align_uniform/__init__.py); on the sphere ||a - b||^2 =
    2 - 2 a.b. 0 when every z is the same point (collapse), lower is more uniform."""
    sq = (2 - 2 * z @ z.T).clamp(min=0)  # (n, n) squared distances
    off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    return torch.logsumexp(-2 * sq[off], 0) - math.log(len(z) * (len(z) - 1))


@torch.no_grad()
def alignment_uniformity(embed, data, views, env, autocast=nullcontext, n=4096, seed=0, batch_size=256, workers=8):
    """eval/alignment and eval/uniformity (Wang & Isola, ICML 2020, arXiv:2005.10242, Sec. 4.1; `alignment`,
    `uniformity` above) of `embed`, a module mapping a normalised view batch (B, 3, H, W) to the output the loss
    sees (B, d), L2-normalised here; run in eval mode (BN with running statistics), each module's mode restored.
        alignment  = E_i ||z1_i - z2_i||^2                          over the n positive pairs
        uniformity = (U(z1) + U(z2)) / 2,  U(z) = log E_{i != j} exp(-2 ||z_i - z_j||^2)   within each view
    Uniformity is taken within each view and averaged over the two, as the authors' loss averages
    uniform_loss(x) and uniform_loss(y) (SsnL/align_uniform README).
    The images: a fixed set of at most `n` test images (training images where there is no test split), drawn
    from `seed` alone, so the set and both views are the same at every evaluation and in every run; each gets
    one view from views[0] and one from views[1] (the method's training recipe; its first two, global, views
    where it has more). Chunks of `batch_size` images are augmented with their own generators seeded by
    (seed, chunk), so neither the training RNG (the global one, the loader's) nor the process count changes
    anything: chunk c runs on rank c mod W and an all_reduce assembles every z on every rank."""
    split = data.test if data.test is not None and len(data.test) else data.train
    idx = torch.arange(len(split))
    if len(split) > n:
        idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    chunks = list(idx.split(batch_size))
    mine = list(range(env.rank, len(chunks), env.world_size))
    if split.images is not None:
        crops = (split.images[chunks[c].to(env.device)] for c in mine)  # uint8, cropped in `augment`
    else:  # folders: decoded and cropped in workers, one seed per image; the batches are this rank's chunks
        items = [(int(i), seed * 10_000_019 + int(i)) for c in mine for i in chunks[c]]
        folder = _FolderViews(split.files, views[:2])  # uint8 crops; the colour from each chunk's generator below
        crops = torch.utils.data.DataLoader(
            folder,
            collate_fn=folder.collate,
            batch_size=batch_size,
            sampler=items,
            num_workers=workers,
            generator=torch.Generator(),  # the iterator's base seed: not from the global RNG
        )
    modes = [m.training for m in embed.modules()]
    embed.eval()
    out = []
    for c, x in zip(mine, crops):
        g = torch.Generator(env.device).manual_seed(seed * 1_000_003 + c)
        if split.images is None:
            (x1, x2), errors = x
            _check_decoded(errors)
            x1, x2 = (augment(v.to(env.device), view, g, crop=False) for v, view in zip((x1, x2), views))
        else:
            x1, x2 = augment(x, views[0], g), augment(x, views[1], g)
        with autocast():
            z = embed(normalize(torch.cat([x1, x2]), data)).float()
        out.append((c, F.normalize(z, dim=1).view(2, len(x1), -1)))
    for m, mode in zip(embed.modules(), modes):
        m.training = mode
    dim = torch.tensor(out[0][1].shape[-1] if out else 0, device=env.device)
    if env.world_size > 1:  # a rank without a chunk learns the width from the others
        dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    z = torch.zeros(2, len(idx), int(dim), device=env.device)
    for c, zc in out:
        z[:, c * batch_size : c * batch_size + zc.shape[1]] = zc
    if env.world_size > 1:
        dist.all_reduce(z)  # each row is filled on one rank and 0 on the others: the sum is exact
    return {
        "eval/alignment": alignment(z[0], z[1]).item(),
        "eval/uniformity": ((uniformity(z[0]) + uniformity(z[1])) / 2).item(),
    }


def hardest_negative_share(logits, positive):
    """The hardest negative's share of the negatives' softmax mass, max_k p_k / sum_{k neg} p_k with p =
    softmax(logits), averaged over the rows; `positive` (B,) is each row's positive column. It is the largest
    weight of the softmax over the negatives alone, which is also each negative's share of the gradient on the
    anchor (tests/test_temperature.py): 1 / #negatives when every negative weighs the same, 1 when one takes all.
    A detached device scalar: no host sync in the step."""
    neg = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))  # at least float32
    neg = neg.scatter(1, positive[:, None], float("-inf"))
    return F.softmax(neg, dim=1).amax(1).mean()


def epoch_mean(values, env):
    """The mean of per-step device scalars (equal-sized batches) over the epoch and over the ranks, as a float."""
    v = torch.stack(values).mean()
    if env.world_size > 1:
        dist.all_reduce(v)
        v = v / env.world_size
    return v.item()


# ----------------------------------------------------------------------------------------------------------------
# MEMORY BANK
# ----------------------------------------------------------------------------------------------------------------
def nce_loss(p, n, eps=1e-7):
    """NCECriterion.py (InstDisc Sec. 3.2), with p = P(j | f) (B, K + 1), the data row in column 0 and K noise rows
    drawn from the uniform Pn = 1/N: -(1/B) sum_i [log h(i) + sum_k log(1 - h(j_k))], h = P / (P + K Pn). eps as
    the official code adds it."""
    k_pn = (p.shape[1] - 1) / n  # K * Pn
    log_data = torch.log(p[:, 0] / (p[:, 0] + k_pn + eps))  # P(origin = data) for the positive
    log_noise = torch.log(k_pn / (p[:, 1:] + k_pn + eps))  # P(origin = noise) for each noise row
    return -(log_data.sum() + log_noise.sum()) / len(p)


class MemoryBank(nn.Module):
    """V (N x dim, one row per training image) with the instance-discrimination loss against it (instdisc.py's
    one bank, cmc.py's one per view): zhirongw/lemniscate.pytorch lib/NCEAverage.py + NCECriterion.py (nce_k > 0)
    or lib/LinearAverage.py + cross-entropy (nce_k 0); with `softmax` (CMC), HobbitLong/CMC NCE/NCECriterion.py
    NCESoftmaxLoss: cross-entropy over the K + 1 rows, the data row the label (NCE/NCEAverage.py draws and
    scores the rows as lemniscate does). `memory` starts as lemniscate's U(-s, s), s = 1 / sqrt(dim / 3) (not
    normalised); `Z` is -1 until the first batch sets it (NCEAverage.py:31-34).

    Order of a step: loss = bank(f, idx, noise, set_z) scores f against the bank as it was (the positive is the
    image's own row v_i from its last visit, not f_i); after the loss, update(every rank's f, idx) moves the
    rows. The official code updates inside a custom autograd backward (NCEAverage.py:62-68); here it is a
    no_grad step after the loss, with the same maths, since nothing reads the bank in between."""

    def __init__(self, n, dim=128, nce_k=4096, temperature=0.07, momentum=0.5, softmax=False):
        super().__init__()
        self.n, self.nce_k, self.temperature, self.momentum = n, nce_k, temperature, momentum
        self.softmax = softmax
        s = 1 / math.sqrt(dim / 3)
        self.register_buffer("memory", torch.rand(n, dim) * 2 * s - s)  # (N, dim), global RNG (seeded)
        self.register_buffer("Z", torch.tensor(-1.0))  # the NCE normalising constant; -1: not estimated yet

    def draw_noise(self, batch, gen):
        """K noise indices per row, uniform over all N rows, with replacement: AliasMethod over uniform
        unigrams (alias_multinomial.py) is uniform sampling. The image's own row can be drawn (CMC#56) and is
        kept on purpose: NCE's loss assumes noise from Pn = 1/N over every row (the K Pn term); excluding
        i would make the noise distribution 1/(N-1) over the others. The chance is K/N per noise row."""
        return torch.randint(self.n, (batch, self.nce_k), generator=gen, device=self.memory.device)

    def forward(self, f, idx, noise=None, set_z=False):
        """f: (B, dim) L2-normalised float features, idx: (B,) their images' rows, noise: (B, K) rows from
        draw_noise. Returns the mean loss over the B rows. `set_z` (the run's first step): Z <- N * the mean of
        exp(v . f / tau) over every score of the global batch (all ranks), then fixed."""
        if self.nce_k == 0:  # LinearAverage.py: logits V f / tau over every image, cross-entropy on its own row
            return F.cross_entropy(f @ self.memory.T / self.temperature, idx)
        rows = torch.cat([idx[:, None], noise], 1)  # (B, K + 1): the data row first (NCEAverage.py:20)
        if rows.numel() >= self.n:  # the same scores, cheaper: every row's score, then the drawn ones picked
            out = (f @ self.memory.T).gather(1, rows).div(self.temperature)  # (B, K + 1)
        else:
            out = torch.einsum("bkd,bd->bk", self.memory[rows], f).div(self.temperature)  # (B, K + 1)
        if self.softmax:  # NCESoftmaxLoss: the data row (column 0) is the label
            return F.cross_entropy(out, torch.zeros_like(idx))
        out = out.exp()
        if set_z:
            z = out.detach().mean() * self.n
            if dist.is_initialized():  # every rank scores the same number of rows: the mean of the means
                dist.all_reduce(z)
                z /= dist.get_world_size()
            self.Z.copy_(z)
        return nce_loss(out / self.Z, self.n)

    @torch.no_grad()
    def update(self, f, idx):
        """v_i <- normalize(m v_i + (1 - m) f_i) at the rows idx (NCEAverage.py:62-68); f, idx of every rank."""
        v = self.memory[idx] * self.momentum + f * (1 - self.momentum)
        self.memory.index_copy_(0, idx, F.normalize(v, dim=1))


# ----------------------------------------------------------------------------------------------------------------
# PLUMBING
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup(device="auto", seed=0):
    """torchrun (RANK in the environment) -> a process group: NCCL on GPUs, gloo on CPUs; else a plain process.
    The global seed is the same on every rank, so every rank builds identical initial weights."""
    want_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no GPU; use --device cpu or auto")
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if want_cuda else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    dev = torch.device(f"cuda:{local}" if want_cuda else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for what runs outside bf16 autocast
    torch.manual_seed(seed)
    return Env(rank, world, local, dev)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss saw these rows: sum their gradients (gloo has no reduce_scatter)
        n = len(grad) // dist.get_world_size()
        return grad[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def process_rank():
    """This process's rank under torchrun, 0 in a plain process (where the loss functions may also run)."""
    return dist.get_rank() if dist.is_initialized() else 0


def gather(x, grad=False):
    """Every rank's x concatenated in rank order, (W*N, ...). `grad=True` is differentiable: the backward sums
    all ranks' gradients for this rank's rows, so a loss averaged over the local rows, after DDP averages the
    parameter gradients, gives exactly the one-process gradient of the loss over the global batch (SimCLR).
    `grad=False` returns a constant (MoCo's keys, which get no gradient)."""
    x = x if grad else x.detach()  # a detached input: no backward is recorded
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def autocast_for(env, dtype):
    """`--dtype auto`: bf16 autocast on CUDA (no GradScaler needed, unlike fp16), float32 on CPU."""
    if dtype == "float32" or (dtype == "auto" and env.device.type != "cuda"):
        return nullcontext
    return lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)


def pick_recipe(recipes, data, env, args):
    """Fill every flag left at None from the method's recipe: 'small' (CIFAR-scale) for images up to
    SMALL_IMAGE px, else 'imagenet'; with the built-in data also 'builtin' (a few-minute demo), and on a CPU the
    tiny backbone. Returns the recipe's name."""
    name = "small" if data.image_size <= SMALL_IMAGE else "imagenet"
    recipe = dict(recipes[name])
    if data.name == "builtin":
        recipe.update(recipes["builtin"])
        if env.device.type == "cpu":
            recipe["arch"] = "tiny"
    recipe.setdefault("image_size", data.image_size if name == "small" else 224)
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return name


def cosine_lr(step, total, base, warmup=0, final=0.0):
    """Linear warmup over `warmup` steps, then half a cosine from `base` to `final` at `total`. Deviation: the
    warmup reaches base * (step + 1) / warmup, so step 0 already moves the weights and the last warmup step is at
    `base`; SimCLR (model_util.py learning_rate_schedule), BYOL (utils/schedules.py learning_schedule) and MoCo v3
    (main_moco.py adjust_learning_rate) use base * step / warmup (0 at step 0, `base` at step `warmup`)."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model, weight_decay, exclude_norm_bias=True):
    """Two groups of the trainable parameters: weights with decay, and biases and norm parameters (ndim <= 1)
    without decay or LARS adaptation (`lars_exclude`). The sources name the same set in their own ways:
    moco-v3 moco/optimizer.py skips p.ndim <= 1; SimCLR (model_util.py get_optimizer) excludes variables named
    'batch_normalization' or 'bias'; BYOL (utils/optimizers.py exclude_bias_and_norm) biases ('b') and modules
    named '*norm*'. In the ResNets and heads here every 1-D parameter is a bias or a norm's scale/offset."""
    decay, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (rest if exclude_norm_bias and p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rates (You et al., arXiv:1708.03888). For each tensor w with
    gradient g:  g <- g + wd*w;  t = eta*||w|| / ||g|| (1 where either norm is 0; t = 1 in `lars_exclude` groups,
    whose wd is 0 from `param_groups`). Two momentum forms, which differ only while the lr changes:
      lr_in_momentum=False (moco-v3 moco/optimizer.py; BYOL utils/optimizers.py, where optax.scale(-lr) follows
          the momentum):    v <- m*v + t*g;       w <- w - lr*v
      lr_in_momentum=True  (SimCLR lars_optimizer.py with classic_momentum=True, its default, which
          model_util.py get_optimizer keeps):    v <- m*v + lr*t*g;    w <- w - v
    `clip` (LARC's clip mode, as solo-learn's CIFAR recipes use with eta 0.02): t <- min(t / lr, 1), so each
    tensor steps with lr * t = min(eta*||w||/||g||, lr). `larc` (SwAV: apex/parallel/LARC.py, which main_swav.py
    wraps around SGD; solo-learn's solo/utils/lars.py is the same): the decay enters the denominator, from the
    raw gradient: t = eta*||w|| / (||g|| + wd*||w|| + 1e-8), then g <- t*(g + wd*w), and g as it is (no decay)
    where ||w|| or ||g|| is 0. No host syncs."""

    def __init__(
        self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001, clip=False, lr_in_momentum=False, larc=False
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, clip=clip, lars_exclude=False)
        defaults |= dict(lr_in_momentum=lr_in_momentum, larc=larc)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    larc = group.get("larc")
                    w_norm, g_norm = p.norm(), (p.grad if larc else g).norm()
                    denom = g_norm + group["weight_decay"] * w_norm + 1e-8 if larc else g_norm
                    both = (w_norm > 0) & (g_norm > 0)
                    trust = torch.where(both, group["eta"] * w_norm / denom, 1.0)
                    if group["clip"] and lr > 0:  # LARC "clip" mode: the step is lr * min(trust/lr, 1)
                        trust = (trust / lr).clamp(max=1.0)
                    # LARC adds the decay and scales only where both norms are nonzero, else keeps the raw gradient
                    g = torch.where(both, g.mul(trust), p.grad) if larc else g.mul(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                if group["lr_in_momentum"]:
                    buf.mul_(group["momentum"]).add_(g, alpha=lr)
                    p.sub_(buf)
                else:
                    buf.mul_(group["momentum"]).add_(g)
                    p.add_(buf, alpha=-lr)


# Flags that may differ when a run is resumed; every other entry of the config must match the checkpoint.
RUNTIME_FLAGS = (
    "resume",
    "output_dir",
    "data_dir",
    "workers",
    "device",
    "max_steps",
    "compile",
    "log_every",
    "eval_every",
)


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a truncated file behind."""
    tmp = Path(f"{path}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rank_checksums(model, env):
    """Every rank's fingerprint of its model, in rank order (call it on every rank): the first 16 hex digits of
    a SHA-256 over the bytes of every parameter and buffer (target network, key encoder, queue included), a
    bitwise fingerprint that no cancellation can hide. BN running statistics are left out: under torchrun on
    CPUs they are per process (gloo has no SyncBatchNorm). Data-parallel training keeps the ranks bitwise in step,
    so the values must all be equal; a rank that drifted (e.g. a missing DistributedDataParallel wrap) shows."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not name.endswith(("running_mean", "running_var")):
            h.update(name.encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    sums = [h.hexdigest()[:16]] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(sums, sums[0])
    return sums


CHECKPOINT_KEYS = ("method", "config", "step", "model", "optimizer", "aug_rng", "rng")


def load_checkpoint(path, method, config, model=None):
    """Read ckpt.pt and refuse, with one clear line, a file that is not a whole checkpoint of this method, config
    and `model` (truncated or corrupt, another method, another version of the file, non-finite weights)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume {path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a truncated or corrupt file fails in many ways)
        raise UserError(
            f"--resume {path}: not a readable checkpoint, truncated or corrupt ({type(e).__name__}); "
            f"resume from another copy or start a new --output-dir"
        ) from None
    if not isinstance(ckpt, dict) or "method" not in ckpt:
        raise UserError(f"--resume {path}: not a checkpoint written by these trainers")
    if ckpt["method"] != method:
        raise UserError(f"--resume {path} is a {ckpt['method']} checkpoint; this is {method}.py")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing or not isinstance(ckpt["model"], dict) or not isinstance(ckpt["config"], dict):
        raise UserError(f"--resume {path}: an incomplete checkpoint (no {', '.join(missing) or 'model'}); start anew")
    new = [k for k in sorted(set(config) - set(ckpt["config"])) if k not in RUNTIME_FLAGS]
    if new:  # flags added to the file after the checkpoint was written
        raise UserError(
            f"--resume {path} was written by an older {method}.py, without --{new[0].replace('_', '-')}; resume it "
            f"with that version of the file or start a new --output-dir"
        )
    diff = [
        k
        for k in sorted(set(config) | set(ckpt["config"]))
        if k not in RUNTIME_FLAGS and config.get(k) != ckpt["config"].get(k)
    ]
    if diff:
        was = ", ".join(f"{k}={ckpt['config'].get(k)!r}" for k in diff)
        now = ", ".join(f"{k}={config.get(k)!r}" for k in diff)
        raise UserError(
            f"--resume {path} was trained with {was}, but this run has {now}; "
            f"pass the same settings or start a new --output-dir"
        )
    if model is not None:  # the same flags, but another version of the method file may build other weights
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) if torch.is_tensor(v) else None for k, v in ckpt["model"].items()}
        odd = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        if odd:
            raise UserError(
                f"--resume {path} holds other weights than this {method}.py builds ({odd[0]}); "
                f"it was written by another version of the file: start a new --output-dir"
            )
    for k, v in ckpt["model"].items():
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"--resume {path}: {k} is not finite (saved after the run diverged); start anew")
    return ckpt


_LOCKS = []  # this process's lock on its run folder, held open until the process ends


def _claim_output_dir(out, args):
    """Rank 0: make the run folder and lock it (flock: the OS drops the lock when the process ends, so a killed
    run never blocks the next). Returns the problem as one line, or None."""
    if out.exists() and not out.is_dir():
        return f"--output-dir {out} is a file; pass a folder (it is created if missing)"
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / "run.lock", "a+")
    except OSError as e:
        return f"--output-dir {out}: cannot create the run folder ({e.strerror}); choose another --output-dir"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        return f"{out} is in use by a running process ({pid}); wait for it to end, or choose another --output-dir"
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _LOCKS.append(lock)
    if args.resume is None and (out / "ckpt.pt").exists():
        return f"{out} already holds a checkpoint; continue it with --resume auto, or choose another --output-dir"
    return None


def prepare_output_dir(args, method, env):
    """The run folder: created and locked by rank 0; refuses a file, a folder another live run holds, and
    overwriting a checkpoint unless --resume is given. Returns the checkpoint to resume from (or None)."""
    if args.output_dir is None and args.resume == "auto":
        raise UserError("--resume auto continues the run in --output-dir; pass --output-dir")
    name = args.output_dir or f"runs/{method}-{Path(args.data).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    problem = _claim_output_dir(Path(name), args) if env.is_main else None
    if env.world_size > 1:
        shared = [name, problem]
        dist.broadcast_object_list(shared)  # rank 0's clock names the folder; its problem stops every rank
        name, problem = shared
    if problem:
        raise UserError(problem)
    args.output_dir, out = name, Path(name)
    if args.resume == "auto":  # the folder's checkpoint if it has one, else a fresh start
        return out / "ckpt.pt" if (out / "ckpt.pt").exists() else None
    return args.resume


def _diverged(what, lr, output_dir):
    ckpt = Path(output_dir) / "ckpt.pt"
    kept = f"{ckpt} keeps the last finite state" if ckpt.exists() else "no checkpoint was written"
    return f"training diverged: {what} (lr {lr:.3g}); {kept}; start again with a lower --lr in a new --output-dir"


def check_finite(model, optimizer, env, step, output_dir):
    """Called by save() before it writes: every weight and buffer (BN statistics, queues) must be finite, else the
    run stops and the last good checkpoint stays. An epoch's last step can poison the weights before any logged
    loss shows it. One host sync per save; the ranks agree."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all().float()
    if env.world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        lr = optimizer.param_groups[0]["lr"]
        raise UserError(_diverged(f"the weights are not finite after {step} step(s)", lr, output_dir))


def finished(resume, step, last_step, total_steps, env):
    """True (after saying so) when a resumed run has nothing left to train: it exits 0 and changes no file."""
    if step < last_step:
        return False
    done = "the run is finished" if step >= total_steps else f"--max-steps {last_step} is reached"
    if env.is_main:
        print(f"{resume} is at step {step} of {total_steps}: {done}, nothing to do", flush=True)
    return True


def _strict(row):
    """NaN and infinity are not JSON: write them as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


class Logger:
    """metrics.jsonl (one JSON object per line) and the progress line; both on the main rank only.
    Losses are kept on the device and read once per `log_every` steps: no host sync inside a step. A non-finite
    loss stops the run there (before the next save). A run that starts at `start_step` first drops the rows of
    the steps it will run again (a run killed after its last checkpoint, a resume from an older checkpoint), so
    each step appears once."""

    def __init__(self, output_dir, env, total_steps, images_per_step, start_step=0):
        self.path, self.env, self.total = Path(output_dir) / "metrics.jsonl", env, total_steps
        self.images_per_step, self.pending, self.t0 = images_per_step, [], time.perf_counter()
        if env.is_main and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines(keepends=True) if _before(line, start_step)]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)

    def step(self, step, epoch, loss, lr):
        self.pending.append((step, epoch, loss.detach(), lr))

    def flush(self, steps_per_epoch):
        if not self.pending:
            return
        losses = torch.stack([p[2] for p in self.pending]).float()
        finite = torch.isfinite(losses).float()
        if self.env.world_size > 1:  # a non-finite loss on any rank stops every rank
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        losses, finite = torch.stack([losses, finite]).tolist()  # the one sync per interval
        bad = finite.index(0.0) if 0.0 in finite else None
        now = time.perf_counter()
        speed = len(self.pending) * self.images_per_step / (now - self.t0)
        step, epoch = self.pending[-1][0], self.pending[-1][1]
        self.write(
            [
                {
                    "step": s,
                    "epoch": e,
                    "train/loss": round(loss, 6),
                    "train/lr": lr,
                    "train/images_per_s": round(speed, 1),
                }
                for (s, e, _, lr), loss in zip(self.pending[:bad], losses)
            ]
        )
        if bad is not None:
            s, _, _, lr = self.pending[bad]
            raise UserError(_diverged(f"the loss is {losses[bad]} at step {s}", lr, self.path.parent))
        left = time.strftime("%H:%M:%S", time.gmtime((self.total - step - 1) * (now - self.t0) / len(self.pending)))
        self.print(
            f"epoch {epoch} step {step % steps_per_epoch + 1}/{steps_per_epoch} loss {losses[-1]:.4f} "
            f"lr {self.pending[-1][3]:.4g} {speed:.0f} img/s left {left}"
        )
        self.pending, self.t0 = [], now

    def write(self, rows):
        if self.env.is_main:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(_strict(r), allow_nan=False) + "\n" for r in rows)

    def print(self, text):
        if self.env.is_main:
            print(text, flush=True)

    def restart_clock(self):
        self.t0 = time.perf_counter()


def _before(line, start_step):
    """Whether a metrics.jsonl row belongs before a run starting at start_step: a training step's row (its step
    index) below it, an evaluation's row (the steps done) not beyond it. A torn last line is dropped."""
    try:
        row = json.loads(line)
    except ValueError:
        return False
    step = row.get("step", 0) if isinstance(row, dict) else None
    return isinstance(step, int) and (step < start_step if "train/loss" in row else step <= start_step)


class StopSignal:
    """SIGTERM/SIGINT (SLURM pre-emption, Ctrl-C) ask the run to save a checkpoint and exit at the next log
    point; the ranks agree through an all_reduce there. A second Ctrl-C kills at once."""

    def __init__(self):
        self.flag = False
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.flag = True
        signal.signal(signum, signal.SIG_DFL)

    def requested(self, env):
        flag = torch.tensor(float(self.flag), device=env.device)
        if env.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def evaluate(backbone, data, env, args, autocast=nullcontext, linear=False):
    """kNN top-1 (and, if `linear`, linear-probe top-1) of a backbone on data.bank -> data.test."""
    if data.test is None or len(data.test) == 0:
        return {}
    kw = dict(size=args.image_size, batch_size=256, workers=args.workers, autocast=autocast)
    train_f = extract_features(backbone, data.bank, data, env, **kw)
    test_f = extract_features(backbone, data.test, data, env, **kw)
    out = {
        "eval/knn_top1": knn_top1(
            train_f, data.bank.labels, test_f, data.test.labels, data.num_classes, args.knn_k, args.knn_t, env
        )
    }
    if linear:
        out["eval/linear_top1"] = linear_probe(train_f, data.bank.labels, test_f, data.test.labels, data.num_classes)
    return out


def main():
    """Weighted kNN and linear-probe top-1 of an exported backbone.pt, or of a baseline: a randomly
    initialised backbone (--arch) or the raw standardised pixels (--pixels)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--backbone", help="backbone.pt written by a trainer (its architecture is read off it)")
    what.add_argument("--arch", choices=ARCHS, help="a randomly initialised backbone (seeded by --seed)")
    what.add_argument("--pixels", action="store_true", help="the images themselves, flattened")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--image-size", type=positive_int, default=None, help="default: native (small images) or 224")
    ap.add_argument("--knn-k", type=positive_int, default=200)
    ap.add_argument("--knn-t", type=positive_float, default=0.1)
    ap.add_argument("--workers", type=nonnegative_int, default=8)
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = ap.parse_args()
    env = setup(args.device, args.seed)
    data = load_data(args.data, args.data_dir, env.device)
    small = data.image_size <= SMALL_IMAGE
    args.image_size = args.image_size or (data.image_size if small else 224)
    if args.backbone:
        if not Path(args.backbone).is_file():
            raise UserError(f"--backbone {args.backbone}: no such file")
        sd = torch.load(args.backbone, map_location="cpu", weights_only=True)
        model = backbone_from_state_dict(sd, args.image_size)
        model.load_state_dict(sd)
    else:
        model = nn.Flatten() if args.pixels else build_backbone(args.arch, args.image_size, small)
    model.to(env.device, memory_format=torch.channels_last)
    result = evaluate(model, data, env, args, linear=True)
    if env.is_main:
        print(json.dumps(result))


if __name__ == "__main__":
    run(main)
