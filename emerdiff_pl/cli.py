"""``emerdiff-pl``: the command line.

``emerdiff-pl predict --config configs/<name>.yaml [--model.* ...] [--data.* ...] [--writer.* ...]`` is a
LightningCLI over :class:`~emerdiff_pl.segmenter.EmerDiffSegmenter`, :class:`~emerdiff_pl.data.EmerDiffDataModule`
and the :class:`~emerdiff_pl.writer.PseudoLabelWriter` callback (its arguments are the ``writer:`` group). The
other subcommands are plain argparse programs, imported only when called.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from emerdiff_pl.data import EmerDiffDataModule
from emerdiff_pl.writer import PseudoLabelWriter

# name → (module whose main(argv) runs it, one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("", "label images (WebDataset shards or a folder) into a pseudo-label shard set"),
    "demo": ("", "label a few generated images end to end and show the result"),
    "relabel": ("emerdiff_pl.relabel", "map per-image masks to dataset-wide classes via their embeddings"),
    "evaluate": ("emerdiff_pl.metrics", "score pseudo-labels against ground-truth shards (Hungarian mIoU)"),
    "show": ("emerdiff_pl.viz", "overlays and contact sheets of a shard set"),
    "convert": ("emerdiff_pl.datasets", "convert COCO-Stuff-27 / Cityscapes-27 to ground-truth shards"),
    "merge-manifests": (
        "emerdiff_pl.writer:merge_main",
        "merge per-task manifests and list tasks to resubmit",
    ),
}


class SaveConfigToOutput(SaveConfigCallback):
    """Saves the resolved config as ``<writer.output_dir>/config-<tag>.yaml``: one file per task and attempt,
    next to the shards it produced (never ``config.yaml`` in the working directory, where array tasks collide)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        writer = next((cb for cb in trainer.callbacks if isinstance(cb, PseudoLabelWriter)), None)
        if writer is None:
            return
        tag = writer.resolve_tag(trainer)
        writer.output_dir.mkdir(parents=True, exist_ok=True)
        path = writer.output_dir / f"config-{tag}.yaml"
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)


class EmerDiffCLI(LightningCLI):
    """LightningCLI with the ``predict`` subcommand only, the writer as the ``writer:`` group, and
    ``data.resolution`` following ``model.resolution``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule", "ckpt_path", "weights_only"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PseudoLabelWriter, "writer")
        parser.link_arguments("model.resolution", "data.resolution")

    def predict(
        self, model: LightningModule, datamodule: Any = None, return_predictions: bool | None = None
    ) -> Any:
        """``Trainer.predict`` that keeps no predictions unless asked (the writer has already stored them; an
        unset ``return_predictions`` would otherwise hold every image of the run in memory)."""
        return self.trainer.predict(model, datamodule=datamodule, return_predictions=bool(return_predictions))


def cli_main(
    args: list[str] | None = None, model_class: type[LightningModule] | None = None, run: bool = True
) -> EmerDiffCLI:
    """Run ``predict`` through LightningCLI (``args`` start with ``predict``). ``model_class`` defaults to
    :class:`EmerDiffSegmenter`; tests pass a stand-in with the same ``predict_step`` contract."""
    if model_class is None:
        from emerdiff_pl.segmenter import EmerDiffSegmenter

        model_class = EmerDiffSegmenter
    # WebDataset-style streams have no sampler: the writer gets keys from the batch, not batch indices.
    warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # main(argv) and tests pass args explicitly on purpose
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    return EmerDiffCLI(
        model_class,
        EmerDiffDataModule,
        save_config_callback=SaveConfigToOutput,
        save_config_kwargs={"save_to_log_dir": False},
        trainer_defaults={"logger": False},
        seed_everything_default=0,
        auto_configure_optimizers=False,
        parser_kwargs={
            "predict": {
                "description": "Label images with EmerDiff and write a pseudo-label WebDataset. Typical use: "
                "emerdiff-pl predict --config configs/sd14.yaml --data.urls 'in/shard-{000000..000099}.tar' "
                "--writer.output_dir out/. Rerunning the same command resumes."
            }
        },
        args=args,
        run=run,
    )


def demo(argv: list[str]) -> int:
    """``emerdiff-pl demo``: the whole pipeline on the shipped toy-world model, on a CPU in a few minutes.

    Generates held-out toy scenes with ground truth, labels them (``predict`` with ``configs/toyworld.yaml``),
    maps the per-image masks to dataset-wide classes (``relabel``), scores them (``evaluate``, both protocols)
    and draws a contact sheet (``show``)."""
    import argparse
    from pathlib import Path

    from emerdiff_pl import metrics, relabel, toyworld, viz

    repo_config = Path(__file__).resolve().parents[1] / "configs" / "toyworld.yaml"
    parser = argparse.ArgumentParser(prog="emerdiff-pl demo", description=demo.__doc__)
    parser.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    parser.add_argument("--num-images", type=int, default=4, help="toy scenes to label (default 4)")
    parser.add_argument(
        "--seed", type=int, default=1000, help="scene seed; the model was trained on seed 12345"
    )
    parser.add_argument(
        "--config", default=str(repo_config), help="predict config (default configs/toyworld.yaml)"
    )
    args, overrides = parser.parse_known_args(argv)
    if not Path(args.config).is_file():
        parser.error(f"config {args.config} not found; pass --config path/to/toyworld.yaml")
    out = Path(args.out)
    scenes = toyworld.write_shards(out / "scenes", args.num_images, args.seed)
    labels_dir = out / "labels"
    cli_main(
        [
            "predict",
            "--config",
            args.config,
            "--data.urls",
            "::".join(scenes),
            "--writer.output_dir",
            str(labels_dir),
            *overrides,
        ]
    )
    label_shards = sorted(str(p) for p in labels_dir.glob("*.tar"))
    if not label_shards:
        print(f"emerdiff-pl demo: no shards were written to {labels_dir}", file=sys.stderr)
        return 1
    classes = str(toyworld.NUM_CLASSES)
    relabelled = out / "relabelled"
    steps = [
        (
            relabel.main,
            ["--input", "::".join(label_shards), "--num-classes", classes, "--output", str(relabelled)],
        ),
        (
            metrics.main,
            [
                "--pred",
                str(relabelled),
                "--gt",
                "::".join(scenes),
                "--num-classes",
                classes,
                "--class-names",
                "toyworld",
                "--protocol",
                "both",
                "--out",
                str(out / "evaluation"),
            ],
        ),
        (
            viz.main,
            [
                "--input",
                str(relabelled),
                "--images",
                "::".join(scenes),
                "--gt",
                "::".join(scenes),
                "--class-names",
                "toyworld",
                "--out",
                str(out / "contact_sheet.png"),
                "--n",
                str(min(args.num_images, 8)),
            ],
        ),
    ]
    for step, step_args in steps:
        code = step(step_args)
        if code:
            return code
    print(
        f"demo done: pseudo-labels in {labels_dir}, global classes in {relabelled}, "
        f"scores in {out / 'evaluation'}, picture {out / 'contact_sheet.png'}"
    )
    return 0


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: emerdiff-pl <command> [options]   (emerdiff-pl <command> --help for its options)",
        "",
        "Pseudo-label segmentation datasets from a frozen Stable Diffusion model (EmerDiff, ICLR 2024).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in SUBCOMMANDS.items()]
    lines += [
        "",
        "example: emerdiff-pl predict --config configs/tiny.yaml --data.folder images/ --writer.output_dir out/",
    ]
    return "\n".join(lines)


def _dispatch(name: str, argv: list[str]) -> int:
    target, _ = SUBCOMMANDS[name]
    module_name, _, function = target.partition(":")
    if importlib.util.find_spec(module_name) is None:
        print(f"emerdiff-pl {name}: this installation lacks {module_name} (not built yet?)", file=sys.stderr)
        return 2
    entry: Any = getattr(importlib.import_module(module_name), function or "main")
    result = entry(argv)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``emerdiff-pl`` and ``python -m emerdiff_pl``."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "predict":
        cli_main(None if from_command_line else argv)  # None: LightningCLI reads sys.argv (DDP relaunches it)
        return 0
    if command == "demo":
        return demo(rest)
    if command in SUBCOMMANDS:
        return _dispatch(command, rest)
    print(f"emerdiff-pl: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


__all__ = ["EmerDiffCLI", "SUBCOMMANDS", "SaveConfigToOutput", "cli_main", "demo", "main"]
