#!/bin/bash
# Issue 12's GPU plan, one command within the device's 10 minutes (about 6-8 minutes on one H200, estimated; not
# yet run): benchmark.py for SimSiam, BYOL, SimCLR v2 and MoCo v2 at
#   - ResNet-18 / 32 px / batch 512 on the built-in data (held on the GPU, cropped and coloured there);
#   - ResNet-50 / 224 px / batch 256 on an image folder of JPEGs generated here (the carried tree is small);
# plus SimSiam with --compile at both sizes, and SimSiam R50 with the colour ops forced to the subset form (one
# host sync per op) to compare with CUDA's masked form. Writes one JSON per run and a summary under $OUT (or
# ./bench-gpu). Goals: SimSiam R18 under 2.5 s per 50k-image epoch; R50 SimSiam run >= 85% of the bare backbone;
# colour ops < 10% of an R50 step at batch 256.
#     bash tools/benchmark_gpu.sh
set -u
out=${OUT:-bench-gpu}
mkdir -p "$out"
jpegs=${JPEGS:-/tmp/bench-jpegs}
[ -d "$jpegs/train" ] || python tools/make_jpegs.py "$jpegs" 2560 &  # 10 batches of 256, made while R18 runs
common="--device cuda --steps 10 --warmup 3"
run() {  # name, flags...
    name=$1; shift
    echo "== $name: $*"
    timeout 240 python benchmark.py $common "$@" --json "$out/$name.json" 2>&1 | grep -v '^{' | tail -12
}
run simsiam-r18 simsiam.py --arch resnet18 --image-size 32 --batch-size 512
run byol-r18 byol.py --arch resnet18 --image-size 32 --batch-size 512
run simclr-r18 simclr.py --arch resnet18 --image-size 32 --batch-size 512 --version v2
run moco-r18 moco.py --arch resnet18 --image-size 32 --batch-size 512 --version v2
run simsiam-r18-compile simsiam.py --arch resnet18 --image-size 32 --batch-size 512 --compile
wait
folder="--data $jpegs --arch resnet50 --image-size 224 --batch-size 256 --workers 16 --steps 5 --warmup 2"
run simsiam-r50 simsiam.py $folder
run byol-r50 byol.py $folder
run simclr-r50 simclr.py $folder --version v2
run moco-r50 moco.py $folder --version v2
run simsiam-r50-subset simsiam.py $folder --colour subset
run simsiam-r50-compile simsiam.py $folder --compile
python - "$out" <<'PY'
import json, sys
from pathlib import Path
print(f"{'run':22s} {'step':>8s} {'run':>8s} {'bare':>8s} {'device':>8s} {'workers':>8s} share colour% mem MiB")
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    colour = 100 * d["step_images_per_s"] / d["device_images_per_s"]  # colour time as % of a step's time
    print(f"{f.stem:22s} {d['step_images_per_s']:8.0f} {d['run_images_per_s']:8.0f} {d['backbone_images_per_s']:8.0f} "
          f"{d['device_images_per_s']:8.0f} {d['workers_images_per_s'] or 0:8.0f} {d['run_share_of_backbone']:5.2f} "
          f"{colour:6.1f} {d['step_peak_memory_mb']:7.0f}  s/50k-epoch {50000 / d['run_images_per_s']:.2f}")
PY
