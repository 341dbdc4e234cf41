"""Train a small diffusers ``AutoencoderKL`` on your images: a real latent space without a hub.

``config`` (the validated options), ``losses`` (L1 + SSIM + KL, PSNR), ``images`` (inputs, ADM crop,
the column held-out split, crops), ``model`` (architecture presets, EMA, latent statistics),
``checkpoint`` (resumable state), ``loop`` (the training loop and the ``save_pretrained`` export).
"""
