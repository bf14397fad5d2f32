"""The commands the docs show: every `python <script>.py --flag ...` in README.md, in the pages of
docs/ and in the scripts' own text uses flags that script defines, spelled out in full, so a renamed
or removed flag cannot leave a command behind that fails with "unrecognized arguments" (or that
works only because argparse accepts a prefix of a flag). Every link within a page reaches one of its
headings, and every link from README.md or a docs page to a file reaches a file that exists (and,
with an anchor, a heading of that page)."""

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
DOCS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
PAGES = ["README.md"] + DOCS


def read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


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
    commands = readme_commands(read("README.md"))
    # the README keeps a few commands and the docs the rest: the count spans both, so that neither
    # check can pass on an empty page
    everywhere = [c for page in PAGES for c in readme_commands(read(page))]
    assert len(everywhere) >= 30 and {s for s, _ in commands} >= {"dpo.py", "sft.py", "rlvr.py", "data/prepare.py"}
    assert unknown(commands, known_flags) == []


def test_there_are_docs_pages():
    assert {"docs/dpo.md", "docs/rl.md", "docs/family.md", "docs/lora.md", "docs/exercises.md",
            "docs/log.md"} <= set(DOCS)


@pytest.mark.parametrize("page", DOCS)
def test_every_command_in_a_docs_page_uses_flags_its_script_defines(known_flags, page):
    assert unknown(readme_commands(read(page)), known_flags) == []


def test_every_flag_the_docs_name_exists(known_flags):
    # flags quoted alone (`--rpo-alpha 3`) name some script's flag; the ones outside are pip's, in
    # the README's install note, and torchrun's, which starts the scripts on several processes
    def named(page):
        spans = re.findall(r"```.*?```|`[^`]+`", read(page), re.S)
        return {flag for span in spans for flag in re.findall(FLAG, span)}

    torchrun = {"--standalone", "--nproc"}  # (--nproc_per_node: the flag pattern stops at its underscore)
    defined = set().union(*known_flags.values())
    assert len(set().union(*map(named, PAGES))) >= 30
    assert named("README.md") - defined == {"--index-url"} | torchrun
    assert {page: sorted(named(page) - defined - torchrun) for page in DOCS} == {page: [] for page in DOCS}


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


def prose(text):
    return re.sub(r"```.*?```", "", text, flags=re.S)  # a "#" inside a code block is not a heading


def headings(text):
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", prose(text), re.M)}


def broken_links(page, text, exists=os.path.exists, read_target=read):
    """The links of a page (README.md or docs/x.md, its text given) that lead nowhere: an anchor
    within the page that is none of its headings, a relative path (from the page's own folder) to
    no file, or an anchor that is none of the headings of the page it names. Web links are not
    followed."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            if anchor not in headings(text):
                broken.append(target)
            continue
        file = os.path.normpath(os.path.join(os.path.dirname(page), path))
        if not exists(os.path.join(ROOT, file)):
            broken.append(target)
        elif anchor and (not file.endswith(".md") or anchor not in headings(read_target(file))):
            broken.append(target)
    return broken


def test_the_link_checker_catches_a_broken_link():
    pages = {"docs/a.md": "# A page\n## What falls short\n", "docs/plot.png": ""}
    exists = lambda path: os.path.relpath(path, ROOT) in pages
    text = ("# Top\nSee [here](#top), [there](#nowhere), [a](docs/a.md), [b](docs/a.md#what-falls-short),\n"
            "[c](docs/a.md#what-falls), [d](docs/b.md), ![plot](docs/plot.png), [web](https://x.org/#y).\n"
            "```\n# not a heading\n```\n[e](#not-a-heading)")
    assert broken_links("README.md", text, exists, pages.get) == [
        "#nowhere", "docs/a.md#what-falls", "docs/b.md", "#not-a-heading"]
    # from a docs page, paths start in docs/
    assert broken_links("docs/c.md", "[a](a.md#a-page) ![p](plot.png) [r](../docs/a.md) [x](docs/a.md)",
                        exists, pages.get) == ["docs/a.md"]


def test_every_link_within_a_page_reaches_a_heading():
    links = {page: re.findall(r"\]\(#([^)]+)\)", prose(read(page))) for page in PAGES}
    assert sum(map(len, links.values())) >= 3
    for page in PAGES:
        assert sorted(set(links[page]) - headings(read(page))) == [], page


def test_every_link_to_a_file_reaches_it_and_its_heading():
    to_files = [t for page in PAGES for t in re.findall(r"\]\(([^)#\s][^)\s]*)\)", prose(read(page)))
                if not re.match(r"[a-z]+:", t)]
    assert len(to_files) >= 10 and any(t.endswith(".png") for t in to_files) and any("#" in t for t in to_files)
    assert {page: broken_links(page, read(page)) for page in PAGES} == {page: [] for page in PAGES}
