"""Label held-out toy-world scenes with this checkout, or compare two such label files: does a change of the
fast path (not of the method) leave the labels of the trained toy model alone?

    python benchmarks/toyworld/labels.py --out new.pt [--num-images 4] [--seed 0]     # in each checkout
    python benchmarks/toyworld/labels.py --compare old.pt new.pt                     # fraction of equal pixels

Uses configs/toyworld.yaml and the shipped toyworld-ldm, float32 on the CPU (one torch thread by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def held_out_batch(num_images: int, seed: int):
    """configs/toyworld.yaml's model settings, and `num_images` held-out 128² scenes as (N, 3, H, W) in [0, 1]."""
    import numpy as np
    import torch
    import yaml

    from emerdiff_pl.datasets import toyworld

    config = yaml.safe_load((ROOT / "configs" / "toyworld.yaml").read_text())["model"]
    scenes = list(toyworld.generate_scenes(num_images, seed, 128))
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    return config, images


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the labels (N, 128, 128) here")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print the fraction of equal labels")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.compare:
        missing = [path for path in args.compare if not Path(path).is_file()]
        if missing:
            raise SystemExit(f"no label file {missing[0]!r}: write it first with --out")
        a, b = (torch.load(path) for path in args.compare)
        if a.shape != b.shape:
            raise SystemExit(f"label files differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        per_image = (a == b).flatten(1).float().mean(1)
        print("per image:", " ".join(f"{v:.6f}" for v in per_image.tolist()))
        print(f"label_agreement: {(a == b).float().mean().item():.6f}")
        return 0
    if not args.out:
        p.error("give --out FILE (label) or --compare A B")

    from emerdiff_pl.segmenter import EmerDiffSegmenter

    torch.set_num_threads(args.threads)
    config, images = held_out_batch(args.num_images, args.seed)
    model = EmerDiffSegmenter(**config)
    start = time.perf_counter()
    labels = model.segment(images, seeds=list(range(args.num_images))).labels
    print(f"{args.num_images} images in {time.perf_counter() - start:.1f} s")
    torch.save(labels, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
