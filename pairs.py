"""
Preference pairs for dpo.py: where they come from, and how they become token batches.

They come from a file (--data, or the world's <data-dir>/prefs.jsonl, written by a generator, not
by the model), or, with --pairs on-policy, from the model itself (online.py), written as a
TRL-format file under the stage's output and read back like any other file.

The training and held-out pairs are read, shuffled and tokenised with exact prompt/response
boundaries (for sft.py's Preferred-FT too: the chosen replies of the same pairs, preferred_rows),
then laid out for the model one of three ways (row_layout picks it from the flags):

  a row per reply (collate):       [prompt | chosen]  and  [prompt | rejected], the prompt twice
  a row per pair (prefix sharing): [prompt | chosen | rejected], the prompt once, the rejected
                                   reply seeing the prompt and itself only (shared_prefix_batch)
  packed:                          [pair 1 | pair 2 | ...], short pairs side by side in a row as
                                   long as the batch's longest pair, each seeing only itself (pack);
                                   the emptier rows in a second, shorter pass (two_passes)

All score every response token with the same context, so the log-probs agree to rounding
(tests/test_dpo.py holds them together); the second does the prompt's work once per pair, and
the third pads less, for the same batch of pairs.

    python dpo.py                          (a row per pair, short ones packed: the default)
    python dpo.py --no-packing             (a row per pair)
    python dpo.py --no-prefix-sharing      (a row per reply)
"""

import dataclasses
import os

import torch

import model as M
import plumbing as P
from data import formats
from dpo_family import kto_rows
from plumbing import option


@dataclasses.dataclass
class LayoutOptions:
    """How dpo.py lays out its batches (row_layout), for its config to inherit."""
    # a row per pair computes the prompt once, not once per reply (measured: docs/speed.md)
    prefix_sharing: bool = option(True, "score a pair's two replies in one row, the prompt computed once; "
                                  "--no-prefix-sharing: a row per reply (kto always: its replies answer two prompts)",
                                  "dpo")
    # short pairs side by side in a row: less padding for the same batch of pairs (docs/speed.md)
    packing: bool = option(True, "with prefix sharing, pack short pairs several to a row, each seeing only "
                           "itself, the rows in two passes by fill (less padding, the same batches); "
                           "--no-packing: a row per pair", "dpo")
    # off: batches of similar length change what each step averages over (five seeds: docs/speed.md)
    bucket_by_length: bool = option(False, "draw each training batch from pairs of similar length (seeded, "
                                    "shuffled; less padding), instead of from the whole shuffled pass", "dpo")


def flip_labels(pairs, share, rng):
    """Label noise: swap chosen and rejected in round(share * N) pairs drawn at random.
    -> (pairs, the set of flipped indices)."""
    flipped = set(rng.sample(range(len(pairs)), round(share * len(pairs))))
    return [(p, r, c) if i in flipped else (p, c, r) for i, (p, c, r) in enumerate(pairs)], flipped


def tokenize_pairs(enc, pairs, max_prompt_len, max_length):
    """Prompt and responses are tokenised separately and concatenated, so the response starts
    exactly at its first token (tokenising prompt + response as one string can merge tokens across
    the boundary). Every response ends with <|end|>, which is scored like any response token (a
    response cut at max_length loses it, counted as truncated).
    -> (examples, counts) with examples [{"prompt", "chosen", "rejected"}] of id lists, "row" (the
    pair's index in `pairs`) and, for KTO's rows (prompt, completion, another row's completion,
    label), "label"."""
    counts = {"kept": 0, "dropped_identical": 0, "prompt_truncated": 0, "response_truncated": 0,
              "dropped_no_response": 0}
    examples = []
    for row, (prompt, chosen, rejected, *label) in enumerate(pairs):  # KTO's rows carry a 4th item, the label
        # a pair with one reply twice has no preference to learn; a KTO row's second reply is only a
        # mismatched sample for its reference point, and may equal its own
        if chosen == rejected and not label:
            counts["dropped_identical"] += 1
            continue
        p = M.render_prompt(enc, prompt)
        if len(p) > max_prompt_len:  # keep the end of the prompt: it is what the reply answers
            p = p[-max_prompt_len:]
            counts["prompt_truncated"] += 1
        room = max_length - len(p)
        if room <= 0:
            counts["dropped_no_response"] += 1
            continue
        c, r = M.render_response(enc, chosen), M.render_response(enc, rejected)
        if len(c) > room or len(r) > room:
            counts["response_truncated"] += 1
            c, r = c[:room], r[:room]
            if c == r and not label:  # cut down to the same tokens: no preference left
                counts["dropped_identical"] += 1
                continue
        examples.append({"prompt": p, "chosen": c, "rejected": r, "row": row,  # evaluation reads the row's text
                         **({"label": label[0]} if label else {})})
        counts["kept"] += 1
    return examples, counts


def collate(examples, pad_id, device):
    """B pairs -> one batch of 2B rows, chosen rows first, then rejected, so both go through the
    model in one forward pass (KTO's training rows in two: see kto_logprobs). loss_mask is 1 exactly
    on response positions (set by position, never by token id).
    -> input_ids (2B, T), loss_mask (2B, T); T is this batch's own longest row."""
    prompts = [ex["prompt"] for ex in examples] * 2
    responses = [ex["chosen"] for ex in examples] + [ex["rejected"] for ex in examples]
    return M.prompt_response_batch(prompts, responses, pad_id, device)


def row_layout(config):
    """The layout dpo.py's batches take under this config: a row per pair (shared), short pairs
    packed several to a row (packed), unless --no-prefix-sharing or KTO, whose second reply is
    another row's, scored without a graph (dpo.kto_logprobs)."""
    return {"shared": config.prefix_sharing and config.loss_type != "kto", "kto": config.loss_type == "kto",
            "packed": config.packing}


def row_lengths(examples):
    """Each pair's tokens in a row per pair (prompt, chosen and rejected): what a batch pads to."""
    return [len(ex["prompt"]) + len(ex["chosen"]) + len(ex["rejected"]) for ex in examples]


def pack(sizes, capacity):
    """First-fit decreasing: each item of sizes[i] <= capacity tokens goes, longest first, into the
    first row with room for it. -> (row, offset) per item, in the items' order; rows used"""
    places, room = [None] * len(sizes), []  # room[r]: tokens still free in row r
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = next((r for r, free in enumerate(room) if free >= sizes[i]), len(room))
        if r == len(room):
            room.append(capacity)
        places[i] = (r, capacity - room[r])
        room[r] -= sizes[i]
    return places, len(room)


def two_passes(fill):
    """Where to cut packed rows, fullest first, into two passes through the model: a tensor pads
    every row to its fullest, and rows holding one long pair and rows holding short ones differ
    most. -> k: the k fullest rows, then the rest, each pass as long as its own fullest row; k is
    where the two hold the fewest positions, len(fill) (one pass) on a tie.
    fill: each row's tokens before its padding, in descending order."""
    R = len(fill)
    return min(range(R, 0, -1), key=lambda k: k * fill[0] + (R - k) * (fill[k] if k < R else 0))


def shared_prefix_batch(examples, pad_id, device, packed=True, split=True):
    """B pairs -> rows of prompt + chosen + rejected, the prompt computed once for both replies
    (prefix sharing, Wang et al. 2024, arXiv 2410.20305). The rejected reply restarts its positions
    after the prompt, and the attention mask lets each reply see the prompt and itself, never the
    other reply, so each is scored exactly as in a row of its own. A scored token is predicted by
    the states at its source: the previous token's, or, for each reply's first, the prompt's last.
    packed: short pairs share a row (pack), each pair's positions starting at 0 and its mask a
    block of its own, so the rows are fewer than B; and the rows go through the model in two
    passes (two_passes; one where a cut saves nothing), the fullest ones, as long as the longest
    pair, then the rest, only as long as their own fullest: less padding, and every reply still
    scored as in a row of its own. packed=False: a row per pair, one pass; split=False: the packed
    rows in one pass.
    -> {"passes": [{"ids" (R, T), "positions" (R, T), "mask" (R, 1, T, T) bool}, ...], each pass
        with its own R rows and length T,
        "index" (N,): each scored token's source among the passes' states, flattened in order,
        "target" (N,): the N scored tokens, the chosen ones then the rejected ones, "lengths" (2B,)}"""
    sizes = row_lengths(examples)
    T = max(sizes)  # (longer rows pack tighter, but their attention costs as much as the padding saved)
    places, R = pack(sizes, T) if packed else ([(b, 0) for b in range(len(examples))], len(examples))
    fill = [max(o + n for n, (r, o) in zip(sizes, places) if r == row) for row in range(R)]
    if packed:  # renumber the rows fullest first, for the cut
        fullest = sorted(range(R), key=lambda r: -fill[r])
        renumbered = {r: i for i, r in enumerate(fullest)}
        places, fill = [(renumbered[r], o) for r, o in places], [fill[r] for r in fullest]
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    positions = torch.zeros(R, T, dtype=torch.long)
    mask = torch.eye(T, dtype=torch.bool).repeat(R, 1, 1)  # (R, T, T); a pad query sees itself
    scored = {"chosen": [], "rejected": []}  # (row, source, target) per scored token
    for ex, n, (b, o) in zip(examples, sizes, places):  # pair ex fills row b from offset o
        n_p, n_c, n_r = len(ex["prompt"]), len(ex["chosen"]), len(ex["rejected"])
        ids[b, o: o + n] = torch.tensor(ex["prompt"] + ex["chosen"] + ex["rejected"])
        positions[b, o: o + n_p + n_c] = torch.arange(n_p + n_c)
        positions[b, o + n_p + n_c: o + n] = torch.arange(n_p, n_p + n_r)  # the rejected reply restarts after the prompt
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        causal[n_p + n_c:, n_p: n_p + n_c] = False  # the rejected reply never sees the chosen one
        mask[b, o: o + n, o: o + n] = causal  # and nothing of another pair in the row
        scored["chosen"] += [(b, o + n_p - 1 + j, ex["chosen"][j]) for j in range(n_c)]
        scored["rejected"] += [(b, o + (n_p - 1 if j == 0 else n_p + n_c + j - 1), ex["rejected"][j])
                               for j in range(n_r)]
    row, source, target = torch.tensor(scored["chosen"] + scored["rejected"]).T  # (N,) each
    k = two_passes(fill) if packed and split else R
    cuts = [(0, k, T)] + ([(k, R, fill[k])] if k < R else [])  # (first row, end, length) of each pass
    passes = [{"ids": ids[a:e, :t], "positions": positions[a:e, :t], "mask": mask[a:e, None, :t, :t]}
              for a, e, t in cuts]
    index = row * T + source  # where a row of the first pass flattens; one of the second, after all k of them
    if k < R:
        index = torch.where(row < k, index, k * T + (row - k) * fill[k] + source)
    lengths = torch.tensor([len(ex["chosen"]) for ex in examples] + [len(ex["rejected"]) for ex in examples])
    return {"passes": [{key: t.contiguous().to(device) for key, t in part.items()} for part in passes],
            "index": index.to(device), "target": target.to(device), "lengths": lengths.to(device)}


def training_pairs(config, enc, rng, inputs, data_path, test_path):
    """The training pairs shuffled, cut to --max-pairs (label noise or KTO's rows applied), and both
    files tokenised. -> (examples, test_pairs, test_examples, batch_size, counts, test_counts)"""
    pairs = inputs["pairs"] if inputs["pairs"] is not None else formats.read_pairs(data_path)
    rng.shuffle(pairs)
    if config.max_pairs:
        pairs = pairs[: config.max_pairs]
    if config.label_noise:
        pairs, flipped = flip_labels(pairs, config.label_noise, rng)
        print(f"dpo: label noise: chosen and rejected swapped in {len(flipped)} of {len(pairs)} pairs")
    if config.loss_type == "kto":  # unpaired rows, each with a mismatched completion for z0
        pairs = kto_rows(pairs, inputs["unpaired"], rng, config.kto_desirable_share)
    examples, counts = tokenize_pairs(enc, pairs, config.max_prompt_len, config.max_length)
    test_pairs = inputs["test_pairs"] if inputs["test_pairs"] is not None else formats.read_pairs(test_path)
    test_examples, test_counts = tokenize_pairs(enc, test_pairs, config.max_prompt_len, config.max_length)

    def described(c):
        return (f"{c['dropped_identical']} dropped as identical, {c['dropped_no_response']} with no room for a "
                f"response; truncated: {c['prompt_truncated']} prompts, {c['response_truncated']} responses")

    unit = "rows" if config.loss_type == "kto" else "pairs"
    print(f"dpo: {len(examples)} training {unit} ({described(counts)}), {len(test_examples)} held-out pairs "
          f"({described(test_counts)})")
    if not examples:
        raise P.DataError(f"{data_path}: no usable pairs left")
    if not test_examples:
        raise P.DataError(f"{test_path}: no usable held-out pairs left")
    batch_size = min(config.batch_size, len(examples))
    if batch_size < config.batch_size:
        print(f"dpo: only {len(examples)} {unit}: batch size {config.batch_size} -> {batch_size}")
    if config.steps and config.steps * batch_size < len(examples):
        # a short run meets only steps x batch_size of them (the pairs are shuffled already): keep those,
        # so the reference pass scores no more than training will use
        examples = examples[: config.steps * batch_size]
        print(f"dpo: --steps {config.steps} x {batch_size}: training on the first {len(examples)} {unit}")
    return examples, test_pairs, test_examples, batch_size, counts, test_counts


DPO_LENGTHS = (96, 192)  # dpo.py's --max-prompt-len and --max-length (a test holds them together)


def preferred_rows(config, enc, rng):
    """Preferred-FT's rows: dpo.py's training pairs, shuffled, cut and tokenised as dpo.py does with
    the same seed (so the same rng then draws DPO's batches), each row the prompt + the chosen reply,
    the loss on the reply; and the held-out pairs' chosen replies, for the validation loss."""
    rows = formats.read_pairs(config.pft_data or os.path.join(config.data_dir, "prefs.jsonl"))
    rng.shuffle(rows)
    examples, _ = tokenize_pairs(enc, rows[: config.pft_max_pairs or None], *DPO_LENGTHS)
    if config.pft_steps and config.pft_steps * config.pft_batch_size < len(examples):
        examples = examples[: config.pft_steps * config.pft_batch_size]  # as dpo.py keeps a short run's
    test, _ = tokenize_pairs(enc, formats.read_pairs(os.path.join(config.data_dir, "prefs_test.jsonl")),
                                   *DPO_LENGTHS)

    def chosen(ex):
        return ex["prompt"] + ex["chosen"], [0] * len(ex["prompt"]) + [1] * len(ex["chosen"])
    return [chosen(ex) for ex in examples], [chosen(ex) for ex in test]
