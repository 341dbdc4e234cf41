"""The DeepSpeed training loop: EDM loss (edm.txt Eq. 8, Table 1) under WSNR-aligned noise, EMA (fixed-rate
and EDM2 power-function with post-hoc snapshots), exact resume, tensorboard.

One engine holds the preconditioned denoiser (the VAE is never in it).  Per optimizer step and
micro-batch, every random draw (latent sample from the posterior, label dropout, sigma, noise) comes
from a generator seeded with f(seed, step, micro, rank) (:func:`~latentdiff.utils.seeds.step_seed`),
so runs repeat exactly and ranks differ; the data order depends only on (seed, epoch, rank, worker)
and resumes mid-epoch bit for bit.  Together with DeepSpeed restoring the model, optimizer, LR
scheduler and loss scaler, and the EMA and counters saved here, N steps + kill -9 + resume + N steps
equals 2N steps uninterrupted.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from latentdiff.contracts.manifest import load_manifest
from latentdiff.data.reader import LatentShardDataset, sample_latent
from latentdiff.diffusion.guidance import drop_labels
from latentdiff.diffusion.precond import EDMPrecond, edm_loss
from latentdiff.models import build as build_model
from latentdiff.training import evaluation, validation
from latentdiff.training.quality import QualityEval
from latentdiff.training.checkpoint import find_latest, save_checkpoint
from latentdiff.training.config import TrainConfig
from latentdiff.training.ema import EMA, PowerEMA, update_averages
from latentdiff.training.engine import LossScaleWatch, build_ds_config, build_engine, ds_precision, warmup_steps_for
from latentdiff.training.preview import SamplePreview
from latentdiff.training.resume import check_resume
from latentdiff.training.runtime import core_budget_note, usable_cores
from latentdiff.training.schedule import resolve_schedule
from latentdiff.training.signals import agree_stop, fault
from latentdiff.training.snapshots import SNAPSHOT_DIR, snapshot_due, write_snapshot
from latentdiff.training.state import TrainerState, load_trainer_state
from latentdiff.training.tb import StepMetrics, TBWriter, reduce_metrics, write_step_scalars
from latentdiff.utils import dist as ldist
from latentdiff.utils.errors import TrainError
from latentdiff.utils.io import atomic_write_json
from latentdiff.utils.safe_load import safe_torch_load_scope
from latentdiff.utils.seeds import step_seed

__all__ = ["Trainer", "log_above_bar", "PREFETCH"]

PREFETCH = 2  # batches each loader worker prepares ahead (DataLoader prefetch_factor)


def log_above_bar(log, msg: str) -> None:
    """``log(msg)`` with the progress bars cleared first and redrawn after, so the line stands on its own."""
    with tqdm.external_write_mode():
        log(msg)


class Trainer:
    def __init__(self, cfg: TrainConfig, ds_config: dict | None = None, *, log=print):
        self.cfg, self.log = cfg, log
        self.rank, self.world = ldist.get_rank(), ldist.get_world_size()
        self.is_main = self.rank == 0
        self.device = ldist.device()
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.stop_requested = False

        # data and everything derived from the dataset statistics --------------------------------
        self.manifest = load_manifest(cfg.dataset)
        self.schedule = resolve_schedule(cfg)
        self.norm = self.schedule.normalization
        self.sigma_dist = self.schedule.distribution()
        self.sample_shape = tuple(self.manifest.sample_shape)
        self.num_classes = self.manifest.num_classes if cfg.conditional else 0
        self.global_batch = cfg.resolved_global_batch(self.world)
        self.total_steps = cfg.total_steps(self.world)
        self.warmup_steps = warmup_steps_for(cfg, self.global_batch)

        self._build_engine(ds_config)

        # state ------------------------------------------------------------------------------------
        self.step, self.images_seen = 0, 0
        self.epoch, self.batch_in_epoch = 0, 0
        self.step_times: list[float] = []  # wall time of every optimizer step of this invocation (benchmarks)
        self.data = LatentShardDataset(
            cfg.dataset, cfg.micro_batch, rank=self.rank, world_size=self.world, num_workers=cfg.num_workers,
            seed=cfg.seed, shuffle=True, shuffle_buffer=cfg.shuffle_buffer, verify=cfg.verify_shards,
            normalization=self.norm,
        )
        for problem in self.data.problems:
            self.log(f"warning: {problem}")
        for note in self.data.notes:
            self.log(f"note: {note}")
        cores = core_budget_note(ldist.env_local_world_size(), torch.get_num_threads(), cfg.num_workers, usable_cores())
        if cores:
            self.log(f"note: {cores}")
        self.resolved = cfg.to_dict()
        self.preview = SamplePreview(
            self.run_dir, self.manifest.vae, self.norm, self.sample_shape, self.num_classes,
            solver=cfg.sample_solver, nfe=cfg.sample_nfe, count=cfg.sample_count,
            sigma_min=self.schedule.sigma_min, sigma_max=self.schedule.sigma_max, device=self.device)
        self._bar = None
        self._quality = None

    def _build_engine(self, ds_config: dict | None) -> None:
        """The network (same initial weights on every rank and run), the DeepSpeed engine, the EMAs."""
        cfg = self.cfg
        c, h, _ = self.sample_shape
        torch.manual_seed(cfg.seed)
        net = build_model(cfg.model, in_channels=c, resolution=h, num_classes=self.num_classes, **cfg.model_overrides)
        self.model_config = dict(net.config)
        self.null_label = net.null_label if self.num_classes > 0 else None  # the model's null class (CFG)
        self.ds_config = build_ds_config(cfg, ds_config, self.world)
        self.precision = ds_precision(self.ds_config)
        if cfg.channels_last:
            net.set_channels_last(True)
        self.engine, self.optimizer, self.lr_scheduler = build_engine(
            EDMPrecond(net, sigma_data=self.schedule.sigma_data), cfg, self.ds_config, self.warmup_steps,
            self.device.type)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.fused_adamw = bool(getattr(self.optimizer, "optimizer", self.optimizer).defaults.get("fused"))
        self.loss_scale = LossScaleWatch(self.engine, self.optimizer, self.ds_config, self.precision,
                                         cfg.fp16_max_min_scale_steps)
        self.ema = EMA(self.engine.module, cfg.ema_rates)
        self.power_ema = PowerEMA(self.engine.module, cfg.power_ema_sigma_rels) if cfg.power_ema_sigma_rels else None

    # checkpoints --------------------------------------------------------------------------------
    def state(self) -> TrainerState:
        return TrainerState(
            step=self.step, images_seen=self.images_seen, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
            world_size=self.world, zero_stage=self.zero_stage, precision=self.precision, config=self.resolved,
            model_config=self.model_config, schedule=self.schedule.to_dict(), dataset=self.manifest.reference(self.cfg.dataset),
        )

    def _say(self, msg: str) -> None:
        """Log a line; while the progress bar is shown, above it (the bar is redrawn below)."""
        if self._bar is not None:
            log_above_bar(self.log, msg)
        else:
            self.log(msg)

    def save(self) -> Path:
        hook = lambda where: fault("kill-mid-save", self.step, self.rank)  # noqa: E731
        path = save_checkpoint(self.engine, self.ckpt_root, self.step, self.state(), [self.ema, self.power_ema],
                               keep_last=self.cfg.keep_last, keep_every=self.cfg.keep_every, fault_hook=hook)
        if self.is_main:
            self._say(f"saved checkpoint {path}")
        fault("kill-after-save", self.step, self.rank)
        return path

    def maybe_resume(self) -> bool:
        cfg = self.cfg
        ckpt = find_latest(self.ckpt_root) if cfg.resume != "never" else None
        if ckpt is None:
            if cfg.resume == "must":
                raise TrainError(f"resume=must but {self.ckpt_root} holds no complete checkpoint")
            return False
        st = load_trainer_state(ckpt)
        diff = check_resume(ckpt, st, self.resolved, self.schedule, world=self.world, zero_stage=self.zero_stage,
                            force=cfg.force_resume, model_config=self.model_config)
        if diff and self.is_main:
            self.log("warning: resuming with a changed config (--force-resume):\n  " + "\n  ".join(diff))
        with safe_torch_load_scope():  # DeepSpeed's checkpoint engine loads with weights_only=False
            load_path, _ = self.engine.load_checkpoint(
                str(self.ckpt_root), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if load_path is None:
            raise TrainError(f"DeepSpeed could not load {ckpt}")
        self.ema.load(ckpt, self.rank, self.world)
        if self.power_ema is not None:
            self.power_ema.load(ckpt, self.rank, self.world)
        self.step, self.images_seen = st.step, st.images_seen
        self.epoch, self.batch_in_epoch = st.epoch, st.batch_in_epoch
        if self.is_main:
            self.log(f"resumed from {ckpt} at step {self.step} ({self.images_seen} images)")
        return True

    # data ---------------------------------------------------------------------------------------
    def _loader(self, epoch: int, start: int):
        """An iterator over the batches of ``epoch`` from batch ``start`` (its workers start now)."""
        self.data.set_epoch(epoch, start)
        w = self.cfg.num_workers
        return iter(torch.utils.data.DataLoader(self.data, batch_size=None, num_workers=w,
                                                prefetch_factor=PREFETCH if w > 0 else None, persistent_workers=False))

    def _batches(self):
        """Micro-batches forever from the current (epoch, batch_in_epoch); keeps the position current.

        With workers, the next epoch's loader starts ``PREFETCH`` batches before this epoch ends (its
        workers fork with the next epoch's order while this epoch's workers finish), so the step does not
        wait for worker start-up and the shuffle-buffer fill at each epoch boundary.  The order is the
        same as starting it afterwards: it depends only on (seed, epoch, rank, worker, start batch)."""
        ahead = None
        while True:
            if self.batch_in_epoch >= self.data.batches_per_epoch(self.epoch):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            it = ahead if ahead is not None else self._loader(self.epoch, self.batch_in_epoch)
            ahead, n = None, self.data.batches_per_epoch(self.epoch)
            for batch in it:
                self.batch_in_epoch += 1
                if self.cfg.num_workers > 0 and ahead is None and self.batch_in_epoch >= n - PREFETCH:
                    ahead = self._loader(self.epoch + 1, 0)
                yield batch
            del it

    def _model_batch(self, batch, g: torch.Generator):
        mean, std, labels, _ = batch
        y = self.norm.to_model(sample_latent(mean.to(self.device), std.to(self.device), g))
        if self.num_classes == 0:
            return y, None
        labels = labels.to(self.device)
        labels = torch.where(labels < 0, torch.full_like(labels, self.null_label), labels)
        return y, drop_labels(labels, self.cfg.label_dropout, self.null_label, g)

    # the loop -----------------------------------------------------------------------------------
    def _start(self) -> TBWriter:
        """Resume if possible, write config.json and the run description; the tensorboard writer."""
        self.maybe_resume()
        record = {"config": self.resolved, "schedule": self.schedule.to_dict()}
        if self.is_main:
            atomic_write_json(self.run_dir / "config.json", {**record, "ds_config": self.ds_config}, indent=1)
            self.log(self.describe())
        # events after the checkpoint (step + 1 onwards) from a killed run are dropped
        tb = TBWriter(self.run_dir / "tb", self.is_main, purge_step=self.step + 1 if self.step else None)
        if self.step == 0:
            tb.text("config", "```\n" + json.dumps(record, indent=1) + "\n```", 0)
        return tb

    def _train_step(self, batches, metrics: StepMetrics) -> None:
        """One optimizer step: ``grad_accum`` micro-batches, the EMA update, the counters."""
        for micro in range(self.cfg.grad_accum):
            g = torch.Generator(self.device).manual_seed(step_seed(self.cfg.seed, self.step, micro, self.rank))
            y, labels = self._model_batch(next(batches), g)
            loss, sigma = edm_loss(self.engine, y, self.sigma_dist, labels, generator=g)
            self.engine.backward(loss.mean())
            self.engine.step()
            metrics.add(loss, sigma)  # on the device: no host sync until log time
        self.step += 1
        self.images_seen += self.global_batch
        averages, weights = [self.ema], [self.ema.weights()]
        if self.power_ema is not None:  # beta from the image count after this step (EDM2 Sec. 3.1)
            averages.append(self.power_ema)
            weights.append(self.power_ema.weights(self.images_seen, self.global_batch))
        update_averages(averages, weights)  # every EMA and power EMA in one fused lerp

    def _maybe_snapshot(self) -> None:
        """Post-hoc EMA snapshot every ``snapshot_every_images`` and at the end of the duration (collective)."""
        every = self.cfg.snapshot_every_images
        if not every or self.power_ema is None:
            return
        if snapshot_due(self.images_seen, self.global_batch, every) or self.step == self.total_steps:
            path = write_snapshot(self.power_ema, self.run_dir / SNAPSHOT_DIR, step=self.step,
                                  images=self.images_seen, global_batch=self.global_batch,
                                  dtype=self.cfg.snapshot_dtype, keep=self.cfg.snapshot_keep)
            if path is not None and self.step == self.total_steps:
                self._say(f"EMA snapshots in {path.parent} (latentdiff-reconstruct-ema {self.run_dir})")

    def train(self) -> dict:
        """Train to the end of the duration (or ``max_steps``, or a stop signal); every rank calls."""
        cfg = self.cfg
        tb = self._start()
        heldout = self._heldout_batch() if cfg.heldout_batch else None
        val = self._validation_triples()
        metrics, batches = StepMetrics(self.device), self._batches()
        end = self.total_steps if not cfg.max_steps else min(self.total_steps, cfg.max_steps)
        self._bar = bar = tqdm(total=end, initial=self.step, disable=not self.is_main, desc="train", unit="step",
                               dynamic_ncols=True)
        t_window, img_window, last = time.time(), 0, {}
        self.engine.train()
        while self.step < end:
            t0 = time.time()
            self._train_step(batches, metrics)
            self._maybe_snapshot()
            img_window += self.global_batch
            fault("kill-rank", self.step, self.rank)
            fault("signal-rank", self.step, self.rank)
            self.loss_scale.check(self.step)
            # every stop_check_every steps: one small all-reduce (the bound: training/signals.py)
            stop = self.stop_requested = agree_stop(self.stop_requested, self.device, self.step, cfg.stop_check_every)
            if self.step % cfg.log_every == 0 or self.step == end:
                last = self._log(tb, metrics, time.time() - t_window, img_window, time.time() - t0)
                metrics.reset()
                t_window, img_window = time.time(), 0
                if heldout is not None:
                    self._log_heldout(tb, heldout)
            val_loss = None
            if val is not None and (self.step % cfg.val_every == 0 or self.step == end or stop):
                val_loss = self._log_validation(tb, val)
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == end):
                self._evaluate(tb, val_loss)
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self._log_samples(tb)
            self.step_times.append(time.time() - t0)
            bar.update(1)
            if last and self.is_main:
                bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
            if self.step % cfg.checkpoint_every == 0 or self.step == end or stop:
                self.save()
            if stop:
                if self.is_main:
                    self._say(f"stop requested (SIGTERM/SIGUSR1): saved step {self.step}, exiting")
                break
        bar.close()
        self._bar = None
        tb.close()
        return {"step": self.step, "finished": self.step >= self.total_steps, "stopped": self.stop_requested, **last}

    def describe(self) -> str:
        """The run in a few lines: data, layout, batch arithmetic, normalization and noise schedule."""
        s = self.schedule
        lines = [
            f"run {self.run_dir}: {self.cfg.model} on {self.cfg.dataset} ({self.manifest.num_samples} samples, "
            f"shape {self.sample_shape}, {self.num_classes} classes)",
            f"ranks {self.world}, ZeRO-{self.zero_stage}, {self.precision}; global batch {self.global_batch} = "
            f"{self.cfg.micro_batch} x {self.cfg.grad_accum} x {self.world}; {self.total_steps} steps",
            f"AdamW {'fused' if self.fused_adamw else 'torch default'} kernels"
            + (", torch.compile" if self.cfg.compile else "") + (", channels-last" if self.cfg.channels_last else ""),
            f"normalization {s.normalization.kind}, sigma_data {s.sigma_data:.4f}, "
            f"training sigma {s.sigma_dist}, sigma_max (data, alpha {s.sigma_max_rule.alpha}) {s.sigma_max:.3f}",
        ]
        if s.wsnr is not None:
            w = s.wsnr
            lines.append(f"WSNR alignment (DC {'included' if w.include_dc else 'excluded'}): sigma x "
                         f"{w.sigma_factor:.4f} (P_mean shift {w.p_mean_shift:+.4f}); DC-free variant: "
                         f"x {w.sigma_factor_dc_free:.4f}")
            if w.include_dc and abs(w.p_mean_shift) > 1.5:
                lines.append("note: a P_mean shift above 1.5 comes mostly from the zero frequency (the data mean); "
                             "--wsnr-include-dc false aligns without it")
        return "\n".join(lines)

    # logging ------------------------------------------------------------------------------------
    def _log(self, tb: TBWriter, metrics: StepMetrics, window_s: float, images: int, step_s: float) -> dict:
        """Reduce the window's metrics over ranks (a collective) and write them (rank 0)."""
        m, sig = reduce_metrics(metrics, self.device, self.world)
        out = {"loss": m["loss"]}
        if not self.is_main:
            return out
        gn = self.engine.get_global_grad_norm()
        scalars = {"lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": None if gn is None else float(gn),
                   "perf/images_per_s": images / max(window_s, 1e-9), "perf/step_time_s": step_s,
                   "progress/images_seen": self.images_seen}
        if scalars["grad_norm"] is not None:
            out["grad_norm"] = scalars["grad_norm"]
        if self.precision == "fp16":
            scalars.update({"fp16/loss_scale": self.loss_scale.scale(), "fp16/skipped_steps": self.engine.skipped_steps})
        write_step_scalars(tb, self.step, m, sig, scalars)
        return out

    # fixed batch: EMA vs raw; sample grid --------------------------------------------------------
    def _heldout_batch(self):
        n = min(self.cfg.heldout_batch, self.manifest.num_samples)
        if n < self.cfg.heldout_batch and self.is_main:
            self.log(f"warning: heldout_batch {self.cfg.heldout_batch} is larger than the dataset "
                     f"({self.manifest.num_samples} samples); the fixed batch uses all {n}")
        return evaluation.fixed_batch(self.cfg.dataset, n, self.cfg.seed, self.norm, self.sigma_dist, self.device,
                                      self.null_label if self.num_classes > 0 else None)

    def _ema_denoiser(self, rate: float):
        """The EMA denoiser of ``rate`` on rank 0, None elsewhere (collective under ZeRO-3)."""
        return evaluation.ema_denoiser(self.ema, rate, self.model_config, self.schedule.sigma_data, self.device,
                                       self.is_main)

    def _log_heldout(self, tb: TBWriter, heldout) -> None:
        denoisers = ((rate, self._ema_denoiser(rate)) for rate in self.ema.rates)  # one at a time, in rate order
        evaluation.log_fixed_batch(tb, self.step, self.engine, heldout, denoisers)

    def _validation_triples(self):
        """The fixed validation triples (training/validation.py), or None when there is no validation set."""
        root = validation.resolve_validation_dataset(self.cfg.val_dataset, self.cfg.dataset)
        if root is None or not self.cfg.val_every:
            return None
        triples = validation.fixed_triples(root, self.cfg.val_samples, self.norm, self.device,
                                           self.null_label if self.num_classes > 0 else None, self.manifest)
        if self.is_main:
            self.log(f"validation: {triples[0].shape[0]} fixed triples of {root} every {self.cfg.val_every} steps")
        return triples

    def _log_validation(self, tb: TBWriter, triples) -> dict:
        denoisers = ((rate, self._ema_denoiser(rate)) for rate in self.ema.rates)
        out = validation.log_validation(tb, self.step, self.engine, triples, denoisers, self.cfg.micro_batch)
        if self.is_main:
            self._say(f"step {self.step} validation loss " + ", ".join(f"{k} {v['loss']:.5f}" for k, v in out.items()))
        return out

    def _evaluate(self, tb: TBWriter, val_loss: dict | None) -> None:
        """Sample quality of the EMA model (training/quality.py); the gather is collective, the rest rank 0's."""
        d = self._ema_denoiser(max(self.ema.rates))
        if d is None:
            return
        if self._quality is None:
            ref = validation.resolve_validation_dataset(self.cfg.val_dataset, self.cfg.dataset) or Path(self.cfg.dataset)
            self._quality = QualityEval(self.run_dir, self.preview, ref, self.cfg.eval_samples, self.cfg.micro_batch,
                                        self._say)
        self._quality.run(tb, d, self.step, self.images_seen, val_loss)

    def _log_samples(self, tb: TBWriter) -> None:
        d = self._ema_denoiser(max(self.ema.rates))  # collective under ZeRO-3, then rank 0 only
        if d is not None:
            self.preview.log(tb, d, self.step)
