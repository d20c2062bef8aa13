"""Stable Diffusion components for EmerDiff: from a hub id, a local diffusers folder, or `tiny-random`.

Only what the method needs is loaded (U-Net, VAE, text encoder + tokenizer for the empty prompt, and the
scheduler's noise schedule as a DDPM scheduler); no pipeline, no safety checker, no network assumed.
`load_taesd` loads the optional TAESD decoder (`decoder: taesd`) from the same kinds of sources.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_RANDOM = "tiny-random"
SD14_ARCH = "sd14-arch"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SHIPPED_MODELS = Path(__file__).parent / "assets"


@dataclass
class Backbone:
    """The frozen components, plus the empty-prompt embedding computed once."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    _empty_prompt: Tensor | None = field(default=None, repr=False)

    @torch.no_grad()
    def empty_prompt_embedding(self) -> Tensor:
        """Text conditioning for "" (1, L, D), on the text encoder's device; no classifier-free guidance."""
        if self._empty_prompt is None:
            ids = self.tokenizer(
                "",
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            device = next(self.text_encoder.parameters()).device
            self._empty_prompt = self.text_encoder(ids.to(device))[0]
        return self._empty_prompt


def ddpm_scheduler(config: dict) -> DDPMScheduler:
    """The model's noise schedule as the DDPM scheduler of docs/method.md §2 ("leading" spacing, steps_offset 1)."""
    return DDPMScheduler.from_config(
        config,
        steps_offset=1,
        timestep_spacing="leading",
        clip_sample=False,
        thresholding=False,
        variance_type="fixed_small",
    )


def tiny_random_components(seed: int = 0) -> dict:
    """Tiny SD-shaped components built in-process: SD 1.x block structure and layer names, random weights.

    VAE downsamples by 2, so a 64² image gives 32² latents and an 8² feature level at `up_blocks.1`
    (the level SD runs at 16² for 512²). Runs a U-Net call in milliseconds on a CPU; for tests and demos.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(8, 16, 16, 32),
            norm_num_groups=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
            attention_head_dim=2,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            sample_size=64,
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            norm_num_groups=8,
        )
        text_encoder = random_text_encoder(hidden_size=32, layers=2, heads=4)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_tokenizer(),
        "scheduler": _sd_scheduler(),
    }


def _sd_scheduler() -> DDPMScheduler:
    """SD 1.x's noise schedule (scaled-linear betas 0.00085–0.012 over 1000 steps, ε-prediction)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
        clip_sample=False,
        prediction_type="epsilon",
    )


def sd14_arch_components(seed: int = 0) -> dict:
    """The full SD 1.x U-Net and VAE architecture with random weights: the FLOPs and memory of the real model,
    no download. For throughput benchmarks only (the text encoder is one CLIP-L-width layer: it runs once)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = random_text_encoder(hidden_size=768, layers=1, heads=12)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_tokenizer(),
        "scheduler": _sd_scheduler(),
    }


def random_text_encoder(hidden_size: int, layers: int, heads: int) -> CLIPTextModel:
    """A CLIP text encoder over the tiny vocabulary (77 positions), random weights from the current RNG."""
    config = CLIPTextConfig(
        vocab_size=len(_tiny_vocab()),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if hidden_size < 64 else 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def _tiny_vocab() -> dict[str, int]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return vocab


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over a 54-token vocabulary written locally: the empty prompt needs no hub."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(_tiny_vocab()))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            str(Path(tmp) / "vocab.json"),
            str(Path(tmp) / "merges.txt"),
            model_max_length=77,
            pad_token="<|endoftext|>",
        )


def local_path(name: str) -> Path | None:
    """The folder `name` points to, or None when it reads as a hub id ("org/name", not a local path)."""
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists()
    if not looks_local and name.count("/") == 1:
        return None
    return path


def resolve_local_model(pretrained: str) -> Path | None:
    """A local folder for `pretrained`, a shipped model name (e.g. `toyworld-ldm`), or None for a hub id."""
    shipped = _SHIPPED_MODELS / pretrained
    if "/" not in pretrained and (shipped / "model_index.json").is_file():
        return shipped
    path = local_path(pretrained)
    if path is None:
        return None
    if not path.is_dir():
        shipped_names = shipped_models()
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is not a folder. Pass a local diffusers folder (with "
            f"{', '.join(COMPONENTS)} subfolders), a hub id like 'CompVis/stable-diffusion-v1-4', "
            f"{TINY_RANDOM!r}, or a shipped model: {shipped_names}"
        )
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        present = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"diffusers folder {str(path)!r} lacks {missing}; it holds {present}. Save each component with "
            "save_pretrained (pipeline.save_pretrained(folder) writes them all)."
        )
    return path


def hub_error(hub_id: str, option: str, folder: str, err: Exception) -> OSError:
    """The error for a hub id that could not be loaded (offline or unreachable): how to get the files."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return OSError(
        f"could not load hub model {hub_id!r} ({'offline mode, ' if offline else ''}{err.__class__.__name__}). "
        "Without network access, download it once where you have access "
        f"(`hf download {hub_id} --local-dir {folder}`) and pass {option}={folder}."
    )


def load_backbone(pretrained: str, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load the frozen SD components (eval mode, no grad) in `dtype` on the CPU."""
    if pretrained == TINY_RANDOM:
        parts = tiny_random_components()
    elif pretrained == SD14_ARCH:
        parts = sd14_arch_components()
    else:
        local = resolve_local_model(pretrained)
        source = str(local) if local is not None else pretrained
        try:
            parts = {
                "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype),
                "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype),
                "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype),
                "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
                "scheduler": DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
            }
        except (OSError, ValueError) as err:
            if local is not None:
                raise
            raise hub_error(pretrained, "pretrained", "/path/sd", err) from err
    parts["scheduler"] = ddpm_scheduler(dict(parts["scheduler"].config))
    for name in ("unet", "vae", "text_encoder"):
        parts[name].requires_grad_(False).eval()
        if parts[name].dtype != dtype:
            parts[name].to(dtype=dtype)
    return Backbone(**parts)


def latent_scale_factor(decoder: AutoencoderKL | AutoencoderTiny) -> int:
    """Image pixels per latent pixel along each side."""
    if isinstance(decoder, AutoencoderTiny):
        return decoder.config.upsampling_scaling_factor ** (
            len(decoder.config.decoder_block_out_channels) - 1
        )
    return 2 ** (len(decoder.config.block_out_channels) - 1)


def tiny_random_taesd(vae: AutoencoderKL, seed: int = 0) -> AutoencoderTiny:
    """A small random AutoencoderTiny for `vae`'s latents (channels and scale factor): for tests and demos."""
    stages = int(math.log2(latent_scale_factor(vae))) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderTiny(
            encoder_block_out_channels=(16,) * stages,
            decoder_block_out_channels=(16,) * stages,
            num_encoder_blocks=(1,) * stages,
            num_decoder_blocks=(1,) * stages,
            latent_channels=vae.config.latent_channels,
        )


def shipped_taesd(name: str) -> Path | None:
    """The folder of a shipped AutoencoderTiny (e.g. `toyworld-taesd`, distilled for `toyworld-ldm`), or None."""
    path = _SHIPPED_MODELS / name
    return path if "/" not in name and (path / "config.json").is_file() else None


def shipped_models() -> list[str]:
    """Names of the shipped diffusers models (`pretrained`) and of the shipped TAESDs (`taesd_model`)."""
    if not _SHIPPED_MODELS.is_dir():
        return []
    return sorted(p.name for p in _SHIPPED_MODELS.iterdir() if (p / "model_index.json").is_file())


def _resolve_taesd(name: str) -> Path | None:
    """A local (or shipped) AutoencoderTiny folder for `name`, or None for a hub id."""
    shipped = shipped_taesd(name)
    if shipped is not None:
        return shipped
    path = local_path(name)
    if path is None:
        return None
    if not path.is_dir():
        raise FileNotFoundError(
            f"taesd_model={name!r} is not a folder. Pass a local AutoencoderTiny folder (with config.json), "
            f"a hub id like 'madebyollin/taesd', a shipped one ('toyworld-taesd', for toyworld-ldm), "
            f"{TINY_RANDOM!r} or {SD14_ARCH!r}"
        )
    if not (path / "config.json").is_file():
        present = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"AutoencoderTiny folder {str(path)!r} lacks config.json; it holds {present}. Save it with "
            "AutoencoderTiny.save_pretrained(folder)."
        )
    return path


def load_taesd(name: str, vae: AutoencoderKL, dtype: torch.dtype = torch.float32) -> AutoencoderTiny:
    """The TAESD decoder (eval mode, no grad) in `dtype` on the CPU: a hub id or local AutoencoderTiny folder,
    `tiny-random` (shaped like `vae`'s latents), or `sd14-arch` (full size, random weights; benchmarks only).

    It must decode `vae`'s latents: same latent channels and scale factor, else a ValueError."""
    if name == TINY_RANDOM:
        taesd = tiny_random_taesd(vae)
    elif name == SD14_ARCH:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            taesd = AutoencoderTiny()  # the default config is TAESD for SD 1.x/2.x
    else:
        local = _resolve_taesd(name)
        try:
            taesd = AutoencoderTiny.from_pretrained(
                str(local) if local is not None else name, torch_dtype=dtype
            )
        except (OSError, ValueError) as err:
            if local is not None:
                raise
            raise hub_error(name, "taesd_model", "/path/taesd", err) from err
    got = (taesd.config.latent_channels, latent_scale_factor(taesd))
    want = (vae.config.latent_channels, latent_scale_factor(vae))
    if got != want:
        raise ValueError(
            f"taesd_model={name!r} decodes {got[0]}-channel latents upsampling ×{got[1]}, but the backbone's "
            f"VAE has {want[0]}-channel latents at ×{want[1]}; pass a TAESD trained for this VAE "
            f"({TINY_RANDOM!r} builds a random one that fits)"
        )
    taesd.requires_grad_(False).eval()
    return taesd if taesd.dtype == dtype else taesd.to(dtype=dtype)


__all__ = [
    "Backbone",
    "hub_error",
    "local_path",
    "random_text_encoder",
    "tiny_tokenizer",
    "SD14_ARCH",
    "TINY_RANDOM",
    "load_backbone",
    "load_taesd",
    "shipped_models",
    "shipped_taesd",
    "ddpm_scheduler",
    "tiny_random_components",
]
