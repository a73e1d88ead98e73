"""Throughput of one method file, in one run: the data pipeline (the DataLoader workers' side and the device's
side, separately, then together as the training loop receives it), the full training step of the method's own
main() on ready views, the same loop fed by the loader, and the bare backbone forward + backward on the same
crops. Prints images/s (each image gives one crop per view), the step's share of the bare backbone, and peak
memory.

    python benchmark.py simsiam.py                                   # built-in data, the CPU recipe (tiny)
    python benchmark.py simsiam.py --data /tmp/jpegs --image-size 224 --batch-size 64 --workers 2 --torchvision
    python benchmark.py moco.py --device cuda --arch resnet50 --data DIR --batch-size 256 --version v2

Flags it does not know (--version, --symmetric, ...) go to the method file. The method's main() runs unmodified
with --max-steps, --eval-every -1 and an output folder in a temporary directory; its TrainLoader is replaced by
one that times the pipeline first and then feeds the loop: `--warmup` untimed steps, then `--steps` timed ones,
first on views made beforehand (the step alone), then from the real loader (the run as a whole), then with
--torchvision from a torchvision data set with the usual per-image PIL transforms in DataLoader workers
(RandomResizedCrop, ColorJitter, RandomGrayscale, PIL GaussianBlur, flip, ToTensor, Normalize: what the official
trainers do). `--json FILE` writes the figures as one JSON object.
"""

import argparse
import importlib
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import common as C

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("method", help="a method file, e.g. simsiam.py")
parser.add_argument("--data", default="builtin", help="as the method file's --data (builtin, cifar10, a folder, ...)")
parser.add_argument("--data-dir", default="data")
parser.add_argument("--arch", default=None, choices=C.ARCHS, help="(the method's recipe)")
parser.add_argument("--image-size", type=C.positive_int, default=None, help="(the method's recipe)")
parser.add_argument("--batch-size", type=C.positive_int, default=None, help="(the method's recipe)")
parser.add_argument("--workers", type=C.nonnegative_int, default=8, help="DataLoader workers (image folders)")
parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
parser.add_argument("--compile", action="store_true", help="torch.compile the model and the bare backbone")
parser.add_argument("--steps", type=C.positive_int, default=10, help="timed steps (batches) per measurement")
parser.add_argument("--warmup", type=C.nonnegative_int, default=2, help="untimed steps before each measurement")
parser.add_argument("--torchvision", action="store_true", help="also time torchvision + PIL transforms in workers")
parser.add_argument(
    "--colour",
    default="auto",
    choices=["auto", "masked", "subset"],
    help="colour ops: auto (subset on the CPU, masked on CUDA), or one form on any device, to compare them",
)
parser.add_argument("--pipeline-only", action="store_true", help="time the data pipeline only, no model")
parser.add_argument("--json", default=None, help="write the figures to this file as one JSON object")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device, reset=False):
    """CUDA: the allocator's peak since the last reset; CPU: the process's peak resident set (never reset)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def timed(batches, n, warmup, device):
    """Iterate `batches` (warmup + n of them); the seconds per batch of the last n."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    sync(device)
    return (time.perf_counter() - t) / n


class PipelineDone(Exception):
    """--pipeline-only: the pipeline is timed; the method's main() stops before it builds the model."""


class PILBlur:
    """PIL's GaussianBlur with a radius drawn from `sigma` (moco/loader.py GaussianBlur, as SimSiam's trainer)."""

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, im):
        from PIL import ImageFilter

        return im.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def torchvision_transform(view, data):
    """A view's recipe as the usual torchvision (v1) PIL transforms. Approximate for the tf colour semantics."""
    import torchvision.transforms as T

    steps = [T.RandomResizedCrop(view.size, scale=view.scale, ratio=view.ratio)]
    jitter = [T.RandomApply([T.ColorJitter(*view.jitter)], p=view.jitter_p)]
    gray = [T.RandomGrayscale(p=view.gray_p)]
    steps += gray + jitter if view.gray_first else jitter + gray
    if view.blur_p > 0:
        steps.append(T.RandomApply([PILBlur(view.blur_sigma)], p=view.blur_p))
    if view.solarize_p > 0:
        steps.append(T.RandomSolarize(128, p=view.solarize_p))
    steps += [T.RandomHorizontalFlip(view.flip_p), T.ToTensor(), T.Normalize(data.mean, data.std)]
    return T.Compose(steps)


class _TorchvisionViews(torch.utils.data.Dataset):
    """ImageFolder's loader (PIL open + convert("RGB")) for folders, or a uint8 tensor data set turned into a PIL
    image per item (as torchvision's CIFAR10 does), then every view's transform."""

    def __init__(self, split, transforms):
        self.split, self.transforms = split, transforms
        self.images = None if split.images is None else split.images.cpu()

    def __len__(self):
        return len(self.split.files) if self.images is None else len(self.images)

    def __getitem__(self, index):
        from PIL import Image

        if self.images is None:
            with Image.open(self.split.files[index][0]) as f:
                im = f.convert("RGB")
        else:
            im = Image.fromarray(self.images[index].permute(1, 2, 0).numpy())
        return [t(im) for t in self.transforms]


def bench():
    args, method_flags = parser.parse_known_args()
    module = importlib.import_module(Path(args.method).stem)
    n, warmup, figures = args.steps, args.warmup, {}
    backbones, state = [], {}  # the method's backbone; the env and the ready views the loader made
    make_backbone = module.make_backbone

    def recording_make_backbone(*a, **k):  # the method's own backbone, for the bare forward + backward
        backbones.append(make_backbone(*a, **k))
        return backbones[-1]

    class BenchLoader(C.TrainLoader):
        """The method's TrainLoader, timed: pipeline measurements at construction; epoch() then feeds the
        method's loop from ready views, from itself, and (--torchvision) from torchvision's pipeline."""

        def __init__(self, data, views, batch_size, env, seed, workers=8, with_indices=False):
            super().__init__(data, views, batch_size, env, seed, workers, with_indices)
            dev, per, mine = env.device, self.per_rank, self.indices(0)
            self.index_lists = [[idx.to(dev)] if with_indices else [] for idx in mine]  # a memory bank's rows
            self.limit = warmup + n  # every pass takes exactly this many batches: no worker left prefetching
            total = (warmup + n) * (3 if args.torchvision else 2)
            self.length = total + 2  # one "epoch" longer than the run: no epoch-end work inside the timing
            if warmup + n > len(mine):
                raise C.UserError(
                    f"--warmup {warmup} + --steps {n} batches exceed the {len(mine)} batches of {batch_size} "
                    "images the data set holds; lower --steps or --batch-size"
                )
            figures.update(
                method=Path(args.method).stem,
                data=data.name,
                image_size=views[0].size,
                batch_per_process=per,
                views=len(views),
                device=str(dev),
                workers=workers if self.loader is not None else 0,
            )
            if self.loader is None:  # data on the device: no workers side
                crops = [[data.train.images[idx.to(dev)]] * len(views) for idx in mine[: warmup + n]]
                figures["workers_images_per_s"] = None
            else:  # the workers' side alone: decode + crop + flip to uint8 (+ colour when the device is the CPU)
                self.items = [(int(i), int(i)) for idx in mine[: warmup + n] for i in idx]
                crops = []
                figures["workers_images_per_s"] = per / timed(self._keep(crops), n, warmup, torch.device("cpu"))
            self.cropped = self.loader is not None

            def augmented():  # the device's side alone: colour (unless the workers did it) + normalise; crop too
                for batch, index in zip(crops, self.index_lists):  # for data on the device
                    on_dev = [c.to(dev, non_blocking=True) for c in batch]
                    if self.cropped:
                        yield [self.finish(c, v) for c, v in zip(on_dev, views)] + index
                    else:
                        yield [C.normalize(C.augment(c, v, self.gen), data) for c, v in zip(on_dev, views)] + index

            self.ready = state["ready"] = []
            state["env"] = env
            figures["device_images_per_s"] = per / timed(self._keep(self.ready, augmented()), n, warmup, dev)
            if self.cropped and self.finished_in_workers:  # on a CPU the workers colour and normalise
                figures["device_images_per_s"] = None  # no device side
            figures["loader_images_per_s"] = per / timed(super().epoch(1), n, warmup, dev)
            if args.torchvision:
                transforms = [torchvision_transform(v, data) for v in views]
                self.tv = torch.utils.data.DataLoader(
                    _TorchvisionViews(data.train, transforms),
                    batch_size=per,
                    sampler=torch.utils.data.SubsetRandomSampler(torch.randperm(len(data.train))[: per * (warmup + n)]),
                    num_workers=workers,
                    pin_memory=dev.type == "cuda",
                    drop_last=True,
                    persistent_workers=workers > 0,
                )
                figures["torchvision_images_per_s"] = per / timed(self.tv, n, warmup, torch.device("cpu"))
            if args.pipeline_only:
                raise PipelineDone

        def _keep(self, into, batches=None):
            for batch in self.loader if batches is None else batches:
                crops = batch[0] if batches is None else batch
                if batches is None:
                    C._check_decoded(batch[1])
                into.append(crops)
                yield crops

        def __len__(self):
            return self.length

        def indices(self, epoch):
            return super().indices(epoch)[: getattr(self, "limit", None)]

        def epoch(self, epoch, start=0):
            dev = self.env.device
            segments = [("step", self.ready), ("run", super().epoch(2))]
            if args.torchvision:
                tv = (
                    [x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last) for x in b] + index
                    for b, index in zip(self.tv, self.index_lists)
                )
                segments.append(("torchvision_run", tv))
            for name, batches in segments:
                it = iter(batches)
                for k in range(warmup + n):
                    if k == warmup:
                        sync(dev)
                        peak_memory_mb(dev, reset=True)
                        t = time.perf_counter()
                    yield next(it)
                sync(dev)  # the last batch's step is done when the loop asks for the next one
                figures[f"{name}_images_per_s"] = self.per_rank * n / (time.perf_counter() - t)
                figures[f"{name}_peak_memory_mb"] = peak_memory_mb(dev)
            yield self.ready[0]  # one more step, so that the last timed step's end was seen (--max-steps total + 1)

    module.make_backbone, module.TrainLoader = recording_make_backbone, BenchLoader
    if args.colour != "auto":
        C._by_subset = lambda x: args.colour == "subset"
    with tempfile.TemporaryDirectory() as out:
        flags = ["--data", args.data, "--data-dir", args.data_dir, "--workers", args.workers, "--device", args.device]
        for name in ("arch", "image_size", "batch_size"):
            if getattr(args, name) is not None:
                flags += [f"--{name.replace('_', '-')}", getattr(args, name)]
        flags += ["--dtype", args.dtype, "--eval-every", -1, "--log-every", 10**9, "--output-dir", Path(out) / "run"]
        flags += ["--max-steps", (warmup + n) * (3 if args.torchvision else 2) + 1] + ["--compile"] * args.compile
        sys.argv = [args.method, *map(str, flags), *method_flags]
        try:
            module.main()
        except PipelineDone:
            pass
    figures["threads"], figures["colour"] = torch.get_num_threads(), args.colour
    if args.pipeline_only:
        report(figures)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        return

    # The bare backbone, forward + backward on the same views (no heads, no loss, no optimizer): the ceiling.
    env, views_list = state["env"], [views[: figures["views"]] for views in state["ready"]]  # not a bank's indices
    if figures["method"] in NO_BARE_BACKBONE:
        figures["memory"] = "CUDA peak allocated" if env.device.type == "cuda" else "process peak RSS"
        report(figures)
        print(f"  bare backbone: not measured ({NO_BARE_BACKBONE[figures['method']]})")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        return
    backbone = backbones[0].train()
    bare = torch.compile(backbone) if args.compile else backbone
    autocast = C.autocast_for(env, args.dtype)

    def backward_passes(views_list):
        for views in views_list:
            with autocast():
                loss = sum(bare(x).float().mean() for x in views)
            loss.backward()
            backbone.zero_grad(set_to_none=True)
            yield

    peak_memory_mb(env.device, reset=True)
    figures["backbone_images_per_s"] = figures["batch_per_process"] / timed(
        backward_passes(views_list), n, warmup, env.device
    )
    figures["backbone_peak_memory_mb"] = peak_memory_mb(env.device)
    figures["step_share_of_backbone"] = figures["step_images_per_s"] / figures["backbone_images_per_s"]
    figures["run_share_of_backbone"] = figures["run_images_per_s"] / figures["backbone_images_per_s"]
    figures["memory"] = "CUDA peak allocated" if env.device.type == "cuda" else "process peak RSS"
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


NO_BARE_BACKBONE = {  # methods whose backbone does not take the views as they are
    "cmc": "its two encoders take the L and ab channels of the view",
    "cpc": "its encoder runs on the grid of patches cut from each view",
}


def report(f):
    print(
        f"{f['method']} on {f['data']}, {f['image_size']} px, batch {f['batch_per_process']} per process x "
        f"{f['views']} views, {f['device']} ({f['threads']} threads), {f['workers']} workers, colour ops "
        f"{f['colour']}; images/s:"
    )
    rows = [
        ("workers: decode + crop (+ colour, normalise on a CPU)", "workers_images_per_s"),
        ("device: colour + normalise (unless the workers did) (+ crop)", "device_images_per_s"),
        ("loader: workers + device, as the loop receives batches", "loader_images_per_s"),
        ("torchvision + PIL transforms in workers", "torchvision_images_per_s"),
        ("training step on ready views", "step_images_per_s"),
        ("bare backbone forward + backward on the same views", "backbone_images_per_s"),
        ("run: the training loop fed by the loader", "run_images_per_s"),
        ("run fed by torchvision + PIL transforms", "torchvision_run_images_per_s"),
    ]
    for name, key in rows:
        if key in f:
            print(f"  {name:60s} {'-' if f[key] is None else f'{f[key]:9.1f}'}")
    if "step_share_of_backbone" in f:
        print(
            f"  step's share of the bare backbone {f['step_share_of_backbone']:.2f}, the run's "
            f"{f['run_share_of_backbone']:.2f}; peak memory ({f['memory']}): step {f['step_peak_memory_mb']:.0f} "
            f"MiB, bare backbone {f['backbone_peak_memory_mb']:.0f} MiB"
        )


if __name__ == "__main__":
    C.run(bench)
