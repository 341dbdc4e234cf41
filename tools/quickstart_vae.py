"""The quickstart's latent space: the ``--vae`` switch, the cached small autoencoder, its figures.

``--vae train`` (the default of ``make quickstart``) trains the small f4 ``AutoencoderKL`` of
``latentdiff-train-autoencoder`` on the bundled photographs, or reuses the copy in the cache when the
recipe, the training pixels and the trainer's code are unchanged (the cache key hashes all three);
``--vae none`` is pixel space; anything else is a pretrained ``AutoencoderKL`` (a local
``save_pretrained`` directory or a hub id already in the local cache).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
AE_CODE = REPO / "latentdiff" / "training" / "autoencoder"
LATENT_SIDE = 16  # the diffusion model always sees 16x16 (pixels or latents): what trains on a CPU in minutes

# the recipe of the README's fidelity table (tools/bench/autoencoder_curve.py), and a seconds-long one for the tests
AE_FLAGS = ["--preset", "f4"]
AE_FLAGS_SMALL = ["--preset", "f4", "--block-out-channels", "[8, 16, 16]", "--resolution", "160", "--crop", "32",
                  "--steps", "60", "--learning-rate", "4e-3", "--stat-crops", "64", "--precision", "fp32",
                  "--eval-every", "0", "--checkpoint-every", "0"]


@dataclass
class VaePlan:
    """What ``--vae SPEC`` means: ``mode`` is pixel, train or pretrained."""

    mode: str
    vae: str  # the --vae value every later command gets ("none", a directory or a hub id)
    train_flags: list[str] = field(default_factory=list)
    cache_dir: Path | None = None
    cached: bool = False
    key: str = ""


def _code_sha256() -> str:
    h = hashlib.sha256()
    for f in sorted(AE_CODE.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def data_sha256(flags: list[str]) -> str:
    """The trainer's own hash of the pixels these flags train on (after the ADM crop)."""
    from latentdiff.cli.train_autoencoder import parse_args
    from latentdiff.training.autoencoder.images import load_images

    cfg = parse_args([*flags, "--output", "unused"])
    return load_images(cfg.inputs, cfg.resolution, cfg.crop, cfg.val_fraction, cfg.min_images).sha256()


def cache_key(flags: list[str], nproc: int, data_hash: str, code_hash: str | None = None) -> str:
    """sha256 of the training recipe (flags, ranks), the training pixels and the trainer's source."""
    blob = json.dumps({"flags": list(map(str, flags)), "nproc": int(nproc), "data_sha256": data_hash,
                       "code_sha256": code_hash or _code_sha256()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def is_cached(cache_dir: Path, key: str) -> bool:
    """A finished, exported training with this key (``cache.json`` is written only after success)."""
    try:
        meta = json.loads((cache_dir / "cache.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("key") == key and (cache_dir / "vae" / "config.json").is_file() \
        and (cache_dir / "training.json").is_file()


def mark_cached(cache_dir: Path, plan: VaePlan) -> None:
    (cache_dir / "cache.json").write_text(json.dumps({"key": plan.key, "flags": plan.train_flags}, indent=1))


def resolve_vae(spec: str, cache_root: Path, *, small: bool = False, nproc: int = 1,
                data_hash: str | None = None) -> VaePlan:
    """The plan for ``--vae spec``; ``train``: the cache directory of this recipe and whether it is done."""
    spec = str(spec).strip()
    if not spec:
        raise SystemExit("[quickstart] --vae is empty: pass train (default), none, a directory or a hub id")
    if spec.lower() == "none":
        return VaePlan("pixel", "none")
    if spec.lower() != "train":
        return VaePlan("pretrained", spec)
    flags = list(AE_FLAGS_SMALL if small else AE_FLAGS)
    if nproc > 1:  # the same global batch, split over the ranks
        from latentdiff.cli.train_autoencoder import parse_args

        batch = parse_args([*flags, "--output", "unused"]).batch_size
        flags += ["--batch-size", str(max(1, batch // nproc))]
    key = cache_key(flags, nproc, data_hash or data_sha256(flags))
    cache_dir = Path(cache_root) / f"f4-{key[:16]}"
    return VaePlan("train", str(cache_dir / "vae"), flags, cache_dir, is_cached(cache_dir, key), key)


def resolution_for(plan: VaePlan) -> int:
    """Image side giving LATENT_SIDE x LATENT_SIDE model inputs (16 x the VAE's downsampling factor)."""
    from latentdiff.vae.autoencoder import Autoencoder

    return LATENT_SIDE * Autoencoder.load(plan.vae).downsampling_factor


# ---------------------------------------------------------------------------------------------- figures
def reconstructions(vae: str, images: torch.Tensor, out_png: Path) -> dict:
    """Originals (top) over their reconstructions (bottom) through ``vae``; PSNR/SSIM of these crops."""
    from PIL import Image

    from latentdiff.training.autoencoder.losses import psnr, ssim
    from latentdiff.vae.autoencoder import Autoencoder
    from latentdiff.vae.decode import to_uint8

    ae = Autoencoder.load(vae)
    mean, _ = ae.encode(images)
    rec = ae.decode(mean).clamp(-1, 1)
    rows = [torch.cat(list(to_uint8(t)), dim=2) for t in (images, rec)]
    Image.fromarray(torch.cat(rows, dim=1).permute(1, 2, 0).numpy()).save(out_png)
    return {"psnr": float(psnr(rec, images).mean()), "ssim": float(ssim(rec, images).mean()), "n": len(images)}


def spectra_figure(model_power: torch.Tensor, rgb_power: torch.Tensor, out_png: Path, label: str) -> None:
    """Radially averaged power spectra (channel mean) of the model-space data and of the 64x64 RGB images,
    against frequency in cycles per sample of each grid; each radial profile is divided by its sum (DC
    included), so the curves compare shapes: how much of the signal sits at high frequencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from latentdiff.diffusion.spectral import radial_profile

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for power, name in ((rgb_power, f"RGB {rgb_power.shape[-1]}x{rgb_power.shape[-1]}"), (model_power, label)):
        f, prof = radial_profile(power)
        side = power.shape[-1]
        ax.loglog(f[1:] / side, (prof / prof.sum())[1:], "o-", ms=3, label=name)
    ax.set_xlabel("radial frequency (cycles / sample)")
    ax.set_ylabel("radial profile / its sum (DC not drawn)")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title("radial power spectra")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def first_images(root: Path, resolution: int, n: int) -> torch.Tensor:
    """The first image of each class folder (then the second, ...), ADM-cropped, in [-1, 1]."""
    from PIL import Image

    from latentdiff.data.images import adm_center_crop

    folders = sorted(p for p in root.iterdir() if p.is_dir())
    files = [sorted(d.glob("*.png")) for d in folders]
    picks = [f[i] for i in range(max(map(len, files))) for f in files if i < len(f)][:n]
    arr = np.stack([adm_center_crop(Image.open(p).convert("RGB"), resolution) for p in picks])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1

