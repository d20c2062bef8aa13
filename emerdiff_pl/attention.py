"""Attention processors for EmerDiff: capture the reference run, inject it into the branches, modulate one layer.

One processor class per behaviour, installed with `unet.set_attn_processor(...)`; the state they share (current
step, which reference image each branch row belongs to, the modulation, the recorded tensors) lives on an
`AttentionStore`. Only the attention layers of SD's transformer blocks (3-D hidden states) are supported.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor

log = logging.getLogger(__name__)

Backend = Literal["sdpa", "xformers"]
Record = Literal["none", "qk", "probs"]
FEATURES = "features"  # key of the feature layer's query vectors (B, N, C) in a step's record


def attention(query: Tensor, key: Tensor, value: Tensor, backend: Backend) -> Tensor:
    """softmax(QKᵀ/√d)·V for (B, H, N, d) tensors with the chosen kernel."""
    if backend == "xformers":
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(
            query.transpose(1, 2).contiguous(),
            key.transpose(1, 2).contiguous(),
            value.transpose(1, 2).contiguous(),
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value)


def attention_probs(query: Tensor, key: Tensor) -> Tensor:
    """The explicit (B, H, N, M) probability map; the naive reference path keeps these."""
    scale = query.shape[-1] ** -0.5
    return torch.softmax((query.float() @ key.float().transpose(-1, -2)) * scale, dim=-1).to(query.dtype)


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """`sdpa`, or `xformers` when a probe call on `device` succeeds; `auto` falls back to sdpa silently."""
    if requested not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"attention_backend must be auto, sdpa or xformers, got {requested!r}")
    if requested == "sdpa":
        return "sdpa"
    try:
        probe = torch.zeros(1, 1, 8, 64, device=device, dtype=dtype)
        attention(probe, probe, probe, "xformers")
        return "xformers"
    except Exception as err:  # ImportError, NotImplementedError on CPU, missing kernels for this GPU/dtype…
        if requested == "xformers":
            raise RuntimeError(
                f"attention_backend=xformers but xformers cannot run on {device} in {dtype}: {err}. "
                "Use attention_backend=auto or sdpa."
            ) from err
        log.info("xformers probe failed on %s (%s); using PyTorch SDPA", device, err.__class__.__name__)
        return "sdpa"


class AttentionStore:
    """State shared by the processors of one U-Net: the branch rows, the modulation, the records.

    Reference tensors are kept per step and layer in `saved`; `rows[i]` is the reference image of branch
    row i. `begin_step(s)` points the processors at step s before each U-Net call; no processor reads the
    step number, so a compiled U-Net runs every step with one graph instead of compiling one per step.
    """

    def __init__(self, feature_layer: str, modulated_layer: str):
        self.feature_layer = feature_layer
        self.modulated_layer = modulated_layer
        self.record: Record = "none"
        self.read_features = False  # also record the feature layer's queries (as FEATURES), every step
        self.saved: dict[int, dict[str, tuple[Tensor, ...]]] = {}  # step → layer → recorded tensors
        self.current: dict[str, tuple[Tensor, ...]] = {}  # saved[step] of the step being run
        self.rows: Tensor | None = None
        self.modulation: Tensor | None = None  # (rows, N), added to every channel at step 0
        self.step_modulation: Tensor | None = None  # what this call adds: `modulation` at step 0, zeros after
        self.tokens: dict[str, int] = {}  # layer → number of spatial tokens, seen by the last capture
        self._steps: list[int] = []  # the steps of a batched recording (begin_steps)

    def begin_step(self, step: int) -> None:
        """Point the processors at `step`; set `rows` and `modulation` first."""
        self.current = self.saved.setdefault(step, {})
        self.step_modulation = self.modulation
        if self.modulation is not None and step != 0:  # adding zeros keeps one graph for every step
            self.step_modulation = torch.zeros_like(self.modulation)

    def begin_steps(self, steps: list[int]) -> None:
        """Record several steps run as one batch (rows step-major, the same images in each); `end_steps` files
        each step's share of the records under saved[step]."""
        self.current, self.step_modulation, self._steps = {}, None, steps

    def end_steps(self) -> None:
        n = len(self._steps)
        for name, tensors in self.current.items():
            for i, step in enumerate(self._steps):
                self.saved.setdefault(step, {})[name] = tuple(t.unflatten(0, (n, -1))[i] for t in tensors)
        self.current = {}

    def clear(self) -> None:
        self.saved.clear()
        self.current = {}
        self.read_features = False
        self.rows = self.modulation = self.step_modulation = None


class _Processor:
    def __init__(self, name: str, store: AttentionStore, backend: Backend):
        self.name, self.store, self.backend = name, store, backend

    def project(
        self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(query features (B, N, C), q, k, v as (B, H, N, d))."""
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError(
                f"{self.name}: only transformer-block attention (3-D, no group norm) is supported"
            )
        features = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch, heads = hidden_states.shape[0], attn.heads
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // heads
        q, k, v = (t.view(t.shape[0], -1, heads, head_dim).transpose(1, 2) for t in (features, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if k.shape[0] != batch:
            k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        return features, q, k, v

    @staticmethod
    def output(attn: Attention, heads_out: Tensor, residual: Tensor) -> Tensor:
        out = heads_out.transpose(1, 2).flatten(2).to(residual.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1:  # SD's is 1: skip a pass over the output
            out = out / attn.rescale_output_factor
        return out


class CaptureProcessor(_Processor):
    """Plain attention that records what the branches will reuse (store.record):
    `qk` — self-attention Q, K and cross-attention outputs; `probs` — explicit probability maps; `none`.
    With `store.read_features` the feature layer also records its query vectors."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        store = self.store
        store.tokens[self.name] = hidden_states.shape[1]
        features, q, k, v = self.project(attn, hidden_states, encoder_hidden_states)
        if store.read_features and self.name == store.feature_layer:
            store.current[FEATURES] = (features.float(),)
        if store.record == "probs":
            probs = attention_probs(q, k)
            store.current[self.name] = (probs,)
            return self.output(attn, probs @ v, hidden_states)
        out = self.output(attn, attention(q, k, v, self.backend), hidden_states)
        if store.record == "qk":
            store.current[self.name] = (out,) if encoder_hidden_states is not None else (q, k)
        return out


class InjectProcessor(_Processor):
    """Attention of a branch with the reference run's probabilities at the same layer and step (SPEC §1.5).

    From recorded Q, K: softmax(Q_ref K_refᵀ/√d)·V_branch. A cross-attention layer's K, V come from the fixed
    text embedding, so its output is the recorded reference output, returned outright."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        store = self.store
        saved = store.current[self.name]
        rows = store.rows
        if len(saved) == 1 and saved[0].ndim == 3:  # recorded cross-attention output
            return saved[0][rows]
        if len(saved) == 1:  # explicit probabilities (naive path)
            _, _, _, v = self.project(attn, hidden_states, encoder_hidden_states)
            return self.output(attn, saved[0][rows] @ v, hidden_states)
        q_ref, k_ref = saved
        value = attn.to_v(hidden_states)
        v = value.view(value.shape[0], -1, attn.heads, value.shape[-1] // attn.heads).transpose(1, 2)
        return self.output(attn, attention(q_ref[rows], k_ref[rows], v, self.backend), hidden_states)


class ModulateProcessor:
    """Wraps the processor of the modulated layer: adds store.modulation (c·M_i per row) at step 0 only."""

    def __init__(self, inner: _Processor):
        self.inner = inner

    def __call__(self, attn: Attention, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        out = self.inner(attn, hidden_states, *args, **kwargs)
        store = self.inner.store
        if store.step_modulation is not None:
            out = out + store.step_modulation.unsqueeze(-1).to(out.dtype)
        return out


def attention_layer_names(unet: torch.nn.Module) -> list[str]:
    """Names of every attention layer of the U-Net (without the `.processor` suffix)."""
    return [name.removesuffix(".processor") for name in unet.attn_processors]


def check_layer(unet: torch.nn.Module, name: str, what: str) -> None:
    names = attention_layer_names(unet)
    if name not in names:
        raise ValueError(f"{what} {name!r} is not an attention layer of this U-Net; valid names: {names}")


def install(
    unet: torch.nn.Module, store: AttentionStore, backend: Backend, kind: type[_Processor], modulate: bool
) -> None:
    """Set `kind` processors on every attention layer; wrap the modulated layer when `modulate`."""
    procs: dict[str, object] = {}
    for name in attention_layer_names(unet):
        store.tokens.setdefault(name, 0)  # fixed keys: a compiled U-Net sees the same dict on every call
        proc = kind(name, store, backend)
        procs[f"{name}.processor"] = (
            ModulateProcessor(proc) if modulate and name == store.modulated_layer else proc
        )
    unet.set_attn_processor(procs)


__all__ = [
    "FEATURES",
    "AttentionStore",
    "CaptureProcessor",
    "InjectProcessor",
    "ModulateProcessor",
    "attention",
    "attention_probs",
    "attention_layer_names",
    "check_layer",
    "install",
    "resolve_backend",
]
