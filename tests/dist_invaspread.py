"""Run under `torchrun --nproc_per_node=2` (gloo, CPU) by test_invaspread.py; writes what rank 0 saw to argv[1].
`single_process_reference()` computes the same in one process on the whole global batch.

InvaSpread's negatives are the global batch, gathered without gradient: each rank's loss over its own anchors
against every rank's features, with DDP averaging the gradients, must equal one process's loss and gradient on
the global batch. The model has no BN, so one process on the global batch is the exact reference.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import invaspread as IS  # noqa: E402

GLOBAL_BATCH, WORLD, TAU = 8, 2, 0.2


def make_model():
    torch.manual_seed(0)
    return nn.Linear(6, 5)


def make_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 6, generator=g)


def loss_of(net, x1, x2):
    z1, z2 = net(torch.cat([x1, x2])).chunk(2)  # one pass over both views, as the script does
    return IS.invaspread_loss(z1, z2, TAU)


def single_process_reference():
    model = make_model()
    loss = loss_of(model, *make_inputs())
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def worker(path):
    env = C.setup("cpu", seed=0)
    rank, n = env.rank, GLOBAL_BATCH // WORLD
    x1, x2 = (x[rank * n : (rank + 1) * n] for x in make_inputs())  # this rank's contiguous share
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)  # kept alive until the backward: its hooks reduce
    loss = loss_of(ddp, x1, x2)
    loss.backward()  # DDP averages the gradients over ranks
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = [p.grad.clone() for p in model.parameters()]
    others = [[torch.empty_like(g) for _ in range(WORLD)] for g in grads]
    for g, o in zip(grads, others):
        dist.all_gather(o, g)
    out = {"loss": total.item() / WORLD, "grads": grads, "grads_equal": all(torch.equal(*o) for o in others)}
    if env.is_main:
        torch.save(out, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
