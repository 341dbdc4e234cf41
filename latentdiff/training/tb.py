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
    """Bin index 0..NUM_BINS-1 of each sigma."""
    idx = torch.bucketize(sigma.detach().double().cpu(), SIGMA_BIN_EDGES[1:-1])
    return idx.clamp_(0, NUM_BINS - 1)


class StepMetrics:
    """Sums over the micro-batches of one logging window on this rank: loss, count, per-bin sums."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss_sum = 0.0
        self.count = 0
        self.bin_sum = torch.zeros(NUM_BINS, dtype=torch.float64)
        self.bin_count = torch.zeros(NUM_BINS, dtype=torch.float64)
        self.sigmas: list[torch.Tensor] = []

    def add(self, loss_per_sample: torch.Tensor, sigma: torch.Tensor) -> None:
        loss = loss_per_sample.detach().double().cpu()
        self.loss_sum += float(loss.sum())
        self.count += loss.numel()
        b = sigma_bin(sigma)
        self.bin_sum.index_add_(0, b, loss)
        self.bin_count.index_add_(0, b, torch.ones_like(loss))
        self.sigmas.append(sigma.detach().double().cpu())

    def packed(self) -> torch.Tensor:
        return torch.cat([torch.tensor([self.loss_sum, float(self.count)], dtype=torch.float64), self.bin_sum, self.bin_count])

    @staticmethod
    def unpack(buf: torch.Tensor) -> dict:
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
    """The window's metrics summed over ranks (a collective) and every rank's sigmas (for the histogram).

    Every rank holds the same number of sigmas (same micro-batch size and steps), so they all-gather.
    """
    buf = metrics.packed().to(device)
    if is_distributed() and world > 1:
        dist.all_reduce(buf)
    m = StepMetrics.unpack(buf.cpu())
    sig = torch.cat(metrics.sigmas) if metrics.sigmas else torch.empty(0)
    if world > 1:
        parts = [torch.empty_like(sig) for _ in range(world)]
        dist.all_gather(parts, sig.to(device) if device.type != "cpu" else sig)
        sig = torch.cat([p.cpu() for p in parts])
    return m, sig


def write_step_scalars(tb: TBWriter, step: int, m: dict, sigmas: torch.Tensor, scalars: dict) -> None:
    """The reduced loss, the loss per sigma bin, ``scalars`` (tag -> value) and the sigma histogram."""
    tb.scalar("loss/train", m["loss"], step)
    for i, v in enumerate(m["bins"]):
        tb.scalar(f"loss_per_sigma/bin{i}", v, step)
    for tag, value in scalars.items():
        tb.scalar(tag, value, step)
    tb.histogram("sigma", sigmas, step)
    tb.flush()
