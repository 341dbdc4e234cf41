"""The autoencoder layer: the VAE wrapper (hub id, local path, or identity for pixel space), the raw <->
model-space normalization with its exact inverse, and decoding model-space latents to uint8 images."""
