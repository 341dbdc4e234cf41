"""Thin command-line entry points, one per stage (encode, train, export, sample, fid, eval, reconstruct-ema),
sharing one way to report a refused input (``common``)."""
