"""Self-training on pseudo-labels: does a segmenter trained on EmerDiff labels beat one trained on bilinear ones?

The pipeline a user runs, end to end, on toy-world scenes with known ground truth:

1. ``--num-train`` scenes as converter shards (``<key>.png`` + ``<key>.gt.png``), ``--num-test`` held-out ones;
2. ``emerdiff-pl predict``'s pieces (EmerDiffDataModule, EmerDiffSegmenter with configs/toyworld.yaml's model
   settings, PseudoLabelWriter) label the training scenes with ``emerdiff`` and with ``lowres_bilinear``;
3. ``emerdiff-pl relabel`` maps both to the world's class count (one fit on the EmerDiff shards' mask
   embeddings, its centroids applied to the bilinear shards: both methods share the low-res masks, checked);
4. the same small network (segmentation-models-pytorch Unet, random init) is trained for the same steps on
   each source through :class:`emerdiff_pl.PseudoLabelDataset` (labels joined with the scene shards by key),
   and on the ground truth as an upper bound;
5. pseudo-labels (on the training scenes) and trained models (on the held-out scenes) are scored with
   dataset-wide Hungarian and per-image Hungarian mIoU (emerdiff_pl.metrics).

    python benchmarks/toyworld/self_train.py --seed 0 --threads 1 --json st0.json
    python benchmarks/toyworld/self_train.py --quick          # smoke run, not a measurement
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METHODS = ("emerdiff", "lowres_bilinear")
SOURCES = ("gt", *METHODS)


def model_settings(config: str, pretrained: str | None) -> dict[str, Any]:
    """The ``model:`` section of a predict config (configs/toyworld.yaml), as segmenter keyword arguments."""
    import yaml

    with open(config, encoding="utf-8") as f:
        settings = dict(yaml.safe_load(f)["model"])
    if pretrained is not None:
        settings["pretrained"] = pretrained
    settings["dtype"] = "float32"
    return settings


def predict(
    method: str, settings: dict[str, Any], urls: list[str], out: Path, batch_size: int, device: str
) -> float:
    """Label the scene shards with one method into ``out`` (the predict CLI's pieces); returns wall seconds."""
    import lightning.pytorch as pl

    from emerdiff_pl.data import EmerDiffDataModule
    from emerdiff_pl.segmenter import EmerDiffSegmenter
    from emerdiff_pl.writer import PseudoLabelWriter

    model = EmerDiffSegmenter(**{**settings, "method": method})
    # no resize of its own: the DataModule batches by the model's input policy
    data = EmerDiffDataModule(urls=urls, batch_size=batch_size, num_workers=0)
    writer = PseudoLabelWriter(str(out), samples_per_shard=10_000)
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    start = time.perf_counter()
    trainer.predict(model, datamodule=data, return_predictions=False)
    if writer.failed:
        raise RuntimeError(
            f"{method}: {writer.failed} scenes could not be labelled (see {out}/failures-*.jsonl)"
        )
    return time.perf_counter() - start


def read_field(urls: Any, field: str) -> dict[str, np.ndarray]:
    from emerdiff_pl.shardio import iter_samples

    return {s["__key__"]: s[field] for s in iter_samples(urls, fields={field})}


def score(preds: dict[str, np.ndarray], targets: dict[str, np.ndarray], num_classes: int) -> dict[str, float]:
    """Dataset-wide Hungarian (num_classes clusters) and per-image Hungarian mIoU of id maps against GT."""
    from emerdiff_pl.metrics import hungarian_miou

    if set(preds) != set(targets):
        raise KeyError(
            f"predictions and ground truth cover different keys: {sorted(set(preds) ^ set(targets))[:5]}"
        )
    keys = sorted(targets)
    p = [preds[k] for k in keys]
    t = [targets[k] for k in keys]
    dataset = hungarian_miou(p, t, num_classes, num_clusters=num_classes)
    per_image = hungarian_miou(p, t, num_classes, protocol="per-image")
    return {
        "dataset_miou": float(dataset["miou"]),
        "dataset_pixel_accuracy": float(dataset.get("pixel_accuracy", float("nan"))),
        "per_image_miou": float(per_image["miou"]),
    }


def train_transform(size: int) -> Any:
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
        ]
    )


def build_network(num_classes: int, seed: int, encoder: str) -> Any:
    import segmentation_models_pytorch as smp
    import torch

    torch.manual_seed(seed)
    return smp.Unet(
        encoder, encoder_weights=None, classes=num_classes, decoder_channels=(128, 64, 32, 16, 16)
    )


def train(
    dataset: Any,
    num_classes: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    encoder: str,
    device: str,
) -> tuple[Any, float]:
    """The same network, init, optimiser and step count for every label source; returns (model, seconds)."""
    import torch

    from emerdiff_pl.pseudolabels import pseudolabel_loader

    model = build_network(num_classes, seed, encoder).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    loader = pseudolabel_loader(dataset, batch_size, num_workers=0)
    model.train()
    step, epoch, start = 0, 0, time.perf_counter()
    while step < steps:
        dataset.set_epoch(epoch)
        before = step
        for image, label, _ in loader:
            x = image.to(device).float().div_(255.0)
            y = label.to(device).long()
            loss = torch.nn.functional.cross_entropy(model(x), y, ignore_index=255)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step >= steps:
                break
        if step == before:
            raise RuntimeError("the training set yielded no batch")
        epoch += 1
    return model.eval(), time.perf_counter() - start


def infer(model: Any, test_urls: list[str], device: str) -> dict[str, np.ndarray]:
    import torch

    from emerdiff_pl.pseudolabels import PseudoLabelDataset

    out = {}
    with torch.no_grad():
        for image, _, key in PseudoLabelDataset(test_urls, label_field="gt.png"):
            x = image.permute(2, 0, 1)[None].to(device).float().div_(255.0)
            out[key] = model(x)[0].argmax(0).cpu().numpy()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    # Everything the run needs is imported now: later edits of the working tree cannot change a running job.
    import emerdiff_pl.data
    import emerdiff_pl.metrics
    import emerdiff_pl.segmenter
    import emerdiff_pl.writer  # noqa: F401
    from emerdiff_pl.commands import relabel
    from emerdiff_pl.datasets import toyworld
    from emerdiff_pl.paths import expand_urls
    from emerdiff_pl.pseudolabels import PseudoLabelDataset

    torch.set_num_threads(args.threads)
    work = Path(args.work or f"outputs/self_train-s{args.seed}")
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty: give a fresh folder")
    work.mkdir(parents=True, exist_ok=True)
    num_classes = toyworld.NUM_CLASSES
    settings = model_settings(args.config, args.pretrained)
    timings: dict[str, float] = {}

    train_urls = toyworld.write_shards(
        work / "train_scenes", args.num_train, 1000 + args.seed, progress=False
    )
    test_urls = toyworld.write_shards(work / "test_scenes", args.num_test, 2000 + args.seed, progress=False)
    train_gt = read_field(train_urls, "gt.png")

    for method in METHODS:
        timings[f"predict_{method}_s"] = predict(
            method, settings, train_urls, work / f"pred-{method}", args.batch_size, args.device
        )
        print(f"[{time.strftime('%H:%M:%S')}] {method}: {timings[f'predict_{method}_s']:.0f} s", flush=True)
    lowres = {m: read_field(expand_urls(str(work / f"pred-{m}")), "lowres.png") for m in METHODS}
    same = all(np.array_equal(lowres[METHODS[0]][k], lowres[METHODS[1]][k]) for k in train_gt)

    common = ["--num-classes", str(num_classes), "--seed", str(args.seed), "--device", "cpu"]
    relabel.main(["--input", str(work / "pred-emerdiff"), "--output", str(work / "relabel-emerdiff"), *common,
                  "--n-init", "8"])  # fmt: skip
    relabel.main(["--input", str(work / "pred-lowres_bilinear"), "--output", str(work / "relabel-lowres_bilinear"),
                  "--centroids", str(work / "relabel-emerdiff" / "centroids.npy"), "--device", "cpu"])  # fmt: skip

    results: dict[str, Any] = {
        "seed": args.seed,
        "num_train": args.num_train,
        "num_test": args.num_test,
        "train_scene_seed": 1000 + args.seed,
        "test_scene_seed": 2000 + args.seed,
        "steps": args.steps,
        "batch_size": args.train_batch_size,
        "lr": args.lr,
        "encoder": args.encoder,
        "model_settings": settings,
        "same_lowres_masks": same,
        "threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "pseudo_labels": {},
        "trained": {},
    }
    for method in METHODS:
        labels = read_field(expand_urls(str(work / f"relabel-{method}")), "seg.png")
        results["pseudo_labels"][method] = score(labels, train_gt, num_classes)

    test_gt = read_field(test_urls, "gt.png")
    transform = train_transform(args.size)
    for source in SOURCES:
        if source == "gt":
            dataset = PseudoLabelDataset(train_urls, transform=transform, shuffle=args.num_train,
                                         label_field="gt.png", seed=args.seed)  # fmt: skip
        else:
            dataset = PseudoLabelDataset(work / f"relabel-{source}", images=train_urls, transform=transform,
                                         shuffle=args.num_train, seed=args.seed)  # fmt: skip
        model, seconds = train(dataset, num_classes, args.steps, args.train_batch_size, args.lr, args.seed,
                               args.encoder, args.device)  # fmt: skip
        timings[f"train_{source}_s"] = seconds
        results["trained"][source] = score(infer(model, test_urls, args.device), test_gt, num_classes)
        print(f"[{time.strftime('%H:%M:%S')}] trained on {source}: {results['trained'][source]}", flush=True)
    results["seconds"] = timings
    return results


def print_report(r: dict[str, Any]) -> None:
    print(
        f"\nself-training, seed {r['seed']}: {r['num_train']} training scenes, {r['num_test']} held-out, "
        f"{r['steps']} steps × batch {r['batch_size']}, Unet({r['encoder']}); same low-res masks: "
        f"{r['same_lowres_masks']}"
    )
    print(f"{'':<28}{'dataset mIoU':>13}{'pixel acc':>11}{'per-image mIoU':>16}")
    for method in METHODS:
        s = r["pseudo_labels"][method]
        print(f"{'pseudo-labels ' + method:<28}{s['dataset_miou']:>13.2f}{s['dataset_pixel_accuracy']:>11.2f}"
              f"{s['per_image_miou']:>16.2f}")  # fmt: skip
    for source in SOURCES:
        s = r["trained"][source]
        print(f"{'trained on ' + source:<28}{s['dataset_miou']:>13.2f}{s['dataset_pixel_accuracy']:>11.2f}"
              f"{s['per_image_miou']:>16.2f}")  # fmt: skip
    t = r["trained"]
    print(
        f"trained_emerdiff_miou={t['emerdiff']['dataset_miou']:.2f} "
        f"trained_lowres_bilinear_miou={t['lowres_bilinear']['dataset_miou']:.2f} "
        f"trained_gt_miou={t['gt']['dataset_miou']:.2f}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--seed", type=int, default=0, help="scenes (train 1000+seed, test 2000+seed) and network init"
    )
    p.add_argument("--num-train", type=int, default=32, help="training scenes to pseudo-label (default 32)")
    p.add_argument("--num-test", type=int, default=48, help="held-out scenes with ground truth (default 48)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per trained network (default 300)")
    p.add_argument("--train-batch-size", type=int, default=8, help="training batch size (default 8)")
    p.add_argument(
        "--lr", type=float, default=2e-3, help="peak learning rate, one-cycle AdamW (default 2e-3)"
    )
    p.add_argument(
        "--encoder", default="mobilenet_v2", help="smp Unet encoder, random init (default mobilenet_v2)"
    )
    p.add_argument("--size", type=int, default=128, help="scene side and training crop (default 128)")
    p.add_argument(
        "--config", default=str(ROOT / "configs" / "toyworld.yaml"), help="predict config (model:)"
    )
    p.add_argument("--pretrained", default=None, help="override the config's model (default: toyworld-ldm)")
    p.add_argument("--batch-size", type=int, default=4, help="images per predict batch (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--work", default=None, help="fresh folder for shards (default outputs/self_train-s<seed>)"
    )
    p.add_argument("--quick", action="store_true", help="4 training scenes, 8 test, 20 steps: a smoke run")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.num_train, args.num_test, args.steps = min(args.num_train, 4), min(args.num_test, 8), 20
    if args.num_train < 2:
        raise SystemExit("--num-train must be at least 2 (relabel clusters masks of several images)")
    results = run(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    print_report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
