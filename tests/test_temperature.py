"""The temperature claims about InfoNCE / NT-Xent, as property tests on random similarities (200 random cases
each, seeded), run through the project's own MoCo loss (moco.queue_loss: logits [q.k+, q.queue] / tau).

With the positive's similarity s_p, the negatives' s_n and d_k = s_k - s_p over all candidates (d_p = 0):
    L(tau) = log sum_k exp(d_k / tau),    dL/d(1/tau) = E_softmax[d]  (increasing in 1/tau: L is convex in 1/tau)
So lowering tau lowers the loss exactly when the softmax-weighted mean of d is negative, and raises it when it is
positive. If the positive is the most similar candidate every d_k <= 0, and lowering tau always lowers the loss
(claim 1). If some negative beats the positive, E_softmax[d] -> max d > 0 as tau -> 0, so lowering tau raises the
loss once tau is small enough (claim 2), but not for every tau: at a large tau, many dissimilar negatives can
outweigh one hard one; test_claim_2_does_not_hold_at_every_temperature shows such a case. The gradient on
negative n is softmax_n / tau, so its share among the negatives is a softmax over the negatives alone, whose
largest entry grows as tau falls (claim 3): to 1 (the loss becomes the hardest-negative margin
(max_n s_n - s_p) / tau) as tau -> 0, to uniform as tau -> infinity."""

import math

import torch
import torch.nn.functional as F

import moco as M

CASES = 200


def similarities(gen, n_neg, hard):
    """q, k, queue on the unit sphere with similarity s_p to the key and s_n to each queue row: `hard` makes
    some negative more similar than the positive; else the positive beats every negative."""
    while True:
        s = torch.rand(n_neg + 1, generator=gen, dtype=torch.float64) * 2 - 1
        pos, neg = s[0], s[1:]
        if (neg.max() > pos) == hard and (neg.max() - pos).abs() > 1e-3:
            return pos, neg


def loss_at(pos, neg, tau, grad=False):
    """moco.queue_loss on vectors built to have exactly these similarities: q = e0, k and queue rows with
    first coordinate s and the rest orthogonal padding."""
    sims = torch.cat([pos[None], neg])
    rest = torch.sqrt(1 - sims**2)
    vecs = torch.zeros(len(sims), len(sims) + 1, dtype=torch.float64)
    vecs[:, 0], vecs[torch.arange(len(sims)), torch.arange(len(sims)) + 1] = sims, rest
    q = torch.zeros(1, len(sims) + 1, dtype=torch.float64)
    q[0, 0] = 1
    queue = vecs[1:].clone().requires_grad_(grad)
    loss = M.queue_loss(q, vecs[:1], queue, tau)
    if not grad:
        return loss.item()
    loss.backward()
    return loss.item(), queue.grad.norm(dim=1)  # the gradient that reaches each negative


def test_queue_loss_matches_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        pos, neg = similarities(gen, 7, hard=bool(torch.rand(1, generator=gen) < 0.5))
        tau = 0.05 + torch.rand(1, generator=gen).item()
        expected = -pos / tau + torch.logsumexp(torch.cat([pos[None], neg]) / tau, 0)
        assert math.isclose(loss_at(pos, neg, tau), expected.item(), rel_tol=1e-9, abs_tol=1e-9)


def test_claim_1_positive_most_similar_lowering_tau_lowers_the_loss():
    gen = torch.Generator().manual_seed(1)
    for _ in range(CASES):
        pos, neg = similarities(gen, int(torch.randint(1, 64, (1,), generator=gen)), hard=False)
        taus = sorted((0.02 + 2 * torch.rand(2, generator=gen, dtype=torch.float64)).tolist())
        assert loss_at(pos, neg, taus[0]) < loss_at(pos, neg, taus[1]), (pos, neg, taus)


def test_claim_2_a_harder_negative_lowering_tau_raises_the_loss():
    """Holds wherever the softmax-weighted mean similarity exceeds the positive's, which every case reaches
    below some tau*; checked on each side of that condition, and at small tau."""
    gen, exercised = torch.Generator().manual_seed(2), 0
    for _ in range(CASES):
        pos, neg = similarities(gen, int(torch.randint(1, 64, (1,), generator=gen)), hard=True)
        tau_hi = 0.02 + 2 * torch.rand(1, generator=gen, dtype=torch.float64).item()
        tau_lo = tau_hi * 0.9
        weights = F.softmax(torch.cat([pos[None], neg]) / tau_hi, 0)
        weighted_mean_above_pos = (weights * (torch.cat([pos[None], neg]) - pos)).sum() > 0
        if weighted_mean_above_pos:  # then E[d] > 0 on all of (0, tau_hi] (E[d] grows as tau falls)
            assert loss_at(pos, neg, tau_lo) > loss_at(pos, neg, tau_hi)
            exercised += 1
        # and below tau* = the margin's scale the claim always holds
        margin = (neg.max() - pos).item()
        small = margin / (10 * math.log(len(neg) + 1) + 10)
        assert loss_at(pos, neg, small * 0.5) > loss_at(pos, neg, small)
    assert exercised > CASES // 4, exercised  # the first check ran on enough cases


def test_claim_2_does_not_hold_at_every_temperature():
    """One hard negative (0.3 above the positive) among 50 far ones: at tau = 5 lowering tau still lowers the
    loss, at tau = 0.05 it raises it. The claim is about the low-temperature regime."""
    pos = torch.tensor(0.0, dtype=torch.float64)
    neg = torch.cat([torch.tensor([0.3]), torch.full((50,), -0.9)]).double()
    assert loss_at(pos, neg, 4.5) < loss_at(pos, neg, 5.0)
    assert loss_at(pos, neg, 0.045) > loss_at(pos, neg, 0.05)


def test_claim_3_hardest_negative_share_of_the_gradient_grows_as_tau_falls():
    gen = torch.Generator().manual_seed(3)
    for _ in range(CASES):
        pos, neg = similarities(gen, int(torch.randint(2, 64, (1,), generator=gen)), hard=bool(torch.rand(1) < 0.5))
        if (neg.max() - neg.topk(2).values[1]) < 1e-3:
            continue  # a tie for hardest
        taus = sorted((0.02 + 2 * torch.rand(2, generator=gen, dtype=torch.float64)).tolist())
        shares = []
        for tau in taus:
            _, g = loss_at(pos, neg, tau, grad=True)
            shares.append((g[neg.argmax()] / g.sum()).item())
        assert shares[0] > shares[1], (taus, shares)


def test_claim_3_limits_hardest_negative_margin_and_uniform_weights():
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        pos, neg = similarities(gen, 16, hard=True)
        if (neg.max() - neg.topk(2).values[1]) < 0.01:
            continue  # a near tie for hardest: the limit needs a smaller tau than float64 resolves
        loss, g = loss_at(pos, neg, 1e-4, grad=True)
        assert (g[neg.argmax()] / g.sum()).item() > 0.999
        assert math.isclose(loss * 1e-4, (neg.max() - pos).item(), rel_tol=1e-2, abs_tol=1e-4)
        _, g = loss_at(pos, neg, 1e4, grad=True)
        torch.testing.assert_close(g / g.sum(), torch.full_like(g, 1 / len(g)), rtol=1e-3, atol=1e-6)
