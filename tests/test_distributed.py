"""torchrun --nproc_per_node=2 with gloo for SimCLR, MoCo and BYOL: what depends on the global batch matches one
process on the whole batch (tests/dist_methods.py), and each script runs under torchrun."""

import dist_methods as D
import pytest
import torch
from conftest import REPO, checkpoint, run_script


def test_gathered_losses_shuffle_and_queue_match_one_process(tmp_path):
    out = tmp_path / "dist.pt"
    r = run_script(REPO / "tests" / "dist_methods.py", out, torchrun=2, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res, ref = torch.load(out, weights_only=True), D.single_process_reference()
    for name in ("simclr", "moco_v3"):  # loss and DDP-averaged gradients == one process, global batch
        assert res[name][0] == pytest.approx(ref[name][0], abs=1e-6), name
        for g, g_ref in zip(res[name][1], ref[name][1]):
            torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    assert res["shuffle_undone"] and res["saw_other_rank"] and res["saw_a_share"]
    assert res["queues_equal"]
    x1, n = D.make_inputs()[0], D.GLOBAL_BATCH // D.WORLD
    torch.testing.assert_close(res["queue_head"], torch.cat([x1[:n], x1[n:] + 1]))  # rank 0's keys, then rank 1's


@pytest.mark.parametrize(
    "script,flags",
    [
        ("moco.py", "--version v2 --queue-size 512"),  # Shuffling BN across processes, gathered queue
        ("simclr.py", "--version v2"),  # negatives gathered with gradient through DDP
        ("byol.py", ""),  # a target network without gradient inside DDP
    ],
    ids=["moco-v2", "simclr-v2", "byol"],
)
def test_scripts_run_under_torchrun(tmp_path, script, flags):
    r = run_script(
        script,
        flags,
        "--max-steps 2 --batch-size 64 --dim 32 --eval-every -1 --output-dir",
        tmp_path,
        torchrun=2,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = checkpoint(tmp_path)
    assert ckpt["step"] == 2 and len(ckpt["aug_rng"]) == 2
    if script == "moco.py":
        assert int(ckpt["model"]["queue_ptr"]) == 2 * 64 and ckpt["config"]["bn_splits"] == 1
