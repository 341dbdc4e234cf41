"""Every command the README (and the command-line modules' docstrings) shows is parsed by the program it
names: the launcher's own parser (torchrun, deepspeed), then the latentdiff command or tool's parser,
stopped right after parsing.  A flag that does not exist (``deepspeed -m``) fails here."""
from __future__ import annotations

import argparse
import ast
import re
import runpy
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FIRST_WORDS = ("python ", "torchrun ", "deepspeed ", "latentdiff-", "make ", "sbatch ")


def _commands_in(text: str) -> list[str]:
    """Commands of the code blocks (continuation lines joined) and of inline code spans."""
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith(FIRST_WORDS):
                out.append(line)
    inline = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [" ".join(c.split()) for c in re.findall(r"`([^`]+)`", inline) if c.startswith(FIRST_WORDS)]
    # not a mention of a flag (`x --solver`) or of a program by its name alone (`latentdiff-export`)
    return out + [c for c in spans if not re.search(r" --[\w-]+$", c) and " " in c]


def _docstring_commands() -> list[str]:
    out = []
    for p in sorted((REPO / "latentdiff" / "cli").glob("*.py")):
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        out += [line.strip().replace("[", "").replace("]", "")  # synopsis brackets: the optional parts too
                for line in doc.replace("\\\n", " ").splitlines()
                if line.startswith("    ") and line.strip().startswith(FIRST_WORDS)]
    return out


class _Parsed(BaseException):  # not an Exception: no `except Exception` of the program swallows it
    pass


def _parse_only(target: str, args: list[str], module: bool) -> None:
    """Run ``target``'s command line up to and including its argument parsing, then stop."""
    import os

    real, real_exit, argv, parsed = argparse.ArgumentParser.parse_args, os._exit, sys.argv, []

    def parse_then_stop(self, a=None, namespace=None):
        real(self, a, namespace)
        parsed.append(True)
        raise _Parsed

    def no_exit(code):  # the entry points end with os._exit (utils.dist.hard_exit): not inside pytest
        raise SystemExit(code)

    argparse.ArgumentParser.parse_args = parse_then_stop
    os._exit = no_exit
    sys.argv = [target, *args]
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(REPO / target), run_name="__main__")
    except (_Parsed, SystemExit):
        pass
    finally:
        argparse.ArgumentParser.parse_args, os._exit, sys.argv = real, real_exit, argv
    assert parsed, f"{target} {' '.join(args)}: the argument parser refused it (see the captured stderr)"


def _check(cmd: str) -> None:
    argv = [a for a in shlex.split(cmd) if a != "..."]
    prog, rest = argv[0], argv[1:]
    if prog == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M)
        assert rest[0] in targets, f"{cmd}: no make target {rest[0]}"
    elif prog == "sbatch":
        assert (REPO / rest[-1]).is_file(), cmd
    elif prog == "torchrun":
        from torch.distributed.run import get_args_parser

        a = get_args_parser().parse_args(rest)
        _parse_only(a.training_script, a.training_script_args, module=a.module)
    elif prog == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        try:
            a = parse_args(rest)
        except SystemExit:
            pytest.fail(f"{cmd}: the deepspeed launcher refused it")
        _parse_only(a.user_script, a.user_args, module=a.module)
    elif prog == "python":
        if rest[0] == "-c":
            compile(rest[1], "<readme>", "exec")
        elif rest[0] == "-m":
            _parse_only(rest[1], rest[2:], module=True)
        else:
            _parse_only(rest[0], rest[1:], module=False)
    elif prog.startswith("latentdiff-"):
        scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
        assert prog in scripts, f"{cmd}: {prog} is not a console script of pyproject.toml"
        module = scripts[prog].split(":")[0]
        _parse_only(module, rest, module=True)
    else:
        pytest.fail(f"no check for {cmd}")


COMMANDS = sorted(set(_commands_in(README.read_text()) + _docstring_commands()))


def test_the_readme_shows_commands():
    assert len(COMMANDS) > 15 and any(c.startswith("deepspeed ") for c in COMMANDS)
    with pytest.raises(pytest.fail.Exception, match="deepspeed launcher refused"):  # the check can fail
        _check("deepspeed -m latentdiff.train --config tiny-cpu")
    with pytest.raises(AssertionError, match="parser refused"):
        _check("torchrun --nproc_per_node 2 -m latentdiff.train --config tiny-cpu --no-such-flag 1")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_readme_command_parses(cmd):
    _check(cmd)


def test_readme_names_the_inception_weights_the_code_accepts():
    from latentdiff.metrics.inception import OFFICIAL_WEIGHTS_SHA256, inception_weights_url

    text = README.read_text()
    url = inception_weights_url()
    assert url.rsplit("/", 1)[1] in text and url in text and OFFICIAL_WEIGHTS_SHA256 in text
    assert "--inception-weights /models/pt_inception" not in text  # pytorch-fid's file is refused by the code


def test_the_imagenet_preset_encodes_with_the_readme_vae_directory():
    """uvit-m-imagenet256.yaml's encode comment and README's encode command name the same (local) VAE."""
    yaml_text = (REPO / "latentdiff" / "configs" / "uvit-m-imagenet256.yaml").read_text()
    in_yaml = re.search(r"Encode with:.*--vae (\S+)", yaml_text).group(1)
    in_readme = re.search(r"tools/encode_latents\.py --input /data/imagenet.*?--vae (\S+)", README.read_text().replace("\\\n", " "),
                          flags=re.S).group(1)
    assert in_yaml == in_readme and in_yaml.startswith("/"), (in_yaml, in_readme)
