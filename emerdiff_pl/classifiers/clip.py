"""`clip`: open-vocabulary class scores from class names, with a CLIP image encoder's dense features.

MaskCLIP's dense features, cleared as ClearCLIP shows: every vision block but the last runs as usual; of the
last block only the value path `out_proj(v_proj(layer_norm1(x)))` is kept (no query-key attention, no residual,
no MLP); the class token is dropped, `post_layernorm` and the visual projection follow. The image is resized to
`resolution` on its short side (each side a multiple of the patch size, the position embeddings interpolated),
so any aspect ratio works. The text side is a prompt-template ensemble (the mean of the normalized template
embeddings, renormalized); a class written as "name, synonym, …" scores the best of its names. Scores are the
cosine at the patch grid (B, C, h_p, w_p), or its softmax at CLIP's learned scale (the default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from emerdiff_pl.backbone import hub_error, local_path
from emerdiff_pl.classifiers.names import synonyms

# OpenAI CLIP's image normalization, used when a model folder saved no image processor
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The 80 ImageNet prompt templates of OpenAI's CLIP (its zero-shot ImageNet notebook), the ensemble MaskCLIP and
# ClearCLIP use for segmentation.
_PACKED_TEMPLATES = (
    "a bad photo of a {}.|a photo of many {}.|a sculpture of a {}.|a photo of the hard to see {}.|"
    "a low resolution photo of the {}.|a rendering of a {}.|graffiti of a {}.|a bad photo of the {}.|"
    "a cropped photo of the {}.|a tattoo of a {}.|the embroidered {}.|a photo of a hard to see {}.|"
    "a bright photo of a {}.|a photo of a clean {}.|a photo of a dirty {}.|a dark photo of the {}.|"
    "a drawing of a {}.|a photo of my {}.|the plastic {}.|a photo of the cool {}.|"
    "a close-up photo of a {}.|a black and white photo of the {}.|a painting of the {}.|"
    "a painting of a {}.|a pixelated photo of the {}.|a sculpture of the {}.|a bright photo of the {}.|"
    "a cropped photo of a {}.|a plastic {}.|a photo of the dirty {}.|a jpeg corrupted photo of a {}.|"
    "a blurry photo of the {}.|a photo of the {}.|a good photo of the {}.|a rendering of the {}.|"
    "a {} in a video game.|a photo of one {}.|a doodle of a {}.|a close-up photo of the {}.|"
    "a photo of a {}.|the origami {}.|the {} in a video game.|a sketch of a {}.|a doodle of the {}.|"
    "a origami {}.|a low resolution photo of a {}.|the toy {}.|a rendition of the {}.|"
    "a photo of the clean {}.|a photo of a large {}.|a rendition of a {}.|a photo of a nice {}.|"
    "a photo of a weird {}.|a blurry photo of a {}.|a cartoon {}.|art of a {}.|a sketch of the {}.|"
    "a embroidered {}.|a pixelated photo of a {}.|itap of the {}.|a jpeg corrupted photo of the {}.|"
    "a good photo of a {}.|a plushie {}.|a photo of the nice {}.|a photo of the small {}.|"
    "a photo of the weird {}.|the cartoon {}.|art of the {}.|a drawing of the {}.|"
    "a photo of the large {}.|a black and white photo of a {}.|the plushie {}.|a dark photo of a {}.|"
    "itap of a {}.|graffiti of the {}.|a toy {}.|itap of my {}.|a photo of a cool {}.|"
    "a photo of a small {}.|a tattoo of the {}."
)
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(_PACKED_TEMPLATES.split("|"))
DEFAULT_CLIP = "openai/clip-vit-base-patch16"


def load_clip(name: str, dtype: torch.dtype = torch.float32) -> tuple[CLIPModel, object, tuple, tuple]:
    """A CLIPModel (eval, no grad) and its tokenizer and image mean/std from a hub id or a local folder (with
    config.json, the weights and the tokenizer files, as `save_pretrained` writes them)."""
    path = local_path(name)
    if path is not None and not (path / "config.json").is_file():
        held = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
        raise FileNotFoundError(
            f"clip_model={name!r} is not a CLIP model folder "
            + (f"(it holds {held}, no config.json). " if held is not None else "(no such folder). ")
            + f"Pass a hub id like {DEFAULT_CLIP!r} or a folder written by CLIPModel.save_pretrained and "
            "CLIPProcessor.save_pretrained (or the tokenizer's)"
        )
    source = str(path) if path is not None else name
    try:
        model = CLIPModel.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        if path is not None:
            raise
        raise hub_error(name, "clip_model", "/path/clip", err) from err
    mean, std = _image_stats(source)
    model.requires_grad_(False).eval()
    return model, tokenizer, mean, std


def _image_stats(source: str) -> tuple[tuple, tuple]:
    """image_mean / image_std of the model's image processor, or OpenAI CLIP's when it has none saved."""
    try:
        processor = CLIPImageProcessor.from_pretrained(source)
    except (OSError, ValueError):  # no preprocessor/processor config: normalized as OpenAI's CLIP
        return CLIP_MEAN, CLIP_STD
    return tuple(processor.image_mean), tuple(processor.image_std)


def clip_input_size(height: int, width: int, resolution: int, patch: int) -> tuple[int, int]:
    """(h, w) of the CLIP input for an H×W image: short side ≈ `resolution`, aspect kept, each side a multiple
    of the patch size (at least one patch)."""
    scale = resolution / min(height, width)
    return (
        max(patch, round(height * scale / patch) * patch),
        max(patch, round(width * scale / patch) * patch),
    )


class CLIPClassifier(nn.Module):
    """Open-vocabulary class scores of images: `scores(images (B, 3, H, W) in [0, 1]) → (B, C, h_p, w_p)` at the
    patch grid. Text embeddings are computed once, on first use, on the model's device."""

    kind = "clip"

    def __init__(
        self,
        class_names: Sequence[str],
        model: str = DEFAULT_CLIP,
        resolution: int = 448,
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        softmax: bool = True,
        logit_scale: float | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not class_names:
            raise ValueError("the clip classifier needs class names")
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("every prompt template must hold '{}' where the class name goes")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.class_names = tuple(class_names)
        self.model_name = model
        self.resolution = resolution
        self.templates = tuple(templates)
        self.softmax = softmax
        self.clip, self.tokenizer, mean, std = load_clip(model, dtype)
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.logit_scale = float(self.clip.logit_scale.exp()) if logit_scale is None else float(logit_scale)
        names = [synonyms(c) for c in self.class_names]
        # which class each name scores for: (S,) in [0, C)
        self.register_buffer(
            "name_class", torch.tensor([c for c, group in enumerate(names) for _ in group]), persistent=False
        )
        self._names = [n for group in names for n in group]
        self._text: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def patch_size(self) -> int:
        return int(self.clip.config.vision_config.patch_size)

    @torch.no_grad()
    def text_embeddings(self) -> Tensor:
        """(S, E) normalized prompt-ensemble embedding of every class name (synonyms each their own row)."""
        device = self.clip.text_projection.weight.device
        if self._text is None or self._text.device != device:
            rows = []
            for name in self._names:
                prompts = [t.format(name) for t in self.templates]
                tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(
                    device
                )
                pooled = self.clip.text_model(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                ).pooler_output
                per_template = F.normalize(self.clip.text_projection(pooled).float(), dim=-1)  # (T, E)
                rows.append(F.normalize(per_template.mean(0), dim=-1))
            self._text = torch.stack(rows)
        return self._text

    def pixel_values(self, images: Tensor) -> Tensor:
        """[0, 1] images (B, 3, H, W) → normalized CLIP input at `clip_input_size`, in the model's dtype."""
        size = clip_input_size(*images.shape[-2:], self.resolution, self.patch_size)
        x = images.to(self.image_mean.device, torch.float32)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return ((x - self.image_mean) / self.image_std).to(self.clip.dtype)

    @torch.no_grad()
    def dense_features(self, pixel_values: Tensor) -> Tensor:
        """Normalized dense image embeddings (B, h_p·w_p, E) in raster order: the last block's value path only,
        then post_layernorm and the visual projection."""
        vision = self.clip.vision_model
        hidden = vision(
            pixel_values=pixel_values, output_hidden_states=True, interpolate_pos_encoding=True
        ).hidden_states
        x = hidden[-2]  # (B, 1 + N, D): the input of the last block
        last = vision.encoder.layers[-1]
        # the value path alone: no query-key attention, no residual, no MLP
        values = last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(x)))
        tokens = vision.post_layernorm(values[:, 1:])  # the class token dropped
        return F.normalize(self.clip.visual_projection(tokens).float(), dim=-1)

    @torch.no_grad()
    def scores(self, images: Tensor) -> Tensor:
        """Class scores (B, C, h_p, w_p) of [0, 1] images (B, 3, H, W): cosine with each class's best name, or
        (`softmax`) its softmax over classes at `logit_scale`."""
        pixels = self.pixel_values(images)
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        cosine = self.dense_features(pixels) @ self.text_embeddings().T  # (B, N, S)
        index = self.name_class.to(cosine.device).expand_as(cosine)
        per_class = torch.full(
            (*cosine.shape[:2], self.num_classes), float("-inf"), device=cosine.device
        ).scatter_reduce(-1, index, cosine, reduce="amax")  # (B, N, C)
        if self.softmax:
            per_class = (self.logit_scale * per_class).softmax(-1)
        return per_class.transpose(1, 2).reshape(len(images), self.num_classes, h, w)

    def record(self) -> dict[str, object]:
        """What `<key>.json` and `id2label.json` say about this classifier."""
        return {
            "classifier": "clip",
            "model": self.model_name,
            "resolution": self.resolution,
            "templates": len(self.templates),
            "softmax": self.softmax,
            "logit_scale": self.logit_scale,
        }


__all__ = [
    "CLIPClassifier",
    "DEFAULT_CLIP",
    "IMAGENET_TEMPLATES",
    "clip_input_size",
    "load_clip",
]
