"""Sample quality during training: every ``eval_every`` steps the EMA model generates a fixed seed set,
decodes it, and the offline metrics of :mod:`latentdiff.metrics.evaluation` compare it with a reference.

* Samples: seeds ``0 .. eval_samples - 1`` (class ``i % num_classes`` when conditional), the run's
  sampler and NFE (``sample_solver``, ``sample_nfe``), decoded through the dataset's VAE - the same
  autoencoder object as the sample grid, loaded once per run.
* Reference: the first ``eval_samples`` images (by key) of the validation dataset when there is one,
  else of the training dataset, decoded once at the first evaluation; its statistics are kept.
* Metrics: FWD, SWD, KID and precision/recall on pixel and wavelet features; a metric whose sample
  requirement (:func:`latentdiff.metrics.evaluation.required_samples`) the counts cannot meet is left
  out and named in the log; KID uses subsets of ``min(1000, n // 2)`` images.
* Output: tensorboard ``eval/...`` and one JSON line per evaluation in ``RUN/eval.jsonl`` (step, images
  seen, metrics, the validation loss of the same step, seconds spent generating, decoding, measuring).

Rank 0 only (no collective: the EMA denoiser is gathered by the caller).
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from latentdiff.metrics.eval_sources import EncodedDatasetImages
from latentdiff.metrics.eval_stats import collect_statistics
from latentdiff.metrics.evaluation import EvalSettings, compare, make_extractors, required_samples
from latentdiff.metrics.image_sources import ArrayImages
from latentdiff.solvers.generate import generate_latents
from latentdiff.training.tb import TBWriter
from latentdiff.vae.decode import decode_to_uint8

__all__ = ["EVAL_JSONL", "QualityEval", "scalars_of"]

EVAL_JSONL = "eval.jsonl"


def scalars_of(metrics: dict) -> dict:
    """The tensorboard scalars of one ``compare`` result."""
    out = {}
    for key, m in metrics.items():
        if key == "swd":
            out.update({f"eval/{k}": v for k, v in m["levels"].items()})
        elif "value" in m:
            out[f"eval/{key}"] = m["value"]
        elif "kid" in m:
            out[f"eval/{key}"] = m["kid"]
        else:
            out[f"eval/{key}_precision"], out[f"eval/{key}_recall"] = m["precision"], m["recall"]
    return out


class QualityEval:
    """Rank 0's in-training evaluation (module docstring)."""

    def __init__(self, run_dir, preview, reference_root, count: int, batch: int, log):
        self.run_dir, self.preview, self.reference_root = Path(run_dir), preview, Path(reference_root)
        self.count, self.batch, self.log = int(count), int(batch), log
        self.settings: EvalSettings | None = None
        self.extractors = None
        self.ref = None

    def _settings(self, n: int, resolution) -> EvalSettings:
        s = EvalSettings(kid_subset_size=max(2, min(1000, n // 2)))
        need = required_samples(resolution, s)
        keep = tuple(m for m in s.metrics if n >= need[m][0])
        dropped = [f"{m} (needs {need[m][0]})" for m in s.metrics if m not in keep]
        if dropped:
            self.log(f"in-training evaluation: {n} images are too few for {', '.join(dropped)}; left out")
        return replace(s, metrics=keep)

    def _reference(self):
        t0 = time.time()
        src = EncodedDatasetImages(self.reference_root, device=self.preview.device,
                                   autoencoder=self.preview.autoencoder, limit=self.count)
        n = min(len(src), self.count)
        self.settings = self._settings(n, src.resolution)
        self.extractors = make_extractors(self.settings)
        self.ref = self._stats(src)
        self.ref.provenance = src.provenance
        self.log(f"in-training evaluation: reference = {n} images of {self.reference_root} "
                 f"({time.time() - t0:.1f} s, once); metrics {', '.join(self.settings.metrics)}")

    def _stats(self, images):
        s = self.settings
        return collect_statistics(images, self.extractors, fwd_level=s.fwd_level if "fwd" in s.metrics else None,
                                  swd=s.swd if "swd" in s.metrics else None, batch_size=64, progress=False,
                                  distributed=False)

    @torch.no_grad()
    def _samples(self, denoiser) -> tuple[torch.Tensor, float, float]:
        p, t0 = self.preview, time.time()
        latents = []
        for start in range(0, self.count, self.batch):
            seeds = list(range(start, min(start + self.batch, self.count)))
            labels = torch.tensor(seeds) % p.num_classes if p.num_classes > 0 else None
            z, _ = generate_latents(denoiser, seeds=seeds, shape=p.sample_shape, labels=labels,
                                    num_classes=p.num_classes, method=p.solver, nfe=p.nfe, sigma_min=p.sigma_min,
                                    sigma_max=p.sigma_max, device=p.device)
            latents.append(z)
        t1 = time.time()
        images = decode_to_uint8(torch.cat(latents), p.norm, autoencoder=p.autoencoder, device=p.device,
                                 batch_size=self.batch)
        return images, t1 - t0, time.time() - t1

    def run(self, tb: TBWriter, denoiser, step: int, images_seen: int, validation: dict | None) -> dict:
        """Generate, decode, measure; write tensorboard and one line of ``eval.jsonl``; returns the record."""
        if self.ref is None:
            self._reference()
        images, t_gen, t_dec = self._samples(denoiser)
        t0 = time.time()
        gen = self._stats(ArrayImages(images, description=f"EMA samples at step {step}"))
        metrics = compare(gen, self.ref, self.settings) if self.settings.metrics else {}
        t_met = time.time() - t0
        for tag, v in scalars_of(metrics).items():
            tb.scalar(tag, v, step)
        tb.scalar("eval/seconds", t_gen + t_dec + t_met, step)
        tb.flush()
        record = {"step": step, "images_seen": images_seen, "samples": self.count, "seeds": f"0-{self.count - 1}",
                  "solver": self.preview.solver, "nfe": self.preview.nfe, "metrics": metrics,
                  "validation": validation, "reference": self.ref.provenance,
                  "seconds": {"generate": t_gen, "decode": t_dec, "metrics": t_met}}
        with open(self.run_dir / EVAL_JSONL, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.log(f"step {step} eval: " + ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in
                                                   list(scalars_of(metrics).items())[:6])
                 + f" ({t_gen:.1f} s generating, {t_dec:.1f} s decoding, {t_met:.1f} s metrics)")
        return record
