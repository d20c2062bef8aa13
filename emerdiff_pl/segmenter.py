"""EmerDiffSegmenter: image-resolution unsupervised masks from a frozen Stable Diffusion model (SPEC §1)."""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

from emerdiff_pl import attention as attn
from emerdiff_pl.backbone import Backbone, load_backbone, load_taesd
from emerdiff_pl.inversion import (
    NoiseSchedule,
    Trajectory,
    denoising_timesteps,
    invert,
    sample_trajectory_latents,
)
from emerdiff_pl.kmeans import batched_kmeans, canonical_order, relabel
from emerdiff_pl.layout import to_channels_last
from emerdiff_pl.prefix import PrefixSharing

log = logging.getLogger(__name__)

FEATURE_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
MODULATED_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_MAX_ROWS_512 = 16  # max_branch_batch=auto on CUDA: branch rows per U-Net call at 512² (scaled by area)


def auto_branch_rows(free_bytes: int, resolution: int, itemsize: int = 2) -> int:
    """`max_branch_batch: auto` on CUDA: branch rows per U-Net call from free device memory.

    At most 16 rows at 512² (scaled by area): an H200 gives the same rows/s at 16, 24 and 40 rows while peak
    memory grows 6.9 → 12.5 GB (BENCHMARKS.md). The memory bound keeps a conservative 1.2 GB per 512² row in
    bf16 within 70 % of free memory (measured: ≈ 0.3 GB); a CUDA OOM still halves the chunk and retries.
    """
    area = (resolution / 512) ** 2
    per_row = 1.2e9 * area * itemsize / 2
    return max(2, min(int(AUTO_MAX_ROWS_512 / area), int(0.7 * free_bytes / per_row)))


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
        resolution: side of the square the image is resized to for the model (SD 1.x: 512).
        num_masks: K, clusters of the feature layer's query vectors.
        num_inference_steps: length of the DDPM schedule the timesteps below live on (50 → {981, …, 21, 1}).
        feature_timestep: t_f, where the query vectors are read.
        modulation_timestep: t_m, the single U-Net call where the modulated layer's output gets ±λ·M_i.
        modulation_strength: λ.
        steps_after_modulation: denoise from t_m in this many evenly spaced steps (None: every schedule step).
        feature_layer / modulated_layer: attention layer names (`….attn2` = cross-attention).
        attention_injection: reuse the reference run's attention maps in every branch (SPEC §1.5).
        difference: `two_sided` ‖I⁻ − I⁺‖ (2K branches) or `one_sided` ‖I⁺ − I_ref‖ (K branches, faster).
        gaussian_sigma: σ of the Gaussian smoothing of each difference map, pixels at model resolution (0: off).
        kmeans_n_init / kmeans_max_iter: k-means restarts (best inertia kept) and Lloyd iterations.
        seed: every image is seeded with it (noise and k-means), so a result depends only on image and settings.
        max_branch_batch: branches per U-Net call (even), or `auto` (on CUDA: from free memory, at most 16 at 512²;
            32 on CPU).
        dtype: `auto` = bfloat16 on CUDA, float32 on CPU.
        attention_backend: `auto` = xformers where a probe call on the device works, else PyTorch SDPA.
        channels_last: on CUDA, U-Net and decoders in channels-last memory format (faster convolutions);
            GroupNorms and attention blocks keep activations channels-last too (emerdiff_pl.layout; in eager
            mode the GroupNorm runs as Triton kernels, emerdiff_pl.triton_norm). No effect on CPU.
        compile: `torch.compile` the U-Net and the branch decoder (default mode; the batch size turns symbolic
            when it first changes). The first images pay the compilation; `segment(naive=True)` runs eagerly.
        decoder: what decodes the branch images into difference maps: the model's `vae`, or `taesd` (a tiny
            distilled decoder, far cheaper than the VAE's); images are always encoded by the VAE.
        taesd_model: the AutoencoderTiny of `decoder: taesd`: hub id, local folder, `tiny-random` (random
            weights, fits the backbone's latents) or `sd14-arch` (full size, random weights; benchmarks only).
    """

    def __init__(
        self,
        pretrained: str = "CompVis/stable-diffusion-v1-4",
        method: Literal["emerdiff", "lowres_bilinear"] = "emerdiff",
        resolution: int = 512,
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
        compile: bool = False,
        decoder: Literal["vae", "taesd"] = "vae",
        taesd_model: str = "madebyollin/taesd",
    ):
        super().__init__()
        self.save_hyperparameters()
        if method not in ("emerdiff", "lowres_bilinear"):
            raise ValueError(f"method must be emerdiff or lowres_bilinear, got {method!r}")
        if difference not in ("two_sided", "one_sided"):
            raise ValueError(f"difference must be two_sided or one_sided, got {difference!r}")
        if decoder not in ("vae", "taesd"):
            raise ValueError(f"decoder must be vae or taesd, got {decoder!r}")
        if num_masks < 1 or resolution < 8:
            raise ValueError(f"need num_masks ≥ 1 and resolution ≥ 8, got {num_masks} and {resolution}")
        if max_branch_batch != "auto" and (not isinstance(max_branch_batch, int) or max_branch_batch < 1):
            raise ValueError(f"max_branch_batch must be a positive int or 'auto', got {max_branch_batch!r}")
        self.backbone: Backbone | None = None
        self.taesd: AutoencoderTiny | None = None
        self.backend: attn.Backend | None = None
        self._channels_last_device: torch.device | None = None
        self.store = attn.AttentionStore(feature_layer, modulated_layer)
        self.prefix: PrefixSharing | None = None

    # ------------------------------------------------------------------ setup
    def _target_device(self) -> torch.device:
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else self.device

    def compute_dtype(self) -> torch.dtype:
        name = self.hparams.dtype
        if name == "auto":
            return torch.bfloat16 if self._target_device().type == "cuda" else torch.float32
        return _DTYPES[name]

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
            # compiled lazily at the first call; dynamic=None: a second batch size recompiles once with a
            # symbolic batch (latent H, W stay static), so chunks of any size share one graph. The branch
            # decoder too: 2K decodes per image, as memory-bound in eager mode as the U-Net (BENCHMARKS.md)
            self.unet.compile(dynamic=None)
            (self.taesd or backbone.vae).decoder.compile(dynamic=None)
        elif hp.method == "emerdiff":
            # eager only: compiled, the t_m call would need a second graph for ≈ 3 % of the U-Net FLOPs
            self.prefix = PrefixSharing(self.unet, self.store)
            self.prefix.trace_next_call()  # the first reference call; the module order is static
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
            for module in (self.unet, self.vae, self.taesd):
                if module is None:
                    continue
                # GroupNorm outputs stay NHWC too (no layout copies around each norm). Under compile, inductor
                # fuses the NHWC norm's torch ops (the Triton kernels are for eager): 44.2 % of peak on an H200.
                to_channels_last(module)
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

    # ------------------------------------------------------------------ method
    def _unet(self, x: Tensor, t: int | Tensor, emb: Tensor) -> Tensor:
        """One U-Net call; `t` is one timestep for every row or a tensor with each row's."""
        dtype = self.unet.dtype
        timestep = t.to(x.device) if isinstance(t, Tensor) else torch.full((x.shape[0],), t, device=x.device)
        return self.unet(x.to(dtype), timestep, encoder_hidden_states=emb.expand(x.shape[0], -1, -1)).sample

    def encode(self, images: Tensor) -> Tensor:
        """[0, 1] images at any size → VAE latent means × scaling factor (B, C, h, w), float32."""
        size = self.hparams.resolution
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = (x * 2 - 1).to(self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean.float() * self.vae.config.scaling_factor

    def decode(self, latents: Tensor, chunk: int) -> Tensor:
        """Latents → RGB in [-1, 1] (float32) with the configured decoder, decoded `chunk` at a time."""
        # diffusers' convention for both decoders: decode(latents / config.scaling_factor). TAESD was
        # distilled on the U-Net's latents (SD VAE latents × 0.18215) and its config says scaling_factor 1.0,
        # so it gets them as they are. Both return unclamped [-1, 1] images (TAESD maps its [0, 1] by 2x − 1).
        decoder = self.taesd if self.taesd is not None else self.vae
        scale = decoder.config.scaling_factor
        parts = [
            decoder.decode((z / scale).to(decoder.dtype)).sample.float() for z in latents.split(max(1, chunk))
        ]
        return torch.cat(parts)

    def _reference_pass(
        self, x0: Tensor, seeds: list[int], record: attn.Record
    ) -> tuple[Trajectory | None, Tensor]:
        """Sample the trajectory, run the unmodified U-Net over it (recording for injection), read the features.

        Returns (trajectory or None for lowres_bilinear, features (B, N, C))."""
        hp, store = self.hparams, self.store
        emb = self.backbone.empty_prompt_embedding().to(self.unet.dtype)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        every = sample_trajectory_latents(self.schedule, x0, self.schedule_timesteps, generators)
        latents = every[[self.schedule_timesteps.index(t) for t in self.timesteps]]
        store.clear()
        store.record, store.read_features = record, True
        attn.install(self.unet, store, self.backend, attn.CaptureProcessor, modulate=False)
        trajectory = None
        if hp.method == "emerdiff":

            def unet_fn(x: Tensor, t: Tensor, steps: list[int]) -> Tensor:
                store.begin_steps(steps)
                out = self._unet(x, t, emb)
                store.end_steps()
                return out

            # the steps are independent: as many per U-Net call as a branch chunk has rows
            steps_per_call = min(len(self.timesteps), max(1, self._rows_per_call() // x0.shape[0]))
            while True:
                try:
                    trajectory = invert(unet_fn, self.schedule, latents, self.timesteps, steps_per_call)
                    break
                except torch.OutOfMemoryError:
                    if steps_per_call == 1:
                        raise
                    steps_per_call = _halve_after_oom(steps_per_call, "reference steps")
        if trajectory is not None and hp.feature_timestep in self.timesteps:
            feature_step = self.timesteps.index(hp.feature_timestep)
        else:  # lowres_bilinear, or t_f outside the denoised span: one call at t_f
            feature_step = -1
            store.record = "none"
            store.begin_step(feature_step)
            self._unet(every[self.schedule_timesteps.index(hp.feature_timestep)], hp.feature_timestep, emb)
            store.record = record
        (features,) = store.saved[feature_step][attn.FEATURES]
        for recorded in store.saved.values():  # the queries of the other steps are not needed
            recorded.pop(attn.FEATURES, None)
        store.read_features = False
        return trajectory, features

    def _lowres_masks(
        self, features: Tensor, seeds: list[int], latent_hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """k-means of the feature-layer queries → canonical low-res labels (B, h, w) and mask embeddings (B, K, C)."""
        hp = self.hparams
        batch, n, _ = features.shape
        h, w = _token_grid(n, latent_hw)
        if hp.num_masks > n:
            raise ValueError(
                f"num_masks={hp.num_masks} exceeds the {n} feature vectors of {hp.feature_layer} ({h}×{w} at "
                f"resolution {hp.resolution}); lower num_masks or raise resolution"
            )
        result = batched_kmeans(
            features, hp.num_masks, n_init=hp.kmeans_n_init, max_iter=hp.kmeans_max_iter, seeds=seeds
        )
        perm = canonical_order(result.labels, hp.num_masks)
        labels = relabel(result.labels, perm)
        one_hot = F.one_hot(labels, hp.num_masks).float()  # (B, N, K)
        embeddings = (one_hot.transpose(1, 2) @ features) / one_hot.sum(1).clamp_min(1).unsqueeze(-1)
        return labels.view(batch, h, w), embeddings

    def _rows_per_call(self) -> int:
        """U-Net rows per call: `max_branch_batch`, or for `auto` from free CUDA memory (32 on CPU)."""
        setting = self.hparams.max_branch_batch
        if setting != "auto":
            return setting
        if self.device.type != "cuda":
            return 32
        free, _ = torch.cuda.mem_get_info(self.device)
        return auto_branch_rows(free, self.hparams.resolution, self.unet.dtype.itemsize)

    def _chunk_size(self, total: int) -> int:
        chunk = min(self._rows_per_call(), total)
        if self.hparams.difference == "two_sided":
            chunk = max(2, chunk - chunk % 2)  # keep both signs of a mask in the same chunk
        return chunk

    def _branch_plan(self, lowres: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Each branch row's image and modulation (R, N); rows are ordered image → mask → sign (−, +)."""
        hp = self.hparams
        batch, k = lowres.shape[0], hp.num_masks
        signs = (-1.0, 1.0) if hp.difference == "two_sided" else (1.0,)
        masks = F.one_hot(lowres, k).permute(0, 3, 1, 2).float()  # (B, K, h, w)
        if masks.shape[-2:] != grid:
            masks = F.interpolate(masks, size=grid, mode="nearest")
        image = torch.arange(batch).repeat_interleave(k * len(signs))
        mask = torch.arange(k).repeat_interleave(len(signs)).repeat(batch)
        sign = torch.tensor(signs).repeat(batch * k)
        modulation = sign[:, None] * hp.modulation_strength * masks[image, mask].flatten(1).cpu()
        return image, modulation

    def _denoise(
        self,
        trajectory: Trajectory,
        image: Tensor,
        modulation: Tensor | None,
        emb: Tensor,
        path: list[Tensor] | None = None,
    ) -> Tensor:
        """Run branch rows from x_{t_m} to t = 0 with the processors installed; `path` collects every x_t."""
        store, device = self.store, self.device
        store.rows = image.to(device)
        store.modulation = None if modulation is None else modulation.to(device)
        x = trajectory.latents[0][store.rows]
        steps = trajectory.timesteps
        for s, t in enumerate(steps):
            if path is not None:
                path.append(x)
            store.begin_step(s)
            t_prev = steps[s + 1] if s + 1 < len(steps) else -1
            # at t_m the rows of one image are identical up to the modulated layer
            sharing = s == 0 and self.prefix is not None
            if sharing:
                self.prefix.share(store.rows)
            try:
                eps = self._unet(x, t, emb).float()
            finally:
                if sharing:
                    self.prefix.stop()
            x = self.schedule.step(x, eps, t, t_prev, trajectory.noise[s][store.rows])
        return x

    def _difference_maps(self, trajectory: Trajectory, lowres: Tensor) -> Tensor:
        """Vectorized branches: every (image, mask, sign) of the batch, in chunks. → d (B, K, R, R)."""
        hp, store = self.hparams, self.store
        emb = self.backbone.empty_prompt_embedding().to(self.unet.dtype)
        image, modulation = self._branch_plan(lowres, self._layer_grid(trajectory))
        kind = attn.InjectProcessor if hp.attention_injection else attn.CaptureProcessor
        store.record = "none"
        attn.install(self.unet, store, self.backend, kind, modulate=True)
        batch, k, size = lowres.shape[0], hp.num_masks, hp.resolution
        rgb_ref = None
        if hp.difference == "one_sided":
            rgb_ref = self.decode(trajectory.final, self._chunk_size(batch))
        maps = torch.empty(batch * k, size, size, device=self.device)
        chunk, start = self._chunk_size(len(image)), 0
        while start < len(image):
            rows = slice(start, start + chunk)
            try:
                x0 = self._denoise(trajectory, image[rows], modulation[rows], emb)
                rgb = self.decode(x0, max(1, chunk // 2))
            except torch.OutOfMemoryError:
                if chunk <= (2 if hp.difference == "two_sided" else 1):
                    raise
                chunk = _halve_after_oom(chunk, "branches", even=hp.difference == "two_sided")
                continue
            if rgb_ref is None:  # rows alternate −, +
                maps[start // 2 : (start + len(rgb)) // 2] = (rgb[0::2] - rgb[1::2]).norm(dim=1)
            else:
                maps[start : start + len(rgb)] = (rgb - rgb_ref[image[rows].to(self.device)]).norm(dim=1)
            start += len(rgb)
        store.clear()
        return maps.view(batch, k, size, size)

    def _difference_maps_naive(self, trajectory: Trajectory, lowres: Tensor) -> Tensor:
        """Reference path: one mask and one sign at a time, explicit attention probabilities recomputed from the
        unmodified run at every step, no shared computation. Slow; it exists to prove the fast path right."""
        hp, store = self.hparams, self.store
        emb = self.backbone.empty_prompt_embedding().to(self.unet.dtype)
        image, modulation = self._branch_plan(lowres, self._layer_grid(trajectory))
        one = torch.zeros(1, dtype=torch.long, device=self.device)
        steps = trajectory.timesteps
        rgb = []
        for row in range(len(image)):
            b = int(image[row])
            x = trajectory.latents[0][b : b + 1]
            for s, t in enumerate(steps):
                store.saved.clear()
                store.rows, store.modulation = one, modulation[row : row + 1].to(self.device)
                store.begin_step(s)
                if hp.attention_injection:  # the reference call at this step, recording probabilities
                    store.record = "probs"
                    attn.install(self.unet, store, self.backend, attn.CaptureProcessor, modulate=False)
                    self._unet(trajectory.latents[s][b : b + 1], t, emb)
                store.record = "none"
                kind = attn.InjectProcessor if hp.attention_injection else attn.CaptureProcessor
                attn.install(self.unet, store, self.backend, kind, modulate=True)
                t_prev = steps[s + 1] if s + 1 < len(steps) else -1
                x = self.schedule.step(
                    x, self._unet(x, t, emb).float(), t, t_prev, trajectory.noise[s][b : b + 1]
                )
            rgb.append(self.decode(x, 1))
        rgb = torch.cat(rgb)
        if hp.difference == "one_sided":
            maps = (rgb - self.decode(trajectory.final, 1)[image.to(self.device)]).norm(dim=1)
        else:
            maps = (rgb[0::2] - rgb[1::2]).norm(dim=1)
        store.clear()
        return maps.view(lowres.shape[0], hp.num_masks, hp.resolution, hp.resolution)

    def _layer_grid(self, trajectory: Trajectory) -> tuple[int, int]:
        n = self.store.tokens[self.hparams.modulated_layer]
        return _token_grid(n, tuple(trajectory.latents.shape[-2:]))

    def smooth(self, maps: Tensor) -> Tensor:
        """Gaussian filter of each difference map (σ in pixels at model resolution)."""
        sigma = self.hparams.gaussian_sigma
        if sigma <= 0:
            return maps
        radius = min(math.ceil(3 * sigma), maps.shape[-1] - 1, maps.shape[-2] - 1)
        flat = maps.flatten(0, 1).unsqueeze(1)
        return gaussian_blur(flat, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma]).view_as(maps)

    @torch.no_grad()
    def segment(
        self,
        images: Tensor,
        *,
        seeds: list[int] | None = None,
        output_size: tuple[int, int] | None = None,
        naive: bool = False,
    ) -> SegmentationResult:
        """Segment a batch: images (B, 3, H, W) float in [0, 1] → labels (B, H, W) (or `output_size`).

        `seeds` (default: `seed` for every image) decide noise and k-means per image. `naive=True` runs the
        slow per-mask reference path instead of the vectorized one; both give the same labels."""
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
            x0 = self.encode(images)
            trajectory, features = self._reference_pass(x0, seeds, record)
            lap("reference_s")
            lowres, embeddings = self._lowres_masks(features, seeds, tuple(x0.shape[-2:]))
            lap("kmeans_s")
            size = hp.resolution
            if hp.method == "lowres_bilinear":
                one_hot = F.one_hot(lowres, hp.num_masks).permute(0, 3, 1, 2).float()
                scores = F.interpolate(one_hot, size=(size, size), mode="bilinear", align_corners=False)
            else:
                maps = (
                    self._difference_maps_naive(trajectory, lowres)
                    if naive
                    else self._difference_maps(trajectory, lowres)
                )
                scores = self.smooth(maps)
                lap("branches_s")
        labels = scores.argmax(1, keepdim=True).float()
        labels = F.interpolate(labels, size=(out_h, out_w), mode="nearest-exact").squeeze(1).long()
        lap("assign_s")
        return SegmentationResult(labels.cpu(), lowres.cpu(), embeddings.float().cpu(), timings)

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        """One DataModule batch (docs/interfaces.md) → per-sample labels at original size, for the writer."""
        start = time.perf_counter()
        images = batch["image"]
        result = self.segment(images)
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
            "mask_embeddings": result.mask_embeddings,
            "failures": batch.get("failures", []),
            "seconds": time.perf_counter() - start,
            "timings": result.timings,
        }


def _halve_after_oom(n: int, what: str, even: bool = False) -> int:
    """After a CUDA OOM with `n` `what` per U-Net call: free the cache, return the halved count (even: ≥ 2,
    keeping both signs of a mask together)."""
    new = max(1, n // 2)
    if even:
        new = max(2, new - new % 2)
    log.warning("CUDA out of memory with %d %s per call; retrying with %d", n, what, new)
    torch.cuda.empty_cache()
    return new


def _token_grid(n: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with n raster-order tokens in a U-Net over latents of size latent_hw."""
    lat_h, lat_w = latent_hw
    factor = math.sqrt(lat_h * lat_w / n)
    h, w = round(lat_h / factor), round(lat_w / factor)
    if h * w != n:
        raise ValueError(f"cannot place {n} tokens on a grid for latents {lat_h}×{lat_w}")
    return h, w


__all__ = ["EmerDiffSegmenter", "SegmentationResult", "FEATURE_LAYER", "MODULATED_LAYER"]
