"""common.py: kNN, linear probe, LARS, schedule, backbones and their export, data readers, checkpoints."""

import gzip
import math
import pickle
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common as C


def test_knn_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    train_y, test_y = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (50,), generator=g)
    train_y[:30] = -1  # unlabeled images never vote
    k, t = 20, 0.07
    correct = 0
    for i in range(50):
        scores = [0.0] * 5
        sims = []
        for j in range(300):
            if train_y[j] >= 0:
                a, b = test_f[i], train_f[j]
                sims.append((float(a @ b) / (float(a.norm()) * float(b.norm())), int(train_y[j])))
        for s, label in sorted(sims, reverse=True)[:k]:
            scores[label] += torch.exp(torch.tensor(s / t)).item()
        correct += max(range(5), key=lambda c: scores[c]) == int(test_y[i])
    assert C.knn_top1(train_f, train_y, test_f, test_y, 5, k, t) == pytest.approx(correct / 50)


def logistic_regression_by_lbfgs(train_f, train_y, test_f, test_y, num_classes):
    """Reference: multinomial logistic regression (no penalty) fitted to convergence, full batch, L-BFGS in
    float64; its test accuracy. Standardising the features does not change the optimum's predictions."""
    x, xt = train_f.double(), test_f.double()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    mean, std = x.mean(0), x.std(0)
    x, xt = (x - mean) / std, (xt - mean) / std
    opt = torch.optim.LBFGS([w, b], max_iter=1000, tolerance_grad=1e-9, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, train_y)
        loss.backward()
        return loss

    opt.step(closure)
    closure()
    assert max(w.grad.abs().max().item(), b.grad.abs().max().item()) < 1e-4  # converged
    return ((xt @ w + b).argmax(1) == test_y).double().mean().item()


def test_linear_probe_reaches_the_optimum_of_logistic_regression_on_overlapping_classes():
    """Ten Gaussian classes in 32 dims that overlap (the best linear classifier gets about 73%), with correlated
    noise (so one step along the class means is far from the optimum) and features on scales from 0.1 to 10
    (which the probe's standardisation removes): the probe's top-1 is within a point of the reference's."""
    g = torch.Generator().manual_seed(0)
    d, k, n = 32, 10, 5000
    centres = 0.8 * torch.randn(k, d, generator=g)
    rotation = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    y = torch.randint(0, k, (2 * n,), generator=g)
    noise = (torch.randn(2 * n, d, generator=g) * torch.logspace(0, 1.5, d).sqrt()) @ rotation  # variances 1..32
    f = (centres[y] + noise) * torch.logspace(-1, 1, d) + 5
    reference = logistic_regression_by_lbfgs(f[:n], y[:n], f[n:], y[n:], k)
    assert 0.5 < reference < 0.85  # overlapping classes, far above chance (0.1)
    assert C.linear_probe(f[:n], y[:n], f[n:], y[n:], k) == pytest.approx(reference, abs=0.01)


def test_lars_adapts_weights_and_skips_biases_and_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model(torch.randn(8, 4)).pow(2).sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    lr, wd, eta = 0.5, 0.1, 0.001
    opt = C.LARS(C.param_groups(model, wd), lr=lr, eta=eta)
    assert {p.ndim for p in opt.param_groups[1]["params"]} == {1}  # bias, BN weight, BN bias excluded
    opt.step()
    for name, p in model.named_parameters():
        w, g = before[name], grads[name]
        if p.ndim > 1:  # weight decay, then the trust ratio eta * ||w|| / ||g + wd w||
            g = g + wd * w
            g = g * eta * w.norm() / g.norm()
        torch.testing.assert_close(p.detach(), w - lr * g)  # first step: momentum buffer = update


def test_cosine_schedule_values():
    assert C.cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert C.cosine_lr(9, 100, 1.0, warmup=10) == pytest.approx(1.0)  # last warmup step reaches the base lr
    assert C.cosine_lr(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert C.cosine_lr(55, 100, 1.0, warmup=10) == pytest.approx(0.5)  # half-way through the cosine
    assert C.cosine_lr(100, 100, 1.0, warmup=10, final=0.01) == pytest.approx(0.01)
    assert C.cosine_lr(99, 100, 2.0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(0.99 * math.pi)))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_exported_resnet_loads_into_torchvision_with_only_fc_missing(arch):
    ours = C.build_backbone(arch, 224, small=False).eval()
    tv = getattr(torchvision.models, arch)().eval()
    result = tv.load_state_dict(ours.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tv(x), ours(x))


def test_cifar_stem_and_state_dict_round_trip():
    for arch, small in (("resnet18", True), ("resnet34", False), ("tiny", True), ("vit_tiny", True)):
        net = C.build_backbone(arch, 32, small).eval()
        sd = net.state_dict()
        rebuilt = C.backbone_from_state_dict(sd, 32)
        rebuilt.load_state_dict(sd)  # strict: same architecture
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(rebuilt.eval()(x), net(x))
    small = C.build_backbone("resnet18", 32, small=True)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity) and small.out_dim == 512
    assert C.build_backbone("resnet18", 32, True, zero_init_residual=True).layer1[0].bn2.weight.abs().sum() == 0
    assert C.build_backbone("resnet18", 32, True, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 512)
    gn = C.build_backbone("resnet18", 32, True, norm_layer=lambda c: nn.GroupNorm(1, c))
    assert isinstance(gn.bn1, nn.GroupNorm)


def test_vit_returns_the_cls_feature_and_can_fix_its_position_embedding():
    vit = C.build_backbone("vit_tiny", 32, small=True)
    assert vit.patch_embed.kernel_size == (4, 4) and vit(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    fixed = C.ViT(32, 4, 64, 2, 2, sincos_pos=True)
    assert not fixed.pos_embed.requires_grad  # its values: tests/test_models_optim.py, against literals


def test_builtin_data_is_deterministic_balanced_and_not_readable_from_colour():
    x, y = C.make_builtin(2000, seed=7)
    x2, y2 = C.make_builtin(2000, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.dtype == torch.uint8 and x.shape == (2000, 3, 32, 32)
    assert torch.bincount(y).tolist() == [200] * 10
    # A nearest-class-mean classifier on the mean colour of each image is near chance.
    colour = x.float().mean(dim=(2, 3))
    means = torch.stack([colour[y == c].mean(0) for c in range(10)])
    assert (torch.cdist(colour, means).argmin(1) == y).float().mean() < 0.25


def _pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def test_readers_of_the_on_disk_formats(tmp_path):
    """Tiny files in torchvision's CIFAR / STL-10 layouts and the Fashion-MNIST IDX format (no download)."""
    import numpy as np

    rng = np.random.default_rng(0)
    c10 = tmp_path / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _pickle(c10 / name, {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]})
    d = C.load_data("cifar10", tmp_path)
    assert d.train.images.shape == (20, 3, 32, 32) and len(d.test) == 4 and d.num_classes == 10
    raw = pickle.loads((c10 / "data_batch_1").read_bytes())[b"data"]
    assert torch.equal(d.train.images[0], torch.as_tensor(raw[0]).reshape(3, 32, 32))

    c100 = tmp_path / "cifar-100-python"
    for name in ("train", "test"):
        _pickle(c100 / name, {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"fine_labels": [0, 50, 99]})
    assert C.load_data("cifar100", tmp_path).num_classes == 100

    stl = tmp_path / "stl10_binary"
    stl.mkdir()
    img = rng.integers(0, 256, (2, 3, 96, 96), dtype=np.uint8)
    for name in ("train_X.bin", "test_X.bin", "unlabeled_X.bin"):
        (stl / name).write_bytes(img.transpose(0, 1, 3, 2).tobytes())  # column-major, as STL-10 stores it
    for name in ("train_y.bin", "test_y.bin"):
        (stl / name).write_bytes(bytes([1, 10]))
    d = C.load_data("stl10", tmp_path)
    assert torch.equal(d.bank.images, torch.as_tensor(img)) and d.bank.labels.tolist() == [0, 9]
    assert len(d.train) == 4 and d.train.labels.tolist() == [0, 9, -1, -1]  # SSL on train + unlabeled

    fm = tmp_path / "fashion-mnist"
    fm.mkdir()
    for prefix, n in (("train", 6), ("t10k", 2)):
        pix = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (fm / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">4I", 2051, n, 28, 28) + pix.tobytes())
        )
        (fm / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">2I", 2049, n) + bytes(range(n)))
        )
    d = C.load_data("fashion-mnist", tmp_path)
    assert d.train.images.shape == (6, 3, 28, 28) and d.test.labels.tolist() == [0, 1] and d.image_size == 28


def test_image_folder_scan(image_folder):
    d = C.load_data(str(image_folder(n_train=6, side=40, classes=3, n_val=3)))
    assert (len(d.train), len(d.test), d.num_classes, d.image_size) == (6, 3, 3, 40)
    assert d.train.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_save_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    C.save_atomic({"step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        C.save_atomic({"step": 2, "bad": lambda: 0}, path)  # a lambda cannot be pickled
    assert torch.load(path)["step"] == 1 and not list(tmp_path.glob("*.tmp"))
