"""Batched, seeded k-means in torch.

Many small problems at once (one per image: 256 query vectors at 512²), on the device that holds the features.
Written here rather than taken from scikit-learn because it must run batched on the GPU, seed each problem from
its own generator (so a result never depends on the batch it was in), use deterministic updates (one-hot matmul
instead of atomics) and never return an empty or NaN cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KMeansResult:
    labels: Tensor  # (B, N) int64, values in [0, k)
    centroids: Tensor  # (B, k, D) float32
    inertia: Tensor  # (B,) float32, weighted sum of squared distances to the assigned centroid


def squared_distances(x: Tensor, centroids: Tensor) -> Tensor:
    """(B, N, D) × (B, k, D) → (B, N, k) squared Euclidean distances, clamped at 0."""
    x_sq = (x * x).sum(-1, keepdim=True)  # (B, N, 1)
    c_sq = (centroids * centroids).sum(-1).unsqueeze(1)  # (B, 1, k)
    return (x_sq - 2.0 * x @ centroids.transpose(1, 2) + c_sq).clamp_min_(0.0)


def kmeans_plus_plus(x: Tensor, weights: Tensor, k: int, uniforms: Tensor) -> Tensor:
    """k-means++ seeding for B problems; `uniforms` (B, k) in [0, 1) are the only randomness used.

    Each centre is drawn by inverse-CDF sampling with probability ∝ weight · D², D the distance to the
    nearest centre chosen so far (∝ weight for the first centre, or when every point already coincides with a centre).
    """
    batch, n, _ = x.shape
    rows = torch.arange(batch, device=x.device)
    min_d2 = torch.ones(batch, n, dtype=torch.float64, device=x.device)
    centers = []
    for j in range(k):
        mass = weights.double() * min_d2
        degenerate = mass.sum(-1, keepdim=True) <= 0
        mass = torch.where(degenerate, weights.double(), mass)
        cdf = mass.cumsum(-1)
        target = uniforms[:, j : j + 1].double().to(x.device) * cdf[:, -1:]
        index = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(n - 1)
        center = x[rows, index]  # (B, D)
        centers.append(center)
        d2 = squared_distances(x, center.unsqueeze(1)).squeeze(-1).double()
        min_d2 = d2 if j == 0 else torch.minimum(min_d2, d2)
    return torch.stack(centers, dim=1)


def _update_centroids(x: Tensor, weights: Tensor, labels: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted means of the assigned points; clusters that lost all points keep their previous centre."""
    k = centroids.shape[1]
    one_hot = torch.nn.functional.one_hot(labels, k).to(x.dtype) * weights.unsqueeze(-1)  # (B, N, k)
    mass = one_hot.sum(1)  # (B, k)
    sums = one_hot.transpose(1, 2) @ x  # (B, k, D)
    means = sums / mass.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)
    return torch.where((mass > 0).unsqueeze(-1), means, centroids), mass


def _relocate_empty(x: Tensor, d2: Tensor, labels: Tensor, centroids: Tensor) -> None:
    """In place: give every empty cluster the point farthest from its own centre, taken from a cluster
    that keeps at least one point (always possible while k ≤ N). Duplicated points can be split this way."""
    k = centroids.shape[1]
    counts = torch.nn.functional.one_hot(labels, k).sum(1)  # (B, k)
    for b in torch.nonzero((counts == 0).any(-1)).flatten().tolist():
        own = d2[b].gather(-1, labels[b].unsqueeze(-1)).squeeze(-1)  # (N,)
        for j in torch.nonzero(counts[b] == 0).flatten().tolist():
            donors = counts[b][labels[b]] > 1
            candidate = torch.where(donors, own, torch.full_like(own, -1.0))
            i = int(torch.argmax(candidate))
            counts[b, labels[b, i]] -= 1
            counts[b, j] += 1
            labels[b, i] = j
            own[i] = 0.0
            centroids[b, j] = x[b, i]


def _lloyd(x: Tensor, weights: Tensor, centroids: Tensor, max_iter: int, tol: float) -> KMeansResult:
    # scikit-learn's stopping rule: strict convergence when the labels stop changing, else total squared
    # centre shift ≤ tol · mean feature variance; the final labels are always re-assigned to the final centres.
    variance = x.var(dim=1, unbiased=False).mean(-1)  # (B,)
    previous = None
    for _ in range(max_iter):
        labels = squared_distances(x, centroids).argmin(-1)
        if previous is not None and bool((labels == previous).all()):
            break
        new_centroids, _ = _update_centroids(x, weights, labels, centroids)
        shift = ((new_centroids - centroids) ** 2).sum((1, 2))
        centroids, previous = new_centroids, labels
        if bool((shift <= tol * variance).all()):
            break
    d2 = squared_distances(x, centroids)
    labels = d2.argmin(-1)
    _relocate_empty(x, d2, labels, centroids)
    d2 = squared_distances(x, centroids)
    inertia = (weights * d2.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return KMeansResult(labels=labels, centroids=centroids, inertia=inertia)


def batched_kmeans(
    x: Tensor,
    k: int,
    *,
    n_init: int = 1,
    max_iter: int = 100,
    seeds: list[int] | None = None,
    weights: Tensor | None = None,
    init: Tensor | None = None,
    tol: float = 0.0,
) -> KMeansResult:
    """Cluster B independent problems x (B, N, D) into k clusters each (Euclidean, Lloyd).

    Problem b is seeded by `seeds[b]` alone (k-means++ draws from its own generator), `n_init` restarts are
    kept per problem by lowest inertia, and every returned cluster holds at least one point. `init` (B, k, D)
    replaces k-means++ (then `n_init` must be 1). Weights (B, N) weight points in means and inertia.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, D), got shape {tuple(x.shape)}")
    batch, n, dim = x.shape
    if not 1 <= k <= n:
        raise ValueError(
            f"k-means with k={k} clusters needs 1 ≤ k ≤ number of points ({n}); lower num_masks or raise the "
            "resolution so the feature layer has more positions"
        )
    x = x.float()
    weights = torch.ones(batch, n, device=x.device) if weights is None else weights.float().to(x.device)
    if init is not None:
        if n_init != 1 or init.shape != (batch, k, dim):
            raise ValueError(
                f"init must be (B, k, D) = {(batch, k, dim)} with n_init=1, got {tuple(init.shape)}"
            )
        return _lloyd(x, weights, init.float().to(x.device).clone(), max_iter, tol)

    seeds = [0] * batch if seeds is None else list(seeds)
    if len(seeds) != batch:
        raise ValueError(f"need one seed per problem: {len(seeds)} seeds for {batch} problems")
    uniforms = torch.stack(
        [torch.rand(n_init, k, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )  # (B, n_init, k), drawn on the CPU so every device sees the same numbers
    x_rep = x.repeat_interleave(n_init, dim=0)
    w_rep = weights.repeat_interleave(n_init, dim=0)
    centroids = kmeans_plus_plus(x_rep, w_rep, k, uniforms.flatten(0, 1))
    result = _lloyd(x_rep, w_rep, centroids, max_iter, tol)
    best = result.inertia.view(batch, n_init).argmin(-1)  # first restart wins ties
    pick = torch.arange(batch, device=x.device) * n_init + best
    return KMeansResult(result.labels[pick], result.centroids[pick], result.inertia[pick])


def canonical_order(labels: Tensor, k: int) -> Tensor:
    """Permutation (B, k) that renumbers clusters by first occurrence in raster order.

    `new_labels = inverse[labels]`; use `perm` to reorder per-cluster tensors: `centroids.gather(perm)`.
    Clusters that never occur (impossible after `batched_kmeans`) go last, in id order.
    """
    batch, n = labels.shape
    positions = torch.arange(n, device=labels.device).expand(batch, n)
    first = torch.full((batch, k), n, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(1, labels, positions, reduce="amin")
    ids = torch.arange(k, device=labels.device).expand(batch, k)
    return torch.argsort(first * (k + 1) + ids, dim=1)  # key unique per cluster → stable ordering


def relabel(labels: Tensor, perm: Tensor) -> Tensor:
    """Apply a `canonical_order` permutation to labels (B, ...): new id of old cluster perm[b, j] is j."""
    inverse = torch.argsort(perm, dim=1)
    flat = labels.flatten(1)
    return inverse.gather(1, flat).view_as(labels)


__all__ = [
    "KMeansResult",
    "batched_kmeans",
    "canonical_order",
    "relabel",
    "kmeans_plus_plus",
    "squared_distances",
]
