"""`emerdiff-pl predict` end to end against the segmenter alone, in one run: is data loading, label resizing,
PNG encoding and shard writing overlapped with the model, or serial to it?

Writes `--num-images` synthetic photo-like JPEGs of mixed shapes into WebDataset shards, runs the real CLI
(`python -m emerdiff_pl predict --config CONFIG ...`: DataModule, workers, writer) as a subprocess, and reads
the writer's summary: `wall_seconds` runs from the first predict hook (after the model has loaded) to the last
shard; `segment_seconds` is the time spent inside `predict_step` (segment() and the label resize). Their ratio
is the fraction of the loop the model runs; the target is ≥ 0.9 (end-to-end images/s within 10 % of
segment()'s). The first batch (warm-up, compile) is inside both.

    python benchmarks/end_to_end.py --config configs/tiny.yaml --num-images 32          # CPU plumbing check
    python benchmarks/end_to_end.py --config configs/sd14.yaml --num-images 64 \\
        --model.pretrained sd14-arch                                                       # GPU, random SD weights
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_shards(folder: Path, num: int, size: int, per_shard: int, seed: int = 0) -> str:
    """`num` smooth random JPEGs of mixed aspect ratios (1:1, 4:3, 3:4, 16:9) → shards; their brace URL."""
    import io

    from PIL import Image

    from emerdiff_pl.shardio import TarWriter

    rng = np.random.default_rng(seed)
    shapes = [(size, size), (size * 3 // 4, size), (size, size * 3 // 4), (size * 9 // 16, size)]
    shards = (num + per_shard - 1) // per_shard
    for s in range(shards):
        with TarWriter(folder / f"in-{s:06d}.tar") as tar:
            for i in range(s * per_shard, min(num, (s + 1) * per_shard)):
                h, w = shapes[i % len(shapes)]
                low = rng.random((4, 4, 3)).astype(np.float32)
                img = Image.fromarray((low * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                tar.write({"__key__": f"img{i:06d}", "jpg": buf.getvalue()})
    return str(folder / (f"in-{{000000..{shards - 1:06d}}}.tar" if shards > 1 else "in-000000.tar"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="predict config (tiny.yaml)")
    p.add_argument("--num-images", type=int, default=64, help="synthetic images (default 64)")
    p.add_argument("--size", type=int, default=640, help="long side of the synthetic images (default 640)")
    p.add_argument("--per-shard", type=int, default=16, help="images per input shard (default 16)")
    p.add_argument("--json", default=None, help="write the result here")
    args, extra = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="emerdiff-e2e-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "in").mkdir()
        urls = write_shards(tmp_path / "in", args.num_images, args.size, args.per_shard)
        out = tmp_path / "out"
        cmd = [
            sys.executable, "-m", "emerdiff_pl", "predict", "--config", args.config,
            "--data.urls", urls, "--writer.output_dir", str(out), *extra,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        process_s = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            raise SystemExit(f"predict failed (exit {proc.returncode}): {' '.join(cmd)}")
        summaries = sorted(out.glob("summary*.json"))
        summary = json.loads(summaries[0].read_text())
    wall, seg = summary["wall_seconds"], summary["segment_seconds"]
    result = {
        "config": args.config,
        "extra": extra,
        "images": summary["done"],
        "failed": summary["failed"],
        "process_seconds": process_s,
        "loop_wall_seconds": wall,
        "segment_seconds": seg,
        "end_to_end_images_per_s": summary["done"] / wall,
        "segment_images_per_s": summary["done"] / seg if seg else None,
        "model_fraction_of_loop": seg / wall if wall else None,
    }
    print(json.dumps(result, indent=1))
    print(
        f"end to end {result['end_to_end_images_per_s']:.3f} img/s vs segment() {result['segment_images_per_s']:.3f} "
        f"img/s: the model runs {100 * result['model_fraction_of_loop']:.1f} % of the loop (target ≥ 90 %)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
