"""EmerDiffSegmenter: image-resolution unsupervised masks from a frozen Stable Diffusion model.

A thin LightningModule: it loads the frozen components, applies the runtime policy (emerdiff_pl.runtime) and
runs the method's steps (emerdiff_pl.method, docs/method.md) in order with its settings (emerdiff_pl.config).
`segment` is the Python interface, `predict_step` the batch path of `Trainer.predict`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from emerdiff_pl import attention as attn
from emerdiff_pl import method, runtime
from emerdiff_pl.backbone import Backbone, latent_scale_factor, load_backbone, load_taesd
from emerdiff_pl.config import EmerDiffConfig
from emerdiff_pl.inputs import InputPolicy, resize_bilinear
from emerdiff_pl.inversion import NoiseSchedule, denoising_timesteps
from emerdiff_pl.isolation import SampleErrorIsolation
from emerdiff_pl.prefix import PrefixSharing
from emerdiff_pl.refine import refine

# the settings `segment` reads at every call; every other one is read when the components load (the classifier's
# are read again when they change: the classifier is rebuilt)
PER_CALL_SETTINGS = frozenset(
    {
        "num_masks", "modulation_strength", "attention_injection", "difference", "gaussian_sigma",
        "kmeans_n_init", "kmeans_max_iter", "seed", "max_branch_batch", "batched_reference", "refine",
        "refine_iterations", "refine_dilations", "refine_radius", "refine_eps", "classifier", "class_names",
        "probe", "clip_model", "clip_resolution", "classifier_threshold",
    }
)  # fmt: skip
CLASSIFIER_SETTINGS = ("classifier", "class_names", "probe", "clip_model", "clip_resolution")


@dataclass
class SegmentationResult:
    # (B, H, W) int64 at the input (or requested) size: mask ids in [0, K), or with a classifier class ids in
    # [0, C) and 255 (ignore)
    labels: Tensor
    lowres_labels: Tensor  # (B, h, w) int64, the k-means clusters of the feature layer
    mask_embeddings: Tensor  # (B, K, D) float32, mean feature vector of each low-res mask
    timings: dict[str, float] = field(default_factory=dict)
    class_scores: Tensor | None = None  # (B, C, h_c, w_c) float32: the classifier's scores at its own grid
    mask_classes: Tensor | None = None  # (B, K) int64: each mask's class (255: ignore); emerdiff + classifier
    class_names: tuple[str, ...] | None = None  # the classifier's classes, id i = the i-th


@dataclass
class ScoreMaps:
    """`segment`'s first half (:meth:`EmerDiffSegmenter.score_maps`): the score maps before the refiner and what
    they came from; :meth:`EmerDiffSegmenter.label_maps` turns them into labels (refine, name, assign)."""

    images: Tensor  # (B, 3, H, W) in [0, 1], as given to segment: the refiners' guide, CLIP's input
    scores: Tensor  # (B, K, h, w) float at the model input size: smoothed difference maps (emerdiff) or the
    # bilinear one-hot low-res masks (lowres_bilinear)
    lowres: Tensor  # (B, h', w') int64: the k-means clusters at the feature grid
    embeddings: Tensor  # (B, K, D) float32: each low-res mask's mean query vector
    features: Tensor  # (B, N, D): the feature layer's query vectors at t_f (what the probe reads)
    timings: dict[str, float] = field(default_factory=dict)


def classifier_record(classifier: nn.Module) -> dict[str, Any]:
    """What `<key>.json` says about a classifier: its own `record()` and its class names (id i = the i-th)."""
    return {**classifier.record(), "class_names": list(classifier.class_names)}


def labels_at_size(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Labels (h, w) → (H, W), nearest-exact: each output pixel takes the label under its centre."""
    hw = tuple(int(v) for v in size)
    return F.interpolate(labels[None, None].float(), size=hw, mode="nearest-exact")[0, 0].long()


class EmerDiffSegmenter(L.LightningModule):
    """EmerDiff (ICLR 2024) as a LightningModule: the frozen components, `segment` and `predict_step`.

    Built from the settings of :class:`~emerdiff_pl.config.EmerDiffConfig` as keyword arguments (their
    defaults, types, checks and docs live there; the CLI's ``model:`` group is exactly these fields), or from a
    config object with :meth:`from_config`::

        EmerDiffSegmenter(pretrained="tiny-random", resolution=64, num_masks=6)
        EmerDiffSegmenter.from_config(EmerDiffConfig(pretrained="tiny-random", resolution=64, num_masks=6))
    """

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.backbone: Backbone | None = None
        self.config = EmerDiffConfig(**settings)
        self.taesd: AutoencoderTiny | None = None
        self.backend: attn.Backend | None = None
        self._channels_last_device: torch.device | None = None
        self.controller = attn.AttentionController(self.config.feature_layer, self.config.modulated_layer)
        self.prefix: PrefixSharing | None = None
        self.classifier: nn.Module | None = None
        self._classifier_settings: tuple | None = None  # the CLASSIFIER_SETTINGS it was built with
        self.isolation = SampleErrorIsolation(self.label_batch)
        self._branch_rows: tuple[int, int] | None = None  # (done, total) of the running batch's branches

    @classmethod
    def from_config(cls, config: EmerDiffConfig) -> EmerDiffSegmenter:
        """A segmenter with the settings of `config`."""
        return cls(**config.hparams())

    @property
    def config(self) -> EmerDiffConfig:
        """The settings (frozen); `hparams` holds the same values by name."""
        return self._config

    @config.setter
    def config(self, config: EmerDiffConfig) -> None:
        """Replace the settings; once the components are loaded only `PER_CALL_SETTINGS` may change."""
        if self.backbone is not None:
            old = self._config.hparams()
            changed = {k for k, v in config.hparams().items() if v != old[k]} - PER_CALL_SETTINGS
            if changed:
                raise ValueError(
                    f"{', '.join(sorted(changed))} cannot change once the model is loaded: build a new segmenter"
                )
        self._config = config
        self.save_hyperparameters(config.hparams())

    @property
    def input_policy(self) -> InputPolicy:
        """The size each image is resized to for the model (the DataModule batches by it)."""
        return self.config.input_policy

    # ------------------------------------------------------------------ loading
    def _target_device(self) -> torch.device:
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else self.device

    def compute_dtype(self) -> torch.dtype:
        """The dtype of the frozen components: `dtype`, where `auto` is bfloat16 on CUDA, float32 elsewhere."""
        return runtime.compute_dtype(self.config.dtype, self._target_device())

    def configure_model(self) -> None:
        """Load the frozen components once (Lightning calls this before moving the module to its device)."""
        if self.backbone is not None:
            return
        config = self.config
        backbone = load_backbone(config.pretrained, self.compute_dtype())
        for name, what in (
            (config.feature_layer, "feature_layer"),
            (config.modulated_layer, "modulated_layer"),
        ):
            attn.check_layer(backbone.unet, name, what)
        self.unet, self.vae, self.text_encoder = backbone.unet, backbone.vae, backbone.text_encoder
        if config.decoder == "taesd":
            self.taesd = load_taesd(config.taesd_model, backbone.vae, self.compute_dtype())
        if config.compile:
            # the branch decoder too: 2K decodes per image, as memory-bound in eager mode as the U-Net
            # (BENCHMARKS.md)
            decoders = () if config.decoder == "latent" else ((self.taesd or backbone.vae).decoder,)
            runtime.compile_modules((self.unet, *decoders))
        elif config.method == "emerdiff" and config.prefix_sharing:
            # eager only: compiled, the t_m call would need a second graph for ≈ 3 % of the U-Net FLOPs
            self.prefix = PrefixSharing(self.unet, self.controller)
            self.prefix.trace_next_call()  # the first reference call; the module order is static
        self._check_resize_multiple(backbone)
        self.schedule = NoiseSchedule(backbone.scheduler)
        self.timesteps = denoising_timesteps(
            backbone.scheduler,
            config.num_inference_steps,
            config.modulation_timestep,
            config.steps_after_modulation,
        )
        self.schedule_timesteps = [int(t) for t in backbone.scheduler.timesteps]
        if config.feature_timestep not in self.schedule_timesteps:
            raise ValueError(
                f"feature_timestep {config.feature_timestep} is not on the {config.num_inference_steps}-step "
                f"schedule; valid: {self.schedule_timesteps}"
            )
        self.backbone = backbone
        self._build_classifier()
        self.to(self._target_device())

    def _build_classifier(self) -> None:
        """(Re)build the classifier when its settings changed since it was built (emerdiff_pl.classifiers)."""
        config = self.config
        settings = tuple(getattr(config, name) for name in CLASSIFIER_SETTINGS)
        if settings == self._classifier_settings:
            return
        from emerdiff_pl.classifiers import build_classifier

        feature_dim = self.unet.get_submodule(config.feature_layer).to_q.out_features
        classifier = build_classifier(config, feature_dim, self.compute_dtype())
        self.classifier = classifier.to(self.device) if classifier is not None else None
        self._classifier_settings = settings

    @property
    def coarse_classes(self) -> int | None:
        """C, the classes a coarse map must score, with `classifier: field` (the DataModule then reads each input's
        coarse map and batches it as `coarse`); None otherwise."""
        if self.config.classifier != "field":
            return None
        return len(self.config.named_classes() or ())

    def _check_resize_multiple(self, backbone: Backbone) -> None:
        """Aspect-keeping sides must divide by VAE factor × U-Net downsampling, or a grid would not be whole."""
        config, policy = self.config, self.input_policy
        try:
            vae_factor = latent_scale_factor(backbone.vae)
            unet_factor = 2 ** (len(backbone.unet.config.down_block_types) - 1)
        except (AttributeError, TypeError):
            return
        need = vae_factor * unet_factor
        if policy.resize != "square" and policy.size_unit % need:
            raise ValueError(
                f"{policy.resize} sides step by {policy.size_unit} (resolution {policy.resolution}, resize_multiple "
                f"{policy.multiple}) but {config.pretrained} needs multiples of {need} (VAE ×{vae_factor}, U-Net "
                f"×{unet_factor}): set model.resize_multiple to a multiple of {need}"
            )

    def _ensure_ready(self) -> None:
        self.configure_model()
        self._build_classifier()
        if self.backbone.unet.device != self.device:
            self.to(self.device)
        if self.backend is None or self._backend_device != self.device:
            self.backend = attn.resolve_backend(
                self.config.attention_backend, self.device, self.compute_dtype()
            )
            self._backend_device = self.device
        if (
            self.config.channels_last
            and self.device.type == "cuda"
            and self._channels_last_device != self.device
        ):
            # GroupNorm outputs stay NHWC too (no layout copies around each norm). Under compile, inductor
            # fuses the NHWC norm's torch ops (the Triton kernels are for eager): 44.2 % of peak on an H200.
            runtime.apply_channels_last((self.unet, self.vae, self.taesd), self.config.group_norm_kernel)
            self._channels_last_device = self.device

    def run_info(self) -> dict[str, Any]:
        """What `<key>.json` records besides the hyperparameters."""
        import diffusers
        import lightning

        from emerdiff_pl import __version__

        self._ensure_ready()
        classifier = self.classifier
        named = {} if classifier is None else {"classifier": classifier_record(classifier)}
        return {
            **named,
            "model": self.config.pretrained,
            "dtype": str(self.compute_dtype()).removeprefix("torch."),
            "attention_backend": self.backend,
            "device": str(self.device),
            "timesteps": self.timesteps,
            "versions": {
                "emerdiff_pl": __version__,
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "lightning": lightning.__version__,
            },
        }

    # ------------------------------------------------------------------ the frozen model
    def stop_if_asked(self) -> None:
        """Raise SIGTERMException(143) once the trainer has received SIGTERM (preemption, `scancel`, a time limit):
        checked before every U-Net call and decode, so a stop waits for one call, not for the batch in flight
        (which is dropped and redone on resume), and fits SLURM's grace period before SIGKILL."""
        trainer = self._trainer
        if trainer is not None and trainer.received_sigterm:
            raise SIGTERMException(143)

    def call_unet(self, x: Tensor, t: int | Tensor, emb: Tensor) -> Tensor:
        """Every U-Net call of the method goes through here (`t`: one timestep for every row, or a tensor with
        each row's); wrap it to count calls and rows (benchmarks/throughput.py's `count_unet_calls`)."""
        self.stop_if_asked()
        dtype = self.unet.dtype
        timestep = t.to(x.device) if isinstance(t, Tensor) else torch.full((x.shape[0],), t, device=x.device)
        return self.unet(x.to(dtype), timestep, encoder_hidden_states=emb.expand(x.shape[0], -1, -1)).sample

    def encode(self, images: Tensor, resized: bool = False) -> Tensor:
        """[0, 1] images (B, 3, H, W) → VAE latent means × scaling factor (B, C, h, w), float32, the images
        resized to the input policy's size first unless `resized` (they already are: `check_resized`)."""
        size = tuple(images.shape[-2:]) if resized else self.input_policy.model_input_size(*images.shape[-2:])
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != size:
            x = resize_bilinear(x, size)
        x = (x * 2 - 1).to(self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean.float() * self.vae.config.scaling_factor

    def decode(self, latents: Tensor, chunk: int) -> Tensor:
        """Latents → RGB in [-1, 1] (float32) with the configured decoder, decoded `chunk` at a time.

        `decoder: latent` decodes nothing: the latents themselves, upsampled bilinearly to the model input size,
        stand in for the image, so a difference map is ‖Δz‖ over the latent channels."""
        if self.config.decoder == "latent":
            factor = latent_scale_factor(self.vae)
            return F.interpolate(latents.float(), scale_factor=factor, mode="bilinear", align_corners=False)
        # diffusers' convention for both decoders: decode(latents / config.scaling_factor). TAESD was
        # distilled on the U-Net's latents (SD VAE latents × 0.18215) and its config says scaling_factor 1.0,
        # so it gets them as they are. Both return unclamped [-1, 1] images (TAESD maps its [0, 1] by 2x − 1).
        decoder = self.taesd if self.taesd is not None else self.vae
        scale = decoder.config.scaling_factor
        parts = []
        for z in latents.split(max(1, chunk)):
            self.stop_if_asked()
            parts.append(decoder.decode((z / scale).to(decoder.dtype)).sample.float())
        return torch.cat(parts)

    def frozen_model(self) -> method.FrozenModel:
        """The frozen pieces as emerdiff_pl.method drives them (U-Net calls with the empty prompt, rows per call
        from `max_branch_batch`)."""
        self._ensure_ready()
        emb = self.backbone.empty_prompt_embedding().to(self.unet.dtype)
        return method.FrozenModel(
            unet=self.unet,
            call=lambda x, t: self.call_unet(x, t, emb),
            decode=self.decode,
            schedule=self.schedule,
            schedule_timesteps=self.schedule_timesteps,
            timesteps=self.timesteps,
            latent_factor=latent_scale_factor(self.vae),
            rows_per_call=lambda size: runtime.rows_per_call(
                self.config.max_branch_batch, self.device, size, self.unet.dtype
            ),
            controller=self.controller,
            backend=self.backend,
            prefix=self.prefix,
            branch_rows=self._count_branch_rows,
        )

    def _count_branch_rows(self, done: int, total: int) -> None:
        self._branch_rows = (done, total)

    def batch_progress(self) -> float | None:
        """The share of the running batch's work done (its branch rows, most of it), for the progress bar's
        estimate while a long batch runs; None between batches."""
        if self._branch_rows is None:
            return None
        done, total = self._branch_rows
        return done / total if total else 0.0

    def remove_hooks(self) -> None:
        """Take prefix sharing's hooks off the U-Net (for a U-Net another segmenter shares next); the model then
        runs as with `prefix_sharing: false`."""
        if self.prefix is not None:
            self.prefix.remove()
            self.prefix = None

    # ------------------------------------------------------------------ segmenting
    def check_resized(self, images: Tensor, original_sizes: Tensor | Sequence[Sequence[int]]) -> None:
        """Raise unless every image of the batch has the size the input policy gives its original (H, W)."""
        policy, got = self.input_policy, tuple(images.shape[-2:])
        if len(original_sizes) != len(images):
            raise ValueError(f"{len(original_sizes)} original sizes for a batch of {len(images)} images")
        for i, (height, width) in enumerate(original_sizes):
            expected = policy.model_input_size(int(height), int(width))
            if expected != got:
                raise ValueError(
                    f"image {i} of the batch ({int(height)}×{int(width)} originally) is {got[0]}×{got[1]}, but the "
                    f"model's input policy ({policy}) makes it {expected[0]}×{expected[1]}: the DataModule "
                    "batched it by another policy (it must take the model's: EmerDiffSegmenter.input_policy)"
                )

    @torch.no_grad()
    def segment(
        self,
        images: Tensor,
        *,
        seeds: list[int] | None = None,
        output_size: tuple[int, int] | None = None,
        naive: bool = False,
        original_sizes: Tensor | Sequence[Sequence[int]] | None = None,
        coarse: Sequence[Tensor] | None = None,
    ) -> SegmentationResult:
        """Segment a batch: images (B, 3, H, W) float in [0, 1] → labels (B, H, W) (or `output_size`).

        `seeds` (default: `seed` for every image) decide noise and k-means per image. `naive=True` runs the
        slow per-mask reference path instead of the vectorized one; both give the same labels. Images are
        resized by the input policy; `original_sizes` (B × (H, W)) says they already were, from those sizes
        (DataModule batches): checked, not trusted. With `classifier: field`, `coarse` holds each image's class
        scores (C, h_i, w_i) (emerdiff_pl.classifiers.field.coarse_scores). The two halves are
        :meth:`score_maps` and :meth:`label_maps`."""
        maps = self.score_maps(images, seeds=seeds, naive=naive, original_sizes=original_sizes)
        return self.label_maps(maps, output_size or tuple(images.shape[-2:]), coarse=coarse)

    @torch.no_grad()
    def score_maps(
        self,
        images: Tensor,
        *,
        seeds: list[int] | None = None,
        naive: bool = False,
        original_sizes: Tensor | Sequence[Sequence[int]] | None = None,
    ) -> ScoreMaps:
        """`segment` up to the score maps, before any refiner (docs/method.md §2–§6): the reference pass, the
        k-means masks and, with `emerdiff`, the smoothed difference maps; arguments as `segment`'s."""
        self._ensure_ready()
        config = self.config
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if original_sizes is not None:
            self.check_resized(images, original_sizes)
        batch = images.shape[0]
        seeds = [config.seed] * batch if seeds is None else list(seeds)
        if batch == 0:
            empty = torch.empty(0, dtype=torch.long)
            size = self.input_policy.model_input_size(*images.shape[-2:])
            nothing = torch.empty(0, config.num_masks, 0)
            return ScoreMaps(
                images, torch.empty(0, config.num_masks, *size), empty.view(0, 0, 0), nothing, nothing
            )
        timings: dict[str, float] = {}
        lap = self._stopwatch(timings)
        self._branch_rows = (0, 1)  # the reference pass: no branch row yet
        record = "qk" if config.method == "emerdiff" and config.attention_injection and not naive else "none"
        model = self.frozen_model()
        # the naive path is the reference, compiled U-Net or not
        with torch.compiler.set_stance("force_eager") if naive and config.compile else nullcontext():
            x0 = self.encode(images, resized=original_sizes is not None)
            trajectory, features = method.reference_pass(model, x0, seeds, config, record)
            lap("reference_s")
            lowres, embeddings = method.lowres_masks(features, seeds, tuple(x0.shape[-2:]), config)
            lap("kmeans_s")
            if config.method == "lowres_bilinear":
                scores = method.lowres_bilinear_scores(lowres, config.num_masks, model.input_size(x0))
            else:
                branches = method.difference_maps_naive if naive else method.difference_maps
                scores = method.smooth(branches(model, trajectory, lowres, config), config.gaussian_sigma)
                lap("branches_s")
        self._branch_rows = None
        return ScoreMaps(images, scores, lowres, embeddings.float(), features, timings)

    @torch.no_grad()
    def label_maps(
        self, maps: ScoreMaps, output_size: tuple[int, int], coarse: Sequence[Tensor] | None = None
    ) -> SegmentationResult:
        """`segment` from the score maps on: `refine`, then without a classifier the argmax (mask ids); with one,
        its class scores name the masks (docs/method.md §14): `emerdiff` masks (after `refine` of the difference
        maps) each take their highest mean class score, the named class maps are refined again and their argmax
        taken; `lowres_bilinear` refines and takes the argmax of the classifier's scores alone, upsampled
        bilinearly. Labels are resized nearest to `output_size`."""
        self._ensure_ready()
        config, classifier = self.config, self.classifier
        timings = dict(maps.timings)
        lap = self._stopwatch(timings)
        out_h, out_w = (int(v) for v in output_size)
        lowres, embeddings = maps.lowres.cpu(), maps.embeddings.float().cpu()
        if len(maps.images) == 0:
            names = None if classifier is None else tuple(classifier.class_names)
            labels = torch.empty(0, out_h, out_w, dtype=torch.long)
            return SegmentationResult(labels, lowres, embeddings, timings, class_names=names)
        if classifier is None:
            labels = method.assign(self._refine(maps.scores, maps.images, lap), (out_h, out_w))
            lap("assign_s")
            return SegmentationResult(labels.cpu(), lowres, embeddings, timings)
        threshold = config.classifier_threshold
        class_scores = self.class_scores(maps, coarse)
        lap("classify_s")
        mask_classes = None
        size = tuple(maps.scores.shape[-2:])
        if config.method == "lowres_bilinear":
            class_maps = self._refine(method.bilinear_class_scores(class_scores, size), maps.images, lap)
            labels = method.assign_classes(class_maps, (out_h, out_w), threshold)
        else:
            scores = self._refine(maps.scores, maps.images, lap)
            masks = scores.argmax(1)  # (B, h, w): the masks at the model input size
            mean = self.mask_scores(maps, class_scores, masks)
            mask_classes = method.classes_of_masks(mean, threshold)
            if config.refine == "none":
                labels = method.name_masks(method.assign(scores, (out_h, out_w)), mask_classes)
            else:
                class_maps = self._refine(method.mask_class_maps(mean, masks), maps.images, lap)
                labels = method.assign_classes(class_maps, (out_h, out_w), threshold)
        lap("assign_s")
        return SegmentationResult(
            labels.cpu(),
            lowres,
            embeddings,
            timings,
            class_scores=class_scores.float().cpu(),
            mask_classes=None if mask_classes is None else mask_classes.cpu(),
            class_names=tuple(classifier.class_names),
        )

    def class_scores(self, maps: ScoreMaps, coarse: Sequence[Tensor] | None = None) -> Tensor:
        """The classifier's class scores (B, C, h_c, w_c) for the images of `maps`: the probe's from the feature
        layer's queries (no second pass), CLIP's from the images, the field's from `coarse` (one (C, h_i, w_i)
        map per image, resized to the model input size)."""
        classifier, kind = self.classifier, self.config.classifier
        if classifier is None:
            raise ValueError("model.classifier is none: no class scores")
        if kind == "probe":
            return classifier.scores(maps.features, tuple(maps.lowres.shape[-2:]))
        if kind == "clip":
            return classifier.scores(maps.images)
        if coarse is None or len(coarse) != len(maps.images):
            got = "none" if coarse is None else len(coarse)
            raise ValueError(
                f"classifier: field needs one coarse map per image ({len(maps.images)}), got {got}: pass "
                "segment(coarse=...) or read inputs with EmerDiffDataModule (it reads <key>.coarse.png / .npy)"
            )
        return classifier.scores(coarse, tuple(maps.scores.shape[-2:])).to(maps.scores.device)

    def mask_scores(self, maps: ScoreMaps, class_scores: Tensor, masks: Tensor) -> Tensor:
        """Each mask's class scores (B, K, C), what names it: the probe applied to the mask's embedding (its mean
        query vector, `maps.embeddings`); for the other classifiers the mean of `class_scores` over the mask's
        pixels (`masks` (B, h, w) in [0, K))."""
        if self.config.classifier == "probe":
            return self.classifier.mask_scores(maps.embeddings.to(class_scores.device))
        return method.mask_mean_scores(class_scores, masks, self.config.num_masks)

    def _refine(self, scores: Tensor, images: Tensor, lap: Callable[[str], None]) -> Tensor:
        """The configured refiner on score maps (B, K or C, h, w), guided by the images (none: unchanged)."""
        config = self.config
        if config.refine == "none":
            return scores
        refined = refine(
            scores,
            images,
            config.refine,
            iterations=config.refine_iterations,
            dilations=config.refine_dilations,
            radius=config.refine_radius,
            eps=config.refine_eps,
        )
        lap("refine_s")
        return refined

    def _stopwatch(self, timings: dict[str, float]) -> Callable[[str], None]:
        """`lap(name)`: add the seconds since the previous lap (or now) to `timings[name]` (CUDA synchronized)."""
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - clock
            clock = now

        return lap

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        """One DataModule batch → the writer's output (docs/interfaces.md): `label_batch`, where a batch that
        raises is retried image by image and an image that still raises becomes a failure (SampleErrorIsolation)."""
        return self.isolation(batch, batch_idx)

    def label_batch(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        """One DataModule batch → per-sample labels at their original size (docs/interfaces.md), no isolation."""
        start = time.perf_counter()
        images, sizes = batch["image"], batch["original_size"]
        result = self.segment(images, original_sizes=sizes, coarse=batch.get("coarse"))
        return {
            "key": list(batch["key"]),
            "url": list(batch["url"]),
            "original": list(batch["original"]),
            "original_size": [[int(h), int(w)] for h, w in sizes.tolist()],
            "labels": [
                labels_at_size(labels, size) for labels, size in zip(result.labels, sizes, strict=True)
            ],
            "lowres_labels": result.lowres_labels,
            "model_size": [int(v) for v in images.shape[-2:]] if len(images) else None,
            "mask_embeddings": result.mask_embeddings,
            "failures": list(batch["failures"]),
            "seconds": time.perf_counter() - start,
            "timings": result.timings,
        }


__all__ = ["EmerDiffSegmenter", "ScoreMaps", "SegmentationResult", "classifier_record", "labels_at_size"]
