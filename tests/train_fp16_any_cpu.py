"""Test helper (run under torchrun): ``latentdiff.train`` with DeepSpeed's fp16 check passed on any CPU.

DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has native fp16 kernels (AVX512-FP16/AMX-FP16);
torch itself computes fp16 on every CPU.  The fp16 loss-scale test exercises latentdiff's loss-scale watch,
not that capability, so this entry point reports fp16 as supported and then runs the real CLI.
"""
import sys

from deepspeed.accelerator import get_accelerator

if get_accelerator().device_name() == "cpu":
    type(get_accelerator()).is_fp16_supported = lambda self: True

from latentdiff.cli.train import cli

if __name__ == "__main__":
    sys.argv[0] = "latentdiff.train"
    cli()
