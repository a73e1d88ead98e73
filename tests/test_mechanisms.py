"""One-step identities on the real training loops: each mechanism a method depends on, pinned exactly (or to
float32 rounding) so that a one-line bug in it fails a test. tests/README.md lists each mechanism, its test and
the bug it was checked against.

The runs train the tiny backbone on a folder of random 32 px images (the small-image recipe): 8 images at batch
4 or 16 at batch 8, so an epoch is two steps (a warmup counted in epochs must be converted to steps) and a
schedule's ramp shows within a few steps. capture_steps.py
runs a method file's unmodified main() and records what each step's forward and loss saw."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, checkpoint, read_metrics, run_script, write_png

import byol as B
import common as C
import moco as M
import simsiam as S

TINY = "--arch tiny --image-size 32 --workers 0 --eval-every -1"


def run_ok(*args):
    r = run_script(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def image_folder_of(root, n, side=32):
    """root/train/class{0,1}/*.png: n random images (32 px: the small-image recipe; 128 px: ImageNet's), no val/."""
    for i in range(n):
        write_png(root / "train" / f"class{i % 2}" / f"{i}.png", side, seed=i)
    return root


def capture(tmp_path, folder, module, cls, loss, flags):
    """Run MODULE.py on the folder under capture_steps.py; returns (records of each step, run folder)."""
    out, steps = tmp_path / "run", tmp_path / "steps.pt"
    script = REPO / "tests" / "capture_steps.py"
    run_ok(script, steps, module, cls, loss, "--data", folder, TINY, flags, "--output-dir", out)
    return torch.load(steps, weights_only=False), out


def assert_lerp(actual, start, end, weight_of_start, what):
    """actual == w * start + (1 - w) * end, computed in float64, to float32 rounding."""
    expected = weight_of_start * start.double() + (1 - weight_of_start) * end.double()
    torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=1e-7, msg=what)


def assert_moved(before, after, names):
    """The optimizer step moved the online weights far beyond the identities' tolerance, so a schedule or an
    order off by one step cannot hide in rounding."""
    assert max((after[n] - before[n]).abs().max().item() for n in names) > 1e-3


def assert_backbone_pt_is(run_dir, prefix, model_state):
    """backbone.pt holds exactly the checkpoint's entries under `prefix` (the online / query backbone)."""
    exported = torch.load(run_dir / "backbone.pt", weights_only=True)
    mine = {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
    assert exported.keys() == mine.keys()
    for k in mine:
        assert torch.equal(exported[k], mine[k]), k


# ---- EMA target (BYOL) and key encoder (MoCo) -----------------------------------------------------------------
def ema_pairs(steps, run_dir, prefix):
    """A two-step run's weights entering step 0, entering step 1 and at the end (the checkpoint), and the map from
    each EMA copy (`prefix` + name) to the online weight it follows; every backbone and projector weight has a
    copy, and the online weights moved in step 0."""
    ckpt = checkpoint(run_dir)
    assert len(steps) == 2 and ckpt["step"] == 2
    (p0, p1), p2 = [s["params"] for s in steps], ckpt["model"]
    copies = [n for n in p0 if n.startswith(prefix)]
    assert len(copies) == len([n for n in p0 if n.startswith(("backbone.", "projector."))])
    pairs = {n: n[len(prefix) :] for n in copies}
    assert_moved(p0, p1, pairs.values())
    return p0, p1, p2, pairs


def test_byol_target_is_the_ema_of_the_online_network_after_each_step(tmp_path):
    """Sec. 3.1: after step k's optimizer step, xi <- tau_k xi + (1 - tau_k) theta (the new online weights), with
    tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2. K = 2 steps (one epoch), tau_base 0.6: tau_0 = 0.6,
    tau_1 = 0.8. The target starts as a copy; backbone.pt is the online backbone."""
    folder = image_folder_of(tmp_path / "images", 8)
    flags = "--batch-size 4 --epochs 1 --warmup-epochs 0 --tau-base 0.6 --dim 16 --hidden-dim 32"
    steps, run_dir = capture(tmp_path, folder, "byol", "BYOL", "byol_loss", flags)
    p0, p1, p2, online = ema_pairs(steps, run_dir, "target_")
    tau0, tau1 = 0.6, 1 - (1 - 0.6) * (math.cos(math.pi * 1 / 2) + 1) / 2
    for n, o in online.items():
        assert torch.equal(p0[n], p0[o]), n  # a copy at the start
        assert_lerp(p1[n], p0[n], p1[o], tau0, n)  # after step 0: the EMA towards the updated online weights
        assert_lerp(p2[n], p1[n], p2[o], tau1, n)  # after step 1: at the ramped tau
    assert_backbone_pt_is(run_dir, "backbone.", p2)
    # Fig. 2: the loss of step 1 (target and online differ by then) gets the online predictions and the target
    # network's projections of the views, recomputed here from the captured weights.
    model = B.BYOL(C.build_backbone("tiny", 32, True), hidden_dim=32, dim=16)
    model.load_state_dict({**p1, **steps[1]["buffers"]})
    (x1, x2), outputs = steps[1]["views"], steps[1]["loss_args"]
    with torch.no_grad():
        online = [model.predictor(model.projector(model.backbone(x))) for x in (x1, x2)]
        target = [model.target_projector(model.target_backbone(x)) for x in (x1, x2)]
    for mine, theirs in zip(online + target, outputs):
        torch.testing.assert_close(theirs, mine)


def test_simsiam_first_step_is_sgd_on_the_stop_gradient_loss(tmp_path):
    """Alg. 1: the run's first update equals SGD (momentum buffer = the gradient; weight decay on every weight;
    lr 30 x 4/256 for the encoder and the predictor alike at step 0) on D(p1, sg z2)/2 + D(p2, sg z1)/2,
    recomputed here from the captured weights and views with the stop-gradient written out as detach; without
    the stop-gradient the update differs."""
    folder = image_folder_of(tmp_path / "images", 8)
    flags = "--batch-size 4 --epochs 1 --lr 30 --wd 0.01 --dim 32 --pred-dim 8"
    steps, _ = capture(tmp_path, folder, "simsiam", "SimSiam", "simsiam_loss", flags)
    (p0, p1), (x1, x2) = [s["params"] for s in steps], steps[0]["views"]
    model = S.SimSiam(C.build_backbone("tiny", 32, True), proj_layers=2, dim=32, pred_dim=8)
    model.load_state_dict({**p0, **steps[0]["buffers"]})

    def update(stop_grad):
        model.zero_grad()
        z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
        h1, h2 = model.predictor(z1), model.predictor(z2)
        if stop_grad:
            z1, z2 = z1.detach(), z2.detach()
        (-(F.cosine_similarity(h1, z2).mean() + F.cosine_similarity(h2, z1).mean()) / 2).backward()
        return {n: -30 * 4 / 256 * (p.grad + 0.01 * p0[n]) for n, p in model.named_parameters()}

    done = {n: p1[n] - p0[n] for n in p0}
    for n, expected in update(stop_grad=True).items():
        torch.testing.assert_close(done[n], expected, rtol=1e-3, atol=1e-5, msg=n)
    without = update(stop_grad=False)
    assert max((done[n] - without[n]).abs().max().item() for n in done) > 1e-3


MOCO_CASES = {
    # version, extra flags, keys per step, m at step 1 (K = 2 steps; m 0.6, cosine-ramped to 1 in v3)
    "v1": ("--version v1 --queue-size 24", 8, 0.6),
    "v2-symmetric": ("--version v2 --symmetric --queue-size 48", 16, 0.6),
    "v3": ("--version v3 --warmup-epochs 0", 8, 1 - (1 - 0.6) * (math.cos(math.pi * 1 / 2) + 1) / 2),
}


@pytest.fixture(scope="module")
def moco_run(tmp_path_factory):
    """moco_run(case) -> (records, run folder) of two steps of moco.py on 16 images at batch 8 (4 split-BN
    sub-batches of 2 for v1/v2), lr large enough that a step moves the weights well beyond float32 rounding.
    Each case runs once per module."""
    runs = {}

    def get(case):
        if case not in runs:
            tmp = tmp_path_factory.mktemp(f"moco-{case}")
            extra = MOCO_CASES[case][0] + ("" if case == "v3" else " --bn-splits 4")
            flags = f"{extra} --batch-size 8 --epochs 1 --moco-m 0.6 --lr 30 --temperature 0.2 --dim 16 --hidden-dim 32"
            runs[case] = capture(tmp, image_folder_of(tmp / "images", 16), "moco", "MoCo", "moco_loss", flags)
        return runs[case]

    return get


@pytest.mark.parametrize("case", list(MOCO_CASES))
def test_moco_key_encoder_moves_before_the_keys_from_the_previous_query_weights(moco_run, case):
    """Eq. 2, builder.py: at step t, before the keys are computed, theta_k <- m_t theta_k + (1 - m_t) theta_q with
    theta_q the query encoder as it enters step t (before step t's optimizer step). So the keys of step 0 come
    from the initial copy, the key encoder a step sees is m_t K_{t-1} + (1 - m_t) Q_t, and nothing moves it
    after the last step's loss. backbone.pt is the query encoder's backbone."""
    steps, run_dir = moco_run(case)
    p0, p1, p2, query = ema_pairs(steps, run_dir, "momentum_")
    m1 = MOCO_CASES[case][2]
    for n, q in query.items():
        assert torch.equal(p0[n], p0[q]), n  # step 0's keys: the initial copy (m_0 K + (1 - m_0) Q_0 = K)
        assert_lerp(p1[n], p0[n], p1[q], m1, n)  # step 1: from the query weights entering step 1
        assert torch.equal(p2[n], p1[n]), n  # no update after the last step's loss
    assert_backbone_pt_is(run_dir, "backbone.", p2)


# ---- the queue (MoCo v1/v2) -----------------------------------------------------------------------------------
def infonce_by_hand(q, k, queue, tau):
    """Eq. 1 in float64: -log softmax of [q.k+, q.queue] / tau at the positive, q L2-normalised, batch mean."""
    q, k, queue = F.normalize(q.double(), dim=1), k.double(), queue.double()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / tau
    return -logits.log_softmax(1)[:, 0].mean().item()


@pytest.mark.parametrize("case", ["v1", "v2-symmetric"])
def test_moco_loss_reads_the_queue_before_the_steps_keys_go_in(moco_run, case):
    """Alg. 1: the loss of step t uses the queue as it was before step t's keys are enqueued; then the keys
    (k2, or k1 then k2 with --symmetric) replace the oldest rows and the pointer moves by the keys per step.
    The logged loss is recomputed by hand from the captured q, k and queue."""
    steps, run_dir = moco_run(case)
    n = MOCO_CASES[case][1]
    queues = [s["buffers"]["queue"] for s in steps] + [checkpoint(run_dir)["model"]["queue"]]
    pointers = [int(s["buffers"]["queue_ptr"]) for s in steps] + [int(checkpoint(run_dir)["model"]["queue_ptr"])]
    assert pointers == [0, n, 2 * n] and 2 * n < len(queues[0])  # no wrap: every row a step wrote is new
    logged = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    for t, step in enumerate(steps):
        q1, q2, k1, k2, queue, tau = step["loss_args"][:6]  # then the shares list
        assert torch.equal(queue, queues[t])  # the loss read the queue as the step found it
        loss = infonce_by_hand(q1, k2, queue, tau)
        if q2 is not None:
            loss += infonce_by_hand(q2, k1, queue, tau)
        assert logged[t] == pytest.approx(loss, abs=2e-6)
        new = torch.cat([k for k in (k1, k2) if k is not None])  # this step's keys, in enqueue order
        rows = torch.arange(t * n, (t + 1) * n)
        assert torch.equal(queues[t + 1][rows], new.float())
        rest = torch.ones(len(queue), dtype=torch.bool)
        rest[rows] = False
        assert torch.equal(queues[t + 1][rest], queues[t][rest])  # every other row untouched
        assert not torch.allclose(queues[t][rows], new.float())  # the step's keys were not in the queue before


def test_moco_keys_come_from_split_bn_on_a_shuffled_batch(moco_run):
    """Shuffling BN on one process (the CIFAR demo): the keys of step 0 equal the key encoder, with BN statistics
    per sub-batch (images i, i + s, ...; --bn-splits 4), applied to the batch in the order of the permutation the
    step drew from the global RNG, then put back in order; the queries use split BN on the unshuffled batch.
    Recomputed by hand from the captured weights, views and RNG state."""
    steps, _ = moco_run("v1")
    step = steps[0]
    x1, x2 = step["views"]
    q1, _, _, k2 = step["loss_args"][:4]

    def rebuilt(splits):
        norm = functools.partial(M.SplitBatchNorm, splits=splits) if splits > 1 else None
        model = M.MoCo(C.build_backbone("tiny", 32, True, norm_layer=norm), "v1", dim=16, queue_size=24)
        model.load_state_dict({**step["params"], **step["buffers"]})
        return model.train()

    split, plain = rebuilt(4), rebuilt(1)
    torch.set_rng_state(step["rng"])
    perm = torch.randperm(len(x2))  # the draw shuffled_keys makes (the queries draw nothing)
    groups = lambda p: sorted(p.view(2, 4).T.sort(1).values.tolist())  # noqa: E731 (sub-batch j: positions j, j+4)
    assert groups(perm) != groups(torch.arange(8))  # the shuffle changes which images share BN statistics
    with torch.no_grad():
        key = lambda m, p: F.normalize(m.momentum_projector(m.momentum_backbone(x2[p])), dim=1)[p.argsort()]  # noqa: E731
        torch.testing.assert_close(k2, key(split, perm))
        torch.testing.assert_close(q1, split.projector(split.backbone(x1)))
        assert not torch.allclose(k2, key(split, torch.arange(8)), atol=1e-4)  # without the shuffle
        assert not torch.allclose(k2, key(plain, perm), atol=1e-4)  # with BN over the whole batch
        assert not torch.allclose(q1, plain.projector(plain.backbone(x1)), atol=1e-4)


# ---- the lr a run logs ----------------------------------------------------------------------------------------
def warmup_10_epochs(lr):
    """Batch 4 on 8 images, --epochs 11: two steps per epoch, the recipe's 10 warmup epochs are steps 0-19, rising
    linearly to lr; then the cosine's two steps, lr (1 + cos 0) / 2 = lr and lr (1 + cos(pi/2)) / 2 = lr/2."""
    return [lr * (s + 1) / 20 for s in range(20)] + [lr, lr / 2]


# Each lr written out from the paper's rule and the recipe's base lr; batch 4, so bs/256 = 1/64, sqrt(bs) = 2.
# Without warmup, --epochs 1 is 2 steps: lr, then lr/2 (the cosine half-way).
LR_CASES = {
    # simsiam.py small recipe: SGD 0.03 x bs/256 (Sec. 4), cosine without warmup; predictor at the fixed base lr
    "simsiam": ("simsiam.py --epochs 1 --dim 32 --pred-dim 8", 32, [0.03 / 64, 0.03 / 64 / 2]),
    # byol.py small recipe (solo-learn): LARS 1.0 x bs/256, 10 warmup epochs
    "byol": ("byol.py --epochs 11 --dim 16 --hidden-dim 32", 32, warmup_10_epochs(1.0 / 64)),
    # simclr.py v1 small recipe (README's CIFAR command): 1.0 x bs/256, 10 warmup epochs
    "simclr-v1": ("simclr.py --version v1 --epochs 11 --dim 16", 32, warmup_10_epochs(1.0 / 64)),
    # simclr.py v2 ImageNet recipe (128 px images): square root, 0.075 x sqrt(bs), 10 warmup epochs
    "simclr-v2": ("simclr.py --version v2 --epochs 11 --dim 16", 128, warmup_10_epochs(0.075 * 2)),
    # moco.py v1 (the CIFAR demo's lr with v1's schedule): 0.03 x bs/256, x 0.1 at 60% and 80% of 10 steps
    "moco-v1": (
        "moco.py --version v1 --epochs 5 --bn-splits 2 --dim 16",
        32,
        [0.03 / 64] * 6 + [0.003 / 64] * 2 + [0.0003 / 64] * 2,
    ),
    # moco.py v2: 0.03 x bs/256, cosine without warmup
    "moco-v2": ("moco.py --version v2 --epochs 1 --bn-splits 2 --dim 16", 32, [0.03 / 64, 0.03 / 64 / 2]),
    # moco.py v3 small recipe (solo-learn): LARS 0.3 x bs/256, 10 warmup epochs
    "moco-v3": ("moco.py --version v3 --epochs 11 --dim 16 --hidden-dim 32", 32, warmup_10_epochs(0.3 / 64)),
}


@pytest.mark.parametrize("case", list(LR_CASES))
def test_the_logged_lr_follows_the_recipes_scaling_rule_and_warmup(tmp_path, case):
    """metrics.jsonl's train/lr at every step (step 0, the end of warmup, the schedule after it) equals the lr
    computed here from the paper's scaling rule (linear bs/256, or 0.075 sqrt(bs) for SimCLR v2) and the recipe's
    warmup; SimSiam's predictor keeps the base lr while the rest decays (Sec. 4.2). backbone.pt is the trained
    backbone of the checkpoint."""
    flags, side, expected = LR_CASES[case]
    folder = image_folder_of(tmp_path / "images", 8, side)
    run_ok(flags, "--data", folder, TINY, "--batch-size 4 --output-dir", tmp_path / "run")
    logged = [r["train/lr"] for r in read_metrics(tmp_path / "run") if "train/lr" in r]
    assert logged == pytest.approx(expected, rel=1e-12, abs=0)
    ckpt = checkpoint(tmp_path / "run")
    if case == "simsiam":  # the last step's lr in each group: decayed (encoder, projector), fixed (predictor)
        assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == pytest.approx([expected[-1], expected[0]])
    assert_backbone_pt_is(tmp_path / "run", "backbone.", ckpt["model"])
