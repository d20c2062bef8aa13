"""Named classes on the toy world (issue 27): EmerDiff's masks named by a classifier vs the classifier alone.

Placeholder while the analysis is written: `--compute-only` fills the cache of EmerDiff score maps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "toyworld-named.yaml"
BATCH = 4
LABELLED_START = 100_000  # the labelled scenes' indices: disjoint from the held-out scenes 0 …
MAP_FIELDS = ("scores", "lowres", "embeddings", "features")


def model_settings(num_masks: int, **changes: Any) -> dict[str, Any]:
    """configs/toyworld-named.yaml's model settings with K = num_masks, no classifier, and `changes`."""
    import yaml

    settings = yaml.safe_load(CONFIG.read_text())["model"]
    settings.update(num_masks=int(num_masks), classifier="none", probe=None, refine="none")
    settings.update(changes)
    return settings


def scenes(num: int, seed: int, start: int = 0):
    """(images (n, 3, 128, 128) in [0, 1], labels (n, 128, 128) uint8, per-image seeds) of toy scenes."""
    import torch

    from emerdiff_pl.datasets import toyworld

    made = list(toyworld.generate_scenes(num, seed, 128, start=start))
    images = torch.from_numpy(np.stack([s.image for s in made])).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(np.stack([s.labels for s in made]))
    return images, labels, [seed * 1_000_003 + start + i for i in range(num)]


def cached_maps(segmenter, images, seeds, cache: str | None, tag: str) -> list[Any]:
    """`segmenter.score_maps` of BATCH-sized chunks (the product's segment() before the refiner), each chunk
    cached as one .npz under `cache` (a rerun or another N reads them back bit for bit)."""
    import torch

    from emerdiff_pl.segmenter import ScoreMaps

    out = []
    for start in range(0, len(images), BATCH):
        stop = min(start + BATCH, len(images))
        path = os.path.join(cache, f"{tag}-{start:05d}-{stop:05d}.npz") if cache else None
        chunk = images[start:stop]
        if path and os.path.exists(path):
            with np.load(path) as z:
                arrays = {name: torch.from_numpy(z[name]) for name in MAP_FIELDS}
                timings = json.loads(str(z["timings"]))
        else:
            t0 = time.perf_counter()
            maps = segmenter.score_maps(chunk, seeds=seeds[start:stop])
            arrays = {name: getattr(maps, name).detach().cpu() for name in MAP_FIELDS}
            timings = maps.timings
            if path:
                os.makedirs(cache, exist_ok=True)
                tmp = path + ".tmp.npz"
                np.savez(tmp, timings=json.dumps(timings), **{k: v.numpy() for k, v in arrays.items()})
                os.replace(tmp, path)
            print(f"  scenes {start}-{stop - 1}: {time.perf_counter() - t0:.1f} s", flush=True)
        out.append(ScoreMaps(chunk, **arrays, timings=timings))
    return out


def settings_tag(settings: dict[str, Any], seed: int) -> str:
    return "k{}-{}".format(
        settings["num_masks"],
        hashlib.sha1(json.dumps([settings, seed], sort_keys=True).encode()).hexdigest()[:10],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=64, help="held-out scenes (default 64)")
    p.add_argument("--num-masks", type=int, default=32, help="EmerDiff's K (default 32)")
    p.add_argument("--cache", default="/tmp/named2/cache", help="folder for the EmerDiff score maps ('': none)")
    p.add_argument("--compute-only", action="store_true", help="fill the cache and stop")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from emerdiff_pl.segmenter import EmerDiffSegmenter

    torch.set_num_threads(args.threads)
    images, _, seeds = scenes(args.num_images, args.seed)
    settings = model_settings(args.num_masks)
    seg = EmerDiffSegmenter(**settings)
    t0 = time.perf_counter()
    cached_maps(seg, images, seeds, args.cache or None, settings_tag(settings, args.seed))
    print(f"EmerDiff K = {args.num_masks}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
