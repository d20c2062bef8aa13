"""benchmarks/toyworld/frontier.py's bookkeeping: the Pareto set, the matched agreement, the points' settings."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "toyworld"))
frontier = pytest.importorskip("frontier")


def test_pareto_keeps_exactly_the_undominated_points():
    points = {"a": (1.0, 40.0), "b": (4.0, 39.5), "c": (3.0, 39.0), "d": (4.0, 39.5), "e": (10.0, 20.0)}
    # c is dominated by b (faster and better); b and d tie (neither dominates the other)
    assert frontier.pareto(points) == {"a", "b", "d", "e"}
    assert frontier.pareto({"only": (1.0, 1.0)}) == {"only"}


def test_matched_agreement_is_invariant_to_renaming_ids():
    rng = np.random.default_rng(0)
    a = [rng.integers(0, 4, size=(8, 8)) for _ in range(3)]
    perm = np.array([2, 0, 3, 1])
    assert frontier.matched_agreement(a, [perm[x] for x in a], 4) == 1.0
    b = [x.copy() for x in a]
    b[0][:2] = (b[0][:2] + 1) % 4  # 16 of 192 pixels changed
    assert frontier.matched_agreement(a, b, 4) == pytest.approx(1 - 16 / 192)


def test_every_point_builds_valid_segmenter_settings():
    from emerdiff_pl import EmerDiffSegmenter

    for name in frontier.POINTS:
        base, model_args, refine_args, refiner = frontier.point_args(name)
        EmerDiffSegmenter(
            pretrained="tiny-random",
            method=base,
            refine=refiner,
            **model_args,
            **{f"refine_{k}": v for k, v in refine_args.items()},
        )  # raises on a bad name or value
    assert frontier.point_args("default")[1] == {
        k: v for k, v in frontier.evaluate.DEFAULT_MODEL_ARGS.items() if not k.startswith("refine_")
    }
