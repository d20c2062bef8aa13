"""EmerDiffConfig: every setting of the segmenter, with its default, type and doc, validated once.

The one home of the method's and runtime's settings: ``EmerDiffSegmenter(**settings)`` builds it (so the CLI's
``model:`` group is its fields, flat, and ``--help`` shows the docs below), ``emerdiff_pl.method`` takes it
whole, ``validation.py`` checks a parsed CLI config with it before anything loads, and ``<key>.json`` records
:meth:`EmerDiffConfig.hparams`. Checks that need the model (layer names, the schedule) run when it loads.
Importing this module imports neither torch nor diffusers: ``emerdiff-pl predict`` checks its settings before
Lightning is imported. :meth:`EmerDiffConfig.label_settings` are the ones an output folder records.
"""

from __future__ import annotations

import hashlib
import os
import types
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from emerdiff_pl.inputs import InputPolicy

FEATURE_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
MODULATED_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"

Method = Literal["emerdiff", "lowres_bilinear"]
Difference = Literal["two_sided", "one_sided"]
Decoder = Literal["vae", "taesd", "latent"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
AttentionBackend = Literal["auto", "sdpa", "xformers"]
ResizeMode = Literal["keep_aspect", "short_side", "square"]  # emerdiff_pl.inputs.InputPolicy
# Which NHWC GroupNorm runs on CUDA: "auto" (the Triton kernels where a probe passes, else torch ops), "triton",
# or "torch". The CPU always takes torch ops (emerdiff_pl.layout).
GroupNormKernel = Literal["auto", "triton", "torch"]
Refiner = Literal["none", "guided", "bilateral", "pamr"]  # emerdiff_pl.refine
PAMR_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)  # Araslanov & Roth's (and DiffCut's) dilations
Classifier = Literal["none", "probe", "clip", "field"]
DEFAULT_CLIP = "openai/clip-vit-base-patch16"


def _at_least(low: float) -> dict[str, Any]:
    return {"at_least": low}


def _above(low: float) -> dict[str, Any]:
    return {"above": low}


# How the labels are computed, not what they are: a field marked so never makes a rerun into an output folder
# count as "other settings" (each is tested to give the same labels). Every other field shapes the labels, so a
# field added later counts by default.
RUNTIME_ONLY = {"runtime_only": True}


@dataclass(frozen=True)
class EmerDiffConfig:
    """EmerDiff (ICLR 2024) settings: the method's hyperparameters and how it runs (docs/method.md).

    Attributes:
        pretrained: hub id, local diffusers folder, shipped model name (`toyworld-ldm`) or `tiny-random`.
        method: `emerdiff`, or `lowres_bilinear` — the same low-res masks upsampled bilinearly (the paper's
            baseline).
        resolution: side of the square the image is resized to for the model (SD 1.x: 512); under
            `keep_aspect` the side of a square of the model input's area, under `short_side` its short side.
        resize: `keep_aspect` (area ≈ resolution² at the image's aspect ratio, up to 4:1, each side a multiple
            of `resize_multiple`), `short_side` (the same with short side ≈ resolution: a square image's scale,
            up to 4× its pixels) or `square` (resolution², squashed: the paper's setting). The DataModule
            batches images by this policy (the model's; emerdiff_pl.inputs).
        resize_multiple: the side step of `keep_aspect` and `short_side`: a multiple of the VAE factor × the
            U-Net's total downsampling (SD: 8 × 8 = 64; checked when the model loads).
        num_masks: K, clusters of the feature layer's query vectors.
        num_inference_steps: length of the DDPM schedule the timesteps below live on (50 → {981, …, 21, 1}).
        feature_timestep: t_f, where the query vectors are read (a timestep of that schedule).
        modulation_timestep: t_m, the single U-Net call where the modulated layer's output gets ±λ·M_i.
        modulation_strength: λ.
        steps_after_modulation: denoise from t_m in this many evenly spaced steps (None: every schedule step).
        feature_layer: the attention layer whose query vectors are clustered into the K low-res masks
            (`….attn2` = cross-attention; a wrong name is reported with the valid ones).
        modulated_layer: the attention layer whose output gets ±λ·M_i at t_m.
        attention_injection: reuse the reference run's attention maps in every branch (docs/method.md §5).
        difference: `two_sided` ‖I⁻ − I⁺‖ (2K branches) or `one_sided` ‖I⁺ − I_ref‖ (K branches, faster).
        gaussian_sigma: σ of the Gaussian smoothing of each difference map, pixels at model resolution (0: off).
        kmeans_n_init: k-means restarts per image (the one with the lowest inertia is kept).
        kmeans_max_iter: Lloyd iterations per k-means restart.
        seed: every image is seeded with it (noise and k-means), so a result depends only on image and settings.
        max_branch_batch: branches per U-Net call (even), or `auto` (on CUDA: from free memory, at most 16 at
            512²; 32 on CPU).
        dtype: `auto` = bfloat16 on CUDA, float32 on CPU.
        attention_backend: `auto` = xformers where a probe call on the device works, else PyTorch SDPA.
        channels_last: on CUDA, U-Net and decoders in channels-last memory format (faster convolutions);
            GroupNorms and attention blocks keep activations channels-last too (emerdiff_pl.layout; in eager
            mode the GroupNorm runs as Triton kernels, emerdiff_pl.triton_norm). No effect on CPU.
        group_norm_kernel: the NHWC GroupNorm on CUDA: `auto` (Triton kernels where a probe passes), `triton`
            or `torch` (torch ops; the measurement without the kernels).
        prefix_sharing: at the t_m call, run what precedes the modulated layer once per image instead of once
            per branch row (emerdiff_pl.prefix; eager only, same maps). False: the measurement without it.
        batched_reference: run several reference steps per U-Net call (as many as a branch chunk has rows);
            False: one call per step (the measurement before the batched inversion). Same results.
        compile: `torch.compile` the U-Net and the branch decoder (default mode; the batch size turns symbolic
            when it first changes). The first images pay the compilation; `segment(naive=True)` runs eagerly.
        decoder: what turns the branch latents into difference maps: the model's `vae`, `taesd` (a tiny
            distilled decoder, far cheaper than the VAE's), or `latent` (no decoder: the difference is measured
            on the latents and upsampled bilinearly to the model input size; the cheapest, the coarsest);
            images are always encoded by the VAE.
        taesd_model: the AutoencoderTiny of `decoder: taesd` (read only then): hub id (`madebyollin/taesd` for
            SD 1.x/2.x), local folder, a shipped one (`toyworld-taesd`, distilled for `toyworld-ldm`),
            `tiny-random` (random weights, fits the backbone's latents) or `sd14-arch` (full size, random
            weights; benchmarks only).
        refine: a training-free refiner of the score maps before the argmax, guided by the image
            (emerdiff_pl.refine): `none`, `guided` (guided filter), `bilateral` (joint bilateral), `pamr`.
        refine_iterations: `pamr`'s rounds.
        refine_dilations: `pamr`'s neighbour dilations (pixels at model resolution).
        refine_radius: `guided` / `bilateral` window radius, pixels at model resolution.
        refine_eps: `guided`'s ε, a colour variance in [0, 1] RGB units (`bilateral`: colour σ = √ε).
        classifier: what names the masks (docs/method.md §14): `none` (per-image mask ids, today's output),
            `probe` (a few-shot probe on the feature layer's queries, written by `emerdiff-pl fit-probe`), `clip`
            (open vocabulary: a CLIP image encoder's dense scores for `class_names`) or `field` (a coarse map that
            comes with each input: `<key>.coarse.png` / `.npy` in shards, `<stem>.coarse.png` / `.npy` beside a
            folder image). Each EmerDiff mask takes the class of highest mean score inside it; with
            `method: lowres_bilinear` the classifier's scores alone are upsampled bilinearly. Labels are then
            class ids in [0, C), 255 = ignore.
        class_names: the classes, id i = the i-th: a list, a text file (one class a line; `#` lines skipped) or
            a known dataset (`toyworld`, `cocostuff27`, `cityscapes27`); a line may list synonyms
            (`water, sea`: `clip` scores the best, the output names the first). Required by `clip` and `field`;
            with `probe` optional (the probe file holds its names; given, they must match).
        probe: the probe file of `classifier: probe` (fit-probe's output; it must come from this model,
            feature layer, t_f and feature width).
        clip_model: the CLIP of `classifier: clip`: a hub id (cached for offline use) or a local folder written
            by `CLIPModel.save_pretrained` (with its tokenizer).
        clip_resolution: short side of CLIP's input (the model input is resized to it, aspect kept; the
            position embeddings are interpolated).
        classifier_threshold: a pixel whose best class score (after naming and `refine`) is below it is labelled
            255 (ignore); scores are probabilities for `probe`, `clip` and label-map `field`s. None: off.
    """

    pretrained: str = "CompVis/stable-diffusion-v1-4"
    method: Method = "emerdiff"
    resolution: int = field(default=512, metadata=_at_least(8))
    resize: ResizeMode = "keep_aspect"
    resize_multiple: int = field(default=64, metadata=_at_least(1))
    num_masks: int = field(default=20, metadata=_at_least(1))
    num_inference_steps: int = field(default=50, metadata=_at_least(1))
    feature_timestep: int = field(default=1, metadata=_at_least(0))
    modulation_timestep: int = field(default=281, metadata=_at_least(0))
    modulation_strength: float = 10.0
    steps_after_modulation: int | None = field(default=None, metadata=_at_least(1))
    feature_layer: str = FEATURE_LAYER
    modulated_layer: str = MODULATED_LAYER
    attention_injection: bool = True
    difference: Difference = "two_sided"
    gaussian_sigma: float = field(default=4.0, metadata=_at_least(0))
    kmeans_n_init: int = field(default=10, metadata=_at_least(1))
    kmeans_max_iter: int = field(default=100, metadata=_at_least(1))
    seed: int = 0
    max_branch_batch: int | Literal["auto"] = field(default="auto", metadata=_at_least(1) | RUNTIME_ONLY)
    dtype: DType = "auto"
    attention_backend: AttentionBackend = field(default="auto", metadata=RUNTIME_ONLY)
    channels_last: bool = field(default=True, metadata=RUNTIME_ONLY)
    group_norm_kernel: GroupNormKernel = field(default="auto", metadata=RUNTIME_ONLY)
    prefix_sharing: bool = field(default=True, metadata=RUNTIME_ONLY)
    batched_reference: bool = field(default=True, metadata=RUNTIME_ONLY)
    compile: bool = field(default=False, metadata=RUNTIME_ONLY)
    decoder: Decoder = "vae"
    taesd_model: str = "madebyollin/taesd"
    refine: Refiner = "none"
    refine_iterations: int = field(default=10, metadata=_at_least(1))
    refine_dilations: tuple[int, ...] = field(default=PAMR_DILATIONS, metadata=_at_least(1))
    refine_radius: int = field(default=8, metadata=_at_least(1))
    refine_eps: float = field(default=1e-2, metadata=_above(0))
    classifier: Classifier = "none"
    class_names: tuple[str, ...] | str | None = None
    probe: str | None = None
    clip_model: str = DEFAULT_CLIP
    clip_resolution: int = field(default=448, metadata=_at_least(8))
    classifier_threshold: float | None = None

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, list) and _takes_tuple(hints[spec.name]):
                value = tuple(value)  # YAML and Python lists for a tuple setting
                object.__setattr__(self, spec.name, value)
            _check(spec.name, value, hints[spec.name], spec.metadata)
        self._check_classifier()

    def _check_classifier(self) -> None:
        """The classifier has what it needs: class names for `clip` / `field`, a probe file for `probe`, and the
        names read (a missing file, an empty or repeated name is reported here, naming the setting)."""
        if self.classifier in ("clip", "field") and self.class_names is None:
            raise ValueError(
                f"model.class_names is required with model.classifier: {self.classifier} (a list, or a text file "
                "with one class a line)"
            )
        if self.classifier == "probe" and self.probe is None:
            raise ValueError(
                "model.probe is required with model.classifier: probe (the file emerdiff-pl fit-probe writes)"
            )
        if self.classifier != "none" and self.class_names is not None:
            self.named_classes()

    def named_classes(self) -> tuple[str, ...] | None:
        """The class names read from `class_names` (None when it is unset)."""
        if self.class_names is None:
            return None
        from emerdiff_pl.datasets import class_names

        return tuple(class_names(self.class_names, flag="model.class_names"))

    @property
    def input_policy(self) -> InputPolicy:
        """The size the model takes each image at (the DataModule batches by it; ``segment`` checks it)."""
        from emerdiff_pl.inputs import InputPolicy  # imports torch: not at the config's import

        return InputPolicy(self.resolution, self.resize, self.resize_multiple)

    @property
    def two_sided(self) -> bool:
        """Both signs per mask (2K branches), or one sign against the unmodulated reference (K)."""
        return self.difference == "two_sided"

    def hparams(self) -> dict[str, Any]:
        """Every setting by name (what ``hparams`` and ``<key>.json`` record)."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self)}

    def label_settings(self) -> dict[str, Any]:
        """The settings that shape the labels: every field not marked :data:`RUNTIME_ONLY`, and with
        ``classifier: probe`` the SHA-256 of the probe file as ``probe_sha256`` (a probe refit into the same file
        names masks otherwise). An output folder records them and refuses a rerun whose labels they would change
        (``writer.allow_changed_settings``)."""
        settings = {spec.name: getattr(self, spec.name) for spec in fields(self) if not _runtime_only(spec)}
        if self.classifier == "probe" and self.probe is not None and os.path.isfile(self.probe):
            with open(self.probe, "rb") as f:
                settings["probe_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
        return settings

    @classmethod
    def type_text(cls, name: str) -> str:
        """Setting ``name``'s type in words (``int``, ``one of vae, taesd, latent``), for help texts."""
        return _describe(get_type_hints(cls)[name])

    @classmethod
    def parse_value(cls, name: str, text: str) -> Any:
        """A command-line string as setting ``name`` reads it: YAML (``8``, ``null``, ``[1, 2]``, ``true``), as
        LightningCLI parses it, except where only the text fits the setting's type (``pretrained: 1234``)."""
        import yaml

        hint = get_type_hints(cls)[name]
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        if isinstance(value, list) and _takes_tuple(hint):
            value = tuple(value)
        return text if not _matches(value, hint) and _matches(text, hint) else value

    @classmethod
    def label_defaults(cls) -> dict[str, Any]:
        """The default of every label-shaping setting (a setting an older output folder did not record had it)."""
        return {
            spec.name: spec.default
            for spec in fields(cls)
            if not _runtime_only(spec) and spec.default is not MISSING
        }


def _runtime_only(spec: Any) -> bool:
    return bool(spec.metadata.get("runtime_only"))


def _takes_tuple(hint: Any) -> bool:
    """Whether a setting of type ``hint`` takes a tuple (``tuple[...]``, or a union with one)."""
    if get_origin(hint) in (Union, types.UnionType):
        return any(_takes_tuple(option) for option in get_args(hint))
    return get_origin(hint) is tuple


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint`` (the annotations of :class:`EmerDiffConfig`; no bool for a number)."""
    origin = get_origin(hint)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in get_args(hint))
    if origin in (Union, types.UnionType):
        return any(_matches(value, option) for option in get_args(hint))
    if origin is tuple:
        item = get_args(hint)[0]
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(hint))
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in get_args(hint))
    if get_origin(hint) is tuple:
        return f"a list of {_describe(get_args(hint)[0])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _check(name: str, value: Any, hint: Any, limits: Any) -> None:
    """Raise a ValueError naming ``model.<name>`` when ``value`` has the wrong type or is out of range."""
    if not _matches(value, hint):
        raise ValueError(f"model.{name} must be {_describe(hint)}, got {value!r}")
    numbers = value if isinstance(value, tuple) else (value,)
    numbers = [v for v in numbers if isinstance(v, int | float) and not isinstance(v, bool)]
    if isinstance(value, tuple) and not value:
        raise ValueError(f"model.{name} must not be empty")
    if "at_least" in limits and any(v < limits["at_least"] for v in numbers):
        raise ValueError(f"model.{name} must be ≥ {limits['at_least']}, got {value!r}")
    if "above" in limits and any(v <= limits["above"] for v in numbers):
        raise ValueError(f"model.{name} must be > {limits['above']}, got {value!r}")


__all__ = [
    "DEFAULT_CLIP",
    "FEATURE_LAYER",
    "MODULATED_LAYER",
    "PAMR_DILATIONS",
    "RUNTIME_ONLY",
    "Classifier",
    "EmerDiffConfig",
    "GroupNormKernel",
    "Refiner",
    "ResizeMode",
]
