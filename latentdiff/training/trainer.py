"""The DeepSpeed training loop: EDM loss under WSNR-aligned noise, EMA, exact resume, tensorboard.

One engine holds the preconditioned denoiser (the VAE is never in it).  Per optimizer step and
micro-batch, every random draw (latent sample from the posterior, label dropout, sigma, noise) comes
from a generator seeded with f(seed, step, micro, rank) (trap T8), so runs repeat exactly and ranks
differ; the data order depends only on (seed, epoch, rank, worker) and resumes mid-epoch bit for bit.
Together with DeepSpeed restoring the model, optimizer, LR scheduler and loss scaler, and the EMA
and counters saved here, N steps + kill -9 + resume + N steps equals 2N steps uninterrupted.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from latentdiff.utils import dist as ldist
from latentdiff.vae.normalization import Normalization
from latentdiff.data.manifest import load_manifest
from latentdiff.data.reader import LatentShardDataset, sample_latent
from latentdiff.utils.errors import ConfigError, TrainError
from latentdiff.diffusion.guidance import drop_labels
from latentdiff.diffusion.precond import EDMPrecond, edm_loss
from latentdiff.training.checkpoint import find_latest, load_trainer_state, save_checkpoint, tag_for
from latentdiff.training.config import TrainConfig, config_diff
from latentdiff.training.ema import EMA
from latentdiff.training.schedule import resolve_schedule
from latentdiff.contracts.schedule import TrainingSchedule
from latentdiff.training.tb import StepMetrics, TBWriter
from latentdiff.models import build as build_model, from_config

__all__ = ["Trainer", "build_ds_config", "fixed_batch", "step_seed"]

FAULT_ENV = "LATENTDIFF_FAULT"  # test-only fault injection, e.g. "kill-after-save:4" or "kill-rank:1:3"


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A 63-bit seed mixing (seed, step, micro, rank) (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 1 << 31], dtype=np.uint64)))


def build_ds_config(cfg: TrainConfig, base: dict | None, world_size: int) -> dict:
    """The DeepSpeed config: the user's JSON (ZeRO stage, precision, offload) + our batch/clip values."""
    ds = json.loads(json.dumps(base or {"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}))
    for forbidden in ("optimizer", "scheduler"):
        if forbidden in ds:
            raise ConfigError(
                f"the DeepSpeed config has an '{forbidden}' section; latentdiff builds AdamW and the warmup "
                f"schedule itself from the TrainConfig (lr, betas, eps, weight_decay, warmup_images): remove it"
            )
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.resolved_global_batch(world_size)
    ds["gradient_clipping"] = float(cfg.grad_clip)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    if cfg.precision != "auto":
        ds["bf16"] = {"enabled": cfg.precision == "bf16"}
        fp16 = ds.get("fp16", {}) if isinstance(ds.get("fp16"), dict) else {}
        fp16["enabled"] = cfg.precision == "fp16"
        ds["fp16"] = fp16
    zero = ds.setdefault("zero_optimization", {})
    if isinstance(zero.get("offload_optimizer"), dict) and zero["offload_optimizer"].get("device", "none") != "none":
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def _precision(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def _fault(kind: str, step: int, rank: int) -> None:
    """Test-only: ``LATENTDIFF_FAULT=kill-after-save:S`` (every rank, right after the save of step S),
    ``kill-rank:R:S`` (rank R at step S), ``kill-mid-save:S`` (rank 0 inside the save of step S)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] == kind == "kill-after-save" and int(parts[1]) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if parts[0] == kind == "kill-rank" and int(parts[1]) == rank and int(parts[2]) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if parts[0] == kind == "kill-mid-save" and int(parts[1]) == step and rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def fixed_batch(dataset, n: int, seed: int, norm: Normalization, sigma_dist, device, null_label: int | None):
    """The fixed batch of the raw-vs-EMA loss curve: ``(y, labels, sigma, noise)``, identical on every rank.

    Trap T11: the batch is not split across ranks.  Every rank reads the same first ``n`` samples (in
    manifest order, as one reader of a world of size 1) and draws the same latents, sigmas and noise
    from one seed, so every rank runs the same forwards -- the ZeRO-3 parameter gathers inside them
    are matched one for one whatever ``n``, the shard sizes or the number of ranks.  Rank 0 logs.
    """
    ds = LatentShardDataset(dataset, n, rank=0, world_size=1, num_workers=0, shuffle=False, verify="none")
    mean, std, labels, _ = next(iter(ds))
    g = torch.Generator(device).manual_seed(step_seed(seed, -1 % (1 << 31), 0, 0))
    y = norm.to_model(sample_latent(mean.to(device), std.to(device), g))
    lab = None
    if null_label is not None:
        labels = labels.to(device)
        lab = torch.where(labels < 0, torch.full_like(labels, null_label), labels)
    sigma = sigma_dist.sample(y.shape[0], g, device)
    noise = torch.randn(y.shape, generator=g, device=device)
    return y, lab, sigma, noise


_STOP = {"requested": False}


def install_signal_handlers() -> None:
    """SIGTERM/SIGUSR1 (SLURM preemption) set a flag; every rank checks the all-reduced flag each step,
    then all save and exit 0.  Installed at the very start of ``main`` so no signal is lost during setup."""

    def handler(signum, frame):
        _STOP["requested"] = True

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, handler)


class Trainer:
    def __init__(self, cfg: TrainConfig, ds_config: dict | None = None, *, log=print):
        import deepspeed

        self.cfg = cfg
        self.log = log
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
        self.sample_shape = tuple(self.manifest["sample_shape"])
        c, h, w = self.sample_shape
        n_cls = int(self.manifest.get("num_classes") or 0)
        self.num_classes = n_cls if cfg.conditional else 0
        self.global_batch = cfg.resolved_global_batch(self.world)
        self.total_steps = cfg.total_steps(self.world)
        self.warmup_steps = math.ceil(cfg.warmup_images / self.global_batch) if cfg.warmup_images else 0

        # model + engine ---------------------------------------------------------------------------
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
        net = build_model(cfg.model, in_channels=c, resolution=h, num_classes=self.num_classes, **cfg.model_overrides)
        self.model_config = dict(net.config)
        self.null_label = net.null_label if self.num_classes > 0 else None  # the model's null class (CFG)
        denoiser = EDMPrecond(net, sigma_data=self.schedule.sigma_data)
        self.ds_config = build_ds_config(cfg, ds_config, self.world)
        self.precision = _precision(self.ds_config)
        opt = torch.optim.AdamW(
            [p for p in denoiser.parameters() if p.requires_grad], lr=cfg.lr, betas=tuple(cfg.betas),
            eps=cfg.eps, weight_decay=cfg.weight_decay,
        )
        warm = self.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=denoiser, optimizer=opt, lr_scheduler=sched, config=self.ds_config,
            dist_init_required=not dist.is_initialized(),
        )
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.loss_scaler = getattr(self.optimizer, "loss_scaler", None)
        if self.precision == "fp16" and self.loss_scaler is not None:
            # DeepSpeed raises a bare Exception at the first overflow at the minimum scale; we count the
            # skipped steps there ourselves and stop with a clear TrainError (see _check_loss_scale)
            self.loss_scaler.raise_error_at_min_scale = False
        self.ema = EMA(self.engine.module, cfg.ema_rates)

        # state ------------------------------------------------------------------------------------
        self.step = 0
        self.images_seen = 0
        self.epoch, self.batch_in_epoch = 0, 0
        self.min_scale_streak = 0
        self.step_times: list[float] = []  # wall time of every optimizer step of this invocation (benchmarks)
        self.data = LatentShardDataset(
            cfg.dataset, cfg.micro_batch, rank=self.rank, world_size=self.world, num_workers=cfg.num_workers,
            seed=cfg.seed, shuffle=True, shuffle_buffer=cfg.shuffle_buffer, verify=cfg.verify_shards,
            normalization=self.norm,
        )
        for problem in self.data.problems:
            self.log(f"warning: {problem}")
        self.resolved = cfg.to_dict()

    # ------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.world,
            "zero_stage": self.zero_stage,
            "precision": self.precision,
            "config": self.resolved,
            "model_config": self.model_config,
            "precond": self.engine.module.to_dict(),
            "schedule": self.schedule.to_dict(),
            "num_classes": self.num_classes,
            "null_label": self.null_label,
            "dataset": {
                "path": str(Path(self.cfg.dataset).resolve()),
                "vae": self.manifest["vae"],
                "shards_hash": self.manifest.get("shards_hash"),
                "num_samples": self.manifest.get("num_samples"),
                "num_classes": self.manifest.get("num_classes"),
                "class_names": self.manifest.get("class_names"),
                "resolution": self.manifest.get("resolution"),
                "sample_shape": list(self.sample_shape),
            },
            "time": time.time(),
        }

    def save(self) -> Path:
        hook = lambda where: _fault("kill-mid-save", self.step, self.rank)  # noqa: E731
        path = save_checkpoint(self.engine, self.ckpt_root, self.step, self.state(), self.ema,
                               keep_last=self.cfg.keep_last, keep_every=self.cfg.keep_every, fault_hook=hook)
        if self.is_main:
            self.log(f"saved checkpoint {path}")
        _fault("kill-after-save", self.step, self.rank)
        return path

    def maybe_resume(self) -> bool:
        cfg = self.cfg
        ckpt = find_latest(self.ckpt_root) if cfg.resume != "never" else None
        if ckpt is None:
            if cfg.resume == "must":
                raise TrainError(f"resume=must but {self.ckpt_root} holds no complete checkpoint")
            return False
        st = load_trainer_state(ckpt)
        if st["world_size"] != self.world and self.zero_stage > 0:
            raise TrainError(
                f"{ckpt} was written by {st['world_size']} ranks but {self.world} are running; ZeRO checkpoints "
                f"resume on the same number of ranks (use DeepSpeed's universal checkpoint to change it)"
            )
        diff = config_diff(st["config"], self.resolved)
        diff += TrainingSchedule.from_dict(st["schedule"], f"{ckpt} schedule").diff(self.schedule)
        if diff and not cfg.force_resume:
            raise TrainError(
                f"refusing to resume {ckpt}: the config changed in ways that matter:\n  " + "\n  ".join(diff)
                + "\nrevert these fields, start a new run_dir, or pass --force-resume true to accept the change"
            )
        if diff and self.is_main:
            self.log("warning: resuming with a changed config (--force-resume):\n  " + "\n  ".join(diff))
        load_path, _ = self.engine.load_checkpoint(
            str(self.ckpt_root), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise TrainError(f"DeepSpeed could not load {ckpt}")
        self.ema.load(ckpt, self.rank, self.world)
        self.step, self.images_seen = int(st["step"]), int(st["images_seen"])
        self.epoch, self.batch_in_epoch = int(st["epoch"]), int(st["batch_in_epoch"])
        if self.is_main:
            self.log(f"resumed from {ckpt} at step {self.step} ({self.images_seen} images)")
        return True

    # data ---------------------------------------------------------------------------------------
    def _batches(self):
        """Micro-batches forever from the current (epoch, batch_in_epoch); keeps the position current."""
        while True:
            if self.batch_in_epoch >= self.data.batches_per_epoch(self.epoch):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.data.set_epoch(self.epoch, self.batch_in_epoch)
            loader = torch.utils.data.DataLoader(
                self.data, batch_size=None, num_workers=self.cfg.num_workers,
                prefetch_factor=2 if self.cfg.num_workers > 0 else None, persistent_workers=False,
            )
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            del loader

    def _model_batch(self, batch, g: torch.Generator):
        mean, std, labels, _ = batch
        z = sample_latent(mean.to(self.device), std.to(self.device), g)
        y = self.norm.to_model(z)
        if self.num_classes > 0:
            labels = labels.to(self.device)
            labels = torch.where(labels < 0, torch.full_like(labels, self.null_label), labels)
            labels = drop_labels(labels, self.cfg.label_dropout, self.null_label, g)
        else:
            labels = None
        return y, labels

    # signals ------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        install_signal_handlers()

    # the loop -----------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        self.maybe_resume()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps({"config": self.resolved, "schedule": self.schedule.to_dict(),
                                                                  "ds_config": self.ds_config}, indent=1))
            self.log(self.describe())
        # events after the checkpoint (step + 1 onwards) from a killed run are dropped
        tb = TBWriter(self.run_dir / "tb", self.is_main, purge_step=self.step + 1 if self.step else None)
        if self.step == 0 and self.is_main:
            tb.text("config", "```\n" + json.dumps({"config": self.resolved, "schedule": self.schedule.to_dict()}, indent=1) + "\n```", 0)
        heldout = self._heldout_batch() if cfg.heldout_batch else None
        metrics = StepMetrics()
        batches = self._batches()
        end = self.total_steps if not cfg.max_steps else min(self.total_steps, cfg.max_steps)
        from tqdm import tqdm

        bar = tqdm(total=end, initial=self.step, disable=not self.is_main, desc="train", unit="step", dynamic_ncols=True)
        t_window, img_window = time.time(), 0
        last = {}
        self.engine.train()
        while self.step < end:
            t0 = time.time()
            for micro in range(cfg.grad_accum):
                g = torch.Generator(self.device).manual_seed(step_seed(cfg.seed, self.step, micro, self.rank))
                y, labels = self._model_batch(next(batches), g)
                loss, sigma = edm_loss(self.engine, y, self.sigma_dist, labels, generator=g)
                self.engine.backward(loss.mean())
                self.engine.step()
                metrics.add(loss, sigma)
            self.ema.update()
            self.step += 1
            self.images_seen += self.global_batch
            img_window += self.global_batch
            _fault("kill-rank", self.step, self.rank)
            self._check_loss_scale()
            # one small all-reduce per step: the stop flag and, on logging steps, the metrics
            log_now = self.step % cfg.log_every == 0 or self.step == end
            stop = self._agree_stop()
            if log_now:
                last = self._log(tb, metrics, time.time() - t_window, img_window, time.time() - t0)
                metrics.reset()
                t_window, img_window = time.time(), 0
            if heldout is not None and (self.step % cfg.log_every == 0 or self.step == end):
                self._log_heldout(tb, heldout)
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
                    self.log(f"stop requested (SIGTERM/SIGUSR1): saved step {self.step}, exiting")
                break
        bar.close()
        tb.close()
        finished = self.step >= self.total_steps
        return {"step": self.step, "finished": finished, "stopped": self.stop_requested, **last}

    def describe(self) -> str:
        s = self.schedule
        lines = [
            f"run {self.run_dir}: {self.cfg.model} on {self.cfg.dataset} ({self.manifest['num_samples']} samples, "
            f"shape {self.sample_shape}, {self.num_classes} classes)",
            f"ranks {self.world}, ZeRO-{self.zero_stage}, {self.precision}; global batch {self.global_batch} = "
            f"{self.cfg.micro_batch} x {self.cfg.grad_accum} x {self.world}; {self.total_steps} steps",
            f"normalization {s.normalization.kind}, sigma_data {s.sigma_data:.4f}, "
            f"training sigma {s.sigma_dist}, sigma_max (data, alpha {s.sigma_max_rule.alpha}) {s.sigma_max:.3f}",
        ]
        if s.wsnr is not None:
            w = s.wsnr
            lines.append(f"WSNR alignment (DC {'included' if w.include_dc else 'excluded'}): sigma x "
                         f"{w.sigma_factor:.4f} (P_mean shift {w.p_mean_shift:+.4f}); DC-free variant: "
                         f"x {w.sigma_factor_dc_free:.4f}")
            if abs(w.p_mean_shift) > 1.5:
                lines.append(
                    "warning: the WSNR alignment moves P_mean by more than 1.5 (a factor "
                    f"{w.sigma_factor:.3g} in sigma). Eq. 2 includes the zero frequency, which holds the squared "
                    "data mean; with normalization=channel the latents have zero mean while the RGB reference does "
                    "not, so the DC bin dominates the comparison. Check that this is intended; "
                    "--wsnr-include-dc false uses the DC-free WSNR."
                )
        return "\n".join(lines)

    def _agree_stop(self) -> bool:
        self.stop_requested = self.stop_requested or _STOP["requested"]
        if not (dist.is_available() and dist.is_initialized()) or self.world == 1:
            return self.stop_requested
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag)
        self.stop_requested = bool(flag.item() > 0)
        return self.stop_requested

    def _check_loss_scale(self) -> None:
        if self.precision != "fp16":
            return
        scale = self._loss_scale()
        min_scale = self.ds_config.get("fp16", {}).get("min_loss_scale", 1)
        skipped = not self.engine.was_step_applied()
        self.min_scale_streak = self.min_scale_streak + 1 if (skipped and scale is not None and scale <= min_scale) else 0
        if self.min_scale_streak >= self.cfg.fp16_max_min_scale_steps:
            raise TrainError(
                f"fp16 loss scale stuck at its minimum {min_scale} for {self.min_scale_streak} skipped steps "
                f"(step {self.step}): the loss overflows; lower lr, use bf16 (--precision bf16) or fp32"
            )

    def _loss_scale(self):
        if self.loss_scaler is not None and hasattr(self.loss_scaler, "cur_scale"):
            return float(self.loss_scaler.cur_scale)
        v = getattr(self.optimizer, "cur_scale", None)
        return None if v is None else float(v)

    def _log(self, tb: TBWriter, metrics: StepMetrics, window_s: float, images: int, step_s: float) -> dict:
        buf = metrics.packed().to(self.device)
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            dist.all_reduce(buf)
        m = StepMetrics.unpack(buf.cpu())
        sig = torch.cat(metrics.sigmas) if metrics.sigmas else torch.empty(0)
        if self.world > 1:  # every rank's sigmas for the histogram (same size on every rank)
            parts = [torch.empty_like(sig) for _ in range(self.world)]
            dist.all_gather(parts, sig.to(self.device) if self.device.type != "cpu" else sig)
            sig = torch.cat([p.cpu() for p in parts])
        out = {"loss": m["loss"]}
        if self.is_main:
            s = self.step
            tb.scalar("loss/train", m["loss"], s)
            for i, v in enumerate(m["bins"]):
                tb.scalar(f"loss_per_sigma/bin{i}", v, s)
            tb.scalar("lr", self.lr_scheduler.get_last_lr()[0], s)
            gn = self.engine.get_global_grad_norm()
            if gn is not None:
                gn = float(gn)
                tb.scalar("grad_norm", gn, s)
                out["grad_norm"] = gn
            if self.precision == "fp16":
                tb.scalar("fp16/loss_scale", self._loss_scale(), s)
                tb.scalar("fp16/skipped_steps", self.engine.skipped_steps, s)
            tb.scalar("perf/images_per_s", images / max(window_s, 1e-9), s)
            tb.scalar("perf/step_time_s", step_s, s)
            tb.scalar("progress/images_seen", self.images_seen, s)
            tb.histogram("sigma", sig, s)
            tb.flush()
        return out

    # fixed batch: EMA vs raw ----------------------------------------------------------------------
    def _heldout_batch(self):
        n = min(self.cfg.heldout_batch, int(self.manifest["num_samples"]))
        if n < self.cfg.heldout_batch and self.is_main:
            self.log(f"warning: heldout_batch {self.cfg.heldout_batch} is larger than the dataset "
                     f"({self.manifest['num_samples']} samples); the fixed batch uses all {n}")
        return fixed_batch(self.cfg.dataset, n, self.cfg.seed, self.norm, self.sigma_dist, self.device,
                           self.null_label if self.num_classes > 0 else None)

    def _ema_denoiser(self, rate: float):
        """A plain (non-engine) copy of the denoiser with EMA weights on rank 0; None elsewhere.
        Collective under ZeRO-3 (every rank calls)."""
        state = self.ema.full_state(rate, dst=0)
        if not self.is_main:
            return None
        net = from_config(self.model_config)
        d = EDMPrecond(net, self.schedule.sigma_data)
        missing, unexpected = d.load_state_dict(state, strict=False)
        params = {n for n, _ in d.named_parameters()}
        if unexpected or [k for k in missing if k in params]:
            raise TrainError(f"EMA state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return d.to(self.device).eval()

    @torch.no_grad()
    def _log_heldout(self, tb: TBWriter, heldout) -> None:
        y, lab, sigma, noise = heldout
        self.engine.eval()
        raw, _ = edm_loss(self.engine, y, labels=lab, sigma=sigma, noise=noise)  # same on every rank
        self.engine.train()
        for rate in self.ema.rates:
            d = self._ema_denoiser(rate)
            if d is not None:
                ema_loss, _ = edm_loss(d, y, labels=lab, sigma=sigma, noise=noise)
                tb.scalar(f"loss_fixed_batch/ema_{rate:g}", ema_loss.mean(), self.step)
        if self.is_main:
            tb.scalar("loss_fixed_batch/raw", raw.mean(), self.step)

    # sample grid ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _log_samples(self, tb: TBWriter) -> None:
        rate = max(self.ema.rates)
        d = self._ema_denoiser(rate)  # collective under ZeRO-3, then rank 0 only: no collectives below
        if d is None:
            return
        from latentdiff.vae.decode import decode_to_uint8, image_grid
        from latentdiff.solvers.generate import generate_latents

        n = self.cfg.sample_count
        labels = (torch.arange(n) % self.num_classes) if self.num_classes > 0 else None
        z, _ = generate_latents(d, seeds=list(range(n)), shape=self.sample_shape, labels=labels,
                                num_classes=self.num_classes, method="nfe-guided",
                                nfe=self.cfg.sample_nfe, sigma_min=self.schedule.sigma_min,
                                sigma_max=self.schedule.sigma_max, device=self.device)
        imgs = decode_to_uint8(z, self.norm, self.manifest["vae"], device=self.device)
        grid = image_grid(imgs)
        tb.image("samples/ema", grid, self.step)
        out = self.run_dir / "samples"
        out.mkdir(exist_ok=True)
        from PIL import Image

        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out / f"{tag_for(self.step)}.png")
