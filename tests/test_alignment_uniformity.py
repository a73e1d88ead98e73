"""Alignment and uniformity (Wang & Isola 2020, arXiv:2005.10242) and the hardest negative's share, against slow
references written from their definitions; the evaluation's fixed image set and views, its independence of the
training RNG and of the process count (torchrun, tests/dist_alignment.py); the temperature study end to end."""

import csv
import json
import math
from pathlib import Path

import dist_alignment as D
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REPO, read_metrics, run_on_two_ranks, run_script

import common as C
import invaspread as IS
import moco as M
import simclr as S


def sq_dist(a, b):
    return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))


def test_alignment_and_uniformity_equal_the_papers_definitions():
    """Sec. 4.1: L_align = E ||f(x) - f(y)||^2 over positive pairs; L_uniform = log E exp(-2 ||f(x) - f(y)||^2) over
    distinct pairs, one pair at a time."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = (F.normalize(torch.randn(40, 6, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    assert C.alignment(z1, z2).item() == pytest.approx(sum(sq_dist(a, b) for a, b in zip(z1, z2)) / 40, rel=1e-12)
    pairs = [math.exp(-2 * sq_dist(z1[i], z1[j])) for i in range(40) for j in range(40) if i != j]
    assert C.uniformity(z1).item() == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-12)
    same = z1[:1].expand(5, -1)
    assert C.alignment(same, same).item() == 0 and C.uniformity(same).item() == pytest.approx(0, abs=1e-12)
    assert C.uniformity(torch.cat([z1[:1], -z1[:1]])).item() == pytest.approx(-8)  # antipodes: log exp(-2 * 4)


def reference_shares(anchors, candidates, positives, excluded, tau):
    """Per anchor: the negatives are the candidates other than its positive and `excluded` (itself in SimCLR);
    p_k = exp(s_k / tau) / Z, share = max_k p_k / sum_k p_k over the negatives. The mean over anchors."""
    total = 0.0
    for i, a in enumerate(anchors):
        weights = [
            math.exp(sum(float(x) * float(y) for x, y in zip(a, c)) / tau)
            for k, c in enumerate(candidates)
            if k != positives[i] and k != excluded[i]
        ]
        total += max(weights) / sum(weights)
    return total / len(anchors)


def test_hardest_negative_share_inside_the_losses():
    """SimCLR: each view-1 anchor's negatives are the 2N - 2 views of the other images (and symmetrically);
    MoCo v1/v2: the queue; MoCo v3: the other images' keys; InvaSpread: each of the 2N views' P(j|i) over the
    2N - 2 views of the other images (itself and its other view i +- N left out)."""
    g = torch.Generator().manual_seed(0)
    n, tau = 5, 0.2
    z1, z2, k1, k2 = (F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1) for _ in range(4))
    views = torch.cat([z1, z2])
    shares = []
    S.simclr_loss(z1, z2, tau, shares)
    assert len(shares) == 2
    for view, s in enumerate(shares):
        anchors = range(view * n, (view + 1) * n)
        ref = reference_shares(
            views[view * n : (view + 1) * n], views, [(i + n) % (2 * n) for i in anchors], list(anchors), tau
        )
        assert s.item() == pytest.approx(ref, rel=1e-9)
    queue = F.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=1)
    shares = []
    M.moco_loss(z1, z2, k1, k2, queue, tau, shares)  # symmetric: one share per term, the queue's rows compete
    for q, s in zip((z1, z2), shares):
        assert s.item() == pytest.approx(reference_shares(q, queue, [-1] * n, [-1] * n, tau), rel=1e-9)
    shares = []
    M.moco_loss(z1, z2, k1, k2, None, tau, shares)  # v3: ctr(q1, k2) + ctr(q2, k1) over the batch's keys
    for q, k, s in zip((z1, z2), (k2, k1), shares):
        assert s.item() == pytest.approx(reference_shares(q, k, list(range(n)), [-1] * n, tau), rel=1e-9)
    shares = []
    IS.invaspread_loss(z1, z2, tau, shares)  # one share over all 2N anchors
    ref = reference_shares(views, views, [(i + n) % (2 * n) for i in range(2 * n)], list(range(2 * n)), tau)
    assert len(shares) == 1 and shares[0].item() == pytest.approx(ref, rel=1e-9)


class Recorder(nn.Module):
    """A fixed network that records the size of each batch it embeds and whether it ran in training mode."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = D.embed_net(), []

    def forward(self, x):
        self.calls.append((len(x), self.training, self.net[0].training))
        return self.net(x)


def test_alignment_uniformity_is_fixed_and_leaves_the_training_rng_alone(image_folder):
    """Tensor data (at most n of its 300 test images, not its 40 training images) and an image folder (decoded
    in a DataLoader): the same numbers at every call, eval mode during the call and each module's mode back
    after it, and neither the global RNG nor another generator drawn from."""
    env = C.Env(0, 1, 0, torch.device("cpu"))
    views = [C.ViewAug(16, scale=(0.2, 1.0)), C.ViewAug(16, blur_p=0.5, solarize_p=0.2)]
    folder = C.load_data(str(image_folder(n_train=6, side=20, n_val=10)))
    for data, n, images in ((D.small_data(), 500, 300), (D.small_data(), 130, 130), (folder, 4096, 10)):
        embed = Recorder().train()
        embed.net[1].eval()  # a module the caller left in eval mode stays there
        rng = torch.get_rng_state()
        first = C.alignment_uniformity(embed, data, views, env, n=n, batch_size=64, workers=0)
        assert torch.equal(torch.get_rng_state(), rng)
        assert sum(c[0] for c in embed.calls) == 2 * images and not any(c[1] or c[2] for c in embed.calls)
        assert embed.training and embed.net[0].training and not embed.net[1].training
        torch.manual_seed(123)  # another global RNG state: the same evaluation
        assert C.alignment_uniformity(embed, data, views, env, n=n, batch_size=64, workers=0) == first
        assert 0 < first["eval/alignment"] < 4 and -4 < first["eval/uniformity"] < 0


def test_the_same_under_torchrun_with_two_processes(tmp_path):
    res, ref = run_on_two_ranks(D, tmp_path), D.measure(C.Env(0, 1, 0, torch.device("cpu")))
    assert res.keys() == ref.keys()
    for key, value in ref.items():
        assert res[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_the_study_runs_resumes_and_its_table_is_what_the_runs_wrote(tmp_path, image_folder):
    """Two temperatures, one seed, two steps each on a small folder. The CSV's rows are the runs' final
    metrics.jsonl rows; a second start skips the finished runs and writes the same table."""
    folder = image_folder(n_train=16, side=20, n_val=8)
    flags = f"--data {folder} --arch tiny --epochs 1 --batch-size 8 --dim 16 --workers 0"
    cmd = [REPO / "tools" / "temperature_study.py", "--taus", "0.1", "0.5", "--seeds", "3", "--out", tmp_path]
    r = run_script(cmd, "--", flags, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "temperature.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["method"], float(row["tau"]), int(row["seed"])) for row in rows] == [
        ("simclr", 0.1, 3),
        ("simclr", 0.5, 3),
    ]
    for row in rows:
        run_dir = tmp_path / f"simclr-tau{float(row['tau']):g}-seed3"
        final = read_metrics(run_dir)[-1]
        assert final["final"] and final["step"] == int(row["step"]) == 2
        config = json.loads((run_dir / "config.json").read_text())
        assert config["temperature"] == float(row["tau"]) and config["seed"] == 3
        for key in ("eval/knn_top1", "eval/linear_top1", "eval/alignment", "eval/uniformity"):
            assert float(row[key]) == final[key], key
        assert float(row["eval/hardest_negative_share"]) == final["eval/hardest_negative_share"]
    table = (tmp_path / "temperature.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| simclr | 0.1 | 1 |")
    before = (tmp_path / "temperature.csv").read_text()
    r = run_script(cmd, "--", flags, timeout=240)
    assert r.returncode == 0 and r.stdout.count("finished, skipped") == 2, r.stderr[-3000:]
    assert (tmp_path / "temperature.csv").read_text() == before
    try:
        import matplotlib  # noqa: F401

        assert Path(tmp_path / "temperature.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in r.stdout
