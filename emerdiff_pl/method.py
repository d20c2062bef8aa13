"""EmerDiff (ICLR 2024) as functions that read beside the paper; docs/method.md is the reference.

    trajectory, features = reference_pass(model, x0, seeds, config, record)  # §2 inversion, §3 queries at t_f
    lowres, embeddings = lowres_masks(features, seeds, latent_hw, config)    # §3 k-means, §7 mask embeddings
    plan = branch_plan(lowres, grid, config)                                 # §4 a row per (image, mask, sign)
    maps = difference_maps(model, trajectory, lowres, config)               # §4–§6 modulated denoising, ‖I⁻ − I⁺‖
    labels = assign(smooth(maps, config.gaussian_sigma), size)              # §6 smoothing, argmax, nearest resize
    labels = classify_masks(class_scores, masks, num_masks)                 # §14 named classes (the last section)

`difference_maps_naive` is the slow reference of the vectorized path: one mask and sign at a time, masks built
from `lowres == i` by itself, explicit attention probabilities. The frozen model reaches these functions as a
`FrozenModel`, the settings as the `EmerDiffConfig`; how many rows run per call is the caller's
(`FrozenModel.rows_per_call`, emerdiff_pl.runtime).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from emerdiff_pl.attention import AttentionController, Backend, RecordKind
from emerdiff_pl.config import EmerDiffConfig
from emerdiff_pl.fields import IGNORE_CLASS
from emerdiff_pl.inversion import NoiseSchedule, Trajectory, invert, sample_trajectory_latents
from emerdiff_pl.kmeans import batched_kmeans, canonical_order, relabel
from emerdiff_pl.prefix import PrefixSharing
from emerdiff_pl.runtime import branch_chunk, with_oom_halving

# unet_call(x, t) -> model output (ε or v) of the U-Net with the empty-prompt embedding; `t` is one timestep for
# every row or a tensor with each row's
UNetCall = Callable[[Tensor, "int | Tensor"], Tensor]
# decode(latents, chunk) -> RGB in [-1, 1] (float32), `chunk` latents at a time
Decode = Callable[[Tensor, int], Tensor]


@dataclass
class FrozenModel:
    """The frozen pieces the method drives: the U-Net (its processors set by `controller`), one U-Net call,
    the branch decoder, the noise schedule and the timesteps on it, the attention kernel, optional prefix
    sharing at t_m, the runtime's rows per U-Net call for a model input size, and who is told how many branch
    rows are done (`branch_rows(done, total)`: the bulk of a batch's work, for a progress estimate)."""

    unet: nn.Module
    call: UNetCall
    decode: Decode
    schedule: NoiseSchedule
    schedule_timesteps: list[int]  # every timestep of the DDPM schedule, descending
    timesteps: list[int]  # the trajectory's: t_m first, then the denoising steps after it
    latent_factor: int  # model input side ÷ latent side (the VAE's)
    rows_per_call: Callable[[tuple[int, int]], int]
    controller: AttentionController
    backend: Backend
    prefix: PrefixSharing | None = None
    branch_rows: Callable[[int, int], None] | None = None

    def input_size(self, latents: Tensor) -> tuple[int, int]:
        """(h, w) of the model input that VAE-encodes to `latents` (…, h/f, w/f)."""
        return latents.shape[-2] * self.latent_factor, latents.shape[-1] * self.latent_factor


@dataclass
class BranchPlan:
    """One row per branch: `image[r]` its image in the batch, `modulation[r]` (R, N) the c·M_i its modulated
    layer adds at t_m; rows run image → mask → sign (−, + when two-sided, + alone when one-sided)."""

    image: Tensor
    modulation: Tensor
    two_sided: bool


# ---------------------------------------------------------------------------------------------- §2, §3
def reference_pass(
    model: FrozenModel, x0: Tensor, seeds: Sequence[int], config: EmerDiffConfig, record: RecordKind
) -> tuple[Trajectory | None, Tensor]:
    """Sample the trajectory, run the unmodified U-Net over the trajectory's timesteps (recording `record` for
    injection; `batched_reference`: as many steps per call as fit `rows_per_call`), and read the feature
    layer's query vectors at t_f. `lowres_bilinear` needs no trajectory: no inversion.

    Returns (trajectory or None, features (B, N, C) of the call at `feature_timestep`)."""
    ctl, feature_timestep = model.controller, config.feature_timestep
    schedule_timesteps, timesteps = model.schedule_timesteps, model.timesteps
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    every = sample_trajectory_latents(model.schedule, x0, schedule_timesteps, generators)
    trajectory = None
    with ctl.reference(model.unet, model.backend, record=record, feature_timestep=feature_timestep):
        if config.method == "emerdiff":
            steps_per_call = 1
            if config.batched_reference:
                rows = model.rows_per_call(model.input_size(x0))
                steps_per_call = min(len(timesteps), max(1, rows // x0.shape[0]))
            latents = every[[schedule_timesteps.index(t) for t in timesteps]]

            def unet_fn(x: Tensor, t: Tensor, steps: list[int]) -> Tensor:
                with ctl.steps(steps, [timesteps[s] for s in steps]):
                    return model.call(x, t)

            # the steps are independent: several per U-Net call; halved after an out-of-memory error
            trajectory = with_oom_halving(
                steps_per_call,
                lambda n: invert(unet_fn, model.schedule, latents, timesteps, n),
                "reference steps",
            )
        if feature_timestep not in ctl.features:  # lowres_bilinear, or t_f outside the denoised span
            with ctl.step(-1, feature_timestep, record="none"):
                model.call(every[schedule_timesteps.index(feature_timestep)], feature_timestep)
    return trajectory, ctl.features.pop(feature_timestep)


def token_grid(n: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with n raster-order tokens in a U-Net over latents of size latent_hw."""
    lat_h, lat_w = latent_hw
    factor = math.sqrt(lat_h * lat_w / n)
    h, w = round(lat_h / factor), round(lat_w / factor)
    if h * w != n:
        raise ValueError(f"cannot place {n} tokens on a grid for latents {lat_h}×{lat_w}")
    return h, w


def lowres_masks(
    features: Tensor, seeds: Sequence[int], latent_hw: tuple[int, int], config: EmerDiffConfig
) -> tuple[Tensor, Tensor]:
    """k-means of the query vectors (B, N, C) → canonical low-res labels (B, h, w) and mask embeddings (B, K, C),
    the mean feature vector inside each mask (docs/method.md §3, §7)."""
    num_masks = config.num_masks
    batch, n, _ = features.shape
    h, w = token_grid(n, latent_hw)
    if num_masks > n:
        raise ValueError(
            f"num_masks={num_masks} exceeds the {n} feature vectors of the feature layer ({h}×{w}); "
            "lower num_masks or raise resolution"
        )
    result = batched_kmeans(
        features, num_masks, n_init=config.kmeans_n_init, max_iter=config.kmeans_max_iter, seeds=list(seeds)
    )
    labels = relabel(result.labels, canonical_order(result.labels, num_masks))
    one_hot = F.one_hot(labels, num_masks).float()  # (B, N, K)
    embeddings = (one_hot.transpose(1, 2) @ features) / one_hot.sum(1).clamp_min(1).unsqueeze(-1)
    return labels.view(batch, h, w), embeddings


# ---------------------------------------------------------------------------------------------- §4–§6
def modulated_grid(model: FrozenModel, trajectory: Trajectory, config: EmerDiffConfig) -> tuple[int, int]:
    """(h, w) token grid of the modulated layer (its token count as the reference pass recorded it)."""
    n = model.controller.tokens[config.modulated_layer]
    return token_grid(n, tuple(trajectory.latents.shape[-2:]))


def branch_plan(lowres: Tensor, grid: tuple[int, int], config: EmerDiffConfig) -> BranchPlan:
    """Every (image, mask, sign) of the batch as one row: the mask at the modulated layer's grid, ×±λ."""
    batch, k, two_sided = lowres.shape[0], config.num_masks, config.two_sided
    signs = (-1.0, 1.0) if two_sided else (1.0,)
    masks = F.one_hot(lowres, k).permute(0, 3, 1, 2).float()  # (B, K, h, w)
    if masks.shape[-2:] != grid:
        masks = F.interpolate(masks, size=grid, mode="nearest")
    image = torch.arange(batch).repeat_interleave(k * len(signs))
    mask = torch.arange(k).repeat_interleave(len(signs)).repeat(batch)
    sign = torch.tensor(signs).repeat(batch * k)
    modulation = sign[:, None] * config.modulation_strength * masks[image, mask].flatten(1).cpu()
    return BranchPlan(image, modulation, two_sided)


def denoise_branches(
    model: FrozenModel,
    trajectory: Trajectory,
    image: Tensor,
    modulation: Tensor | None,
    inject: bool,
    path: list[Tensor] | None = None,
) -> Tensor:
    """Run branch rows from x_{t_m} to t = 0 sharing the trajectory's noise; the modulated layer adds
    `modulation` at the t_m call only. `path` collects every x_t. → x_0 of each row."""
    ctl, t_m = model.controller, trajectory.timesteps[0]
    device = trajectory.latents.device
    rows = image.to(device)
    modulation = None if modulation is None else modulation.to(device)
    x = trajectory.latents[0][rows]
    steps = trajectory.timesteps
    with ctl.branches(model.unet, model.backend, rows, modulation, modulation_timestep=t_m, inject=inject):
        for s, t in enumerate(steps):
            if path is not None:
                path.append(x)
            t_prev = steps[s + 1] if s + 1 < len(steps) else -1
            # at t_m the rows of one image are identical up to the modulated layer
            sharing = t == t_m and model.prefix is not None
            if sharing:
                model.prefix.share(rows)
            try:
                with ctl.step(s, t):
                    eps = model.call(x, t).float()
            finally:
                if sharing:
                    model.prefix.stop()
            x = model.schedule.step(x, eps, t, t_prev, trajectory.noise[s][rows])
    return x


def difference_maps(
    model: FrozenModel, trajectory: Trajectory, lowres: Tensor, config: EmerDiffConfig
) -> Tensor:
    """Every branch row of the `branch_plan` of `lowres`, as many rows per U-Net call as `rows_per_call` allows
    (halved on OOM), decoded; two-sided d = ‖I⁻ − I⁺‖, one-sided d = ‖I⁺ − I_ref‖ per pixel over RGB.
    → d (B, K, H, W)."""
    plan = branch_plan(lowres, modulated_grid(model, trajectory, config), config)
    image, modulation, inject = plan.image, plan.modulation, config.attention_injection
    batch = trajectory.latents.shape[1]
    rows = model.rows_per_call(model.input_size(trajectory.latents))
    chunk = branch_chunk(rows, len(image), plan.two_sided)
    rgb_ref = None if plan.two_sided else model.decode(trajectory.final, min(chunk, batch))
    maps: list[Tensor] = []
    done = 0
    tell = model.branch_rows or (lambda done, total: None)
    tell(0, len(image))

    def run(size: int) -> None:
        nonlocal done
        while done < len(image):
            rows = slice(done, done + size)
            x0 = denoise_branches(model, trajectory, image[rows], modulation[rows], inject)
            rgb = model.decode(x0, max(1, size // 2))
            if rgb_ref is None:  # rows alternate −, +
                maps.append((rgb[0::2] - rgb[1::2]).norm(dim=1))
            else:
                maps.append((rgb - rgb_ref[image[rows].to(rgb.device)]).norm(dim=1))
            done += len(rgb)
            tell(done, len(image))

    with_oom_halving(chunk, run, "branches", even=plan.two_sided)
    model.controller.clear()
    out = torch.cat(maps)
    return out.view(batch, config.num_masks, *out.shape[-2:])


def difference_maps_naive(
    model: FrozenModel, trajectory: Trajectory, lowres: Tensor, config: EmerDiffConfig
) -> Tensor:
    """Reference path: one image, mask and sign at a time, the mask built here from `lowres == i` (not from
    `branch_plan`), explicit attention probabilities recomputed from the unmodified run at every step, no
    shared computation. Slow; it exists to prove the fast path right."""
    ctl, steps = model.controller, trajectory.timesteps
    grid, num_masks, two_sided = modulated_grid(model, trajectory, config), config.num_masks, config.two_sided
    strength, inject = config.modulation_strength, config.attention_injection
    device = trajectory.latents.device
    one = torch.zeros(1, dtype=torch.long, device=device)
    maps = []
    for b in range(lowres.shape[0]):
        reference = None if two_sided else model.decode(trajectory.final[b : b + 1], 1)
        for i in range(num_masks):
            mask = (lowres[b] == i).float()[None, None]
            mask = F.interpolate(mask, size=grid, mode="nearest").flatten().to(device)
            rgb = {}
            for sign in (-1.0, 1.0) if two_sided else (1.0,):
                x = trajectory.latents[0][b : b + 1]
                for s, t in enumerate(steps):
                    if inject:  # the reference call at this step, recording its probabilities
                        with ctl.reference(model.unet, model.backend, record="probs"), ctl.step(s, t):
                            model.call(trajectory.latents[s][b : b + 1], t)
                    modulation = (sign * strength * mask)[None]
                    with (
                        ctl.branches(model.unet, model.backend, one, modulation, steps[0], inject),
                        ctl.step(s, t),
                    ):
                        eps = model.call(x, t).float()
                    t_prev = steps[s + 1] if s + 1 < len(steps) else -1
                    x = model.schedule.step(x, eps, t, t_prev, trajectory.noise[s][b : b + 1])
                rgb[sign] = model.decode(x, 1)
            other = rgb[-1.0] if two_sided else reference
            maps.append((other - rgb[1.0]).norm(dim=1)[0])
    ctl.clear()
    return torch.stack(maps).view(lowres.shape[0], num_masks, *maps[0].shape)


def smooth(maps: Tensor, sigma: float) -> Tensor:
    """Gaussian filter of each map (B, K, H, W), σ in pixels, window radius ⌈3σ⌉ (capped by the map); σ ≤ 0:
    the maps unchanged."""
    if sigma <= 0:
        return maps
    radius = min(math.ceil(3 * sigma), maps.shape[-1] - 1, maps.shape[-2] - 1)
    flat = maps.flatten(0, 1).unsqueeze(1)
    return gaussian_blur(flat, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma]).view_as(maps)


def lowres_bilinear_scores(lowres: Tensor, num_masks: int, size: int | tuple[int, int]) -> Tensor:
    """The baseline's score maps: the one-hot low-res masks upsampled bilinearly to the model input size
    (an int: size × size) → (B, K, H, W)."""
    one_hot = F.one_hot(lowres, num_masks).permute(0, 3, 1, 2).float()
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(one_hot, size=hw, mode="bilinear", align_corners=False)


def assign(scores: Tensor, output_size: tuple[int, int]) -> Tensor:
    """The one place score maps (B, K, h, w) become labels: argmax over K, resized nearest to `output_size`."""
    return _resize_labels(scores.argmax(1), output_size)


def _resize_labels(labels: Tensor, output_size: tuple[int, int]) -> Tensor:
    """Labels (B, h, w) → (B, H, W) int64, nearest-exact: each output pixel takes the label under its centre."""
    resized = F.interpolate(labels[:, None].float(), size=tuple(output_size), mode="nearest-exact")
    return resized.squeeze(1).long()


__all__ = [
    "BranchPlan",
    "FrozenModel",
    "assign",
    "branch_plan",
    "denoise_branches",
    "difference_maps",
    "difference_maps_naive",
    "lowres_bilinear_scores",
    "lowres_masks",
    "modulated_grid",
    "reference_pass",
    "smooth",
    "token_grid",
]


# ==============================================================================================================
# Named classes (issue 27; the paper's Table 3): mask classification.
# A class-aware but coarse predictor gives per-pixel class scores (B, C, h', w'); each EmerDiff mask takes the
# class with the highest mean score inside it. For scores linear in a pixel embedding (cosine with normalized
# CLIP embeddings, a linear probe's logits) the mean score is the score of the mean embedding: the paper's
# "embeddings averaged inside the mask" (docs/method.md §14). One section; nothing above depends on it.
# ==============================================================================================================


def bilinear_class_scores(class_scores: Tensor, size: tuple[int, int]) -> Tensor:
    """Coarse class scores (B, C, h', w') upsampled bilinearly to `size` → (B, C, H, W) float32: the score maps
    of "the classifier alone" (`lowres_bilinear` with a classifier), and what each mask averages."""
    if tuple(class_scores.shape[-2:]) == tuple(size):
        return class_scores.float()
    return F.interpolate(class_scores.float(), size=tuple(size), mode="bilinear", align_corners=False)


def mask_mean_scores(class_scores: Tensor, masks: Tensor, num_masks: int) -> Tensor:
    """Mean class score inside each mask → (B, K, C): `class_scores` (B, C, h', w') upsampled bilinearly to the
    resolution of `masks` (B, H, W) in [0, K), then averaged over each mask's pixels. An empty mask gets zeros."""
    scores = bilinear_class_scores(class_scores, tuple(masks.shape[-2:]))
    scores = scores.flatten(2).transpose(1, 2)  # (B, HW, C)
    # a one-hot matmul rather than scatter_add_: deterministic on every device
    one_hot = F.one_hot(masks.flatten(1).to(scores.device), num_masks).to(scores.dtype)  # (B, HW, K)
    sums = one_hot.transpose(1, 2) @ scores  # (B, K, C)
    counts = one_hot.sum(1)  # (B, K)
    return sums / counts.clamp_min(1).unsqueeze(-1)


def classes_of_masks(mean_scores: Tensor, threshold: float | None = None) -> Tensor:
    """Each mask's class (B, K) int64: the argmax of its mean scores (B, K, C) (first on ties). IGNORE_CLASS for
    a mask whose best mean score is below `threshold` (None: no threshold), and for one without evidence (every
    mean score 0: an empty mask, or one that covers only a coarse label map's ignored pixels)."""
    return _argmax_or_ignore(mean_scores, -1, threshold)


def _argmax_or_ignore(scores: Tensor, dim: int, threshold: float | None) -> Tensor:
    """The argmax of `scores` over the class dimension `dim` (first on ties), IGNORE_CLASS where the best score is
    below `threshold` (None: no threshold) or every score is 0 (no evidence)."""
    classes = scores.argmax(dim)
    best = scores.gather(dim, classes.unsqueeze(dim)).squeeze(dim)
    unsure = (scores == 0).all(dim)
    if threshold is not None:
        unsure |= best < threshold
    return classes.masked_fill(unsure, IGNORE_CLASS)


def mask_class_maps(mean_scores: Tensor, masks: Tensor) -> Tensor:
    """Class score maps of named masks: each pixel of `masks` (B, H, W) in [0, K) holds its mask's mean class
    scores (B, K, C) → (B, C, H, W), what `refine` smooths after naming (its argmax names the masks)."""
    batch, _, num_classes = mean_scores.shape
    index = masks.flatten(1).to(mean_scores.device).unsqueeze(-1).expand(-1, -1, num_classes)  # (B, HW, C)
    return mean_scores.gather(1, index).transpose(1, 2).reshape(batch, num_classes, *masks.shape[-2:])


def name_masks(labels: Tensor, classes: Tensor) -> Tensor:
    """Mask ids (B, H, W) in [0, K) at any size → class ids (B, H, W), given each mask's class (B, K). Mask ids
    resized nearest then named = named then resized, so `assign`'s output at the original size can be named."""
    return classes.to(labels.device).gather(1, labels.flatten(1)).view_as(labels)


def classify_masks(
    class_scores: Tensor, masks: Tensor, num_masks: int, threshold: float | None = None
) -> Tensor:
    """The mask-classification step: EmerDiff masks (B, H, W) in [0, K) → class ids (B, H, W) in [0, C) or
    IGNORE_CLASS, each mask named by its highest mean class score (`class_scores` (B, C, h', w'))."""
    return name_masks(masks, classes_of_masks(mask_mean_scores(class_scores, masks, num_masks), threshold))


def assign_classes(scores: Tensor, output_size: tuple[int, int], threshold: float | None = None) -> Tensor:
    """`assign` for class score maps (B, C, h, w): argmax over C, resized nearest to `output_size`; pixels whose
    best score is below `threshold`, or without evidence (every score 0), → IGNORE_CLASS. With
    `bilinear_class_scores`: the classifier alone; with `mask_class_maps`: named masks."""
    return _resize_labels(_argmax_or_ignore(scores, 1, threshold), output_size)


__all__ += [
    "IGNORE_CLASS",
    "assign_classes",
    "bilinear_class_scores",
    "classes_of_masks",
    "classify_masks",
    "mask_class_maps",
    "mask_mean_scores",
    "name_masks",
]
