"""latentdiff: latent diffusion training at scale.

EDM preconditioning (Karras et al. 2022), WSNR-aligned training noise and the NFE-guided
hybrid ODE sampler ("Rethinking the Noise Schedule of Diffusion-Based Generative Models"),
DeepSpeed ZeRO training, webdataset latents, FID.
"""
__version__ = "0.1.0"
