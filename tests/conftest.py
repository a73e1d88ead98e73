"""Shared test helpers: run a trainer in a subprocess, make small image folders, read a run folder."""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def script_command(*args, torchrun=0, env=None):
    """(command, environment) running `python <args>`, or torchrun with that many processes, from the repo root.
    A str argument is split on spaces ("simsiam.py --max-steps 2"), a list flattened; paths and numbers stay
    single arguments. `env`: extra environment variables."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if torchrun else "2", **(env or {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    return (launcher if torchrun else [sys.executable]) + _words(args), env


def _words(args):
    """Flatten: a list or tuple into its items, a str split on spaces, anything else (a path, a number) as is."""
    if isinstance(args, (list, tuple)):
        return [w for a in args for w in _words(a)]
    return args.split() if isinstance(args, str) else [str(args)]


def run_script(*args, timeout=300, torchrun=0, env=None):
    """Run a script to completion (nothing in the tests downloads); returns the CompletedProcess."""
    cmd, env = script_command(*args, torchrun=torchrun, env=env)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_on_two_ranks(driver, tmp_path, timeout=240):
    """Run a torchrun driver (a tests/dist_*.py module, see dist_util.py) with 2 processes, gloo on the CPU;
    returns what its rank 0 saved."""
    out = tmp_path / "dist.pt"
    r = run_script(driver.__file__, out, torchrun=2, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def write_png(path, side, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """make(n_train, side, classes=2, n_val=...) -> DIR with DIR/train/<class>/*.png and DIR/val/<class>/*.png."""

    def make(n_train=16, side=32, classes=2, n_val=4):
        root = tmp_path / f"folder{side}"
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                write_png(root / split / f"class{i % classes}" / f"{i}.png", side, seed=i + 1000 * (split == "val"))
        return root

    return make


def checkpoint(run_dir):
    return torch.load(Path(run_dir) / "ckpt.pt", weights_only=True)


def assert_same_run(a, b):
    """Two run folders hold bitwise the same step, model (with any target network or queue) and optimizer."""
    ca, cb = checkpoint(a), checkpoint(b)
    assert ca["step"] == cb["step"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for i, state in ca["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, cb["optimizer"]["state"][i][name]), (i, name)


def assert_resume_is_exact(script, flags, tmp_path, n=4, k=2, torchrun=0):
    """N steps straight == k steps, stop, resume, N - k steps (under torchrun with that many processes if
    `torchrun`). Returns the straight run's folder."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = run_script(script, flags, "--max-steps", n, "--output-dir", straight, torchrun=torchrun)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script(script, flags, "--max-steps", k, "--output-dir", resumed, torchrun=torchrun)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script(script, flags, "--max-steps", n, "--output-dir", resumed, "--resume", "auto", torchrun=torchrun)
    assert r.returncode == 0 and f"starting at step {k}" in r.stdout, r.stderr[-3000:]
    assert_same_run(straight, resumed)
    return straight


def assert_trained_run(run_dir, steps):
    """A finished CPU run folder: its files, a finite loss for each of steps 0..steps-1, and a backbone.pt that
    the tiny backbone loads (torchvision-style keys, nothing of the heads)."""
    import common as C

    assert {"config.json", "metrics.jsonl", "ckpt.pt", "backbone.pt"} <= {p.name for p in Path(run_dir).iterdir()}
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(steps)) and all(math.isfinite(r["train/loss"]) for r in rows)
    C.TinyNet().load_state_dict(torch.load(Path(run_dir) / "backbone.pt", weights_only=True))


def first_loss(run_dir):
    return next(r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r)


def assert_runs_in_bfloat16(script, flags, tmp_path, float32_run, extra="--eval-every -1"):
    """Two steps of `float32_run`'s configuration with `--dtype bfloat16` (the GPU default, bf16 autocast) on the
    CPU: the run completes with finite losses, and its first loss is near the float32 run's but not equal to it
    (so the autocast was on)."""
    out = tmp_path / "bf16"
    r = run_script(script, flags, extra, "--dtype bfloat16 --max-steps 2 --output-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_trained_run(out, steps=2)
    bf16, fp32 = first_loss(out), first_loss(float32_run)
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.02, abs=0.02), (bf16, fp32)


@functools.lru_cache
def builtin_data():
    """The built-in data set, generated once per test process (about two seconds each time otherwise)."""
    import common as C

    return C.load_data("builtin")


@functools.lru_cache
def random_init_knn(seed):
    """kNN top-1 (k 200, T 0.1) on the built-in data of the tiny backbone a CPU run with this seed starts from
    (setup() seeds the global RNG and every method file builds its backbone first), with its batch-norm running
    statistics estimated on 30 batches of 256 augmented training views (SimSiam's small-image views), weights
    untouched. A training run's forward passes re-estimate those statistics without learning anything, and that
    alone lifts kNN by 5-6 points over PyTorch's initial statistics (mean 0, variance 1): 38.8 / 33.5 / 31.4%
    against 33.0 / 28.7 / 24.9% for seeds 0 / 1 / 2. So a learning test's margin is counted from this baseline."""
    import common as C
    import simsiam as S

    class Args:
        image_size, workers, knn_k, knn_t = 32, 0, 200, 0.1

    data, env = builtin_data(), C.Env(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(seed)
    net = C.TinyNet().train()
    loader = C.TrainLoader(data, S.view_recipe(32, small=True), 256, env, seed=seed)
    with torch.no_grad():
        for _, views in zip(range(30), loader.epoch(0)):
            net(views[0])
    return C.evaluate(net, data, env, Args)["eval/knn_top1"]


def final_knn(script, flags, seed, run_dir):
    """kNN top-1 at the end of a CPU run of `script` on the built-in data."""
    r = run_script(script, flags, "--eval-every", 0, "--seed", seed, "--output-dir", run_dir, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_metrics(run_dir)[-1]["eval/knn_top1"]


def assert_it_learns(script, flags, tmp_path, seed=0, margin=0.08, baseline=None, baseline_margin=0.03):
    """A short CPU run on the built-in data lifts kNN top-1 `margin` above the network it started from (with its
    batch-norm statistics estimated on the data: `random_init_knn`) and,
    with `baseline` (flags that switch the method's mechanism off: a frozen target, no stop-gradient),
    `baseline_margin` above the same run with the mechanism off."""
    trained = final_knn(script, flags, seed, tmp_path / "learn")
    assert trained > random_init_knn(seed) + margin, (random_init_knn(seed), trained)
    if baseline:
        off = final_knn(script, [flags, baseline], seed, tmp_path / "baseline")
        assert trained > off + baseline_margin, (off, trained)
