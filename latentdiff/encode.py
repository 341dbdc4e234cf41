"""``python -m latentdiff.encode`` (under torchrun / deepspeed / srun): the command of ``latentdiff.cli.encode``."""
from latentdiff.cli.encode import cli

if __name__ == "__main__":
    cli()
