"""What the torchrun drivers tests/dist_*.py share. A test runs a driver as `torchrun --nproc_per_node=2
tests/dist_<case>.py OUT` (gloo, CPU; conftest.run_on_two_ranks) and compares what its rank 0 saved to OUT against
the driver's `single_process_reference()`: one process holding the whole global batch.

The pattern: a driver writes its computation once, as a function of the process environment `env`; each process
takes `share(x, env)` of the global batch, and a loss goes through `loss_and_grads` (DDP under torchrun). Called with
`ONE_PROCESS` the same function is the reference; `main(worker)` runs it on every rank under torchrun. What depends
on the global batch must then give the same numbers either way; `same_on_every_rank` checks that what must stay
identical across the ranks does.

A driver imports this module first, before `common` and the method files: it puts the repository root on sys.path
(a driver runs as a script, so only tests/ is there). isort keeps it first: it sorts as third-party (tests/), the
repository's modules as first-party, after it.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import common as C  # noqa: E402

ONE_PROCESS = C.Env(0, 1, 0, torch.device("cpu"))  # the reference: one plain process, the whole global batch


def main(worker):
    """The torchrun entry point: a gloo process group (common.setup, seed 0 on every rank), `worker(env)` on every
    rank, and rank 0's result saved to argv[1]; the group is destroyed however the worker ends (common.run)."""

    def run():
        env = C.setup("cpu", seed=0)
        out = worker(env)
        if env.is_main:
            torch.save(out, sys.argv[1])

    C.run(run)


def share(x, env):
    """This process's contiguous share of a global batch: rows rank * n to (rank + 1) * n, n = len(x) / world (the
    rank order in which common.gather concatenates). All of x in one process."""
    n = len(x) // env.world_size
    return x[env.rank * n : (env.rank + 1) * n]


def loss_and_grads(model, loss_of, env):
    """(this loss averaged over the processes, a float; the model's gradients, a list in parameter order) after
    one backward of `loss_of(net)`. Under torchrun `net` is `model` wrapped in DistributedDataParallel, kept alive
    until the backward (its hooks average the gradients over the processes) and the loss is all-reduced; in one
    process `net` is `model` itself."""
    net = nn.parallel.DistributedDataParallel(model) if env.world_size > 1 else model
    loss = loss_of(net)
    loss.backward()
    total = loss.detach().clone()
    if env.world_size > 1:
        dist.all_reduce(total)
    return total.item() / env.world_size, [p.grad.clone() for p in model.parameters()]


def same_on_every_rank(tensors):
    """Whether each tensor is bitwise the same on every process (every rank gets the answer; all gathers first)."""
    gathered = []
    for t in tensors:
        every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(every, t.contiguous())
        gathered.append(every)
    return all(torch.equal(every[0], e) for every in gathered for e in every)


def linear_model(d_in, d_out):
    """A linear layer from the global seed 0: no BN, so one process on the global batch is the exact reference."""
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out)


def two_views(*shape):
    """Two random batches of `shape` (a global batch's two views), drawn from a generator seeded 1."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
