"""
Reading and validating the files a user brings, in the formats of the ecosystem (TRL, the HF
datasets hub), and writing files atomically. Every problem stops with a DataError naming the file,
the line and what is wrong; nothing here imports torch.

    preference pairs   {"prompt", "chosen", "rejected"}: strings, or TRL's conversational form
    unpaired (KTO)     {"prompt", "completion", "label": true|false}
    SFT                {"messages": [{"role", "content"}, ...]}
    problems (RL, eval) {"prompt", "answer": <integer>}
"""

import json
import os
import re

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad input file: the message names the file, the line and what is wrong."""


def write_atomically(path, write):
    """write(tmp) fills a temp file beside path, then one rename puts it in place: a run killed
    mid-write leaves the old file (or none), never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """text written atomically (see write_atomically)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, write)


def read_jsonl(path):
    """Rows of a JSONL file as (line number, dict). Raises DataError naming the file and line on
    a missing file, bytes that are not UTF-8, bad JSON, a row that is not an object, or a file with
    no rows."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{n}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


def valid_prompt(value):
    """A prompt the chat template can render: a string, or a non-empty list of {role, content}
    messages."""
    if isinstance(value, str):
        return True
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)


def check_row(path, n, row, keys):
    """The checks every data file shares (preference, unpaired and RL rows): the fields are
    there, and a prompt among them is something the chat template can render."""
    for key in keys:
        if key not in row:
            raise DataError(f"{path}:{n}: missing field '{key}'")
    if "prompt" not in keys:
        return
    if isinstance(row["prompt"], str) and not row["prompt"].strip():
        raise DataError(f"{path}:{n}: 'prompt' must be non-empty text ('prompt' is empty)")
    if not valid_prompt(row["prompt"]):
        raise DataError(f"{path}:{n}: 'prompt' must be a non-empty string or a list of {{role, content}} messages")


def read_problems(path):
    """Validate a problem file (held-out problems to sample at evaluation, or RL prompts);
    -> list of {"prompt", "answer": int, ...}. Any problem stops with a DataError naming the file
    and line."""
    problems = []
    for n, row in read_jsonl(path):
        check_row(path, n, row, ("prompt", "answer"))
        answer = row["answer"]
        if isinstance(answer, str) and re.fullmatch(r"\s*-?[0-9]+\s*", answer):
            answer = int(answer)
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise DataError(f"{path}:{n}: 'answer' must be an integer, got {row['answer']!r}")
        problems.append({**row, "answer": answer})
    return problems


def split_reply(value):
    """A response as (the messages before it, its text): a string (no messages before it), or TRL's
    conversational form, {role, content} messages that end with the assistant's reply: one message,
    [{"role": "assistant", ...}], or the whole conversation, [{"role": "user", ...}, {"role":
    "assistant", ...}] (TRL's implicit prompt, and the "-trl-style" sets). -> None when neither."""
    if isinstance(value, str):
        return [], value
    if valid_prompt(value) and value[-1]["role"] == "assistant":
        return value[:-1], value[-1]["content"]
    return None


def checked_response(path, n, row, key):
    """row[key] as (the messages before the reply, its text) (see split_reply), or a DataError naming
    file and line."""
    check_row(path, n, row, (key,))
    split = split_reply(row[key])
    if split is None:
        raise DataError(f"{path}:{n}: '{key}' must be a string or a list of {{role, content}} messages ending "
                          f"with the assistant's reply")
    if not split[1].strip():
        raise DataError(f"{path}:{n}: '{key}' must be non-empty text ('{key}' is empty)")
    return split


def row_prompt(path, n, row, before):
    """The prompt a row's replies answer: the messages before them when they carry the whole
    conversation (TRL's implicit prompt; in the "-trl-style" sets these repeat the "prompt" field),
    else the "prompt" field."""
    if before:
        return before
    check_row(path, n, row, ("prompt",))
    return row["prompt"]


def read_pairs(path, unpaired_hint=""):
    """Validate a preference file; -> list of (prompt, chosen_text, rejected_text).
    Rows: {"prompt", "chosen", "rejected"}, each a string or TRL's conversational form (see
    split_reply; "prompt" may then be left out). Any problem stops with a DataError naming the file
    and line; unpaired_hint is added to the one an unpaired (KTO) row gets."""
    pairs = []
    for n, row in read_jsonl(path):
        if "completion" in row and "chosen" not in row:
            raise DataError(f"{path}:{n}: an unpaired row (prompt, completion, label) in a file of pairs (prompt, "
                              f"chosen, rejected){unpaired_hint}")
        (before, chosen), (before_rejected, rejected) = (checked_response(path, n, row, key)
                                                         for key in ("chosen", "rejected"))
        if before != before_rejected:
            raise DataError(f"{path}:{n}: 'chosen' and 'rejected' must answer the same conversation (their "
                              f"messages before the last reply differ)")
        pairs.append((row_prompt(path, n, row, before), chosen, rejected))
    return pairs


def read_unpaired(path):
    """Validate TRL's unpaired (KTO) format {"prompt", "completion", "label": true|false};
    -> list of (prompt, completion_text, label)."""
    rows = []
    for n, row in read_jsonl(path):
        before, text = checked_response(path, n, row, "completion")
        prompt = row_prompt(path, n, row, before)
        check_row(path, n, row, ("label",))
        if not isinstance(row["label"], bool):
            raise DataError(f"{path}:{n}: 'label' must be true or false, got {row['label']!r}")
        rows.append((prompt, text, row["label"]))
    return rows


def read_preferences(path, kto=False):
    """A training file of pairs, or with kto also of TRL's unpaired rows (told apart by the first
    row's "completion"). -> (rows, unpaired): read_pairs' or read_unpaired's rows."""
    unpaired = kto and "completion" in read_jsonl(path)[0][1]
    if unpaired:
        return read_unpaired(path), True
    return read_pairs(path, "" if kto else "; unpaired rows need --loss-type kto"), False


def read_dpo_inputs(data="", test_data="", problems="", kto=False, label_noise=0.0, desirable_share=1.0):
    """The files a DPO run was given (empty: not given), each read and validated before anything is
    built; an unpaired file takes no --label-noise and no --kto-desirable-share (they act on pairs).
    -> {"pairs", "unpaired", "test_pairs", "problems"}, None where not given."""
    inputs = {"pairs": None, "unpaired": False, "test_pairs": None, "problems": None}
    if data:
        inputs["pairs"], inputs["unpaired"] = read_preferences(data, kto)
        if inputs["unpaired"] and label_noise:
            raise DataError(f"{data}: --label-noise swaps chosen and rejected: it needs pairs")
        if inputs["unpaired"] and desirable_share != 1:
            raise DataError(f"{data}: --kto-desirable-share thins the desirable rows split from pairs; an "
                            f"unpaired file's rows are kept as they are")
    if test_data:
        inputs["test_pairs"] = read_pairs(test_data, "; held-out rows are pairs, with --loss-type kto too")
    if problems:
        inputs["problems"] = read_problems(problems)
    return inputs


def read_conversations(path):
    """Validate an SFT file of {"messages": [...]} rows; -> list of (line number, messages)."""
    out = []
    for n, row in read_jsonl(path):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{path}:{n}: 'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{path}:{n}: each message needs a role in {ROLES} and a string content")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{path}:{n}: no assistant message to learn from")
        out.append((n, msgs))
    return out
