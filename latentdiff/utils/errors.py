"""One exception type per stage; messages name the file/field and the fix."""


class LatentdiffError(Exception):
    """Base class of every error latentdiff raises on purpose.

    ``every_rank`` is true when every rank raises the same error (e.g. after gathering the ranks' checks);
    the command-line entry points then print it on rank 0 only.
    """

    every_rank = False

    def on_every_rank(self):
        """This error, marked as raised identically by every rank (returns ``self``)."""
        self.every_rank = True
        return self


class ConfigError(LatentdiffError, ValueError):
    """A configuration value is invalid (raised before any process group starts)."""


class EncodeError(LatentdiffError):
    """The encoding stage cannot proceed (bad arguments, output dir holding another dataset, ...)."""


class DataError(LatentdiffError):
    """A dataset on disk is inconsistent with its manifest (missing/corrupt shard, wrong counts, ...)."""


class TrainError(LatentdiffError):
    """The trainer cannot proceed (resume with a changed config, fp16 scale collapse, ...)."""


class ExportError(LatentdiffError):
    """An export is missing, incomplete or inconsistent."""


class SampleError(LatentdiffError):
    """The sampler refuses its inputs (export metadata missing/inconsistent, bad solver settings, ...)."""


class FIDError(LatentdiffError):
    """FID cannot be computed as requested (too few samples, missing Inception weights, bad reference)."""
