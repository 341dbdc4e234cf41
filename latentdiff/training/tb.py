"""Training metrics: per-step accumulators reduced across ranks, written to tensorboard by rank 0 only.

The logged loss is the all-reduced mean over ranks and micro-batches; the loss per noise
level uses ``NUM_BINS`` log-spaced sigma bins between 0.002 and 80 (values outside go to the end bins).
The writer opens ``RUN/tb`` with ``purge_step`` = the resumed step, so events written after the last
checkpoint by a killed run are dropped and the curves continue seamlessly.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from latentdiff.utils.dist import is_distributed

__all__ = ["SIGMA_BIN_EDGES", "NUM_BINS", "StepMetrics", "TBWriter", "reduce_metrics", "write_step_scalars"]

NUM_BINS = 8
SIGMA_BIN_EDGES = torch.logspace(math.log10(0.002), math.log10(80.0), NUM_BINS + 1, dtype=torch.float64)


def sigma_bin(sigma: torch.Tensor) -> torch.Tensor:
    """Bin index 0..NUM_BINS-1 of each sigma (on the sigmas' device)."""
    idx = torch.bucketize(sigma.detach().double(), SIGMA_BIN_EDGES[1:-1].to(sigma.device))
    return idx.clamp_(0, NUM_BINS - 1)


class StepMetrics:
    """Sums over the micro-batches of one logging window on this rank: loss, count, per-bin sums.

    Everything stays on ``device``: one float64 buffer ``[loss_sum, count, bin_sum x NUM_BINS,
    bin_count x NUM_BINS]`` and the list of the window's sigma tensors.  :meth:`add` never waits for
    the device (no ``.item()``, no copy to the host); the values reach the host once per window, at
    log time (:func:`reduce_metrics`).  The arithmetic is the float64 of the host version, bit for bit.
    """

    def __init__(self, device=None):
        self.device = torch.device(device if device is not None else "cpu")
        self._edges = SIGMA_BIN_EDGES[1:-1].to(self.device)
        self.reset()

    def reset(self):
        self.buf = torch.zeros(2 + 2 * NUM_BINS, dtype=torch.float64, device=self.device)
        self.count = 0  # samples in the window (host-side: shapes only, no sync)
        self.sigmas: list[torch.Tensor] = []

    def add(self, loss_per_sample: torch.Tensor, sigma: torch.Tensor) -> None:
        loss = loss_per_sample.detach().to(self.device, torch.float64).reshape(-1)
        sig = sigma.detach().to(self.device, torch.float64).reshape(-1)
        b = torch.bucketize(sig, self._edges).clamp_(0, NUM_BINS - 1)
        self.buf[0] += loss.sum()
        self.buf[1] += loss.numel()
        self.buf[2 : 2 + NUM_BINS].index_add_(0, b, loss)
        self.buf[2 + NUM_BINS :].index_add_(0, b, torch.ones_like(loss))
        self.count += loss.numel()
        self.sigmas.append(sig)

    @property
    def loss_sum(self) -> float:
        """This rank's loss sum of the window (a host sync: log time and tests only)."""
        return float(self.buf[0])

    def packed(self) -> torch.Tensor:
        """The buffer (on the device), ready for one all-reduce."""
        return self.buf.clone()

    @staticmethod
    def unpack(buf: torch.Tensor) -> dict:
        buf = buf.cpu()
        loss_sum, count = float(buf[0]), float(buf[1])
        bs, bc = buf[2 : 2 + NUM_BINS], buf[2 + NUM_BINS : 2 + 2 * NUM_BINS]
        return {
            "loss": loss_sum / max(count, 1.0),
            "count": count,
            "bins": [(float(s / c) if c > 0 else None) for s, c in zip(bs, bc)],
        }


class TBWriter:
    """A SummaryWriter on rank 0; a no-op elsewhere."""

    def __init__(self, log_dir: str | Path, enabled: bool, purge_step: int | None = None):
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalar(self, tag: str, value, step: int) -> None:
        if self.writer is not None and value is not None and math.isfinite(float(value)):
            self.writer.add_scalar(tag, float(value), step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.writer is not None and values.numel():
            self.writer.add_histogram(tag, values.float(), step)

    def image(self, tag: str, img_chw_uint8: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, img_chw_uint8, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def reduce_metrics(metrics: StepMetrics, device, world: int) -> tuple[dict, torch.Tensor]:
    """The window's metrics summed over ranks (one all-reduce of the device buffer) and every rank's
    sigmas (one all-gather, for the histogram); the host sees them here, once per window (a collective).

    Every rank holds the same number of sigmas (same micro-batch size and steps), so they all-gather.
    """
    buf = metrics.packed().to(device)
    if is_distributed() and world > 1:
        dist.all_reduce(buf)
    m = StepMetrics.unpack(buf)
    sig = torch.cat(metrics.sigmas).to(device) if metrics.sigmas else torch.empty(0, dtype=torch.float64, device=device)
    if is_distributed() and world > 1:
        parts = [torch.empty_like(sig) for _ in range(world)]
        dist.all_gather(parts, sig)
        sig = torch.cat(parts)
    return m, sig.cpu()


def write_step_scalars(tb: TBWriter, step: int, m: dict, sigmas: torch.Tensor, scalars: dict) -> None:
    """The reduced loss, the loss per sigma bin, ``scalars`` (tag -> value) and the sigma histogram."""
    tb.scalar("loss/train", m["loss"], step)
    for i, v in enumerate(m["bins"]):
        tb.scalar(f"loss_per_sigma/bin{i}", v, step)
    for tag, value in scalars.items():
        tb.scalar(tag, value, step)
    tb.histogram("sigma", sigmas, step)
    tb.flush()
