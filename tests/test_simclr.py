"""simclr.py: NT-Xent against the paper's equation (and the official code's self-masking), heads of v1 and v2,
lr scaling, the script end to end with exact resume for both versions, and learning on the built-in data."""

import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_it_learns, assert_resume_is_exact, assert_runs_in_bfloat16, assert_trained_run

import common as C
import simclr as S


def reference_loss(z1, z2, tau):
    """Eq. 1 over the 2N views, one anchor at a time: l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau),
    L = mean over the 2N anchors (Sec. 2.1, Alg. 1)."""
    views = [*z1, *z2]
    n = len(z1)

    def sim(a, b):
        return sum(float(x) * float(y) for x, y in zip(a, b)) / math.sqrt(
            sum(float(x) ** 2 for x in a) * sum(float(y) ** 2 for y in b)
        )

    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)  # the other view of the same image
        denom = sum(math.exp(sim(views[i], views[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(views[i], views[j]) / tau) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_loss_is_twice_the_papers_mean_as_in_objective_py(tau):
    """objective.py sums the two views' means (loss_a + loss_b): exactly 2x the paper's mean over 2N anchors.
    The reference leaves out k = i, which the official code does by subtracting 1e9 from the self-logits."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    assert S.simclr_loss(z1, z2, tau).item() == pytest.approx(2 * reference_loss(z1, z2, tau), rel=1e-9)


@pytest.mark.parametrize("layers", [2, 3])
def test_heads_follow_the_official_code(layers):
    """v1 2 layers, v2 3; no dense biases (BN follows), and the last BN has a scale but its offset stays 0."""
    model = S.SimCLR(C.TinyNet(width=8), proj_layers=layers, dim=16)
    linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    assert len(linears) == layers and all(m.bias is None for m in linears)
    assert linears[0].out_features == 64 and linears[-1].out_features == 16  # hidden width = backbone output
    last_bn = model.projector[-1]
    assert isinstance(last_bn, nn.BatchNorm1d) and last_bn.weight.requires_grad and not last_bn.bias.requires_grad
    g = torch.Generator().manual_seed(0)
    z1, z2 = model(torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g))
    S.simclr_loss(z1, z2, 0.5).backward()
    assert last_bn.bias.grad is None and torch.equal(last_bn.bias, torch.zeros(16))


def test_recipes_scale_the_lr_as_the_papers():
    assert S.RECIPES["v1"]["imagenet"]["lr_scaling"] == "linear" and S.RECIPES["v1"]["imagenet"]["lr"] == 0.3
    v2 = S.RECIPES["v2"]["imagenet"]
    assert v2["lr_scaling"] == "sqrt" and v2["lr"] * math.sqrt(4096) == pytest.approx(0.3 * 4096 / 256)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_end_to_end_and_resume_is_exact(tmp_path, version):
    flags = f"--version {version} --batch-size 64 --epochs 2 --dim 32 --eval-every -1"
    run = assert_resume_is_exact("simclr.py", flags, tmp_path, n=4, k=2)
    assert_trained_run(run, steps=4)
    assert_runs_in_bfloat16("simclr.py", flags, tmp_path, run)
    if version == "v2":  # the first head layer, where v2 fine-tunes from
        head = nn.Sequential(nn.Linear(256, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU())
        head.load_state_dict(torch.load(run / "head1.pt", weights_only=True))
    else:
        assert not (run / "head1.pt").exists()


def test_it_learns(tmp_path):
    """v2, 100 steps (about 40 s): kNN 42.2% against 38.8% for the random-init network with its batch-norm
    statistics estimated on the data (conftest.random_init_knn; 33.0% with PyTorch's initial statistics), seed 0."""
    assert_it_learns("simclr.py", "--version v2 --max-steps 100", tmp_path, margin=0.02)
