"""Kernel distance (KID, Bińkowski et al., "Demystifying MMD GANs", ICLR 2018) on any features.

Kernel: the cubic polynomial ``k(x, y) = (x . y / d + 1)^3`` with ``d`` the feature dimension
(Bińkowski et al., Sec. 4 / Appendix D).  Per subset of ``m`` generated features ``X`` and ``m``
reference features ``Y`` the unbiased estimate of MMD^2 (Gretton et al. 2012, Lemma 6; Bińkowski
et al., Eq. 4)::

    MMD^2_u = 1/(m(m-1)) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)]  -  2/m^2 sum_{i, j} k(x_i, y_j)

is computed in float64; KID is its mean over ``subsets`` subsets drawn without replacement within a
subset.  The subsets are drawn exactly as torch-fidelity draws them (``RandomState(seed)``, for each
subset ``choice(n_gen, m)`` then ``choice(n_ref, m)``, both without replacement), so on the same
features the numbers agree with ``torch_fidelity.metric_kid.kid_features_to_metric``.

``kid_std`` is the standard deviation of the subset estimates (torch-fidelity's
``kernel_inception_distance_std``): the standard error of one size-``m`` estimate, an upper bound
for the error of their mean.  The estimate is unbiased, so it can be negative when the sets agree.
Both sets need at least ``subset_size`` features.
"""
from __future__ import annotations

import numpy as np
import torch

from latentdiff.utils.errors import FIDError

__all__ = ["DEFAULT_SUBSETS", "DEFAULT_SUBSET_SIZE", "polynomial_kernel", "mmd2_unbiased", "kid"]

DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x y^T / d + 1)^3`` in float64."""
    return (x.to(torch.float64) @ y.to(torch.float64).T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD^2 of the module docstring for equally many ``x`` and ``y`` (m >= 2)."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise FIDError(f"MMD^2: need two sets of equal size >= 2, got {x.shape[0]} and {y.shape[0]}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kid(gen: torch.Tensor, ref: torch.Tensor, *, subsets: int = DEFAULT_SUBSETS,
        subset_size: int = DEFAULT_SUBSET_SIZE, seed: int = 0) -> dict:
    """``{"kid", "kid_std", "subsets", "subset_size", "seed"}`` of generated vs reference features."""
    gen, ref = torch.as_tensor(gen, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
        raise FIDError(f"KID: features must be (N, D) with one D, got {tuple(gen.shape)} and {tuple(ref.shape)}")
    n_g, n_r = gen.shape[0], ref.shape[0]
    if subset_size < 2 or subsets < 1:
        raise FIDError(f"KID: subset size must be >= 2 and subsets >= 1, got {subset_size} and {subsets}")
    if min(n_g, n_r) < subset_size:
        raise FIDError(f"KID needs at least subset_size = {subset_size} images in both sets, got {n_g} generated and "
                       f"{n_r} reference; generate more or lower --kid-subset-size to at most {min(n_g, n_r)}")
    rng = np.random.RandomState(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        ig = rng.choice(n_g, subset_size, replace=False)
        ir = rng.choice(n_r, subset_size, replace=False)
        vals[i] = mmd2_unbiased(gen[torch.from_numpy(ig)], ref[torch.from_numpy(ir)])
    return {"kid": float(vals.mean()), "kid_std": float(vals.std()), "subsets": int(subsets),
            "subset_size": int(subset_size), "seed": int(seed)}
