"""
A byte-level BPE trainer that writes a tiktoken rank file.

    python data/bpe.py    (a look at what BPE learns from data/pretrain.txt; writes nothing:
                           data/prepare.py trains and saves the project's tokenizer)

Byte-level BPE starts from the 256 single bytes and repeatedly merges the most frequent adjacent
pair of tokens into a new token. Merges never cross the boundaries of the pre-tokenizer's pieces
(words with their leading space, runs of up to 3 digits, punctuation), so we count the distinct
pieces once and merge over those: the cost is per distinct piece, not per byte of text (a trainer
that re-scans the whole corpus per merge is far too slow for megabytes).

save_tokenizer writes two files (data/prepare.py: into data/):
    tokenizer.tiktoken   one `base64(token_bytes) rank` line per token, rank = merge order
    tokenizer.json       the pre-tokenizer pattern and the special tokens with their ids
tiktoken encodes by repeatedly merging the adjacent pair whose concatenation has the lowest rank,
which replays our merges in the order we learned them.
"""

import base64
import collections
import json
import os
import re
import sys

# The pre-tokenizer. Written so that Python's `re` (here, for training) and tiktoken's regex
# engine (at encode time) split text the same way; non-ASCII text falls into the punctuation
# class and is still encoded byte by byte, so every string round-trips.
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def train_bpe(text, vocab_size):
    """Learn up to vocab_size - 256 - len(SPECIAL_TOKENS) merges on `text`.
    Returns the ranks {token_bytes: rank}; stops early when no pair occurs twice."""
    pieces = collections.Counter(re.findall(PATTERN, text))
    words = [[bytes([b]) for b in w.encode("utf-8")] for w in pieces]
    counts = list(pieces.values())
    ranks = {bytes([i]): i for i in range(256)}
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)

    # pair -> total count, and pair -> the set of words it occurs in, kept up to date incrementally
    pair_counts = collections.Counter()
    where = collections.defaultdict(set)
    for wi, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_counts[a, b] += counts[wi]
            where[a, b].add(wi)

    for _ in range(n_merges):
        if not pair_counts:
            break
        # ties broken by the bytes themselves, so training is deterministic
        (a, b), c = max(pair_counts.items(), key=lambda kv: (kv[1], kv[0]))
        if c < 2:
            break
        new = a + b
        ranks[new] = len(ranks)
        for wi in list(where[a, b]):
            w = words[wi]
            for x, y in zip(w, w[1:]):  # remove this word's old pairs ...
                pair_counts[x, y] -= counts[wi]
                if pair_counts[x, y] <= 0:
                    del pair_counts[x, y]
                where[x, y].discard(wi)
            merged, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            words[wi] = merged
            for x, y in zip(merged, merged[1:]):  # ... and add its new ones
                pair_counts[x, y] += counts[wi]
                where[x, y].add(wi)
    return ranks


def save_tokenizer(ranks, directory):
    """Write tokenizer.tiktoken and tokenizer.json into `directory`, each atomically."""
    from data.formats import write_text  # here, not at the top: `python data/bpe.py` runs on its own
    lines = "".join(f"{base64.b64encode(tok).decode()} {r}\n" for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    meta = {"pattern": PATTERN, "ranks_file": "tokenizer.tiktoken",
            "special_tokens": {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}}
    for name, content in [("tokenizer.tiktoken", lines), ("tokenizer.json", json.dumps(meta, indent=1))]:
        write_text(os.path.join(directory, name), content)


def main():
    """Train on data/pretrain.txt and show the merges. It writes nothing: the project's tokenizer is
    trained by data/prepare.py on more text (the SFT replies too), and overwriting it would orphan
    every checkpoint trained with it."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.txt")
    if not os.path.exists(path):
        sys.exit(f"error: {path}: no such file; build the data first: python data/prepare.py")
    with open(path, encoding="utf-8") as f:
        ranks = train_bpe(f.read(), 2048)
    merges = [tok.decode("utf-8", "replace") for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
              if rank >= 256]
    stopped = " (stopped early: no pair occurs twice)" if len(ranks) < 2048 - len(SPECIAL_TOKENS) else ""
    print(f"{len(merges)} merges learned from {path}{stopped}")
    print("first ten:", " ".join(repr(m) for m in merges[:10]))
    print("last ten: ", " ".join(repr(m) for m in merges[-10:]))


if __name__ == "__main__":
    main()
