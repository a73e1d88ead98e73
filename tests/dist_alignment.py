"""Alignment/uniformity and the hardest negative's share under torchrun (by test_alignment_uniformity.py;
dist_util has the pattern). `measure(env)` runs as it is in one process and on each of 2: the numbers must not
depend on the process count. No official code has these distributed: alignment and uniformity follow Wang & Isola
(SsnL/align_uniform) and the shares are our diagnostics; what is checked is common.py's distribution of them:

  - alignment_uniformity: 260 of the 300 test images, 5 chunks of 64 (the last one of 4) split 3 / 2 over the
    ranks, each chunk's views from its own seed, the embeddings assembled by an all_reduce;
  - the hardest negative's share inside SimCLR's loss (negatives gathered from both ranks, objective.py) and MoCo
    v3's (keys gathered, moco-v3 builder.py), each rank its share of the global batch, averaged over the ranks by
    epoch_mean.
"""

import dist_util as U
import torch
import torch.nn as nn

import common as C
import moco as M
import simclr as S

GLOBAL_BATCH = 8


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
    z1, z2, k1, k2 = (U.share(torch.randn(GLOBAL_BATCH, 6, generator=g), env) for _ in range(4))
    for name in ("simclr", "moco_v3"):
        shares = []
        if name == "simclr":
            S.simclr_loss(z1, z2, 0.2, shares)
        else:
            M.moco_loss(z1, z2, k1, k2, None, 0.2, shares)
        out[name] = C.epoch_mean(shares, env)
    return out


if __name__ == "__main__":
    U.main(measure)
