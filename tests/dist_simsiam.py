"""Run under `torchrun --nproc_per_node=2` (gloo, CPU) by test_simsiam.py; writes what rank 0 saw to argv[1].
`single_process_reference()` computes the same quantities in one process, on the whole global batch.

Where the maths says one process on the whole batch must give the same numbers:
  - eval-mode BN (no batch coupling): DDP's averaged gradient of the per-rank mean loss equals the gradient of
    the mean loss over the whole batch;
  - train-mode BN without SyncBatchNorm (CPU: gloo has no SyncBN), BN statistics are per process, so the
    gradient equals the mean of the gradients of each half computed with that half's statistics.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import simsiam as S  # noqa: E402

GLOBAL_BATCH, WORLD = 16, 2


def make_model():
    torch.manual_seed(0)
    return S.SimSiam(C.TinyNet(width=8), proj_layers=2, dim=32, pred_dim=8)


def make_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g)


def make_data():
    g = torch.Generator().manual_seed(2)
    split = C.Split(
        torch.randint(0, 3, (37,), generator=g), torch.randint(0, 256, (37, 3, 16, 16), generator=g, dtype=torch.uint8)
    )
    return C.Data("fake", 16, 3, (0.5,) * 3, (0.25,) * 3, split, split, split)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def single_process_reference():
    env = C.Env(0, 1, 0, torch.device("cpu"))
    data, (x1, x2) = make_data(), make_inputs()
    views = S.view_recipe(16, small=True)
    out = {"indices": [t.tolist() for t in C.TrainLoader(data, views, 8, env, seed=0).indices(epoch=1)]}
    model = make_model().eval()
    loss = S.simsiam_loss(*model(x1, x2))
    loss.backward()
    out["loss_eval"], out["grads_eval"] = loss.item(), grads_of(model)
    model = make_model().train()
    halves = [(x1[i::WORLD], x2[i::WORLD]) for i in range(WORLD)]  # what rank i receives (see worker)
    losses = []
    for a, b in halves:
        loss = S.simsiam_loss(*model(a, b)) / WORLD
        loss.backward()
        losses.append(loss.item())
    out["loss_train"], out["grads_train"] = sum(losses), grads_of(model)
    backbone = make_model().backbone
    feats = C.extract_features(backbone, data.test, data, env, size=16, batch_size=5)
    out["features"] = feats
    out["knn"] = C.knn_top1(feats, data.bank.labels, feats, data.test.labels, 3, k=5, t=0.1)
    return out


def worker(path):
    env = C.setup("cpu", seed=0)
    rank = env.rank
    data, (x1, x2) = make_data(), make_inputs()
    x1, x2 = x1[rank::WORLD], x2[rank::WORLD]  # this rank's share of the global batch
    out = {}
    mine = C.TrainLoader(data, S.view_recipe(16, small=True), 8, env, seed=0).indices(epoch=1)
    shares = [None] * WORLD
    dist.all_gather_object(shares, [t.tolist() for t in mine])
    out["indices"] = [sum((shares[r][s] for r in range(WORLD)), []) for s in range(len(mine))]
    for mode in ("eval", "train"):
        model = make_model().train(mode == "train")
        ddp = nn.parallel.DistributedDataParallel(model)
        loss = S.simsiam_loss(*ddp(x1, x2))
        loss.backward()  # DDP averages the gradients over ranks
        total = loss.detach().clone()
        dist.all_reduce(total)
        out[f"loss_{mode}"], out[f"grads_{mode}"] = total.item() / WORLD, grads_of(model)
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4).step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    out["weights_equal_across_ranks"] = all(torch.equal(gathered[0], g) for g in gathered)
    feats = C.extract_features(make_model().backbone, data.test, data, env, size=16, batch_size=5)
    out["features"] = feats
    out["knn"] = C.knn_top1(feats, data.bank.labels, feats, data.test.labels, 3, k=5, t=0.1, env=env)
    if env.is_main:
        torch.save(out, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
