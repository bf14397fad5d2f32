"""
Build every data file the pipeline reads, deterministically from a seed.

    python data/prepare.py                    (seconds; does nothing if already up to date)
    python data/prepare.py --pretrain-mb 8    (more pretraining text)

Writes into data/ (or --out):
    pretrain.txt, pretrain_val.txt   stories and arithmetic facts, one document per line
    sft.jsonl, sft_val.jsonl         {"messages": [user, assistant]} in the four reply styles
    cot.jsonl                        {"messages": [user, assistant]}, step-by-step replies only (CoT-SFT)
    prefs.jsonl, prefs_test.jsonl    {"prompt", "chosen", "rejected", "answer"}: the judge picks chosen
    rl.jsonl                         {"prompt", "answer"}: problems for the RL stage
    test.jsonl                       held-out problems {"prompt", "answer", "n_ops", ...}
    tokenizer.tiktoken, tokenizer.json, manifest.json

The problem space is split by a hash of each problem's meaning (who, what, which numbers), not of
its wording: pretrain_val, sft_val, prefs_test and test draw only from the held-out ~10%, every
training file only from the rest, so no held-out problem appears in a training file in any wording.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import bpe, world  # noqa: E402
from data.formats import write_text  # noqa: E402

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
FILES = ["pretrain.txt", "pretrain_val.txt", "sft.jsonl", "sft_val.jsonl", "prefs.jsonl",
         "prefs_test.jsonl", "rl.jsonl", "test.jsonl", "cot.jsonl", "tokenizer.tiktoken", "tokenizer.json"]
VERSION = 4  # bump when the generator changes, so old data is rebuilt


@dataclass
class PrepareConfig:
    seed: int = 1337
    pretrain_mb: float = 3.0    # a few MB: ~700k tokens, more than pretraining sees in one run
    fact_share: float = 0.4
    n_sft: int = 20000
    n_prefs: int = 8000
    n_test: int = 600           # held-out problems for accuracy (>= 500)
    n_prefs_test: int = 500
    n_sft_val: int = 300
    n_rl: int = 4000
    n_cot: int = 4000
    vocab_size: int = 2048      # upper bound: merges stop once every word is one token


# The GPU recipe's world (sft.py/dpo.py/rlvr.py --preset gpu read it from data/gpu/): ten times the
# pretraining text, three times the rows, for a model ~15x the default's (docs/scale.md)
GPU_DATA_DIR = os.path.join(DATA_DIR, "gpu")
GPU_WORLD = PrepareConfig(pretrain_mb=30.0, n_sft=60000, n_prefs=24000, n_rl=12000, n_cot=12000)


FLAG_HELP = {  # the --help line of each PrepareConfig field
    "seed": "random seed: a seed builds the same files on every machine",
    "pretrain_mb": "megabytes of pretraining text",
    "fact_share": "share of the pretraining documents that are arithmetic facts (the rest: stories)",
    "n_sft": "SFT conversations: one right reply each, in the SFT style mix",
    "n_prefs": "training preference pairs",
    "n_test": "held-out problems for the sampling evaluations (dpo.py samples 500)",
    "n_prefs_test": "held-out preference pairs",
    "n_sft_val": "held-out SFT conversations, for the validation loss",
    "n_rl": "problems for the RL stage",
    "n_cot": "CoT-SFT conversations: one right step-by-step reply each (sft.py --stages cot)",
    "vocab_size": "largest BPE vocabulary; merges stop earlier, once every word is one token"}


def config_problem(config):
    """What makes a config unbuildable, as one line naming the flag, or None. Checked before anything
    is written: a zero count or an empty pretraining text would only fail later, in another stage."""
    counts = ("n_sft", "n_prefs", "n_test", "n_prefs_test", "n_sft_val", "n_rl", "n_cot")
    for name in counts:
        if getattr(config, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}"
    if not config.pretrain_mb > 0:
        return f"--pretrain-mb must be > 0, got {config.pretrain_mb}"
    # the held-out text is a fiftieth of it, and must hold at least a byte (an empty one is no validation)
    if not (math.isfinite(config.pretrain_mb) and int(config.pretrain_mb * 1e6) // 50 >= 1):
        return f"--pretrain-mb must be finite and >= 0.00005 (its held-out fiftieth needs text), got {config.pretrain_mb}"
    if not 0 <= config.fact_share <= 1:
        return f"--fact-share is a share of the documents, in [0, 1], got {config.fact_share}"
    smallest = 256 + len(bpe.SPECIAL_TOKENS)  # the single bytes and the special tokens
    if config.vocab_size < smallest:
        return f"--vocab-size must be >= {smallest} (256 bytes + {len(bpe.SPECIAL_TOKENS)} special tokens), " \
               f"got {config.vocab_size}"
    return None


def out_problem(out_dir):
    """A one-line message when out_dir cannot hold the data (it is a file), or None."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return f"--out {out_dir}: exists and is not a directory"
    return None


def conversation(problem, reply):
    return {"messages": [{"role": "user", "content": problem["prompt"]},
                         {"role": "assistant", "content": reply}]}


def make_pair(rng, problem):
    """Two different replies to one problem; the judge's preferred one is chosen.
    60% both correct in different styles, 30% one correct and one with a plausible mistake,
    10% both wrong (then style and length decide)."""
    kind = rng.choices(["styles", "mistake", "both_wrong"], [0.6, 0.3, 0.1])[0]
    s1, s2 = rng.sample(world.STYLES, 2) if kind != "mistake" else rng.choices(world.STYLES, k=2)
    r1 = world.make_reply(rng, problem, s1, correct=kind != "both_wrong")
    r2 = world.make_reply(rng, problem, s2, correct=False if kind != "styles" else True)
    if r1 == r2:
        return None
    j1, j2 = world.judge(problem, r1), world.judge(problem, r2)
    chosen, rejected = (r1, r2) if j1 > j2 else (r2, r1)
    # "answer" is for evaluation (which pairs set a right reply against a wrong one); training ignores it
    return {"prompt": problem["prompt"], "chosen": chosen, "rejected": rejected, "answer": problem["answer"]}


def make_pairs(rng, problems):
    return [p for p in (make_pair(rng, pr) for pr in problems) if p is not None]


def pretrain_text(rng, n_bytes, fact_share, heldout):
    docs, size = [], 0
    while size < n_bytes:
        if rng.random() < fact_share:
            doc = world.make_facts(rng, rng.randint(6, 14))
        else:
            doc = world.make_story(rng, world.sample_problems(rng, 1, heldout)[0])
        docs.append(doc)
        size += len(doc) + 1
    return "\n".join(docs) + "\n"


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def up_to_date(config, out_dir):
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return (manifest.get("config") == asdict(config) and manifest.get("version") == VERSION
            and all(os.path.exists(os.path.join(out_dir, f)) for f in FILES))


def ensure_data(out_dir=DATA_DIR):
    """Make sure out_dir holds a complete, current build. A build made with other settings (say
    --pretrain-mb 8) is kept; a missing or outdated one is (re)built with the defaults (in data/gpu,
    the GPU recipe's world), announced."""
    gpu = os.path.abspath(out_dir) == GPU_DATA_DIR
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            built = PrepareConfig(**json.load(f)["config"])
    except (OSError, ValueError, KeyError, TypeError):
        print(f"data: no complete build in {out_dir}; building it now (about {'30 s' if gpu else '10 s'})")
        built = GPU_WORLD if gpu else PrepareConfig()
    prepare(built, out_dir)


def prepare(config=None, out_dir=DATA_DIR, force=False, verbose=True):
    """Build all data files into out_dir unless they are already up to date for this config."""
    config = config or PrepareConfig()
    problem = config_problem(config) or out_problem(out_dir)
    if problem:
        raise ValueError(problem)
    if not force and up_to_date(config, out_dir):
        if verbose:
            print(f"data: up to date in {out_dir}")
        return
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    # the manifest vouches for a complete build: it goes first and comes back last, so a rebuild
    # cut short (other settings, half the files rewritten) cannot pass for the old build
    manifest = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest):
        os.remove(manifest)
    rng = random.Random(config.seed)
    say = print if verbose else (lambda *a, **k: None)

    text = pretrain_text(rng, int(config.pretrain_mb * 1e6), config.fact_share, heldout=False)
    write_text(os.path.join(out_dir, "pretrain.txt"), text)
    write_text(os.path.join(out_dir, "pretrain_val.txt"),
          pretrain_text(rng, int(config.pretrain_mb * 1e6) // 50, config.fact_share, heldout=True))
    say(f"data: pretrain.txt {len(text) / 1e6:.1f} MB")

    # SFT: every problem gets one correct reply, its style drawn from the SFT mix
    def sft_reply(pr):
        style = rng.choices(list(world.SFT_STYLE_WEIGHTS), list(world.SFT_STYLE_WEIGHTS.values()))[0]
        return conversation(pr, world.make_reply(rng, pr, style))

    sft = [sft_reply(pr) for pr in world.sample_problems(rng, config.n_sft, heldout=False)]
    write_jsonl(os.path.join(out_dir, "sft.jsonl"), sft)
    test = world.sample_problems(rng, config.n_test, heldout=True)
    sft_val = [sft_reply(pr) for pr in world.sample_problems(rng, config.n_sft_val, heldout=True)]
    write_jsonl(os.path.join(out_dir, "sft_val.jsonl"), sft_val)
    write_jsonl(os.path.join(out_dir, "test.jsonl"), test)

    prefs = make_pairs(rng, world.sample_problems(rng, config.n_prefs, heldout=False))
    prefs_test = make_pairs(rng, world.sample_problems(rng, config.n_prefs_test, heldout=True))
    write_jsonl(os.path.join(out_dir, "prefs.jsonl"), prefs)
    write_jsonl(os.path.join(out_dir, "prefs_test.jsonl"), prefs_test)
    rl = [{"prompt": pr["prompt"], "answer": pr["answer"]}
          for pr in world.sample_problems(rng, config.n_rl, heldout=False)]
    write_jsonl(os.path.join(out_dir, "rl.jsonl"), rl)
    # drawn last, so that adding it left every other file as it was
    cot = [conversation(pr, world.make_reply(rng, pr, "step"))
           for pr in world.sample_problems(rng, config.n_cot, heldout=False)]
    write_jsonl(os.path.join(out_dir, "cot.jsonl"), cot)
    say(f"data: {len(sft)} sft, {len(prefs)} prefs, {len(rl)} rl, {len(cot)} cot rows; held out: {len(test)} test "
        f"problems, {len(prefs_test)} pairs, {len(sft_val)} sft_val")

    # the tokenizer sees every kind of text the model will: prose, problems and all reply styles
    t1 = time.time()
    corpus = text + "".join(m["content"] + "\n" for row in sft for m in row["messages"])
    ranks = bpe.train_bpe(corpus, config.vocab_size)
    bpe.save_tokenizer(ranks, out_dir)
    say(f"data: tokenizer with {len(ranks)} + {len(bpe.SPECIAL_TOKENS)} tokens ({time.time() - t1:.1f}s)")

    write_text(manifest, json.dumps({"version": VERSION, "config": asdict(config)}, indent=1))
    say(f"data: done in {time.time() - t0:.1f}s -> {out_dir}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = PrepareConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"{FLAG_HELP[name]} (default {value})")
    parser.add_argument("--out", default=DATA_DIR, help="output directory (default data/)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = vars(parser.parse_args())
    out, force = args.pop("out"), args.pop("force")
    config = PrepareConfig(**args)
    problem = config_problem(config) or out_problem(out)
    if problem:
        sys.exit(f"error: {problem}")
    prepare(config, out, force)


if __name__ == "__main__":
    main()
