"""Shared writer for the dataset converters: samples → numbered shards + ``info.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from emerdiff_pl.shardio import ShardSequenceWriter


def write_dataset(
    items: Sequence[Any],
    make_sample: Callable[..., dict],
    out: str,
    prefix: str,
    shard_size: int,
    info: dict,
    desc: str,
) -> tuple[list[str], dict]:
    """Write ``make_sample(*item, stats)`` for every item to ``out/<prefix>-NNNNNN.tar`` (atomic shards).

    ``info`` (plus the shard list and counts) goes to ``out/info.json``. Returns the shard paths and the stats
    that ``make_sample`` filled in.
    """
    from tqdm import tqdm

    if shard_size < 1:
        raise ValueError(f"--shard-size must be ≥ 1, got {shard_size}")
    os.makedirs(out, exist_ok=True)
    stats: dict[str, int] = {}
    with ShardSequenceWriter(os.path.join(out, f"{prefix}-%06d.tar"), maxcount=shard_size) as sink:
        for item in tqdm(items, desc=desc, unit="img", dynamic_ncols=True):
            sink.write(make_sample(*item, stats))
    shards = sink.written
    info = {**info, "samples": len(items), "shards": [os.path.basename(s) for s in shards], **stats}
    with open(os.path.join(out, "info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return shards, stats
