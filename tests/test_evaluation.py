"""evaluation.py: what the stages measure on held-out data, each against a hand-worked or brute-force
answer: the reply budget against the context, pass@k, the judge's win rate and what decided it,
preference accuracy by pair kind and by the right reply's style, the KL on sampled replies, and the
paired sampling comparison of a policy with its reference (greedy and sampled).
"""

import itertools
import json
import os

import pytest
import torch

import dpo
import evaluation as E
import helpers
import model as M
import plumbing as P
from data import world
from helpers import reply_logp, tiny_gpt


def t(values, dtype=torch.float32, **kw):
    return torch.tensor(values, dtype=dtype, **kw)


def tiny_path(tiny_data_dir, name):
    return os.path.join(tiny_data_dir, name)


# ----------------------------------------------------------------------------------------------
# The reply budget


def test_replies_that_would_run_past_the_context_are_refused_in_one_line(tiny_enc):
    # the boundary worked by hand: a prompt of L tokens and a context of L + 5 leave room for 5 new tokens
    prompt = "Ben has 3 cards. He gets 2 more. How many cards does Ben have?"
    L = len(M.render_prompt(tiny_enc, prompt))
    model = helpers.tiny_gpt(tiny_enc.n_vocab, block_size=L + 5).eval()
    E.check_replies_fit(L + 5, tiny_enc, [prompt, "Hi?"], 5, "test.jsonl")  # exactly fits
    with pytest.raises(P.ConfigError, match=rf"^--max-new-tokens 6 does not fit: the longest prompt in test.jsonl "
                                            rf"takes {L} of the model's {L + 5} context tokens, leaving 5$"):
        E.check_replies_fit(L + 5, tiny_enc, ["Hi?", prompt], 6, "test.jsonl")
    with pytest.raises(P.ConfigError, match=rf"takes {L} of ref.pt's {L - 2} context tokens, leaving 0$"):
        E.check_replies_fit(L - 2, tiny_enc, [prompt], 1, "test.jsonl", model="ref.pt")  # a prompt past it
    E.check_replies_fit(L + 5, tiny_enc, [], 6, "test.jsonl")  # no prompts, nothing to sample
    ids = [M.render_prompt(tiny_enc, prompt)]
    replies, _ = M.generate(model, ids, 5, stop_token=-1, temperature=0.0)  # never stops early: uses all 5
    assert len(replies[0]) == 5
    with pytest.raises(P.ConfigError, match=rf"after a prompt of {L} tokens runs past the model's context"):
        M.generate(model, ids, 6, stop_token=-1, temperature=0.0)  # was an AssertionError deep in forward()


# ----------------------------------------------------------------------------------------------
# pass@k


def brute_force_pass_at_k(n, c, k):
    """The share of all k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_worked():
    assert E.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs hold the right one
    assert E.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert E.pass_at_k(5, 0, 3) == 0.0
    assert E.pass_at_k(3, 3, 1) == 1.0
    assert E.pass_at_k(8, 2, 4) == pytest.approx(1 - (6 * 5 * 4 * 3) / (8 * 7 * 6 * 5))
    assert E.pass_at_k(10, 3, 8) == 1.0  # 7 wrong ones cannot fill 8 draws


def test_pass_at_k_matches_enumeration_of_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert E.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


# ----------------------------------------------------------------------------------------------
# The judge's win rate, preference accuracy by kind and by style


def test_win_rate_by_decider_splits_the_judges_verdicts_by_what_decided_them():
    p = {"prompt": "Mia has 3 pens. She gets 2 more. How many pens?", "answer": 5}
    step_right = "Step by step:\nMia starts with 3 pens.\n3 + 2 = 5.\nThe answer is 5."
    step_right_long = "Step by step:\nMia starts with 3 pens.\nShe gets 2 more: 3 + 2 = 5.\nThe answer is 5."
    step_wrong = "Step by step:\nMia starts with 3 pens.\n3 + 2 = 6.\nThe answer is 6."
    comparisons = [  # (policy, reference), worked out by hand from the judge's rules
        ("The answer is 5.", step_wrong),           # correctness: right beats wrong, terse or not -> 1
        ("Ugh.\nThe answer is 5.", step_wrong),     # correctness, rude or not -> 1
        (step_wrong, "The answer is 5."),           # correctness -> 0
        (step_wrong, "Ugh.\nThe answer is 7."),     # style, both wrong: step beats rude -> 1
        ("The answer is 5.", step_right),           # style, both right: step beats terse -> 0
        (step_right_long, step_right),              # length, both step and right: the shorter wins -> 0
        (step_right, step_right),                   # length, identical: a tie -> 0.5
    ]
    win_rate, by = E.win_rate_by_decider([p] * 7, [a for a, _ in comparisons], [b for _, b in comparisons])
    assert by == {"correctness": {"comparisons": 3, "win_rate": pytest.approx(2 / 3)},
                  "style": {"comparisons": 2, "win_rate": 0.5}, "length": {"comparisons": 2, "win_rate": 0.25}}
    assert win_rate == pytest.approx((1 + 1 + 0 + 1 + 0 + 0 + 0.5) / 7)
    # rude and 'other' share the lowest rank, so between them length decides
    assert list(E.win_rate_by_decider([p], ["Ugh."], ["hello there, friend"])[1]) == ["length"]


def test_accuracy_by_pair_kind_splits_style_pairs_from_answer_pairs(tiny_enc):
    step = "Step by step:\nMia starts with 3 pens.\nThe answer is 3."
    pairs = [("q0", "The answer is 7.", "The answer is 7."),         # identical: dropped before scoring
             ("q1", step, "The answer is 3."),                       # same answer: style
             ("q2", "The answer is 3.", "The answer is 4."),         # right against wrong (answer 3)
             ("q3", "I like pens.", "The answer is 4."),             # no answer stated: left out
             ("q4", step, "Ugh.\nThe answer is 3."),                 # same answer: style
             ("q5", "The answer is 5.", "Ugh.\nThe answer is 6.")]   # both wrong (answer 3)
    answers = [7, 3, 3, 4, 3, 3]
    examples, counts = dpo.tokenize_pairs(tiny_enc, pairs, 96, 192)
    # examples no longer line up with pairs: the row index is what finds each example's text
    assert counts["dropped_identical"] == 1 and [ex["row"] for ex in examples] == [1, 2, 3, 4, 5]
    margins = t([0.5, -0.25, 3.0, -1.0, 2.0])  # right, wrong, (unscored), wrong, right
    got = E.accuracy_by_pair_kind(pairs, examples, margins, answers)
    assert got == {"style": (0.5, 2), "correct_vs_wrong": (0.0, 1), "both_wrong": (1.0, 1)}
    # without the answers, the two kinds of answer pairs are one
    assert E.accuracy_by_pair_kind(pairs, examples, margins) == {"style": (0.5, 2), "answer": (0.5, 2)}
    # a tie is no win, as in preference_accuracy
    assert E.accuracy_by_pair_kind(pairs, examples, t([0.0, 2.0, 1.0, 1.0, 0.0]), answers) == {
        "style": (0.5, 2), "correct_vs_wrong": (1.0, 1), "both_wrong": (0.0, 1)}


def test_correct_vs_wrong_pairs_split_by_the_right_replys_style(tiny_enc):
    step_right = "Step by step:\nMia starts with 3 pens.\nShe gets 1 more: 3 + 1 = 4.\nThe answer is 4."
    step_wrong = "Step by step:\nMia starts with 3 pens.\nShe gets 1 more: 3 + 1 = 5.\nThe answer is 5."
    pairs = [("q0", step_right, "The answer is 5."),        # right in step, wrong terse: better
             ("q1", "The answer is 4.", step_wrong),        # right terse, wrong in step: worse
             ("q2", "Ugh.\nThe answer is 4.", step_wrong),  # right rude, wrong in step: worse
             ("q3", "The answer is 4.", "The answer is 6."),  # both terse: same
             ("q4", step_right, "The answer is 4."),        # the same answer: a style pair, not counted
             ("q5", "The answer is 5.", "The answer is 6."),  # both wrong: not counted
             ("q6", "The answer is 5.", step_right)]        # a mislabelled row: right in step, rejected: better
    answers = [4] * 7
    examples, _ = dpo.tokenize_pairs(tiny_enc, pairs, 96, 192)
    margins = t([1.0, -2.0, 0.5, 0.0, 3.0, 3.0, -1.0])
    # worked by hand: accuracy is margin > 0 (the file's label first), as in accuracy_by_pair_kind
    assert E.correct_vs_wrong_by_style(pairs, examples, margins, answers) == {
        "better": (0.5, 2), "same": (0.0, 1), "worse": (0.5, 2)}
    # a reward that only sees style: it orders a pair as its styles rank, so every "better" pair and no
    # "worse" one (the labels here put the right reply first)
    pairs = pairs[:4]
    examples, _ = dpo.tokenize_pairs(tiny_enc, pairs, 96, 192)
    rank = lambda reply: world.STYLE_RANK[world.classify_style(reply)]  # noqa: E731
    style_margins = t([float(rank(c) - rank(r)) for _, c, r in pairs])
    assert E.correct_vs_wrong_by_style(pairs, examples, style_margins, answers) == {
        "better": (1.0, 1), "same": (0.0, 1), "worse": (0.0, 2)}


# ----------------------------------------------------------------------------------------------
# KL on samples, and sampling a policy against its reference


def test_kl_on_samples_scores_exactly_the_sampled_tokens(tiny_enc):
    # KL(pi || pi_ref) = E_{y ~ pi}[log pi(y) - log pi_ref(y)] over the tokens that were sampled:
    # a reply cut at the length cap has no <|end|> to score, and one that stopped has its own.
    # Brute force: one position at a time, float64, for two different models.
    policy, reference = tiny_gpt(tiny_enc.n_vocab, seed=1, std=0.3), tiny_gpt(tiny_enc.n_vocab, seed=2, std=0.3)
    prompts = ["Ben has 3 cards. He gets 2 more. How many cards?", "Ana has 7 pens.", "Why?", "Count: 1 2 3"]
    _, reply_ids = M.sample_replies(policy, tiny_enc, prompts, max_new_tokens=5, temperature=1.0, seed=4,
                                    return_ids=True)
    end = M.special(tiny_enc, "end")
    assert all(end not in r for r in reply_ids)  # cut at the cap (an untrained model rarely stops) ...
    reply_ids[1] = reply_ids[1][:2] + [end]  # ... and one that stopped, as generate returns it
    total = 0.0
    for prompt, reply in zip(prompts, reply_ids):
        p = M.render_prompt(tiny_enc, prompt)
        total += reply_logp(policy, p, reply) - reply_logp(reference, p, reply)
    got = E.kl_on_samples(policy, reference, tiny_enc, prompts, reply_ids, "cpu", batch_size=3)
    assert got == pytest.approx(total / len(prompts), rel=1e-4, abs=1e-5)


def test_greedy_accuracy_scores_the_temperature_0_replies(tiny_sft_ckpt, tiny_data_dir, tiny_enc, monkeypatch):
    # a stand-in sampler that answers right only when greedy (T=0): the greedy figures must be 1
    # and the sampled ones 0, for the reference and for the policy
    problems = [{"prompt": f"Ben has {n} cards. How many cards?", "answer": n} for n in (2, 5, 7)]
    calls = []

    def fake_sample(model, enc, prompts, max_new_tokens=96, temperature=1.0, seed=0, batch_size=128,
                    return_ids=False):
        calls.append(temperature)
        texts = [f"The answer is {p['answer'] + (temperature > 0)}." for p in problems]
        return (texts, [M.render_response(enc, x) for x in texts]) if return_ids else texts

    monkeypatch.setattr(M, "sample_replies", fake_sample)
    model, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", tiny_path(tiny_data_dir, "tokenizer.json"))
    config = dpo.DPOConfig(eval_temperature=1.0, max_new_tokens=16)
    metrics, _, _ = E.compare_by_sampling(model, model, tiny_enc, problems, config, "cpu")
    assert sorted(calls) == [0.0, 0.0, 1.0, 1.0]
    assert metrics["greedy_accuracy_policy"] == metrics["greedy_accuracy_ref"] == 1.0
    assert metrics["accuracy_policy"] == metrics["accuracy_ref"] == 0.0


def test_win_rate_and_kl_when_policy_equals_reference(tiny_sft_ckpt, tiny_data_dir, tiny_enc):
    tok = tiny_path(tiny_data_dir, "tokenizer.json")
    policy, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", tok)
    reference, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", tok)  # equal weights, separate tensors
    policy.eval()
    reference.requires_grad_(False).eval()
    with open(tiny_path(tiny_data_dir, "test.jsonl")) as f:
        problems = [json.loads(line) for line in f][:6]
    config = dpo.DPOConfig(max_new_tokens=16, eval_temperature=1.0, seed=3)
    metrics, ref_replies, pol_replies = E.compare_by_sampling(policy, reference, tiny_enc, problems,
                                                                config, "cpu")[:3]
    # same weights, same seed: the same sampled replies, so every judged comparison is a tie
    assert pol_replies == ref_replies
    assert metrics["win_rate"] == 0.5
    # identical replies: same correctness, same style, same length, so each verdict is a tie on length
    assert metrics["win_rate_by_decider"] == {"length": {"comparisons": 6, "win_rate": 0.5}}
    assert abs(metrics["kl"]) < 1e-6
    for key in ("accuracy", "greedy_accuracy", "judge_score", "style_shares", "length"):
        assert metrics[f"{key}_policy"] == metrics[f"{key}_ref"], key


def test_kept_replies_are_read_back_only_for_the_same_weights_prompts_and_settings(tmp_path):
    model, other = helpers.tiny_gpt(40, seed=1), helpers.tiny_gpt(40, seed=2)
    path = str(tmp_path / "replies.json")
    E.save_replies(path, model, ["a", "b"], 16, 7, {1.0: ["x", "y"], 0.0: ["u", "v"]})
    assert E.known_replies(path, model, ["a", "b"], 16, 7) == {1.0: ["x", "y"], 0.0: ["u", "v"]}
    for args in ((other, ["a", "b"], 16, 7), (model, ["a", "c"], 16, 7), (model, ["a", "b"], 8, 7),
                 (model, ["a", "b"], 16, 8), (None, ["a", "b"], 16, 7)):
        assert E.known_replies(path, *args) == {}
    assert E.known_replies(str(tmp_path / "none.json"), model, ["a", "b"], 16, 7) == {}


def test_count_work_counts_each_pass_at_its_own_length_and_the_loss_needs_each_prompt_once(tiny_enc,
                                                                                         tiny_examples):
    examples, _ = tiny_examples
    batch = sorted(examples[:40], key=lambda ex: len(ex["prompt"]) + len(ex["chosen"]) + len(ex["rejected"]))
    batch = batch[:6] + batch[-2:]  # short pairs that pack, and the longest: two passes
    model = tiny_gpt(tiny_enc.n_vocab, n_layer=2)
    L, C, V, N = 2, 32, tiny_enc.n_vocab, model.num_params()
    body, head = 6 * (N - V * C), 6 * V * C  # per position, by hand: 6 FLOPs per weight, the head apart
    for shared in (True, False):
        logps, lengths, rows = dpo.batch_logprobs(model, batch, 0, "cpu", shared=shared)
        assert len(rows) == (2 if shared else 1)
        work = dict(pairs=0, tokens=0, scored=0, done=0.0, needed=0.0)
        E.count_work(work, model, batch, rows, lengths, 3)
        scored = sum(len(ex["chosen"]) + len(ex["rejected"]) for ex in batch)
        positions = [(len(ids), ids.shape[1]) for ids in rows]  # (rows, length) of each pass
        if not shared:  # a row per reply: every token but the row's last goes through the model
            longest = max(len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"])) for ex in batch)
            assert positions == [(2 * len(batch), longest - 1)]
        real = sum(len(ex["prompt"]) + len(ex["chosen"]) + len(ex["rejected"]) - 1 for ex in batch)
        context = max(len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"])) for ex in batch)
        assert work["pairs"] == len(batch) and work["scored"] == scored == int(lengths.sum())
        assert work["tokens"] == sum(r * t for r, t in positions)
        assert work["done"] == pytest.approx(sum((body + 6 * L * t * C) * r * t for r, t in positions) + head * scored)
        assert work["needed"] == pytest.approx((body + 6 * L * context * C) * real + head * scored)
        assert work["needed"] < work["done"]
