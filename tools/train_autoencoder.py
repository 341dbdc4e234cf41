#!/usr/bin/env python
"""Train a small KL autoencoder (diffusers AutoencoderKL) on an image folder, tar shards or the bundled
photos; the same command as ``latentdiff-train-autoencoder`` (see ``latentdiff.cli.train_autoencoder``).

    python tools/train_autoencoder.py --output DIR [--input PATH ...] [--preset f4] [--steps 2400]

Multi-rank: ``torchrun --nproc_per_node N tools/train_autoencoder.py ...``.
"""
from latentdiff.cli.train_autoencoder import cli

if __name__ == "__main__":
    cli()
