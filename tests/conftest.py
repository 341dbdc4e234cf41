import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def photo_crops32():
    from latentdiff.data.photos import random_crops

    return random_crops(256, 32, seed=0)[0].double()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A real encoded dataset: 72 skimage crops (3 classes) through a tiny random AutoencoderKL, 9 shards."""
    from latentdiff.data.encode import EncodeConfig, encode_dataset
    from latentdiff.data.synthetic import make_tiny_vae, write_image_folder

    root = tmp_path_factory.mktemp("tiny_dataset")
    vae = make_tiny_vae(root / "vae")
    write_image_folder(root / "images", classes=3, per_class=24, size_range=(40, 80), seed=0)
    encode_dataset(EncodeConfig(inputs=[str(root / "images")], output=str(root / "data"), resolution=32, vae=str(vae),
                                shard_size=8, batch_size=16, workers=0, progress=False))
    return root / "data"


@pytest.fixture(scope="session")
def trained_tiny_ae(tmp_path_factory):
    """A real (trained) latent space: a tiny f4 AutoencoderKL trained once per session on the bundled
    photos (a few seconds).  Returns the training.json summary; ``summary["vae"]`` loads with --vae."""
    from latentdiff.training.autoencoder.config import AutoencoderConfig
    from latentdiff.training.autoencoder.loop import train_autoencoder

    out = tmp_path_factory.mktemp("trained_ae")
    cfg = AutoencoderConfig(output=str(out), resolution=160, crop=32, block_out_channels=[8, 16, 16],
                            steps=150, batch_size=8, learning_rate=4e-3, eval_every=0, checkpoint_every=0, stat_crops=64,
                            precision="fp32", progress=False, command=["tests/conftest.py::trained_tiny_ae"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is ~10x cheaper than two on a loaded machine
    try:
        return train_autoencoder(cfg)
    finally:
        torch.set_num_threads(threads)
