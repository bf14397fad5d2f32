"""data/prepare.py: the generated files, their determinism, and the held-out split.

Training rows (sft, prefs, rl) carry only text, so to check the split by meaning and not only by
wording this file reads the problems back out of the text: a small parser built from world.py's
sentence templates recovers (name, object, start, events) from a prompt or a story. The parser is
itself checked against the generator first.
"""

import json
import os
import random
import re
from dataclasses import asdict, replace

import pytest

from data import prepare as P
from data import world

# ----------------------------------------------------------------------------------------------
# Reading problems back out of text


def _alt(words):
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_SLOTS = {
    "N": _alt(n[0] for n in world.NAMES), "F": _alt(n[0] for n in world.NAMES),
    "s": "(?:she|he)", "S": "(?:She|He)", "o": "(?:her|him)", "p": "(?:her|his)",
    "p_cap": "(?:Her|His)", "obj": _alt(world.OBJECTS), "c": _alt(world.CONTAINERS),
    "x": r"\d+", "a": r"\d+", "r": r"\d+", "sym": "[-+x]",
}


def _compile(template):
    """A world.py template -> a regex with a named group per slot (a repeated slot must repeat
    the same text)."""
    out, seen, pos = [], set(), 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos: m.start()]))
        name = m.group(1)
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>{_SLOTS[name]})")
        seen.add(name)
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


_BANKS = {name: [_compile(t) for t in getattr(world, name)]
          for name in ("START", "ADD", "SUB", "MUL", "QUESTION", "STORY_STATE", "STORY_END")}
_OPS = {"ADD": "+", "SUB": "-", "MUL": "x"}


def _match(bank, sentence):
    for pattern in _BANKS[bank]:
        m = pattern.fullmatch(sentence)
        if m:
            return m
    return None


def _event(sentence):
    """(op, x, object) of an event sentence; it must read one way only."""
    readings = {(op, int(m["x"]), m["obj"]) for bank, op in _OPS.items()
                for pattern in _BANKS[bank] if (m := pattern.fullmatch(sentence))}
    assert len(readings) == 1, (sentence, readings)
    return readings.pop()


def _sentences(text):
    return re.split(r"(?<=[.?!]) ", text)


def parse_prompt(text):
    """A problem prompt -> {name, object, start, events}."""
    sents = _sentences(text)
    first = _match("START", sents[0])
    assert first, text
    name, obj = first["N"], first["obj"]
    events = []
    for s in sents[1:-1]:
        op, x, o = _event(s)
        assert o == obj, text
        events.append([op, x])
    question = _match("QUESTION", sents[-1])
    assert question and question["N"] == name and question["obj"] == obj, text
    return {"name": name, "object": obj, "start": int(first["x"]), "events": events}


def parse_story(text):
    """A pretraining story -> {name, object, start, events}, checking that every running count
    it states is right; None for a document that is not a story (the arithmetic facts)."""
    sents = _sentences(text)
    first = _match("START", sents[0])
    if first is None:
        return None
    name, obj, count = first["N"], first["obj"], int(first["x"])
    events = []
    for event, state in zip(sents[1:-1:2], sents[2:-1:2]):
        op, x, o = _event(event)
        assert o == obj, text
        events.append([op, x])
        count = _apply(count, op, x)
        m = _match("STORY_STATE", state)
        assert m and int(m["r"]) == count, (state, count)
    assert len(sents) == 2 + 2 * len(events), text
    end = _match("STORY_END", sents[-1])
    assert end and end["N"] == name and int(end["r"]) == count, text
    return {"name": name, "object": obj, "start": int(first["x"]), "events": events}


def _apply(count, op, x):
    if op == "+":
        return count + x
    if op == "-":
        return count - x
    assert op == "x"
    return count * x


def answer_of(problem):
    count = problem["start"]
    for op, x in problem["events"]:
        count = _apply(count, op, x)
    return count


def test_parser_reads_generated_problems_and_stories_back():
    rng = random.Random(0)
    for _ in range(2000):
        p = world.make_problem(rng)
        parsed = parse_prompt(p["prompt"])
        assert world.problem_key(parsed) == world.problem_key(p)
        assert answer_of(parsed) == p["answer"]
        story = parse_story(world.make_story(rng, p))
        assert world.problem_key(story) == world.problem_key(p)
    assert parse_story(world.make_facts(rng, 8)) is None


# ----------------------------------------------------------------------------------------------
# The files


def _read(data_dir, name):
    with open(os.path.join(data_dir, name), encoding="utf-8") as f:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in f]
        return f.read()


def test_all_files_exist(tiny_data_dir, tiny_config):
    for name in P.FILES:
        path = os.path.join(tiny_data_dir, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, name
    manifest = json.loads(_read(tiny_data_dir, "manifest.json"))
    assert manifest == {"version": P.VERSION, "config": asdict(tiny_config)}
    assert not [n for n in os.listdir(tiny_data_dir) if ".tmp" in n]  # every write completed


def test_row_counts_and_formats(tiny_data_dir, tiny_config):
    c = tiny_config
    sft, sft_val = _read(tiny_data_dir, "sft.jsonl"), _read(tiny_data_dir, "sft_val.jsonl")
    assert (len(sft), len(sft_val)) == (c.n_sft, c.n_sft_val)
    for row in sft + sft_val:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    test = _read(tiny_data_dir, "test.jsonl")
    assert len(test) == c.n_test
    assert all({"prompt", "answer", "n_ops", "name", "object", "start", "events"} <= set(r) for r in test)
    rl = _read(tiny_data_dir, "rl.jsonl")
    assert len(rl) == c.n_rl and all(set(r) == {"prompt", "answer"} for r in rl)
    # a pair is dropped only when its two replies happen to coincide: rare
    for name, n in (("prefs.jsonl", c.n_prefs), ("prefs_test.jsonl", c.n_prefs_test)):
        rows = _read(tiny_data_dir, name)
        assert 0.9 * n <= len(rows) <= n
        assert all(set(r) == {"prompt", "chosen", "rejected", "answer"} for r in rows)
        # the answer is the problem's: a right reply is never the rejected one of a pair with a wrong chosen
        for r in rows:
            right = [world.parse_answer(r[k]) == r["answer"] for k in ("chosen", "rejected")]
            assert right[0] or not right[1], r
        # 90% of pairs have a right chosen reply (all but the both-wrong tenth)
        assert sum(world.parse_answer(r["chosen"]) == r["answer"] for r in rows) >= 0.8 * len(rows)


def test_rebuild_is_byte_identical(tiny_data_dir, tiny_config, tmp_path):
    P.prepare(tiny_config, out_dir=str(tmp_path), verbose=False)
    for name in P.FILES + ["manifest.json"]:
        with open(os.path.join(tiny_data_dir, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name


def test_prepare_is_idempotent(tiny_config, tmp_path, capsys):
    out = str(tmp_path)
    P.prepare(tiny_config, out_dir=out)

    def stamps():
        # a rewrite goes through a temp file and a rename: a new inode as well as a new mtime
        return {n: (os.stat(os.path.join(out, n)).st_ino, os.stat(os.path.join(out, n)).st_mtime_ns)
                for n in P.FILES + ["manifest.json"]}

    before = stamps()
    capsys.readouterr()
    P.prepare(tiny_config, out_dir=out)
    assert "up to date" in capsys.readouterr().out
    assert stamps() == before
    # force rebuilds (so the comparison above can see a rewrite)
    P.prepare(tiny_config, out_dir=out, force=True, verbose=False)
    after = stamps()
    assert all(after[n] != before[n] for n in before)


def test_up_to_date_follows_config_and_version(tiny_data_dir, tiny_config, tmp_path):
    assert P.up_to_date(tiny_config, tiny_data_dir)
    assert not P.up_to_date(replace(tiny_config, seed=tiny_config.seed + 1), tiny_data_dir)
    assert not P.up_to_date(replace(tiny_config, n_sft=tiny_config.n_sft + 1), tiny_data_dir)
    assert not P.up_to_date(tiny_config, str(tmp_path))  # nothing there
    # an old generator version, or a missing file, means a rebuild
    (tmp_path / "manifest.json").write_text(json.dumps({"version": P.VERSION - 1,
                                                        "config": asdict(tiny_config)}))
    for name in P.FILES:
        (tmp_path / name).write_text("x")
    assert not P.up_to_date(tiny_config, str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"version": P.VERSION,
                                                        "config": asdict(tiny_config)}))
    assert P.up_to_date(tiny_config, str(tmp_path))
    os.remove(tmp_path / "rl.jsonl")
    assert not P.up_to_date(tiny_config, str(tmp_path))


# ----------------------------------------------------------------------------------------------
# The held-out split


def _heldout_and_training_prompts(d):
    held = ([r["prompt"] for r in _read(d, "test.jsonl")]
            + [r["prompt"] for r in _read(d, "prefs_test.jsonl")]
            + [r["messages"][0]["content"] for r in _read(d, "sft_val.jsonl")])
    train = ([r["messages"][0]["content"] for r in _read(d, "sft.jsonl")]
             + [r["prompt"] for r in _read(d, "prefs.jsonl")]
             + [r["prompt"] for r in _read(d, "rl.jsonl")])
    return held, train


def test_no_heldout_prompt_in_training_files(tiny_data_dir):
    held, train = _heldout_and_training_prompts(tiny_data_dir)
    assert held and train
    assert not set(held) & set(train)


def test_no_heldout_problem_in_training_files_by_meaning(tiny_data_dir):
    # the same problem in another wording would pass the string comparison above; the split
    # is by meaning, so compare the problems read back out of the text
    held, train = _heldout_and_training_prompts(tiny_data_dir)
    held_keys = {world.problem_key(parse_prompt(t)) for t in held}
    train_problems = [parse_prompt(t) for t in train]
    train_keys = {world.problem_key(p) for p in train_problems}
    assert not held_keys & train_keys
    assert not any(world.is_heldout(p) for p in train_problems)
    assert all(world.is_heldout(parse_prompt(t)) for t in held)


def test_test_rows_are_heldout_and_consistent(tiny_data_dir):
    for row in _read(tiny_data_dir, "test.jsonl"):
        assert world.is_heldout(row)
        parsed = parse_prompt(row["prompt"])
        assert world.problem_key(parsed) == world.problem_key(row)  # the text says what the row says
        assert answer_of(parsed) == row["answer"] and row["n_ops"] == len(row["events"])


def test_pretraining_text_respects_the_split(tiny_data_dir):
    for name, heldout in (("pretrain.txt", False), ("pretrain_val.txt", True)):
        text = _read(tiny_data_dir, name)
        assert "<|" not in text  # plain prose, no chat markup
        docs = [line for line in text.split("\n") if line]
        stories = [s for s in (parse_story(d) for d in docs) if s is not None]
        assert stories, name
        if name == "pretrain.txt":  # (the tiny pretrain_val.txt has only a handful of documents)
            assert len(stories) < len(docs)  # and some documents are arithmetic facts
        assert all(world.is_heldout(s) == heldout for s in stories), name


# ----------------------------------------------------------------------------------------------
# Replies in the files


def test_sft_replies_are_correct_and_mix_the_styles(tiny_data_dir):
    styles = []
    for name in ("sft.jsonl", "sft_val.jsonl"):
        for row in _read(tiny_data_dir, name):
            user, assistant = (m["content"] for m in row["messages"])
            assert world.verify({"answer": answer_of(parse_prompt(user))}, assistant), row
            styles.append(world.classify_style(assistant))
    assert set(styles) == set(world.STYLES)
    # step-by-step is the most common style (so that greedy decoding writes the steps out)
    assert max(world.STYLES, key=styles.count) == "step"


def test_rl_answers_are_right(tiny_data_dir):
    for row in _read(tiny_data_dir, "rl.jsonl"):
        assert row["answer"] == answer_of(parse_prompt(row["prompt"]))


@pytest.mark.parametrize("name", ["prefs.jsonl", "prefs_test.jsonl"])
def test_preference_pairs_follow_the_judge(tiny_data_dir, name):
    kinds = set()
    for row in _read(tiny_data_dir, name):
        chosen, rejected = row["chosen"], row["rejected"]
        assert chosen != rejected
        # both replies end with a parseable final line
        assert world.parse_answer(chosen) is not None and world.parse_answer(rejected) is not None
        # the rows carry no answer: recompute it from the prompt, then ask the judge
        problem = {"answer": answer_of(parse_prompt(row["prompt"]))}
        assert world.judge(problem, chosen) > world.judge(problem, rejected), row
        kinds.add((world.verify(problem, chosen), world.verify(problem, rejected)))
    if name == "prefs.jsonl":
        # the mix: both right (styles differ), right vs wrong, and both wrong
        assert kinds == {(True, True), (True, False), (False, False)}


@pytest.mark.parametrize("field,value,message", [
    ("n_prefs", 0, "--n-prefs must be >= 1, got 0"),
    ("n_rl", -5, "--n-rl must be >= 1, got -5"),
    ("pretrain_mb", 0.0, "--pretrain-mb must be > 0, got 0.0"),
    ("pretrain_mb", float("inf"), "--pretrain-mb must be finite and >= 0.00005 (its held-out fiftieth needs text), "
                                  "got inf"),
    ("pretrain_mb", 0.00004, "--pretrain-mb must be finite and >= 0.00005 (its held-out fiftieth needs text), "
                             "got 4e-05"),  # 40 bytes: an empty fiftieth
    ("fact_share", 1.5, "--fact-share is a share of the documents, in [0, 1], got 1.5"),
    ("vocab_size", 260, "--vocab-size must be >= 261 (256 bytes + 5 special tokens), got 260"),
])
def test_a_config_that_cannot_build_stops_before_writing(tmp_path, monkeypatch, field, value, message):
    # a zero count or an empty text would only fail later, in another stage, far from its cause
    out = tmp_path / "data"
    monkeypatch.setattr("sys.argv", ["prepare.py", "--out", str(out), "--" + field.replace("_", "-"), str(value)])
    with pytest.raises(SystemExit) as e:
        P.main()
    assert e.value.code == f"error: {message}"
    assert not out.exists()
    with pytest.raises(ValueError, match=re.escape(message)):  # the same check when called from Python
        P.prepare(P.PrepareConfig(**{field: value}), str(out))
    assert not out.exists()


def test_out_that_is_a_file_stops_in_one_line(tmp_path, monkeypatch, tiny_config):
    out = tmp_path / "data"
    out.write_text("not a directory")
    monkeypatch.setattr("sys.argv", ["prepare.py", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        P.main()
    assert e.value.code == f"error: --out {out}: exists and is not a directory"
    with pytest.raises(ValueError, match="exists and is not a directory"):
        P.prepare(tiny_config, str(out))


def test_a_rebuild_cut_short_does_not_pass_for_the_old_build(tiny_config, tmp_path, monkeypatch):
    # the old manifest used to stay while the new files were written: a rebuild with another seed,
    # interrupted before the tokenizer, left the new data with the old tokenizer, "up to date"
    out = str(tmp_path)
    P.prepare(tiny_config, out_dir=out, verbose=False)
    assert P.up_to_date(tiny_config, out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(P.bpe, "train_bpe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(replace(tiny_config, seed=tiny_config.seed + 1), out_dir=out, verbose=False)
    assert not P.up_to_date(tiny_config, out)
    assert not P.up_to_date(replace(tiny_config, seed=tiny_config.seed + 1), out)
    monkeypatch.undo()
    P.prepare(tiny_config, out_dir=out, verbose=False)  # and the next call rebuilds it whole
    assert P.up_to_date(tiny_config, out)


def test_the_smallest_buildable_config_builds(tmp_path, tiny_config):
    # the bounds above are the real edges: one of each row, and a vocabulary of bytes and specials only
    edge = replace(tiny_config, n_sft=1, n_prefs=1, n_test=1, n_prefs_test=1, n_sft_val=1, n_rl=1, fact_share=1.0,
                   vocab_size=256 + 5)
    assert P.config_problem(edge) is None
    P.prepare(edge, str(tmp_path), verbose=False)
    with open(tmp_path / "tokenizer.tiktoken") as f:
        assert len(f.readlines()) == 256  # no room for a merge
    with open(tmp_path / "rl.jsonl") as f:
        assert len(f.readlines()) == 1


def test_every_flag_of_prepare_has_its_help_line():
    assert set(P.FLAG_HELP) == set(asdict(P.PrepareConfig()))
