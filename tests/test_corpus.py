"""corpus.py: the pretraining stream and the SFT conversations as token rows, each checked against a
hand-built encoding, and bad rows reported with their file and line."""

import json

import pytest

import corpus
import model as M
import plumbing as P


def test_pretrain_stream_hand_built(tiny_enc, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("Mia has 3 pens.\n\n2 + 2 = 4.\n")
    bos = M.special(tiny_enc, "endoftext")
    expected = ([bos] + tiny_enc.encode_ordinary("Mia has 3 pens.")
                + [bos] + tiny_enc.encode_ordinary("2 + 2 = 4."))
    assert corpus.pretrain_stream(tiny_enc, str(path)).tolist() == expected


def _write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is 1."}]}


@pytest.mark.parametrize("bad", [
    {"prompt": "no messages"},
    {"messages": []},
    {"messages": "not a list"},
    {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
    {"messages": ["just a string", {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": "only a question"}]},
])
def test_sft_examples_rejects_bad_rows_with_file_and_line(tiny_enc, tmp_path, bad):
    path = tmp_path / "sft.jsonl"
    _write_rows(path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(P.DataError) as e:
        corpus.sft_examples(tiny_enc, str(path), 192)
    assert f"{path}:3" in str(e.value)


def test_sft_examples_reports_bad_json_with_file_and_line(tiny_enc, tmp_path):
    path = tmp_path / "sft.jsonl"
    _write_rows(path, [GOOD, "{not json"])
    with pytest.raises(P.DataError, match=f"{path}:2"):
        corpus.sft_examples(tiny_enc, str(path), 192)


def test_sft_examples_renders_and_cuts_long_rows(tiny_enc, tmp_path):
    path = tmp_path / "sft.jsonl"
    _write_rows(path, [GOOD])
    [(ids, mask)] = corpus.sft_examples(tiny_enc, str(path), 192)
    assert (ids, mask) == tuple(M.render_chat(tiny_enc, GOOD["messages"]))
    full_ids, full_mask = M.render_chat(tiny_enc, GOOD["messages"])
    cut = full_mask.index(1) + 2  # keeps the reply's first two tokens
    assert cut < len(full_ids)
    [(ids, mask)] = corpus.sft_examples(tiny_enc, str(path), cut)  # over-long rows are cut, not dropped
    assert (ids, mask) == (full_ids[:cut], full_mask[:cut]) and sum(mask) == 2
    # ... unless the cut leaves no reply token to learn from: that stops, naming the file and line
    _write_rows(path, [GOOD, GOOD])
    with pytest.raises(P.DataError, match=f"^{path}:1: no assistant token within the first {cut - 2} tokens "):
        corpus.sft_examples(tiny_enc, str(path), cut - 2)
