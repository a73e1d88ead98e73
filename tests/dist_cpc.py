"""CPC under torchrun (by test_cpc.py; dist_util has the pattern): InfoNCE scores each prediction against every
target of the global batch, the targets gathered WITH gradient and the labels offset by rank (cpc.py cpc_loss, as
simclr.py's negatives; there is no official CPC code, the deepul port scores against its own process's batch:
cpc.py's Deviation). The summed loss and the DDP-averaged gradients of 2 processes must equal one process on the
global batch. The patch encoder uses GroupNorm(1, c) (v2's LayerNorm), so nothing else depends on the batch.
"""

import dist_util as U
import torch
import torch.nn as nn

import common as C
import cpc as P

GLOBAL_BATCH, OFFSETS = 4, [1, 3]


def make_model():
    torch.manual_seed(0)
    backbone = C.TinyNet(width=4, norm_layer=lambda c: nn.GroupNorm(1, c))
    return P.CPC(backbone, OFFSETS, P.DIRECTIONS["v2"], target_dim=8, context_dim=8)


def make_patches():
    """A 16-px batch cut into 4-px patches at stride 2: a 7 x 7 grid."""
    x = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return P.patch_grid(x, 4, 2)


def loss_and_grads(env):
    """(loss, gradients) of this process's share of the patch grids."""
    patches = U.share(make_patches(), env)

    def loss_of(net):
        preds, targets = net(patches)
        return P.cpc_loss(preds, targets, OFFSETS, P.DIRECTIONS["v2"])

    return U.loss_and_grads(make_model(), loss_of, env)


def single_process_reference():
    return loss_and_grads(U.ONE_PROCESS)


if __name__ == "__main__":
    U.main(loss_and_grads)
