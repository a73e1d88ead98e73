"""cpc.py: the patch grid's geometry and the v2 patch augmentation, the context network's causality (and why v2
needs LayerNorm), InfoNCE against a slow reference written from the papers, torchrun with 2 processes against
one process, the script end to end with exact resume, and learning on the built-in data."""

import math

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import assert_resume_is_exact, builtin_data, first_loss, read_metrics, run_on_two_ranks, run_script

import common as C
import cpc as P


def test_patch_grid_geometry():
    """ImageNet 64 at 32 of 256, small images 8 at 4 of 32, STL-10 16 at 8 of 64: a 7 x 7 grid each, patch (i, j)
    the pixels [i*stride, i*stride + patch) x [j*stride, j*stride + patch), row i counted from the top."""
    g = torch.Generator().manual_seed(0)
    for side, patch, stride in [(256, 64, 32), (32, 8, 4), (64, 16, 8)]:
        x = torch.randn(2, 3, side, side, generator=g)
        grid = P.patch_grid(x, patch, stride)
        assert grid.shape == (2, 7, 7, 3, patch, patch)
        for i, j in [(0, 0), (0, 6), (6, 0), (3, 5), (6, 6)]:
            assert torch.equal(grid[:, i, j], x[:, :, i * stride : i * stride + patch, j * stride : j * stride + patch])


def test_grid_encoder_is_the_mean_of_the_patch_latents():
    torch.manual_seed(0)
    backbone = C.TinyNet(width=4).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    z = torch.stack([backbone(x[:, :, 4 * i : 4 * i + 8, 4 * j : 4 * j + 8]) for i in range(7) for j in range(7)], 1)
    torch.testing.assert_close(P.GridEncoder(backbone, 8, 4)(x), z.mean(1))


def test_patch_augmentation_drops_colours_flips_and_crops_each_patch():
    """Each patch keeps one colour channel, a (p - p/16)-side window of its pixels (padded back at the centre), and
    is mirrored or not, each drawn per patch: on a patch of column indices every outcome shows."""
    m, p = 400, 16
    cols = torch.arange(1.0, p + 1).expand(m, 3, p, p)  # value = column + 1: a mirror shows
    out = P.augment_patches(cols, torch.Generator().manual_seed(0))
    kept = out.abs().sum((2, 3)) > 0  # (m, 3)
    assert torch.equal(kept.sum(1), torch.ones(m, dtype=torch.long))  # exactly one channel per patch
    assert kept.any(0).all()  # every channel is kept somewhere
    plane = out.sum(1)  # (m, p, p): the kept channel
    side = p - p // 16
    rows, cols_on = (plane != 0).any(2), (plane != 0).any(1)
    assert torch.equal(rows.sum(1), torch.full((m,), side)) and torch.equal(cols_on.sum(1), torch.full((m,), side))
    off = (p - side) // 2
    assert rows[:, off : off + side].all() and cols_on[:, off : off + side].all()  # padded back at the centre
    first = plane[torch.arange(m), rows.float().argmax(1)]  # a row inside each window, (m, p)
    inside = (first[:, 1:] != 0) & (first[:, :-1] != 0)  # neighbouring pixels both in the window
    steps = torch.where(inside, first.diff(dim=1), torch.zeros_like(first[:, 1:]))  # +-1 inside, 0 outside
    ascending, descending = (steps >= 0).all(1), (steps <= 0).all(1)
    assert torch.equal(ascending ^ descending, torch.ones(m, dtype=torch.bool))  # mirrored or not, as a whole
    assert 0.4 < descending.float().mean() < 0.6  # about half the patches mirrored
    assert set(first[ascending, off].tolist()) == set(range(1, p - side + 2))  # every window position is drawn


def test_v1_patch_augmentation_only_crops_a_window_and_pads_it_back_centred():
    """v1 Sec. 3.2: each patch is a random (p - p/16)-side window of itself, every channel, unmirrored, padded back
    at the centre, so its content moves ("spatially jitters", v2 Sec. 4.1) by every shift the window allows (colour
    and flip are v1's image-level greyscale and flip, in view_recipe)."""
    m, p = 200, 32
    side = p - p // 16
    off = (p - side) // 2
    x = torch.arange(1.0, p * p + 1).view(p, p).expand(m, 3, p, p)  # pixel (y, x) holds y * p + x + 1
    out = P.augment_patches(x, torch.Generator().manual_seed(0), "v1")
    window = torch.zeros(p, p, dtype=torch.bool)
    window[off : off + side, off : off + side] = True
    assert torch.equal(out != 0, window.expand(m, 3, p, p))  # every channel kept, the window at the centre
    moved = (out - x)[:, :, off : off + side, off : off + side]  # dy * p + dx, one shift per patch
    assert torch.equal(moved, moved[:, :1, :1, :1].expand_as(moved))  # a pure translation, no colour drop/mirror
    shifts = {divmod(int(d) + off * (p + 1), p) for d in moved[:, 0, 0, 0]}  # (dy + off, dx + off)
    assert shifts == {(i, j) for i in range(p - side + 1) for j in range(p - side + 1)}  # every shift drawn
    v1, v2 = P.view_recipe(32, True, "v1")[0], P.view_recipe(32, True, "v2")[0]
    assert (v1.flip_p, v1.gray_p, v2.flip_p, v2.gray_p) == (0.5, 1.0, 0.0, 0.0)


def test_context_network_is_causal():
    """c_ij depends on rows <= i only: a change in row r leaves rows i < r of the context unchanged and changes
    row r. The upward context (v2) is the mirror image: rows i > r unchanged."""
    torch.manual_seed(0)
    net = P.PixelCNN(6, hidden=5)
    z = torch.randn(2, 6, 7, 7, generator=torch.Generator().manual_seed(1))
    for r in range(7):
        z2 = z.clone()
        z2[:, :, r] += 1.0
        c, c2 = net(z), net(z2)
        assert torch.equal(c[:, :, :r], c2[:, :, :r]), r
        assert not torch.allclose(c[:, :, r], c2[:, :, r]), r


@pytest.mark.parametrize("norm", ["v1", "v2", "batchnorm"])
def test_predictions_see_only_the_patches_they_may(norm):
    """Through the whole model (encoder, context, W_k), in training mode: changing the patches of row (column) r
    leaves the down (right) predictions of rows (columns) < r and the up (left) ones of rows (columns) > r
    unchanged, with v2's LayerNorm and v1's encoder without normalisation. A BatchNorm encoder mixes every patch
    of the batch, so the change leaks into every row: why v1 has no BN and v2 LayerNorm."""

    class Args:
        arch, patch_size, version = "tiny", 8, norm

    torch.manual_seed(0)
    backbone = C.build_backbone("tiny", 8, True) if norm == "batchnorm" else P.make_backbone(Args, small=True)
    model = P.CPC(backbone, [1, 2], P.DIRECTIONS["v2"], target_dim=4, context_dim=4).train()
    patches = P.patch_grid(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), 8, 4)
    r = 4
    for axis in (1, 2):  # rows, then columns of the (N, G, G, ...) grid
        patches2 = patches.clone()
        patches2.select(axis, r).add_(1.0)  # every pixel lies in two rows of the grid: change the patches
        (preds, _), (preds2, _) = model(patches), model(patches2)
        fwd, bwd = (preds, preds2) if axis == 1 else (preds.transpose(3, 4), preds2.transpose(3, 4))
        k = 0 if axis == 1 else 4  # down k1, k2, up k1, k2, right k1, k2, left k1, k2
        before_same = torch.equal(fwd[k : k + 2, :, :, :r], bwd[k : k + 2, :, :, :r])
        after_same = torch.equal(fwd[k + 2 : k + 4, :, :, r + 1 :], bwd[k + 2 : k + 4, :, :, r + 1 :])
        assert not torch.allclose(fwd[k : k + 2, :, :, r], bwd[k : k + 2, :, :, r])
        assert before_same == after_same == (norm != "batchnorm"), axis


def reference_loss(preds, targets, offsets, steps):
    """v1 Eq. 4 / v2 App. A.2, one prediction at a time: for each direction (di, dj) (down (1, 0), up (-1, 0),
    right (0, 1), left (0, -1)) and offset k, the mean over the predictions p^k_ij of image n whose target
    (i + k di, j + k dj) lies in the grid of -log softmax over every target of the batch, at that target; summed
    over directions and offsets."""
    k_all, n, d, g, _ = preds.shape
    flat = [(b, i, j) for b in range(n) for i in range(g) for j in range(g)]
    total, m = 0.0, 0
    for di, dj in steps:
        for k in offsets:
            losses = []
            for b in range(n):
                for i in range(g):
                    for j in range(g):
                        ti, tj = i + k * di, j + k * dj
                        if not (0 <= ti < g and 0 <= tj < g):
                            continue
                        p = [float(v) for v in preds[m, b, :, i, j]]
                        scores = [sum(a * float(t) for a, t in zip(p, targets[bb, :, ii, jj])) for bb, ii, jj in flat]
                        pos = scores[flat.index((b, ti, tj))]
                        losses.append(math.log(sum(math.exp(s) for s in scores)) - pos)
            total += sum(losses) / len(losses)
            m += 1
    return total


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_infonce_matches_the_slow_reference(version):
    g = torch.Generator().manual_seed(0)
    offsets, directions = [1, 3], P.DIRECTIONS[version]
    steps = {(2, 1): (1, 0), (2, -1): (-1, 0), (3, 1): (0, 1), (3, -1): (0, -1)}
    preds = torch.randn(2 * len(directions), 3, 4, 5, 5, generator=g, dtype=torch.float64)
    targets = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    loss = P.cpc_loss(preds, targets, offsets, directions)
    ref = reference_loss(preds, targets, offsets, [steps[d] for d in directions])
    assert loss.item() == pytest.approx(ref, rel=1e-9)


def test_one_prediction_map_per_offset_and_direction_and_the_backbone_loads_into_torchvision():
    class Args:
        arch, patch_size, version = "resnet18", 8, "v2"

    model = P.CPC(P.make_backbone(Args, small=True), [3, 4, 5], P.DIRECTIONS["v2"], target_dim=8, context_dim=8)
    assert len(model.predictors) == 12 and len({id(w.weight) for w in model.predictors}) == 12
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # v2: LayerNorm only
    net = torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(1, c))
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem
    missing, unexpected = net.load_state_dict(model.backbone.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    Args.version = "v1"  # no normalisation: loads into torchvision's ResNet built with nn.Identity norms
    v1 = P.make_backbone(Args, small=True)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in v1.modules())
    net = torchvision.models.resnet18(norm_layer=lambda c: nn.Identity())
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    missing, unexpected = net.load_state_dict(v1.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_under_torchrun_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """Targets gathered WITH gradient, labels offset by rank: the loss and DDP-averaged gradients of 2 processes
    equal one process on the whole batch (tests/dist_cpc.py)."""
    import dist_cpc

    (loss, grads), (ref_loss, ref_grads) = run_on_two_ranks(dist_cpc, tmp_path), dist_cpc.single_process_reference()
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


def _loads_into_tiny_net(run_dir, version):
    norm = (lambda c: nn.GroupNorm(1, c)) if version == "v2" else (lambda c: nn.Identity())  # v1: no norm
    C.TinyNet(norm_layer=norm).load_state_dict(torch.load(run_dir / "backbone.pt", weights_only=True))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_end_to_end_and_resume_is_exact(tmp_path, version):
    """4 steps straight == 2, stop, resume, 2 (v2's patch augmentation draws from the saved augmentation RNG);
    finite losses, backbone.pt the patch encoder; bf16 autocast runs and changes the first loss a little."""
    flags = f"--version {version} --batch-size 8 --epochs 2 --eval-every -1"
    run = assert_resume_is_exact("cpc.py", flags, tmp_path, n=4, k=2)
    losses = [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    _loads_into_tiny_net(run, version)
    if version == "v2":
        bf16 = tmp_path / "bf16"
        r = run_script("cpc.py", flags, "--dtype bfloat16 --max-steps 1 --output-dir", bf16)
        assert r.returncode == 0, r.stderr[-3000:]
        assert first_loss(bf16) != first_loss(run) and first_loss(bf16) == pytest.approx(first_loss(run), rel=0.02)


def test_a_grid_too_small_for_the_offsets_is_one_error_line(tmp_path):
    r = run_script("cpc.py --patch-size 16 --max-steps 1 --output-dir", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: a 3 x 3 grid"), r.stderr[-3000:]


def random_init_knn(seed):
    """kNN top-1 of the network a CPC run with this seed starts from (main builds the backbone first after
    setup() seeds the global RNG), evaluated as cpc.py evaluates: the mean of the grid's patch latents."""

    class Args:
        arch, patch_size, version, image_size, workers, knn_k, knn_t = "tiny", 8, "v2", 32, 0, 200, 0.1

    torch.manual_seed(seed)
    encoder = P.GridEncoder(P.make_backbone(Args, small=True).to(memory_format=torch.channels_last), 8, 4)
    return C.evaluate(encoder, builtin_data(), C.Env(0, 1, 0, torch.device("cpu")), Args)["eval/knn_top1"]


def test_it_learns(tmp_path):
    """v2 on the built-in data: kNN of the trained grid encoder above the same-seed random init (seed 0 here;
    seeds 0-2 measured by hand, README)."""
    r = run_script("cpc.py --max-steps 100 --eval-every 0 --seed 0 --output-dir", tmp_path / "learn", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    trained = read_metrics(tmp_path / "learn")[-1]["eval/knn_top1"]
    assert trained > random_init_knn(0) + 0.05, (random_init_knn(0), trained)
