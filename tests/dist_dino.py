"""DINO under torchrun (by test_dino.py; dist_util has the pattern): the centre of Eq. 4 after an update from each
process's share of the teacher outputs must be the one-process centre of the whole global batch and the same on
both ranks (main_dino.py DINOLoss.update_center all-reduces the batch sum and divides by the global count); the
loss and DDP gradients of a student without BN must equal one process on the global batch.
"""

import dist_util as U
import torch

import common as C
import dino as D

GLOBAL_BATCH, K, CROPS = 8, 5, 3


def make_inputs():
    """CROPS crops (2 global + 1 local) of the global batch, teacher outputs of the 2 global crops, a centre."""
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(GLOBAL_BATCH, 6, generator=g) for _ in range(CROPS)]
    t = [torch.randn(GLOBAL_BATCH, K, generator=g) * 3 for _ in range(2)]
    return crops, t, torch.randn(1, K, generator=g)


def updated_center(t, center):
    """DINO.update_center (momentum 0.9) from `center` on the teacher outputs t, crop by crop."""
    model = D.DINO(*(C.TinyNet(width=2) for _ in range(2)), K, hidden_dim=8, bottleneck_dim=4)  # its centre only
    model.center.copy_(center)
    model.update_center(torch.cat(t), 0.9)
    return model.center.clone()


def findings(env):
    """This process's share of every crop: the student's loss (scored crop by crop against the fixed teacher
    outputs, before the centre moves) and gradients, and the centre after the update."""
    crops, t, center = make_inputs()
    crops, t = [U.share(c, env) for c in crops], [U.share(x, env) for x in t]
    loss_of = lambda net: D.dino_loss(net(torch.cat(crops)), torch.cat(t), center, 0.04)
    loss, grads = U.loss_and_grads(U.linear_model(6, K), loss_of, env)
    return {"loss": loss, "center": updated_center(t, center), "grads": grads}


def single_process_reference():
    return findings(U.ONE_PROCESS)


def worker(env):
    out = findings(env)
    return {**out, "centers_equal": U.same_on_every_rank([out["center"]])}


if __name__ == "__main__":
    U.main(worker)
