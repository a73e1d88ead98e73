"""SwAV's distributed Sinkhorn under torchrun (by test_distributed.py; dist_util has the pattern), as main_swav.py
distributed_sinkhorn: each process holds its share of the global batch's scores and a queue of its own past
embeddings' scores; with the sums all-reduced, the codes of each process's batch must equal those one process
computes on the global batch with the union of the two queues (`single_process_reference`).
"""

import dist_util as U
import torch

import common as C
import swav as W

GLOBAL_BATCH, QUEUE, K, WORLD = 8, 6, 5, 2  # QUEUE rows per rank


def make_scores():
    """(global batch scores, [queue scores of rank 0, of rank 1]): cosines in [-1, 1], unbalanced over the
    prototypes so that the row sums matter."""
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(GLOBAL_BATCH, K, generator=g) * 2 - 1) + torch.linspace(0, 0.5, K)
    queues = [(torch.rand(QUEUE, K, generator=g) * 2 - 1) for _ in range(WORLD)]
    return batch.clamp(-1, 1), queues


def single_process_reference():
    batch, queues = make_scores()
    return W.sinkhorn(torch.cat([*queues, batch]), 0.05, 3)[-GLOBAL_BATCH:]


def worker(env):
    """Every process's codes of its own share, its own queue's rows first as in swav.py, gathered in rank order."""
    batch, queues = make_scores()
    mine = U.share(batch, env)
    codes = W.sinkhorn(torch.cat([queues[env.rank], mine]), 0.05, 3)[-len(mine) :]
    return {"codes": C.gather(codes)}


if __name__ == "__main__":
    U.main(worker)
