"""Run under `torchrun --nproc_per_node=2` (gloo, CPU) by test_distributed.py; writes what rank 0 saw to argv[1].
`single_process_reference()` computes the same quantities in one process on the whole global batch.

Models here have no BN, so one process on the global batch is the exact reference:
  - SimCLR: NT-Xent with the negatives gathered WITH gradient: loss and DDP-averaged gradients equal one process;
  - MoCo v3: keys gathered without gradient, labels offset by rank: the same;
  - Shuffling BN: each rank's key encoder sees a mix of both ranks' images, and the keys come back in order;
  - MoCo's queue: the same on both ranks after enqueueing every rank's keys, in rank order.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import moco as M  # noqa: E402
import simclr as S  # noqa: E402

GLOBAL_BATCH, WORLD = 8, 2


def make_model():
    torch.manual_seed(0)
    return nn.Linear(6, 5)


def make_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 6, generator=g)


def losses(net, model, x1, x2):
    """SimCLR's loss on two views, and MoCo v3's with keys from a fixed (no-grad) copy of the model. `net` is
    the model or its DDP wrapper, called once on both views."""
    z1, z2 = net(torch.cat([x1, x2])).chunk(2)
    with torch.no_grad():
        k1, k2 = model(x1) * 0.5, model(x2) * 0.5
    return {"simclr": S.simclr_loss(z1, z2, 0.5), "moco_v3": M.moco_loss(z1, z2, k1, k2, None, 0.2)}


def single_process_reference():
    x1, x2 = make_inputs()
    out = {}
    for name in ("simclr", "moco_v3"):
        model = make_model()
        loss = losses(model, model, x1, x2)[name]
        loss.backward()
        out[name] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    return out


def worker(path):
    env = C.setup("cpu", seed=0)
    rank, n = env.rank, GLOBAL_BATCH // WORLD
    x1, x2 = (x[rank * n : (rank + 1) * n] for x in make_inputs())  # this rank's contiguous share
    out = {}
    for name in ("simclr", "moco_v3"):
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        loss = losses(ddp, model, x1, x2)[name]
        loss.backward()  # DDP averages the gradients over ranks
        total = loss.detach().clone()
        dist.all_reduce(total)
        out[name] = (total.item() / WORLD, [p.grad.clone() for p in model.parameters()])
    # Shuffling BN: what the key encoder sees, and the keys that come back
    seen = []
    keys = M.shuffled_keys(lambda v: seen.append(v) or v * 2 + 1, x1)
    out["shuffle_undone"] = torch.equal(keys, x1 * 2 + 1)
    everything = C.gather(x1)
    others = everything[(1 - rank) * n : (2 - rank) * n]
    out["saw_other_rank"] = any(torch.equal(row, o) for row in seen[0] for o in others)
    out["saw_a_share"] = all(any(torch.equal(row, e) for e in everything) for row in seen[0])
    # The queue: every rank enqueues all ranks' keys, so the queues stay identical
    torch.manual_seed(0)
    model = M.MoCo(C.TinyNet(width=8), "v2", dim=6, queue_size=16)
    model.enqueue(C.gather(x1 + rank))  # rank r's keys: its share of x1, plus r
    queues = [torch.empty_like(model.queue) for _ in range(WORLD)]
    dist.all_gather(queues, model.queue)
    out["queues_equal"] = torch.equal(queues[0], queues[1])
    out["queue_head"] = model.queue[:GLOBAL_BATCH].clone()
    if env.is_main:
        torch.save(out, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
