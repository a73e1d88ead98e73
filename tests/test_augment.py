"""Each batched augmentation primitive equals torchvision's functional op at the same fixed parameters, and the
random parameters really differ per image within a batch."""

import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

import common as C

ATOL = 2e-5


@pytest.fixture
def images():
    return torch.rand(6, 3, 24, 20, generator=torch.Generator().manual_seed(0))


def per_image(fn, x, *params):
    return torch.stack([fn(x[i], *(p[i].item() if torch.is_tensor(p) else p for p in params)) for i in range(len(x))])


def test_resized_crop_matches_torchvision(images):
    # Boxes that shrink (antialiasing matters), enlarge, keep the size, and touch every border; some mirrored.
    top = torch.tensor([0, 3, 10, 0, 5, 23])
    left = torch.tensor([0, 2, 0, 13, 7, 19])
    h = torch.tensor([24, 7, 14, 24, 3, 1])
    w = torch.tensor([20, 11, 20, 7, 9, 1])
    flip = torch.tensor([False, True, False, True, True, False])
    for size in (16, 32):
        out = C.resized_crop(images, top, left, h, w, size, flip)
        for i in range(len(images)):
            ref = TF.resized_crop(
                images[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [size, size], antialias=True
            )
            ref = TF.horizontal_flip(ref) if flip[i] else ref
            torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_colour_ops_match_torchvision(images, name):
    ours, ref = {
        "brightness": (C.adjust_brightness, TF.adjust_brightness),
        "contrast": (C.adjust_contrast, TF.adjust_contrast),
        "saturation": (C.adjust_saturation, TF.adjust_saturation),
        "hue": (C.adjust_hue, TF.adjust_hue),
    }[name]
    f = torch.tensor([-0.5, -0.1, 0.0, 0.03, 0.25, 0.5]) if name == "hue" else torch.tensor([0, 0.3, 0.6, 1, 1.4, 2.0])
    torch.testing.assert_close(ours(images, f), per_image(ref, images, f), atol=ATOL, rtol=0)


def test_grayscale_and_solarize_match_torchvision(images):
    torch.testing.assert_close(C.grayscale(images), per_image(TF.rgb_to_grayscale, images), atol=ATOL, rtol=0)
    apply = torch.tensor([True, False, True, False, True, True])
    ref = torch.stack([TF.solarize(im, 0.5) if a else im for im, a in zip(images, apply)])
    torch.testing.assert_close(C.solarize(images, apply), ref, atol=0, rtol=0)


@pytest.mark.parametrize("kernel", [3, 5, 9])
def test_gaussian_blur_matches_torchvision(images, kernel):
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 0.0])  # 0: not blurred
    ref = torch.stack(
        [TF.gaussian_blur(im, [kernel, kernel], [s.item()] * 2) if s > 0 else im for im, s in zip(images, sigma)]
    )
    torch.testing.assert_close(C.gaussian_blur(images, sigma, kernel), ref, atol=ATOL, rtol=0)


def test_color_jitter_is_torchvisions_per_image(images):
    """Each image gets ColorJitter with its own factors and its own order of the four ops."""
    view = C.ViewAug(24, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8)
    params, order = C.sample_jitter(len(images), view, torch.Generator().manual_seed(3))
    out = C.apply_jitter(images, params, order, view)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(len(images)):
        ref = images[i]
        for op in order[i].tolist():
            ref = ops[op](ref, params[op][i].item()) if op >= 0 else ref  # -1: jitter not applied
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)
    assert len({tuple(o) for o in order.tolist()}) > 1, "the op order should vary across images"


def test_sample_crops_follow_torchvisions_rules():
    g = torch.Generator().manual_seed(0)
    top, left, h, w = C.sample_crops(20_000, 40, 60, (0.2, 1.0), (3 / 4, 4 / 3), g)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 60).all()
    area = (h * w).float() / (40 * 60)
    assert area.min() >= 0.18 and area.max() <= 1.0
    # The same distribution as torchvision's RandomResizedCrop.get_params (mean area and mean position).
    torch.manual_seed(0)
    ref = torch.tensor(
        [T.RandomResizedCrop.get_params(torch.zeros(3, 40, 60), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(5_000)]
    ).float()
    ours = torch.stack([top, left, h, w], 1).float()
    torch.testing.assert_close(ours.mean(0), ref.mean(0), atol=0.6, rtol=0.03)
    # No try fits (a tall image and ratios that need a wide box): the centre crop clamped to the ratio.
    top, left, h, w = C.sample_crops(4, 100, 10, (0.9, 1.0), (3.0, 4.0), g)
    assert w.tolist() == [10] * 4 and h.tolist() == [round(10 / 3)] * 4 and top.tolist() == [(100 - 3) // 2] * 4


def test_parameters_differ_per_image_within_a_batch():
    """One image repeated 32 times: every copy gets its own crop, flip, jitter, grayscale, blur and solarize."""
    x = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    x = x.expand(32, -1, -1, -1)
    view = C.ViewAug(32, scale=(0.2, 1.0), blur_p=0.5, solarize_p=0.2)
    out = C.augment(x, view, torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(32) * 1e9).min() > 1e-3, "two copies got the same augmentation"
    # Colour alone (no crop): still a different result per copy, and about p of them jittered.
    colour = C.augment(x, C.ViewAug(32, flip_p=0, gray_p=0), torch.Generator().manual_seed(0), crop=False)
    changed = (colour - x.float() / 255).flatten(1).abs().amax(1) > 1e-6
    assert 0.5 <= changed.float().mean() <= 1.0
    params, order = C.sample_jitter(10_000, C.ViewAug(32), torch.Generator().manual_seed(0))
    assert math.isclose((params[0] != 1).float().mean().item(), 0.8, abs_tol=0.02)
    assert torch.equal(order[:, 0] >= 0, params[0] != 1), "the identity exactly where the jitter is not applied"


def test_augment_is_reproducible_from_the_generator_state():
    x = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    view = C.ViewAug(32, blur_p=0.5, solarize_p=0.2)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a = C.augment(x, view, g)
    g.set_state(state)
    assert torch.equal(a, C.augment(x, view, g))


SUBSET_VIEWS = {
    "torchvision": C.ViewAug(20, scale=(0.2, 1.0), jitter_p=0.8, gray_p=0.4, blur_p=0.5, solarize_p=0.4),
    "gray_first": C.ViewAug(20, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.5, gray_first=True),
    "tf_multiply": C.ViewAug(20, jitter=(0.8, 0.8, 0.8, 0.2), gray_p=0.4, blur_p=0.5, solarize_p=0.4, color="tf"),
    "tf_add": C.ViewAug(20, jitter=(0.8,) * 3 + (0.2,), gray_p=0.4, blur_p=0.5, color="tf", brightness="add"),
}


@pytest.mark.parametrize("name", list(SUBSET_VIEWS))
def test_subset_ops_equal_the_masked_ops_image_for_image(name, monkeypatch):
    """On the CPU every colour op runs on the images it applies to only (gather, apply, scatter back); on CUDA the
    masked form (every image, result kept by torch.where). Same draws -> bitwise the same images, with and without
    the crop, and the caller's batch is left as it was."""
    view = SUBSET_VIEWS[name]
    x = (torch.rand(24, 3, 26, 30, generator=torch.Generator().manual_seed(2)) * 255).round().to(torch.uint8)
    for crop in (True, False):
        subset = C.augment(x, view, torch.Generator().manual_seed(7), crop=crop)
        with monkeypatch.context() as m:
            m.setattr(C, "_by_subset", lambda x: False)
            masked = C.augment(x, view, torch.Generator().manual_seed(7), crop=crop)
        assert torch.equal(subset, masked), (subset - masked).abs().amax()
    y = torch.rand(8, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    before = y.clone()
    C.apply_view(y, view, C.sample_view(8, 20, 20, view, torch.Generator().manual_seed(1), crop=False))
    assert torch.equal(y, before), "apply_view wrote into its input"


@pytest.mark.parametrize("name", list(SUBSET_VIEWS))
def test_augment_in_chunks_equals_the_whole_batch(name, monkeypatch):
    """On the CPU `augment` applies the drawn parameters to chunks of images that fit in the cache: chunks of 5
    images (the last one short) give bitwise the images of one pass over the whole batch, crop or not."""
    view = SUBSET_VIEWS[name]
    x = (torch.rand(23, 3, 26, 30, generator=torch.Generator().manual_seed(2)) * 255).round().to(torch.uint8)
    for crop in (True, False):
        whole = C.augment(x, view, torch.Generator().manual_seed(7), crop=crop)
        monkeypatch.setattr(C, "_CHUNK_BYTES", 5 * 4 * x[0].numel())
        chunks = C.augment(x, view, torch.Generator().manual_seed(7), crop=crop)
        monkeypatch.undo()
        assert torch.equal(whole, chunks), (whole - chunks).abs().amax()


def test_each_colour_op_sees_only_the_images_it_applies_to(monkeypatch):
    """On the CPU the hue rotation runs once per jittered image (at that image's hue position), the blur once per
    blurred image, grayscale once per greyed image: the work of skipped images is not done. On CUDA the masked
    form is chosen (a data-dependent subset would cost a host sync)."""

    class Cuda:
        device = torch.device("cuda")

    assert C._by_subset(torch.zeros(1)) and not C._by_subset(Cuda())
    seen = {"hue": 0, "blur": 0, "gray": 0}
    for name, fn in (("hue", "adjust_hue"), ("blur", "gaussian_blur"), ("gray", "grayscale")):
        original = getattr(C, fn)

        def counting(x, *args, name=name, original=original):
            seen[name] += len(x)
            return original(x, *args)

        monkeypatch.setattr(C, fn, counting)
    view = C.ViewAug(20, jitter_p=0.8, gray_p=0.3, blur_p=0.5)
    x = (torch.rand(32, 3, 20, 20, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    p = C.sample_view(32, 20, 20, view, torch.Generator().manual_seed(4), crop=False)
    C.augment(x, view, torch.Generator().manual_seed(4), crop=False)
    jittered = int((p["jitter"][1][:, 0] >= 0).sum())
    gray_calls = jittered * 2  # contrast and saturation each take the luma of the images they adjust
    assert seen == {"hue": jittered, "blur": int((p["blur"] > 0).sum()), "gray": gray_calls + int(p["gray"].sum())}
    assert 0 < jittered < 32 and 0 < seen["blur"] < 32
