"""Does `compile: true` (torch.compile, inductor) label like eager mode on the trained toy model?

    python benchmarks/toyworld/compile_agreement.py [--num-images 4] [--device cpu] [--dtype float32]

Random-weight models (sd14-arch) are too sensitive to rounding for this check (BENCHMARKS.md), so it runs
the shipped toy model with configs/toyworld.yaml on held-out scenes, eager then compiled, and prints the
fraction of equal labels and both timings (the compiled warm-up includes compiling).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # labels.py


def main(argv: list[str] | None = None) -> int:
    import torch
    from labels import held_out_batch

    from emerdiff_pl.segmenter import EmerDiffSegmenter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config, images = held_out_batch(args.num_images, args.seed)
    config.update(dtype=args.dtype)
    seeds = list(range(args.num_images))
    labels = {}
    for compiled in (False, True):
        model = EmerDiffSegmenter(**{**config, "compile": compiled}).to(args.device)
        start = time.perf_counter()
        model.segment(images[:1], seeds=seeds[:1])
        warm = time.perf_counter() - start
        start = time.perf_counter()
        labels[compiled] = model.segment(images, seeds=seeds).labels
        print(
            f"compile={compiled}: warm-up {warm:.1f} s, {args.num_images} images {time.perf_counter() - start:.1f} s"
        )
    agreement = (labels[False] == labels[True]).float().mean().item()
    print(f"label_agreement_compiled_vs_eager: {agreement:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
