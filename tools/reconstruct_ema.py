#!/usr/bin/env python
"""Post-hoc EMA reconstruction (EDM2): the same command as ``latentdiff-reconstruct-ema``, see
``latentdiff.cli.reconstruct_ema``.

    python tools/reconstruct_ema.py RUN --sigma-rel 0.05 0.08 0.12 [--end-images N ...] [--out DIR] [--dry-run]
"""
from latentdiff.cli.reconstruct_ema import cli

if __name__ == "__main__":
    cli()
