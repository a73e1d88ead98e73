"""Run under `torchrun --nproc_per_node=2` (gloo, CPU) by test_distributed.py; writes rank 0's findings to argv[1].

SwAV's distributed Sinkhorn (main_swav.py distributed_sinkhorn): each rank holds its share of the global batch's
scores and a queue of its own past embeddings' scores; with the sums all-reduced, the codes of each rank's batch
equal those one process computes on the global batch with the union of the two queues.
`single_process_reference()` computes the latter.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import swav as W  # noqa: E402

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


def worker(path):
    env = C.setup("cpu", seed=0)
    batch, queues = make_scores()
    n = GLOBAL_BATCH // WORLD
    mine = batch[env.rank * n : (env.rank + 1) * n]
    codes = W.sinkhorn(torch.cat([queues[env.rank], mine]), 0.05, 3)[-n:]  # as swav.py: queue rows first
    everything = C.gather(codes)
    if env.is_main:
        torch.save({"codes": everything}, path)


if __name__ == "__main__":
    C.run(lambda: worker(sys.argv[1]))
