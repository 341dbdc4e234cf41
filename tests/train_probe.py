"""Test helper (run under torchrun): train like ``latentdiff.train`` but record what the tests check.

    torchrun --nproc_per_node 2 tests/train_probe.py OUT.json -- <latentdiff.train flags>

Records per rank the sigmas and the first noise value drawn at every micro-step (through a wrapper of
``edm_loss``), this rank's own loss sums at every logging step (before the all-reduce), a digest of the
fixed held-out batch, whether this rank's tensorboard writer is open, and the dtypes of the module
parameters, of the optimizer's (master) parameters and of its states; then compares the live engine's output on a fixed batch with the export's (raw weights)
and with a gathered EMA of rate 0 when configured.  Rank 0 writes OUT.json.
"""
import json
import sys

import torch
import torch.distributed as dist

from latentdiff.utils import dist as ldist
from latentdiff.cli.train import parse_args
from latentdiff.training import trainer as trainer_mod
from latentdiff.training.config import TrainConfig
from latentdiff.utils.config import config_from_args


def main():
    out_path = sys.argv[1]
    argv = sys.argv[sys.argv.index("--") + 1 :]
    args = parse_args(argv)
    world = ldist.env_world_size()
    cfg = config_from_args(TrainConfig, args).validate(world)
    ds = json.load(open(args.deepspeed_config)) if args.deepspeed_config else None
    ldist.init_distributed(single_process_group=True)
    draws = []
    real_loss = trainer_mod.edm_loss

    def recording_loss(denoiser, y, sigma_dist=None, labels=None, generator=None, **kw):
        if generator is not None and "sigma" not in kw:
            state = generator.get_state()
            s = sigma_dist.sample(y.shape[0], generator=generator, device=y.device)
            n = torch.randn(y.shape, generator=generator, device=y.device)
            generator.set_state(state)
            draws.append({"sigma": s.tolist(), "noise0": float(n.flatten()[0]), "y0": float(y.flatten()[0]),
                          "labels": None if labels is None else labels.tolist()})
        return real_loss(denoiser, y, sigma_dist, labels, generator=generator, **kw)

    windows, heldout, writers = [], [], []
    real_log, real_heldout = trainer_mod.Trainer._log, trainer_mod.Trainer._heldout_batch
    real_tb = trainer_mod.TBWriter

    def recording_log(self, tb, metrics, *a, **k):
        m = trainer_mod.StepMetrics.unpack(metrics.packed())
        windows.append({"step": self.step, "loss_sum": metrics.loss_sum, "count": m["count"]})
        return real_log(self, tb, metrics, *a, **k)

    def recording_heldout(self):
        y, lab, sigma, noise = real_heldout(self)
        heldout.append({"n": y.shape[0], "y": float(y.double().sum()), "sigma": sigma.tolist(),
                        "noise": float(noise.double().sum()), "labels": None if lab is None else lab.tolist()})
        return y, lab, sigma, noise

    def recording_tb(*a, **k):
        w = real_tb(*a, **k)
        writers.append(w.writer is not None)
        return w

    trainer_mod.edm_loss = recording_loss
    trainer_mod.Trainer._log, trainer_mod.Trainer._heldout_batch = recording_log, recording_heldout
    trainer_mod.TBWriter = recording_tb
    logs = []
    tr = trainer_mod.Trainer(cfg, ds, log=logs.append)
    result = tr.train()
    trainer_mod.edm_loss = real_loss
    trainer_mod.Trainer._log, trainer_mod.Trainer._heldout_batch = real_log, real_heldout
    trainer_mod.TBWriter = real_tb
    base = getattr(tr.optimizer, "optimizer", tr.optimizer)  # the AdamW under DeepSpeed's wrapper
    dtypes = {
        "module": sorted({str(p.dtype) for p in tr.engine.module.parameters()}),
        # the tensors Adam steps (the keys of its state) are the master weights
        "master": sorted({str(p.dtype) for p in base.state.keys()}),
        "optimizer_state": sorted({str(v.dtype) for st in base.state.values() for v in st.values()
                                   if torch.is_tensor(v) and v.numel() > 1}),
    }
    mine = {"windows": windows, "heldout": heldout, "tb_writer": writers, "dtypes": dtypes,
            "warnings": [m for m in logs if m.startswith("warning")]}

    # fixed batch through the live engine (collective under ZeRO-3: every rank calls)
    g = torch.Generator().manual_seed(123)
    c, h, w = tr.sample_shape
    x = torch.randn(4, c, h, w, generator=g)
    sigma = torch.tensor([0.01, 0.3, 1.0, 10.0])
    labels = torch.tensor([0, 1, 2, tr.num_classes]) if tr.num_classes else None
    tr.engine.eval()
    with torch.no_grad():
        live = tr.engine(x, sigma, labels).float()
    ema0 = None
    if 0.0 in tr.ema.rates:
        d = tr._ema_denoiser(0.0)
        if d is not None:
            with torch.no_grad():
                ema0 = float((d(x, sigma, labels) - live).abs().max())
    all_draws, per_rank = [None] * world, [None] * world
    if world > 1:
        dist.all_gather_object(all_draws, draws)
        dist.all_gather_object(per_rank, mine)
    else:
        all_draws, per_rank = [draws], [mine]
    ldist.barrier()
    if ldist.get_rank() == 0:
        from latentdiff.training.export import export_checkpoint
        from latentdiff.contracts.export import load_export
        from latentdiff.training.checkpoint import find_latest

        ckpt = find_latest(tr.ckpt_root)
        exp = export_checkpoint(ckpt, tr.run_dir / "export" / ckpt.name)
        den, meta = load_export(exp, weights="raw")
        with torch.no_grad():
            exported = den(x, sigma, labels).float()
        json.dump({
            "result": result,
            "draws": all_draws,
            "per_rank": per_rank,
            "export_vs_engine": float((exported - live).abs().max()),
            "live_scale": float(live.abs().max()),
            "ema0_vs_engine": ema0,
            "schedule": tr.schedule.to_dict(),
            "zero_stage": tr.zero_stage,
            "step": tr.step,
        }, open(out_path, "w"))
    ldist.destroy()


if __name__ == "__main__":
    main()
