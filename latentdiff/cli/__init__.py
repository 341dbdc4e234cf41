"""Thin command-line entry points, one per stage: encode, train, export, sample, fid."""
