"""data/bpe.py: the BPE trainer, the rank file it writes, and the tokenizer loaded from it
(model.load_tokenizer), which every stage encodes and decodes with."""

import base64
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

import model as M
from data import bpe, world

N_SPECIAL = len(bpe.SPECIAL_TOKENS)

# ----------------------------------------------------------------------------------------------
# The trainer on hand-worked examples


def test_train_bpe_hand_worked_merges():
    # "aaab aaab aaab" pre-tokenizes into the pieces "aaab" (once) and " aaab" (twice).
    # Pair counts, weighted by piece count:
    #   (a,a): 2 per piece -> 2*1 + 2*2 = 6;  (a,b): 1 + 2 = 3;  (' ',a): 2
    # so the first merge is "aa". Then the pieces read [aa,a,b] and [' ',aa,a,b]:
    #   (aa,a): 3, (a,b): 3, (' ',aa): 2   -- a tie, broken by the larger pair of bytes:
    #   (b"aa", b"a") > (b"a", b"b") because b"aa" > b"a", so "aaa" is next.
    # Then [aaa,b] and [' ',aaa,b]: (aaa,b): 3, (' ',aaa): 2 -> "aaab".
    # Then only [' ', aaab] has a pair, count 2 -> " aaab". Then no pair is left.
    ranks = bpe.train_bpe("aaab aaab aaab", vocab_size=1000)
    merges = sorted((r, t) for t, r in ranks.items() if r >= 256)
    assert merges == [(256, b"aa"), (257, b"aaa"), (258, b"aaab"), (259, b" aaab")]
    # the first 256 ranks are the single bytes, in byte order
    assert all(ranks[bytes([i])] == i for i in range(256))


def test_train_bpe_respects_vocab_size():
    # vocab_size counts the 256 bytes, the merges and the special tokens: room for 2 merges
    ranks = bpe.train_bpe("aaab aaab aaab", vocab_size=256 + 2 + N_SPECIAL)
    assert sorted(r for r in ranks.values() if r >= 256) == [256, 257]
    assert {t for t, r in ranks.items() if r >= 256} == {b"aa", b"aaa"}


def test_train_bpe_stops_when_no_pair_repeats():
    # every adjacent pair occurs once: nothing is worth merging
    ranks = bpe.train_bpe("abcdefg", vocab_size=1000)
    assert len(ranks) == 256


def test_train_bpe_never_merges_across_pieces():
    # The pre-tokenizer always puts letters and digits in separate pieces, so "a1 a1 a1 a1" is
    # the pieces "a", "1", " a", "1", ...: the pair (a, 1) is frequent but spans two pieces.
    ranks = bpe.train_bpe("a1 a1 a1 a1", vocab_size=1000)
    assert b"a1" not in ranks
    assert b" a" in ranks  # while a pair inside a piece (" a") is merged


def test_train_bpe_ranks_are_contiguous_on_world_text():
    rng = random.Random(0)
    text = "\n".join(world.make_story(rng, world.make_problem(rng)) for _ in range(300))
    ranks = bpe.train_bpe(text, vocab_size=600)
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert len(ranks) == 600 - N_SPECIAL  # plenty of repeated pairs: the cap is reached
    # every merged token is the concatenation of two earlier tokens (so tiktoken can replay it)
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    earlier = set()
    for tok, r in by_rank:
        if r >= 256:
            assert any(tok[:i] in earlier and tok[i:] in earlier for i in range(1, len(tok))), tok
        earlier.add(tok)


# ----------------------------------------------------------------------------------------------
# The files it writes, read back


def _read_rank_file(path):
    """An independent reader of the tiktoken rank format: one `base64(token) rank` per line."""
    ranks = {}
    with open(path) as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def test_save_tokenizer_writes_rank_file_and_specials(tmp_path):
    ranks = bpe.train_bpe("aaab aaab aaab", vocab_size=1000)
    bpe.save_tokenizer(ranks, str(tmp_path))
    assert _read_rank_file(tmp_path / "tokenizer.tiktoken") == ranks
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    assert meta["pattern"] == bpe.PATTERN
    # special tokens take the ids right after the last rank, in the declared order
    assert meta["special_tokens"] == {t: len(ranks) + i for i, t in enumerate(bpe.SPECIAL_TOKENS)}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # written atomically
    # tiktoken replays the merges: " aaab" is one token, "aaab" too
    enc = M.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert enc.encode_ordinary(" aaab") == [ranks[b" aaab"]]
    assert enc.encode_ordinary("aaab aaab") == [ranks[b"aaab"], ranks[b" aaab"]]


def test_load_tokenizer_is_not_stale_after_rebuild(tmp_path):
    # tiktoken.load caches rank files by path; load_tokenizer must read the file as it is now
    bpe.save_tokenizer(bpe.train_bpe("aaab aaab aaab", 1000), str(tmp_path))
    first = M.load_tokenizer(str(tmp_path / "tokenizer.json"))
    bpe.save_tokenizer(bpe.train_bpe("xyz xyz xyz xyz", 1000), str(tmp_path))
    second = M.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert len(first.encode_ordinary(" aaab")) == 1
    assert len(second.encode_ordinary(" xyz")) == 1
    assert len(second.encode_ordinary(" aaab")) > 1


def test_tiny_tokenizer_file_is_contiguous(tiny_data_dir, tiny_enc):
    ranks = _read_rank_file(os.path.join(tiny_data_dir, "tokenizer.tiktoken"))
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert tiny_enc.n_vocab == len(ranks) + N_SPECIAL


# ----------------------------------------------------------------------------------------------
# The trained tokenizer: round trips and special tokens


def _random_unicode(rng, n):
    """n random code points from all of Unicode, surrogates excluded (they are not valid in
    UTF-8), biased a little towards ASCII and whitespace so that the pre-tokenizer's every
    branch is exercised."""
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            out.append(chr(rng.randint(32, 126)))
        elif kind < 0.4:
            out.append(rng.choice(" \t\n\r\x0b\x0c\u00a0\u2003\u3000"))
        else:
            cp = rng.randint(0, 0x10FFFF - 0x800)
            cp = cp + 0x800 if cp >= 0xD800 else cp  # skip the surrogate block
            out.append(chr(cp))
    return "".join(out)


FIXED_STRINGS = [
    "",
    "The answer is 42.",
    "emoji 👍🏽🎉 and a family 👨‍👩‍👧 (zero-width joiners)",
    "中文字符和日本語のテキスト、한국어",
    "accents: café naïve über façade Ångström",
    "combining: e\u0301 a\u0308",
    "control \x00\x01\x07\x1b[31m\x7f chars",
    "   leading and trailing spaces   ",
    "\n\n\t\r\n",
    "'s 'll 're 've 'd 'm 't",
    "1234567890 000 12345",
    "<|end|> <|assistant|> <|user|> literal markup",
    "\ufeffBOM and \uffff and \U0010ffff",
]


@pytest.mark.parametrize("s", FIXED_STRINGS)
def test_round_trip_fixed(tiny_enc, s):
    assert tiny_enc.decode(tiny_enc.encode_ordinary(s)) == s


def test_round_trip_random_unicode(tiny_enc):
    rng = random.Random(1234)
    for _ in range(200):
        s = _random_unicode(rng, rng.randint(0, 300))
        assert tiny_enc.decode(tiny_enc.encode_ordinary(s)) == s
    # one long string
    s = _random_unicode(rng, 20000)
    assert tiny_enc.decode(tiny_enc.encode_ordinary(s)) == s


def test_round_trip_world_text_and_compression(tiny_data_dir, tiny_enc):
    with open(os.path.join(tiny_data_dir, "pretrain_val.txt"), encoding="utf-8") as f:
        text = f.read()
    ids = tiny_enc.encode_ordinary(text)
    assert tiny_enc.decode(ids) == text
    # a tokenizer trained on this world compresses its text well beyond one byte per token
    assert len(ids) < len(text.encode()) / 2.5


def test_python_re_and_tiktoken_split_world_text_alike(tiny_data_dir, tiny_enc):
    # Training splits text with Python's `re`, tiktoken with its own regex engine. The merges
    # never cross a piece, so encoding piece by piece equals encoding the whole text exactly
    # when the two engines cut the text at the same places.
    with open(os.path.join(tiny_data_dir, "sft_val.jsonl"), encoding="utf-8") as f:
        text = f.read()
    pieces = re.findall(bpe.PATTERN, text)
    assert "".join(pieces) == text  # the pattern covers every character
    by_piece = [i for p in pieces for i in tiny_enc.encode_ordinary(p)]
    assert tiny_enc.encode_ordinary(text) == by_piece
    # the same holds beyond the world's ASCII text
    rng = random.Random(99)
    for _ in range(100):
        s = _random_unicode(rng, 200)
        pieces = re.findall(bpe.PATTERN, s)
        assert "".join(pieces) == s
        assert tiny_enc.encode_ordinary(s) == [i for p in pieces for i in tiny_enc.encode_ordinary(p)]


@pytest.mark.parametrize("tok", bpe.SPECIAL_TOKENS)
def test_special_tokens_are_single_ids(tiny_enc, tok):
    ids = tiny_enc.encode(tok, allowed_special="all")
    assert len(ids) == 1
    assert tiny_enc.decode(ids) == tok
    assert ids[0] == M.special(tiny_enc, tok[2:-2])  # model.special finds the same id


@pytest.mark.parametrize("tok", bpe.SPECIAL_TOKENS)
def test_literal_special_text_is_ordinary(tiny_enc, tok):
    # text from a user or a file is encoded as ordinary text: it can never produce a special id
    specials = {tiny_enc.encode_single_token(t) for t in bpe.SPECIAL_TOKENS}
    ids = tiny_enc.encode_ordinary(f"hello {tok} world{tok}")
    assert not specials & set(ids)
    assert tiny_enc.decode(ids) == f"hello {tok} world{tok}"
    assert len(tiny_enc.encode_ordinary(tok)) > 1


def test_running_bpe_py_shows_the_merges_and_writes_nothing(tmp_path):
    # `python data/bpe.py` trains on data/pretrain.txt for a look; it must not replace the
    # tokenizer data/prepare.py built (trained on more text), which every checkpoint depends on
    here = tmp_path / "data"
    here.mkdir()
    shutil.copy(bpe.__file__, here / "bpe.py")
    text = "aaab aaab aaab\n"
    (here / "pretrain.txt").write_text(text)
    (here / "tokenizer.tiktoken").write_text("the project's tokenizer\n")
    run = subprocess.run([sys.executable, str(here / "bpe.py")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # the hand-worked example above: four merges, then no pair occurs twice
    assert f"4 merges learned from {here / 'pretrain.txt'} (stopped early: no pair occurs twice)" in run.stdout
    assert "first ten: 'aa' 'aaa' 'aaab' ' aaab'\n" in run.stdout
    assert "last ten:  'aa' 'aaa' 'aaab' ' aaab'\n" in run.stdout
    assert sorted(os.listdir(here)) == ["bpe.py", "pretrain.txt", "tokenizer.tiktoken"]
    assert (here / "tokenizer.tiktoken").read_text() == "the project's tokenizer\n"
    (here / "pretrain.txt").unlink()
    run = subprocess.run([sys.executable, str(here / "bpe.py")], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0
    assert run.stderr.startswith(f"error: {here / 'pretrain.txt'}: no such file")
