"""The trainer's per-step work (issue 20): statistics on the device without host syncs, the stop-flag
agreement every K steps (its bound), the fused EMA update, the loader/core budget note."""
import math

import pytest
import torch

from latentdiff.training import signals
from latentdiff.training.ema import EMA, PowerEMA, update_averages
from latentdiff.training.power_ema import power_beta
from latentdiff.training.runtime import core_budget_note
from latentdiff.training.tb import NUM_BINS, SIGMA_BIN_EDGES, StepMetrics, reduce_metrics


def _host_syncs(fn) -> int:
    """How many times ``fn`` copies a tensor value to the host (``.item()``, ``float(t)``, ...)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


def test_step_metrics_accumulate_without_host_syncs_and_equal_the_float64_reference():
    g = torch.Generator().manual_seed(3)
    batches = [(torch.rand(8, generator=g) * 3, torch.exp(torch.randn(8, generator=g) * 2)) for _ in range(5)]
    m = StepMetrics("cpu")
    assert _host_syncs(lambda: [m.add(loss, sigma) for loss, sigma in batches]) == 0
    # the reference: float64 sums on the host, one micro-batch at a time (the trainer's earlier arithmetic)
    loss_sum, sums, counts = 0.0, [0.0] * NUM_BINS, [0] * NUM_BINS
    for loss, sigma in batches:
        loss_sum += float(loss.double().sum())
        for v, s in zip(loss.double().tolist(), sigma.double().tolist()):
            k = min(max(sum(1 for e in SIGMA_BIN_EDGES[1:-1].tolist() if s > e), 0), NUM_BINS - 1)
            sums[k] += v
            counts[k] += 1
    out, sig = reduce_metrics(m, torch.device("cpu"), 1)
    assert m.loss_sum == loss_sum and out["count"] == 40 and m.count == 40
    assert out["loss"] == loss_sum / 40
    for got, s, c in zip(out["bins"], sums, counts):
        assert (got is None) == (c == 0) and (got is None or got == pytest.approx(s / c, rel=1e-12))
    assert torch.equal(sig, torch.cat([s for _, s in batches]).double())
    m.reset()
    assert m.count == 0 and m.loss_sum == 0.0 and not m.sigmas


@pytest.mark.parametrize("every", [1, 4, 10])
def test_a_stop_signal_is_agreed_within_stop_check_every_steps(every, monkeypatch):
    """Bound (training/signals.py): a signal during step s is acted on after step ceil(s / K) * K."""
    monkeypatch.setitem(signals._STOP, "requested", False)
    for s in (1, 5, 8, 13):
        monkeypatch.setitem(signals._STOP, "requested", False)
        stopped_at = None
        for step in range(1, 40):
            if step == s:
                signals._STOP["requested"] = True  # the handler's effect, arriving during step s
            if signals.agree_stop(False, torch.device("cpu"), step, every):
                stopped_at = step
                break
        assert stopped_at == math.ceil(s / every) * every
        assert stopped_at - s < every
    monkeypatch.setitem(signals._STOP, "requested", False)
    assert not any(signals.agree_stop(False, torch.device("cpu"), step, every) for step in range(1, 30))


def test_the_fault_hook_sends_the_stop_signal_to_the_chosen_rank_only(monkeypatch):
    sent = []
    monkeypatch.setenv(signals.FAULT_ENV, "signal-rank:1:5")
    monkeypatch.setattr(signals.os, "kill", lambda pid, sig: sent.append(sig))
    for step in (4, 5, 6):
        signals.fault("signal-rank", step, 0)
        signals.fault("signal-rank", step, 1)
    assert sent == [signals.signal.SIGUSR1]


def test_fused_update_equals_each_rate_updated_on_its_own():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    ema, pema = EMA(net, [0.9, 0.999]), PowerEMA(net, [0.05, 0.10])
    ref = {k: [t.clone() for t in sh] for k, sh in {**ema.shadow, **{("p", s): v for s, v in pema.shadow.items()}}.items()}
    for step in range(1, 4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        t, dt = 16 * step, 16
        update_averages([ema, pema], [ema.weights(), pema.weights(t, dt)])
        for key, sh in ref.items():
            if isinstance(key, tuple):
                beta = power_beta(pema.gammas[key[1]], float(t), float(dt))
            else:
                beta = key
            for r, p in zip(sh, net.parameters()):
                r.lerp_(p.detach(), 1.0 - beta)
    for r in ema.rates:
        assert all(torch.equal(a, b) for a, b in zip(ema.shadow[r], ref[r]))
    for s in pema.rates:
        assert all(torch.equal(a, b) for a, b in zip(pema.shadow[s], ref[("p", s)]))
    # the single-average entry points do the same
    ema.update()
    for r in ema.rates:
        for a, b, p in zip(ema.shadow[r], ref[r], net.parameters()):
            assert torch.equal(a, b.lerp(p.detach(), 1.0 - r))
    other = EMA(torch.nn.Linear(5, 7), [0.5])
    with pytest.raises(ValueError, match="different parameters"):
        update_averages([ema, other], [ema.weights(), other.weights()])


def test_core_budget_note():
    assert core_budget_note(2, 1, 0, 2) is None
    assert core_budget_note(8, 1, 2, 32) is None
    note = core_budget_note(2, 1, 1, 2)
    assert "2 rank(s) x (1 compute thread(s) + 1 loader worker(s)) = 4 > 2 cores" in note
    assert "--num-workers 0 fits" in note
    assert "--num-workers 3 fits" in core_budget_note(8, 1, 6, 32)


def test_the_next_epochs_loader_started_early_yields_the_same_batches(tiny_dataset):
    """Trainer._batches starts the next epoch's workers before this epoch ends: the order is the one of
    loaders started one after the other, also when resuming mid-epoch."""
    from types import SimpleNamespace

    from latentdiff.data.reader import LatentShardDataset
    from latentdiff.training.trainer import Trainer

    ds = LatentShardDataset(tiny_dataset, 4, rank=0, world_size=1, num_workers=2, seed=0, shuffle=True,
                            shuffle_buffer=16, verify="none")
    n = ds.batches_per_epoch(0)
    assert n > 2

    def reference(epoch, start):
        ds.set_epoch(epoch, start)
        return [b[3] for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]

    def trainer_batches(epoch, start, count):
        stub = SimpleNamespace(cfg=SimpleNamespace(num_workers=2), data=ds, epoch=epoch, batch_in_epoch=start)
        stub._loader = lambda e, s: Trainer._loader(stub, e, s)
        gen = Trainer._batches(stub)
        out = [next(gen)[3] for _ in range(count)]
        gen.close()
        return out, (stub.epoch, stub.batch_in_epoch)

    want = reference(0, 0) + reference(1, 0) + reference(2, 0)
    got, pos = trainer_batches(0, 0, 3 * n)
    assert got == want and pos == (2, n)
    got, pos = trainer_batches(1, 3, 2 * n - 3)
    assert got == want[n + 3:] and pos == (2, n)


# ----------------------------------------------------------------------------------------------
# GPU options, tested on CPU where they run


def test_fused_adamw_choice():
    from latentdiff.training.engine import use_fused_adamw
    from latentdiff.utils.errors import ConfigError

    assert use_fused_adamw("auto", "cuda") and not use_fused_adamw("auto", "cpu")
    assert use_fused_adamw("fused", "cpu") and use_fused_adamw("fused", "cuda")
    assert not use_fused_adamw("default", "cuda") and not use_fused_adamw("default", "cpu")
    with pytest.raises(ConfigError, match="no fused AdamW for 'nodevice'"):
        use_fused_adamw("fused", "nodevice")


def test_channels_last_unet_runs_nhwc_convolutions_with_the_same_output():
    from latentdiff import models
    from latentdiff.training.config import TrainConfig
    from latentdiff.utils.errors import ConfigError

    torch.manual_seed(0)
    net = models.build("unet-tiny", in_channels=4, resolution=16, num_classes=3).eval()
    x, c_noise, labels = torch.randn(2, 4, 16, 16), torch.tensor([0.1, -0.5]), torch.tensor([0, 3])
    with torch.no_grad():
        ref = net(x, c_noise, labels)
    seen = []
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
             for m in convs]
    net.set_channels_last(True)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    # ZeRO-1/2 flattening gives the weights standard strides again: the inputs still run channels-last
    for m in convs:
        m.weight.data = m.weight.data.contiguous()
    with torch.no_grad():
        out = net(x, c_noise, labels)
    assert seen and all(seen), "a convolution saw an input in the standard layout"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for h in hooks:
        h.remove()
    with pytest.raises(ConfigError, match="channels_last: applies to the convolutional models"):
        TrainConfig(dataset="x", model="uvit-s", channels_last=True).validate()


def _cxx_compiler():
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not _cxx_compiler(), reason="torch.compile on CPU (inductor) needs a C++ compiler")
def test_compiled_and_eager_denoiser_give_the_same_loss_and_gradients():
    from latentdiff import models
    from latentdiff.diffusion.precond import EDMPrecond, edm_loss

    torch.manual_seed(0)
    net = models.build("uvit-tiny", in_channels=4, resolution=8, num_classes=3, depth=3)
    den = EDMPrecond(net, 0.5)
    y, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    sigma, labels = torch.tensor([0.01, 0.3, 1.0, 10.0]), torch.tensor([0, 1, 2, 3])

    def loss_and_grads():
        den.zero_grad(set_to_none=True)
        loss, _ = edm_loss(den, y, labels=labels, sigma=sigma, noise=noise)
        loss.mean().backward()
        return loss.detach(), [p.grad.clone() for p in den.parameters()]

    eager, g_eager = loss_and_grads()
    names = [n for n, _ in den.named_parameters()]
    den.compile()  # what engine.compile() does: in place
    assert [n for n, _ in den.named_parameters()] == names
    compiled, g_comp = loss_and_grads()
    assert den._compiled_call_impl is not None
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
