"""Run under `torchrun --nproc_per_node=2` (gloo, CPU) by test_cpc.py; writes what rank 0 saw to argv[1].
`single_process_reference()` computes the same in one process on the whole global batch.

CPC's InfoNCE scores each prediction against every target of the global batch, gathered WITH gradient: the
summed loss and the DDP-averaged gradients must equal one process on the global batch. The patch encoder uses
LayerNorm (v2), so nothing else depends on the batch.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import cpc as P  # noqa: E402

GLOBAL_BATCH, WORLD, OFFSETS = 4, 2, [1, 3]


def make_model():
    torch.manual_seed(0)
    backbone = C.TinyNet(width=4, norm_layer=lambda c: nn.GroupNorm(1, c))
    return P.CPC(backbone, OFFSETS, P.DIRECTIONS["v2"], target_dim=8, context_dim=8)


def make_patches():
    """A 16-px batch cut into 4-px patches at stride 2: a 7 x 7 grid."""
    x = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return P.patch_grid(x, 4, 2)


def loss_of(net, patches):
    preds, targets = net(patches)
    return P.cpc_loss(preds, targets, OFFSETS, P.DIRECTIONS["v2"])


def single_process_reference():
    model = make_model()
    loss = loss_of(model, make_patches())
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def worker(path):
    env = C.setup("cpu", seed=0)
    n = GLOBAL_BATCH // WORLD
    patches = make_patches()[env.rank * n : (env.rank + 1) * n]  # this rank's contiguous share
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)  # kept alive until the backward: its hooks average the grads
    loss = loss_of(ddp, patches)
    loss.backward()  # DDP averages the gradients over ranks
    total = loss.detach().clone()
    dist.all_reduce(total)
    if env.is_main:
        torch.save((total.item() / WORLD, [p.grad.clone() for p in model.parameters()]), path)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
