"""SimCLR's and MoCo's global-batch mechanisms under torchrun (by test_distributed.py; dist_util has the pattern).
The model has no BN, so one process on the global batch is the exact reference (`single_process_reference`):
  - SimCLR: NT-Xent with the negatives gathered WITH gradient (objective.py add_contrastive_loss,
    tpu_cross_replica_concat; labels offset by the replica id): loss and DDP-averaged gradients equal one process;
  - MoCo v3: keys gathered without gradient, labels offset by rank (moco-v3 builder.py contrastive_loss,
    concat_all_gather): the same;
  - Shuffling BN (moco builder.py _batch_shuffle_ddp / _batch_unshuffle_ddp): each rank's key encoder sees a mix of
    both ranks' images, and the keys come back in order;
  - MoCo's queue (moco builder.py _dequeue_and_enqueue of concat_all_gather(keys)): the same on both ranks after
    enqueueing every rank's keys, in rank order.
"""

import dist_util as U
import torch

import common as C
import moco as M
import simclr as S

GLOBAL_BATCH = 8


def make_inputs():
    return U.two_views(GLOBAL_BATCH, 6)


def losses(net, model, x1, x2):
    """SimCLR's loss on two views, and MoCo v3's with keys from a fixed (no-grad) copy of the model. `net` is
    the model or its DDP wrapper, called once on both views."""
    z1, z2 = net(torch.cat([x1, x2])).chunk(2)
    with torch.no_grad():
        k1, k2 = model(x1) * 0.5, model(x2) * 0.5
    return {"simclr": S.simclr_loss(z1, z2, 0.5), "moco_v3": M.moco_loss(z1, z2, k1, k2, None, 0.2)}


def losses_and_grads(env):
    """{"simclr": (loss, gradients), "moco_v3": (...)} of this process's share of both views."""
    x1, x2 = (U.share(x, env) for x in make_inputs())
    out = {}
    for name in ("simclr", "moco_v3"):
        model = U.linear_model(6, 5)
        out[name] = U.loss_and_grads(model, lambda net: losses(net, model, x1, x2)[name], env)
    return out


def single_process_reference():
    return losses_and_grads(U.ONE_PROCESS)


def worker(env):
    out = losses_and_grads(env)
    x1 = U.share(make_inputs()[0], env)
    # Shuffling BN: what the key encoder sees, and the keys that come back
    seen = []
    keys = M.shuffled_keys(lambda v: seen.append(v) or v * 2 + 1, x1)
    out["shuffle_undone"] = torch.equal(keys, x1 * 2 + 1)
    everything = C.gather(x1)
    n = len(x1)
    others = everything[(1 - env.rank) * n : (2 - env.rank) * n]  # the other rank's share
    out["saw_other_rank"] = any(torch.equal(row, o) for row in seen[0] for o in others)
    out["saw_a_share"] = all(any(torch.equal(row, e) for e in everything) for row in seen[0])
    # The queue: every rank enqueues all ranks' keys, so the queues stay identical
    torch.manual_seed(0)
    model = M.MoCo(C.TinyNet(width=8), "v2", dim=6, queue_size=16)
    model.enqueue(C.gather(x1 + env.rank))  # rank r's keys: its share of x1, plus r
    out["queues_equal"] = U.same_on_every_rank([model.queue])
    out["queue_head"] = model.queue[:GLOBAL_BATCH].clone()
    return out


if __name__ == "__main__":
    U.main(worker)
