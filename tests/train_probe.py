"""Test helper (run under torchrun): train like ``latentdiff.train`` but record what the tests check.

    torchrun --nproc_per_node 2 tests/train_probe.py OUT.json -- <latentdiff.train flags>

Records per rank the sigmas and the first noise value drawn at every micro-step (through a wrapper of
``edm_loss``), then compares the live engine's output on a fixed batch with the export's (raw weights)
and with a gathered EMA of rate 0 when configured.  Rank 0 writes OUT.json.
"""
import json
import sys

import torch
import torch.distributed as dist

from latentdiff import dist as ldist
from latentdiff.train import parse_args
from latentdiff.training import trainer as trainer_mod
from latentdiff.training.config import config_from_args


def main():
    out_path = sys.argv[1]
    argv = sys.argv[sys.argv.index("--") + 1 :]
    args = parse_args(argv)
    world = ldist.env_world_size()
    cfg = config_from_args(args).validate(world)
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

    trainer_mod.edm_loss = recording_loss
    tr = trainer_mod.Trainer(cfg, ds, log=lambda m: None)
    result = tr.train()
    trainer_mod.edm_loss = real_loss

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
    all_draws = [None] * world
    if world > 1:
        dist.all_gather_object(all_draws, draws)
    else:
        all_draws = [draws]
    ldist.barrier()
    if ldist.get_rank() == 0:
        from latentdiff.export import export_checkpoint, load_export
        from latentdiff.training.checkpoint import find_latest

        ckpt = find_latest(tr.ckpt_root)
        exp = export_checkpoint(ckpt, tr.run_dir / "export" / ckpt.name)
        den, meta = load_export(exp, weights="raw")
        with torch.no_grad():
            exported = den(x, sigma, labels).float()
        json.dump({
            "result": result,
            "draws": all_draws,
            "export_vs_engine": float((exported - live).abs().max()),
            "live_scale": float(live.abs().max()),
            "ema0_vs_engine": ema0,
            "schedule": tr.schedule,
            "zero_stage": tr.zero_stage,
            "step": tr.step,
        }, open(out_path, "w"))
    ldist.destroy()


if __name__ == "__main__":
    main()
