"""Reference CDFs of ln(sigma) written independently of the classes (numpy/scipy, from the papers' formulas)."""
import math

import numpy as np
from scipy import stats


def lognormal(p_mean, p_std, c=0.0):
    """edm.txt Table 1: ln sigma ~ N(P_mean, P_std^2), shifted by c."""
    return lambda s: stats.norm.cdf(np.log(s), loc=p_mean + c, scale=p_std)


def logit_normal(m, s, c=0.0):
    """SD3 Sec. 3.1 written in t: P(T <= t) = Phi((logit(t) - m)/s), with t = sigma/(1+sigma), sigma -> sigma e^-c."""
    def cdf(sig):
        t = (sig * math.exp(-c)) / (1 + sig * math.exp(-c))
        return stats.norm.cdf((np.log(t) - np.log1p(-t) - m) / s)
    return cdf


def cosine(logsnr_min, logsnr_max, c=0.0):
    """simple diffusion Sec. 3 pseudocode: angle = t_min + t (t_max - t_min),
    logSNR = -2 log tan(angle) [+ 2 log(d_ref/d)]; sigma = exp(-logSNR/2).  P(Sigma <= s) = P(angle <= atan(s e^-c))."""
    a0 = math.atan(math.exp(-0.5 * logsnr_max))
    a1 = math.atan(math.exp(-0.5 * logsnr_min))
    return lambda s: np.clip((np.arctan(s * math.exp(-c)) - a0) / (a1 - a0), 0, 1)


def ve(sigma_min, sigma_max, c=0.0):
    """edm.txt Table 1, VE: ln sigma ~ U(ln sigma_min, ln sigma_max), bounds x e^c."""
    return lambda s: stats.loguniform.cdf(s, sigma_min * math.exp(c), sigma_max * math.exp(c))


def vp(beta_d, beta_min, eps_t, c=0.0):
    """t ~ U(eps_t, 1), sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1): invert the quadratic in t."""
    def cdf(s):
        s0 = s * math.exp(-c)
        t = (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(s0**2)) - beta_min) / beta_d
        return np.clip((t - eps_t) / (1 - eps_t), 0, 1)
    return cdf
