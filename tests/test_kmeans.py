import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from emerdiff_pl.kmeans import batched_kmeans, canonical_order, relabel


def _blobs(batch: int, n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(batch, 5, dim, generator=g) * 4
    assign = torch.randint(0, 5, (batch, n), generator=g)
    return centers.gather(1, assign[..., None].expand(-1, -1, dim)) + torch.randn(batch, n, dim, generator=g)


def test_lloyd_agrees_with_sklearn_from_the_same_centers():
    x = _blobs(3, 300, 8)
    init = x[:, :6].clone()
    ours = batched_kmeans(x, 6, init=init, max_iter=300)
    for b in range(3):
        ref = KMeans(6, init=init[b].double().numpy(), n_init=1, tol=0.0, algorithm="lloyd", max_iter=300)
        ref.fit(x[b].double().numpy())
        np.testing.assert_array_equal(ours.labels[b].numpy(), ref.labels_)
        np.testing.assert_allclose(ours.centroids[b].numpy(), ref.cluster_centers_, atol=1e-4)
        assert ours.inertia[b].item() == pytest.approx(ref.inertia_, rel=1e-4)


def test_no_empty_clusters_on_duplicated_points():
    x = torch.zeros(2, 12, 3)
    x[:, 6:] = 1.0  # two distinct points, each six times
    result = batched_kmeans(x, 5, n_init=3, seeds=[1, 2])
    counts = torch.nn.functional.one_hot(result.labels, 5).sum(1)
    assert bool((counts > 0).all())
    assert torch.isfinite(result.centroids).all()
    # every centroid sits on one of the two points
    assert bool(((result.centroids == 0).all(-1) | (result.centroids == 1).all(-1)).all())


def test_seeded_runs_are_identical_and_independent_of_the_batch():
    x = _blobs(4, 200, 16, seed=3)
    a = batched_kmeans(x, 7, n_init=4, seeds=[10, 11, 12, 13])
    b = batched_kmeans(x, 7, n_init=4, seeds=[10, 11, 12, 13])
    alone = batched_kmeans(x[2:3], 7, n_init=4, seeds=[12])
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.labels[2], alone.labels[0])


def test_restarts_keep_the_lowest_inertia():
    # restart 0 of n_init=8 is the n_init=1 run with the same seed, so the best of 8 can only be lower
    x = _blobs(6, 250, 4, seed=5)
    seeds = list(range(6))
    single = batched_kmeans(x, 8, n_init=1, seeds=seeds).inertia
    best = batched_kmeans(x, 8, n_init=8, seeds=seeds).inertia
    assert torch.all(best <= single + 1e-4)
    assert torch.any(best < single - 1e-3)


def test_more_clusters_than_points_is_a_clear_error():
    with pytest.raises(ValueError, match="k=9 clusters needs"):
        batched_kmeans(torch.randn(1, 8, 2), 9)


def test_canonical_order_numbers_clusters_by_first_occurrence():
    labels = torch.tensor([[3, 3, 1, 0, 1, 2], [0, 2, 2, 1, 3, 0]])
    perm = canonical_order(labels, 4)
    assert relabel(labels, perm).tolist() == [[0, 0, 1, 2, 1, 3], [0, 1, 1, 2, 3, 0]]
    centroids = torch.arange(4.0)[None, :, None].expand(2, 4, 1)
    assert centroids.gather(1, perm[..., None]).squeeze(-1).tolist() == [[3, 1, 0, 2], [0, 2, 1, 3]]
