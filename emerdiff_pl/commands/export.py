"""``emerdiff-pl export``: relabelled or named pseudo-label shards as a training set in a layout trainers read.

``--format folder`` writes ``images/<key>.png`` (RGB) and ``labels/<key>.png`` (global class ids, 8-bit, or
16-bit past 255 classes) plus ``classes.txt`` (one name per line, line i = id i) and ``export.json`` (written last:
its presence marks a complete export). This is mmsegmentation's custom-dataset layout (``img_suffix='.png'``,
``seg_map_suffix='.png'``, ``data_prefix=dict(img_path='images', seg_map_path='labels')``) and what most
segmentation trainers' folder loaders read. Only labels whose ids mean the same in every image are accepted:
relabelled shards (``emerdiff-pl relabel`` output, marked by the ``relabel`` record in each ``<key>.json``) of one
relabel run (one ``centroids_sha256``), or named output (predict with ``model.classifier``: ``<key>.json`` names
the classes; they go to ``classes.txt`` unless ``--class-names`` overrides them, and 255 stays the ignore id).
Raw per-image cluster ids, or the ids of two runs, mean different things in different images, so they are not a
training set; a label id outside the classes is refused too.

``--format hf`` writes the same pairs as a Hugging Face ``datasets`` dataset (see :func:`export_hf`). Both
formats also write ``id2label.json`` (``{"0": name, ...}``, the file transformers' segmentation models read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from emerdiff_pl.classifiers.names import ID2LABEL_FILE
from emerdiff_pl.codec import encode_label_png
from emerdiff_pl.fields import IGNORE_CLASS, JSON_FIELD, SEG_FIELD


class NotRelabelledError(ValueError):
    """The shards hold per-image cluster ids, not global class ids."""


def global_classes(meta: Any, key: str) -> tuple[int, str | None]:
    """The classes a sample was relabelled into, from the ``relabel`` record of its json: (their number, the
    digest of the run's centroids, None for shards of a relabel that did not record it); else a clear error."""
    record = meta.get("relabel") if isinstance(meta, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("num_classes"), int):
        raise NotRelabelledError(
            f"sample {key!r} is not relabelled (its <key>.json has no 'relabel' record): its {SEG_FIELD} holds "
            "per-image cluster ids, which mean different things in different images. Map them to global classes "
            "first: emerdiff-pl relabel --input <these shards> --output <dir> --num-classes C, then export <dir>"
        )
    return record["num_classes"], record.get("centroids_sha256")


def output_classes(meta: Any, key: str) -> tuple[int, str | None, list[str] | None]:
    """(number of classes, what makes their ids mean the same across samples, the output's class names or None)
    of a sample: named output (``model.classifier``) carries its class names; else the relabel record."""
    from emerdiff_pl.classifiers.names import named_classes

    names = named_classes(meta)
    if names is not None:
        return len(names), "named: " + json.dumps(names), names
    return (*global_classes(meta, key), None)


def _class_names(spec: str | None, num_classes: int) -> list[str]:
    """``--class-names`` (:func:`~emerdiff_pl.datasets.class_names`), else ``class_0``, ``class_1``, ..."""
    if spec is None:
        return [f"class_{i}" for i in range(num_classes)]
    from emerdiff_pl.datasets import class_names

    return class_names(spec, num_classes, counted="the shards have")


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


class _Samples:
    """The relabelled samples of ``input_urls`` (joined with ``images`` by key), checked, with running totals.

    Iterating yields ``(key, image uint8 H×W×3, label int64 H×W)``; ``num_classes``, ``count`` and ``pixels``
    (per-class pixel counts) describe what was yielded so far. Both formats read through this one loop.
    """

    def __init__(self, input_urls: str, images: str | None, names: str | None) -> None:
        from emerdiff_pl.pseudolabels import PseudoLabelDataset

        self.input_urls, self.images, self.names = input_urls, images, names
        self.classes: list[str] = []
        self.dataset = PseudoLabelDataset(input_urls, images=images)
        self.num_classes: int | None = None
        self.run: str | None = None  # the relabel run's centroids digest, or the named output's classes
        self.named = False  # named output (model.classifier): 255 = ignore in the labels
        self.count = 0
        self.pixels = np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        from tqdm import tqdm

        for raw in tqdm(self.dataset.samples(), desc="export", unit="img"):
            key = raw["__key__"]
            if JSON_FIELD not in raw:
                raise NotRelabelledError(f"sample {key!r} has no <key>.json: not emerdiff-pl relabel output")
            classes, run, named = output_classes(json.loads(raw[JSON_FIELD]), key)
            if self.num_classes is None:
                # a wrong --class-names fails here, before anything is written
                given = self.names is not None or named is None
                self.classes = _class_names(self.names, classes) if given else named
                self.num_classes, self.pixels = classes, np.zeros(classes, dtype=np.int64)
                self.run, self.named = run, named is not None
            elif (classes, run) != (self.num_classes, self.run):
                what = "named output of other classes" if self.named else "several relabel runs"
                raise ValueError(
                    f"sample {key!r} has {classes} classes ({run}) but earlier ones {self.num_classes} "
                    f"({self.run}): the input mixes {what}, whose class ids mean different things"
                )
            image, label, _ = self.dataset.decode(raw)
            image, label = image.numpy(), label.numpy()
            ids = label[label != IGNORE_CLASS] if self.named else label  # named output keeps 255 as ignore
            if ids.size and int(ids.max()) >= classes:
                kind = "named" if self.named else "relabelled"
                raise ValueError(f"sample {key!r}: id {int(ids.max())} ≥ the {classes} {kind} classes")
            self.pixels += np.bincount(ids.reshape(-1), minlength=classes)
            self.count += 1
            yield key, image, label

    def record(self, fmt: str) -> dict[str, Any]:
        """The export record (``export.json``) once every sample was yielded; an error if there were none."""
        if self.count == 0 or self.num_classes is None:
            raise ValueError(f"no samples in {self.input_urls!r}")
        return {
            "format": fmt,
            "input": self.input_urls,
            "images": self.images,
            "samples": self.count,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "pixels_per_class": self.pixels.tolist(),
            **({"ignore_index": IGNORE_CLASS} if self.named else {}),
            "label_dtype": "uint8" if self.num_classes <= 256 else "uint16",
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _new_folder(out: str | os.PathLike) -> Path:
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"--out {str(root)!r} is not empty: export into a new folder")
    return root


def _finish(root: Path, record: dict[str, Any]) -> dict[str, Any]:
    """``classes.txt`` and ``id2label.json`` (transformers' name for it), then ``export.json`` last."""
    root.mkdir(parents=True, exist_ok=True)
    names = record["classes"]
    (root / "classes.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    (root / ID2LABEL_FILE).write_text(json.dumps(dict(enumerate(names)), indent=1), encoding="utf-8")
    (root / "export.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


def export_folder(
    input_urls: str, out: str | os.PathLike, images: str | None = None, names: str | None = None
) -> dict[str, Any]:
    """Write the folder layout of this module's docstring from relabelled shards; returns the export record."""
    root = _new_folder(out)
    samples = _Samples(input_urls, images, names)
    for key, image, label in samples:
        _save_png(root / "images" / f"{key}.png", _png(image))
        _save_png(root / "labels" / f"{key}.png", encode_label_png(label))
    return _finish(root, samples.record("folder"))


def export_hf(
    input_urls: str, out: str | os.PathLike, images: str | None = None, names: str | None = None
) -> dict[str, Any]:
    """A Hugging Face ``datasets`` dataset (``save_to_disk``) with columns ``key``, ``image``, ``label``.

    ``image`` and ``label`` are ``datasets.Image`` features holding PNG bytes (the label PNG carries the global
    class ids, 8-bit or 16-bit), the layout of the hub's semantic-segmentation sets and the column names
    transformers' semantic-segmentation example reads; ``id2label.json`` sits beside it. Read it back with
    ``datasets.load_from_disk(out)``. Needs the optional ``datasets`` package (``pip install "emerdiff-pl[hf]"``).
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "--format hf needs the datasets package: pip install 'emerdiff-pl[hf]' (or pip install datasets)"
        ) from err
    import tempfile

    root = _new_folder(out)
    samples = _Samples(input_urls, images, names)

    def rows() -> Iterator[dict[str, Any]]:
        for key, image, label in samples:
            yield {
                "key": key,
                "image": {"bytes": _png(image), "path": None},
                "label": {"bytes": encode_label_png(label), "path": None},
            }

    features = datasets.Features(
        {"key": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Image()}
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    # The arrow cache from_generator writes lives beside the output and goes with it; a given fingerprint keeps
    # datasets from hashing the generator (it cannot: it closes over the open shards).
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the export bar counts the same rows
    try:
        with tempfile.TemporaryDirectory(prefix=f".{root.name}.", dir=root.parent) as cache:
            try:
                dataset = datasets.Dataset.from_generator(
                    rows, features=features, cache_dir=cache, fingerprint=f"emerdiff-pl-{time.time_ns()}"
                )
            except datasets.exceptions.DatasetGenerationError as err:
                # datasets wraps what the generator raised; the cause is the error that names the bad input
                if isinstance(err.__cause__, Exception):
                    raise err.__cause__ from None
                raise
            record = samples.record("hf")
            dataset.save_to_disk(str(root))
            del dataset  # its arrow files live in the cache folder, removed now
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return _finish(root, record)


EXPORTERS = {"folder": export_folder, "hf": export_hf}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl export",
        description="Export relabelled pseudo-label shards (emerdiff-pl relabel output) or named ones (predict "
        "with model.classifier: class ids and their names, 255 = ignore) as a training set: --format folder writes "
        "images/<key>.png, labels/<key>.png (global class ids), classes.txt and export.json (mmsegmentation's "
        "custom-dataset layout).",
    )
    parser.add_argument(
        "--input", required=True, help="relabelled or named shards, e.g. 'relabelled/*.tar' or a folder"
    )
    parser.add_argument(
        "--format",
        choices=sorted(EXPORTERS),
        default="folder",
        help="folder (default): images/ + labels/ PNGs; hf: a Hugging Face datasets folder (save_to_disk, "
        "columns key / image / label; needs pip install 'emerdiff-pl[hf]')",
    )
    parser.add_argument("--out", required=True, help="a new (or empty) output folder")
    parser.add_argument(
        "--images",
        default=None,
        help="where the images are when the labels were written without them (writer.include_image off): the "
        "folder or shards predict read (its --data.folder or --data.urls), joined by key",
    )
    parser.add_argument(
        "--class-names",
        default=None,
        help="names for classes.txt: cocostuff27, cityscapes27, toyworld, a comma list (a,b,c) or a file with one "
        "per line; as many as the classes (default: named output's own names, else class_0, class_1, ...)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = EXPORTERS[args.format](args.input, args.out, images=args.images, names=args.class_names)
    except (NotRelabelledError, FileExistsError, FileNotFoundError, KeyError, ValueError, ImportError) as err:
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
