"""``emerdiff-pl export``: relabelled pseudo-label shards as an image/label folder pair that trainers read.

``--format folder`` writes ``images/<key>.png`` (RGB) and ``labels/<key>.png`` (global class ids, 8-bit, or
16-bit past 255 classes) plus ``classes.txt`` (one name per line, line i = id i) and ``export.json`` (written last:
its presence marks a complete export). This is mmsegmentation's custom-dataset layout (``img_suffix='.png'``,
``seg_map_suffix='.png'``, ``data_prefix=dict(img_path='images', seg_map_path='labels')``) and what most
segmentation trainers' folder loaders read. Only relabelled shards (``emerdiff-pl relabel`` output, marked by the
``relabel`` record in each ``<key>.json``) are accepted: raw per-image cluster ids mean different things in
different images, so they are not a training set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from emerdiff_pl.shardio import encode_label_png


class NotRelabelledError(ValueError):
    """The shards hold per-image cluster ids, not global class ids."""


def global_classes(meta: Any, key: str) -> int:
    """Number of global classes recorded by ``emerdiff-pl relabel`` in a sample's json, else a clear error."""
    record = meta.get("relabel") if isinstance(meta, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("num_classes"), int):
        raise NotRelabelledError(
            f"sample {key!r} is not relabelled (its <key>.json has no 'relabel' record): its seg.png holds "
            "per-image cluster ids, which mean different things in different images. Map them to global classes "
            "first: emerdiff-pl relabel --input <these shards> --output <dir> --num-classes C, then export <dir>"
        )
    return record["num_classes"]


def class_names(spec: str | None, num_classes: int) -> list[str]:
    """Names from ``--class-names`` (comma list or a file with one per line), else ``class_0``, ``class_1``, ..."""
    if spec is None:
        return [f"class_{i}" for i in range(num_classes)]
    if os.path.isfile(spec):
        names = [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = [n.strip() for n in spec.split(",")]
    if len(names) != num_classes:
        raise ValueError(f"--class-names gives {len(names)} names but the shards have {num_classes} classes")
    return names


def _save_png(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def export_folder(
    input_urls: str, out: str | os.PathLike, images: str | None = None, names: str | None = None
) -> dict[str, Any]:
    """Write the folder layout of this module's docstring from relabelled shards; returns the export record."""
    from emerdiff_pl.pseudolabels import PseudoLabelDataset

    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"--out {str(root)!r} is not empty: export into a new folder")
    dataset = PseudoLabelDataset(input_urls, images=images)
    num_classes: int | None = None
    count = 0
    pixels: np.ndarray | None = None
    for raw in dataset.pipeline():
        key = raw["__key__"]
        if "json" not in raw:
            raise NotRelabelledError(f"sample {key!r} has no <key>.json: not emerdiff-pl relabel output")
        classes = global_classes(json.loads(raw["json"]), key)
        if num_classes is None:
            num_classes, pixels = classes, np.zeros(classes, dtype=np.int64)
        elif classes != num_classes:
            raise ValueError(
                f"sample {key!r} was relabelled into {classes} classes but earlier ones into {num_classes}: "
                "the input mixes several relabel runs"
            )
        image, label, _ = dataset.decode(raw)
        label = label.numpy()
        if label.size and int(label.max()) >= num_classes:
            raise ValueError(f"sample {key!r}: id {int(label.max())} ≥ the {num_classes} relabelled classes")
        if count == 0:
            root.mkdir(parents=True, exist_ok=True)
        _save_png(root / "images" / f"{key}.png", _png(image.numpy()))
        _save_png(root / "labels" / f"{key}.png", encode_label_png(label))
        pixels += np.bincount(label.reshape(-1), minlength=num_classes)
        count += 1
    if count == 0 or num_classes is None:
        raise ValueError(f"no samples in {input_urls!r}")
    names_list = class_names(names, num_classes)
    (root / "classes.txt").write_text("".join(n + "\n" for n in names_list), encoding="utf-8")
    record = {
        "format": "folder",
        "input": input_urls,
        "images": images,
        "samples": count,
        "num_classes": num_classes,
        "classes": names_list,
        "pixels_per_class": pixels.tolist(),
        "label_dtype": "uint8" if num_classes <= 256 else "uint16",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (root / "export.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl export",
        description="Export relabelled pseudo-label shards (emerdiff-pl relabel output) as a training set: "
        "--format folder writes images/<key>.png, labels/<key>.png (global class ids), classes.txt and "
        "export.json (mmsegmentation's custom-dataset layout).",
    )
    parser.add_argument(
        "--input", required=True, help="relabelled shards, e.g. 'relabelled/*.tar' or a folder"
    )
    parser.add_argument("--format", choices=["folder"], default="folder", help="output layout (folder)")
    parser.add_argument("--out", required=True, help="a new (or empty) output folder")
    parser.add_argument(
        "--images",
        default=None,
        help="image shards to join by key when the labels were written without images (writer.include_image "
        "off), e.g. the input shards of predict",
    )
    parser.add_argument(
        "--class-names",
        default=None,
        help="names for classes.txt: a comma list or a file with one per line (default class_0, class_1, ...)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = export_folder(args.input, args.out, images=args.images, names=args.class_names)
    except (NotRelabelledError, FileExistsError, FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"exported {record['samples']} samples, {record['num_classes']} classes -> {args.out}")
    if record["num_classes"] > 255:
        print(
            "note: labels are 16-bit PNGs and id 255 is a class here, not the usual ignore index",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
