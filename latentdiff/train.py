"""``python -m latentdiff.train`` (under torchrun / deepspeed / srun): the command of ``latentdiff.cli.train``."""
from latentdiff.cli.train import cli

if __name__ == "__main__":
    cli()
