#!/usr/bin/env python
"""Encode images into VAE-latent webdataset shards + dataset statistics (the documented entry of the
encode stage; the same command as ``latentdiff-encode``, see ``latentdiff.cli.encode``).

    python tools/encode_latents.py --input PATH [--input PATH ...] --output DIR --resolution N \\
        --vae ID|DIR|none [--flip] [--shard-size N] [--batch-size N] [--workers N] [--min-size N]
    python tools/encode_latents.py --config encode.yaml

Multi-rank: ``torchrun --nproc_per_node 8 tools/encode_latents.py ...`` or under ``srun``.
"""
from latentdiff.cli.encode import cli

if __name__ == "__main__":
    cli()
