#!/usr/bin/env python
"""The reference numbers of ``tests/test_multistep.py``: zju-pi/diff-sampler's own iPNDM, UniPC and
DEIS-tAB run on a Gaussian problem (no dependency of the package: run it by hand on a checkout).

    git clone https://github.com/zju-pi/diff-sampler && git -C diff-sampler checkout 68d5ce427f261962b89ce3b0ee8f6b29f0577328
    python tools/bench/diff_sampler_reference.py diff-sampler/diff-solvers-main > ref.json

Problem: data N(0, diag(0.25, 1, 4, 0.01)) in 4 "channels" of 1x1 images, D(x; t) = s^2 / (s^2 + t^2) x,
two latents torch.randn(2, 4, 1, 1, generator seed 0, float64), Eq. 5 grids (sigma 0.002..80, rho 7)
of 4, 6 and 9 levels.  Their dynamic thresholding (a pixel-range clip) is replaced by the identity:
it is not part of the algorithms.  Outputs are the states at sigma_min (their samplers stop there).
DEIS-tAB ("tab", 3 nodes) sums its coefficient integrals over N points (error O(1/N)), so it is run
with N = 10^4 and 10^5: the test compares our exact coefficients with the Richardson limit.
"""
import json
import sys

import torch

sys.path.insert(0, sys.argv[1])
import solver_utils  # noqa: E402  (diff-sampler's module)
import solvers  # noqa: E402

solver_utils.dynamic_thresholding_fn = solvers.dynamic_thresholding_fn = lambda x: x
torch.set_default_dtype(torch.float64)
S2 = torch.tensor([0.25, 1.0, 4.0, 0.01]).reshape(1, 4, 1, 1)


class Net:
    img_channels, img_resolution, label_dim = 4, 1, 0

    def __call__(self, x, t, class_labels=None, **kwargs):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return S2 / (S2 + t**2) * x


net = Net()
lat = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
out = {"latents": lat.flatten().tolist()}
for n in (4, 6, 9):
    ts = solver_utils.get_schedule(n, 0.002, 80.0, schedule_type="polynomial", schedule_rho=7).double()
    r = {"ipndm": solvers.ipndm_sampler(net, lat, num_steps=n, t_steps=ts, max_order=4).flatten().tolist(),
         "unipc": solvers.unipc_sampler(net, lat, num_steps=n, t_steps=ts, max_order=3, variant="bh2").flatten().tolist()}
    for big_n in (10000, 100000):
        cl = solver_utils.get_deis_coeff_list(ts, 3, N=big_n, deis_mode="tab")
        r[f"deis_N{big_n}"] = solvers.deis_sampler(net, lat, num_steps=n, t_steps=ts, max_order=3,
                                                   coeff_list=cl).flatten().tolist()
    out[n] = r
print(json.dumps(out))
