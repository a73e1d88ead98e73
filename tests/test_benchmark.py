"""benchmark.py runs on the CPU at a tiny size and reports every figure with a plausible value (so it cannot rot
unnoticed): an image folder through DataLoader workers, with the torchvision + PIL comparison."""

import json
import math

import pytest
from conftest import run_script


def test_benchmark_reports_every_figure(image_folder, tmp_path):
    folder, out = image_folder(n_train=32, side=40), tmp_path / "bench.json"
    r = run_script(
        "benchmark.py simsiam.py --arch tiny --image-size 32 --batch-size 8 --workers 1 --steps 2 --warmup 1",
        "--torchvision --device cpu --data",
        folder,
        "--json",
        out,
        timeout=120,
        env={"TMPDIR": str(tmp_path)},  # the method's run folder goes in a temporary directory: under tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(out.read_text())
    assert {k: f[k] for k in ("method", "image_size", "batch_per_process", "views", "device", "workers")} == {
        "method": "simsiam",
        "image_size": 32,
        "batch_per_process": 8,
        "views": 2,
        "device": "cpu",
        "workers": 1,
    }
    assert f["device_images_per_s"] is None  # folder on a CPU: the workers colour and normalise, no device side
    rates = [
        "workers_images_per_s",
        "loader_images_per_s",
        "torchvision_images_per_s",
        "step_images_per_s",
        "run_images_per_s",
        "torchvision_run_images_per_s",
        "backbone_images_per_s",
    ]
    for key in rates:
        assert math.isfinite(f[key]) and 0 < f[key] < 1e6, (key, f[key])
    # The bare backbone is part of the step (which adds heads, loss and optimizer) and the run adds the loading,
    # so the shares lie below 1 on a quiet machine; two-step timings on a loaded one vary 5x, so no tighter bound.
    assert f["step_share_of_backbone"] == f["step_images_per_s"] / f["backbone_images_per_s"]
    assert f["run_share_of_backbone"] == f["run_images_per_s"] / f["backbone_images_per_s"]
    assert 0 < f["step_share_of_backbone"] < 20 and 0 < f["run_share_of_backbone"] < 20
    for key in ("step", "run", "torchvision_run", "backbone"):
        assert 50 < f[f"{key}_peak_memory_mb"] < 64 * 1024, key  # process peak RSS on the CPU, in MiB
    assert f["memory"] == "process peak RSS" and f["threads"] >= 1
    for line in ("workers: decode + crop", "torchvision + PIL", "bare backbone", "step's share of the bare backbone"):
        assert line in r.stdout, line


def test_benchmark_refuses_more_steps_than_the_data_holds(image_folder):
    r = run_script(
        "benchmark.py simsiam.py --arch tiny --image-size 32 --batch-size 8 --steps 9 --data", image_folder()
    )
    assert r.returncode == 2 and "error: --warmup 2 + --steps 9 batches exceed the 2 batches" in r.stderr, r.stderr


@pytest.mark.parametrize("method", ["instdisc", "cmc"])
def test_benchmark_runs_the_memory_bank_methods(tmp_path, method):
    """InstDisc and CMC take each batch's dataset indices (their bank rows) with the views; CMC's encoders take Lab
    channels, so it has no bare-backbone figure and says why."""
    out = tmp_path / "bench.json"
    r = run_script(
        f"benchmark.py {method}.py --batch-size 32 --steps 1 --warmup 1 --device cpu --json",
        out,
        timeout=120,
        env={"TMPDIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(out.read_text())
    assert 0 < f["step_images_per_s"] < 1e6 and 0 < f["run_images_per_s"] < 1e6
    if method == "cmc":
        assert "backbone_images_per_s" not in f and "bare backbone: not measured (its two encoders" in r.stdout
    else:
        assert 0 < f["backbone_images_per_s"] < 1e6
