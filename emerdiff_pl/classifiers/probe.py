"""`probe`: a few-shot classifier on the U-Net feature layer's query vectors (the vectors k-means clusters).

A user labels a handful of images; their features (B, N, D) at the feature grid h×w and ground-truth label maps
(uint8, 255 = ignore, any size) fit either a linear probe (softmax regression, full-batch L-BFGS) or nearest
class prototypes (cosine to the class means of centred, normalized features). A `Probe` turns the features of
any image into class probabilities (B, C, h, w) and is saved as one small safetensors file that also records
the class names and the features it was fit on (`FeatureSource`), so features from another model, layer,
timestep or width are refused by name.

The defaults (linear, majority cell labels) are measured: see the comment above `DEFAULT_KIND`.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from emerdiff_pl.fields import IGNORE_CLASS
from emerdiff_pl.labelmaps import ids_beyond_classes
from emerdiff_pl.shardio import file_digest

if TYPE_CHECKING:
    from emerdiff_pl.config import EmerDiffConfig

PROBE_KINDS = ("linear", "prototype")
LABEL_TARGETS = ("majority", "fractions")
ProbeKind = Literal["linear", "prototype"]
LabelTargets = Literal["majority", "fractions"]
# Measured on the toy world (benchmarks/toyworld/probe_compare.py, configs/toyworld.yaml's feature layer, 32-dim
# queries on a 16×16 grid; fit on N labelled scenes, scored on 64 held-out scenes, seeds 0 / 1; the probe alone,
# scores upsampled bilinearly; pixel accuracy / named mIoU, %):
#   N = 4:  linear (majority, wd 1e-3) 80.3 / 38.6 and 81.6 / 39.2; prototype 71.2 / 35.7 and 72.3 / 35.8
#   N = 16: linear (majority, wd 1e-3) 83.2 / 41.8 and 83.5 / 41.7; prototype 72.3 / 37.1 and 70.3 / 34.0
# Linear wins by 8–13 accuracy points; area-fraction cell targets are within ±0.6 mIoU of majority labels (no
# consistent sign), so the simpler majority stays. wd 1e-4: +0.8 to +1.1 mIoU at N = 16, −0.3 to −0.6 at N = 4
# (not adopted: chosen on these held-out scenes it would be tuned on the test set). Fits take under 2 s.
DEFAULT_KIND: ProbeKind = "linear"
DEFAULT_TARGETS: LabelTargets = "majority"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureSource:
    """What a probe's features come from. `model`, `feature_layer`, `feature_timestep` and `feature_dim` must
    match to use a probe; `resolution` and `resize` only change the scale of things, so a mismatch warns."""

    model: str
    feature_layer: str
    feature_timestep: int
    feature_dim: int
    resolution: int
    resize: str

    @classmethod
    def of(cls, config: EmerDiffConfig, feature_dim: int) -> FeatureSource:
        """The features a segmenter with `config` reads (`feature_dim`: its feature layer's query width)."""
        return cls(
            model=config.pretrained,
            feature_layer=config.feature_layer,
            feature_timestep=config.feature_timestep,
            feature_dim=int(feature_dim),
            resolution=config.resolution,
            resize=config.resize,
        )

    def differences(self, other: FeatureSource) -> tuple[list[str], list[str]]:
        """(fields that must match but differ, fields that differ and only warn), each 'name: ours vs theirs'."""
        ours, theirs = asdict(self), asdict(other)
        differ = [f"{k}: {ours[k]!r} vs {theirs[k]!r}" for k in ours if ours[k] != theirs[k]]
        hard = [
            d
            for d in differ
            if d.split(":")[0] in ("model", "feature_layer", "feature_timestep", "feature_dim")
        ]
        return hard, [d for d in differ if d not in hard]


@dataclass
class ProbeFit:
    """How a fit went: pixel accuracy at label resolution (scores upsampled bilinearly, argmax, 255 ignored) and
    at the feature grid (against each cell's majority label) on the training and the held-out images."""

    kind: str
    targets: str
    num_train_images: int
    num_train_cells: int
    train_accuracy: float
    train_cell_accuracy: float
    heldout_accuracy: float | None = None
    heldout_cell_accuracy: float | None = None
    num_heldout_images: int = 0
    missing_classes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the CLI: train and held-out pixel accuracy."""
        held = (
            f"held-out pixel accuracy {100 * self.heldout_accuracy:.1f} % ({self.num_heldout_images} images)"
            if self.heldout_accuracy is not None
            else "no held-out images"
        )
        missing = f"; no training pixels of {', '.join(self.missing_classes)}" if self.missing_classes else ""
        return (
            f"{self.kind} probe on {self.num_train_images} images ({self.num_train_cells} feature cells): train "
            f"pixel accuracy {100 * self.train_accuracy:.1f} %, {held}, {self.seconds:.1f} s{missing}"
        )


class Probe(nn.Module):
    """Class probabilities from the feature layer's query vectors: `scores(features (B, N, D), grid) →
    (B, C, h, w)`. An nn.Module so it moves with the segmenter; its tensors are buffers, never trained here."""

    def __init__(
        self,
        kind: ProbeKind,
        class_names: Sequence[str],
        source: FeatureSource,
        tensors: dict[str, Tensor],
        fit: dict[str, Any] | None = None,
    ):
        super().__init__()
        if kind not in PROBE_KINDS:
            raise ValueError(f"probe kind must be one of {PROBE_KINDS}, got {kind!r}")
        need = _TENSORS[kind]
        if set(tensors) != set(need):
            raise ValueError(f"a {kind} probe holds {sorted(need)}, got {sorted(tensors)}")
        self.kind = kind
        self.class_names = tuple(class_names)
        self.source = source
        self.fit = dict(fit or {})
        self.file: str | None = None  # where `load` read it from, and that file's SHA-256 (for the record)
        self.sha256: str | None = None
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.detach().float().clone())
        num_classes, dim = len(self.class_names), source.feature_dim
        if self.present.shape != (num_classes,) or self.mean.shape != (dim,):
            raise ValueError(
                f"probe tensors do not match its {num_classes} class names and feature_dim {dim}: "
                f"present {tuple(self.present.shape)}, mean {tuple(self.mean.shape)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def logits(self, features: Tensor) -> Tensor:
        """Class logits (..., C) of feature vectors (..., D); classes without training pixels get −inf."""
        x = features.to(self.mean.device, torch.float32) - self.mean
        if self.kind == "linear":
            out = (x / self.std) @ self.weight.T + self.bias
        else:
            out = self.scale * F.normalize(x, dim=-1) @ self.prototypes.T
        return out.masked_fill(self.present == 0, float("-inf"))

    def scores(self, features: Tensor, grid: tuple[int, int]) -> Tensor:
        """Class probabilities (B, C, h, w) of the feature layer's query vectors (B, N, D) on the h×w grid."""
        batch, n, dim = features.shape
        h, w = grid
        if n != h * w:
            raise ValueError(f"{n} feature vectors do not fill a {h}×{w} grid")
        if dim != self.source.feature_dim:
            raise ValueError(
                f"the probe was fit on {self.source.feature_dim}-dim features ({self.source.feature_layer} of "
                f"{self.source.model}), got {dim}-dim features"
            )
        probs = self.logits(features).softmax(-1)  # (B, N, C)
        return probs.transpose(1, 2).reshape(batch, self.num_classes, h, w)

    def mask_scores(self, embeddings: Tensor) -> Tensor:
        """Class probabilities (B, K, C) of masks from their embeddings (B, K, D), each mask's mean query vector
        (`SegmentationResult.mask_embeddings`): the probe applied to the embedding averaged inside the mask."""
        return self.logits(embeddings).softmax(-1)

    def check_source(self, source: FeatureSource, path: str | Path | None = None) -> None:
        """Refuse features that are not what the probe was fit on (a ValueError naming both); warn on a
        different resolution or resize."""
        hard, soft = self.source.differences(source)
        where = f" {str(path)!r}" if path is not None else ""
        if hard:
            raise ValueError(
                f"probe{where} was fit on other features than the segmenter's ({'; '.join(hard)}; the probe's "
                "first). Fit a probe for this model and feature layer (emerdiff-pl fit-probe) or use the settings "
                "it was fit with"
            )
        if soft:
            warnings.warn(
                f"probe{where} was fit at other settings ({'; '.join(soft)}): it may transfer worse",
                stacklevel=2,
            )

    def record(self) -> dict[str, Any]:
        """What `<key>.json` says about this classifier: kind, file and its SHA-256, features, the fit report."""
        return {
            "classifier": "probe",
            "kind": self.kind,
            "file": self.file,
            "sha256": self.sha256,
            "source": asdict(self.source),
            "fit": self.fit,
        }

    def save(self, path: str | Path) -> None:
        """One safetensors file: the tensors, and as metadata the kind, class names, source and fit report."""
        metadata = {
            "format": "emerdiff_pl.probe",
            "format_version": str(FORMAT_VERSION),
            "kind": self.kind,
            "class_names": json.dumps(list(self.class_names)),
            "source": json.dumps(asdict(self.source)),
            "fit": json.dumps(self.fit),
        }
        tensors = {name: buffer.detach().cpu().contiguous() for name, buffer in self.named_buffers()}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, expected: FeatureSource | None = None) -> Probe:
        """Read a file written by `save`; with `expected`, refuse a probe fit on other features (`check_source`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"probe file {str(path)!r} does not exist; write one with emerdiff-pl fit-probe"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - a safe_open handle, not a dict
        except Exception as err:  # safetensors raises its own error types for foreign files
            raise ValueError(f"{str(path)!r} is not a probe file (not safetensors: {err})") from None
        if metadata.get("format") != "emerdiff_pl.probe":
            raise ValueError(
                f"{str(path)!r} is a safetensors file but not a probe (no emerdiff_pl.probe metadata)"
            )
        if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"probe {str(path)!r} was written by a newer emerdiff_pl (format {metadata['format_version']})"
            )
        probe = cls(
            metadata["kind"],  # type: ignore[arg-type]
            json.loads(metadata["class_names"]),
            FeatureSource(**json.loads(metadata["source"])),
            tensors,
            json.loads(metadata.get("fit", "{}")),
        )
        probe.file, probe.sha256 = str(path), file_digest(path)
        if expected is not None:
            probe.check_source(expected, path)
        return probe


_TENSORS = {
    "linear": ("weight", "bias", "mean", "std", "present"),
    "prototype": ("prototypes", "scale", "mean", "present"),
}


# --------------------------------------------------------------------------------------------------------------
# labels at the feature grid
# --------------------------------------------------------------------------------------------------------------
def cell_label_fractions(labels: Tensor, grid: tuple[int, int], num_classes: int) -> Tensor:
    """Area fraction of each class in each feature cell: label map (H, W) uint8 (255 = ignore) → (C + 1, h, w),
    the last channel the ignored fraction. Each pixel counts in the cell its centre falls in (the grid laid over
    the whole image); counted with bincount, so a 40-megapixel label map costs O(H·W), not O(C·H·W)."""
    labels = labels.long()
    bad = ids_beyond_classes(labels, num_classes)
    if bad:
        raise ValueError(f"label ids {bad} are ≥ the {num_classes} classes (255 = ignore)")
    (height, width), (h, w) = labels.shape, grid
    ids = torch.where(labels == IGNORE_CLASS, num_classes, labels)  # (H, W) in [0, C]
    rows = ((torch.arange(height, device=ids.device) + 0.5) * h / height).long().clamp_max(h - 1)
    cols = ((torch.arange(width, device=ids.device) + 0.5) * w / width).long().clamp_max(w - 1)
    cell = rows[:, None] * w + cols[None, :]  # (H, W) in [0, h·w)
    counts = torch.bincount((cell * (num_classes + 1) + ids).flatten(), minlength=h * w * (num_classes + 1))
    counts = counts.view(h * w, num_classes + 1).float()
    fractions = counts / counts.sum(1, keepdim=True).clamp_min(1)
    return fractions.T.reshape(num_classes + 1, h, w)


def _cell_targets(fractions: Tensor, targets: LabelTargets) -> tuple[Tensor, Tensor]:
    """(C+1, h, w) fractions → per-cell target distributions (N, C) and weights (N,). `majority`: the cell's most
    common label, one-hot, weight 0 where that is "ignore"; `fractions`: the class fractions renormalized,
    weighted by the labelled fraction."""
    num_classes = fractions.shape[0] - 1
    flat = fractions.flatten(1).T  # (N, C+1)
    if targets == "majority":
        winner = flat.argmax(1)
        weight = (winner != num_classes).float()
        target = F.one_hot(winner.clamp_max(num_classes - 1), num_classes).float()
        return target, weight
    labelled = flat[:, :num_classes].sum(1)
    return flat[:, :num_classes] / labelled.clamp_min(1e-12)[:, None], labelled


# --------------------------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------------------------
# (features (B, N, D), (h, w) feature grid, label maps (B, H, W) or a list of (H_i, W_i)) per batch
LabelledFeatures = tuple[Tensor, tuple[int, int], "Tensor | Sequence[Tensor]"]


@dataclass
class _Cells:
    features: list[Tensor] = field(default_factory=list)  # (N, D) per image
    grids: list[tuple[int, int]] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)  # (H, W) per image

    def add(self, batch: LabelledFeatures) -> None:
        features, grid, labels = batch
        if features.ndim != 3 or len(features) != len(labels):
            raise ValueError(
                f"features must be (B, N, D) with one label map per image, got {tuple(features.shape)} and "
                f"{len(labels)} label maps"
            )
        for f, lab in zip(features, labels, strict=True):
            self.features.append(f.detach().float().cpu())
            self.grids.append((int(grid[0]), int(grid[1])))
            self.labels.append(torch.as_tensor(lab).cpu())


def fit_probe(
    train: Iterable[LabelledFeatures],
    class_names: Sequence[str],
    source: FeatureSource,
    kind: ProbeKind = DEFAULT_KIND,
    targets: LabelTargets = DEFAULT_TARGETS,
    weight_decay: float = 1e-3,
    heldout: Iterable[LabelledFeatures] | None = None,
    max_iter: int = 500,
) -> tuple[Probe, ProbeFit]:
    """Fit a probe from labelled features and report train (and held-out) pixel accuracy. Deterministic: the
    linear probe starts from zeros and runs full-batch L-BFGS; the prototypes are class means.

    `train` / `heldout` yield (features (B, N, D), grid (h, w), labels (B, H, W) uint8 or a list of (H_i, W_i)),
    the labels at any size (255 = ignore). `weight_decay`: the linear probe's L2 on its weights."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"kind must be one of {PROBE_KINDS}, got {kind!r}")
    if targets not in LABEL_TARGETS:
        raise ValueError(f"targets must be one of {LABEL_TARGETS}, got {targets!r}")
    start = time.perf_counter()
    num_classes = len(class_names)
    cells = _Cells()
    for batch in train:
        cells.add(batch)
    if not cells.features:
        raise ValueError("no labelled images to fit the probe on")
    dims = {f.shape[-1] for f in cells.features}
    if dims != {source.feature_dim}:
        raise ValueError(
            f"features are {sorted(dims)}-dim, but the source says feature_dim {source.feature_dim}"
        )
    x = torch.cat(cells.features)  # (M, D)
    pairs = [
        _cell_targets(cell_label_fractions(lab, g, num_classes), targets)
        for lab, g in zip(cells.labels, cells.grids, strict=True)
    ]
    target = torch.cat([p[0] for p in pairs])  # (M, C)
    weight = torch.cat([p[1] for p in pairs])  # (M,)
    present = ((target * weight[:, None]).sum(0) > 0).float()  # (C,)
    if kind == "linear":
        tensors = _fit_linear(x, target, weight, present, weight_decay, max_iter)
    else:
        tensors = _fit_prototypes(x, target, weight, present, max_iter)
    probe = Probe(kind, class_names, source, tensors)
    report = ProbeFit(
        kind=kind,
        targets=targets,
        num_train_images=len(cells.features),
        num_train_cells=int((weight > 0).sum()),
        train_accuracy=0.0,
        train_cell_accuracy=0.0,
        missing_classes=[name for name, p in zip(class_names, present.tolist(), strict=True) if not p],
    )
    report.train_accuracy, report.train_cell_accuracy = _accuracy(probe, cells)
    if heldout is not None:
        held = _Cells()
        for batch in heldout:
            held.add(batch)
        if held.features:
            report.heldout_accuracy, report.heldout_cell_accuracy = _accuracy(probe, held)
            report.num_heldout_images = len(held.features)
    report.seconds = time.perf_counter() - start
    probe.fit = asdict(report)
    return probe, report


def _fit_linear(
    x: Tensor, target: Tensor, weight: Tensor, present: Tensor, weight_decay: float, max_iter: int
) -> dict[str, Tensor]:
    """Softmax regression on standardized features: weighted cross-entropy + weight_decay·‖W‖²/2, L-BFGS."""
    keep = weight > 0
    x, target, weight = x[keep], target[keep], weight[keep]
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    num_classes, dim = target.shape[1], x.shape[1]
    w = torch.zeros(num_classes, dim, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    absent = present == 0
    optimizer = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_change=1e-10,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = (z @ w.T + b).masked_fill(absent, float("-inf"))
        nll = -(target * logits.log_softmax(-1).masked_fill(absent, 0.0)).sum(1)
        loss = (weight * nll).sum() / weight.sum() + 0.5 * weight_decay * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return {"weight": w.detach(), "bias": b.detach(), "mean": mean, "std": std, "present": present}


def _fit_prototypes(
    x: Tensor, target: Tensor, weight: Tensor, present: Tensor, max_iter: int
) -> dict[str, Tensor]:
    """Class means of centred, normalized features (renormalized); the cosine's scale fit by cross-entropy so
    that the softmax gives calibrated probabilities (it does not change the argmax)."""
    keep = weight > 0
    x, target, weight = x[keep], target[keep], weight[keep]
    mean = x.mean(0)
    unit = F.normalize(x - mean, dim=-1)
    prototypes = F.normalize((target * weight[:, None]).T @ unit, dim=-1)  # (C, D); absent classes stay 0
    seen = present > 0
    cosine, target = unit @ prototypes[seen].T, target[:, seen]  # the classes with training pixels only
    log_scale = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        logp = (log_scale.exp() * cosine).log_softmax(-1)
        loss = -(weight * (target * logp).sum(1)).sum() / weight.sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return {"prototypes": prototypes, "scale": log_scale.detach().exp(), "mean": mean, "present": present}


def probe_accuracy(probe: Probe, batches: Iterable[LabelledFeatures]) -> tuple[float, float]:
    """(pixel accuracy at label resolution, accuracy at the feature grid against cell majorities) of `probe` on
    labelled features, 255 ignored; label resolution: the probe's scores upsampled bilinearly, argmax."""
    cells = _Cells()
    for batch in batches:
        cells.add(batch)
    return _accuracy(probe, cells)


@torch.no_grad()
def _accuracy(probe: Probe, cells: _Cells) -> tuple[float, float]:
    right = total = cell_right = cell_total = 0
    for f, grid, lab in zip(cells.features, cells.grids, cells.labels, strict=True):
        scores = probe.scores(f[None], grid)  # (1, C, h, w)
        lab = lab.long().to(scores.device)
        pred = F.interpolate(scores, size=tuple(lab.shape), mode="bilinear", align_corners=False).argmax(1)[0]
        valid = lab != IGNORE_CLASS
        right += int((pred[valid] == lab[valid]).sum())
        total += int(valid.sum())
        fractions = cell_label_fractions(lab, grid, probe.num_classes).flatten(1)  # (C+1, N)
        majority = fractions.argmax(0)
        labelled = majority != probe.num_classes
        cell_pred = scores[0].flatten(1).argmax(0)
        cell_right += int((cell_pred[labelled] == majority[labelled]).sum())
        cell_total += int(labelled.sum())
    return right / max(total, 1), cell_right / max(cell_total, 1)


__all__ = [
    "DEFAULT_KIND",
    "DEFAULT_TARGETS",
    "FeatureSource",
    "LABEL_TARGETS",
    "LabelledFeatures",
    "PROBE_KINDS",
    "Probe",
    "ProbeFit",
    "cell_label_fractions",
    "fit_probe",
    "probe_accuracy",
]
