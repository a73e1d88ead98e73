"""Run under `torchrun --nproc_per_node=2` (gloo, CPU) by test_dino.py; writes what rank 0 saw to argv[1].
DINO's centre (Eq. 4) after an update from each rank's share of the teacher outputs, and the loss and DDP
gradients of a student without BN, against one process on the global batch (`single_process_reference`)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import dino as D  # noqa: E402

GLOBAL_BATCH, WORLD, K, CROPS = 8, 2, 5, 3


def make_inputs():
    """CROPS crops (2 global + 1 local) of the global batch, teacher outputs of the 2 global crops, a centre."""
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(GLOBAL_BATCH, 6, generator=g) for _ in range(CROPS)]
    t = [torch.randn(GLOBAL_BATCH, K, generator=g) * 3 for _ in range(2)]
    return crops, t, torch.randn(1, K, generator=g)


def step(net, crops, t, center):
    """Student scores crop by crop, the DINO loss against the fixed teacher outputs, then the centre update."""
    model = D.DINO(*(C.TinyNet(width=2) for _ in range(2)), K, hidden_dim=8, bottleneck_dim=4)  # its centre only
    model.center.copy_(center)
    s = net(torch.cat(crops))
    loss = D.dino_loss(s, torch.cat(t), model.center, 0.04)
    model.update_center(torch.cat(t), 0.9)
    return loss, model.center.clone()


def make_net():
    torch.manual_seed(0)
    return nn.Linear(6, K)


def single_process_reference():
    crops, t, center = make_inputs()
    net = make_net()
    loss, new_center = step(net, crops, t, center)
    loss.backward()
    return {"loss": loss.item(), "center": new_center, "grads": [p.grad.clone() for p in net.parameters()]}


def worker(path):
    env = C.setup("cpu", seed=0)
    n = GLOBAL_BATCH // WORLD
    crops, t, center = make_inputs()
    mine = slice(env.rank * n, (env.rank + 1) * n)  # this rank's contiguous share of every crop
    net = make_net()
    ddp = nn.parallel.DistributedDataParallel(net)
    loss, new_center = step(ddp, [c[mine] for c in crops], [x[mine] for x in t], center)
    loss.backward()  # DDP averages the gradients over ranks
    total = loss.detach().clone()
    dist.all_reduce(total)
    centers = [torch.empty_like(new_center) for _ in range(WORLD)]
    dist.all_gather(centers, new_center)
    out = {"loss": total.item() / WORLD, "center": new_center, "grads": [p.grad.clone() for p in net.parameters()]}
    out["centers_equal"] = torch.equal(centers[0], centers[1])
    if env.is_main:
        torch.save(out, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
