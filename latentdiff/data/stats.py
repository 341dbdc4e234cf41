"""Dataset statistics of the encoded latents (``OUT/stats.json`` + ``OUT/stats.npz``), float64.

Everything is computed from the **float16 values exactly as stored** in the shards, so
``tools/dataset_stats.py`` recomputing from the shards reproduces it (bit for bit for the latent
fields; the RGB spectrum comes from the per-shard sidecars because RGB images are not stored).

Notation: sample ``i``, channel ``c``, pixel ``p`` of the ``P = h*w`` latent pixels; ``m`` the
posterior mean, ``s`` the posterior std, ``z = m + s * eps`` a sampled latent, ``N`` samples.

``stats.npz`` fields (float64 unless noted)
    ``n`` (int64)                  N
    ``channel_mean`` (C,)          mean_c = sum_ip m_icp / (N P)       (same for z: E[eps] = 0)
    ``channel_std`` (C,)           std of the *sampled* latents: sqrt(Var_ip(m_c) + latent_var_mean_c)
    ``channel_std_mean_only`` (C,) sqrt(Var_ip(m_c)) -- posterior means only (two-pass, centered)
    ``latent_var_mean`` (C,)       E[s^2]_c = sum_ip s_icp^2 / (N P)
    ``latent_power`` (C,h,w)       mean orthonormal power spectrum of the posterior means
                                   (``SpectrumAccumulator``).  The mean spectrum of the *sampled*
                                   latents is exactly ``latent_power[c] + latent_var_mean[c]`` in every
                                   bin: for white eps, E|F(s*eps)|^2(u,v) = (1/P) sum_p s_p^2.
    ``rgb64_power`` (3,64,64)      mean power spectrum of the preprocessed RGB images (in [-1, 1])
                                   resized to 64x64 (bicubic, antialiased; identity at 64) -- the WSNR
                                   reference of the paper.  Flipped samples are included.
    ``rgb64_n`` (int64)            images in ``rgb64_power`` (= N)
    ``dist_n``, ``dist_mean`` (C, h*w), ``dist_sum_a`` (C,), ``dist_sum_aa`` (C, C)
                                   :class:`~latentdiff.diffusion.distances.DistanceStats` state on the posterior
                                   means (raw space): ``DatasetStats.distance_stats().moments(scale)``
                                   gives exact (mu_d, sigma_d) for any per-channel scale.

``stats.json`` repeats the per-channel vectors (``mean``, ``std``, ``std_mean_only``,
``latent_var_mean``), ``n``, ``shards_hash`` (sha256 of the manifest's shard list: name, count,
sha256), ``sample_shape`` and the raw-space ``distance`` moments, and lists the npz fields.
:func:`latentdiff.data.recompute.recompute_stats` recomputes all of it from the shards.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentdiff.utils.io import atomic_write_bytes, atomic_write_json, read_json
from latentdiff.utils.errors import DataError
from latentdiff.utils.safe_load import load_npz
from latentdiff.diffusion.distances import DistanceStats
from latentdiff.diffusion.spectral import SpectrumAccumulator, power_spectrum

__all__ = [
    "STATS_FORMAT_VERSION",
    "RGB_REF_SIZE",
    "resize_to_reference",
    "rgb64_image",
    "rgb64_power",
    "ShardPartial",
    "shard_partial",
    "distance_partial",
    "DatasetStats",
    "finalize_stats",
    "point_mean",
]

STATS_FORMAT_VERSION = 1
RGB_REF_SIZE = 64


def resize_to_reference(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float64 images -> (N, 3, 64, 64): bicubic antialiased resize, identity at 64."""
    if x.shape[-1] == RGB_REF_SIZE and x.shape[-2] == RGB_REF_SIZE:
        return x
    return F.interpolate(x, size=(RGB_REF_SIZE, RGB_REF_SIZE), mode="bicubic", antialias=True, align_corners=False)


def rgb64_image(img_u8: np.ndarray) -> torch.Tensor:
    """(R, R, 3) uint8 -> (3, 64, 64) float64 in [-1, 1] (bicubic antialiased resize; identity at 64)."""
    x = torch.from_numpy(np.array(img_u8, dtype=np.uint8, copy=True)).permute(2, 0, 1).to(torch.float64) / 127.5 - 1.0
    return resize_to_reference(x[None])[0]


def rgb64_power(img_u8: np.ndarray) -> torch.Tensor:
    """Orthonormal power spectrum (3, 64, 64) float64 of one preprocessed image at 64x64."""
    return power_spectrum(rgb64_image(img_u8)[None])


@dataclass
class ShardPartial:
    """Exact float64 sums over one shard (the sidecar ``shard-%06d.stats.npz``)."""

    n: int
    sum_mean: torch.Tensor  # (C, h, w)
    sum_var: torch.Tensor  # (C,)   sum of s^2
    power_sum: torch.Tensor  # (C, h, w)
    rgb64_sum: torch.Tensor | None  # (3, 64, 64)
    rgb64_n: int

    def arrays(self) -> dict:
        out = {
            "n": np.int64(self.n),
            "sum_mean": self.sum_mean.numpy(),
            "sum_var": self.sum_var.numpy(),
            "power_sum": self.power_sum.numpy(),
            "rgb64_n": np.int64(self.rgb64_n),
        }
        if self.rgb64_sum is not None:
            out["rgb64_sum"] = self.rgb64_sum.numpy()
        return out

    @classmethod
    def from_arrays(cls, a) -> "ShardPartial":
        t = lambda k: torch.from_numpy(np.asarray(a[k], dtype=np.float64)).clone()  # noqa: E731
        return cls(int(a["n"]), t("sum_mean"), t("sum_var"), t("power_sum"),
                   t("rgb64_sum") if "rgb64_sum" in a else None, int(a["rgb64_n"]))


BLOCK = 64  # samples per float64 block; fixed so every caller sums in the same order


def _blocks(a: np.ndarray):
    for i in range(0, a.shape[0], BLOCK):
        yield torch.from_numpy(np.ascontiguousarray(a[i : i + BLOCK])).to(torch.float64)


def shard_partial(means: np.ndarray, stds: np.ndarray, rgb64_sum: torch.Tensor | None = None, rgb64_n: int = 0) -> ShardPartial:
    """Latent sums of one shard from its stored float16 arrays (n, C, h, w), in fixed blocks of 64."""
    if means.shape != stds.shape or means.ndim != 4:
        raise ValueError(f"means {means.shape} and stds {stds.shape} must both be (n, C, h, w)")
    c, h, w = means.shape[1:]
    sum_mean = torch.zeros(c, h, w, dtype=torch.float64)
    sum_var = torch.zeros(c, dtype=torch.float64)
    acc = SpectrumAccumulator()
    for m in _blocks(means):
        sum_mean += m.sum(dim=0)
        acc.update(m)
    for s in _blocks(stds):
        sum_var += s.square().sum(dim=(0, 2, 3))
    return ShardPartial(int(means.shape[0]), sum_mean, sum_var, acc.sum, rgb64_sum, rgb64_n)


def distance_partial(means: np.ndarray, point_mean: torch.Tensor, channel_mean: torch.Tensor) -> torch.Tensor:
    """Pass 2 over one shard: [sum_a (C), sum_aa (C*C), centered sum of squares (C), n] as one float64 vector.

    ``point_mean`` is the dataset mean point (C, h*w) of pass 1, ``channel_mean`` the (C,) channel means.
    """
    c = means.shape[1]
    st = DistanceStats.from_state_dict(
        {"n": 0, "mean": point_mean, "sum_a": torch.zeros(c, dtype=torch.float64), "sum_aa": torch.zeros(c, c, dtype=torch.float64)}
    )
    css = torch.zeros(c, dtype=torch.float64)
    for m in _blocks(means):
        st.update_distances(m)
        css += (m - channel_mean.view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3))
    return torch.cat([st.sum_a, st.sum_aa.flatten(), css, torch.tensor([float(means.shape[0])], dtype=torch.float64)])


@dataclass
class DatasetStats:
    n: int
    shards_hash: str
    sample_shape: tuple[int, int, int]
    channel_mean: torch.Tensor
    channel_std: torch.Tensor
    channel_std_mean_only: torch.Tensor
    latent_var_mean: torch.Tensor
    latent_power: torch.Tensor
    rgb64_power: torch.Tensor | None
    rgb64_n: int
    dist_mean: torch.Tensor
    dist_sum_a: torch.Tensor
    dist_sum_aa: torch.Tensor

    NPZ_FIELDS = (
        "n", "channel_mean", "channel_std", "channel_std_mean_only", "latent_var_mean", "latent_power",
        "rgb64_power", "rgb64_n", "dist_n", "dist_mean", "dist_sum_a", "dist_sum_aa",
    )

    def distance_stats(self) -> DistanceStats:
        return DistanceStats.from_state_dict(
            {"n": self.n, "mean": self.dist_mean, "sum_a": self.dist_sum_a, "sum_aa": self.dist_sum_aa}
        )

    @property
    def sampled_latent_power(self) -> torch.Tensor:
        """Mean spectrum of z = m + s*eps: ``latent_power + latent_var_mean[c]`` in every bin."""
        return self.latent_power + self.latent_var_mean.view(-1, 1, 1)

    def to_json(self) -> dict:
        mu_d, sd_d = self.distance_stats().moments() if self.n >= 2 else (float("nan"), float("nan"))
        return {
            "format": "latentdiff-stats",
            "format_version": STATS_FORMAT_VERSION,
            "n": self.n,
            "shards_hash": self.shards_hash,
            "sample_shape": list(self.sample_shape),
            "space": "raw VAE latents (posterior), computed from the float16 values stored in the shards",
            "mean": self.channel_mean.tolist(),
            "std": self.channel_std.tolist(),
            "std_mean_only": self.channel_std_mean_only.tolist(),
            "latent_var_mean": self.latent_var_mean.tolist(),
            "distance": {
                "n": self.n, "mu_d": mu_d, "sigma_d": sd_d,
                "note": "raw space; DatasetStats.distance_stats().moments(scale) for a per-channel scale",
            },
            "rgb64": {"n": self.rgb64_n, "size": RGB_REF_SIZE, "resize": "bicubic antialias", "range": [-1, 1]},
            "npz": "stats.npz: " + ", ".join(self.NPZ_FIELDS),
            "notes": "std = sqrt(Var(mean) + E[std^2]) of sampled latents z = mean + std*eps; "
                     "sampled-latent spectrum = latent_power + latent_var_mean[c] in every bin",
        }

    def npz_arrays(self) -> dict:
        return {
            "n": np.int64(self.n),
            "channel_mean": self.channel_mean.numpy(),
            "channel_std": self.channel_std.numpy(),
            "channel_std_mean_only": self.channel_std_mean_only.numpy(),
            "latent_var_mean": self.latent_var_mean.numpy(),
            "latent_power": self.latent_power.numpy(),
            "rgb64_power": (self.rgb64_power if self.rgb64_power is not None
                            else torch.full((3, RGB_REF_SIZE, RGB_REF_SIZE), float("nan"), dtype=torch.float64)).numpy(),
            "rgb64_n": np.int64(self.rgb64_n),
            "dist_n": np.int64(self.n),
            "dist_mean": self.dist_mean.numpy(),
            "dist_sum_a": self.dist_sum_a.numpy(),
            "dist_sum_aa": self.dist_sum_aa.numpy(),
        }

    def save(self, root: str | Path) -> None:
        root = Path(root)
        buf = io.BytesIO()
        np.savez(buf, **self.npz_arrays())
        atomic_write_bytes(root / "stats.npz", buf.getvalue())
        atomic_write_json(root / "stats.json", self.to_json())

    @classmethod
    def load(cls, root: str | Path) -> "DatasetStats":
        root = Path(root)
        jpath, npath = root / "stats.json", root / "stats.npz"
        for p in (jpath, npath):
            if not p.is_file():
                raise DataError(f"{p} is missing; run tools/dataset_stats.py {root} --write (or re-run the encoder)")
        meta = read_json(jpath, DataError, missing="", invalid=f"; recompute with tools/dataset_stats.py {root} --write")
        a = load_npz(npath)  # allow_pickle=False: a pickled array is refused naming the file
        missing = [k for k in cls.NPZ_FIELDS if k not in a]
        if missing:
            raise DataError(f"{npath} lacks fields {missing}; recompute with tools/dataset_stats.py {root} --write")
        t = lambda k: torch.from_numpy(a[k].astype(np.float64))  # noqa: E731
        st = cls(
            n=int(a["n"]), shards_hash=meta["shards_hash"], sample_shape=tuple(meta["sample_shape"]),
            channel_mean=t("channel_mean"), channel_std=t("channel_std"), channel_std_mean_only=t("channel_std_mean_only"),
            latent_var_mean=t("latent_var_mean"), latent_power=t("latent_power"),
            rgb64_power=None if np.isnan(a["rgb64_power"]).any() else t("rgb64_power"), rgb64_n=int(a["rgb64_n"]),
            dist_mean=t("dist_mean"), dist_sum_a=t("dist_sum_a"), dist_sum_aa=t("dist_sum_aa"),
        )
        if int(meta["n"]) != st.n:
            raise DataError(f"{jpath} says n={meta['n']} but {npath} says n={st.n}; recompute with tools/dataset_stats.py")
        return st


def finalize_stats(
    partials: list[ShardPartial], pass2: list[torch.Tensor], shard_hash: str, sample_shape
) -> DatasetStats:
    """Combine per-shard partial sums (shard order) into the dataset statistics."""
    c, h, w = (int(v) for v in sample_shape)
    n = sum(p.n for p in partials)
    if n == 0:
        raise DataError("no samples: every input was skipped (see skipped.jsonl)")
    sum_mean = torch.zeros(c, h, w, dtype=torch.float64)
    sum_var = torch.zeros(c, dtype=torch.float64)
    power = torch.zeros(c, h, w, dtype=torch.float64)
    rgb = torch.zeros(3, RGB_REF_SIZE, RGB_REF_SIZE, dtype=torch.float64)
    rgb_n = 0
    have_rgb = True
    for p in partials:
        sum_mean += p.sum_mean
        sum_var += p.sum_var
        power += p.power_sum
        if p.rgb64_sum is None:
            have_rgb = have_rgb and p.rgb64_n == 0 and p.n == 0
        else:
            rgb += p.rgb64_sum
            rgb_n += p.rgb64_n
    npix = n * h * w
    channel_mean = sum_mean.sum(dim=(1, 2)) / npix
    sum_a = torch.zeros(c, dtype=torch.float64)
    sum_aa = torch.zeros(c, c, dtype=torch.float64)
    css = torch.zeros(c, dtype=torch.float64)
    n2 = 0
    for v in pass2:
        sum_a += v[:c]
        sum_aa += v[c : c + c * c].view(c, c)
        css += v[c + c * c : c + c * c + c]
        n2 += int(round(float(v[-1])))
    if n2 != n:
        raise DataError(f"the statistics pass read {n2} samples from the shards but the sidecars count {n}")
    var_mean_only = css / npix
    latent_var_mean = sum_var / npix
    return DatasetStats(
        n=n,
        shards_hash=shard_hash,
        sample_shape=(c, h, w),
        channel_mean=channel_mean,
        channel_std=torch.sqrt(var_mean_only + latent_var_mean),
        channel_std_mean_only=torch.sqrt(var_mean_only),
        latent_var_mean=latent_var_mean,
        latent_power=power / n,
        rgb64_power=(rgb / rgb_n) if (have_rgb and rgb_n == n) else None,
        rgb64_n=rgb_n if (have_rgb and rgb_n == n) else 0,
        dist_mean=sum_mean.reshape(c, h * w) / n,
        dist_sum_a=sum_a,
        dist_sum_aa=sum_aa,
    )


def point_mean(partials: list[ShardPartial], sample_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass-1 result: (dataset mean point (C, h*w), channel means (C,)) from the shard partials."""
    c, h, w = (int(v) for v in sample_shape)
    n = sum(p.n for p in partials)
    if n == 0:
        raise DataError("no samples: every input was skipped (see skipped.jsonl)")
    sum_mean = torch.zeros(c, h, w, dtype=torch.float64)
    for p in partials:
        sum_mean += p.sum_mean
    return sum_mean.reshape(c, h * w) / n, sum_mean.sum(dim=(1, 2)) / (n * h * w)
