"""byol.py: loss against the paper's equation, the EMA target (schedule, update, no gradient), heads, the
script end to end with exact resume (target network included), and that it learns on the built-in data."""

import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_it_learns, assert_resume_is_exact, assert_runs_in_bfloat16, assert_trained_run, checkpoint

import byol as B
import common as C


def reference_loss(p1, p2, z1, z2):
    """Eq. 2 and 4, one sample at a time: l(p, z) = || p / ||p|| - z / ||z|| ||^2, both directions, batch mean."""

    def ell(p, z):
        pn, zn = math.sqrt(sum(float(a) ** 2 for a in p)), math.sqrt(sum(float(b) ** 2 for b in z))
        return sum((float(a) / pn - float(b) / zn) ** 2 for a, b in zip(p, z))

    return sum(ell(p1[i], z2[i]) + ell(p2[i], z1[i]) for i in range(len(p1))) / len(p1)


def test_loss_equals_the_papers_equation():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(4))
    assert B.byol_loss(p1, p2, z1, z2).item() == pytest.approx(reference_loss(p1, p2, z1, z2), abs=1e-12)


def small_model():
    torch.manual_seed(0)
    return B.BYOL(C.TinyNet(width=8), hidden_dim=32, dim=16)


def test_target_gets_no_gradient_and_moves_by_the_ema():
    model = small_model()
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    B.byol_loss(*model(x1, x2)).backward()
    assert all(p.grad is None for p in [*model.target_backbone.parameters(), *model.target_projector.parameters()])
    assert all(p.grad is not None for p in model.predictor.parameters())
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    online = [p.detach().clone() for p in [*model.backbone.parameters(), *model.projector.parameters()]]
    before = [p.detach().clone() for p in [*model.target_backbone.parameters(), *model.target_projector.parameters()]]
    assert any(not torch.equal(a, b) for a, b in zip(online, before))  # the step moved the online network
    tau = B.target_tau(30, 100, 0.99)
    model.update_target(tau)
    after = [*model.target_backbone.parameters(), *model.target_projector.parameters()]
    for t_new, t_old, o in zip(after, before, online):
        torch.testing.assert_close(t_new, tau * t_old + (1 - tau) * o)


def test_tau_schedule_rises_from_tau_base_to_one():
    assert B.target_tau(0, 100, 0.99) == 0.99
    assert B.target_tau(50, 100, 0.99) == pytest.approx(0.995)
    assert B.target_tau(100, 100, 0.99) == 1.0
    taus = [B.target_tau(k, 100, 0.996) for k in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))


def test_heads_follow_networks_py():
    model = small_model()
    for head in (model.projector, model.predictor):
        first, bn, _, last = head
        assert first.bias is not None and isinstance(bn, nn.BatchNorm1d) and last.bias is None
    assert model.predictor[0].in_features == model.predictor[-1].out_features == 16


def test_augmentation_is_asymmetric_and_crops_as_the_recipes_say():
    """Table 6: blur 1.0 / 0.1 and solarize 0 / 0.2 on the two views (no blur on small images); crops from 8% of
    the area in the official recipes, from 30% only in the built-in demo (the documented deviation)."""
    view1, view2 = B.view_recipe(224, small=False, crop_min=0.08)
    assert (view1.blur_p, view1.solarize_p, view2.blur_p, view2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert view1.scale == view2.scale == (0.08, 1.0) and view1.jitter == (0.4, 0.4, 0.2, 0.1)
    assert [v.blur_p for v in B.view_recipe(32, small=True, crop_min=0.08)] == [0.0, 0.0]
    assert B.RECIPES["imagenet"]["crop_min"] == B.RECIPES["small"]["crop_min"] == 0.08
    assert B.RECIPES["builtin"]["crop_min"] == 0.3


def test_end_to_end_and_resume_is_exact_including_the_target(tmp_path):
    flags = "--batch-size 64 --epochs 2 --dim 32 --hidden-dim 64 --eval-every -1"
    run = assert_resume_is_exact("byol.py", flags, tmp_path, n=4, k=2)
    assert_trained_run(run, steps=4)
    model = checkpoint(run)["model"]
    online, target = model["backbone.features.0.weight"], model["target_backbone.features.0.weight"]
    assert not torch.equal(online, target)  # the target lags behind the online network
    assert_runs_in_bfloat16("byol.py", flags, tmp_path, run)


def test_it_learns(tmp_path):
    """200 steps of the built-in demo: kNN top-1 above the random-init network with its batch-norm statistics
    estimated on the data (38.8%, seed 0; conftest.random_init_knn). At 100 steps BYOL reached 39.5%, which is
    that baseline, not learning: BYOL starts slowest of the methods here (no negatives, a lagging target); the
    README's 200-step figure is 52.3% (the demo's crops from 30% of the area: byol.py, RECIPES["builtin"]).
    No mechanism-off baseline here: at this budget a target frozen at its init (--tau-base 1.0) does nearly as
    well (seed 0: 38.4%), so the EMA update is pinned by exact one-step tests instead."""
    assert_it_learns("byol.py", "--max-steps 200", tmp_path, margin=0.06)
