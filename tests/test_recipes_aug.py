"""Augmentation as a whole, and each method's augmentation recipe pinned to its source.

- The tf.image colour ops (SimCLR, BYOL) against a slow per-image reference written from TensorFlow's documented
  formulas (HSV per pixel with Python's colorsys), and against the usage examples of the TensorFlow docs.
- `augment` against the per-image pipeline with the same draws: torchvision's functional ops in the recipe's
  order (both grayscale orders) for the torchvision recipes, the slow TF reference for the TF ones.
- The drawn parameters cover their ranges; jitter factors are U[max(0, 1-s), 1+s] also for s > 1.
- Each method's view_recipe (ImageNet and small recipes, every --version) against literals from its source.

Mechanism -> test -> the deliberate bug that made it fail (done once by hand):
- tf contrast per channel -> test_tf_ops_match_documented_formulas -> mean over all channels
- tf saturation in HSV, clipped -> test_tf_ops_match_documented_formulas -> no min(., V/C) (S not clipped)
- additive brightness -> test_tf_jitter_matches_slow_reference -> x * (1 + delta)
- clip after each op -> test_tf_jitter_matches_slow_reference -> clamp removed in apply_jitter
- zero-padded blur -> test_augment_matches_the_per_image_pipeline[tf] -> reflect padding for "tf"
- grayscale order -> test_augment_matches_the_per_image_pipeline[gray_first] -> gray_first ignored
- factor range -> test_jitter_factors_are_uniform_on_max0_1ms_1ps -> 1 + s(2u - 1) clamped at 0
- parameter ranges -> test_drawn_parameters_cover_their_ranges -> hue drawn U[0, h]; the op order sorted
- each image's op order -> test_augment_matches_the_per_image_pipeline -> hue selected by position 0 only
- every op in the pipeline -> test_augment_matches_the_per_image_pipeline -> solarize skipped; torchvision
  saturation blended to the channel mean instead of the luma
- recipes -> test_<method>_recipe -> a changed literal in the method file (e.g. moco v1 gray_first=False)
"""

import colorsys
import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import byol
import common as C
import moco
import simclr
import simsiam

ATOL = 2e-5


def images(n, h=14, w=12, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---- slow references ------------------------------------------------------------------------------------------
def hsv_map(im, fn):
    """Apply fn(h, s, v) -> (h, s, v) to every pixel of a (3, H, W) image through colorsys's HSV (the standard
    conversion tf.image's adjust_hue / adjust_saturation document)."""
    out = torch.empty_like(im, dtype=torch.float64)
    for i in range(im.shape[1]):
        for j in range(im.shape[2]):
            hsv = colorsys.rgb_to_hsv(*(float(c) for c in im[:, i, j]))
            out[:, i, j] = torch.tensor(colorsys.hsv_to_rgb(*fn(*hsv)), dtype=torch.float64)
    return out.to(im.dtype)


def tf_op(op, im, param, brightness="add"):
    """One jitter op of SimCLR data_util.py / BYOL utils/augmentations.py on a (3, H, W) image, written from the
    documented formulas of tf.image (before the sources' clip)."""
    if op == 0:  # tf.image.adjust_brightness: x + delta; SimCLR v2: x * factor
        return im + param if brightness == "add" else im * param
    if op == 1:  # tf.image.adjust_contrast: per channel, (x - mean) * f + mean
        mean = im.mean(dim=(1, 2), keepdim=True)
        return (im - mean) * param + mean
    if op == 2:  # tf.image.adjust_saturation: S * f in HSV, clipped to [0, 1]
        return hsv_map(im, lambda h, s, v: (h, min(max(s * param, 0.0), 1.0), v))
    return hsv_map(im, lambda h, s, v: ((h + param) % 1.0, s, v))  # tf.image.adjust_hue: H + delta mod 1


def tf_blur(im, sigma, kernel_size):
    """data_util.gaussian_blur / BYOL _gaussian_blur_single_image: a normalised exp(-x^2 / 2 sigma^2) of radius
    int(kernel_size / 2), vertical and horizontal, padding 'SAME' (zeros), written as a sum over kernel taps."""
    r = int(kernel_size / 2)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    h, w = im.shape[1:]
    pad = torch.zeros(3, h + 2 * r, w + 2 * r, dtype=torch.float64)
    pad[:, r : r + h, r : r + w] = im
    out = torch.zeros(3, h, w, dtype=torch.float64)
    for a in range(2 * r + 1):
        for b in range(2 * r + 1):
            out += k[a] * k[b] * pad[:, a : a + h, b : b + w]
    return out.float()


TV_OPS = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]


def reference_view(x, view, p):
    """`augment` written out image by image: crop + flip (TF.resized_crop), then grayscale and jitter in the
    view's order, blur, solarize; colour ops and blur as torchvision's functional ops or the slow TF reference."""
    out = []
    for i in range(len(x)):
        im = x[i].float() / 255
        if "crop" in p:
            top, left, h, w = (int(t[i]) for t in p["crop"])
            im = TF.resized_crop(im, top, left, h, w, [view.size, view.size], antialias=True)
            im = TF.horizontal_flip(im) if p["flip"][i] else im
        gray = "gray" in p and bool(p["gray"][i])
        if view.gray_first and gray:
            im = TF.rgb_to_grayscale(im, num_output_channels=3)
        if "jitter" in p:
            params, order = p["jitter"]
            for op in order[i].tolist():
                if op < 0:  # the jitter is not applied to this image
                    break
                if view.color == "tf":
                    im = tf_op(op, im, params[op, i].item(), view.brightness).clamp(0, 1)  # clipped after each op
                else:
                    im = TV_OPS[op](im, params[op, i].item())
        if not view.gray_first and gray:
            im = TF.rgb_to_grayscale(im, num_output_channels=3)
        if "blur" in p and p["blur"][i] > 0:
            sigma, k = p["blur"][i].item(), C.blur_kernel(view.size)
            im = tf_blur(im, sigma, k) if view.color == "tf" else TF.gaussian_blur(im, [k, k], [sigma, sigma])
        if "solarize" in p and p["solarize"][i]:
            im = TF.solarize(im, 0.5)
        out.append(im.clamp(0, 1))
    return torch.stack(out)


# ---- the tf.image ops --------------------------------------------------------------------------------------------
def test_tf_ops_match_documented_formulas():
    # The usage examples of the TensorFlow docs (tf.image.adjust_contrast(x, 2.), adjust_saturation(x, 0.5)).
    doc = torch.arange(1.0, 13.0).view(2, 2, 3).permute(2, 0, 1)[None]  # HWC [[[1, 2, 3], [4, 5, 6]], ...]
    contrast = [[[-3.5, -2.5, -1.5], [2.5, 3.5, 4.5]], [[8.5, 9.5, 10.5], [14.5, 15.5, 16.5]]]
    saturation = [[[2.0, 2.5, 3.0], [5.0, 5.5, 6.0]], [[8.0, 8.5, 9.0], [11.0, 11.5, 12.0]]]
    for op, f, expected in ((C.adjust_contrast_tf, 2.0, contrast), (C.adjust_saturation_tf, 0.5, saturation)):
        got = op(doc, torch.tensor([f]))[0].permute(1, 2, 0)
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)
    # Random images, factors that saturate S (f > 1/S) and that remove colour (f = 0); a grey pixel; black.
    x = images(5)
    x[0, :, 0, 0] = 0.5
    x[1, :, 1, 1] = 0.0
    for op, ref, params in (
        (C.add_brightness, 0, [-0.4, -0.1, 0.0, 0.2, 0.4]),
        (C.adjust_contrast_tf, 1, [0.0, 0.3, 1.0, 1.4, 1.8]),
        (C.adjust_saturation_tf, 2, [0.0, 0.5, 1.0, 1.8, 5.0]),
        (C.adjust_hue, 3, [-0.5, -0.2, 0.0, 0.1, 0.45]),
    ):
        out = op(x, torch.tensor(params))
        expected = torch.stack([tf_op(ref, x[i], params[i]) for i in range(len(x))])
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("brightness", ["add", "multiply"])
def test_tf_jitter_matches_slow_reference(brightness):
    """sample_jitter + apply_jitter with tf semantics = the four ops in each image's own order, clipped after each
    (SimCLR data_util.py color_jitter_rand, BYOL _color_transform_single_image), strength 1 (SimCLR's)."""
    view = C.ViewAug(12, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, color="tf", brightness=brightness)
    x = images(12)
    params, order = C.sample_jitter(len(x), view, torch.Generator().manual_seed(1))
    out = C.apply_jitter(x, params, order, view)
    for i in range(len(x)):
        ref = x[i]
        for op in order[i].tolist():
            if op >= 0:
                ref = tf_op(op, ref, params[op, i].item(), brightness).clamp(0, 1)
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)
    assert (order[:, 0] < 0).any() and (order[:, 0] >= 0).sum() >= 6, "some images jittered, some not"


# ---- augment as a whole ------------------------------------------------------------------------------------------
VIEWS = {
    # torchvision's ColorJitter, grayscale after (MoCo v2/v3, SimSiam); high probabilities so that every op occurs
    "torchvision": C.ViewAug(20, scale=(0.2, 1.0), jitter_p=0.8, gray_p=0.4, blur_p=0.5, solarize_p=0.4),
    # grayscale first (MoCo v1): hue 0.4 so that the order matters
    "gray_first": C.ViewAug(20, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.5, gray_first=True),
    # tf.image ops, additive brightness, zero-padded blur (BYOL's view 2, SimCLR v1)
    "tf": C.ViewAug(
        20, jitter=(0.8, 0.8, 0.8, 0.2), gray_p=0.4, blur_p=0.5, solarize_p=0.4, color="tf", brightness="add"
    ),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_augment_matches_the_per_image_pipeline(name):
    """augment(x) = crop, flip, (grayscale), jitter in each image's order, (grayscale), blur, solarize, applied
    image by image with the parameters sample_view draws from the same generator state."""
    view, n = VIEWS[name], 16
    x = (images(n, 26, 30, seed=2) * 255).round().to(torch.uint8)
    p = C.sample_view(n, 26, 30, view, torch.Generator().manual_seed(7))
    out = C.augment(x, view, torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, reference_view(x, view, p), atol=ATOL, rtol=0)
    # every op occurred on some image and was skipped on another, so each branch was compared
    gray = p["gray"]
    jittered = p["jitter"][1][:, 0] >= 0
    assert 0 < gray.sum() < n and (gray & jittered).any()
    for key in ("blur", "solarize"):
        if key in p:
            assert 0 < (p[key] > 0).sum() < n


def test_grayscale_order_matters():
    """A hue shift changes the luma: grayscale-then-jitter differs from jitter-then-grayscale (the README's former
    claim that the two commute)."""
    x = images(4)
    view = C.ViewAug(14, jitter=(0.0, 0.0, 0.0, 0.4), jitter_p=1.0)
    params, order = C.sample_jitter(len(x), view, torch.Generator().manual_seed(0))
    first = C.apply_jitter(C.grayscale(x).expand_as(x), params, order, view)
    after = C.grayscale(C.apply_jitter(x, params, order, view)).expand_as(x)
    assert (first - after).abs().amax() > 0.05


def test_jitter_factors_are_uniform_on_max0_1ms_1ps():
    """torchvision's ColorJitter._check_input: U[max(0, 1-s), 1+s]. At s = 1.5: uniform on [0, 2.5], not
    1 + 1.5(2u - 1) clamped at 0 (which puts 1/6 of the images at exactly 0, i.e. black)."""
    view = C.ViewAug(8, jitter=(1.5, 1.5, 1.5, 0.1), jitter_p=1.0)
    params, _ = C.sample_jitter(20_000, view, torch.Generator().manual_seed(0))
    for f in params[:3]:
        assert f.min() >= 0 and f.max() <= 2.5
        assert (f == 0).float().mean() < 1e-3
        assert math.isclose(f.mean().item(), 1.25, abs_tol=0.03)
        hist = torch.histc(f, bins=5, min=0, max=2.5) / len(f)  # uniform: 0.2 per bin
        torch.testing.assert_close(hist, torch.full((5,), 0.2), atol=0.015, rtol=0)
    # s < 1: U[1-s, 1+s]; additive brightness: U[-s, s]
    view = C.ViewAug(8, jitter=(0.4, 0.6, 0.2, 0.1), jitter_p=1.0, brightness="add")
    params, _ = C.sample_jitter(20_000, view, torch.Generator().manual_seed(1))
    for f, lo, hi in zip(params, (-0.4, 0.4, 0.8, -0.1), (0.4, 1.6, 1.2, 0.1)):
        assert lo <= f.min() < lo + 0.01 and hi - 0.01 < f.max() <= hi
        assert math.isclose(f.mean().item(), (lo + hi) / 2, abs_tol=0.01 * (hi - lo) + 1e-3)


def test_drawn_parameters_cover_their_ranges():
    """Over a few thousand images: crop areas and ratios span the recipe's ranges, flips / grayscale / blur /
    solarize at their probabilities, jitter factors reach 1 +- s, hue both signs, all 24 op orders, sigma in
    [0.1, 2]."""
    view = C.ViewAug(32, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.5, solarize_p=0.2)
    n = 4000
    p = C.sample_view(n, 64, 64, view, torch.Generator().manual_seed(0))
    top, left, h, w = p["crop"]
    area, ratio = (h * w).float() / 64**2, w.float() / h.float()
    assert area.min() < 0.21 and area.max() > 0.97 and area.min() >= 0.19
    assert ratio.min() < 0.78 and ratio.max() > 1.28 and ratio.min() >= 0.7 and ratio.max() <= 1.4
    for key, prob in (("flip", 0.5), ("gray", 0.2), ("solarize", 0.2)):
        assert math.isclose(p[key].float().mean().item(), prob, abs_tol=0.03), key
    blurred = p["blur"][p["blur"] > 0]
    assert math.isclose(len(blurred) / n, 0.5, abs_tol=0.03)
    assert 0.1 <= blurred.min() < 0.11 and 1.99 < blurred.max() <= 2.0
    params, order = p["jitter"]
    on = order[:, 0] >= 0
    assert math.isclose(on.float().mean().item(), 0.8, abs_tol=0.03)
    for f, s in zip(params[:3], view.jitter):
        assert 1 - s <= f[on].min() < 1 - s + 0.01 and 1 + s - 0.01 < f[on].max() <= 1 + s
    hue = params[3][on]
    assert -0.1 <= hue.min() < -0.099 and 0.099 < hue.max() <= 0.1 and (hue < 0).float().mean() > 0.45
    assert len({tuple(o) for o in order[on].tolist()}) == 24
    for pos in range(4):  # each op equally often at each position
        counts = torch.bincount(order[on][:, pos], minlength=4).float() / on.sum()
        torch.testing.assert_close(counts, torch.full((4,), 0.25), atol=0.03, rtol=0)


# ---- each method's recipe, pinned to its source ------------------------------------------------------------------
def check(view, **expected):
    """Every field of a view equals the literal given (all fields must be given)."""
    got = dataclasses.asdict(view)
    assert set(got) == set(expected), f"fields not pinned: {set(got) ^ set(expected)}"
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), f"{key}: {got[key]} != {value}"


RRC = dict(ratio=(3 / 4, 4 / 3))  # torchvision RandomResizedCrop's default ratio, as every source's crop
TV = dict(color="torchvision", brightness="multiply")  # torchvision ColorJitter (PIL-style ops)


def test_simsiam_recipe():
    for size, small in ((224, False), (32, True)):
        view1, view2 = simsiam.view_recipe(size, small)
        assert view1 == view2
        check(
            view1,
            size=size,
            scale=(0.2, 1.0),  # main_simsiam.py L.230: RandomResizedCrop(224, scale=(0.2, 1.))
            **RRC,
            jitter=(0.4, 0.4, 0.4, 0.1),  # L.232: ColorJitter(0.4, 0.4, 0.4, 0.1)
            jitter_p=0.8,  # L.233: RandomApply(..., p=0.8)
            gray_p=0.2,  # L.234: RandomGrayscale(p=0.2), after the jitter
            gray_first=False,
            blur_p=0.0 if small else 0.5,  # L.235: RandomApply([GaussianBlur([.1, 2.])], p=0.5); App. D: no blur
            blur_sigma=(0.1, 2.0),  # L.235 / simsiam/loader.py L.26
            flip_p=0.5,  # L.236: RandomHorizontalFlip()
            solarize_p=0.0,  # none in L.229-239
            **TV,
        )


@pytest.mark.parametrize("recipe", ["imagenet", "small"])
def test_moco_recipes(recipe):
    size, small = (224, False) if recipe == "imagenet" else (32, True)
    crop = {v: moco.RECIPES[v][recipe]["crop_min"] for v in ("v1", "v2", "v3")}  # as main() passes --crop-min
    # moco main_moco.py (7397dfe) L.341-348, MoCo v1 = InstDisc's recipe
    view1, view2 = moco.view_recipe(size, small, "v1", crop["v1"])
    assert view1 == view2
    check(
        view1,
        size=size,
        scale=(0.2, 1.0),  # L.342: RandomResizedCrop(224, scale=(0.2, 1.0)) (the small recipe keeps v1's crop)
        **RRC,
        gray_p=0.2,  # L.343: RandomGrayscale(p=0.2) ...
        gray_first=True,  # ... before L.344
        jitter=(0.4, 0.4, 0.4, 0.4),  # L.344: ColorJitter(0.4, 0.4, 0.4, 0.4)
        jitter_p=1.0,  # L.344: no RandomApply
        flip_p=0.5,  # L.345: RandomHorizontalFlip()
        blur_p=0.0,
        blur_sigma=(0.1, 2.0),  # unused (ViewAug's default)
        solarize_p=0.0,
        **TV,
    )
    # v2: main_moco.py (7397dfe) L.328-338 --aug-plus; small: colab moco_cifar10_demo.ipynb cell 6
    view1, view2 = moco.view_recipe(size, small, "v2", crop["v2"])
    assert view1 == view2
    check(
        view1,
        size=size,
        # L.329: RandomResizedCrop(224, scale=(0.2, 1.0)); demo: RandomResizedCrop(32), default scale (0.08, 1)
        scale=(0.08, 1.0) if small else (0.2, 1.0),
        **RRC,
        jitter=(0.4, 0.4, 0.4, 0.1),  # L.331: ColorJitter(0.4, 0.4, 0.4, 0.1); demo: the same
        jitter_p=0.8,  # L.331: p=0.8; demo: the same
        gray_p=0.2,  # L.333: RandomGrayscale(p=0.2), after the jitter; demo: the same
        gray_first=False,
        blur_p=0.0 if small else 0.5,  # L.334: RandomApply([GaussianBlur([0.1, 2.0])], p=0.5); demo: no blur
        blur_sigma=(0.1, 2.0),  # L.334
        flip_p=0.5,  # L.335; demo: RandomHorizontalFlip(p=0.5)
        solarize_p=0.0,
        **TV,
    )
    # v3: moco-v3 main_moco.py L.262-285 (ResNet: CONFIG.md --crop-min=.2; small: solo-learn, crop (0.08, 1))
    view1, view2 = moco.view_recipe(size, small, "v3", crop["v3"])
    for view, blur, solarize in ((view1, 1.0, 0.0), (view2, 0.1, 0.2)):
        check(
            view,
            size=size,
            scale=(0.08, 1.0) if small else (0.2, 1.0),  # L.263/275: scale=(args.crop_min, 1.); CONFIG.md L.15
            **RRC,
            jitter=(0.4, 0.4, 0.2, 0.1),  # L.265/277: ColorJitter(0.4, 0.4, 0.2, 0.1)
            jitter_p=0.8,  # L.266/278: p=0.8
            gray_p=0.2,  # L.267/279: RandomGrayscale(p=0.2), after the jitter
            gray_first=False,
            blur_p=0.0 if small else blur,  # L.268: p=1.0 (view 1), L.280: p=0.1 (view 2); small: no blur
            blur_sigma=(0.1, 2.0),  # L.268/280: GaussianBlur([.1, 2.])
            solarize_p=solarize,  # L.281: RandomApply([Solarize()], p=0.2) on view 2 only
            flip_p=0.5,  # L.269/282
            **TV,
        )


def test_moco_v3_vit_crop():
    # moco-v3 CONFIG.md (ViT-S/B) leaves --crop-min at main_moco.py L.117's default 0.08
    assert moco.view_recipe(224, False, "v3", moco.V3_VIT["crop_min"])[0].scale == (0.08, 1.0)


@pytest.mark.parametrize("recipe", ["imagenet", "small"])
def test_byol_recipe(recipe):
    size, small = (224, False) if recipe == "imagenet" else (32, True)
    view1, view2 = byol.view_recipe(size, small, byol.RECIPES[recipe]["crop_min"])  # as main() passes --crop-min
    # deepmind-research byol/utils/augmentations.py (d8df415) L.27-66; crop in utils/dataset.py
    for view, blur, solarize in ((view1, 1.0, 0.0), (view2, 0.1, 0.2)):
        check(
            view,
            size=size,
            scale=(0.08, 1.0),  # dataset.py L.210: uniform(0.08, 1.0) * area
            ratio=(3 / 4, 4 / 3),  # dataset.py L.212: log(3 / 4), log(4 / 3)
            flip_p=0.5,  # L.29 random_flip=True, L.352: uniform <= 0.5
            jitter=(0.4, 0.4, 0.2, 0.1),  # L.33-36 / L.56-59
            jitter_p=0.8,  # L.38 / L.60: color_jitter_prob=0.8
            gray_p=0.2,  # L.40 / L.61: to_grayscale_prob=0.2, after the jitter (L.344-346)
            gray_first=False,
            blur_p=0.0 if small else blur,  # L.44: apply_prob=1.0 (view 1), L.64: 0.1 (view 2); small: solo-learn's
            blur_sigma=(0.1, 2.0),  # L.48-49 / L.64: sigma_min=0.1, sigma_max=2.0
            solarize_p=solarize,  # L.50: 0.0 (view 1), L.65: 0.2 (view 2)
            color="tf",  # L.243-258: contrast per channel, saturation and hue in HSV (TF's kernels)
            brightness="add",  # L.239-240: x + delta; L.262: delta ~ U[-max_delta, max_delta]
        )


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("recipe", ["imagenet", "small"])
def test_simclr_recipe(version, recipe):
    size, small = (224, False) if recipe == "imagenet" else (32, True)
    strength = simclr.RECIPES[version][recipe]["color_strength"]  # as main() passes --color-strength
    view1, view2 = simclr.view_recipe(size, small, version, strength)
    assert view1 == view2
    # google-research/simclr data_util.py: v1 at tag 1.0, v2 at 383d414 (impl='simclrv2'); line numbers of 1.0
    s = 0.5 if small else 1.0  # run.py: color_jitter_strength 1.0; README L.43 (CIFAR): --color_jitter_strength=0.5
    check(
        view1,
        size=size,
        scale=(0.08, 1.0),  # L.292: area_range=(0.08, 1.0)
        ratio=(3 / 4, 4 / 3),  # L.291: aspect_ratio_range=(3. / 4 * aspect_ratio, 4. / 3. * aspect_ratio)
        flip_p=0.5,  # L.434: tf.image.random_flip_left_right
        jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),  # L.61-64: 0.8 * strength (x3), 0.2 * strength
        jitter_p=0.8,  # L.361: random_apply(color_jitter_t, p=0.8)
        gray_p=0.2,  # L.362: random_apply(to_grayscale, p=0.2), after the jitter
        gray_first=False,
        blur_p=0.0 if small else 0.5,  # L.386: blur_probability=0.5; README L.43: --use_blur=False
        blur_sigma=(0.1, 2.0),  # L.380: tf.random.uniform([], 0.1, 2.0)
        solarize_p=0.0,
        color="tf",  # L.130, L.135, L.141: tf.image.random_contrast / random_saturation / random_hue
        # v1: L.125 tf.image.random_brightness (x + delta); v2: data_util.py@383d414 L.43-46 image * factor
        brightness="add" if version == "v1" else "multiply",
    )


METHOD_VIEWS = {
    "simsiam": simsiam.view_recipe(20, False),
    "moco v1": moco.view_recipe(20, False, "v1", 0.2),
    "moco v2": moco.view_recipe(20, False, "v2", 0.2),
    "moco v3": moco.view_recipe(20, False, "v3", 0.2),
    "byol": byol.view_recipe(20, False, 0.08),
    "simclr v1": simclr.view_recipe(20, False, "v1", 1.0),
    "simclr v2": simclr.view_recipe(20, False, "v2", 1.0),
}


@pytest.mark.parametrize("name", list(METHOD_VIEWS))
def test_method_views_augment_as_their_source(name):
    """Each view a method file builds (ImageNet recipe, at 20 px), through augment, equals the per-image pipeline
    of its source's semantics."""
    x = (images(8, 24, 28, seed=3) * 255).round().to(torch.uint8)
    for k, view in enumerate(METHOD_VIEWS[name]):
        p = C.sample_view(len(x), 24, 28, view, torch.Generator().manual_seed(k))
        out = C.augment(x, view, torch.Generator().manual_seed(k))
        torch.testing.assert_close(out, reference_view(x, view, p), atol=ATOL, rtol=0)
