"""Per-sample error isolation of ``predict_step``: one input the model cannot segment must not end the run.

A model's ``predict_step`` runs its batch step through :class:`SampleErrorIsolation` (``EmerDiffSegmenter`` does):
a batch that raises is retried image by image, an image that still raises becomes a failure record, and the
images that succeed are joined into one output with every field a whole batch would have had.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# the per-sample entries of a DataModule batch and of a predict_step output (docs/interfaces.md); the other
# entries are about the batch as a whole
SAMPLE_FIELDS = ("image", "original", "original_bytes", "original_size", "key", "url", "source_key", "coarse")
SAMPLE_OUTPUTS = ("key", "url", "original", "original_size", "labels", "lowres_labels", "mask_embeddings")

Step = Callable[[dict[str, Any], int], dict[str, Any]]  # (batch, batch_idx) -> output


def sample_batch(batch: dict[str, Any], i: int) -> dict[str, Any]:
    """Sample ``i`` of a DataModule batch as a batch of one (the batch's failures stay with the batch)."""
    out = {**batch, "failures": []}
    for name in SAMPLE_FIELDS:
        if name in batch:
            out[name] = batch[name][i : i + 1]
    return out


def join_outputs(parts: list[dict[str, Any]], failures: list[dict[str, Any]]) -> dict[str, Any]:
    """The outputs of single-sample batches as one batch output: per-sample entries concatenated, seconds and
    per-stage timings summed, the other batch-wide entries (``model_size``) kept; ``failures`` replaced."""
    if not parts:
        return {"key": [], "url": [], "failures": failures, "seconds": 0.0}
    out: dict[str, Any] = {}
    for name in parts[0]:
        values = [part[name] for part in parts]
        if name == "failures":
            continue
        if name in SAMPLE_OUTPUTS and isinstance(values[0], torch.Tensor):
            out[name] = torch.cat(values)
        elif name in SAMPLE_OUTPUTS:
            out[name] = [v for value in values for v in value]
        elif name == "seconds":
            out[name] = sum(float(v) for v in values)
        elif name == "timings":
            out[name] = {stage: sum(float(t.get(stage, 0.0)) for t in values) for stage in values[0]}
        elif all(v == values[0] for v in values):
            out[name] = values[0]
        else:
            raise ValueError(
                f"predict_step output {name!r} differs between the images of one batch: {values}"
            )
    out["failures"] = failures
    return out


class SampleErrorIsolation:
    """Runs a batch step; a batch that raises is retried image by image and an image that still raises is
    recorded as a failure, so one bad input does not end the run (or every rerun).

    Out-of-memory errors and interrupts are raised as they come, in the batch and in the retry (the device, not
    the input, is at fault), and so is the error of the ``max_failed_batches``-th batch in a row in which every
    image failed (a broken device, not a bad input); a batch in which some image succeeds resets that count.
    """

    def __init__(self, step: Step, max_failed_batches: int = 3):
        self.step = step
        self.max_failed_batches = max_failed_batches
        self.failed_batches = 0

    def __call__(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        try:
            out = self.step(batch, batch_idx)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            if not batch.get("key"):
                raise
            return self._one_by_one(batch, batch_idx, err)
        self.failed_batches = 0
        return out

    def _one_by_one(self, batch: dict[str, Any], batch_idx: int, error: Exception) -> dict[str, Any]:
        parts, failures = [], list(batch.get("failures", []))
        for i, (key, url) in enumerate(zip(batch["key"], batch["url"], strict=True)):
            try:
                parts.append(self.step(sample_batch(batch, i), batch_idx))
            except torch.OutOfMemoryError:
                raise
            except Exception as err:
                reason = f"segmentation failed ({type(err).__name__}: {err})"
                failures.append({"key": key, "url": url, "reason": reason, "kind": "sample"})
        self.failed_batches = 0 if parts else self.failed_batches + 1
        if self.failed_batches >= self.max_failed_batches:
            raise error
        return join_outputs(parts, failures)


__all__ = ["SAMPLE_FIELDS", "SAMPLE_OUTPUTS", "SampleErrorIsolation", "join_outputs", "sample_batch"]
