"""The temperature study: SimCLR (and MoCo v2) trained at several temperatures tau, each run's kNN top-1,
alignment, uniformity (Wang & Isola 2020, arXiv:2005.10242) and the hardest negative's share of the softmax,
collected into a table and a figure. It tests two readings of tau on trained networks: "uniformity needs a
moderate tau" against Wang & Liu 2021 (arXiv:2012.09740): uniformity keeps improving as tau falls while accuracy
peaks at a moderate tau (the uniformity-tolerance dilemma). README.md, "The temperature study", has the results.

    python tools/temperature_study.py                    # SimCLR, 5 taus x 2 seeds, built-in data, 60 steps each
    python tools/temperature_study.py --methods simclr moco-v2 --seeds 0 1 2 --out runs/temperature
    python tools/temperature_study.py -- --data cifar10 --epochs 100   # after --: flags given to every run

Runs go one at a time into <out>/<method>-tau<tau>-seed<seed>/ (ordinary run folders). A finished run (its
metrics.jsonl ends with the final row) is skipped, an interrupted one continues (--resume auto), so the script can
be stopped and started again. Writes <out>/temperature.csv (one row per run: the final row of its
metrics.jsonl), <out>/temperature.md (mean +- std over seeds) and <out>/temperature.png; --collect writes them
from the runs finished so far, training nothing. The figure needs matplotlib, an optional dependency of this
script only (pip install matplotlib); without it the tables are still written.
"""

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {"simclr": ("simclr.py", "--version v1"), "moco-v2": ("moco.py", "--version v2")}
# The committed study's CPU budget: the first 60 of one epoch's 156 steps at batch 64, no warmup (the cosine
# has come down to 0.68 of the peak lr), one evaluation at the end.
DEFAULT_FLAGS = "--batch-size 64 --epochs 1 --warmup-epochs 0 --max-steps 60 --eval-every 0 --log-every 20".split()
COLUMNS = [
    ("eval/knn_top1", "kNN top-1"),
    ("eval/linear_top1", "linear top-1"),
    ("eval/alignment", "alignment"),
    ("eval/uniformity", "uniformity"),
    ("eval/hardest_negative_share", "hardest-negative share"),
]

parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], usage="%(prog)s [options] [-- flags given to every run]"
)
parser.add_argument("--methods", nargs="+", default=["simclr"], choices=list(METHODS))
parser.add_argument("--taus", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.5, 1.0])
parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
parser.add_argument("--out", default="runs/temperature", help="folder of the runs, the tables and the figure")
parser.add_argument("--collect", action="store_true", help="train nothing: tables and figure of the finished runs")


def final_row(run_dir):
    """The final row of a run's metrics.jsonl, or None while the run is unfinished."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[-1] if rows and rows[-1].get("final") else None


def train(method, tau, seed, flags, out):
    """One run (or what is left of it); returns its folder."""
    script, method_flags = METHODS[method]
    run_dir = out / f"{method}-tau{tau:g}-seed{seed}"
    if final_row(run_dir) is not None:
        print(f"{run_dir}: finished, skipped", flush=True)
        return run_dir
    cmd = [sys.executable, str(REPO / script), *method_flags.split(), *flags]
    cmd += ["--temperature", str(tau), "--seed", str(seed), "--output-dir", str(run_dir), "--resume", "auto"]
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        sys.exit(f"{run_dir}: the run failed (its output is above); fix it and start the study again")
    return run_dir


def summary(rows):
    """Mean and sample std over seeds of each column, per (method, tau)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["tau"]), []).append(r)
    out = []
    for (method, tau), group in sorted(groups.items()):
        s = {"method": method, "tau": tau, "seeds": len(group)}
        for key, _ in COLUMNS:
            values = [r[key] for r in group if r.get(key) is not None]
            s[key] = statistics.mean(values) if values else None
            s[key + " std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(s)
    return out


def write_tables(rows, out):
    keys = ["method", "tau", "seed", "step"] + [k for k, _ in COLUMNS]
    with open(out / "temperature.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [
        "| method | tau | seeds | " + " | ".join(name for _, name in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for s in summary(rows):
        cells = []
        for key, _ in COLUMNS:
            pct = "top1" in key  # accuracies in %, the rest as they are
            m, sd = s[key], s[key + " std"]
            cells.append("-" if m is None else f"{m * 100:.1f} ± {sd * 100:.1f}" if pct else f"{m:.4g} ± {sd:.2g}")
        lines.append(f"| {s['method']} | {s['tau']:g} | {s['seeds']} | " + " | ".join(cells) + " |")
    (out / "temperature.md").write_text("\n".join(lines) + "\n")


def plot(rows, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no figure (pip install matplotlib); the tables are written")
        return
    panels = [("eval/knn_top1", "kNN top-1 (%)"), ("eval/alignment", "alignment (lower: views agree)")]
    panels += [("eval/uniformity", "uniformity (lower: more uniform)")]
    panels += [("eval/hardest_negative_share", "hardest negative's share (log scale)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    stats = summary(rows)
    for ax, (key, label) in zip(axes, panels):
        for method in sorted({s["method"] for s in stats}):
            pts = [s for s in stats if s["method"] == method and s[key] is not None]
            scale = 100 if "top1" in key else 1
            ax.errorbar(
                [s["tau"] for s in pts],
                [s[key] * scale for s in pts],
                yerr=[s[key + " std"] * scale for s in pts],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set_xscale("log")
        ax.set_xlabel("temperature tau")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[-1].set_yscale("log")
    axes[0].legend()
    methods = sorted({r["method"] for r in rows})
    seeds = [f"{m} {sorted({r['seed'] for r in rows if r['method'] == m})}" for m in methods]
    fig.suptitle(f"mean ± std over seeds: {', '.join(seeds)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "temperature.png", dpi=80)
    print(f"wrote {out / 'temperature.png'}")


def main():
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    flags = argv[cut + 1 :] or DEFAULT_FLAGS  # the built-in data at a CPU budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bad = [tau for tau in args.taus if not (tau > 0 and math.isfinite(tau))]
    if bad:
        parser.error(f"--taus: {bad[0]} is not a positive number")
    rows = []
    for method in args.methods:
        for tau in args.taus:
            for seed in args.seeds:
                run_dir = out / f"{method}-tau{tau:g}-seed{seed}"
                final = final_row(run_dir if args.collect else train(method, tau, seed, flags, out))
                if final is None:
                    print(f"{run_dir}: not finished, left out")
                    continue
                rows.append({"method": method, "tau": tau, "seed": seed, **final})
    write_tables(rows, out)
    print((out / "temperature.md").read_text())
    plot(rows, out)


if __name__ == "__main__":
    main()
