"""The run's plumbing, the same in every method file: flags refused at parse time, a diverging run stopped with
one line and its last good checkpoint kept, strict metrics.jsonl, the run folder (a file, a lock held by a live
run, rows of redone steps dropped, a finished run, a corrupt checkpoint)."""

import importlib
import json
import math
import re
import subprocess
import time

import pytest
import torch
import torch.nn as nn
from conftest import REPO, read_metrics, run_script, script_command

import common as C

METHODS = [
    "simsiam.py",
    "byol.py",
    "simclr.py",
    "moco.py",
    "invaspread.py",
    "cpc.py",
    "dino.py",
    "instdisc.py",
    "cmc.py",
    "swav.py",
]
TINY = {  # the smallest heads each method takes: CPU runs of a few steps
    "simsiam.py": "--dim 64 --pred-dim 16",
    "byol.py": "--dim 32 --hidden-dim 64",
    "simclr.py": "--dim 32",
    "moco.py": "--dim 32 --hidden-dim 64 --queue-size 256",
    "invaspread.py": "--dim 32",
    "cpc.py": "--target-dim 8 --context-dim 8",
    "dino.py": "--out-dim 32 --hidden-dim 64 --bottleneck-dim 16 --local-crops 1",
    "instdisc.py": "--dim 32 --nce-k 16",
    "cmc.py": "--dim 16 --nce-k 16",
    "swav.py": "--dim 16 --hidden-dim 32 --prototypes 16",
}

# Every numeric flag of every method file: values refused at parse time, and boundary values accepted.
FLAG_VALUES = {
    "image_size": (["0", "-3", "x"], ["1"]),
    "epochs": (["0"], ["1"]),
    "batch_size": (["0", "-1", "2.5"], ["2"]),
    "lr": (["0", "-0.1", "nan", "inf", "1e300"], ["1e-9", "1e30"]),
    "wd": (["-1e-6", "nan"], ["0"]),
    "workers": (["-1"], ["0"]),
    "seed": (["-1"], ["0"]),
    "max_steps": (["-1"], ["0"]),
    "log_every": (["0"], ["1"]),
    "eval_every": (["-2"], ["-1", "0"]),
    "knn_k": (["0"], ["1"]),
    "knn_t": (["0", "-1"], ["0.01"]),
    "proj_layers": (["0"], ["1"]),
    "dim": (["0"], ["1"]),
    "pred_dim": (["0"], ["1"]),
    "hidden_dim": (["0"], ["1"]),
    "warmup_epochs": (["-1"], ["0"]),
    "lars_eta": (["0"], ["1e-3"]),
    "temperature": (["0", "-0.5", "nan"], ["0.05"]),
    "color_strength": (["-0.5"], ["0"]),
    "queue_size": (["0"], ["1"]),
    "bn_splits": (["0"], ["1"]),
    "tau_base": (["-0.1", "1.01"], ["0", "1"]),
    "moco_m": (["-0.1", "1.5"], ["0", "1"]),
    "crop_min": (["0", "1.2"], ["1", "0.01"]),
    "patch_size": (["0"], ["1"]),
    "steps_to_ignore": (["-1"], ["0"]),
    "steps_to_predict": (["0"], ["1"]),
    "target_dim": (["0"], ["1"]),
    "context_dim": (["0"], ["1"]),
    "min_lr": (["-1e-6", "nan"], ["0"]),
    "wd_end": (["-1e-6", "nan"], ["0"]),
    "clip_grad": (["-1", "nan"], ["0"]),
    "freeze_last_layer": (["-1"], ["0"]),
    "out_dim": (["0", "1"], ["2"]),
    "bottleneck_dim": (["0"], ["1"]),
    "momentum_teacher": (["-0.1", "1.01"], ["0", "1"]),
    "teacher_temp": (["0", "-0.04"], ["0.04"]),
    "warmup_teacher_temp": (["0", "-0.04"], ["0.04"]),
    "warmup_teacher_temp_epochs": (["-1"], ["0"]),
    "student_temp": (["0", "-0.1"], ["0.1"]),
    "center_momentum": (["-0.1", "1.01"], ["0", "1"]),
    "drop_path": (["-0.1", "1.01"], ["0", "0.5"]),
    "local_crops": (["-1"], ["0"]),
    "local_size": (["0"], ["1"]),
    "local_scale_min": (["0", "-0.1", "1.01"], ["0.05", "1"]),
    "local_scale_max": (["0", "-0.1", "1.01"], ["0.4", "1"]),
    "nce_k": (["-1", "2.5"], ["0"]),
    "nce_t": (["0", "-0.1"], ["0.07"]),
    "nce_m": (["-0.1", "1", "1.5"], ["0", "0.99"]),
    "start_warmup": (["-0.1"], ["0"]),
    "final_lr": (["-0.1"], ["0"]),
    "epsilon": (["0", "0.01", "101"], ["0.02", "100"]),
    "sinkhorn_iterations": (["0"], ["1"]),
    "prototypes": (["0", "1"], ["2"]),
    "queue_length": (["-1"], ["0"]),
    "queue_start_epoch": (["-1"], ["0"]),
    "freeze_prototypes_epochs": (["-1"], ["0", "0.5"]),
}


@pytest.mark.parametrize("script", METHODS)
def test_every_numeric_flag_refuses_bad_values_at_parse_time(script, capsys):
    """argparse's one `error:` line names the flag; a new numeric flag must be added to FLAG_VALUES."""
    parser = importlib.import_module(script[:-3]).parser
    numeric = {a.dest: a.option_strings[0] for a in parser._actions if a.type is not None}
    assert set(numeric) <= set(FLAG_VALUES), f"no FLAG_VALUES entry for {set(numeric) - set(FLAG_VALUES)}"
    for dest, flag in numeric.items():
        bad, good = FLAG_VALUES[dest]
        for value in bad + ["nan", "inf", "zz"]:
            with pytest.raises(SystemExit) as e:
                parser.parse_args([flag, value])
            lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
            assert e.value.code == 2 and len(lines) == 1 and f"argument {flag}:" in lines[0], (flag, value, lines)
        for value in good:
            assert getattr(parser.parse_args([flag, value]), dest) == float(value), (flag, value)


def test_common_number_types():
    assert C.positive_int("3") == 3 and C.nonnegative_int("0") == 0 and C.int_at_least(-1)("-1") == -1
    assert C.in_range(0, 1, lo_open=True)("1") == 1.0 and C.nonnegative_float("0") == 0.0
    assert C.in_range(0, 1, hi_open=True)("0") == 0.0
    bad = [(C.positive_int, "0"), (C.in_range(0, 1, lo_open=True), "0"), (C.in_range(0, 1, hi_open=True), "1")]
    for parse, text in [*bad, (C.positive_float, "inf")]:
        with pytest.raises(C.argparse.ArgumentTypeError):
            parse(text)


def _one_error_line(r, *expected):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert all(e in lines[0] for e in expected), lines[0]
    return lines[0]


def _strict_rows(run_dir):
    """metrics.jsonl as strict JSON: NaN or Infinity tokens raise."""

    def refuse(token):
        raise ValueError(f"{token} in metrics.jsonl")

    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def _finite_checkpoint(run_dir):
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    return ckpt


def test_zero_steps_then_a_diverging_resume_keeps_the_last_good_checkpoint(tmp_path):
    """--max-steps 0 saves the initial state; a resume with a huge lr stops at the first non-finite loss with
    one line naming the step and the lr, leaves that checkpoint as it was, and metrics.jsonl strict JSON."""
    out = tmp_path / "run"
    flags = ["simsiam.py --lr 1e30 --batch-size 32 --eval-every -1 --log-every 1", TINY["simsiam.py"]]
    r = run_script(flags, "--max-steps 0 --output-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _finite_checkpoint(out)["step"] == 0 and not [x for x in read_metrics(out) if "train/loss" in x]
    before = (out / "ckpt.pt").read_bytes()
    r = run_script(flags, "--max-steps 4 --resume auto --output-dir", out)
    _one_error_line(r, "diverged", "the loss is nan at step", "(lr ", "ckpt.pt keeps", "lower --lr")
    assert (out / "ckpt.pt").read_bytes() == before
    train = [x for x in _strict_rows(out) if "train/loss" in x]
    bad_step = int(r.stderr.split("at step ")[1].split()[0])
    assert [x["step"] for x in train] == list(range(bad_step)) and all(math.isfinite(x["train/loss"]) for x in train)


# A weight decay (SGD) or LARS trust coefficient of 1e30 (LARC clipping off) with --lr 1e30: the first update
# overflows the weights, while the one logged loss (of the initial weights) is finite, so only the checks before
# the epoch's evaluation and in save() can stop the run. Adam (cpc.py) moves a weight by about lr whatever the
# gradient, so there an L2 term of 1e30 does it: its second moment overflows and the update is nan.
OVERFLOW = {
    "simsiam.py": "--wd 1e30",
    "byol.py": "--lars-eta 1e30 --no-lars-clip",
    "simclr.py": "--lars-eta 1e30 --no-lars-clip",
    "moco.py": "--wd 1e30",
    "invaspread.py": "--wd 1e30",
    "cpc.py": "--wd 1e30",
    "dino.py": "--wd 1e30 --optimizer sgd",
    "instdisc.py": "--wd 1e30",
    "cmc.py": "--wd 1e30",
    "swav.py": "--lars-eta 1e30 --no-lars-clip --warmup-epochs 0",  # the warmup starts at --start-warmup
}


@pytest.mark.parametrize("script", METHODS)
def test_weights_are_checked_before_every_save(tmp_path, script, image_folder):
    """One step per epoch: the epoch's end must stop before it evaluates (no kNN of a diverged network is
    written) and before it saves."""
    data = image_folder(n_train=32, n_val=8)
    flags = "--lr 1e30 --batch-size 32 --epochs 2 --eval-every 1 --log-every 1 --arch tiny --workers 0 --output-dir"
    r = run_script(script, "--data", data, TINY[script], OVERFLOW[script], flags, tmp_path / "run")
    _one_error_line(r, "diverged", "the weights are not finite after 1 step", "no checkpoint was written")
    assert not (tmp_path / "run" / "ckpt.pt").exists() and not (tmp_path / "run" / "backbone.pt").exists()
    assert not [row for row in _strict_rows(tmp_path / "run") if "eval/knn_top1" in row]


def test_check_finite_looks_at_parameters_and_buffers(tmp_path):
    env = C.Env(0, 1, 0, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    C.check_finite(model, optimizer, env, 7, tmp_path)
    for tensor in (model[0].weight, model[1].running_var):  # a parameter, a buffer
        with torch.no_grad():
            tensor[0] = float("nan")
        with pytest.raises(C.UserError, match=r"not finite after 7 step\(s\) \(lr 0.5\).*no checkpoint was written"):
            C.check_finite(model, optimizer, env, 7, tmp_path)
        with torch.no_grad():
            tensor[0] = 1.0


def test_logger_writes_strict_json_and_stops_at_a_non_finite_loss(tmp_path):
    env = C.Env(0, 1, 0, torch.device("cpu"))
    logger = C.Logger(tmp_path, env, 10, 32)
    logger.write([{"step": 0, "eval/collapse_std": float("nan"), "eval/x": float("inf")}])
    for s, loss in enumerate([1.0, 2.0, float("inf"), 3.0]):
        logger.step(s, 0, torch.tensor(loss), 0.1)
    with pytest.raises(C.UserError, match="the loss is inf at step 2"):
        logger.flush(steps_per_epoch=10)
    rows = _strict_rows(tmp_path)
    assert rows[0]["eval/collapse_std"] is None and rows[0]["eval/x"] is None
    assert [r["step"] for r in rows[1:]] == [0, 1]  # the rows before the non-finite loss


def test_load_checkpoint_refuses_incomplete_other_and_non_finite_checkpoints(tmp_path):
    model, config = nn.Linear(2, 2), {"lr": 0.1}
    good = {"method": "simsiam", "config": config, "step": 3, "model": model.state_dict(), "optimizer": {}}
    good |= {"aug_rng": [], "rng": torch.get_rng_state()}
    cases = {
        "good": (good, None),
        "truncated": (None, "truncated or corrupt"),
        "incomplete": ({k: v for k, v in good.items() if k != "optimizer"}, "incomplete checkpoint (no optimizer)"),
        "other model": (good | {"model": nn.Linear(2, 3).state_dict()}, "another version of the file"),
        "nan weight": (good | {"model": {"weight": torch.full((2, 2), math.nan), "bias": torch.zeros(2)}}, "weight"),
        "other lr": (good | {"config": {"lr": 0.2}}, "was trained with lr=0.2, but this run has lr=0.1"),
        "older file": (good | {"config": {}}, "written by an older simsiam.py, without --lr"),  # a flag added since
    }
    for name, (ckpt, error) in cases.items():
        path = tmp_path / f"{name}.pt"
        if ckpt is None:
            torch.save(good, path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            torch.save(ckpt, path)
        if error is None:
            assert C.load_checkpoint(path, "simsiam", config, model)["step"] == 3
        else:
            with pytest.raises(C.UserError, match=re.escape(error)):
                C.load_checkpoint(path, "simsiam", config, model)


@pytest.mark.parametrize("case", ["output dir is a file", "one image per process"])
def test_bad_run_settings_give_one_line(tmp_path, case):
    (tmp_path / "file").write_text("")
    args, expected = {
        "output dir is a file": (["--output-dir", tmp_path / "file"], "is a file"),
        "one image per process": (["--batch-size", 1, "--output-dir", tmp_path / "r"], "batch norm needs 2"),
    }[case]
    _one_error_line(run_script("simsiam.py --max-steps 1 --eval-every -1", TINY["simsiam.py"], *args), expected)


@pytest.mark.parametrize(
    "command, expected",
    [
        ("swav.py --local-crops 2 --local-size 64", "larger than the global crops"),
        ("swav.py --queue-length 3", "no queue left"),
        ("dino.py --arch vit_tiny --local-crops 2 --local-size 1", "below the ViT's 4-px patch"),
        ("instdisc.py --nce-k 100", "not below the 16 training images"),
    ],
)
def test_method_settings_that_cannot_work_give_one_line(tmp_path, image_folder, command, expected):
    """Settings the flags' types cannot judge alone (found by trying the new files as a new user): a local crop
    larger than the global one, a queue shorter than a batch, a local crop smaller than a ViT patch, more noise
    rows than images. Each was a traceback or a silently degenerate run before."""
    args = ["--batch-size 8 --workers 0 --max-steps 1 --eval-every -1 --data", image_folder(), "--output-dir"]
    _one_error_line(run_script(command, *args, tmp_path / "r"), expected)


def test_a_live_run_locks_its_folder_and_a_killed_one_does_not(tmp_path):
    """A second run on the folder of a live one refuses; once the first is killed (mid-epoch, no checkpoint), the
    next run starts, and metrics.jsonl holds each of its steps once (the killed run's rows are dropped)."""
    out = tmp_path / "run"
    args = ["simsiam.py --batch-size 32 --log-every 1 --eval-every -1", TINY["simsiam.py"], "--output-dir", out]
    cmd, env = script_command(*args)
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        assert (out / "metrics.jsonl").exists()
        r = run_script(*args, "--resume auto --max-steps 2")
        _one_error_line(r, "in use by a running process", str(first.pid))
    finally:
        first.kill()
        first.wait()
    assert not (out / "ckpt.pt").exists() and read_metrics(out)  # the killed run logged steps but saved nothing
    r = run_script(*args, "--resume auto --max-steps 2")
    assert r.returncode == 0 and "starting at step 0" in r.stdout, r.stderr[-3000:]
    assert [x["step"] for x in read_metrics(out) if "train/loss" in x] == [0, 1]


def test_resume_from_an_older_checkpoint_a_finished_run_and_a_truncated_checkpoint(tmp_path, image_folder):
    """A 4-step run (one epoch of 8 images); a resume of it says it is finished and changes nothing; a resume of
    the same folder from another run's step-2 checkpoint redoes steps 2-3, each logged once; a truncated
    checkpoint is one line."""
    folder = image_folder(n_train=8, side=32, n_val=4)
    flags = ["simsiam.py --data", folder, "--batch-size 2 --epochs 1 --workers 0 --log-every 1 --eval-every -1"]
    flags += [TINY["simsiam.py"]]
    early, run = tmp_path / "early", tmp_path / "run"
    r = run_script(flags, "--max-steps 2 --output-dir", early)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script(flags, "--output-dir", run)
    assert r.returncode == 0, r.stderr[-3000:]
    files = lambda: {p.name: p.read_bytes() for p in run.iterdir() if p.name != "run.lock"}  # noqa: E731
    before = files()
    r = run_script(flags, "--resume auto --output-dir", run)
    assert r.returncode == 0 and "the run is finished, nothing to do" in r.stdout and not r.stderr, r.stderr
    assert files() == before
    r = run_script(flags, "--output-dir", run, "--resume", early / "ckpt.pt")
    assert r.returncode == 0 and "starting at step 2" in r.stdout, r.stderr[-3000:]
    assert [x["step"] for x in _strict_rows(run) if "train/loss" in x] == [0, 1, 2, 3]
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((early / "ckpt.pt").read_bytes()[:-1000])
    r = run_script(flags, "--output-dir", tmp_path / "t", "--resume", truncated)
    _one_error_line(r, "truncated or corrupt")
