"""InvaSpread under torchrun (by test_invaspread.py; dist_util has the pattern): the candidates are the global batch,
gathered without gradient (BatchAverage.py's `x.data` side), each anchor's positive offset by rank (invaspread.py
invaspread_loss; the official demo_seen.py runs on one GPU). Each process's loss over its own anchors against every
process's features, with DDP averaging the gradients, must equal one process's loss and gradient on the global
batch, and the gradients must be the same on both ranks. The model has no BN, so one process is the exact reference.
"""

import dist_util as U
import torch

import invaspread as IS

GLOBAL_BATCH, TAU = 8, 0.2


def loss_and_grads(env):
    """(loss, gradients) of this process's share of both views, through one pass over both, as the script does."""
    x1, x2 = (U.share(x, env) for x in U.two_views(GLOBAL_BATCH, 6))

    def loss_of(net):
        z1, z2 = net(torch.cat([x1, x2])).chunk(2)
        return IS.invaspread_loss(z1, z2, TAU)

    return U.loss_and_grads(U.linear_model(6, 5), loss_of, env)


def single_process_reference():
    return loss_and_grads(U.ONE_PROCESS)


def worker(env):
    loss, grads = loss_and_grads(env)
    return {"loss": loss, "grads": grads, "grads_equal": U.same_on_every_rank(grads)}


if __name__ == "__main__":
    U.main(worker)
