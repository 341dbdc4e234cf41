"""Improved precision and recall (Kynkäänniemi et al., "Improved Precision and Recall Metric for
Assessing Generative Models", NeurIPS 2019) on any features.

Each set's manifold is the union of balls around its features, of radius the distance to the
``k``-th nearest *other* feature of the same set (``k = 3``, the paper's default).  With the
indicator ``f(phi, Phi) = 1`` when ``||phi - phi'|| <= NND_k(phi')`` for some ``phi'`` in ``Phi``
(paper, Eq. 1)::

    precision = 1/|G| sum_{g in G} f(g, R)          recall = 1/|R| sum_{r in R} f(r, G)     (Eq. 2)

Distances are Euclidean in float64 (``torch.cdist``), computed in row blocks so that memory stays
``block x N``.  This is the convention of ``torch_fidelity.metric_prc`` (features_1 generated,
features_2 real), with which the values agree on the same features.  Both sets need at least ``k + 1``
features (a ``k``-th neighbour other than the point itself).
"""
from __future__ import annotations

import torch

from latentdiff.utils.errors import FIDError

__all__ = ["DEFAULT_K", "knn_radii", "coverage_fraction", "precision_recall"]

DEFAULT_K = 3
_BLOCK = 1024  # rows per distance block: 1024 x N float64 (400 MB at N = 50k)


def knn_radii(feats: torch.Tensor, k: int = DEFAULT_K, block: int = _BLOCK) -> torch.Tensor:
    """Distance of every feature to its ``k``-th nearest neighbour in the same set (itself excluded:
    the ``k + 1``-th smallest distance, the first being its own 0)."""
    out = [torch.cdist(feats[i : i + block], feats).kthvalue(k + 1, dim=1).values for i in range(0, len(feats), block)]
    return torch.cat(out)


def coverage_fraction(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, block: int = _BLOCK) -> float:
    """Fraction of ``query`` features inside some ball ``(support_j, radii_j)`` (Eq. 1, ``<=``)."""
    hits = 0
    for i in range(0, len(query), block):
        d = torch.cdist(query[i : i + block], support)
        hits += int((d <= radii[None, :]).any(dim=1).sum())
    return hits / len(query)


def precision_recall(gen, ref, k: int = DEFAULT_K) -> dict:
    """``{"precision", "recall", "f_score", "k"}`` of generated vs reference features (Eq. 2)."""
    g = torch.as_tensor(gen, dtype=torch.float64)
    r = torch.as_tensor(ref, dtype=torch.float64)
    if g.ndim != 2 or r.ndim != 2 or g.shape[1] != r.shape[1]:
        raise FIDError(f"precision/recall: features must be (N, D) with one D, got {tuple(g.shape)} and {tuple(r.shape)}")
    if min(len(g), len(r)) < k + 1:
        raise FIDError(f"precision/recall with k = {k} needs at least {k + 1} images in both sets, got {len(g)} "
                       f"generated and {len(r)} reference")
    precision = coverage_fraction(g, r, knn_radii(r, k))
    recall = coverage_fraction(r, g, knn_radii(g, k))
    f = 2 * precision * recall / max(1e-5, precision + recall)  # torch-fidelity's F-score guard
    return {"precision": precision, "recall": recall, "f_score": f, "k": int(k)}
