"""SimSiam under torchrun (by test_distributed.py; dist_util has the pattern), as main_simsiam.py trains:
DistributedSampler-style data shards, DistributedDataParallel, SyncBatchNorm on GPUs only (gloo has none). Where
the maths says one process on the whole global batch must give the same numbers:
  - the data: the two ranks' shares of each step make up the one-process global batch;
  - eval-mode BN (no batch coupling): DDP's averaged gradient of the per-rank mean loss equals the gradient of
    the mean loss over the whole batch;
  - train-mode BN without SyncBatchNorm: BN statistics are per process, so the gradient equals the mean of the
    gradients of each half computed with that half's statistics (the reference's halves);
  - the weights after an SGD step are the same on both ranks; features and kNN (common.py: each rank embeds every
    W-th image, all-gathered; each rank counts every W-th test row, summed) equal one process's.
"""

import dist_util as U
import torch
import torch.distributed as dist

import common as C
import simsiam as S

GLOBAL_BATCH, WORLD = 16, 2


def make_model():
    torch.manual_seed(0)
    return S.SimSiam(C.TinyNet(width=8), proj_layers=2, dim=32, pred_dim=8)


def make_data():
    g = torch.Generator().manual_seed(2)
    split = C.Split(
        torch.randint(0, 3, (37,), generator=g), torch.randint(0, 256, (37, 3, 16, 16), generator=g, dtype=torch.uint8)
    )
    return C.Data("fake", 16, 3, (0.5,) * 3, (0.25,) * 3, split, split, split)


def views(env):
    """This process's share of the global batch's two views: rows rank, rank + W, rank + 2W, ..."""
    return [x[env.rank :: env.world_size] for x in U.two_views(GLOBAL_BATCH, 3, 16, 16)]


def loss_and_grads(model, env):
    """(loss, gradients) of the SimSiam loss on this process's share of the two views."""
    x1, x2 = views(env)
    return U.loss_and_grads(model, lambda net: S.simsiam_loss(*net(x1, x2)), env)


def findings(env):
    """Everything but train-mode BN: the global batches of epoch 1 (every rank's share, concatenated in rank
    order), the eval-mode loss and gradients, the features of the test images and their kNN top-1."""
    data = make_data()
    mine = [t.tolist() for t in C.TrainLoader(data, S.view_recipe(16, small=True), 8, env, seed=0).indices(epoch=1)]
    shares = [mine]
    if env.world_size > 1:
        shares = [None] * env.world_size
        dist.all_gather_object(shares, mine)
    out = {"indices": [sum((share[s] for share in shares), []) for s in range(len(mine))]}
    out["loss_eval"], out["grads_eval"] = loss_and_grads(make_model().eval(), env)
    feats = C.extract_features(make_model().backbone, data.test, data, env, size=16, batch_size=5)
    out["features"] = feats
    out["knn"] = C.knn_top1(feats, data.bank.labels, feats, data.test.labels, 3, k=5, t=0.1, env=env)
    return out


def single_process_reference():
    """One process on the global batch; train-mode BN: each rank's half in turn, its loss / W backpropagated."""
    out = findings(U.ONE_PROCESS)
    model = make_model().train()
    losses = []
    for rank in range(WORLD):
        a, b = views(C.Env(rank, WORLD, 0, torch.device("cpu")))  # what rank `rank` receives
        loss = S.simsiam_loss(*model(a, b)) / WORLD
        loss.backward()
        losses.append(loss.item())
    out["loss_train"], out["grads_train"] = sum(losses), [p.grad.clone() for p in model.parameters()]
    return out


def worker(env):
    out = findings(env)
    model = make_model().train()
    out["loss_train"], out["grads_train"] = loss_and_grads(model, env)
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4).step()
    out["weights_equal_across_ranks"] = U.same_on_every_rank([p.detach() for p in model.parameters()])
    return out


if __name__ == "__main__":
    U.main(worker)
