"""Checks of a ``predict`` config that run in seconds, before the Trainer exists or any weight is loaded.

A mistake found here (no input, an output path that is a file, no GPU for a GPU config, a model setting of the
wrong type or out of range, a layer name the U-Net does not have, more masks than feature vectors, a hub model
that is not cached offline) is reported as one :class:`UserError` that names the flag and what to do, instead of
a traceback after minutes of loading. Model settings are checked by building the
:class:`~emerdiff_pl.config.EmerDiffConfig` the segmenter will use (one check for the CLI and Python); layer names
and grid sizes come from the U-Net's config, built on the meta device (no weights are read).
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emerdiff_pl.config import EmerDiffConfig

TINY_RANDOM, SD14_ARCH = "tiny-random", "sd14-arch"  # as in backbone.py, without importing diffusers
_TOY_CONFIGS = "configs/toyworld.yaml (the shipped toy model) or configs/tiny.yaml (random weights, seconds)"
# Stable Diffusion on a CPU, measured on a 2-core Xeon VM (issue 31): a 512² U-Net call 21–24 s, a VAE decode
# 49 s; an image at the paper's settings makes ~600 U-Net calls (2K = 40 branches × 15 steps) and 40 decodes.
SD_ON_CPU = (
    "hours per image for Stable Diffusion at 512² on a CPU: ~600 U-Net calls of 21–24 s and 40 VAE decodes of "
    "49 s each, about 4 h on a 2-core machine"
)


class UserError(ValueError):
    """A mistake the user can fix; the message says what is wrong and what to do (shown without a traceback)."""


# --------------------------------------------------------------------------------------------------------------
# the whole config
# --------------------------------------------------------------------------------------------------------------


def _as_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "as_dict"):
        return config.as_dict()
    return dict(config or {})


def validate_predict_config(
    config: Any, model_class: type | None = None, datamodule_class: type | None = None
) -> None:
    """Run every check on a parsed ``predict`` config; raise one :class:`UserError` listing all problems found."""
    cfg = _as_dict(config)
    data, writer = dict(cfg.get("data") or {}), dict(cfg.get("writer") or {})
    model, trainer = dict(cfg.get("model") or {}), dict(cfg.get("trainer") or {})
    checks: list[tuple[Any, tuple[Any, ...]]] = [
        (check_input, (data.get("urls"), data.get("folder"), datamodule_class, data)),
        (check_output_dir, (writer.get("output_dir"),)),
        (check_accelerator, (trainer.get("accelerator", "auto"), trainer.get("devices", "auto"))),
    ]
    if model_class is None or _is_segmenter(model_class):  # test stand-ins have no config and no backbone
        checks.append((check_model_settings, (model,)))
    problems = collect_problems(checks)
    if problems is not None:
        raise problems


def collect_problems(checks: list[tuple[Any, tuple[Any, ...]]]) -> UserError | None:
    """Run every ``(check, args)``; the :class:`UserError` of the one problem found, or one listing all."""
    problems: list[str] = []
    for check, args in checks:
        try:
            check(*args)
        except UserError as err:
            problems.append(str(err))
    if len(problems) > 1:
        return UserError(f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return UserError(problems[0]) if problems else None


# --------------------------------------------------------------------------------------------------------------
# input and output
# --------------------------------------------------------------------------------------------------------------


def _is_segmenter(model_class: type) -> bool:
    from emerdiff_pl.segmenter import EmerDiffSegmenter

    return issubclass(model_class, EmerDiffSegmenter)


def check_model_settings(model: dict[str, Any]) -> None:
    """The ``model:`` group builds a valid :class:`~emerdiff_pl.config.EmerDiffConfig` that fits its model."""
    check_model(check_model_values(model))


def check_model_values(model: dict[str, Any]) -> EmerDiffConfig:
    """The :class:`~emerdiff_pl.config.EmerDiffConfig` of the ``model:`` group (types and ranges checked; no
    model read), or a :class:`UserError` naming the flag."""
    from emerdiff_pl.config import EmerDiffConfig

    try:
        return EmerDiffConfig(**model)
    except (TypeError, ValueError) as err:
        raise UserError(f"--{err}") from None


def _example_urls() -> str:
    return "--data.urls 'shards/in-{000000..000009}.tar'"


def check_input(
    urls: Any, folder: Any, datamodule_class: type | None = None, data: dict[str, Any] | None = None
) -> int:
    """The input exists and holds something to label; returns the number of input units (files or shards)."""
    if (urls is None) == (folder is None):
        got = "both" if urls is not None else "neither"
        raise UserError(
            f"give exactly one input (got {got}): --data.folder path/to/images (a folder of images) or "
            f"{_example_urls()} (WebDataset tar shards)"
        )
    if folder is not None:
        path = Path(str(folder)).expanduser()
        if not path.exists():
            raise UserError(f"--data.folder {str(folder)!r} does not exist: pass a folder of images")
        if not path.is_dir():
            what = (
                "a tar shard: pass it as --data.urls" if tarfile.is_tarfile(path) else "a file, not a folder"
            )
            raise UserError(f"--data.folder {str(folder)!r} is {what}")
    units = _units(urls, folder, datamodule_class, data)
    if folder is not None and not units:
        tars = sorted(p.name for p in Path(str(folder)).glob("*.tar"))
        hint = f"; it holds {len(tars)} .tar shards: pass --data.urls {folder}" if tars else ""
        raise UserError(
            f"--data.folder {str(folder)!r} holds no images (jpg, jpeg, png, webp, bmp, tif){hint}"
        )
    if urls is not None:
        local = [u for u in units if os.path.isfile(u)][:16]
        if local and not any(_is_tar(u) for u in local):
            raise UserError(
                f"--data.urls names files that are not tar shards (first: {local[0]}); for a folder of images "
                "use --data.folder path/to/images"
            )
    return len(units)


def _is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _units(urls: Any, folder: Any, datamodule_class: type | None, data: dict[str, Any] | None) -> list[Any]:
    """The input units as the data module lists them (so the check and the run agree)."""
    try:
        if datamodule_class is not None:
            kwargs = {
                k: v for k, v in (data or {}).items() if k in ("urls", "folder", "array_index", "array_count")
            }
            return list(datamodule_class(**kwargs).all_units())
        from emerdiff_pl.paths import expand_urls, list_folder

        return list_folder(folder) if folder is not None else expand_urls(urls)
    except UserError:
        raise
    except FileNotFoundError as err:
        if folder is not None and "no images" in str(err):
            return []
        flag = "--data.folder" if folder is not None else "--data.urls"
        raise UserError(f"{flag}: {err}") from None
    except (OSError, ValueError) as err:
        flag = "--data.folder" if folder is not None else "--data.urls"
        raise UserError(f"{flag}: {err}") from None


def check_output_dir(output_dir: Any) -> None:
    """``writer.output_dir`` is a writable folder, or can be created (nothing is created here)."""
    if output_dir is None or str(output_dir) == "":
        raise UserError("--writer.output_dir is not set: pass the folder for the pseudo-label shards")
    path = Path(str(output_dir)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"--writer.output_dir {str(output_dir)!r} is a file, not a folder: pass a folder path "
                "(it is created if missing)"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"--writer.output_dir {str(output_dir)!r} is not writable: pick another folder")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--writer.output_dir {str(output_dir)!r} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"--writer.output_dir {str(output_dir)!r} cannot be created: no write permission in {parent}"
        )


def check_accelerator(accelerator: Any, devices: Any = "auto") -> None:
    """A GPU config on a machine without a GPU is reported with the two ways out (CPU, or a toy config)."""
    name = str(accelerator).lower() if isinstance(accelerator, str) else ""
    if name not in ("gpu", "cuda"):
        return
    import torch

    mps = name == "gpu" and torch.backends.mps.is_available()
    if not torch.cuda.is_available() and not mps:
        raise UserError(
            f"--trainer.accelerator {name} but this machine has no CUDA GPU. Add --trainer.accelerator cpu "
            f"({SD_ON_CPU}), or try {_TOY_CONFIGS}"
        )
    wanted = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, list) else None)
    count = torch.cuda.device_count()
    if wanted is not None and wanted > count > 0:
        raise UserError(f"--trainer.devices {devices} but this machine has {count} GPU(s)")


# --------------------------------------------------------------------------------------------------------------
# the model: layer names and K from the U-Net config
# --------------------------------------------------------------------------------------------------------------


def _hub_config(repo_id: str, subfolder: str, option: str = "pretrained") -> dict[str, Any]:
    """``<subfolder>/config.json`` (the root one without a subfolder) of a hub model (from the cache when offline);
    a UserError naming ``--model.<option>`` and saying how to get it."""
    import json

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return json.loads(
            Path(hf_hub_download(repo_id, "config.json", subfolder=subfolder or None)).read_text()
        )
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else "the hub cannot be reached"
        )
        folder = "/path/sd" if option == "pretrained" else f"/path/{option.split('_')[0]}"
        toy = f"; or try {_TOY_CONFIGS}" if option == "pretrained" else ""
        raise UserError(
            f"--model.{option} {repo_id!r} is a hub id, but {why}. Download it once where there is network "
            f"(`hf download {repo_id} --local-dir {folder}`) and pass --model.{option} {folder}{toy}"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"--model.{option} {repo_id!r}: no such hub model (a typo? gated models need `hf auth login`)"
        ) from None
    except EntryNotFoundError:
        where = f"{subfolder}/config.json" if subfolder else "config.json"
        raise UserError(
            f"--model.{option} {repo_id!r} has no {where}: not the model this option takes"
        ) from None


def _local_model(pretrained: str) -> Path | None:
    """The folder of a local or shipped model, or None for a hub id: backbone's own resolution, as a UserError."""
    from emerdiff_pl.backbone import resolve_local_model

    try:
        return resolve_local_model(pretrained)
    except FileNotFoundError as err:
        raise UserError(f"--model.pretrained: {err}") from None


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: {err})") from None


def model_configs(pretrained: str) -> tuple[Any, dict[str, Any]]:
    """(U-Net on the meta device, VAE config) of ``pretrained``: no weights are read or allocated."""
    from accelerate import init_empty_weights

    if pretrained in (TINY_RANDOM, SD14_ARCH):
        from emerdiff_pl import backbone

        build = (
            backbone.tiny_random_components if pretrained == TINY_RANDOM else backbone.sd14_arch_components
        )
        with init_empty_weights():
            parts = build()
        return parts["unet"], dict(parts["vae"].config)
    local = _local_model(pretrained)
    if local is not None:
        unet_config, vae_config = (
            _read_json(local / "unet" / "config.json"),
            _read_json(local / "vae" / "config.json"),
        )
    else:
        unet_config, vae_config = _hub_config(pretrained, "unet"), _hub_config(pretrained, "vae")
    from diffusers import UNet2DConditionModel

    try:
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(unet_config)
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(
            f"--model.pretrained {pretrained!r}: its unet/config.json does not build a U-Net ({err})"
        ) from None
    return unet, vae_config


def layer_side(layer: str, unet: Any, latent_side: int) -> int:
    """Side of the token grid of attention layer ``layer`` for square latents of ``latent_side``."""
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    if match := re.match(r"down_blocks\.(\d+)\.", layer):
        level = int(match[1])
    elif layer.startswith("mid_block."):
        level = n_down - 1
    elif match := re.match(r"up_blocks\.(\d+)\.", layer):
        level = n_up - 1 - int(match[1])
    else:
        raise ValueError(f"cannot place layer {layer!r} on a U-Net level")
    side = latent_side
    for _ in range(level):
        side = -(-side // 2)  # stride-2 convolutions with padding 1: ceil
    return side


def check_model(config: EmerDiffConfig) -> None:
    """Layer names exist in the U-Net, and K fits the feature layer's grid at ``model.resolution``."""
    pretrained = config.pretrained
    unet, vae_config = model_configs(pretrained)
    names = [name.removesuffix(".processor") for name in unet.attn_processors]
    resolution = config.resolution
    latent_side = resolution // 2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1)
    for option in ("feature_layer", "modulated_layer"):
        layer = getattr(config, option)
        if layer in names:
            continue
        cross = [n for n in names if n.endswith("attn2")]
        listing = "\n".join(
            f"      {n}  ({layer_side(n, unet, latent_side)}² tokens at {resolution}²)" for n in cross
        )
        raise UserError(
            f"--model.{option} {layer!r} is not an attention layer of the U-Net of {pretrained!r}. Its "
            f"cross-attention layers (each ….attn1 beside them is self-attention):\n{listing}"
        )
    layer, k = config.feature_layer, config.num_masks
    side = layer_side(layer, unet, latent_side)
    if k > side * side:
        raise UserError(
            f"--model.num_masks {k} exceeds the {side}×{side} = {side * side} feature vectors of {layer} at "
            f"--model.resolution {resolution}: lower --model.num_masks or raise --model.resolution"
        )
    if config.decoder == "taesd":
        taesd = config.taesd_model
        from emerdiff_pl.backbone import shipped_taesd

        if taesd not in (TINY_RANDOM, SD14_ARCH) and shipped_taesd(taesd) is None:
            path = Path(taesd).expanduser()
            if path.exists() or taesd.count("/") != 1:
                if not (path / "config.json").is_file():
                    raise UserError(
                        f"--model.taesd_model {taesd!r} is not an AutoencoderTiny folder (no config.json)"
                    )
            else:
                _hub_config(taesd, "", option="taesd_model")
    check_classifier(config, unet)


def check_probe_file(config: EmerDiffConfig) -> None:
    """With ``classifier: probe``, the probe file exists (what the command line can check before Lightning)."""
    if config.classifier == "probe" and not Path(str(config.probe)).expanduser().is_file():
        raise UserError(
            f"--model.probe: probe file {config.probe!r} does not exist; write one with emerdiff-pl fit-probe"
        )


def check_classifier(config: EmerDiffConfig, unet: Any) -> None:
    """The classifier can be built (emerdiff_pl.classifiers): the probe file exists and was fit on this model's
    features (feature width from ``unet``, a meta-device U-Net), a CLIP folder holds a model or a hub id is
    cached. Class names were read when the config was built."""
    if config.classifier == "probe":
        from emerdiff_pl.classifiers.probe import FeatureSource, Probe

        width = unet.get_submodule(config.feature_layer).to_q.out_features
        try:
            Probe.load(config.probe, expected=FeatureSource.of(config, width))
        except (OSError, ValueError) as err:
            raise UserError(f"--model.probe: {err}") from None
    elif config.classifier == "clip":
        from emerdiff_pl.backbone import local_path

        name = config.clip_model
        path = local_path(name)  # the rule load_clip reads the name by: a folder, or a hub id
        if path is not None:
            if not (path / "config.json").is_file():
                raise UserError(
                    f"--model.clip_model {name!r} is not a CLIP model folder (no config.json): pass a hub id "
                    "such as openai/clip-vit-base-patch16 or a folder written by CLIPModel.save_pretrained"
                )
        else:
            _hub_config(name, "", option="clip_model")


__all__ = [
    "SD_ON_CPU",
    "UserError",
    "check_accelerator",
    "check_classifier",
    "check_probe_file",
    "check_input",
    "check_model",
    "check_model_settings",
    "check_model_values",
    "collect_problems",
    "check_output_dir",
    "layer_side",
    "model_configs",
    "validate_predict_config",
]
