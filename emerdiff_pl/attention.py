"""Attention control for EmerDiff: record the reference run, inject it into the branches, modulate one layer.

Modelled on diffusers' attention processors (one callable per attention layer, installed with
`unet.set_attn_processor`) and on prompt-to-prompt's controller (one object owns the run's state; every processor
consults it). `AttentionController` has two modes, each a context manager that installs its processors on entry
and puts the U-Net's own processors back on exit (docs/method.md §4–§5):

    with controller.reference(unet, backend, record="qk", feature_timestep=t_f):   # the unmodified run
        with controller.steps([0, 1], [t_0, t_1]):    # one U-Net call over two steps' latents, step-major
            unet(...)
    with controller.branches(unet, backend, rows, modulation, modulation_timestep=t_m):   # the branch rows
        with controller.steps([s], [t]):              # one call per step; ±λ·M only where t == t_m
            unet(...)

What the reference run leaves for the branches is typed: `QueryKey` (self-attention), `CrossOutput`
(cross-attention over the fixed text embedding), `Probabilities` (explicit maps, the naive path). Only the
attention layers of SD's transformer blocks (3-D hidden states, no mask) are supported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

log = logging.getLogger(__name__)

Backend = Literal["sdpa", "xformers"]
RecordKind = Literal["none", "qk", "probs"]


@dataclass(frozen=True)
class QueryKey:
    """A self-attention layer's reference Q and K (B, H, N, d): a branch attends with them over its own V."""

    query: Tensor
    key: Tensor


@dataclass(frozen=True)
class CrossOutput:
    """A cross-attention layer's reference output (B, N, C): its K and V come from the fixed text embedding, so
    with the reference probabilities a branch gets exactly this output."""

    output: Tensor


@dataclass(frozen=True)
class Probabilities:
    """Explicit reference probabilities softmax(QKᵀ/√d) (B, H, N, M) of any layer (the naive path)."""

    probs: Tensor


LayerRecord = QueryKey | CrossOutput | Probabilities


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


class AttentionController:
    """The state every processor of one U-Net consults, and the two modes that set it.

    `saved[step][layer]` holds the reference records, `features[t]` the feature layer's query vectors (B, N, C)
    of the call at timestep t (only t = `feature_timestep` is kept), `tokens[layer]` each layer's number of
    spatial tokens. In `branches` mode, `rows[i]` is the reference image of branch row i. No processor reads
    the step or the timestep: the controller resolves them between calls into tensors (the step's records, the
    modulation or zeros), so a compiled U-Net runs every step with one graph instead of compiling one per step.
    """

    def __init__(self, feature_layer: str, modulated_layer: str):
        self.feature_layer = feature_layer
        self.modulated_layer = modulated_layer
        self.mode: Literal["idle", "reference", "branches"] = "idle"
        self.saved: dict[int, dict[str, LayerRecord]] = {}
        self.features: dict[int, Tensor] = {}
        self.tokens: dict[str, int] = {}
        # reference mode
        self.record: RecordKind = "none"
        self.feature_timestep: int | None = None
        self.call_record: RecordKind = "none"  # what the call being run records
        # branches mode
        self.rows: Tensor | None = None
        self.modulation: Tensor | None = None  # (rows, N): c·M_i of each row, added to every channel at t_m
        self.modulation_timestep: int | None = None
        # the call being run (set by `steps`)
        self.current: dict[str, LayerRecord] = {}
        self.current_features: Tensor | None = None
        self.step_modulation: Tensor | None = (
            None  # what this call adds: `modulation` at t_m, zeros elsewhere
        )
        self.wants_features = False
        self._call: tuple[list[int], list[int]] | None = None

    # ------------------------------------------------------------------ modes
    @contextmanager
    def reference(
        self,
        unet: nn.Module,
        backend: Backend,
        record: RecordKind = "qk",
        feature_timestep: int | None = None,
    ) -> Iterator[AttentionController]:
        """Record the unmodified run: `qk` — self-attention Q, K and cross-attention outputs; `probs` — explicit
        maps; `none`. The feature layer's queries are kept for the call at `feature_timestep`. Starts afresh."""
        if record not in ("none", "qk", "probs"):
            raise ValueError(f"record must be none, qk or probs, got {record!r}")
        self.clear()
        self.record, self.feature_timestep = record, feature_timestep
        with self._mode("reference", unet, backend, PlainProcessor, modulate=False):
            yield self

    @contextmanager
    def branches(
        self,
        unet: nn.Module,
        backend: Backend,
        rows: Tensor,
        modulation: Tensor | None,
        modulation_timestep: int,
        inject: bool = True,
    ) -> Iterator[AttentionController]:
        """Run branch rows (`rows[i]` = reference image of row i): with `inject` every layer reuses the reference
        records of the same step; the modulated layer adds `modulation` (rows, N) at the call whose timestep is
        `modulation_timestep`, nothing at any other call. The records stay (`clear` frees them)."""
        if modulation is not None and modulation.shape[0] != rows.shape[0]:
            raise ValueError(f"modulation has {modulation.shape[0]} rows, rows has {rows.shape[0]}")
        self.rows, self.modulation, self.modulation_timestep = rows, modulation, modulation_timestep
        kind = InjectProcessor if inject else PlainProcessor
        try:
            with self._mode("branches", unet, backend, kind, modulate=True):
                yield self
        finally:
            self.rows = self.modulation = self.modulation_timestep = None

    @contextmanager
    def steps(
        self, steps: list[int], timesteps: list[int], record: RecordKind | None = None
    ) -> Iterator[AttentionController]:
        """One U-Net call: in reference mode over several steps (rows step-major, the same images in each),
        whose records (`record`, default the mode's) are filed under saved[step] on exit; in branches mode over
        one step."""
        if self.mode == "idle":
            raise RuntimeError("AttentionController.steps outside a reference() or branches() block")
        if len(steps) != len(timesteps) or not steps:
            raise ValueError(f"steps {steps} and timesteps {timesteps} must be non-empty and match")
        if self.mode == "branches":
            if len(steps) != 1:
                raise ValueError("a branch call runs one step")
            self.current = self.saved.get(steps[0], {})
            self.step_modulation = self.modulation
            if self.modulation is not None and timesteps[0] != self.modulation_timestep:
                # adding zeros, not skipping the add, keeps one graph for every step of a compiled U-Net
                self.step_modulation = torch.zeros_like(self.modulation)
        else:
            self.current, self.call_record = {}, self.record if record is None else record
            # every call of the pass reads the feature layer's queries, only t_f's are filed: a compiled U-Net
            # keeps one graph for the calls with t_f and those without
            self.wants_features = self.feature_timestep is not None
        self._call = (steps, timesteps)
        try:
            yield self
            if self.mode == "reference":
                self._file()
        finally:
            self.current, self.current_features, self.step_modulation = {}, None, None
            self.wants_features, self._call, self.call_record = False, None, "none"

    def step(self, step: int, timestep: int, record: RecordKind | None = None):
        """`steps([step], [timestep], record)`: one step per U-Net call."""
        return self.steps([step], [timestep], record)

    def clear(self) -> None:
        """Drop every record (the reference run's tensors are large)."""
        self.saved, self.features, self.current = {}, {}, {}
        self.current_features = None

    def narrow_rows(self, index: Tensor) -> Tensor | None:
        """While some module runs on a subset of the rows (emerdiff_pl.prefix): rows := rows[index]; returns the
        rows to give back to `restore_rows`."""
        saved = self.rows
        if saved is not None:
            self.rows = saved[index]
        return saved

    def restore_rows(self, rows: Tensor | None) -> None:
        self.rows = rows

    # ------------------------------------------------------------------ internals
    @contextmanager
    def _mode(self, mode, unet: nn.Module, backend: Backend, kind: type, modulate: bool) -> Iterator[None]:
        if self.mode != "idle":
            raise RuntimeError(f"AttentionController is already in {self.mode} mode")
        previous = unet.attn_processors
        procs: dict[str, object] = {}
        for name in attention_layer_names(unet):
            self.tokens.setdefault(name, 0)  # fixed keys: a compiled U-Net sees the same dict on every call
            proc = kind(name, self, backend)
            procs[f"{name}.processor"] = (
                ModulateProcessor(proc) if modulate and name == self.modulated_layer else proc
            )
        unet.set_attn_processor(procs)
        self.mode = mode
        try:
            yield
        finally:
            self.mode = "idle"
            unet.set_attn_processor(previous)

    def _file(self) -> None:
        steps, timesteps = self._call
        n = len(steps)
        for name, record in self.current.items():
            fields = {k: v.unflatten(0, (n, -1)) for k, v in vars(record).items()}
            for i, step in enumerate(steps):
                self.saved.setdefault(step, {})[name] = type(record)(**{k: v[i] for k, v in fields.items()})
        if self.current_features is not None and self.feature_timestep in timesteps:
            per_step = self.current_features.unflatten(0, (n, -1))
            self.features[self.feature_timestep] = per_step[timesteps.index(self.feature_timestep)]


class _Processor:
    """Shared projection and output code of the processors (diffusers' AttnProcessor2_0, unrolled)."""

    def __init__(self, name: str, controller: AttentionController, backend: Backend):
        self.name, self.controller, self.backend = name, controller, backend

    def check(self, attention_mask: Tensor | None) -> None:
        """Refuse a mask: the recorded maps and the cached cross-attention outputs assume unmasked attention."""
        if attention_mask is not None:
            raise NotImplementedError(
                f"{self.name}: an attention_mask was passed; EmerDiff's processors run unmasked attention only"
            )

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


class PlainProcessor(_Processor):
    """Plain attention; in reference mode it records what the branches will reuse (the call's `record`)
    and, at the feature layer, the query vectors of the call at t_f."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        self.check(attention_mask)
        ctl = self.controller
        ctl.tokens[self.name] = hidden_states.shape[1]
        features, q, k, v = self.project(attn, hidden_states, encoder_hidden_states)
        recording = ctl.mode == "reference"
        if recording and ctl.wants_features and self.name == ctl.feature_layer:
            ctl.current_features = features.float()
        if recording and ctl.call_record == "probs":
            probs = attention_probs(q, k)
            ctl.current[self.name] = Probabilities(probs)
            return self.output(attn, probs @ v, hidden_states)
        out = self.output(attn, attention(q, k, v, self.backend), hidden_states)
        if recording and ctl.call_record == "qk":
            ctl.current[self.name] = CrossOutput(out) if encoder_hidden_states is not None else QueryKey(q, k)
        return out


class InjectProcessor(_Processor):
    """Attention of a branch with the reference run's probabilities at the same layer and step (docs/method.md
    §5): softmax(Q_ref K_refᵀ/√d)·V_branch; a recorded cross-attention output is returned outright."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        self.check(attention_mask)
        ctl = self.controller
        record, rows = ctl.current.get(self.name), ctl.rows
        if isinstance(record, CrossOutput):
            return record.output[rows]
        if isinstance(record, Probabilities):
            _, _, _, v = self.project(attn, hidden_states, encoder_hidden_states)
            return self.output(attn, record.probs[rows] @ v, hidden_states)
        if isinstance(record, QueryKey):
            value = attn.to_v(hidden_states)
            v = value.view(value.shape[0], -1, attn.heads, value.shape[-1] // attn.heads).transpose(1, 2)
            return self.output(
                attn, attention(record.query[rows], record.key[rows], v, self.backend), hidden_states
            )
        raise RuntimeError(
            f"{self.name}: no reference record for this step; run reference(record='qk' or 'probs') first"
        )


class ModulateProcessor:
    """Wraps the modulated layer's processor: adds the controller's `step_modulation` (c·M_i per row at the t_m
    call, zeros at every other call) to every channel of the layer's output."""

    def __init__(self, inner: _Processor):
        self.inner = inner

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        added = self.inner.controller.step_modulation
        if added is not None:
            out = out + added.unsqueeze(-1).to(out.dtype)
        return out


def attention_layer_names(unet: nn.Module) -> list[str]:
    """Names of every attention layer of the U-Net (without the `.processor` suffix)."""
    return [name.removesuffix(".processor") for name in unet.attn_processors]


def check_layer(unet: nn.Module, name: str, what: str) -> None:
    """Raise, listing the valid names, when `name` is not an attention layer of `unet`."""
    names = attention_layer_names(unet)
    if name not in names:
        raise ValueError(f"{what} {name!r} is not an attention layer of this U-Net; valid names: {names}")


__all__ = [
    "AttentionController",
    "CrossOutput",
    "InjectProcessor",
    "LayerRecord",
    "ModulateProcessor",
    "PlainProcessor",
    "Probabilities",
    "QueryKey",
    "attention",
    "attention_layer_names",
    "attention_probs",
    "check_layer",
    "resolve_backend",
]
