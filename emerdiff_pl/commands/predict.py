"""``emerdiff-pl predict``: LightningCLI over the segmenter, the data module and the writer callback.

``emerdiff-pl predict --config configs/<name>.yaml [--model.* ...] [--data.* ...] [--writer.* ...]`` labels images
with :class:`~emerdiff_pl.segmenter.EmerDiffSegmenter` from :class:`~emerdiff_pl.data.EmerDiffDataModule` and
stores them with the :class:`~emerdiff_pl.writer.PseudoLabelWriter` callback (its arguments are the ``writer:``
group). The ``model:`` group is the fields of :class:`~emerdiff_pl.config.EmerDiffConfig`, flat; the DataModule
takes its input size from the model and its resume state from the writer when the Trainer asks for the loader.
The parsed config is checked (:mod:`emerdiff_pl.validation`) before any class is built or any weight is loaded;
progress is counted in images (:mod:`emerdiff_pl.progress`).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from emerdiff_pl.commands import verbose_enabled


def quiet_dependencies() -> None:
    """Silence what dependencies print on every run (tips, device lines, deprecations, loading bars); kept
    with ``--verbose`` (or ``EMERDIFF_VERBOSE=1``). Environment variables reach DDP children too."""
    if verbose_enabled():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    # on every machine with SLURM's client installed, for any run started without srun (most runs)
    warnings.filterwarnings(
        "ignore", message=r"The `srun` command is available on your system but is not used"
    )
    # GPU/TPU availability, "Seed set to", 💡 Tip adverts: rank_zero_info lines of Lightning's loggers
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("bitsandbytes", "xformers", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.formatwarning = _one_line_warning


def _one_line_warning(
    message: Any, category: type[Warning], filename: str, lineno: int, line: Any = None
) -> str:
    return f"warning: {message}\n"


def _silence_loaders() -> None:
    """diffusers / transformers progress bars and info logs (weight loading), after they are importable."""
    if verbose_enabled():
        return
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


quiet_dependencies()  # before Lightning is imported: some lines are printed at import time

from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402

from emerdiff_pl.data import EmerDiffDataModule  # noqa: E402
from emerdiff_pl.progress import ImageProgressBar  # noqa: E402
from emerdiff_pl.writer import PseudoLabelWriter  # noqa: E402

quiet_dependencies()  # again: importing Lightning set its loggers back to INFO


class SaveConfigToOutput(SaveConfigCallback):
    """Saves the resolved config as ``<writer.output_dir>/config-<tag>.yaml`` once the run has labelled its first
    image (or finished with nothing left to do): one file per task and attempt, next to its shards, and none for
    an attempt that failed before producing anything."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Nothing yet: the config is written with the first result (see the class docstring)."""

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        writer = PseudoLabelWriter.of(trainer)
        if writer is not None and writer.done > 0:  # a batch of failures only is no result yet
            self._save_once(trainer, pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def _save_once(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.already_saved and trainer.is_global_zero:
            self.save_config(trainer, pl_module, "predict")
        self.already_saved = True

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        writer = PseudoLabelWriter.of(trainer)
        if writer is None:
            return
        tag = writer.resolve_tag(trainer)
        writer.output_dir.mkdir(parents=True, exist_ok=True)
        path = writer.output_dir / f"config-{tag}.yaml"
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)


class EmerDiffCLI(LightningCLI):
    """LightningCLI with the ``predict`` subcommand only, the writer as the ``writer:`` group, the config checked
    before anything is built, and progress in images."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule", "ckpt_path", "weights_only"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PseudoLabelWriter, "writer")

    def before_instantiate_classes(self) -> None:
        """Check inputs, output folder, accelerator and model layers from the parsed config (seconds), before
        the Trainer exists or any weight loads, so a mistake costs no loading time and leaves no files."""
        from emerdiff_pl.validation import validate_predict_config

        config = self.config.get(self.subcommand) if self.subcommand else self.config
        validate_predict_config(config, self.model_class, self.datamodule_class)
        _silence_loaders()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """The image-counting progress bar replaces Lightning's batch bar (unless the bar is turned off)."""
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ImageProgressBar) for c in (config.get("callbacks") or [])
        ):
            callbacks = [*callbacks, ImageProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def predict(
        self, model: LightningModule, datamodule: Any = None, return_predictions: bool | None = None
    ) -> Any:
        """``Trainer.predict`` that keeps no predictions unless asked (the writer has already stored them; an
        unset ``return_predictions`` would otherwise hold every image of the run in memory). A run that ends
        well closes its process group (:func:`_close_process_group`). Ctrl-C, which Lightning turns into
        ``sys.exit(1)`` once the callbacks have closed what they hold, is raised again as a KeyboardInterrupt
        saying what was kept (the CLI exits 130)."""
        try:
            predictions = self.trainer.predict(
                model, datamodule=datamodule, return_predictions=bool(return_predictions)
            )
        except SystemExit:
            writer = PseudoLabelWriter.of(self.trainer)
            if writer is not None and isinstance(writer.stopped_by, KeyboardInterrupt):
                raise KeyboardInterrupt(writer.kept()) from None
            raise
        _close_process_group()
        return predictions


def _close_process_group() -> None:
    """Destroy the DDP process group once every image is written. Lightning destroys it at exit for NCCL
    only; a gloo group (DDP on CPU) left alive can abort the process as the interpreter exits ("terminate
    called without an active exception", exit code -6), so a finished SLURM task would read as failed. Only
    after a run that ended well: while another rank may still be inside a collective, destroying can hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cli_main(
    args: list[str] | None = None, model_class: type[LightningModule] | None = None, run: bool = True
) -> EmerDiffCLI:
    """Run ``predict`` through LightningCLI (``args`` start with ``predict``; None reads ``sys.argv``, which DDP
    relaunches). ``model_class`` defaults to :class:`EmerDiffSegmenter`; tests pass a stand-in with the same
    ``predict_step`` contract."""
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
            "allow_abbrev": False,  # --model.num_mask is an error, not --model.num_masks
            "prog": "emerdiff-pl",
            "predict": {
                "usage": "emerdiff-pl predict --config CONFIG [--model.* ...] [--data.* ...] [--writer.* ...] "
                "[--trainer.* ...]   (emerdiff-pl predict --help: the project's options; --help-all: every one)",
                "description": "Label images with EmerDiff and write a pseudo-label WebDataset. Typical use: "
                "emerdiff-pl predict --config configs/sd14.yaml --data.urls 'in/shard-{000000..000099}.tar' "
                "--writer.output_dir out/. Rerunning the same command resumes. Add --verbose for the messages "
                "of Lightning and diffusers, --debug for full tracebacks.",
            },
        },
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> int:
    """``emerdiff-pl predict ...`` (``argv`` without the word ``predict``; None: from ``sys.argv``)."""
    cli_main(None if argv is None else ["predict", *argv])
    return 0


__all__ = ["EmerDiffCLI", "SaveConfigToOutput", "cli_main", "main", "quiet_dependencies"]
