"""moco.py: InfoNCE with the queue (v1/v2) and over the batch (v3) against the papers' equations, the queue's
FIFO order and wrap, the momentum encoder (schedule, update, no gradient), split BN, the shuffle undone, the
script end to end with exact resume (queue and key encoder included) for each version, a ViT run, learning."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import (
    assert_it_learns,
    assert_resume_is_exact,
    assert_runs_in_bfloat16,
    assert_trained_run,
    checkpoint,
    run_script,
)

import common as C
import moco as M


def _unit(v):
    n = math.sqrt(sum(float(x) ** 2 for x in v))
    return [float(x) / n for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def reference_queue_loss(q, k, queue, tau):
    """Eq. 1, one query at a time: -log exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_i exp(q.k_i / tau))."""
    total = 0.0
    for qi, ki in zip(q, k):
        qi, ki = _unit(qi), _unit(ki)
        pos = math.exp(_dot(qi, ki) / tau)
        total += -math.log(pos / (pos + sum(math.exp(_dot(qi, _unit(kn)) / tau) for kn in queue)))
    return total / len(q)


def reference_batch_loss(q, k, tau):
    """v3 Alg. 1 ctr(q, k): for query i the positive is key i, the negatives the other keys; x 2 tau."""
    total = 0.0
    for i, qi in enumerate(q):
        qi = _unit(qi)
        logits = [math.exp(_dot(qi, _unit(kj)) / tau) for kj in k]
        total += -math.log(logits[i] / sum(logits))
    return total / len(q) * 2 * tau


def test_losses_equal_the_papers_equations():
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(4))
    k1, k2 = F.normalize(k1, dim=1), F.normalize(k2, dim=1)  # keys come normalised from the key encoder
    queue = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=1)
    ref = reference_queue_loss(q1, k2, queue, 0.2)
    assert M.moco_loss(q1, None, None, k2, queue, 0.2).item() == pytest.approx(ref, rel=1e-9)
    sym = ref + reference_queue_loss(q2, k1, queue, 0.2)  # the demo's symmetric loss: the sum
    assert M.moco_loss(q1, q2, k1, k2, queue, 0.2).item() == pytest.approx(sym, rel=1e-9)
    v3 = reference_batch_loss(q1, k2, 1.0) + reference_batch_loss(q2, k1, 1.0)
    assert M.moco_loss(q1, q2, k1, k2, None, 1.0).item() == pytest.approx(v3, rel=1e-9)


def small_model(version="v2", queue_size=6, **kw):
    torch.manual_seed(0)
    return M.MoCo(C.TinyNet(width=8), version, dim=4, hidden_dim=16, queue_size=queue_size, **kw)


def test_queue_is_fifo_and_the_pointer_wraps():
    model = small_model(queue_size=6)
    start = model.queue.clone()
    torch.testing.assert_close(start.norm(dim=1), torch.ones(6))  # a random start of unit keys
    g = torch.Generator().manual_seed(1)
    a, b = F.normalize(torch.randn(4, 4, generator=g), dim=1), F.normalize(torch.randn(4, 4, generator=g), dim=1)
    model.enqueue(a)
    assert torch.equal(model.queue[:4], a) and torch.equal(model.queue[4:], start[4:]) and model.queue_ptr == 4
    model.enqueue(b)  # rows 4, 5 then wrap to 0, 1: the oldest keys (a[0], a[1]) go first
    assert torch.equal(model.queue[4:], b[:2]) and torch.equal(model.queue[:2], b[2:])
    assert torch.equal(model.queue[2:4], a[2:]) and model.queue_ptr == 2


def test_key_encoder_gets_no_gradient_and_moves_by_momentum():
    model = small_model("v3")
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    q1, q2, k1, k2 = model(x1, x2)
    M.moco_loss(q1, q2, k1, k2, model.queue, 0.2).backward()
    momentum = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    assert all(p.grad is None for p in momentum) and all(p.grad is not None for p in model.predictor.parameters())
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    query = [p.detach().clone() for p in [*model.backbone.parameters(), *model.projector.parameters()]]
    before = [p.detach().clone() for p in momentum]
    m = M.momentum_at(25, 100, 0.99, cos=True)
    model.update_momentum_encoder(m)
    for new, old, q in zip(momentum, before, query):
        torch.testing.assert_close(new, m * old + (1 - m) * q)


def test_schedules():
    assert M.momentum_at(0, 100, 0.99, cos=True) == 0.99 and M.momentum_at(100, 100, 0.99, cos=True) == 1.0
    assert M.momentum_at(70, 100, 0.999, cos=False) == 0.999
    assert [M.step_lr(s, 200, 1.0) for s in (0, 119, 120, 159, 160, 199)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_heads_of_each_version():
    assert isinstance(small_model("v1").projector, nn.Linear)
    v2 = small_model("v2").projector
    assert [type(m) for m in v2] == [nn.Linear, nn.ReLU, nn.Linear] and v2[0].out_features == 64
    v3 = small_model("v3")
    assert isinstance(v3.projector[-1], nn.BatchNorm1d) and not v3.projector[-1].affine  # last BN, no affine
    assert isinstance(v3.predictor[-1], nn.Linear)  # ResNet predictor: no last BN
    assert v3.queue is None and "queue" not in v3.state_dict()


def test_split_batch_norm_is_bn_per_sub_batch():
    torch.manual_seed(0)
    split, plain = M.SplitBatchNorm(3, splits=4), nn.BatchNorm2d(3)
    for bn in (split, plain):
        nn.init.uniform_(bn.weight)
        nn.init.uniform_(bn.bias)
    plain.load_state_dict(split.state_dict())
    x = torch.randn(16, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 3 + 1
    y = split(x)
    means, variances = [], []
    for j in range(4):  # sub-batch j holds images j, j + 4, j + 8, ...
        sub = nn.BatchNorm2d(3)
        sub.load_state_dict(plain.state_dict())
        torch.testing.assert_close(y[j::4], sub(x[j::4]))
        means.append(sub.running_mean)
        variances.append(sub.running_var)
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack(variances).mean(0))
    split.eval()
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), plain.eval()(x))


def test_single_process_shuffle_is_undone():
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    seen = []
    keys = M.shuffled_keys(lambda v: seen.append(v) or v * 2 + 1, x)
    assert torch.equal(keys, x * 2 + 1) and not torch.equal(seen[0], x)  # shuffled going in, in order coming out


@pytest.mark.parametrize(
    "version,extra", [("v1", ""), ("v2", "--symmetric --queue-size 640"), ("v3", "")], ids=["v1", "v2-symmetric", "v3"]
)
def test_end_to_end_and_resume_is_exact_including_queue_and_key_encoder(tmp_path, version, extra):
    flags = f"--version {version} --batch-size 64 --epochs 2 --dim 32 --hidden-dim 64 --eval-every -1 {extra}"
    run = assert_resume_is_exact("moco.py", flags, tmp_path, n=4, k=2)
    assert_trained_run(run, steps=4)
    assert_runs_in_bfloat16("moco.py", flags, tmp_path, run)
    model = checkpoint(run)["model"]
    assert not torch.equal(model["backbone.features.0.weight"], model["momentum_backbone.features.0.weight"])
    if version != "v3":  # 4 steps of 64 keys (128 when symmetric) went in at the head of the queue (no wrap to 0)
        keys = 4 * 64 * (2 if "symmetric" in extra else 1)
        assert int(model["queue_ptr"]) == keys % len(model["queue"])
        torch.testing.assert_close(model["queue"].norm(dim=1), torch.ones(len(model["queue"])))


def test_v3_vit_freezes_the_patch_projection_and_uses_sincos_positions(tmp_path):
    flags = "--version v3 --arch vit_tiny --batch-size 16 --max-steps 2 --dim 32 --hidden-dim 64 --eval-every -1"
    r = run_script("moco.py", flags, "--output-dir", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["optimizer"] == "adamw" and config["temperature"] == 0.2 and config["wd"] == 0.1
    model = checkpoint(tmp_path)["model"]
    torch.manual_seed(0)  # the patch projection is still the random init both encoders started from
    args = M.parser.parse_args(flags.split())
    args.image_size = 32
    fresh = M.make_backbone(args, small=True)
    assert torch.equal(model["backbone.patch_embed.weight"], fresh.patch_embed.weight)
    assert torch.equal(model["backbone.pos_embed"], fresh.pos_embed)  # its values: tests/test_models_optim.py
    assert int(model["backbone.num_heads"]) == 12  # moco-v3 vits.py
    assert not torch.equal(model["backbone.blocks.0.attn.qkv.weight"], fresh.blocks[0].attn.qkv.weight)


def test_a_queue_that_is_not_a_multiple_of_the_keys_per_step_is_refused(tmp_path):
    r = run_script("moco.py --version v2 --batch-size 64 --queue-size 100 --output-dir", tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--queue-size 100 is not a multiple of the 64 keys per step" in r.stderr


def test_it_learns(tmp_path):
    """v1, 100 steps (about 45 s): kNN 49.2% against 38.8% for the random-init network with its batch-norm
    statistics estimated on the data (conftest.random_init_knn; 33.0% with PyTorch's initial ones), seed 0. v2 and
    v3 learn more slowly per step (README: 41.4% and 48.3% after 200 steps), too slowly for the suite's budget.
    No mechanism-off baseline here: at this budget a frozen key encoder (--moco-m 1.0) does as well (seed 0:
    50.7%), so the momentum update and the queue's order are pinned by exact one-step tests instead."""
    assert_it_learns("moco.py", "--version v1 --max-steps 100", tmp_path, margin=0.05)
