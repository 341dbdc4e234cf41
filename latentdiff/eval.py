"""``python -m latentdiff.eval`` (under torchrun / deepspeed / srun): the command of ``latentdiff.cli.eval``."""
from latentdiff.cli.eval import cli

if __name__ == "__main__":
    cli()
