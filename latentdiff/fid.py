"""``python -m latentdiff.fid`` (under torchrun / deepspeed / srun): the command of ``latentdiff.cli.fid``."""
from latentdiff.cli.fid import cli

if __name__ == "__main__":
    cli()
