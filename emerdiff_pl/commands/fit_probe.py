"""``emerdiff-pl fit-probe``: fit the few-shot probe of ``model.classifier: probe`` on a handful of labelled images.

The probe reads the U-Net feature layer's query vectors, so it is tied to the model settings of the predict config
it is fit with (``--config``: model, feature layer, t_f, resolution, resize); predict refuses a probe fit on
another model, layer, t_f or feature width. Labelled images are ground-truth shards (``<key>.gt.png`` beside the
image member, as ``emerdiff-pl convert`` writes them) or a folder of images with ``<stem>.gt.png`` beside each
(``a.jpg`` + ``a.gt.png``), or with ``--labels DIR`` holding ``<relative stem>.png`` per image (the images/ +
labels/ layout export writes). Label maps hold class ids (uint8, 255 = ignore) at any size.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emerdiff_pl.fields import GT_FIELD

if TYPE_CHECKING:
    from emerdiff_pl.sources import Labels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl fit-probe",
        description="Fit the probe of model.classifier: probe (a linear classifier of the U-Net feature layer's "
        "query vectors) on labelled images, print its train and held-out pixel accuracy, and write it as one "
        "small file for --model.probe. One U-Net call per image: seconds on a CPU for the toy model.",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="the predict config whose model settings the probe is for (its model: group; the probe only works "
        "with the same model, feature_layer, feature_timestep, resolution and resize)",
    )
    parser.add_argument(
        "--labelled",
        required=True,
        help="ground-truth shards with <key>.gt.png ('gt/*.tar', a folder of *.tar), or a folder of images with "
        "<stem>.gt.png beside each image (a.jpg + a.gt.png)",
    )
    parser.add_argument(
        "--labels",
        default=None,
        help="with a folder of images: a folder holding each image's label PNG at its relative stem "
        "(images/x/a.jpg -> labels/x/a.png) instead of <stem>.gt.png beside it",
    )
    parser.add_argument(
        "--class-names",
        required=True,
        help="the classes, id i = the i-th: toyworld, cocostuff27, cityscapes27, a comma list (a,b,c) or a text "
        "file with one class a line",
    )
    parser.add_argument("--out", required=True, help="the probe file to write (e.g. probe.safetensors)")
    parser.add_argument(
        "--kind",
        choices=("linear", "prototype"),
        default="linear",
        help="linear (default: softmax regression, measured best) or prototype (nearest class mean, cosine)",
    )
    parser.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="keep the last N labelled images out of the fit and report the probe's pixel accuracy on them",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 … (default auto)"
    )
    return parser


def model_settings(config_path: str) -> dict[str, Any]:
    """The ``model:`` group of a predict config, for the probe's features: one U-Net call per image
    (``lowres_bilinear``: no inversion, the same queries) and no classifier (the probe does not exist yet)."""
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--config {config_path!r} does not exist (a predict config, e.g. configs/toyworld-named.yaml)"
        )
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    model = loaded.get("model") if isinstance(loaded, dict) else None
    if not isinstance(model, dict):
        raise ValueError(
            f"--config {config_path!r} has no model: group (the predict config's model settings)"
        )
    return {**model, "method": "lowres_bilinear", "classifier": "none", "refine": "none"}


def labelled_images(labelled: str, labels: str | None) -> Iterator[tuple[str, Any, Any]]:
    """(key, image H×W×3 uint8, label map) of every labelled image, read by :mod:`emerdiff_pl.sources` as every
    command reads images and ground truth: shards with ``<key>.gt.png``, a folder of images with ``<stem>.gt.png``
    beside each, or a folder of images with ``labels`` a folder of label PNGs at the same relative stems."""
    from emerdiff_pl.sources import FolderImages, LabelsBeside, image_of, open_images, open_labels

    images = open_images(labelled)
    truth: Labels
    if labels is not None:
        if not isinstance(images, FolderImages):
            raise ValueError(
                "--labels goes with a folder of images, not with shards (their labels are <key>.gt.png)"
            )
        truth = open_labels(labels, GT_FIELD, flag="--labels")
    elif isinstance(images, FolderImages):
        truth = LabelsBeside(images, GT_FIELD)
    else:
        truth = open_labels(labelled, GT_FIELD, flag="--labelled")
    try:
        for key in images:
            label = truth.label(key)
            if label is None:
                continue
            rgb = image_of(images, key)
            if rgb is None:
                raise ValueError(f"{key!r}: its image in {labelled!r} cannot be decoded (fix or remove it)")
            yield key, rgb, label
    finally:
        images.close()
        truth.close()


def main(argv: list[str] | None = None) -> int:
    """``emerdiff-pl fit-probe``: 0 on success; user errors are reported by the CLI (exit 2)."""
    args = build_parser().parse_args(argv)
    if args.holdout < 0:
        raise ValueError(f"--holdout must be ≥ 0, got {args.holdout}")
    import torch
    from tqdm import tqdm

    from emerdiff_pl.classifiers.probe import FeatureSource, fit_probe
    from emerdiff_pl.datasets import class_names
    from emerdiff_pl.labelmaps import ids_beyond_classes
    from emerdiff_pl.segmenter import EmerDiffSegmenter

    names = class_names(args.class_names)
    segmenter = EmerDiffSegmenter(**model_settings(args.config))
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    segmenter.to("cpu" if device == "auto" else device)
    items = list(labelled_images(args.labelled, args.labels))
    if not items:
        where = f"label PNGs in {args.labels!r}" if args.labels else f"<key>.{GT_FIELD} members or files"
        raise FileNotFoundError(f"no labelled images in {args.labelled!r} (looked for {where})")
    if args.holdout >= len(items):
        raise ValueError(
            f"--holdout {args.holdout} leaves none of the {len(items)} labelled images to fit on"
        )
    labelled: list[tuple[Any, tuple[int, int], list[Any]]] = []
    for key, rgb, label_ids in tqdm(items, desc="features", unit="img", file=sys.stderr):
        label = torch.from_numpy(label_ids.astype("int64"))
        bad = ids_beyond_classes(label, len(names))
        if bad:
            raise ValueError(
                f"{key!r}: label ids {bad} are ≥ the {len(names)} classes of --class-names (255 = ignore)"
            )
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)[None]
        maps = segmenter.score_maps(image)
        grid = tuple(maps.lowres.shape[-2:])
        labelled.append((maps.features.float().cpu(), grid, [label]))
    cut = len(labelled) - args.holdout
    source = FeatureSource.of(segmenter.config, labelled[0][0].shape[-1])
    probe, fit = fit_probe(labelled[:cut], names, source, kind=args.kind, heldout=labelled[cut:] or None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    probe.save(tmp)
    os.replace(tmp, out)
    print(fit.summary())
    print(
        f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB): use it with --model.classifier probe --model.probe {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
