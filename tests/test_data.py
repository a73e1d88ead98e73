"""Image folders as users hold them: every colour mode, bit depth and frame count decodes to 8-bit RGB of its
true content (or one error line naming the file); hidden entries are skipped; val is labelled by train's class
names; the recipe is decided from a sample of image sizes, and the start line says why."""

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import REPO, run_script
from PIL import Image

import common as C

SIDE = 8  # every generated image is SIDE x SIDE: one batch holds them all
MODES = ("1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F")
FORMATS = ("PNG", "TIFF", "GIF", "WEBP", "JPEG", "BMP", "PPM")
EXT = {"PNG": "png", "TIFF": "tif", "GIF": "gif", "WEBP": "webp", "JPEG": "jpg", "BMP": "bmp", "PPM": "ppm"}


def _image(mode, rng, side=SIDE):
    """A random image of a PIL mode, over that mode's whole range."""
    shape = (side, side)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, shape).astype(bool))
    if mode == "P":
        im = Image.fromarray(rng.integers(0, 16, shape, dtype=np.uint8), "P")
        im.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tobytes())
        return im
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, shape).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.random(shape, dtype=np.float32))
    channels = {"L": 1, "LA": 2, "RGBA": 4, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def _truth(im):
    """The rule of common._decode's docstring, written out: (H, W, 3) uint8 of a PIL image's current frame."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        scale = 255 / 65535 if im.mode != "F" else (255 if a.max() <= 1 else 1)
        return np.repeat(np.rint(a * scale)[..., None], 3, axis=2).astype(np.uint8)
    return np.array(im.convert("RGB"))


def _matrix(folder):
    """Every (mode, format, 1 or 2 frames) PIL can write, as files; returns [(path, expected (3, H, W))]."""
    rng = np.random.default_rng(0)
    cases = []
    for mode in MODES:
        for fmt in FORMATS:
            for frames in (1, 2):
                first, second = _image(mode, rng), _image(mode, rng)
                path = folder / f"{mode.replace(';', '')}-{fmt}-{frames}.{EXT[fmt]}"
                buf = io.BytesIO()
                try:
                    kw = dict(save_all=True, append_images=[second]) if frames == 2 else {}
                    first.save(buf, fmt, **kw)
                except (OSError, ValueError, KeyError):
                    continue  # PIL cannot write this mode in this format (JPEG of LA, PNG of CMYK, ...)
                path.write_bytes(buf.getvalue())
                with Image.open(path) as im:
                    assert getattr(im, "n_frames", 1) == frames or fmt in ("GIF", "WEBP"), path  # merged frames
                    expected = _truth(im)  # frame 0 of what the file holds (lossy formats differ from `first`)
                    if fmt in ("PNG", "TIFF") and im.mode == first.mode:  # lossless: the file holds `first`
                        np.testing.assert_array_equal(expected, _truth(first))
                cases.append((path, torch.from_numpy(expected).permute(2, 0, 1)))
    return cases


def _png16(path, arr):
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): arr uint16 (H, W, C), C = 1, 2, 3 or 4."""
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[arr.shape[2]]  # grey, grey + alpha, RGB, RGBA
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)  # filter type 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], 16, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _png16_cases(folder):
    """16-bit PNGs of every colour type, expected as v * 255 / 65535 from the array written (not from PIL)."""
    rng = np.random.default_rng(1)
    cases = []
    for channels in (1, 2, 3, 4):
        arr = rng.integers(0, 65536, (SIDE, SIDE, channels), dtype=np.uint16)
        arr[0, 0] = 1000  # a dark pixel: scaled by the 16-bit range, not stretched by the image's own range
        path = folder / f"png16-{channels}.png"
        _png16(path, arr)
        rgb = arr[..., :1].repeat(3, 2) if channels <= 2 else arr[..., :3]
        cases.append((path, torch.from_numpy(np.rint(rgb * (255 / 65535)).astype(np.uint8)).permute(2, 0, 1)))
    return cases


@dataclass(frozen=True)
class WholeImage:  # a view recipe whose crop is the whole image, unflipped: the worker's crop is the decode
    size: int = SIDE
    scale: tuple = (1.0, 1.0)
    ratio: tuple = (1.0, 1.0)
    flip_p: float = 0.0


def _assert_within_one(got, cases):
    for img, (path, want) in zip(got, cases):
        assert img.dtype == torch.uint8 and img.shape == want.shape, path
        assert (img.int() - want.int()).abs().max() <= 1, path


def test_every_mode_format_and_frame_count_decodes_to_8_bit_rgb(tmp_path):
    cases = _matrix(tmp_path) + _png16_cases(tmp_path)
    names = {p.name for p, _ in cases}
    # The matrix is not emptied by skips: each wide mode, CMYK and animations in each format are in it.
    assert {"I16-PNG-1.png", "I16-TIFF-2.tif", "I-TIFF-1.tif", "F-TIFF-1.tif", "CMYK-JPEG-1.jpg"} <= names
    assert {"P-GIF-2.gif", "RGBA-PNG-2.png", "L-WEBP-2.webp", "I-PPM-1.ppm"} <= names and len(cases) > 60
    files = [str(p) for p, _ in cases]
    decoded = [C._decode(f) for f in files]
    assert [err for _, err in decoded] == [None] * len(files)
    _assert_within_one([img for img, _ in decoded], cases)
    # The training path: a DataLoader worker decodes and crops; one batch mixes every mode (collate needs one
    # dtype and shape: a uint16 PNG or a (frames, 3, H, W) GIF among uint8 images used to end the run here).
    folder = C._FolderViews([(f, 0) for f in files], [WholeImage()])
    train = torch.utils.data.DataLoader(
        folder,
        collate_fn=folder.collate,
        batch_size=len(files),
        sampler=[(i, i) for i in range(len(files))],
        num_workers=1,
    )
    (crops,), errors = next(iter(train))
    assert list(errors) == [""] * len(files)
    _assert_within_one(crops, cases)
    # The evaluation path: resize the short side to round(7 * 256 / 224) = SIDE (unchanged), centre-crop 7.
    evaluate = torch.utils.data.DataLoader(
        C._FolderEval([(f, 0) for f in files], 7), batch_size=len(files), num_workers=1
    )
    images, errors = next(iter(evaluate))
    assert list(errors) == [""] * len(files)
    _assert_within_one(images, [(p, TF.center_crop(want, [7, 7])) for p, want in cases])


def test_wide_modes_follow_the_documented_scale(tmp_path):
    """I;16 and I: v * 255 / 65535 (never the image's own min..max); F: [0, 1] if every value lies in it, else
    [0, 255]; values outside those ranges are an error naming the file."""

    def decode(arr, name):
        Image.fromarray(arr).save(tmp_path / name)
        return C._decode(str(tmp_path / name))

    row = lambda *v: np.array([v])  # noqa: E731
    img, _ = decode(row(0, 257, 1000, 65535).astype(np.uint16), "a.png")
    assert img[0, 0].tolist() == [0, 1, 4, 255] and img.shape == (3, 1, 4)
    assert decode(row(0, 257, 65535).astype(np.int32), "i.tif")[0][1, 0].tolist() == [0, 1, 255]
    assert decode(row(0.0, 0.5, 1.0).astype(np.float32), "f1.tif")[0][2, 0].tolist() == [0, 128, 255]
    assert decode(row(0.0, 2.0, 255.0).astype(np.float32), "f255.tif")[0][0, 0].tolist() == [0, 2, 255]
    for arr, name in (
        (row(0, 70_000).astype(np.int32), "big.tif"),
        (row(-1, 5).astype(np.int32), "negative.tif"),
        (row(0.0, 300.0).astype(np.float32), "bright.tif"),
        (row(0.0, np.nan).astype(np.float32), "nan.tif"),
    ):
        img, err = decode(arr, name)
        assert img is None and str(tmp_path / name) in err and "outside" in err


def test_truncated_and_corrupt_files_get_one_line_naming_the_file(tmp_path):
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt)
        (tmp_path / f"cut.{EXT[fmt]}").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image\nat all")
    for path in sorted(tmp_path.iterdir()):
        img, err = C._decode(str(path))
        assert img is None and err.startswith(f"{path} (") and "\n" not in err, (path, err)
        with pytest.raises(C.UserError, match="cannot decode image") as e:
            C._check_decoded(["", err])
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_truncated_file_stops_training_and_evaluation_with_one_line(tmp_path):
    """The header reads (the recipe's sample), the worker's decode fails: the loaders raise one UserError."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for i in range(4):
            _png(root / split / "a" / f"{i}.png")
        bad = root / split / "a" / "2.png"
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        bad.write_bytes(buf.getvalue()[:300])
    d, env = C.load_data(str(root)), C.Env(0, 1, 0, torch.device("cpu"))
    loader = C.TrainLoader(d, [C.ViewAug(size=SIDE)], 4, env, seed=0, workers=0)
    with pytest.raises(C.UserError, match="cannot decode image") as e:
        next(loader.epoch(0))
    assert str(root / "train" / "a" / "2.png") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(C.UserError, match="cannot decode image") as e:
        C.extract_features(torch.nn.Flatten(), d.test, d, env, SIDE, workers=0)
    assert str(root / "val" / "a" / "2.png") in str(e.value)


def _png(path, side=SIDE, height=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, height or side), (40, 80, 120)).save(path)


def test_hidden_entries_are_skipped_at_every_depth(tmp_path):
    root = tmp_path / "data"
    for name in ("train/a/1.png", "train/a/sub/2.png", "train/b/3.png", "val/a/4.png"):
        _png(root / name)
    for name in (
        "train/a/.ipynb_checkpoints/1-checkpoint.png",
        "train/a/sub/.cache/5.png",
        "train/.git/6.png",
        "val/a/.ipynb_checkpoints/7.png",
    ):
        _png(root / name)
    for name in ("train/a/._1.png", "train/b/._3.png", "val/a/._4.png", "train/a/.hidden.png"):
        (root / name).write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble stub")  # not an image: would end the run
    d = C.load_data(str(root))
    rel = lambda split: sorted(Path(f).relative_to(root).as_posix() for f, _ in split.files)  # noqa: E731
    assert rel(d.train) == ["train/a/1.png", "train/a/sub/2.png", "train/b/3.png"] and d.num_classes == 2
    assert rel(d.test) == ["val/a/4.png"]


def test_val_is_labelled_by_train_class_names(tmp_path, capsys):
    root = tmp_path / "data"
    for name in ("a/1", "b/2", "b/3", "c/4"):
        _png(root / "train" / f"{name}.png")
    for name in ("b/5", "c/6", "c/7", "zebra/8", "yak/9"):
        _png(root / "val" / f"{name}.png")
    d = C.load_data(str(root))
    assert d.num_classes == 3 and d.train.labels.tolist() == [0, 1, 1, 2]
    assert [(f.split("/")[-2], y) for f, y in d.test.files] == [("b", 1), ("c", 2), ("c", 2)]
    assert d.test.labels.tolist() == [1, 2, 2]
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "yak, zebra" in err and len(err.splitlines()) == 1
    assert "train 4 images in 3 classes, val 3 images in 2 classes" in d.describe("small")
    # No class in common: an error naming both sides.
    for c in ("b", "c"):
        for f in (root / "val" / c).iterdir():
            f.unlink()
        (root / "val" / c).rmdir()
    with pytest.raises(C.UserError, match="no class folder in common") as e:
        C.load_data(str(root))
    assert "yak, zebra" in str(e.value) and "a, b, c" in str(e.value)


def test_val_without_class_folders_is_a_warning_not_silence(tmp_path, capsys):
    root = tmp_path / "data"
    _png(root / "train" / "a" / "1.png")
    _png(root / "val" / "loose.png")
    d = C.load_data(str(root))
    assert d.test is None and "no val/" in d.describe("small")
    assert "1 lie in it directly" in capsys.readouterr().err


def test_without_train_the_class_folders_train_and_val_evaluates(tmp_path):
    root = tmp_path / "data"
    for name in ("a/1", "b/2", "val/a/3", "val/b/4"):
        _png(root / f"{name}.png")
    d = C.load_data(str(root))
    assert d.num_classes == 2 and len(d.train) == 2 and d.test.labels.tolist() == [0, 1]


def test_the_recipe_is_decided_by_the_median_of_a_sample_and_the_start_line_says_why(tmp_path):
    recipes = {"small": {}, "imagenet": {}}
    env = C.Env(0, 1, 0, torch.device("cpu"))

    class Args:
        image_size = None

    # A 300-px data set whose first file (in sorted order) is a thumbnail: the photos decide.
    photos = tmp_path / "photos"
    _png(photos / "train" / "a" / "000-thumb.png", 20)
    for i in range(6):
        _png(photos / "train" / "ab"[i % 2] / f"{i + 1}.png", 300, 400)  # short side 300
    d = C.load_data(str(photos))
    assert (d.image_size, d.size_sample) == (300, 7) and C.pick_recipe(recipes, d, env, Args()) == "imagenet"
    assert d.describe("imagenet").startswith("imagenet recipe (median short side 300 px over 7 sampled files > 96)")
    # 100 files, 40 large then 60 small in sorted order: the median of a sample of 64 evenly spaced files is
    # small; the first file, the first 64 files, or a mean (99 px) would pick the ImageNet recipe.
    mixed = tmp_path / "mixed"
    for i in range(100):
        _png(mixed / "train" / "a" / f"{i:03d}.png", 200 if i < 40 else 32)
    d, args = C.load_data(str(mixed)), Args()
    assert (d.image_size, d.size_sample) == (32, 64) and C.pick_recipe(recipes, d, env, args) == "small"
    assert args.image_size == 32 and "median short side 32 px over 64 sampled files <= 96" in d.describe("small")
    # Arrays (every image has the same side), with unlabeled images counted apart as in STL-10.
    train = C.Split(torch.tensor([0, 1, 0, 1, 0, 1, -1, -1, -1, -1]), images=torch.zeros(10, 3, 32, 32))
    arrays = C.Data("x", 32, 10, (0,), (1,), train, train, C.Split(torch.tensor([0, 1, 1])))
    assert arrays.describe("small") == (
        "small recipe (32 px images <= 96), train 10 images in 2 classes (4 unlabeled), test 3 images in 2 classes"
    )


def test_every_method_prints_the_data_description_from_common():
    for script in ("simsiam.py", "byol.py", "simclr.py", "moco.py"):
        assert "{data.describe(recipe)}, {steps_per_epoch} steps/epoch" in (REPO / script).read_text(), script


def test_a_run_on_a_folder_of_mixed_files(tmp_path):
    """16-bit, animated, CMYK, palette and float images with hidden entries, through training and evaluation."""
    root, rng = tmp_path / "data", np.random.default_rng(3)
    samples = [("I;16", "PNG"), ("P", "GIF"), ("CMYK", "JPEG"), ("F", "TIFF"), ("RGBA", "WEBP"), ("L", "PNG")]
    for split, n in (("train", 8), ("val", 4)):
        for i in range(n):
            mode, fmt = samples[i % len(samples)]
            first, second = _image(mode, rng, 32), _image(mode, rng, 32)
            kw = dict(save_all=True, append_images=[second]) if fmt == "GIF" else {}
            path = root / split / f"c{i % 2}" / f"{i}.{EXT[fmt]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            first.save(path, fmt, **kw)
    (root / "train" / "c0" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    r = run_script(
        "simsiam.py --arch tiny --batch-size 4 --workers 1 --max-steps 2 --knn-k 3 --data",
        root,
        "--output-dir",
        tmp_path / "run",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    start = "simsiam: small recipe (median short side 32 px over 8 sampled files <= 96), train 8 images in 2 classes"
    assert f"{start}, val 4 images in 2 classes, 2 steps/epoch" in r.stdout


def test_on_a_cpu_the_workers_colour_and_normalise_with_each_images_own_draws(tmp_path):
    """On a CPU the DataLoader workers also apply the colour ops and normalise (the main process would do them on
    one core): without colour ops that is normalize(crop / 255) of the same crops; with them, every draw comes from
    the item's own seed, so the batches do not depend on the number of workers, and the colour is applied."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(6):
        files.append((str(tmp_path / f"{i}.png"), 0))
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(files[-1][0])
    data = type("D", (), {"mean": (0.4, 0.5, 0.6), "std": (0.2, 0.25, 0.3)})
    plain = C.ViewAug(12, jitter_p=0.0, gray_p=0.0)
    coloured = C.ViewAug(12, jitter_p=1.0, gray_p=0.5, blur_p=0.5, solarize_p=0.5)
    items = [(i, 1000 + i) for i in range(6)]

    def batch(views, finish, workers):
        folder = C._FolderViews(files, views, finish=finish)
        loader = torch.utils.data.DataLoader(
            folder, batch_size=6, sampler=items, collate_fn=folder.collate, num_workers=workers
        )
        return next(iter(loader))[0]

    crops, finished = batch([plain, coloured], None, 0), batch([plain, coloured], data, 0)
    torch.testing.assert_close(finished[0], C.normalize(crops[0].float() / 255, data), atol=1e-6, rtol=0)
    assert finished[0].is_contiguous(memory_format=torch.channels_last)
    undone = C.normalize(crops[1].float() / 255, data)
    assert (finished[1] - undone).abs().amax(dim=(1, 2, 3)).min() > 0.05, "an image was left uncoloured"
    for a, b in zip(finished, batch([plain, coloured], data, 2)):
        assert torch.equal(a, b)


def test_the_folder_loader_leaves_the_global_rng_alone(tmp_path):
    """A DataLoader iterator draws its base seed from its generator, by default the global RNG, which the methods
    restore on resume and draw from in their step (DINO's drop-path on a CPU): the training loader has its own."""
    for i in range(4):
        _png(tmp_path / "data" / "train" / "a" / f"{i}.png")
    d, env = C.load_data(str(tmp_path / "data")), C.Env(0, 1, 0, torch.device("cpu"))
    loader = C.TrainLoader(d, [C.ViewAug(size=SIDE)], 2, env, seed=0, workers=0)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    next(loader.epoch(0))
    assert torch.equal(torch.get_rng_state(), rng)
