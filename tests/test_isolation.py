"""SampleErrorIsolation, the per-sample error isolation of predict_step: what is retried, what is a failure, what
stops the run, and what a joined output holds (no model, no Lightning: a stubbed batch step)."""

import pytest
import torch

from emerdiff_pl.isolation import SampleErrorIsolation, join_outputs, sample_batch


def _batch(*keys: str) -> dict:
    n = len(keys)
    return {
        "image": torch.zeros(n, 3, 8, 8),
        "original": [None] * n,
        "original_bytes": [None] * n,
        "original_size": torch.tensor([[8, 8 + i] for i in range(n)]).reshape(-1, 2),
        "key": list(keys),
        "source_key": list(keys),
        "url": [f"in.tar#{k}" for k in keys],
        "failures": [{"key": "unreadable", "url": "in.tar", "reason": "decode", "kind": "sample"}],
        "skipped": 0,
        "skipped_failed": 0,
    }


class _Step:
    """A batch step that raises for batches holding a `bad` key (`error` decides what), else labels them."""

    def __init__(self, bad: set[str], error: type[BaseException] = RuntimeError):
        self.bad, self.error, self.calls = bad, error, []

    def __call__(self, batch: dict, batch_idx: int = 0) -> dict:
        self.calls.append(list(batch["key"]))
        if self.bad & set(batch["key"]):
            raise self.error(f"cannot segment {sorted(self.bad & set(batch['key']))}")
        n = len(batch["key"])
        return {
            "key": list(batch["key"]),
            "url": list(batch["url"]),
            "original": list(batch["original"]),
            "original_size": batch["original_size"].tolist(),
            "labels": [torch.zeros(*hw, dtype=torch.long) for hw in batch["original_size"].tolist()],
            "lowres_labels": torch.zeros(n, 2, 2, dtype=torch.long),
            "mask_embeddings": torch.zeros(n, 4, 3),
            "model_size": [8, 8],
            "failures": list(batch["failures"]),
            "seconds": 0.5,
            "timings": {"reference_s": 0.25, "assign_s": 0.25},
        }


def test_a_failing_image_is_recorded_and_its_batch_mates_labelled_with_every_field():
    step = _Step(bad={"b"})
    whole = _Step(bad=set())(_batch("a", "b", "c"))
    out = SampleErrorIsolation(step)(_batch("a", "b", "c"))
    assert step.calls == [["a", "b", "c"], ["a"], ["b"], ["c"]]
    assert out.keys() == whole.keys()  # model_size and timings included: the json of a retried image is whole
    assert out["key"] == ["a", "c"] and out["original_size"] == [[8, 8], [8, 10]]
    assert [tuple(labels.shape) for labels in out["labels"]] == [(8, 8), (8, 10)]
    assert out["lowres_labels"].shape == (2, 2, 2) and out["mask_embeddings"].shape == (2, 4, 3)
    assert out["model_size"] == [8, 8] and out["seconds"] == 1.0
    assert out["timings"] == {"reference_s": 0.5, "assign_s": 0.5}
    assert [f["key"] for f in out["failures"]] == ["unreadable", "b"]  # the batch's own failures, once
    assert "segmentation failed (RuntimeError: cannot segment ['b'])" in out["failures"][1]["reason"]


def test_batches_where_some_image_succeeds_do_not_count_toward_the_stop():
    isolation = SampleErrorIsolation(_Step(bad={"x", "y", "bad"}))
    isolation(_batch("x"))
    isolation(_batch("y"))
    out = isolation(_batch("ok", "bad"))  # two all-failed batches, then one where an image succeeds ...
    assert out["key"] == ["ok"] and isolation.failed_batches == 0  # ... neither counts nor keeps the count
    isolation(_batch("x"))
    isolation(_batch("y"))  # so two more all-failed batches are not yet three in a row
    assert isolation.failed_batches == 2


def test_three_batches_in_a_row_with_every_image_failing_stop_the_run():
    isolation = SampleErrorIsolation(_Step(bad={"a", "b", "c"}))
    isolation(_batch("a"))
    isolation(_batch("b"))
    with pytest.raises(RuntimeError, match=r"cannot segment \['c'\]"):
        isolation(_batch("c"))


@pytest.mark.parametrize("where", ["batch", "retry"])
def test_out_of_memory_is_raised_not_recorded_as_a_sample_failure(where: str):
    class OutOfMemoryInRetry(_Step):
        def __call__(self, batch: dict, batch_idx: int = 0) -> dict:
            if len(batch["key"]) == 1 and batch["key"] == ["b"]:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().__call__(batch, batch_idx)

    step = OutOfMemoryInRetry(bad={"b"}) if where == "retry" else _Step({"b"}, torch.OutOfMemoryError)
    with pytest.raises(torch.OutOfMemoryError, match="simulated|cannot segment"):
        SampleErrorIsolation(step)(_batch("a", "b", "c"))
    assert step.calls[-1] == (["a"] if where == "retry" else ["a", "b", "c"])  # nothing after the OOM


def test_interrupts_and_batches_without_images_are_not_retried():
    step = _Step(bad={"a"}, error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        SampleErrorIsolation(step)(_batch("a", "b"))
    assert step.calls == [["a", "b"]]
    broken = {**_batch(), "key": []}
    with pytest.raises(KeyError):
        SampleErrorIsolation(lambda batch, batch_idx: batch["no such field"])(broken)


def test_sample_batch_cuts_every_per_sample_field():
    one = sample_batch(_batch("a", "b"), 1)
    assert one["key"] == ["b"] and one["url"] == ["in.tar#b"] and one["source_key"] == ["b"]
    assert one["image"].shape == (1, 3, 8, 8) and one["original_size"].tolist() == [[8, 9]]
    assert one["original"] == [None] and one["failures"] == [] and one["skipped"] == 0


def test_join_refuses_batch_values_that_differ():
    step = _Step(bad=set())
    parts = [step(sample_batch(_batch("a", "b"), i)) for i in range(2)]
    parts[1]["model_size"] = [16, 16]
    with pytest.raises(ValueError, match="model_size"):
        join_outputs(parts, [])
