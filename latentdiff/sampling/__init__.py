"""The sample stage: an export + seeds -> latents -> decoded images -> files and ``sampling.json``."""
