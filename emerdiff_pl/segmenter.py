"""EmerDiffSegmenter: image-resolution unsupervised masks from a frozen Stable Diffusion model.

A thin LightningModule: it loads the frozen components, applies the runtime policy (emerdiff_pl.runtime) and
runs the method's steps (emerdiff_pl.method, docs/method.md) in order. `segment` is the Python interface,
`predict_step` the batch path of `Trainer.predict`.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from torch import Tensor

from emerdiff_pl import attention as attn
from emerdiff_pl import method, runtime
from emerdiff_pl.backbone import Backbone, latent_scale_factor, load_backbone, load_taesd
from emerdiff_pl.data import RESIZE_MODES, model_input_size, size_unit
from emerdiff_pl.inversion import NoiseSchedule, Trajectory, denoising_timesteps
from emerdiff_pl.prefix import PrefixSharing
from emerdiff_pl.refine import PAMR_DILATIONS, check_refine_options, refine
from emerdiff_pl.runtime import AUTO_MAX_ROWS_512, auto_branch_rows

FEATURE_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
MODULATED_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
DECODERS = ("vae", "taesd", "latent")


@dataclass
class SegmentationResult:
    labels: Tensor  # (B, H, W) int64 in [0, K), at the input (or requested) size
    lowres_labels: Tensor  # (B, h, w) int64, the k-means clusters of the feature layer
    mask_embeddings: Tensor  # (B, K, D) float32, mean feature vector of each low-res mask
    timings: dict[str, float] = field(default_factory=dict)


class EmerDiffSegmenter(L.LightningModule):
    """EmerDiff (ICLR 2024) as a LightningModule; every hyperparameter is a constructor argument.

    Args:
        pretrained: hub id, local diffusers folder, shipped model name (`toyworld-ldm`) or `tiny-random`.
        method: `emerdiff`, or `lowres_bilinear` — the same low-res masks upsampled bilinearly (the paper's baseline).
        resolution: side of the square the image is resized to for the model (SD 1.x: 512); under
            `keep_aspect` the side of a square of the model input's area, under `short_side` its short side.
        resize: `keep_aspect` (area ≈ resolution² at the image's aspect ratio, up to 4:1, each side a multiple
            of `resize_multiple`), `short_side` (the same with short side ≈ resolution: a square image's scale,
            up to 4× its pixels) or `square` (resolution², squashed: the paper's setting). data.resize follows it.
        resize_multiple: the side step of `keep_aspect` and `short_side`: a multiple of the VAE factor × the
            U-Net's total downsampling (SD: 8 × 8 = 64; checked when the model loads).
        num_masks: K, clusters of the feature layer's query vectors.
        num_inference_steps: length of the DDPM schedule the timesteps below live on (50 → {981, …, 21, 1}).
        feature_timestep: t_f, where the query vectors are read.
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
        max_branch_batch: branches per U-Net call (even), or `auto` (on CUDA: from free memory, at most 16 at 512²;
            32 on CPU).
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
        taesd_model: the AutoencoderTiny of `decoder: taesd`: hub id (`madebyollin/taesd` for SD 1.x/2.x),
            local folder, a shipped one (`toyworld-taesd`, distilled for `toyworld-ldm`), `tiny-random` (random
            weights, fits the backbone's latents) or `sd14-arch` (full size, random weights; benchmarks only).
        refine: a training-free refiner of the score maps before the argmax, guided by the image
            (emerdiff_pl.refine): `none`, `guided` (guided filter), `bilateral` (joint bilateral), `pamr`.
        refine_iterations: `pamr`'s rounds.
        refine_dilations: `pamr`'s neighbour dilations (pixels at model resolution).
        refine_radius: `guided` / `bilateral` window radius, pixels at model resolution.
        refine_eps: `guided`'s ε, a colour variance in [0, 1] RGB units (`bilateral`: colour σ = √ε).
    """

    def __init__(
        self,
        pretrained: str = "CompVis/stable-diffusion-v1-4",
        method: Literal["emerdiff", "lowres_bilinear"] = "emerdiff",
        resolution: int = 512,
        resize: Literal["keep_aspect", "short_side", "square"] = "keep_aspect",
        resize_multiple: int = 64,
        num_masks: int = 20,
        num_inference_steps: int = 50,
        feature_timestep: int = 1,
        modulation_timestep: int = 281,
        modulation_strength: float = 10.0,
        steps_after_modulation: int | None = None,
        feature_layer: str = FEATURE_LAYER,
        modulated_layer: str = MODULATED_LAYER,
        attention_injection: bool = True,
        difference: Literal["two_sided", "one_sided"] = "two_sided",
        gaussian_sigma: float = 4.0,
        kmeans_n_init: int = 10,
        kmeans_max_iter: int = 100,
        seed: int = 0,
        max_branch_batch: int | Literal["auto"] = "auto",
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        attention_backend: Literal["auto", "sdpa", "xformers"] = "auto",
        channels_last: bool = True,
        group_norm_kernel: Literal["auto", "triton", "torch"] = "auto",
        prefix_sharing: bool = True,
        batched_reference: bool = True,
        compile: bool = False,
        decoder: Literal["vae", "taesd", "latent"] = "vae",
        taesd_model: str = "madebyollin/taesd",
        refine: Literal["none", "guided", "bilateral", "pamr"] = "none",
        refine_iterations: int = 10,
        refine_dilations: tuple[int, ...] = PAMR_DILATIONS,
        refine_radius: int = 8,
        refine_eps: float = 1e-2,
    ):
        super().__init__()
        self.save_hyperparameters()
        if method not in ("emerdiff", "lowres_bilinear"):
            raise ValueError(f"method must be emerdiff or lowres_bilinear, got {method!r}")
        if difference not in ("two_sided", "one_sided"):
            raise ValueError(f"difference must be two_sided or one_sided, got {difference!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be vae, taesd or latent, got {decoder!r}")
        if group_norm_kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"group_norm_kernel must be auto, triton or torch, got {group_norm_kernel!r}")
        if num_masks < 1 or resolution < 8:
            raise ValueError(f"need num_masks ≥ 1 and resolution ≥ 8, got {num_masks} and {resolution}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        if resize_multiple < 1:
            raise ValueError(f"resize_multiple must be ≥ 1, got {resize_multiple}")
        if max_branch_batch != "auto" and (not isinstance(max_branch_batch, int) or max_branch_batch < 1):
            raise ValueError(f"max_branch_batch must be a positive int or 'auto', got {max_branch_batch!r}")
        check_refine_options(refine, refine_iterations, refine_dilations, refine_radius, refine_eps)
        self.backbone: Backbone | None = None
        self.taesd: AutoencoderTiny | None = None
        self.backend: attn.Backend | None = None
        self._channels_last_device: torch.device | None = None
        self.controller = attn.AttentionController(feature_layer, modulated_layer)
        self.prefix: PrefixSharing | None = None

    # ------------------------------------------------------------------ setup
    def _target_device(self) -> torch.device:
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else self.device

    def compute_dtype(self) -> torch.dtype:
        """The dtype of the frozen components: `dtype`, where `auto` is bfloat16 on CUDA, float32 elsewhere."""
        return runtime.compute_dtype(self.hparams.dtype, self._target_device())

    def configure_model(self) -> None:
        """Load the frozen components once (Lightning calls this before moving the module to its device)."""
        if self.backbone is not None:
            return
        hp = self.hparams
        backbone = load_backbone(hp.pretrained, self.compute_dtype())
        for name, what in ((hp.feature_layer, "feature_layer"), (hp.modulated_layer, "modulated_layer")):
            attn.check_layer(backbone.unet, name, what)
        self.unet, self.vae, self.text_encoder = backbone.unet, backbone.vae, backbone.text_encoder
        if hp.decoder == "taesd":
            self.taesd = load_taesd(hp.taesd_model, backbone.vae, self.compute_dtype())
        if hp.compile:
            # the branch decoder too: 2K decodes per image, as memory-bound in eager mode as the U-Net
            # (BENCHMARKS.md)
            decoders = () if hp.decoder == "latent" else ((self.taesd or backbone.vae).decoder,)
            runtime.compile_modules((self.unet, *decoders))
        elif hp.method == "emerdiff" and hp.prefix_sharing:
            # eager only: compiled, the t_m call would need a second graph for ≈ 3 % of the U-Net FLOPs
            self.prefix = PrefixSharing(self.unet, self.controller)
            self.prefix.trace_next_call()  # the first reference call; the module order is static
        self._check_resize_multiple(backbone)
        self.backbone = backbone
        self.schedule = NoiseSchedule(backbone.scheduler)
        self.timesteps = denoising_timesteps(
            backbone.scheduler, hp.num_inference_steps, hp.modulation_timestep, hp.steps_after_modulation
        )
        self.schedule_timesteps = [int(t) for t in backbone.scheduler.timesteps]
        if hp.feature_timestep not in self.schedule_timesteps:
            raise ValueError(
                f"feature_timestep {hp.feature_timestep} is not on the {hp.num_inference_steps}-step schedule; "
                f"valid: {self.schedule_timesteps}"
            )
        self.to(self._target_device())

    def _ensure_ready(self) -> None:
        self.configure_model()
        if self.backbone.unet.device != self.device:
            self.to(self.device)
        if self.backend is None or self._backend_device != self.device:
            self.backend = attn.resolve_backend(
                self.hparams.attention_backend, self.device, self.compute_dtype()
            )
            self._backend_device = self.device
        if (
            self.hparams.channels_last
            and self.device.type == "cuda"
            and self._channels_last_device != self.device
        ):
            # GroupNorm outputs stay NHWC too (no layout copies around each norm). Under compile, inductor
            # fuses the NHWC norm's torch ops (the Triton kernels are for eager): 44.2 % of peak on an H200.
            runtime.apply_channels_last((self.unet, self.vae, self.taesd), self.hparams.group_norm_kernel)
            self._channels_last_device = self.device

    def run_info(self) -> dict[str, Any]:
        """What `<key>.json` records besides the hyperparameters."""
        import diffusers
        import lightning

        from emerdiff_pl import __version__

        self._ensure_ready()
        return {
            "model": self.hparams.pretrained,
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
    def call_unet(self, x: Tensor, t: int | Tensor, emb: Tensor) -> Tensor:
        """Every U-Net call of the method goes through here (`t`: one timestep for every row, or a tensor with
        each row's); wrap it to count calls and rows (benchmarks/throughput.py's `count_unet_calls`)."""
        dtype = self.unet.dtype
        timestep = t.to(x.device) if isinstance(t, Tensor) else torch.full((x.shape[0],), t, device=x.device)
        return self.unet(x.to(dtype), timestep, encoder_hidden_states=emb.expand(x.shape[0], -1, -1)).sample

    def model_input_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the model sees for an H×W image (`resize`, `resolution`, `resize_multiple`; data.py)."""
        hp = self.hparams
        return model_input_size(height, width, hp.resolution, hp.resize, hp.resize_multiple)

    def _check_resize_multiple(self, backbone: Backbone) -> None:
        """Aspect-keeping sides must divide by VAE factor × U-Net downsampling, or a grid would not be whole."""
        hp = self.hparams
        try:
            vae_factor = latent_scale_factor(backbone.vae)
            unet_factor = 2 ** (len(backbone.unet.config.down_block_types) - 1)
        except (AttributeError, TypeError):
            return
        need = vae_factor * unet_factor
        unit = size_unit(hp.resolution, hp.resize_multiple)
        if hp.resize != "square" and unit % need:
            raise ValueError(
                f"{hp.resize} sides step by {unit} (resolution {hp.resolution}, resize_multiple "
                f"{hp.resize_multiple}) but {hp.pretrained} needs multiples of {need} (VAE ×{vae_factor}, U-Net "
                f"×{unet_factor}): set model.resize_multiple to a multiple of {need}"
            )

    def encode(self, images: Tensor, resized: bool = False) -> Tensor:
        """[0, 1] images at any size → VAE latent means × scaling factor (B, C, h, w), float32, the images
        resized to `model_input_size` first unless `resized` (DataModule batches already are)."""
        size = tuple(images.shape[-2:]) if resized else self.model_input_size(*images.shape[-2:])
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = (x * 2 - 1).to(self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean.float() * self.vae.config.scaling_factor

    def decode(self, latents: Tensor, chunk: int) -> Tensor:
        """Latents → RGB in [-1, 1] (float32) with the configured decoder, decoded `chunk` at a time.

        `decoder: latent` decodes nothing: the latents themselves, upsampled bilinearly to the model input size,
        stand in for the image, so a difference map is ‖Δz‖ over the latent channels."""
        if self.hparams.decoder == "latent":
            factor = latent_scale_factor(self.vae)
            return F.interpolate(latents.float(), scale_factor=factor, mode="bilinear", align_corners=False)
        # diffusers' convention for both decoders: decode(latents / config.scaling_factor). TAESD was
        # distilled on the U-Net's latents (SD VAE latents × 0.18215) and its config says scaling_factor 1.0,
        # so it gets them as they are. Both return unclamped [-1, 1] images (TAESD maps its [0, 1] by 2x − 1).
        decoder = self.taesd if self.taesd is not None else self.vae
        scale = decoder.config.scaling_factor
        parts = [
            decoder.decode((z / scale).to(decoder.dtype)).sample.float() for z in latents.split(max(1, chunk))
        ]
        return torch.cat(parts)

    def frozen_model(self) -> method.FrozenModel:
        """The frozen pieces as emerdiff_pl.method drives them (U-Net calls with the empty prompt)."""
        self._ensure_ready()
        emb = self.backbone.empty_prompt_embedding().to(self.unet.dtype)
        return method.FrozenModel(
            unet=self.unet,
            call=lambda x, t: self.call_unet(x, t, emb),
            decode=self.decode,
            schedule=self.schedule,
            controller=self.controller,
            backend=self.backend,
            prefix=self.prefix,
        )

    def remove_hooks(self) -> None:
        """Take prefix sharing's hooks off the U-Net (for a U-Net another segmenter shares next); the model then
        runs as with `prefix_sharing: false`."""
        if self.prefix is not None:
            self.prefix.remove()
            self.prefix = None

    def input_size(self, latents: Tensor) -> tuple[int, int]:
        """(h, w) of the model input that VAE-encodes to `latents` (…, h/f, w/f)."""
        factor = latent_scale_factor(self.vae)
        return (latents.shape[-2] * factor, latents.shape[-1] * factor)

    def rows_per_call(self, latents: Tensor) -> int:
        """U-Net rows per call: `max_branch_batch`, or for `auto` from free CUDA memory (32 on CPU)."""
        hp = self.hparams
        # auto scales with the model input's area
        return runtime.rows_per_call(
            hp.max_branch_batch, self.device, self.input_size(latents), self.unet.dtype
        )

    # ------------------------------------------------------------------ the method's steps
    def reference_pass(
        self, x0: Tensor, seeds: list[int], record: attn.RecordKind
    ) -> tuple[Trajectory | None, Tensor]:
        """Trajectory (None for lowres_bilinear) and the t_f query vectors (B, N, C) of latents x0."""
        hp = self.hparams
        steps_per_call = 1
        if hp.batched_reference:
            steps_per_call = min(len(self.timesteps), max(1, self.rows_per_call(x0) // x0.shape[0]))
        return method.reference_pass(
            self.frozen_model(),
            x0,
            seeds,
            self.schedule_timesteps,
            self.timesteps if hp.method == "emerdiff" else None,
            hp.feature_timestep,
            record,
            steps_per_call,
        )

    def lowres_masks(
        self, features: Tensor, seeds: list[int], latent_hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Low-res labels (B, h, w) and mask embeddings (B, K, C) of the query vectors."""
        hp = self.hparams
        return method.lowres_masks(
            features, hp.num_masks, seeds, latent_hw, hp.kmeans_n_init, hp.kmeans_max_iter
        )

    def layer_grid(self, trajectory: Trajectory) -> tuple[int, int]:
        """(h, w) token grid of the modulated layer."""
        n = self.controller.tokens[self.hparams.modulated_layer]
        return method.token_grid(n, tuple(trajectory.latents.shape[-2:]))

    def branch_plan(self, lowres: Tensor, trajectory: Trajectory) -> method.BranchPlan:
        """Every (image, mask, sign) branch row of the batch."""
        hp = self.hparams
        return method.branch_plan(
            lowres, hp.num_masks, self.layer_grid(trajectory), hp.modulation_strength, self.two_sided
        )

    @property
    def two_sided(self) -> bool:
        return self.hparams.difference == "two_sided"

    def difference_maps(self, trajectory: Trajectory, lowres: Tensor, naive: bool = False) -> Tensor:
        """d (B, K, R, R): the vectorized branches in chunks, or (`naive`) the per-mask, per-sign reference loop."""
        hp = self.hparams
        model = self.frozen_model()
        if naive:
            return method.difference_maps_naive(
                model,
                trajectory,
                lowres,
                hp.num_masks,
                self.layer_grid(trajectory),
                hp.modulation_strength,
                self.two_sided,
                hp.attention_injection,
            )
        plan = self.branch_plan(lowres, trajectory)
        chunk = runtime.branch_chunk(self.rows_per_call(trajectory.latents), len(plan.image), self.two_sided)
        return method.difference_maps(model, trajectory, plan, hp.num_masks, hp.attention_injection, chunk)

    def smooth(self, maps: Tensor) -> Tensor:
        """Gaussian filter of each difference map (σ = `gaussian_sigma`, pixels at model resolution)."""
        return method.smooth(maps, self.hparams.gaussian_sigma)

    @torch.no_grad()
    def segment(
        self,
        images: Tensor,
        *,
        seeds: list[int] | None = None,
        output_size: tuple[int, int] | None = None,
        naive: bool = False,
        resized: bool = False,
    ) -> SegmentationResult:
        """Segment a batch: images (B, 3, H, W) float in [0, 1] → labels (B, H, W) (or `output_size`).

        `seeds` (default: `seed` for every image) decide noise and k-means per image. `naive=True` runs the
        slow per-mask reference path instead of the vectorized one; both give the same labels. `resized`: the
        images are already at the model input size (DataModule batches; see `model_input_size`)."""
        self._ensure_ready()
        hp = self.hparams
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        out_h, out_w = output_size or images.shape[-2:]
        batch = images.shape[0]
        seeds = [hp.seed] * batch if seeds is None else list(seeds)
        if batch == 0:
            empty = torch.empty(0, dtype=torch.long)
            return SegmentationResult(
                empty.view(0, out_h, out_w), empty.view(0, 0, 0), torch.empty(0, hp.num_masks, 0)
            )
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            timings[name] = now - clock
            clock = now

        record = "qk" if hp.method == "emerdiff" and hp.attention_injection and not naive else "none"
        # the naive path is the reference, compiled U-Net or not
        with torch.compiler.set_stance("force_eager") if naive and hp.compile else nullcontext():
            x0 = self.encode(images, resized=resized)
            trajectory, features = self.reference_pass(x0, seeds, record)
            lap("reference_s")
            lowres, embeddings = self.lowres_masks(features, seeds, tuple(x0.shape[-2:]))
            lap("kmeans_s")
            if hp.method == "lowres_bilinear":
                scores = method.lowres_bilinear_scores(lowres, hp.num_masks, self.input_size(x0))
            else:
                scores = self.smooth(self.difference_maps(trajectory, lowres, naive=naive))
                lap("branches_s")
        scores = self.refine_scores(scores, images)
        if hp.refine != "none":
            lap("refine_s")
        labels = method.assign(scores, (out_h, out_w))
        lap("assign_s")
        return SegmentationResult(labels.cpu(), lowres.cpu(), embeddings.float().cpu(), timings)

    def refine_scores(self, scores: Tensor, images: Tensor) -> Tensor:
        """The `refine` step: score maps (B, K, R, R) → refined maps, the images (B, 3, H, W) as guide."""
        hp = self.hparams
        return refine(
            scores,
            images,
            hp.refine,
            iterations=hp.refine_iterations,
            dilations=hp.refine_dilations,
            radius=hp.refine_radius,
            eps=hp.refine_eps,
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        """One DataModule batch (docs/interfaces.md) → per-sample labels at original size, for the writer."""
        start = time.perf_counter()
        images = batch["image"]
        result = self.segment(images, resized=True)
        labels = []
        if len(images):
            labels = [
                F.interpolate(
                    result.labels[i][None, None].float(), size=tuple(int(v) for v in hw), mode="nearest-exact"
                )[0, 0].long()
                for i, hw in enumerate(batch["original_size"])
            ]
        return {
            "key": list(batch["key"]),
            "url": list(batch["url"]),
            "original": batch.get("original", []),
            "labels": labels,
            "lowres_labels": result.lowres_labels,
            "model_size": [int(v) for v in images.shape[-2:]] if len(images) else None,
            "mask_embeddings": result.mask_embeddings,
            "failures": batch.get("failures", []),
            "seconds": time.perf_counter() - start,
            "timings": result.timings,
        }


__all__ = [
    "AUTO_MAX_ROWS_512",
    "DECODERS",
    "EmerDiffSegmenter",
    "FEATURE_LAYER",
    "MODULATED_LAYER",
    "SegmentationResult",
    "auto_branch_rows",
]
