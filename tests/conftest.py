"""Shared test helpers: run a trainer in a subprocess, make small image folders, read a run folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def script_command(*args, torchrun=0):
    """(command, environment) running `python <args>`, or torchrun with that many processes, from the repo root.
    A str argument is split on spaces ("simsiam.py --max-steps 2"); paths and numbers stay single arguments."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if torchrun else "2"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    words = [w for a in args for w in (a.split() if isinstance(a, str) else [str(a)])]
    return (launcher if torchrun else [sys.executable]) + words, env


def run_script(*args, timeout=300, torchrun=0):
    """Run a script to completion (nothing in the tests downloads); returns the CompletedProcess."""
    cmd, env = script_command(*args, torchrun=torchrun)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


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
