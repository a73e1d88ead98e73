"""Write N ImageNet-like JPEGs (sides 400-640 px, smooth colour fields with noise, quality 90) into DIR/train/
<class>/, for benchmark.py's image-folder measurements without a data set on the machine.

    python tools/make_jpegs.py /tmp/jpegs 1024
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="the folder to write DIR/train/<class>/<i>.jpg into")
    ap.add_argument("n", type=int, nargs="?", default=1024, help="how many JPEGs (default 1024)")
    args = ap.parse_args()
    root, n = args.dir, args.n
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(400, 641, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8))
        a = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.int16) + rng.integers(-20, 21, (h, w, 3))
        folder = root / "train" / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


if __name__ == "__main__":
    main()
