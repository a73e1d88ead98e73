"""Everything that runs under `torchrun --nproc_per_node=2` (gloo, CPU). What each test compares:

- test_simsiam_gradients_data_and_knn_match_one_process (tests/dist_simsiam.py): data shards, loss and DDP
  gradients (eval- and train-mode BN), weights after an SGD step, extracted features and kNN against one process
  on the whole global batch;
- test_gathered_losses_shuffle_and_queue_match_one_process (tests/dist_methods.py): SimCLR's loss with negatives
  gathered with gradient and MoCo v3's with gathered keys, against one process; Shuffling BN; MoCo's queue;
- test_ranks_stay_in_step: each method file (SimSiam, BYOL, SimCLR v2, MoCo v2 and v3) for 2 steps; every rank's
  checksum of its weights (`rank_checksums` in ckpt.pt) is the same;
- test_resume_under_torchrun_is_exact: SimSiam and MoCo v2 (a per-rank augmentation RNG, and the queue), 4 steps
  straight against 2 + resume + 2: bitwise the same model, queue and optimizer, and ranks in step; SwAV the same,
  with each rank's own queue in ckpt.pt;
- test_swav_codes_match_one_process_with_the_union_of_the_queues (tests/dist_swav.py): SwAV's Sinkhorn codes of
  each rank's share against one process on the global batch with both ranks' queues.

The drivers tests/dist_*.py share tests/dist_util.py (the torchrun entry, a process's share of the global batch, the
DDP loss and gradients, the checks across ranks); conftest.run_on_two_ranks launches them and loads rank 0's result.

Deliberate bugs seen to fail: byol.py without its DistributedDataParallel wrap (test_ranks_stay_in_step[byol]:
the checksums differ); every rank restoring rank 0's augmentation RNG on resume (test_resume_..._exact[simsiam]);
MoCo enqueueing only its own rank's keys (test_resume_..._exact[moco-v2]: the checksums differ).
"""

import dist_methods
import dist_simsiam
import dist_swav
import pytest
import torch
from conftest import assert_resume_is_exact, checkpoint, run_on_two_ranks, run_script


def test_simsiam_gradients_data_and_knn_match_one_process(tmp_path):
    res, ref = run_on_two_ranks(dist_simsiam, tmp_path), dist_simsiam.single_process_reference()
    assert res["indices"] == ref["indices"]  # the two ranks' shares make up the one-process global batch
    names = [name for name, _ in dist_simsiam.make_model().named_parameters()]
    for mode in ("eval", "train"):
        assert res[f"loss_{mode}"] == pytest.approx(ref[f"loss_{mode}"], abs=1e-6)
        assert len(res[f"grads_{mode}"]) == len(ref[f"grads_{mode}"]) == len(names)
        for name, g, g_ref in zip(names, res[f"grads_{mode}"], ref[f"grads_{mode}"]):
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{mode} {name}: {m}")
    assert res["weights_equal_across_ranks"]
    torch.testing.assert_close(res["features"], ref["features"], atol=1e-5, rtol=1e-4)
    assert res["knn"] == ref["knn"]


def test_gathered_losses_shuffle_and_queue_match_one_process(tmp_path):
    res, ref = run_on_two_ranks(dist_methods, tmp_path), dist_methods.single_process_reference()
    for name in ("simclr", "moco_v3"):  # loss and DDP-averaged gradients == one process, global batch
        assert res[name][0] == pytest.approx(ref[name][0], abs=1e-6), name
        for g, g_ref in zip(res[name][1], ref[name][1]):
            torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    assert res["shuffle_undone"] and res["saw_other_rank"] and res["saw_a_share"]
    assert res["queues_equal"]
    x1, n = dist_methods.make_inputs()[0], dist_methods.GLOBAL_BATCH // 2
    torch.testing.assert_close(res["queue_head"], torch.cat([x1[:n], x1[n:] + 1]))  # rank 0's keys, then rank 1's


SMALL = "--batch-size 64 --epochs 2 --eval-every -1"
METHODS = {
    "simsiam": ("simsiam.py", "--dim 64 --pred-dim 16"),
    "byol": ("byol.py", "--dim 32 --hidden-dim 64"),  # a target network without gradient inside DDP
    "simclr-v2": ("simclr.py", "--version v2 --dim 32"),  # negatives gathered with gradient through DDP
    "moco-v2": ("moco.py", "--version v2 --dim 32 --hidden-dim 64 --queue-size 512"),  # Shuffling BN, the queue
    "moco-v3": ("moco.py", "--version v3 --dim 32 --hidden-dim 64"),  # keys gathered, labels offset by rank
    # per-rank queues (128 = 2 global batches: used from step 2), distributed Sinkhorn, 2 local crops
    "swav": (
        "swav.py",
        "--prototypes 16 --dim 16 --hidden-dim 32 --queue-length 128 --queue-start-epoch 0 --local-crops 2",
    ),
}


def assert_ranks_in_step(run_dir, steps):
    ckpt = checkpoint(run_dir)
    assert ckpt["step"] == steps and len(ckpt["aug_rng"]) == 2 and not torch.equal(*ckpt["aug_rng"])
    sums = ckpt["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1], sums  # every rank ends with bitwise the same weights
    return ckpt


@pytest.mark.parametrize("method", ["byol", "simclr-v2", "moco-v3"])
def test_ranks_stay_in_step(tmp_path, method):
    """The resume test below covers SimSiam and MoCo v2 the same way."""
    script, flags = METHODS[method]
    r = run_script(script, flags, SMALL, "--max-steps 2 --output-dir", tmp_path, torchrun=2, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_ranks_in_step(tmp_path, 2)


@pytest.mark.parametrize("method", ["simsiam", "moco-v2", "swav"])
def test_resume_under_torchrun_is_exact(tmp_path, method):
    script, flags = METHODS[method]
    run = assert_resume_is_exact(script, f"{flags} {SMALL}", tmp_path, n=4, k=2, torchrun=2)
    ckpt = assert_ranks_in_step(run, 4)
    assert assert_ranks_in_step(tmp_path / "resumed", 4)["rank_checksums"] == ckpt["rank_checksums"]
    if method == "moco-v2":  # 4 steps of 64 keys, every rank's, in the queue; one BN split per process
        assert int(ckpt["model"]["queue_ptr"]) == 4 * 64 and ckpt["config"]["bn_splits"] == 1
    if method == "swav":  # every rank's own queue, (rank, 2 assigned crops, 128 / 2, dim), full of unit vectors
        queue = ckpt["queue"]
        assert queue.shape == (2, 2, 64, 16) and not torch.equal(queue[0], queue[1])
        torch.testing.assert_close(queue.norm(dim=-1), torch.ones(2, 2, 64))


def test_swav_codes_match_one_process_with_the_union_of_the_queues(tmp_path):
    codes = run_on_two_ranks(dist_swav, tmp_path)["codes"]
    torch.testing.assert_close(codes, dist_swav.single_process_reference(), rtol=1e-5, atol=1e-6)
