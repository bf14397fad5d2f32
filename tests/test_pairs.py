"""pairs.py: pairs -> token ids with exact prompt/response boundaries (truncation, drops and their
counts, KTO's rows), a row per reply (collate) and label noise. The row-per-pair layout's
log-probs are held to a row per reply's in test_dpo.py, beside sequence_logprobs.
"""

import itertools
import os
import random

import model as M
import pairs
import plumbing as P
from data import formats
from helpers import pad_id


def test_collate_pads_each_batch_to_its_own_longest_row_chosen_rows_first(tiny_enc, tiny_examples):
    examples, _ = tiny_examples
    batch = sorted(examples[:40], key=lambda ex: len(ex["prompt"]) + len(ex["chosen"]))[:4]  # short rows
    rows = [(ex["prompt"], ex["chosen"]) for ex in batch] + [(ex["prompt"], ex["rejected"]) for ex in batch]
    ids, mask = pairs.collate(batch, pad_id(tiny_enc), "cpu")
    longest = max(len(p) + len(r) for p, r in rows)
    assert ids.shape == mask.shape == (8, longest) and longest < max(len(ex["prompt"]) + len(ex["rejected"])
                                                                     for ex in examples)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        assert ids[i, :n].tolist() == p + r and set(ids[i, n:].tolist()) <= {pad_id(tiny_enc)}
        assert mask[i].tolist() == [0] * len(p) + [1] * len(r) + [0] * (longest - n)


def test_end_of_turn_token_is_the_last_scored_position(tiny_enc, tiny_examples):
    examples, counts = tiny_examples
    assert counts["response_truncated"] == 0  # otherwise a cut response has no <|end|> to score
    end = M.special(tiny_enc, "end")
    ids, mask = pairs.collate(examples, pad_id(tiny_enc), "cpu")
    for row in range(ids.shape[0]):
        scored = mask[row].nonzero().flatten().tolist()
        assert scored, row
        last = scored[-1]
        assert int(ids[row, last]) == end, row
        assert int(mask[row, last + 1:].sum()) == 0
        # the response's text itself holds no <|end|>: the scored one closes the turn
        assert end not in ids[row, scored[:-1]].tolist()


def test_prompt_is_a_shared_prefix_and_the_mask_starts_right_after_it(tiny_enc, tiny_pairs,
                                                                     tiny_examples):
    examples, counts = tiny_examples
    assert counts["prompt_truncated"] == 0
    kept = [p for p in tiny_pairs if p[1] != p[2]]
    assert len(kept) == len(examples) == counts["kept"]
    B = len(examples)
    ids, mask = pairs.collate(examples, pad_id(tiny_enc), "cpu")
    assert ids.shape[0] == 2 * B
    for i, (ex, (prompt, chosen, rejected)) in enumerate(zip(examples, kept)):
        P = len(ex["prompt"])
        assert ex["prompt"] == M.render_prompt(tiny_enc, prompt)
        assert ex["chosen"] == tiny_enc.encode_ordinary(chosen) + [M.special(tiny_enc, "end")]
        assert ex["rejected"] == tiny_enc.encode_ordinary(rejected) + [M.special(tiny_enc, "end")]
        for row, key in ((i, "chosen"), (B + i, "rejected")):
            n = P + len(ex[key])
            assert ids[row, :P].tolist() == ex["prompt"]  # chosen and rejected rows share it
            assert ids[row, P:n].tolist() == ex[key]
            assert mask[row].tolist() == [0] * P + [1] * len(ex[key]) + [0] * (ids.shape[1] - n)


def test_tokenize_pairs_drops_truncates_and_counts(tiny_enc):
    enc = tiny_enc
    end = M.special(enc, "end")
    short = "Ben has 2 cards. How many cards?"
    long_prompt = "Mia has 3 pens and Ben has 4 pens and Ava has 5 pens. " * 4 + "How many pens?"
    reply_a = "Step by step:\nMia starts with 3 pens.\nThe answer is 3."
    reply_b = "The answer is 3."
    full_short = M.render_prompt(enc, short)
    full_long = M.render_prompt(enc, long_prompt)
    a, b = M.render_response(enc, reply_a), M.render_response(enc, reply_b)
    assert len(full_short) < 20 < len(full_long) and len(a) > len(b) > 3

    # identical responses: dropped and counted
    ex, counts = pairs.tokenize_pairs(enc, [(short, reply_a, reply_a), (short, reply_a, reply_b)], 96, 192)
    assert counts["dropped_identical"] == 1 and counts["kept"] == 1 and len(ex) == 1
    assert ex[0] == {"prompt": full_short, "chosen": a, "rejected": b, "row": 1}  # row: its index in the input

    # a long prompt keeps its end (what the reply answers), counted
    ex, counts = pairs.tokenize_pairs(enc, [(long_prompt, reply_a, reply_b)], 20, 192)
    assert counts["prompt_truncated"] == 1 and counts["response_truncated"] == 0
    assert ex[0]["prompt"] == full_long[-20:] and len(ex[0]["prompt"]) == 20
    assert ex[0]["prompt"][-1] == M.special(enc, "assistant")
    assert ex[0]["chosen"] == a and ex[0]["rejected"] == b

    # responses cut from the right to fit max_length, counted once per pair
    room = len(b) - 1  # both responses longer than the room left
    ex, counts = pairs.tokenize_pairs(enc, [(short, reply_a, reply_b)], 96, len(full_short) + room)
    assert counts["response_truncated"] == 1 and counts["kept"] == 1
    assert ex[0]["chosen"] == a[:room] and ex[0]["rejected"] == b[:room]
    assert end not in ex[0]["chosen"]  # the cut is real: the closing <|end|> is gone
    # only the longer one needs a cut
    ex, counts = pairs.tokenize_pairs(enc, [(short, reply_a, reply_b)], 96, len(full_short) + len(b))
    assert counts["response_truncated"] == 1
    assert ex[0]["chosen"] == a[: len(b)] and ex[0]["rejected"] == b

    # no room for any response: dropped and counted
    for max_length in (len(full_short), len(full_short) - 3):
        ex, counts = pairs.tokenize_pairs(enc, [(short, reply_a, reply_b)], 96, max_length)
        assert ex == [] and counts["dropped_no_response"] == 1 and counts["kept"] == 0
    # ... also when the prompt was first truncated to max_prompt_len
    ex, counts = pairs.tokenize_pairs(enc, [(long_prompt, reply_a, reply_b)], 20, 20)
    assert ex == [] and counts["dropped_no_response"] == 1 and counts["prompt_truncated"] == 1


def test_label_noise_flips_exactly_the_requested_share_with_a_fixed_seed():
    rows = [(f"p{i}", f"good{i}", f"bad{i}") for i in range(200)]
    noisy, flipped = pairs.flip_labels(rows, 0.2, random.Random(3))
    assert len(flipped) == 40
    swapped = {i for i, (p, c, r) in enumerate(noisy) if c.startswith("bad")}
    assert swapped == flipped
    for i, (p, c, r) in enumerate(noisy):  # every pair keeps its prompt and both replies
        assert p == f"p{i}" and {c, r} == {f"good{i}", f"bad{i}"}
    again, _ = pairs.flip_labels(rows, 0.2, random.Random(3))
    assert again == noisy


def test_a_kto_row_whose_mismatched_reply_equals_its_own_is_kept(tiny_enc):
    # two prompts answered "The answer is 7.": after the shuffle one row borrows the other's reply as
    # its mismatched sample. That row is still a valid KTO row; only a *pair* of equal replies has
    # nothing to teach
    rows = [("Ava has 7 pens.", "The answer is 7.", "The answer is 7.", True),
            ("Ben has 7 cups.", "The answer is 7.", "The answer is 6.", False)]
    examples, counts = pairs.tokenize_pairs(tiny_enc, rows, 96, 192)
    assert [ex["label"] for ex in examples] == [True, False] and counts["dropped_identical"] == 0
    assert examples[0]["chosen"] == examples[0]["rejected"]
    kept, counts = pairs.tokenize_pairs(tiny_enc, [row[:3] for row in rows], 96, 192)
    assert len(kept) == 1 and counts["dropped_identical"] == 1  # as a pair, the first one goes


def test_preferred_ft_trains_on_dpos_pairs_in_dpos_batches(tiny_enc, tiny_data_dir):
    import dpo
    import sft
    for steps in (0, 2):
        config = sft.SFTConfig(data_dir=tiny_data_dir, seed=5, pft_batch_size=8, pft_max_pairs=150, pft_steps=steps)
        rng = random.Random(5)
        rows, _ = pairs.preferred_rows(config, tiny_enc, rng)
        dpo_config = dpo.DPOConfig(data_dir=tiny_data_dir, seed=5, batch_size=8, max_pairs=150, steps=steps)
        dpo_rng = random.Random(5)
        examples, *_ = pairs.training_pairs(dpo_config, tiny_enc, dpo_rng, formats.read_dpo_inputs(),
                                            os.path.join(tiny_data_dir, "prefs.jsonl"),
                                            os.path.join(tiny_data_dir, "prefs_test.jsonl"))
        assert [r[0] for r in rows] == [ex["prompt"] + ex["chosen"] for ex in examples]
        order, dpo_order = [], []
        for _ in range(30):  # the batches of several passes
            assert (P.next_indices(order, len(rows), 8, rng)
                    == P.next_indices(dpo_order, len(examples), 8, dpo_rng))


def fewest_rows(sizes, capacity):
    """The fewest rows of `capacity` tokens that hold every item: brute force over assignments."""
    best = len(sizes)

    def place(i, room):
        nonlocal best
        if len(room) >= best:
            return
        if i == len(sizes):
            best = len(room)
            return
        for r in range(len(room)):
            if room[r] >= sizes[i]:
                room[r] -= sizes[i]
                place(i + 1, room)
                room[r] += sizes[i]
        place(i + 1, room + [capacity - sizes[i]])

    place(0, [])
    return best


def test_pack_places_every_pair_in_a_row_without_overlap_and_near_the_fewest_rows():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(1, 30) for _ in range(rng.randint(1, 8))]
        capacity = max(sizes) + rng.choice([0, 0, 5])
        places, n_rows = pairs.pack(sizes, capacity)
        assert len(places) == len(sizes) and {r for r, _ in places} == set(range(n_rows))
        for r in range(n_rows):
            spans = sorted((o, o + sizes[i]) for i, (row, o) in enumerate(places) if row == r)
            assert spans[0][0] >= 0 and spans[-1][1] <= capacity
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two pairs overlap
        # first-fit decreasing is within 11/9 of the optimum, plus 6/9 (Dosa 2007)
        assert n_rows <= 11 / 9 * fewest_rows(sizes, capacity) + 6 / 9
    assert pairs.pack([5, 5, 5], 10) == ([(0, 0), (0, 5), (1, 0)], 2)  # worked by hand: two fit, one waits


def test_two_passes_cuts_where_the_fewest_positions_go_through_the_model():
    # brute force: every way of putting the rows in two passes (each as long as its fullest row);
    # a contiguous cut of the rows sorted by fill is as good as any of them
    def positions(group):
        return len(group) * max(group, default=0)

    rng = random.Random(0)
    for _ in range(200):
        fill = sorted((rng.randint(1, 40) for _ in range(rng.randint(1, 8))), reverse=True)
        k = pairs.two_passes(fill)
        best = min(positions([f for f, s in zip(fill, side) if s]) + positions([f for f, s in zip(fill, side) if not s])
                   for side in itertools.product([True, False], repeat=len(fill)))
        assert 1 <= k <= len(fill) and positions(fill[:k]) + positions(fill[k:]) == best
    assert pairs.two_passes([10, 10, 10]) == 3  # no padding to save: one pass
    assert pairs.two_passes([10, 9, 4, 3]) == 2  # by hand: 2 x 10 + 2 x 4 = 28; k = 1: 37, k = 3: 33, one pass: 40


def test_a_packed_batch_keeps_each_pair_to_itself(tiny_enc, tiny_examples):
    examples, _ = tiny_examples
    batch = sorted(examples[:40], key=lambda ex: len(ex["prompt"]) + len(ex["chosen"]) + len(ex["rejected"]))
    batch = batch[:6] + batch[-2:]  # short pairs that fit beside one another, and the longest
    packed, one_pass, single = (pairs.shared_prefix_batch(batch, pad_id(tiny_enc), "cpu", packed=p, split=s)
                                for p, s in ((True, True), (True, False), (False, True)))
    assert len(single["passes"]) == len(one_pass["passes"]) == 1 and len(packed["passes"]) == 2
    (rows, _), = [p["ids"].shape for p in single["passes"]]
    (first, second) = [p["ids"].shape for p in packed["passes"]]
    longest = max(pairs.row_lengths(batch))
    assert rows == len(batch) and first[0] + second[0] == len(one_pass["passes"][0]["ids"]) < len(batch)
    assert first[1] == longest > second[1]  # the second pass only as long as its own fullest row
    for layout in (packed, one_pass):
        for key in ("target", "lengths"):  # the same scored tokens, in the same order
            assert layout[key].tolist() == single[key].tolist()
        # every scored token's source is the same token at the same position, and it may attend to the
        # same tokens at the same positions as in a row of its own, and to nothing else
        assert seen_from_sources(layout) == seen_from_sources(single)


def seen_from_sources(batch):
    """For each scored token, found through batch["index"] in the flattened passes: the (id, position)
    at its source, and the sorted (id, position) of every token its source may attend to."""
    places = [(p, r, s) for p, part in enumerate(batch["passes"])
              for r in range(part["ids"].shape[0]) for s in range(part["ids"].shape[1])]  # flattened order
    seen = []
    for i in batch["index"].tolist():
        p, r, s = places[i]
        part = batch["passes"][p]
        visible = part["mask"][r, 0, s].nonzero().flatten().tolist()
        seen.append(((part["ids"][r, s].item(), part["positions"][r, s].item()),
                     sorted((part["ids"][r, t].item(), part["positions"][r, t].item()) for t in visible)))
    return seen
