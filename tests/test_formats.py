"""data/formats.py: reading the files a user brings, in the ecosystem's formats: JSONL rows with their
line numbers, preference pairs (strings or conversations), unpaired KTO rows, problems with integer
answers. Every bad file or row stops with one DataError naming the file, the line and the problem.
"""

import json

import pytest

from data import formats
from data.prepare import write_jsonl


# ----------------------------------------------------------------------------------------------
# JSONL rows


def test_read_jsonl_reads_rows_with_line_numbers(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert formats.read_jsonl(str(path)) == [(1, {"a": 1}), (3, {"a": 2})]  # blank lines are counted


def test_read_jsonl_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(formats.DataError) as e:
        formats.read_jsonl(path)
    assert path in str(e.value)


def test_read_jsonl_bad_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n{"a": 3}\n')
    with pytest.raises(formats.DataError) as e:
        formats.read_jsonl(str(path))
    assert f"{path}:3" in str(e.value)


def test_read_jsonl_non_object_row(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(formats.DataError) as e:
        formats.read_jsonl(str(path))
    assert f"{path}:2" in str(e.value) and "list" in str(e.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_read_jsonl_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(formats.DataError) as e:
        formats.read_jsonl(str(path))
    assert str(path) in str(e.value) and "no rows" in str(e.value)


def test_data_error_is_a_value_error():
    # callers that catch ValueError (e.g. argparse-style validation) still see data errors
    assert issubclass(formats.DataError, ValueError)


# ----------------------------------------------------------------------------------------------
# Preference pairs


PAIR = {"prompt": "Ben has 2 cards. How many cards?", "chosen": "The answer is 2.",
        "rejected": "Whatever.\nThe answer is 2."}


PAIR_BAD_ROWS = [  # (row written at line 3, what the message must say)
    ('{"prompt": "x", "chosen": "y"', "not valid JSON"),
    ('{"prompt": "Ben?", "chosen": "y"}', "missing field 'rejected'"),
    ('{"chosen": "y", "rejected": "z"}', "missing field 'prompt'"),
    ('{"prompt": "", "chosen": "y", "rejected": "z"}', "'prompt' is empty"),
    ('{"prompt": "   ", "chosen": "y", "rejected": "z"}', "'prompt' is empty"),
    ('{"prompt": "Ben?", "chosen": "", "rejected": "z"}', "'chosen' is empty"),
    ('{"prompt": "Ben?", "chosen": "y", "rejected": " \\n"}', "'rejected' is empty"),
    ('{"prompt": [], "chosen": "y", "rejected": "z"}', "'prompt' must be"),
    ('{"prompt": "Ben?", "chosen": 3, "rejected": "z"}', "'chosen' must be"),
    ('[1, 2, 3]', "expected a JSON object"),
    ('"just a string"', "expected a JSON object"),
    ('{"prompt": "Ben?", "chosen": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}], '
     '"rejected": "z"}', "ending with the assistant's reply"),
    ('{"chosen": [{"role": "user", "content": "Ben?"}, {"role": "assistant", "content": "y"}], '
     '"rejected": [{"role": "user", "content": "Ann?"}, {"role": "assistant", "content": "z"}]}',
     "must answer the same conversation"),
]


def write_pairs_with_bad_line(path, bad):
    path.write_text(json.dumps(PAIR) + "\n\n" + bad + "\n" + json.dumps(PAIR) + "\n")


@pytest.mark.parametrize("bad,message", PAIR_BAD_ROWS)
def test_read_pairs_names_file_line_and_problem(tmp_path, bad, message):
    path = tmp_path / "pairs.jsonl"
    write_pairs_with_bad_line(path, bad)  # a good row, a blank line, then the bad row at line 3
    with pytest.raises(formats.DataError) as e:
        formats.read_pairs(str(path))
    assert f"{path}:3:" in str(e.value) and message in str(e.value), str(e.value)


def test_read_pairs_missing_and_empty_files(tmp_path):
    with pytest.raises(formats.DataError, match="no such file"):
        formats.read_pairs(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(formats.DataError, match="no rows"):
        formats.read_pairs(str(tmp_path / "empty.jsonl"))
    (tmp_path / "ok.jsonl").write_text(json.dumps(PAIR) + "\n")
    assert formats.read_pairs(str(tmp_path / "ok.jsonl")) == [(PAIR["prompt"], PAIR["chosen"], PAIR["rejected"])]


# ----------------------------------------------------------------------------------------------
# Unpaired rows (KTO)


def test_read_unpaired_validates_rows(tmp_path):
    good = tmp_path / "kto.jsonl"
    good.write_text('{"prompt": "q", "completion": "a", "label": true}\n'
                    '{"prompt": "q", "completion": [{"role": "assistant", "content": "b"}], "label": false}\n')
    assert formats.read_unpaired(str(good)) == [("q", "a", True), ("q", "b", False)]
    for row, message in [('{"prompt": "q", "completion": "a"}', "missing field 'label'"),
                         ('{"prompt": "q", "completion": "a", "label": 1}', "'label' must be true or false"),
                         ('{"prompt": "q", "completion": " ", "label": true}', "'completion' must be"),
                         ('{"prompt": "", "completion": "a", "label": true}', "'prompt' must be")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "q", "completion": "a", "label": true}\n' + row + "\n")
        with pytest.raises(formats.DataError, match=rf"bad.jsonl:2: {message}"):
            formats.read_unpaired(str(bad))


# ----------------------------------------------------------------------------------------------
# Problems


PROBLEM = {"prompt": "Ben has 2 cards. How many cards?", "answer": 2}


PROBLEM_BAD_ROWS = [  # (row written at line 3, what the message must say)
    ('{"answer": 3}', "missing field 'prompt'"),
    ('{"prompt": "Ben?"}', "missing field 'answer'"),
    ('{"prompt": "Ben?", "answer": "abc"}', "'answer' must be an integer"),
    ('{"prompt": "Ben?", "answer": 3.5}', "'answer' must be an integer"),
    ('{"prompt": "Ben?", "answer": "3.5"}', "'answer' must be an integer"),
    ('{"prompt": "Ben?", "answer": true}', "'answer' must be an integer"),
    ('{"prompt": "Ben?", "answer": null}', "'answer' must be an integer"),
    ('{"prompt": "", "answer": 3}', "'prompt' must be"),
    ('{"prompt": "  ", "answer": 3}', "'prompt' must be"),
    ('{"prompt": [], "answer": 3}', "'prompt' must be"),
    ('{"prompt": 7, "answer": 3}', "'prompt' must be"),
    ('{"prompt": "Ben?", "answer": 3', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
]


def write_problems_with_bad_line(path, bad):
    path.write_text(json.dumps(PROBLEM) + "\n\n" + bad + "\n" + json.dumps(PROBLEM) + "\n")


def test_read_problems_accepts_good_rows(tmp_path):
    rows = [PROBLEM, {"prompt": "Ava?", "answer": "12", "n_ops": 2}, {"prompt": "Mia?", "answer": " -4 "},
            {"prompt": [{"role": "user", "content": "Finn?"}], "answer": 0}]
    path = tmp_path / "rl.jsonl"
    write_jsonl(str(path), rows)
    got = formats.read_problems(str(path))
    assert [p["answer"] for p in got] == [2, 12, -4, 0]
    assert all(type(p["answer"]) is int for p in got)
    assert [p["prompt"] for p in got] == [r["prompt"] for r in rows] and got[1]["n_ops"] == 2


@pytest.mark.parametrize("bad,message", PROBLEM_BAD_ROWS)
def test_read_problems_names_file_line_and_problem(tmp_path, bad, message):
    path = tmp_path / "rl.jsonl"
    write_problems_with_bad_line(path, bad)  # a good row, a blank line, then the bad row at line 3
    with pytest.raises(formats.DataError) as e:
        formats.read_problems(str(path))
    assert f"{path}:3:" in str(e.value) and message in str(e.value), str(e.value)


def test_read_problems_missing_and_empty_files(tmp_path):
    with pytest.raises(formats.DataError, match="no such file") as e:
        formats.read_problems(str(tmp_path / "nope.jsonl"))
    assert str(tmp_path / "nope.jsonl") in str(e.value)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(formats.DataError, match="no rows") as e:
        formats.read_problems(str(tmp_path / "empty.jsonl"))
    assert str(tmp_path / "empty.jsonl") in str(e.value)


@pytest.mark.parametrize("answer", ["--3", "\u00b2"])
def test_read_problems_odd_digit_strings_are_a_data_error(tmp_path, answer):
    # strings that look like digits to str.isdigit but that int() refuses ("--3", a superscript)
    # must end in the one-line DataError naming the file and line, not a traceback
    path = tmp_path / "rl.jsonl"
    write_problems_with_bad_line(path, json.dumps({"prompt": "Ben?", "answer": answer}))
    with pytest.raises(formats.DataError) as e:
        formats.read_problems(str(path))
    assert f"{path}:3:" in str(e.value)
