"""rlvr.py: the sampler's log-probs against a teacher-forced recomputation, the GRPO loss against
its formulas written out by hand (ratio, clipping, k3 KL, aggregation, micro-batching, masking,
garbage at padded positions), group advantages, the verifier reward on adversarial replies, the
command line's checks on flags and files, and tiny end-to-end runs. Reading problem files is
test_formats.py's; pass@k is test_evaluation.py's.

Every model here is tiny (1-2 layers, width 32) and built from a fixed seed; the whole file runs
in seconds on a busy 2-core CPU.
"""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from helpers import pad_id, tiny_gpt
import model as M
import plumbing as P
from data import formats
from test_formats import PROBLEM as GOOD, write_problems_with_bad_line as write_with_bad_line
import rlvr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = ["Ben has 2 cards. How many cards?",  # three lengths: left padding in the sampler
           "Mia has 3 pens and Ben has 4 pens. Ava gives Mia 5 more pens. How many pens does Mia "
           "have now?",
           "Ava has 7 apples. She eats 1. How many apples?"]


def end_id(enc):
    return M.special(enc, "end")


def tokenizer_path(tiny_data_dir):
    return os.path.join(tiny_data_dir, "tokenizer.json")


def masked_rows(values, mask):
    """Per row, the values at mask == 1, as lists."""
    return [values[i][mask[i].bool()].tolist() for i in range(values.shape[0])]


# ----------------------------------------------------------------------------------------------
# The sampler's log-probs are the ones the loss recomputes


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_the_teacher_forced_ones(tiny_enc, temperature):
    model = tiny_gpt(tiny_enc.n_vocab, seed=11, n_layer=2, std=0.1).eval()
    problems = [{"prompt": p, "answer": 0} for p in PROMPTS]
    config = rlvr.RLVRConfig(max_new_tokens=12, temperature=temperature)
    ro = rlvr.rollout(model, tiny_enc, problems, 2, config, torch.Generator().manual_seed(0))
    assert len({len(p) for p in ro["prompt_ids"]}) == 3  # prompts of different lengths, one batch
    ids, mask = M.prompt_response_batch(ro["prompt_ids"], ro["reply_ids"], pad_id(tiny_enc), "cpu")
    with torch.no_grad():
        logps, m = M.shifted_logprobs(model, ids, mask, temperature)
    forced = masked_rows(logps, m)
    flat = []
    for sampled, recomputed in zip(ro["sample_logps"], forced):
        assert len(sampled) == len(recomputed) > 0
        # the cached, left-padded sampler and the right-padded forward pass round differently
        # (~1e-6 here); a wrong position or temperature is off by far more than 1e-4
        assert max(abs(a - b) for a, b in zip(sampled, recomputed)) < 1e-4
        flat += sampled
    # the widened init makes the distribution far from uniform: the test could tell them apart
    assert max(flat) - min(flat) > 1.0
    assert all(abs(x + math.log(tiny_enc.n_vocab)) > 1e-3 for x in flat[:5])
    # ... and a recomputation at the wrong temperature would be caught
    with torch.no_grad():
        other, _ = M.shifted_logprobs(model, ids, mask, 1.0 if temperature != 1.0 else 0.5)
    wrong = masked_rows(other, m)
    assert max(abs(a - b) for s, w in zip(ro["sample_logps"], wrong) for a, b in zip(s, w)) > 1e-2


def test_sampler_logprobs_match_with_replies_of_different_lengths(tiny_enc):
    # rollout always stops at <|end|>, which a random model rarely samples; stopping at a token it
    # samples often gives replies of different lengths (right padding in model.prompt_response_batch)
    model = tiny_gpt(tiny_enc.n_vocab, seed=12, n_layer=2, std=0.1).eval()
    prompt_ids = [M.render_prompt(tiny_enc, p) for p in PROMPTS for _ in range(3)]
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt_ids[0]]))[0, -1], -1)
    stop = int(first.argmax())
    replies, sampled = M.generate(model, prompt_ids, 10, stop, 0.8, generator=torch.Generator().manual_seed(1))
    assert len({len(r) for r in replies}) > 1 and any(r[-1] == stop for r in replies)
    ids, mask = M.prompt_response_batch(prompt_ids, replies, pad_id(tiny_enc), "cpu")
    with torch.no_grad():
        logps, m = M.shifted_logprobs(model, ids, mask, 0.8)
    for s, f in zip(sampled, masked_rows(logps, m)):
        assert len(s) == len(f)
        assert max(abs(a - b) for a, b in zip(s, f)) < 1e-4  # two routes round differently, as above


def test_first_sampled_token_differs_between_the_copies_of_a_prompt(tiny_enc):
    model = tiny_gpt(tiny_enc.n_vocab, seed=13, n_layer=2, std=0.1).eval()
    prompt = M.render_prompt(tiny_enc, PROMPTS[0])
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([prompt]))[0, -1].double(), -1)  # (V,)
    G = 16
    # the chance that G independent draws all agree: small enough that agreement means a bug
    assert float((p ** G).sum()) < 1e-6
    config = rlvr.RLVRConfig(max_new_tokens=1, temperature=1.0)
    ro = rlvr.rollout(model, tiny_enc, [{"prompt": PROMPTS[0], "answer": 2}], G, config,
                      torch.Generator().manual_seed(0))
    firsts = [r[0] for r in ro["reply_ids"]]
    assert len(firsts) == G and len(set(firsts)) > 1
    # and the copies are draws from the model's distribution: the likeliest token's frequency over
    # many copies lies within 5 standard errors of its probability
    n = 512
    ro = rlvr.rollout(model, tiny_enc, [{"prompt": PROMPTS[0], "answer": 2}], n, config,
                      torch.Generator().manual_seed(1))
    top = int(p.argmax())
    freq = sum(r[0] == top for r in ro["reply_ids"]) / n
    q = float(p[top])
    assert abs(freq - q) < 5 * math.sqrt(q * (1 - q) / n) + 1e-9, (freq, q)


# ----------------------------------------------------------------------------------------------
# The scored region


def test_reply_mask_covers_the_reply_and_its_end_token_and_nothing_else(tiny_enc):
    enc = tiny_enc
    end = end_id(enc)
    prompts = [M.render_prompt(enc, PROMPTS[0]), M.render_prompt(enc, PROMPTS[1])]
    replies = [M.render_response(enc, "The answer is 2."),
               M.render_response(enc, "3 + 5 = 8.\nThe answer is 8.")]
    assert all(r[-1] == end and end not in r[:-1] for r in replies)
    ids, mask = M.prompt_response_batch(prompts, replies, pad_id(enc), "cpu")
    T = max(len(p) + len(r) for p, r in zip(prompts, replies))
    assert ids.shape == mask.shape == (2, T)
    for b, (p, r) in enumerate(zip(prompts, replies)):
        n = len(p) + len(r)
        assert ids[b, :n].tolist() == p + r
        assert ids[b, n:].tolist() == [pad_id(enc)] * (T - n)
        assert mask[b].tolist() == [0] * len(p) + [1] * len(r) + [0] * (T - n)

    model = tiny_gpt(enc.n_vocab, seed=14, std=0.1).eval()
    with torch.no_grad():
        logps, m = M.shifted_logprobs(model, ids, mask)
    assert logps.shape == m.shape == (2, T - 1)
    for b, (p, r) in enumerate(zip(prompts, replies)):
        scored = m[b].nonzero().flatten().tolist()
        # position t holds token t+1's log-prob: the first scored position predicts the reply's
        # first token, the last one predicts <|end|>; prompt and padding positions are 0
        assert scored == list(range(len(p) - 1, len(p) + len(r) - 1))
        assert int(ids[b, scored[-1] + 1]) == end
        # brute force: each prefix alone, unpadded, in float64
        for t in scored:
            with torch.no_grad():
                last = model(ids[b: b + 1, : t + 1])[0, -1].double()
            expect = float(torch.log_softmax(last, -1)[ids[b, t + 1]])
            # a padded batch against each prefix alone: another route, rounding differently
            assert float(logps[b, t]) == pytest.approx(expect, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# The verifier reward, against adversarial replies

PROBLEM = {"prompt": "Ben has 1 card. He gets 2 more. How many cards?", "answer": 3}
CORRECT = "Ben starts with 1 card.\n1 + 2 = 3.\nThe answer is 3."
WELL_FORMED_WRONG = [
    "The answer is 4.",
    "1 + 2 = 3, so Ben has 3 cards.\nThe answer is 4.",  # the right number in the middle
]
MALFORMED = [  # score 0 whatever their numbers, and earn no format credit
    "The answer is 3. The answer is 4.",  # several answers
    "The answer is 4.\nThe answer is 3.",  # the final line repeated with another number
    "The answer is 3.\nThe answer is 3.",  # ... or the same one: stated more than once
    "The answer is 3 or 4.",  # hedged
    "I think the answer is 3.\nThe answer is 4.",  # right answer stated mid-reply, wrong final line
    "The answer is 3.\nThanks for asking!",  # the answer is not the final line
    "",
    "   \n",
    None,
]


def test_reward_of_a_correct_well_formed_reply_is_one():
    assert rlvr.reward(PROBLEM, CORRECT, finished=True) == 1.0
    assert rlvr.reward(PROBLEM, "The answer is 3.", finished=True) == 1.0
    assert rlvr.reward({"prompt": "x", "answer": -2}, "The answer is -2.", finished=True) == 1.0


@pytest.mark.parametrize("reply", WELL_FORMED_WRONG + MALFORMED)
def test_reward_of_a_wrong_or_malformed_reply_is_zero(reply):
    assert rlvr.reward(PROBLEM, reply, finished=True) == 0.0


def test_reward_of_a_reply_cut_off_before_its_end_is_zero_even_when_correct():
    assert rlvr.reward(PROBLEM, CORRECT, finished=False) == 0.0
    assert rlvr.reward(PROBLEM, CORRECT, finished=False, format_weight=0.2) == 0.0


@pytest.mark.parametrize("w", [0.1, 0.25])
def test_format_weight_adds_exactly_that_for_a_well_formed_final_line(w):
    assert rlvr.reward(PROBLEM, CORRECT, True, format_weight=w) == 1.0 + w
    for reply in WELL_FORMED_WRONG:
        assert rlvr.reward(PROBLEM, reply, True, format_weight=w) == w, reply
    for reply in MALFORMED:
        assert rlvr.reward(PROBLEM, reply, True, format_weight=w) == 0.0, reply


# ----------------------------------------------------------------------------------------------
# Group advantages


def hand_advantages(group, scale, floor):
    mean = sum(group) / len(group)
    std = statistics.stdev(group)  # unbiased (n - 1), as torch.std
    if len(set(group)) == 1:
        return [0.0] * len(group)
    return [(r - mean) / max(std, floor) if scale else r - mean for r in group]


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_the_formula_by_hand(scale):
    groups = [[1.0, 0.0, 0.0, 1.0],
              [0.0, 0.0, 0.0, 0.0],  # all wrong: no spread
              [1.0, 1.0, 1.0, 1.0],  # all right: no spread
              [1.0, 0.0, 0.0, 0.0],
              [1.1, 0.1, 0.0, 0.1],  # with format terms
              [1.0, 1.001, 1.0, 1.0]]  # near-constant: std 0.0005, floored at 0.1
    rewards = torch.tensor(groups, dtype=torch.float64)
    adv, spread = rlvr.group_advantages(rewards, scale=scale, std_floor=0.1)
    assert spread.tolist() == [True, False, False, True, True, True]
    for g, row in zip(groups, adv.tolist()):
        assert row == pytest.approx(hand_advantages(g, scale, 0.1), abs=1e-9)
        assert sum(row) == pytest.approx(0.0, abs=1e-9)
    assert adv[1].tolist() == [0.0] * 4 and adv[2].tolist() == [0.0] * 4  # exactly
    # the floor: the near-constant group's advantages are (r - mean) / 0.1, not / 0.0005
    if scale:
        assert adv[5].abs().max().item() == pytest.approx(0.00075 / 0.1, rel=1e-6)
        assert adv[0].tolist() == pytest.approx([0.5 / math.sqrt(1 / 3)] * 1 + [-0.5 / math.sqrt(1 / 3)] * 2
                                                + [0.5 / math.sqrt(1 / 3)], abs=1e-9)
    else:
        assert adv[3].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25], abs=1e-12)


def test_group_advantages_with_one_reply_per_prompt_are_zero():
    adv, spread = rlvr.group_advantages(torch.tensor([[1.0], [0.0]]))
    assert adv.tolist() == [[0.0], [0.0]] and spread.tolist() == [False, False]


# ----------------------------------------------------------------------------------------------
# pass@k


# ----------------------------------------------------------------------------------------------
# The loss: ratio, clipping, KL, aggregation, masking


def test_ratio_is_exactly_one_and_kl_exactly_zero_when_policy_is_old_and_reference():
    g = torch.Generator().manual_seed(0)
    logps = (-5 * torch.rand(4, 7, generator=g)).requires_grad_()
    mask = (torch.rand(4, 7, generator=g) > 0.3).float()
    adv = torch.tensor([1.0, -0.5, 0.25, -2.0])
    for aggregation in ("token", "sequence"):
        loss, stats = rlvr.grpo_loss(logps, logps.detach(), logps.detach().clone(), adv, mask,
                                     kl_coef=0.1, aggregation=aggregation)
        assert stats["ratio"] == stats["tokens"] == mask.sum().item()
        assert stats["kl"] == 0.0 and stats["clipped"] == 0
        # and only the ratio's gradient acts: the plain policy gradient -A * grad log pi / normaliser
        (grad,) = torch.autograd.grad(loss, logps)
        if aggregation == "token":
            expect = -adv[:, None] * mask / mask.sum()
        else:
            expect = -adv[:, None] * mask / mask.sum(-1, keepdim=True).clamp(min=1) / (mask.sum(-1) > 0).sum()
        assert torch.allclose(grad, expect, atol=1e-7)


def test_clipping_stops_the_gradient_only_in_the_direction_the_advantage_pushes():
    # one token per reply; pi_old = 1 (log 0), so the ratio is exp(logp)
    cases = [  # (advantage, ratio, clipped with eps 0.2)
        (1.0, 1.5, True),  # A > 0 and ratio > 1 + eps: no gain from pushing further
        (-1.0, 0.5, True),  # A < 0 and ratio < 1 - eps
        (2.5, 0.5, False),  # A > 0 and ratio < 1 - eps: the unclipped branch is the minimum
        (-2.5, 1.5, False),  # A < 0 and ratio > 1 + eps
        (1.0, 1.1, False),  # inside the clip range
        (-1.0, 0.9, False),
        (1.0, 1.25, True),
        (-1.0, 0.75, True),
    ]
    adv = torch.tensor([a for a, _, _ in cases])
    ratios = [r for _, r, _ in cases]
    logps = torch.tensor([[math.log(r)] for r in ratios], requires_grad=True)
    mask = torch.ones(len(cases), 1)
    loss, stats = rlvr.grpo_loss(logps, torch.zeros(len(cases), 1), torch.zeros(len(cases), 1), adv, mask,
                                 clip_eps=0.2)
    N = len(cases)
    clip = [min(max(r, 0.8), 1.2) for r in ratios]
    expect_loss = sum(-(c if clipped else r) * a for (a, r, clipped), c in zip(cases, clip)) / N
    assert loss.item() == pytest.approx(expect_loss, abs=1e-6)
    loss.backward()
    for (a, r, clipped), g in zip(cases, logps.grad.flatten().tolist()):
        # d/dlogp of -A * exp(logp) / N = -A * ratio / N, unless clipped
        # relative: fp32's exp against Python's floats, at gradients up to ~0.5 (1 ulp = 3e-8)
        assert g == (0.0 if clipped else pytest.approx(-a * r / N, rel=1e-5, abs=1e-7)), (a, r, g)
    assert stats["clipped"] == sum(c for _, _, c in cases)


def test_clip_eps_high_moves_the_upper_bound_only():
    cases = [(1.0, 1.25), (1.0, 1.3), (-1.0, 0.75), (-1.0, 0.85), (-1.0, 1.3), (1.0, 0.7)]
    adv = torch.tensor([a for a, _ in cases])
    ratios = [r for _, r in cases]
    zeros = torch.zeros(len(cases), 1)
    mask = torch.ones(len(cases), 1)
    for high, lo_hi in ((None, (0.8, 1.2)), (0.28, (0.8, 1.28))):
        logps = torch.tensor([[math.log(r)] for r in ratios], requires_grad=True)
        loss, stats = rlvr.grpo_loss(logps, zeros, zeros, adv, mask, clip_eps=0.2, clip_eps_high=high)
        loss.backward()
        lo, hi = lo_hi
        for (a, r), g in zip(cases, logps.grad.flatten().tolist()):
            clipped = (a > 0 and r > hi) or (a < 0 and r < lo)
            assert g == (0.0 if clipped else pytest.approx(-a * r / len(cases), rel=1e-5, abs=1e-7)), \
                (high, a, r, g)
    # ratio 1.25 with A > 0: clipped at eps 0.2, free at eps_high 0.28; ratio 0.75 with A < 0:
    # clipped either way (the lower bound did not move)


def k3(ref, logp):
    return math.exp(ref - logp) - (ref - logp) - 1


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_k3_kl_matches_the_formula_by_hand(aggregation):
    g = torch.Generator().manual_seed(1)
    logps = (-4 * torch.rand(3, 5, generator=g)).requires_grad_()
    ref = -4 * torch.rand(3, 5, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.float32)
    beta = 0.3
    loss, stats = rlvr.grpo_loss(logps, logps.detach(), ref, torch.zeros(3), mask, kl_coef=beta,
                                 aggregation=aggregation)
    L, R, Mk = logps.tolist(), ref.tolist(), mask.tolist()
    per = [[k3(R[i][t], L[i][t]) for t in range(5) if Mk[i][t]] for i in range(3)]
    assert all(v > 0 for row in per for v in row)  # positive wherever policy and reference differ
    assert stats["kl"] == pytest.approx(sum(sum(row) for row in per), rel=1e-5)
    if aggregation == "token":
        expect = beta * sum(sum(row) for row in per) / sum(len(row) for row in per)
    else:
        expect = beta * sum(sum(row) / len(row) for row in per) / len(per)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    # the gradient: d/dlogp [e^(ref - logp) - (ref - logp) - 1] = 1 - e^(ref - logp)
    loss.backward()
    for i in range(3):
        n_i = sum(Mk[i])
        for t in range(5):
            if not Mk[i][t]:
                assert logps.grad[i, t].item() == 0.0
                continue
            d = beta * (1 - math.exp(R[i][t] - L[i][t]))
            d /= sum(sum(r) for r in Mk) if aggregation == "token" else n_i * 3
            assert logps.grad[i, t].item() == pytest.approx(d, rel=1e-4, abs=1e-7)
    # and zero when the policy is the reference
    _, same = rlvr.grpo_loss(logps, logps.detach(), logps.detach(), torch.zeros(3), mask, kl_coef=beta)
    assert same["kl"] == 0.0


def test_extreme_log_ratios_and_garbage_at_padded_positions_stay_finite():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    logps = torch.tensor([[-1.0, 0.0, -100.0, float("inf"), float("-inf"), float("nan")],
                          [float("nan"), -2.0, 0.0, -100.0, -3.0, float("inf")],
                          [-1.0, -2.0, 0.0, 0.0, -3.0, -0.5]])
    old = torch.tensor([[-1.5, -100.0, 0.0, float("nan"), float("inf"), 1.0],  # log-ratios +100, -100
                        [float("-inf"), -2.0, -100.0, 0.0, -3.5, float("nan")],
                        [-1.2, -2.0, 0.0, -100.0, 0.0, -0.5]])
    ref = torch.tensor([[-100.0, 0.0, 0.0, float("-inf"), float("nan"), float("inf")],
                        [float("inf"), 100.0, -100.0, 0.0, -3.0, float("-inf")],
                        [-1.0, -100.0, 0.0, 0.0, -3.0, -0.5]])
    for aggregation in ("token", "sequence"):
        for kl_coef in (0.0, 0.1):
            for adv in (torch.tensor([1.0, -1.0, 0.5]), torch.tensor([-1.0, 1.0, -0.5])):
                x = logps.clone().requires_grad_()
                loss, stats = rlvr.grpo_loss(x, old, ref, adv, mask, kl_coef=kl_coef, aggregation=aggregation)
                assert math.isfinite(loss.item()), (aggregation, kl_coef, adv)
                assert all(math.isfinite(v) for v in stats.values())
                loss.backward()
                assert torch.isfinite(x.grad).all(), (aggregation, kl_coef, adv, x.grad)
                assert torch.equal(x.grad[mask == 0], torch.zeros(int((mask == 0).sum())))


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_prompt_and_padding_positions_carry_no_loss(aggregation):
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(5, 9, generator=g) > 0.4).float()
    mask[0] = 0  # one reply with nothing scored
    logps, old, ref = (-3 * torch.rand(5, 9, generator=g) for _ in range(3))
    adv = torch.randn(5, generator=g)
    outside = mask == 0

    def run(lp, o, r):
        x = lp.clone().requires_grad_()
        loss, stats = rlvr.grpo_loss(x, o, r, adv, mask, clip_eps=0.1, kl_coef=0.2, aggregation=aggregation)
        loss.backward()
        return loss, x.grad, stats

    loss0, grad0, stats0 = run(logps, old, ref)
    assert loss0.item() != 0.0 and grad0.abs().sum() > 0
    changed = [t.clone() for t in (logps, old, ref)]
    for t in changed:
        t[outside] = 50 * torch.randn(int(outside.sum()), generator=g)
    loss1, grad1, stats1 = run(*changed)
    assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1) and stats0 == stats1
    assert torch.equal(grad0[outside], torch.zeros(int(outside.sum())))


def test_an_empty_mask_gives_zero_loss_not_nan():
    x = torch.zeros(2, 3, requires_grad=True)
    for aggregation in ("token", "sequence"):
        loss, _ = rlvr.grpo_loss(x, x.detach(), x.detach(), torch.ones(2), torch.zeros(2, 3),
                                 kl_coef=0.1, aggregation=aggregation)
        assert loss.item() == 0.0


def random_replies(enc, n, seed):
    """n (prompt ids, reply ids) of different lengths; every reply ends with <|end|>."""
    g = torch.Generator().manual_seed(seed)
    prompts, replies = [], []
    for i in range(n):
        prompts.append(M.render_prompt(enc, PROMPTS[i % 3]))
        k = int(torch.randint(1, 8, (1,), generator=g))
        replies.append(torch.randint(0, 200, (k,), generator=g).tolist() + [end_id(enc)])
    return prompts, replies


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batches_give_the_same_loss_and_gradient_as_one_batch(tiny_enc, aggregation):
    model = tiny_gpt(tiny_enc.n_vocab, seed=21, n_layer=2, std=0.05)
    prompts, replies = random_replies(tiny_enc, 7, seed=3)
    ids, mask = M.prompt_response_batch(prompts, replies, pad_id(tiny_enc), "cpu")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        logps0, m = M.shifted_logprobs(model, ids, mask, 0.8)
    old = logps0 + 0.3 * torch.randn(logps0.shape, generator=g)  # ratios off 1: some tokens clipped
    ref = logps0 + 0.5 * torch.randn(logps0.shape, generator=g)
    adv = torch.randn(7, generator=g)
    normaliser = m.sum() if aggregation == "token" else (m.sum(-1) > 0).sum()

    def run(mb, whole_normaliser=True):
        model.zero_grad(set_to_none=True)
        total, clipped = 0.0, 0
        for i in range(0, 7, mb):
            c = slice(i, i + mb)
            lp, mc = M.shifted_logprobs(model, ids[c], mask[c], 0.8)
            loss, stats = rlvr.grpo_loss(lp, old[c], ref[c], adv[c], mc, 0.2, None, 0.1, aggregation,
                                         normaliser if whole_normaliser else None)
            loss.backward()
            total += loss.item()
            clipped += stats["clipped"]
        return total, [p.grad.clone() for p in model.parameters()], clipped

    loss1, grads1, clipped = run(7)
    assert clipped > 0 and loss1 != 0.0
    for mb in (1, 2, 3):
        loss_mb, grads_mb, _ = run(mb)
        assert loss_mb == pytest.approx(loss1, abs=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads1, grads_mb))
    # each chunk's own normaliser would weigh the chunks differently: the check can fail
    loss_own, _, _ = run(3, whole_normaliser=False)
    assert abs(loss_own - loss1) > 1e-4


def test_one_update_raises_the_rewarded_reply_over_the_unrewarded_one(tiny_enc):
    enc = tiny_enc
    model = tiny_gpt(enc.n_vocab, seed=31, n_layer=2, std=0.05)
    prompt = M.render_prompt(enc, PROBLEM["prompt"])
    replies = [M.render_response(enc, "1 + 2 = 3.\nThe answer is 3."),
               M.render_response(enc, "The answer is 4.")]
    rewards = torch.tensor([[rlvr.reward(PROBLEM, "1 + 2 = 3.\nThe answer is 3.", True),
                             rlvr.reward(PROBLEM, "The answer is 4.", True)]])
    assert rewards.tolist() == [[1.0, 0.0]]
    ids, mask = M.prompt_response_batch([prompt, prompt], replies, pad_id(enc), "cpu")

    def reply_logps():
        with torch.no_grad():
            lp, m = M.shifted_logprobs(model, ids, mask)
        return (lp * m).sum(-1)  # (2,)

    before = reply_logps()
    adv, spread = rlvr.group_advantages(rewards)
    assert spread.tolist() == [True] and adv[0, 0] > 0 > adv[0, 1]
    logps, m = M.shifted_logprobs(model, ids, mask)
    loss, _ = rlvr.grpo_loss(logps, logps.detach(), logps.detach(), adv.flatten(), m)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = reply_logps()
    up = (after - before).tolist()
    assert up[0] > up[1] + 1e-4, up
    assert up[0] > 0, up


# ----------------------------------------------------------------------------------------------
# Problem files


@pytest.mark.parametrize("flags,message", [
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--clip-eps-high", "0.1"], "--clip-eps-high 0.1 is below --clip-eps 0.2"),
    (["--aggregation", "mean"], "--aggregation 'mean' is unknown"),
    (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
    (["--kl-coef", "-0.1"], "--kl-coef must be >= 0, got -0.1"),
    (["--eval-samples", "0"], "--eval-samples must be > 0, got 0"),
    (["--grad-clip", "0"], "--grad-clip must be > 0, got 0.0"),
    (["--clip-eps", "1.5"], "--clip-eps must be below 1"),
    # flags that would change nothing
    (["--no-scale-rewards", "--std-floor", "0.2"], "--std-floor does nothing with --no-scale-rewards"),
    (["--eval-problems", "0", "--eval-reference", "ref.pt"], "--eval-reference does nothing with --eval-problems 0"),
    (["--eval-problems", "0", "--eval-problems-file", "test.jsonl"], "--eval-problems-file does nothing with "
                                                                      "--eval-problems 0"),
])
def test_main_reports_bad_flags_in_one_line_before_building_anything(tmp_path, flags, message):
    out = tmp_path / "out"  # holds no checkpoint: a run that got past the checks would build one
    with pytest.raises(SystemExit) as e:
        rlvr.main([*flags, "--out", str(out), "--device", "cpu"])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith(f"error: {message}") and "\n" not in msg
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing", "not_json", "bad_answer", "missing_prompt", "empty_file"])
def test_main_reports_bad_data_in_one_line_before_building_anything(tmp_path, case):
    path = tmp_path / "rl.jsonl"
    line = 3
    if case == "missing":
        line = None
    elif case == "not_json":
        write_with_bad_line(path, '{"prompt": oops}')
    elif case == "bad_answer":
        write_with_bad_line(path, '{"prompt": "Ben?", "answer": "abc"}')
    elif case == "missing_prompt":
        write_with_bad_line(path, '{"answer": 3}')
    else:
        path.write_text("")
        line = None
    out = tmp_path / "out"  # holds no checkpoint: a run that got past validation would build one
    with pytest.raises(SystemExit) as e:
        rlvr.main(["--data", str(path), "--out", str(out), "--device", "cpu"])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ")
    assert "\n" not in msg and "Traceback" not in msg and str(path) in msg
    if line is not None:
        assert f"{path}:{line}:" in msg
    assert not out.exists()


def test_cli_reports_bad_data_in_one_line_before_building_anything(tmp_path):
    bad = tmp_path / "rl.jsonl"
    write_with_bad_line(bad, '{"prompt": "Ben?", "answer": 3.5}')
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "rlvr.py", "--data", str(bad), "--out", str(out), "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    err = result.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {bad}:3: 'answer' must be an integer"), err
    assert not out.exists()  # no DPO/SFT checkpoint was built, nothing written


def test_a_bad_eval_file_is_reported_before_building_anything(tmp_path):
    good = tmp_path / "rl.jsonl"
    good.write_text(json.dumps(GOOD) + "\n")
    bad = tmp_path / "test.jsonl"
    write_with_bad_line(bad, '{"prompt": "Ben?"}')
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        rlvr.main(["--data", str(good), "--eval-problems-file", str(bad), "--out", str(out), "--device", "cpu"])
    assert e.value.code == f"error: {bad}:3: missing field 'answer'"
    assert not out.exists()


def test_missing_init_checkpoint_is_a_data_error_naming_it(tiny_data_dir, tmp_path):
    missing = str(tmp_path / "no" / "model.pt")
    with pytest.raises(P.DataError) as e:
        rlvr.train(rlvr.RLVRConfig(init=missing, data_dir=tiny_data_dir, out=str(tmp_path / "out"), device="cpu"))
    assert missing in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_help():
    result = subprocess.run([sys.executable, "rlvr.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--group-size", "--kl-coef", "--clip-eps", "--clip-eps-high", "--inner-steps",
                 "--scale-rewards", "--no-scale-rewards", "--micro-batch", "--init", "--data", "--out"):
        assert flag in result.stdout, flag


# ----------------------------------------------------------------------------------------------
# The training loop, on a tiny random checkpoint with a stand-in reward


@pytest.fixture(scope="module")
def tiny_init_ckpt(tiny_data_dir, tiny_enc, tmp_path_factory):
    """A tiny random GPT saved as a checkpoint with the tiny tokenizer (no training: fast)."""
    path = str(tmp_path_factory.mktemp("rlvr_init") / "model.pt")
    M.save_checkpoint(path, tiny_gpt(tiny_enc.n_vocab, seed=41), tokenizer_path(tiny_data_dir), stage="test")
    return path


def stand_in_reward(problem, reply, finished, format_weight=0.0):
    # A random model's replies never end and never state an answer, so the verifier scores every
    # one 0: no group would have spread and no update would happen. This reward (the parity of the
    # reply's length) gives groups spread, so the update itself is exercised.
    return float(len(reply) % 2)


def spy_on_loss(monkeypatch):
    """Record (logps, old_logps, loss, stats) of every grpo_loss call train makes."""
    calls = []
    real = rlvr.grpo_loss

    def spy(logps, old_logps, *args, **kwargs):
        loss, stats = real(logps, old_logps, *args, **kwargs)
        calls.append((logps.detach().clone(), old_logps.clone(), loss.item(), stats))
        return loss, stats

    monkeypatch.setattr(rlvr, "grpo_loss", spy)
    return calls


def tiny_rl_config(tiny_data_dir, init, out, **overrides):
    kw = dict(init=init, data_dir=tiny_data_dir, steps=2, prompts_per_step=4, group_size=4,
              max_new_tokens=8, eval_problems=0, out=out, device="cpu", log_every=1, lr=1e-3,
              warmup_steps=1, kl_coef=0.05)
    return rlvr.RLVRConfig(**{**kw, **overrides})


def read_log(out):
    with open(os.path.join(out, "rlvr", "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_first_inner_step_has_ratio_one_and_kl_zero(tiny_data_dir, tiny_init_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(rlvr, "reward", stand_in_reward)
    calls = spy_on_loss(monkeypatch)
    out = str(tmp_path / "a")
    rlvr.train(tiny_rl_config(tiny_data_dir, tiny_init_ckpt, out, steps=2))
    log = read_log(out)
    assert [r["step"] for r in log] == [0, 1]
    assert log[0]["zero_spread_groups"] < 1 and log[0]["grad_norm"] > 0  # step 0 did update
    assert log[0]["kl"] == 0.0 and log[0]["ratio"] == 1.0 and log[0]["clip_fraction"] == 0.0
    loss0, stats0 = calls[0][2], calls[0][3]
    assert stats0["tokens"] > 0 and stats0["ratio"] == stats0["tokens"] and stats0["kl"] == 0.0
    assert math.isfinite(loss0)
    # after an update the policy has moved from the reference: the logged KL is a real measurement
    assert log[1]["zero_spread_groups"] < 1 and log[1]["kl"] > 0

    # with two inner steps, pi_old stays the policy that sampled: the second step's old log-probs
    # are the first step's, while its own log-probs have moved (ratio no longer exactly 1)
    calls.clear()
    out = str(tmp_path / "b")
    rlvr.train(tiny_rl_config(tiny_data_dir, tiny_init_ckpt, out, steps=1, inner_steps=2))
    assert len(calls) == 2
    (lp0, old0, _, s0), (lp1, old1, _, s1) = calls
    assert torch.equal(old0, lp0) and torch.equal(old1, lp0)
    assert s0["ratio"] == s0["tokens"] and s0["kl"] == 0.0
    assert not torch.equal(lp1, lp0) and s1["ratio"] != s1["tokens"] and s1["kl"] > 0
    # the log reports the KL of the rollouts as sampled (the first inner step's: 0), and the ratio of
    # the last inner step, which shows how far the policy has moved from the one that sampled
    (rec,) = read_log(out)
    assert rec["kl"] == 0.0
    assert rec["ratio"] == pytest.approx(s1["ratio"] / s1["tokens"]) and rec["ratio"] != 1.0


def test_logged_accuracy_is_the_verifiers_and_mfu_and_the_step0_check_are_reported(
        tiny_data_dir, tiny_init_ckpt, tmp_path, monkeypatch, capsys):
    # a reward of 1 does not make a reply right (--format-reward 1 pays a well-formed wrong one 1):
    # the logged accuracy counts the verifier's verdicts, here none
    monkeypatch.setattr(rlvr, "reward", stand_in_reward)
    monkeypatch.setattr(rlvr.world, "verify", lambda problem, reply: False)
    out = str(tmp_path)
    metrics = rlvr.train(tiny_rl_config(tiny_data_dir, tiny_init_ckpt, out, steps=2))
    log = read_log(out)
    assert all(r["reward"] > 0 and r["accuracy"] == 0.0 for r in log)
    # the training MFU, as sft.py and dpo.py report it: 6 x params x tokens/s (plus attention)
    # against the probe's peak, so below 1 and above 0 on any device
    assert all(0 < r["mfu"] < 1 for r in log) and 0 < metrics["mfu"] < 1
    captured = capsys.readouterr()
    # the invariant before the first update: the policy is the sampler and the reference
    assert "rlvr: step-0 check: ratio 1.0000 (1 on-policy), KL 0.0000 (0 at the start)" in captured.err + captured.out
    assert "MFU" in [line for line in captured.out.splitlines() if line.startswith("rlvr: sampling")][-1]


def test_logged_ratio_is_the_last_inner_steps_over_every_micro_batch(tiny_data_dir, tiny_init_ckpt, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(rlvr, "reward", stand_in_reward)
    calls = spy_on_loss(monkeypatch)
    out = str(tmp_path)
    rlvr.train(tiny_rl_config(tiny_data_dir, tiny_init_ckpt, out, steps=1, inner_steps=3, micro_batch=2))
    assert len(calls) % 3 == 0 and len(calls) >= 6  # the same micro-batches at each of 3 inner steps
    last = [s for _, _, _, s in calls[2 * len(calls) // 3:]]
    first = [s for _, _, _, s in calls[: len(calls) // 3]]
    (rec,) = read_log(out)
    assert rec["ratio"] == pytest.approx(sum(s["ratio"] for s in last) / sum(s["tokens"] for s in last))
    assert sum(s["ratio"] for s in first) == sum(s["tokens"] for s in first)  # inner step 0: exactly 1
    assert rec["ratio"] != 1.0


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batch_training_matches_one_batch(tiny_data_dir, tiny_init_ckpt, tmp_path, monkeypatch,
                                                aggregation):
    monkeypatch.setattr(rlvr, "reward", stand_in_reward)
    calls = spy_on_loss(monkeypatch)
    runs = []
    for mb in (0, 3):
        calls.clear()
        out = str(tmp_path / f"mb{mb}")
        rlvr.train(tiny_rl_config(tiny_data_dir, tiny_init_ckpt, out, micro_batch=mb, aggregation=aggregation))
        model, _ = M.load_checkpoint(os.path.join(out, "rlvr", "model.pt"), "cpu", tokenizer_path(tiny_data_dir))
        runs.append((read_log(out), sum(c[2] for c in calls), len(calls), model.state_dict()))
    (log0, loss0, n0, w0), (log3, loss3, n3, w3) = runs
    assert n3 > n0 == 2  # one call per step in one batch, several with micro-batches
    assert all(r["zero_spread_groups"] < 1 for r in log0)
    assert [r["reward"] for r in log0] == [r["reward"] for r in log3]  # the same rollouts
    assert [r["grad_norm"] for r in log3] == pytest.approx([r["grad_norm"] for r in log0], rel=1e-5)
    assert loss3 == pytest.approx(loss0, abs=1e-6)  # summed chunk losses = the one-batch loss
    init, _ = M.load_checkpoint(tiny_init_ckpt, "cpu", tokenizer_path(tiny_data_dir))
    assert not torch.equal(w0["wte.weight"], init.state_dict()["wte.weight"])  # the policy moved
    # AdamW divides each gradient by its own RMS, so a rounding-level difference in a tiny gradient
    # (micro-batches round differently) moves its weight by up to lr x its relative size: 1e-6 was
    # measured at lr 1e-3; a micro-batching bug moves weights by ~lr
    assert all(torch.allclose(w0[k], w3[k], atol=1e-5) for k in w0)


def test_zero_warmup_steps_trains(tiny_data_dir, tiny_init_ckpt, tmp_path, monkeypatch):
    # --warmup-steps 0 means no warmup, not a division by zero
    monkeypatch.setattr(rlvr, "reward", stand_in_reward)
    out = str(tmp_path)
    rlvr.train(tiny_rl_config(tiny_data_dir, tiny_init_ckpt, out, steps=1, warmup_steps=0))
    log = read_log(out)
    assert log[0]["grad_norm"] > 0 and log[0]["lr"] == pytest.approx(1e-3)


def test_warmup_then_a_constant_learning_rate(tiny_data_dir, tiny_init_ckpt, tmp_path, monkeypatch):
    # RL keeps its lr after the warmup (no decay): 2 warmup steps to 1e-3, then 1e-3 to the end
    monkeypatch.setattr(rlvr, "reward", stand_in_reward)
    out = str(tmp_path)
    rlvr.train(tiny_rl_config(tiny_data_dir, tiny_init_ckpt, out, steps=4, warmup_steps=2))
    assert [r["lr"] for r in read_log(out)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


# ----------------------------------------------------------------------------------------------
# End to end on a tiny SFT checkpoint


def test_tiny_end_to_end_run(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    out = str(tmp_path)
    metrics = rlvr.train(rlvr.RLVRConfig(init=tiny_sft_ckpt, data_dir=tiny_data_dir, steps=3,
                                         prompts_per_step=4, group_size=4, max_new_tokens=16,
                                         eval_problems=8, eval_samples=8, out=out, device="cpu"))
    with open(os.path.join(out, "rlvr", "metrics.json")) as f:
        saved = json.load(f)
    for key in ("accuracy_before", "accuracy_after", "judge_score_before", "judge_score_after", "kl",
                "sample_tokens_per_second", "wall_seconds"):
        assert key in saved and math.isfinite(saved[key]), key
    assert 0 <= saved["accuracy_before"] <= 1 and 0 <= saved["accuracy_after"] <= 1
    assert saved["sample_tokens_per_second"] > 0 and saved["kl"] >= 0
    assert set(saved["pass_at_k"]) == {"1", "4", "8"}
    for side in ("before", "after"):
        pk = [saved["pass_at_k"][k][side] for k in ("1", "4", "8")]
        assert all(0 <= v <= 1 for v in pk) and pk[0] <= pk[1] <= pk[2]  # pass@k grows with k
    log = read_log(out)
    assert [r["step"] for r in log] == [0, 1, 2]
    for rec in log:
        for key in ("reward", "zero_spread_groups", "kl", "clip_fraction", "reply_length", "capped",
                    "sample_tokens_per_second", "train_tokens_per_second"):
            assert key in rec and math.isfinite(rec[key]), key
        assert 0 <= rec["capped"] <= 1 and 1 <= rec["reply_length"] <= 16
    assert saved["reward_curve"] == [r["reward"] for r in log] == metrics["reward_curve"]
    tok = tokenizer_path(tiny_data_dir)
    model, ckpt = M.load_checkpoint(os.path.join(out, "rlvr", "model.pt"), "cpu", tok)
    start, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", tok)
    assert ckpt["stage"] == "rlvr" and ckpt["train_config"]["group_size"] == 4
    assert model.config == start.config


def test_a_problem_file_smaller_than_a_step_is_repeated(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    # one problem, three prompts per step: the pass over the file repeats (it used to pop an empty list)
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "Mia has 3 pens. She gets 2 more. How many pens does Mia have?",
                                "answer": 5}) + "\n")
    metrics = rlvr.train(tiny_rl_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path / "out"), data=str(path),
                                        prompts_per_step=3, steps=2))
    assert metrics["steps"] == 2 and metrics["samples"] == 2 * 3 * 4


def test_a_reply_budget_past_the_context_stops_before_any_rollout(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(P.ConfigError, match=r"^--max-new-tokens 1000 does not fit: the longest prompt in .*rl.jsonl"):
        rlvr.train(tiny_rl_config(tiny_data_dir, tiny_sft_ckpt, str(out), max_new_tokens=1000))
    assert not (out / "rlvr" / "model.pt").exists() and not (out / "rlvr" / "log.jsonl").exists()


def test_steps_without_an_update_log_the_scheduled_learning_rate(tiny_sft_ckpt, tiny_data_dir, tmp_path,
                                                                  monkeypatch):
    # every reply scores 0, so no group has any spread and no step updates; the log still reports the
    # schedule's lr for each step (it used to repeat the optimiser's initial lr) and a ratio of 1
    monkeypatch.setattr(rlvr, "reward", lambda *args: 0.0)
    out = str(tmp_path / "out")
    rlvr.train(tiny_rl_config(tiny_data_dir, tiny_sft_ckpt, out, steps=2, warmup_steps=4, lr=1e-3))
    log = read_log(out)
    assert [r["zero_spread_groups"] for r in log] == [1.0, 1.0]
    assert [r["lr"] for r in log] == pytest.approx([P.scheduled_lr("constant", s, 2, 1e-3, 4) for s in range(2)])
    assert [r["lr"] for r in log] == pytest.approx([2.5e-4, 5e-4])  # by hand: peak * (step + 1) / warmup
    assert [r["ratio"] for r in log] == [1.0, 1.0]


def test_an_eval_reference_too_short_for_the_replies_stops_before_any_rollout(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    # the evaluation's KL scores prompt and reply on --eval-reference too: a model with a shorter
    # context used to fail there with an assertion; RoPE has no position table, so the same
    # weights with a smaller block_size make such a model
    tok = tokenizer_path(tiny_data_dir)
    enc = M.load_tokenizer(tok)
    model, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", tok)
    prompts = [p["prompt"] for p in formats.read_problems(os.path.join(tiny_data_dir, "test.jsonl"))[:2]]
    longest = max(len(M.render_prompt(enc, p)) for p in prompts)
    model.config.block_size = longest + 4  # room for 4 new tokens, not 8
    short = str(tmp_path / "short.pt")
    M.save_checkpoint(short, model, tok)
    out = tmp_path / "out"
    with pytest.raises(P.ConfigError, match=rf"^--max-new-tokens 8 does not fit: .* of {short}'s {longest + 4} "
                                            r"context tokens, leaving 4$"):
        rlvr.train(tiny_rl_config(tiny_data_dir, tiny_sft_ckpt, str(out), eval_problems=2, eval_samples=2,
                                  eval_reference=short))
    assert not (out / "rlvr" / "log.jsonl").exists()
    # with room for the replies, the same run goes through
    rlvr.train(tiny_rl_config(tiny_data_dir, tiny_sft_ckpt, str(out), eval_problems=2, eval_samples=2,
                              eval_reference=short, max_new_tokens=4, steps=1))


def test_only_the_prompts_a_run_samples_after_are_checked(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    # a training problem too long for its replies stops a run that trains, but not an evaluation-only
    # one (--steps 0), which never samples after it
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "Mia has 3 pens. " * 40 + "How many pens does Mia have?", "answer": 3}) + "\n")
    config = dict(data=str(path), max_new_tokens=60, eval_problems=2, eval_samples=2)
    with pytest.raises(P.ConfigError, match=r"^--max-new-tokens 60 does not fit: the longest prompt in .*long.jsonl"):
        rlvr.train(tiny_rl_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path / "a"), steps=1, **config))
    metrics = rlvr.train(tiny_rl_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path / "b"), steps=0, **config))
    assert metrics["steps"] == 0


def test_the_summary_names_what_it_measured(tiny_sft_ckpt, tiny_data_dir, tmp_path, capsys):
    # pass@k only for the k the samples allow (no 'pass@8 nan' from 4 samples), the KL named after the
    # model it was measured against, and no kl in the progress bar when --kl-coef 0 measures none
    rlvr.train(tiny_rl_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path), steps=1, eval_problems=2,
                              eval_samples=4, eval_reference=tiny_sft_ckpt, kl_coef=0.0))
    captured = capsys.readouterr()
    (before,) = [line for line in captured.out.splitlines() if line.startswith("rlvr: before:")]
    assert "pass@1 " in before and "pass@4 " in before and "pass@8" not in before and "nan" not in before
    assert f"KL to {tiny_sft_ckpt} " in captured.out
    assert "kl=" not in captured.err  # tqdm writes its bar to stderr
