"""Run under `torchrun --nproc_per_node=2` (gloo, CPU) by test_alignment_uniformity.py; writes what rank 0 saw to
argv[1]. `measure(env)` computes the same quantities in one process: they must not depend on the process count.

  - alignment_uniformity: 260 of the 300 test images, 5 chunks of 64 (the last one of 4) split 3 / 2 over the
    ranks, gathered;
  - the hardest negative's share inside SimCLR's loss (negatives gathered from both ranks) and MoCo v3's (keys
    gathered), each rank its half of the global batch, averaged over the ranks by epoch_mean.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import moco as M  # noqa: E402
import simclr as S  # noqa: E402

GLOBAL_BATCH, WORLD = 8, 2


def small_data():
    """300 random 16 px test images in memory (and 40 training images, which alignment_uniformity skips)."""
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)  # noqa: E731
    train = C.Split(labels=torch.zeros(40, dtype=torch.long), images=images(40))
    test = C.Split(labels=torch.zeros(300, dtype=torch.long), images=images(300))
    return C.Data("random", 16, 2, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train, train, test)


def embed_net():
    torch.manual_seed(0)
    return nn.Sequential(C.TinyNet(width=8), nn.Linear(64, 16))


def measure(env):
    """alignment_uniformity of a fixed network (260 images drawn from 300) and the two losses' shares."""
    views = [C.ViewAug(16, scale=(0.2, 1.0)), C.ViewAug(16, scale=(0.5, 1.0), blur_p=0.5, solarize_p=0.2)]
    out = C.alignment_uniformity(embed_net(), small_data(), views, env, n=260, batch_size=64, workers=0)
    g = torch.Generator().manual_seed(1)
    z1, z2, k1, k2 = (torch.randn(GLOBAL_BATCH, 6, generator=g) for _ in range(4))
    n = GLOBAL_BATCH // env.world_size
    mine = slice(env.rank * n, (env.rank + 1) * n)  # this rank's contiguous share
    for name in ("simclr", "moco_v3"):
        shares = []
        if name == "simclr":
            S.simclr_loss(z1[mine], z2[mine], 0.2, shares)
        else:
            M.moco_loss(z1[mine], z2[mine], k1[mine], k2[mine], None, 0.2, shares)
        out[name] = C.epoch_mean(shares, env)
    return out


def worker(path):
    env = C.setup("cpu", seed=0)
    out = measure(env)
    if env.is_main:
        torch.save(out, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
