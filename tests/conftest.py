"""Shared fixtures: synthetic input shards and image folders (good and bad inputs), a fast stand-in segmenter
with the ``predict_step`` contract of docs/interfaces.md, and helpers to run the CLI in a subprocess."""

# ruff: noqa: E402 - HF_HUB_OFFLINE must be set before anything imports huggingface_hub
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One compute thread per process (this one, its subprocesses, the SLURM jobs they submit): on 2 cores shared with
# another job, torch's second OpenMP thread waits for a descheduled core at every parallel region, and the suite
# ran 4× slower (5 tests: 123 s with the default threads beside one busy process, 29 s with one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import dataclasses
import io
import json
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from emerdiff_pl.inputs import InputPolicy
from emerdiff_pl.isolation import SampleErrorIsolation

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    """A label map (or image) array as PNG bytes."""
    return encode(Image.fromarray(array), "PNG")


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def good_inputs() -> dict[str, tuple[str, bytes, tuple[int, int]]]:
    """key → (extension, bytes, (H, W) after decoding) for inputs that must decode, one per awkward kind."""
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., :3] = 40
    rgba[:, :15, 3] = 255  # left half opaque dark grey, right half fully transparent
    sixteen = np.zeros((18, 22), dtype=np.uint16)
    sixteen[:, 11:] = 65535
    palette = Image.fromarray(random_rgb(16, 24, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    exif_image = Image.fromarray(random_rgb(24, 40, 4))
    exif = exif_image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise on display → shown as 40 high, 24 wide
    return {
        "rgb": ("jpg", encode(Image.fromarray(random_rgb(40, 48, 1)), "JPEG"), (40, 48)),
        "gray": ("png", encode(Image.fromarray(random_rgb(30, 20, 2)[..., 0]), "PNG"), (30, 20)),
        "rgba": ("png", encode(Image.fromarray(rgba, "RGBA"), "PNG"), (20, 30)),
        "sixteen_bit": ("png", encode(Image.fromarray(sixteen), "PNG"), (18, 22)),
        "cmyk": ("jpg", encode(Image.fromarray(random_rgb(26, 34, 5)).convert("CMYK"), "JPEG"), (26, 34)),
        "palette": ("png", encode(palette, "PNG"), (16, 24)),
        "one_pixel": ("png", encode(Image.fromarray(random_rgb(1, 1, 6)), "PNG"), (1, 1)),
        "very_wide": ("jpg", encode(Image.fromarray(random_rgb(3, 400, 7)), "JPEG"), (3, 400)),
        "exif_rotated": ("jpg", encode(exif_image, "JPEG", exif=exif), (40, 24)),
    }


def bad_inputs() -> dict[str, tuple[str, bytes, str]]:
    """key → (extension, bytes, a word the failure reason must contain)."""
    jpeg = encode(Image.fromarray(random_rgb(64, 64, 8)), "JPEG")
    png = encode(Image.fromarray(random_rgb(64, 64, 9)), "PNG")
    sos = jpeg.index(b"\xff\xda")  # start of scan: the header before it stays valid
    return {
        "corrupt_jpeg": ("jpg", jpeg[: sos + 20] + b"\xff\xc8" * 50 + jpeg[-2:], "decode"),  # bad scan data
        "truncated_png": ("png", png[: len(png) // 2], "decode"),
        "text_as_jpg": ("jpg", b"this is not an image, just text\n" * 10, "not an image"),
        "zero_size": ("png", b"", "empty"),
        "too_large": ("png", encode(Image.fromarray(random_rgb(400, 300, 10)), "PNG"), "too large"),
    }


# Data modules over the mixed inputs use this limit, so that "too_large" trips the decompression-bomb guard.
MIXED_MAX_PIXELS = 100_000


# a 10-step schedule {901, 801, …, 1} with t_m = 201 keeps every segmenter test at three denoising steps
FAST_SEGMENTER = dict(
    pretrained="tiny-random",
    resolution=64,
    num_masks=4,
    num_inference_steps=10,
    modulation_timestep=201,
    kmeans_n_init=2,
    gaussian_sigma=1.0,
)


@contextmanager
def changed_settings(model, **changes) -> Iterator[None]:
    """The segmenter's per-call settings (``EmerDiffSegmenter.config``) changed for the duration of the block."""
    before = model.config
    model.config = dataclasses.replace(before, **changes)
    try:
        yield
    finally:
        model.config = before


def smooth_images(batch: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    """Blobby images (bilinear upsampling of 4×4 noise), so low-res clusters form regions."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(
        torch.rand(batch, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False
    )


# ----------------------------------------------------------------------------------------------------------------
# shards and folders
# ----------------------------------------------------------------------------------------------------------------


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for field, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def make_shards(
    directory: Path, num_shards: int, per_shard: int, size: int = 24, prefix: str = "in"
) -> list[str]:
    """``num_shards`` tars of ``per_shard`` random RGB JPEGs (plus a .cls member); returns all keys in order."""
    keys = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            key = f"s{s:02d}_{i:03d}"
            image = Image.fromarray(random_rgb(size, size + (i % 3) * 4, seed=1000 * s + i))
            samples.append((key, {"jpg": encode(image, "JPEG"), "cls": b"0"}))
            keys.append(key)
        write_tar(directory / f"{prefix}-{s:06d}.tar", samples)
    return keys


@pytest.fixture
def mixed_shards(tmp_path: Path) -> dict:
    """Three shards mixing every good and bad input kind, plus a corrupt (truncated) tar."""
    good, bad = good_inputs(), bad_inputs()
    items = [(k, {ext: data}) for k, (ext, data, _) in good.items()] + [
        (k, {ext: data}) for k, (ext, data, _) in bad.items()
    ]
    items.append(("no_image", {"txt": b"a sample without an image member"}))
    directory = tmp_path / "in"
    for s in range(3):
        write_tar(directory / f"mixed-{s:06d}.tar", items[s::3])
    whole = write_tar(
        tmp_path / "whole.tar", [("lost_a", {"jpg": good["rgb"][1]}), ("lost_b", {"jpg": good["rgb"][1]})]
    )
    data = whole.read_bytes()
    (directory / "mixed-000003.tar").write_bytes(data[: 512 + len(good["rgb"][1]) // 2])  # cut inside lost_a
    return {
        "urls": str(directory / "mixed-{000000..000003}.tar"),
        "good": {k: hw for k, (_, _, hw) in good.items()},
        "bad": {k: word for k, (_, _, word) in bad.items()} | {"no_image": "no image member"},
        "corrupt_tar": str(directory / "mixed-000003.tar"),
    }


@pytest.fixture
def image_folder(tmp_path: Path) -> dict:
    """A nested folder with awkward names: dots, spaces, a name clash (a.jpg / a.png), hidden files, non-images."""
    root = tmp_path / "images"
    files = {
        "a.jpg": (20, 30),
        "a.png": (22, 18),
        "x.y.z.jpeg": (16, 16),
        "sub dir/b.c.png": (12, 40),
        "sub dir/deeper/C.JPG": (33, 21),
        "sub.dir2/d.webp": (10, 10),
    }
    for rel, (h, w) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[rel.rsplit(".", 1)[-1].lower()]
        path.write_bytes(encode(Image.fromarray(random_rgb(h, w, seed=h * w)), fmt))
    (root / ".hidden.jpg").write_bytes(b"ignored")
    (root / "notes.txt").write_text("ignored")
    (root / ".cache").mkdir()
    (root / ".cache" / "e.jpg").write_bytes(b"ignored")
    return {"root": root, "sizes": files}


# ----------------------------------------------------------------------------------------------------------------
# a stand-in segmenter with the predict_step contract of docs/interfaces.md
# ----------------------------------------------------------------------------------------------------------------


class ColourQuantizer(pl.LightningModule):
    """Labels each pixel of the model input by its brightness band (K bands), resized back to the original size
    as EmerDiffSegmenter does: fast, deterministic, contract-conforming (errors isolated per sample too).

    Args:
        resolution: model input side (keep_aspect, sides ×64: EmerDiffSegmenter's default policy).
        num_masks: K.
        seed: recorded only.
        delay: seconds to sleep per image (to kill a run mid-way).
        fail_at_batch: raise RuntimeError at this batch index and every later one (a broken device).
        poison_key: the sample with this key gets labels that no PNG can hold (a per-sample output error).
        hold_file: from the 4th batch on, wait while this file exists and no SIGTERM came (a test decides when
            the run goes on); ``<hold_file>.held`` appears when the wait starts.
        crash_key: raise RuntimeError for any batch that holds this key (an input the model cannot segment).
    """

    def __init__(
        self,
        resolution: int = 32,
        num_masks: int = 4,
        seed: int = 0,
        delay: float = 0.0,
        fail_at_batch: int = -1,
        poison_key: str = "",
        hold_file: str = "",
        crash_key: str = "",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.register_buffer("anchor", torch.zeros(1))
        self.input_policy = InputPolicy(resolution, "keep_aspect", 64)
        self.isolation = SampleErrorIsolation(self.label_batch)

    def run_info(self) -> dict:
        return {"model": "colour-quantizer", "dtype": "float32", "versions": {"colour-quantizer": "1"}}

    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict:
        return self.isolation(batch, batch_idx)

    def label_batch(self, batch: dict, batch_idx: int = 0) -> dict:
        start = time.perf_counter()
        if 0 <= self.hparams.fail_at_batch <= batch_idx:
            raise RuntimeError(f"planned failure at batch {batch_idx}")
        if self.hparams.crash_key and self.hparams.crash_key in batch["key"]:
            raise RuntimeError(f"cannot segment {self.hparams.crash_key}")
        if batch_idx >= 3 and self.hparams.hold_file and os.path.exists(self.hparams.hold_file):
            # the event a test waits for: batches 0-2 are in the writer's shards now
            Path(self.hparams.hold_file + ".held").touch()
            while os.path.exists(self.hparams.hold_file) and not self.trainer.received_sigterm:
                time.sleep(0.05)
        k = self.hparams.num_masks
        images = batch["image"]
        time.sleep(self.hparams.delay * len(images))
        bands = (images.mean(1) * k).long().clamp(0, k - 1)
        sizes = [[int(h), int(w)] for h, w in batch["original_size"].tolist()]
        labels = [
            F.interpolate(band[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
            for band, size in zip(bands, sizes, strict=True)
        ]
        labels = [
            lab * 0 - 1 if key == self.hparams.poison_key else lab
            for lab, key in zip(labels, batch["key"], strict=True)
        ]
        small = F.avg_pool2d(images, 8) if len(images) else images.new_zeros(0, 3, 1, 1)
        lowres = (small.mean(1) * k).long().clamp(0, k - 1)
        one_hot = F.one_hot(lowres, k).flatten(1, 2).float()  # B×hw×K
        colours = small.flatten(2).transpose(1, 2)  # B×hw×3
        embeddings = one_hot.transpose(1, 2) @ colours / one_hot.sum(1)[..., None].clamp(min=1)
        return {
            "key": list(batch["key"]),
            "url": list(batch["url"]),
            "original": list(batch["original"]),
            "original_size": sizes,
            "labels": labels,
            "lowres_labels": lowres,
            "model_size": list(images.shape[-2:]) if len(images) else None,
            "mask_embeddings": embeddings,
            "failures": list(batch["failures"]),
            "seconds": time.perf_counter() - start,
            "timings": {"quantize_s": time.perf_counter() - start},
        }


class ConfiguredQuantizer(ColourQuantizer):
    """A ColourQuantizer that says which of its settings shape its labels as EmerDiffSegmenter does: its
    ``config`` is an EmerDiffConfig (``label_settings()``) with its resolution, K and seed."""

    @property
    def config(self):
        from emerdiff_pl.config import EmerDiffConfig

        h = self.hparams
        return EmerDiffConfig(
            pretrained="tiny-random", resolution=h.resolution, num_masks=h.num_masks, seed=h.seed
        )


FAKE_CLI = """\
import sys
sys.path.insert(0, {tests!r})
from conftest import ColourQuantizer
from emerdiff_pl.commands.predict import cli_main

if __name__ == "__main__":
    cli_main(sys.argv[1:], model_class=ColourQuantizer)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # left open, gloo can abort the exit (code -6)
        sys.exit("cli_main left its DDP process group open")
"""


# The console script's own path (emerdiff_pl.cli.main: exit codes, messages) with a stand-in model; the command
# line check that runs before Lightning knows EmerDiffSegmenter's options only, so the stand-in's go unchecked.
FAKE_MAIN = """\
import sys
sys.path.insert(0, {tests!r})
import conftest
from emerdiff_pl import cli
from emerdiff_pl.commands import predict, preflight

run = predict.cli_main
predict.cli_main = lambda args=None, **kwargs: run(args, model_class=conftest.{model})
preflight.check_command_line = lambda argv: argv
sys.exit(cli.main())
"""


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in [n for n in env if n.startswith("SLURM_")]:
        del env[name]
    return env


@pytest.fixture
def fake_cli(tmp_path: Path) -> Path:
    """A script running the real CLI with :class:`ColourQuantizer` as the model (a file, so DDP can relaunch it)."""
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI.format(tests=str(TESTS)))
    return script


@pytest.fixture
def fake_main(tmp_path: Path):
    """``fake_main(model="ColourQuantizer")``: a script running ``emerdiff-pl`` (the console script's main) with
    that conftest stand-in as the model."""

    def script(model: str = "ColourQuantizer") -> Path:
        path = tmp_path / f"fake_main_{model}.py"
        path.write_text(FAKE_MAIN.format(tests=str(TESTS), model=model))
        return path

    return script


def spawn(command: list[str], cwd: Path = REPO) -> subprocess.Popen:
    """Start the CLI in its own process group (so a test can signal the whole group, as SLURM does)."""
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run(command: list[str], timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# reading outputs
# ----------------------------------------------------------------------------------------------------------------


def read_output(output_dir: Path) -> dict:
    """Everything a predict run left: samples per finished shard, failures, temp files, summaries."""
    from emerdiff_pl.shardio import iter_samples

    shards = sorted(output_dir.glob("*.tar"))
    samples = list(iter_samples([str(s) for s in shards])) if shards else []
    failures = [json.loads(line) for f in sorted(output_dir.glob("failures-*.jsonl")) for line in f.open()]
    manifests = [json.loads(line) for f in sorted(output_dir.glob("manifest-*.jsonl")) for line in f.open()]
    summaries = [json.loads(f.read_text()) for f in sorted(output_dir.glob("summary-*.json"))]
    temp = [p.name for p in output_dir.iterdir() if p.name.endswith(".tmp")]
    return {
        "shards": shards,
        "samples": samples,
        "keys": [s["__key__"] for s in samples],
        "failures": failures,
        "manifests": manifests,
        "summaries": summaries,
        "temp": temp,
    }


# ----------------------------------------------------------------------------------------------------------------
# named classes: a tiny random CLIP saved as a user's folder
# ----------------------------------------------------------------------------------------------------------------


def save_tiny_random_clip(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP (ViT with 8-pixel patches on 32², 2 blocks; the project's 54-token tokenizer) to
    ``folder`` as ``save_pretrained`` does: a local CLIP folder, loaded from there like a user's."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from emerdiff_pl.backbone import random_text_encoder, tiny_tokenizer

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = random_text_encoder(hidden_size=16, layers=1, heads=2).config
        vision = {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        }
        config = CLIPConfig(
            text_config=text.to_dict(),
            vision_config={**vision, "image_size": 32, "patch_size": 8},
            projection_dim=8,
        )
        CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tiny_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIPModel and its processor saved as a user's folder (loaded from there like one)."""
    return save_tiny_random_clip(tmp_path_factory.mktemp("tiny-clip"))
