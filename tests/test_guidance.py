"""Label dropout and classifier-free guidance (latentdiff.diffusion.guidance) around real backbones."""
from __future__ import annotations

import pytest
import torch

from latentdiff.utils.errors import ConfigError
from latentdiff.diffusion.guidance import drop_labels, guided_denoiser
from latentdiff.models import build
from latentdiff.diffusion.precond import EDMPrecond


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core CI box, 2 OpenMP threads competing with other jobs
    were measured 20-30x slower per step than 1 thread (spin-waiting); results are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Counting(torch.nn.Module):
    """Wraps a denoiser and records the batch size of every forward."""

    def __init__(self, den):
        super().__init__()
        self.den, self.model, self.batches = den, den.model, []

    def forward(self, x, sigma, labels=None):
        self.batches.append(x.shape[0])
        return self.den(x, sigma, labels)


@pytest.fixture(params=["uvit-tiny", "unet-tiny"])
def den(request):
    torch.manual_seed(3)
    model = build(request.param, in_channels=4, resolution=8, num_classes=5).double().eval()
    return Counting(EDMPrecond(model, sigma_data=0.5))


def _inputs(b=4):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.tensor([0, 3, 4, 1][:b])


def test_scale_one_is_exactly_conditional_and_zero_unconditional(den):
    x, y = _inputs()
    sigma = torch.full((4,), 1.3, dtype=torch.float64)
    with torch.no_grad():
        cond = den.den(x, sigma, y)
        uncond = den.den(x, sigma, torch.full_like(y, 5))
        den.batches.clear()
        assert torch.equal(guided_denoiser(den, y, scale=1.0)(x, sigma), cond)
        assert torch.equal(guided_denoiser(den, y, scale=0.0)(x, sigma), uncond)
    assert den.batches == [4, 4]  # one forward each, no wasted unconditional/conditional half


def test_batched_forward_equals_two_separate_forwards_on_all_channels(den):
    x, y = _inputs()
    sigma = torch.tensor([0.05, 0.7, 2.0, 30.0], dtype=torch.float64)
    w = 2.5
    with torch.no_grad():
        cond = den.den(x, sigma, y)
        uncond = den.den(x, sigma, torch.full_like(y, den.model.null_label))
        den.batches.clear()
        out = guided_denoiser(den, y, scale=w)(x, sigma)
    assert den.batches == [8]  # ONE batched forward of cond + uncond
    torch.testing.assert_close(out, uncond + w * (cond - uncond), rtol=1e-10, atol=1e-12)
    # every latent channel is guided (not just the first three)
    for ch in range(4):
        assert not torch.allclose(out[:, ch], cond[:, ch])


def test_float_sigma_and_custom_null_label(den):
    x, y = _inputs()
    with torch.no_grad():
        cond = den.den(x, 0.9, y)
        uncond0 = den.den(x, 0.9, torch.zeros_like(y))
        out = guided_denoiser(den, y, scale=3.0, null_label=0)(x, 0.9)
    torch.testing.assert_close(out, uncond0 + 3.0 * (cond - uncond0), rtol=1e-10, atol=1e-12)


def test_guidance_interval(den):
    x, y = _inputs()
    w, lo, hi = 2.0, 0.3, 3.0
    f = guided_denoiser(den, y, scale=w, interval=(lo, hi))
    with torch.no_grad():
        for s in (0.1, 10.0):  # outside: conditional model only, one forward of the batch
            sigma = torch.full((4,), s, dtype=torch.float64)
            den.batches.clear()
            assert torch.equal(f(x, sigma), den.den(x, sigma, y))
            assert den.batches[0] == 4
        for s in (lo, 1.0, hi):  # inside (closed interval): guided
            sigma = torch.full((4,), s, dtype=torch.float64)
            den.batches.clear()
            out = f(x, sigma)
            assert den.batches == [8]
            cond, uncond = den.den(x, sigma, y), den.den(x, sigma, torch.full_like(y, 5))
            torch.testing.assert_close(out, uncond + w * (cond - uncond), rtol=1e-10, atol=1e-12)
        # per-sample sigmas straddling the interval: one forward of B + (#inside) rows
        sigma = torch.tensor([0.1, 1.0, 2.0, 10.0], dtype=torch.float64)
        den.batches.clear()
        out = f(x, sigma)
        assert den.batches == [6]
        cond, uncond = den.den(x, sigma, y), den.den(x, sigma, torch.full_like(y, 5))
        want = cond.clone()
        want[1:3] = uncond[1:3] + w * (cond[1:3] - uncond[1:3])
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)


def test_guidance_errors():
    uncond = EDMPrecond(build("uvit-tiny", in_channels=3, resolution=8))
    with pytest.raises(ConfigError, match="no null class"):
        guided_denoiser(uncond, torch.tensor([0]), scale=2.0)
    cond = EDMPrecond(build("uvit-tiny", in_channels=3, resolution=8, num_classes=2))
    with pytest.raises(ConfigError, match="interval"):
        guided_denoiser(cond, torch.tensor([0]), scale=2.0, interval=(3.0, 1.0))
    with pytest.raises(ConfigError, match="scale"):
        guided_denoiser(cond, torch.tensor([0]), scale=float("nan"))
    f = guided_denoiser(cond, torch.tensor([0, 1]), scale=2.0)
    with pytest.raises(ValueError, match="batch of 3"):
        f(torch.randn(3, 3, 8, 8), 1.0)


# ---------------------------------------------------------------------------------------------
# Label dropout


def test_drop_labels_rate_and_null_index():
    n, p, null = 200_000, 0.1, 1000
    labels = torch.randint(0, 1000, (n,))
    out = drop_labels(labels, p, null, generator=torch.Generator().manual_seed(0))
    dropped = out == null
    # binomial std of the rate is sqrt(p (1-p) / n) ~ 6.7e-4; allow 5 std
    assert abs(dropped.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(out[~dropped], labels[~dropped])
    assert labels.max() < null  # the input is untouched (a new tensor is returned)
    again = drop_labels(labels, p=p, null_label=null, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    other = drop_labels(labels, p=p, null_label=null, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)


def test_drop_labels_edge_cases():
    labels = torch.arange(1, 9)
    assert torch.equal(drop_labels(labels, 0.0, 0), labels)
    assert torch.equal(drop_labels(labels, 1.0, 0), torch.zeros_like(labels))  # null index 0 honoured
    assert drop_labels(labels, null_label=9).dtype == labels.dtype  # default p = 0.1
    with pytest.raises(ConfigError, match="null_label is required"):
        drop_labels(labels, 0.1)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        drop_labels(labels, 1.5, 9)
