"""``python -m latentdiff.sample`` (under torchrun / deepspeed / srun): the command of ``latentdiff.cli.sample``."""
from latentdiff.cli.sample import cli

if __name__ == "__main__":
    cli()
