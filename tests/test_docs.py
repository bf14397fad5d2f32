"""The commands the docs show: every `python <script>.py --flag ...` in README.md and in the scripts'
own text uses flags that script defines, spelled out in full, so a renamed or removed flag cannot
leave a command behind that fails with "unrecognized arguments" (or that works only because argparse
accepts a prefix of a flag). And every link within the README reaches one of its headings."""

import argparse
import glob
import importlib
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

FLAG = r"(?<![\w-])--[a-z][a-z0-9-]*"
COMMAND = r"python3? (?:\./)?((?:data/|experiments/)?\w+\.py)\b(.*)"
SCRIPTS = sorted(os.path.relpath(p, ROOT) for p in
                 glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "data", "*.py"))
                 + glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def readme_commands(text):
    """(script, the rest of its command line) for each command in the README's code: fenced blocks
    line by line (a trailing backslash continues a line, a # starts a comment), inline spans whole;
    `&&`, `;`, `|` and brackets end a command."""
    commands = []
    for span in re.findall(r"```.*?```|`[^`]+`", text, re.S):
        fenced = span.startswith("```")
        body = span.strip("`")
        lines = body.replace("\\\n", " ").split("\n") if fenced else [body.replace("\n", " ")]
        for line in lines:
            if fenced:
                line = line.split(" #")[0]
            for part in re.split(r"&&|;|\||\(|\)", line):
                m = re.search(COMMAND, part)
                if m:
                    commands.append(m.groups())
    return commands


def source_commands(text):
    """Commands in a script's docstring, comments and messages: up to a comment in brackets, a quote
    or a backtick."""
    return [(m.group(1), re.split(r"[(`\"']", m.group(2))[0]) for m in re.finditer(COMMAND, text)]


class Parsed(Exception):
    """Raised in place of parse_args, carrying the script's parser."""


@pytest.fixture(scope="module")
def known_flags():
    """script -> the option strings its command line accepts, read from the parser its main()
    builds (parse_args intercepted, so nothing runs); a script without a parser (whose main would
    run for real: data/bpe.py) accepts none."""
    def intercept(parser, args=None, namespace=None):
        raise Parsed(parser)

    flags = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", intercept)
        for script in SCRIPTS:
            flags[script] = set()
            with open(os.path.join(ROOT, script)) as f:
                source = f.read()
            if '__name__ == "__main__"' not in source or not re.search(r"parse_args\(|run_cli\(", source):
                continue
            module = importlib.import_module(script[:-3].replace("experiments/", "").replace("/", "."))
            with pytest.raises(Parsed) as e:
                module.main()
            flags[script] = set(e.value.args[0]._option_string_actions)
    return flags


def unknown(commands, known_flags):
    return [(script, flag, rest.strip()) for script, rest in commands for flag in re.findall(FLAG, rest)
            if flag not in known_flags.get(script, ())]


def test_the_checker_catches_a_renamed_flag(known_flags):
    # the check itself, on a hand-written README and source snippet: good commands and two bad ones
    # (--eval-temp would run, as a prefix argparse accepts, but the docs spell flags out)
    readme = ("Run `python dpo.py --beta B --lr-schedule constant` or\n```bash\npython sft.py --stages sft && "
              "python3 ./rlvr.py \\\n  --kl-coef 0 --kl-coeff 0  # not --kl\n```\nand `python dpo.py --eval-temp\nT`.")
    assert unknown(readme_commands(readme), known_flags) == [
        ("rlvr.py", "--kl-coeff", "--kl-coef 0 --kl-coeff 0"), ("dpo.py", "--eval-temp", "--eval-temp T")]
    source = ('    python dpo.py --beta 0.5 --lorarank 4   (with --lora-rank see README)\n'
              '"run `python sft.py --stage x`"')
    assert unknown(source_commands(source), known_flags) == [
        ("dpo.py", "--lorarank", "--beta 0.5 --lorarank 4"), ("sft.py", "--stage", "--stage x")]


def test_every_readme_command_uses_flags_its_script_defines(known_flags):
    with open(os.path.join(ROOT, "README.md")) as f:
        commands = readme_commands(f.read())
    assert len(commands) >= 30 and {s for s, _ in commands} >= {"dpo.py", "sft.py", "rlvr.py", "data/prepare.py"}
    assert unknown(commands, known_flags) == []


def test_every_flag_the_readme_names_exists(known_flags):
    # flags quoted alone (`--rpo-alpha 3`) name some script's flag; pip's is the one outside
    with open(os.path.join(ROOT, "README.md")) as f:
        spans = re.findall(r"```.*?```|`[^`]+`", f.read(), re.S)
    named = {flag for span in spans for flag in re.findall(FLAG, span)}
    assert len(named) >= 30
    assert named - set().union(*known_flags.values()) == {"--index-url"}


def test_every_command_in_the_scripts_uses_flags_its_script_defines(known_flags):
    commands = []
    for script in SCRIPTS:
        with open(os.path.join(ROOT, script)) as f:
            commands += source_commands(f.read())
    assert len(commands) >= 20
    assert unknown(commands, known_flags) == []


def github_anchor(heading):
    """The anchor GitHub gives a heading: lower case, every character but letters, digits,
    underscores, spaces and hyphens dropped, each space a hyphen (so "`--loss-type`" keeps both of
    its hyphens, and "beta_sweep.py" its underscore)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor_by_hand():
    assert github_anchor("The DPO family (`--loss-type`)") == "the-dpo-family---loss-type"
    assert github_anchor("What falls short") == "what-falls-short"
    assert github_anchor("RL with a verifier (`rlvr.py`)") == "rl-with-a-verifier-rlvrpy"
    assert (github_anchor("What does beta do? (`python experiments/beta_sweep.py`, 6.5 min)")
            == "what-does-beta-do-python-experimentsbeta_sweeppy-65-min")


def test_every_link_within_the_readme_reaches_a_heading():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # a "#" inside a code block is not a heading
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", prose, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", prose)
    assert len(links) >= 3
    assert sorted(set(links) - anchors) == []
