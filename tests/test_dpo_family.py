"""dpo_family.py (and dpo.dpo_loss's loss_type, which delegates to it): every paired variant against
its paper's / TRL's equation written out in plain float arithmetic, the variants' defining
properties (cDPO and rDPO reduce to DPO at eps 0, rDPO is unbiased under label noise, IPO's minimum
sits at the per-token margin 1/(2 beta), the length-normalised losses ignore length), SimPO, ORPO's
odds-ratio term at the edges of its domain, and KTO's reference point and groups.

Small fixed tensors only; the whole file runs in about a second.
"""

import ast
import math
import os

import pytest
import torch

import checks
import dpo
import dpo_family as fam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LN2 = math.log(2)


def t(values, dtype=torch.float64, **kw):
    return torch.tensor(values, dtype=dtype, **kw)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------------
# The paired losses, each against its equation in plain floats

A = [1.5, -2.0, 0.25, 3.0, -0.75]  # chosen log-ratios a = log pi(y_w)/pi_ref(y_w), summed
B = [-0.5, 1.0, 0.25, -4.0, 0.5]  # rejected log-ratios b
NW = [3, 5, 2, 8, 1]  # response lengths of y_w
NL = [4, 2, 2, 1, 6]  # ... and of y_l


def by_hand(name, a, b, beta, eps, nw, nl, delta):
    """One example's loss, straight from the paper's (or TRL's) equation."""
    z = a - b
    if name in ("sigmoid", "cdpo"):  # labels flipped with probability eps: expected log-loss
        return -(1 - eps) * math.log(sig(beta * z)) - eps * math.log(sig(-beta * z))
    if name == "robust":
        return ((1 - eps) * -math.log(sig(beta * z)) + eps * math.log(sig(-beta * z))) / (1 - 2 * eps)
    if name == "hinge":
        return max(0.0, 1 - beta * z)
    if name == "ipo":
        return (a / nw - b / nl - 1 / (2 * beta)) ** 2
    if name == "sigmoid_norm":
        return -math.log(sig(beta * (a / nw - b / nl)))
    if name == "exo_pair":  # KL(q || p), q = the model's 2-way softmax, p = the smoothed labels
        e = eps or 1e-3
        q, p = [sig(beta * z), sig(-beta * z)], [1 - e, e]
        return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
    if name == "nca_pair":
        return -math.log(sig(beta * a)) - 0.5 * math.log(sig(-beta * a)) - 0.5 * math.log(sig(-beta * b))
    if name == "bco_pair":
        return -math.log(sig(beta * a - delta)) - math.log(sig(delta - beta * b))
    if name == "sppo_hard":
        return (a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2
    if name == "apo_zero":
        return 1 - sig(beta * a) + sig(beta * b)
    if name == "apo_down":
        return sig(beta * a) + 1 - sig(beta * z)
    if name == "discopop":
        m = sig(beta * z / 0.05)
        return (1 - m) * -math.log(sig(beta * z)) + m * math.exp(-beta * z)
    raise AssertionError(name)


@pytest.mark.parametrize("name", fam.PAIRED_LOSS_TYPES)
@pytest.mark.parametrize("beta,eps", [(0.3, 0.0), (0.1, 0.2)])
def test_each_paired_loss_matches_its_equation(name, beta, eps):
    delta = 0.0  # bco_pair's default, as TRL computes it: no reward shift
    expect = [by_hand(name, a, b, beta, eps, nw, nl, delta) for a, b, nw, nl in zip(A, B, NW, NL)]
    got = fam.paired_losses(name, t(A), t(B), beta, eps, t(NW), t(NL))
    assert got.shape == (len(A),)
    assert got.tolist() == pytest.approx(expect, rel=1e-9, abs=1e-12)
    # through dpo.dpo_loss: the batch mean, from log-probs (policy - reference = the log-ratios)
    ref_c, ref_r = t([-20.0, -7.5, -3.0, -41.0, -12.0]), t([-9.0, -30.0, -5.5, -2.0, -16.0])
    loss, rc, rr = dpo.dpo_loss(ref_c + t(A), ref_r + t(B), ref_c, ref_r, beta=beta, loss_type=name,
                                label_smoothing=eps, chosen_lengths=t(NW), rejected_lengths=t(NL))
    assert loss.item() == pytest.approx(sum(expect) / len(expect), rel=1e-9)
    assert rc.tolist() == pytest.approx([beta * a for a in A])
    assert rr.tolist() == pytest.approx([beta * b for b in B])


def test_hand_worked_values():
    one = t([0.0])

    def loss(name, a, b, beta, **kw):
        return fam.paired_losses(name, t([a]), t([b]), beta, **kw).item()

    assert loss("sigmoid", 0.7, 0.7, 0.5) == pytest.approx(LN2)  # no margin: ln 2
    assert loss("hinge", 1.0, 0.0, 0.5) == pytest.approx(0.5)  # relu(1 - 0.5 * 1)
    assert loss("hinge", 3.0, 0.0, 0.5) == 0.0  # past the margin: no loss, no gradient
    # IPO: 6 nats over 3 tokens vs -2 over 2: per-token margin 2 - (-1) = 3; 1/(2 beta) = 2 -> (3 - 2)^2
    assert loss("ipo", 6.0, -2.0, 0.25, chosen_lengths=t([3]), rejected_lengths=t([2])) == pytest.approx(1.0)
    assert loss("sppo_hard", 2.0, -2.0, 0.25) == pytest.approx(0.0)  # a, b at their targets +-1/(2 beta)
    assert loss("apo_zero", 0.0, 0.0, 0.1) == pytest.approx(1.0)  # 1 - 1/2 + 1/2
    assert loss("apo_down", 0.0, 0.0, 0.1) == pytest.approx(1.0)  # 1/2 + 1 - 1/2
    assert loss("nca_pair", 0.0, 0.0, 0.1) == pytest.approx(2 * LN2)  # ln 2 + ln 2 / 2 + ln 2 / 2
    assert loss("exo_pair", 0.0, 0.0, 0.1) == pytest.approx(math.log(0.5) - 0.5 * math.log(0.999 * 0.001))
    assert loss("discopop", 0.0, 0.0, 0.1) == pytest.approx(0.5 * LN2 + 0.5)  # m = 1/2, exp(0) = 1
    assert fam.paired_losses("bco_pair", one, one, 0.1, delta=t(0.0)).item() == pytest.approx(2 * LN2)


def test_cdpo_and_robust_reduce_to_dpo_at_eps_0():
    g = torch.Generator().manual_seed(0)
    a, b = (5 * torch.randn(16, generator=g, dtype=torch.float64) for _ in range(2))
    plain = fam.paired_losses("sigmoid", a, b, 0.2)
    dpo_eq7 = -torch.nn.functional.logsigmoid(0.2 * (a - b))
    assert torch.allclose(plain, dpo_eq7, rtol=0, atol=1e-12)
    for name in ("cdpo", "robust"):
        assert torch.allclose(fam.paired_losses(name, a, b, 0.2, 0.0), plain, rtol=0, atol=1e-12)
    # with eps > 0, cdpo is TRL's smoothed sigmoid, and dpo_loss's sigmoid takes the same path
    cdpo = fam.paired_losses("cdpo", a, b, 0.2, 0.1)
    assert torch.equal(cdpo, fam.paired_losses("sigmoid", a, b, 0.2, 0.1))
    zero = torch.zeros(16, dtype=torch.float64)
    smoothed, _, _ = dpo.dpo_loss(a, b, zero, zero, beta=0.2, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(cdpo.mean().item(), rel=1e-12)
    assert smoothed.item() != pytest.approx(plain.mean().item(), rel=1e-3)


def test_robust_is_unbiased_under_label_noise():
    # rDPO's point: if each label is flipped with probability eps, the expected robust loss is
    # the clean DPO loss: (1 - eps) L_rob(z) + eps L_rob(-z) = -log sigmoid(beta z)
    z = t([-3.0, -0.5, 0.0, 1.0, 4.0])
    for eps in (0.05, 0.2, 0.4):
        noisy = (1 - eps) * fam.paired_losses("robust", z, 0 * z, 0.5, eps) \
            + eps * fam.paired_losses("robust", -z, 0 * z, 0.5, eps)
        assert noisy.tolist() == pytest.approx([-math.log(sig(0.5 * x)) for x in z.tolist()], rel=1e-9)
    with pytest.raises(ValueError, match="robust"):
        fam.paired_losses("robust", z, z, 0.5, 0.5)  # 1 - 2 eps = 0


def test_ipo_is_minimal_at_per_token_margin_one_over_two_beta():
    beta, nw, nl = 0.25, 4, 2  # target per-token margin 1/(2 beta) = 2
    margins = [x / 100 for x in range(0, 401)]  # per-token margins 0 .. 4
    losses = [fam.paired_losses("ipo", t([m * nw]), t([0.0]), beta, chosen_lengths=t([nw]),
                                rejected_lengths=t([nl])).item() for m in margins]
    assert margins[losses.index(min(losses))] == pytest.approx(2.0) and min(losses) == pytest.approx(0.0)
    a = t([2.0 * nw], requires_grad=True)  # exactly at the target: zero gradient
    loss = fam.paired_losses("ipo", a, t([0.0]), beta, chosen_lengths=t([nw]), rejected_lengths=t([nl]))
    loss.sum().backward()
    assert a.grad.item() == 0.0
    # unlike DPO, a margin past the target is pushed back
    assert losses[400] > losses[200] and losses[0] > losses[200]


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm"])
def test_length_normalised_losses_ignore_length(name):
    per_token_a, per_token_b = t([0.3, -0.2, 1.1]), t([-0.4, 0.1, 0.5])
    n = t([3, 7, 10])
    short = fam.paired_losses(name, n * per_token_a, n * per_token_b, 0.5, chosen_lengths=n,
                              rejected_lengths=n)
    long = fam.paired_losses(name, 2 * n * per_token_a, 2 * n * per_token_b, 0.5, chosen_lengths=2 * n,
                             rejected_lengths=2 * n)
    assert torch.allclose(short, long, rtol=1e-12, atol=0)
    # the summed-log-ratio DPO loss does not: doubling the length doubles the margin
    assert not torch.allclose(fam.paired_losses("sigmoid", n * per_token_a, n * per_token_b, 0.5),
                              fam.paired_losses("sigmoid", 2 * n * per_token_a, 2 * n * per_token_b, 0.5))
    # integer lengths (as a mask's sum gives them) work too
    ints = fam.paired_losses(name, n * per_token_a, n * per_token_b, 0.5, chosen_lengths=n.long(),
                             rejected_lengths=n.long())
    assert torch.allclose(ints, short)


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm"])
def test_length_normalised_losses_refuse_to_run_without_lengths(name):
    x = t([-1.0])
    with pytest.raises(ValueError, match=name):
        fam.paired_losses(name, x, x, 0.1)
    with pytest.raises(ValueError, match=name):
        dpo.dpo_loss(x, x, x, x, loss_type=name)


def test_unknown_name_lists_the_known_ones():
    x = t([-1.0])
    for call in (lambda: fam.paired_losses("dpo++", x, x, 0.1),
                 lambda: dpo.dpo_loss(x, x, x, x, loss_type="dpo++")):
        with pytest.raises(ValueError) as e:
            call()
        assert "dpo++" in str(e.value) and all(name in str(e.value) for name in fam.PAIRED_LOSS_TYPES)
    assert dpo.LOSS_TYPES == fam.PAIRED_LOSS_TYPES and dpo.LOSS_TYPES[0] == "sigmoid"


def test_bco_without_a_shift_is_trls_formula_by_hand():
    # TRL: -log s(beta a) - log s(-beta b), no baseline; a = 1, b = -1, beta = 0.5 by hand
    got = fam.paired_losses("bco_pair", t([1.0]), t([-1.0]), 0.5)
    assert got.item() == pytest.approx(-2 * math.log(1 / (1 + math.exp(-0.5))), rel=1e-12)


def test_bco_baseline_is_the_detached_batch_mean_or_the_given_delta():
    beta = 0.5
    a, b = t([1.0, 3.0], requires_grad=True), t([-1.0, 1.0], requires_grad=True)
    delta = beta * (1.0 + 3.0 - 1.0 + 1.0) / 4  # 0.5
    shift = fam.bco_reward_shift(a, b, beta)  # the BCO paper's delta, over this batch
    assert shift.item() == pytest.approx(delta) and not shift.requires_grad
    fam.paired_losses("bco_pair", a, b, beta, delta=shift).sum().backward()
    # delta is a constant: d/da_i = -beta * sigmoid(-(beta a_i - delta)), nothing through the mean
    assert a.grad.tolist() == pytest.approx([-beta * sig(-(beta * x - delta)) for x in (1.0, 3.0)], rel=1e-9)
    assert b.grad.tolist() == pytest.approx([beta * sig(beta * x - delta) for x in (-1.0, 1.0)], rel=1e-9)
    given = fam.paired_losses("bco_pair", a.detach(), b.detach(), beta, delta=t(2.0))
    assert given.tolist() == pytest.approx([by_hand("bco_pair", x, y, beta, 0, 1, 1, 2.0)
                                            for x, y in ((1.0, -1.0), (3.0, 1.0))], rel=1e-9)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_every_paired_loss_is_finite_with_finite_gradients(beta):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        policy_c = (30 * torch.randn(12, generator=g)).to(dtype)
        policy_r = (30 * torch.randn(12, generator=g)).to(dtype)
        policy_c[:3], policy_r[:3] = t([100.0, -100.0, 100.0], dtype), t([-100.0, 100.0, 100.0], dtype)
        ref = torch.zeros(12, dtype=dtype)  # log-ratios of +-100, margins of +-200
        lengths = torch.randint(1, 40, (2, 12), generator=g)
        for name in dpo.LOSS_TYPES:
            pc, pr = policy_c.clone().requires_grad_(), policy_r.clone().requires_grad_()
            loss, _, _ = dpo.dpo_loss(pc, pr, ref, ref, beta=beta, loss_type=name, label_smoothing=0.1,
                                      chosen_lengths=lengths[0], rejected_lengths=lengths[1])
            loss.backward()
            assert torch.isfinite(loss), (name, dtype)
            assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), (name, dtype)


def test_discopop_stays_finite_where_its_exponential_overflows():
    # beta z = -100: exp(100) overflows fp32, but its weight m = sigmoid(-2000) is 0, so the loss is
    # the logistic part alone, -log sigmoid(-100) = 100
    z = torch.tensor([-100.0, 100.0], requires_grad=True)
    loss = fam.paired_losses("discopop", z, torch.zeros(2), 1.0)
    assert loss[0].item() == pytest.approx(100.0)
    assert loss[1].item() == pytest.approx(math.exp(-100), abs=1e-30)
    loss.sum().backward()
    assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------------------------
# SimPO, ORPO's odds-ratio term, KTO


def test_simpo_hand_worked_value_and_rewards():
    w, l = t([-1.0], requires_grad=True), t([-1.5])
    losses, rc, rr = dpo.simpo_loss(w, l, beta=2.0, gamma=0.5)
    # beta (avg_w - avg_l) - gamma = 2 * 0.5 - 0.5 = 0.5 -> log(1 + e^-0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-12)
    assert rc.item() == -2.0 and rr.item() == -3.0 and not rc.requires_grad
    assert dpo.simpo_loss is fam.simpo_loss


def test_simpo_gamma_moves_the_decision_point():
    # the loss is ln 2 exactly where beta * (avg_w - avg_l) = gamma: at 0 without a margin, at
    # gamma / beta with one; there a pair that DPO-style would already "win" still costs ln 2
    beta, gamma = 2.0, 0.5
    at = gamma / beta
    losses, _, _ = fam.simpo_loss(t([-1.0 + at, -1.0]), t([-1.0, -1.0]), beta=beta, gamma=gamma)
    no_margin, _, _ = fam.simpo_loss(t([-1.0 + at, -1.0]), t([-1.0, -1.0]), beta=beta, gamma=0.0)
    assert losses[0].item() == pytest.approx(LN2) and no_margin[1].item() == pytest.approx(LN2)
    assert no_margin[0].item() < LN2 < losses[1].item()


def orpo_by_hand(w, l, lam):
    log_odds = (w - l) - (math.log(1 - math.exp(w)) - math.log(1 - math.exp(l)))
    return -lam * math.log(sig(log_odds)), log_odds


def test_odds_ratio_matches_the_naive_formula_at_moderate_values():
    pairs = [(-0.5, -2.0), (-2.0, -0.5), (-0.9, -0.6)]
    w, l = t([p[0] for p in pairs]), t([p[1] for p in pairs])
    losses, log_odds = dpo.odds_ratio_loss(w, l, lam=0.1)
    by_hand = [orpo_by_hand(a, b, 0.1) for a, b in pairs]
    assert losses.tolist() == pytest.approx([x[0] for x in by_hand], rel=1e-9)  # per example, as every loss
    assert log_odds.tolist() == pytest.approx([x[1] for x in by_hand], rel=1e-9)
    assert dpo.odds_ratio_loss is fam.odds_ratio_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_odds_ratio_is_finite_near_zero_and_very_negative(dtype):
    for w_value, l_value in [(-1e-8, -2.0), (-2.0, -1e-8), (-1e4, -0.5), (-0.5, -1e4), (-1e-8, -1e4)]:
        w = torch.tensor([w_value], dtype=dtype, requires_grad=True)
        l = torch.tensor([l_value], dtype=dtype, requires_grad=True)
        loss, log_odds = fam.odds_ratio_loss(w, l, lam=0.1)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(log_odds).all(), (w_value, l_value)
        assert torch.isfinite(w.grad).all() and torch.isfinite(l.grad).all(), (w_value, l_value)
        # raising y_w's probability or lowering y_l's helps (no more, once the loss is saturated)
        assert w.grad.item() <= 0 <= l.grad.item()
        if abs(log_odds.item()) < 30:
            assert w.grad.item() < 0 < l.grad.item()
    # the value at -1e-8 is right: log(1 - exp(-1e-8)) = log(1e-8 - ...), computed here in float64
    _, log_odds = fam.odds_ratio_loss(t([-1e-8], dtype), t([-2.0], dtype))
    expect = (-1e-8 + 2.0) - (math.log(-math.expm1(-1e-8)) - math.log(-math.expm1(-2.0)))
    # relative: in fp32 too, where expm1 and log round by ulps at values near 20
    assert log_odds.item() == pytest.approx(expect, rel=1e-5)
    # (the naive form cannot do this in fp32: exp(-1e-8) rounds to 1, and log1p(-1) = -inf)
    assert torch.log1p(-torch.exp(torch.tensor(-1e-8))).item() == -math.inf


def kto_inputs(policy_kl, ref_kl):
    return dict(policy_desirable_logps=t([-10.0, -4.0], requires_grad=True),
                ref_desirable_logps=t([-12.0, -4.5]),
                policy_undesirable_logps=t([-7.0], requires_grad=True), ref_undesirable_logps=t([-6.0]),
                policy_kl_logps=t(policy_kl, requires_grad=True), ref_kl_logps=t(ref_kl))


def test_kto_hand_worked_value_and_reference_point_without_gradient():
    x = kto_inputs([-20.0, -30.0], [-21.0, -30.0])  # z0 = mean(1, 0) = 0.5
    losses, rd, ru, kl = dpo.kto_loss(**x, beta=0.5)
    assert kl.item() == pytest.approx(0.5) and not kl.requires_grad
    expect = [1 - sig(0.5 * (2.0 - 0.5)), 1 - sig(0.5 * (0.5 - 0.5)), 1 - sig(0.5 * (0.5 - -1.0))]
    assert losses.tolist() == pytest.approx(expect, rel=1e-12)
    assert rd.tolist() == pytest.approx([1.0, 0.25]) and ru.tolist() == pytest.approx([-0.5])
    losses.sum().backward()
    grad = x["policy_kl_logps"].grad
    assert grad is None or torch.count_nonzero(grad) == 0  # z0 is a reference point, not a target
    assert x["policy_desirable_logps"].grad is not None
    assert dpo.kto_loss is fam.kto_loss


def test_kto_reference_point_is_clamped_at_zero():
    x = kto_inputs([-25.0, -31.0], [-21.0, -30.0])  # the estimate is mean(-4, -1) < 0
    losses, _, _, kl = fam.kto_loss(**x, beta=0.5)
    assert kl.item() == 0.0
    expect = [1 - sig(0.5 * 2.0), 1 - sig(0.5 * 0.5), 1 - sig(0.5 * 1.0)]  # z0 = 0
    assert losses.tolist() == pytest.approx(expect, rel=1e-12)


def test_kto_desirable_loss_falls_as_its_reward_rises_and_undesirable_rises():
    kl = dict(policy_kl_logps=t([-5.0]), ref_kl_logps=t([-5.0]))
    previous = None
    for logratio in (-3.0, -1.0, 0.0, 1.0, 3.0):
        losses, _, _, _ = fam.kto_loss(t([logratio]), t([logratio]), t([0.0]), t([0.0]), **kl, beta=0.5)
        if previous is not None:
            assert losses[0] < previous[0] and losses[1] > previous[1]
        previous = losses


def test_kto_weights_scale_their_group_and_empty_groups_work():
    args = (t([-1.0, -2.0]), t([-3.0]), t([-1.5, -1.0]), t([-2.0]), t([-4.0]), t([-4.5]))
    base, _, _, _ = fam.kto_loss(*args, beta=0.2)
    weighted, _, _, _ = fam.kto_loss(*args, beta=0.2, desirable_weight=2.0, undesirable_weight=3.0)
    assert weighted.tolist() == pytest.approx([2 * base[0].item(), 2 * base[1].item(), 3 * base[2].item()])
    empty = torch.zeros(0, dtype=torch.float64)
    only_bad, rd, ru, _ = fam.kto_loss(empty, args[1], empty, args[3], args[4], args[5], beta=0.2)
    assert only_bad.shape == (1,) and rd.shape == (0,) and ru.shape == (1,)
    assert only_bad.item() == pytest.approx(base[2].item())
    only_good, rd, ru, _ = fam.kto_loss(args[0], empty, args[2], empty, args[4], args[5], beta=0.2)
    assert only_good.tolist() == pytest.approx(base[:2].tolist()) and ru.shape == (0,)


def test_dpo_family_does_not_import_dpo():
    # dpo.py imports dpo_family; the reverse would be a cycle
    with open(os.path.join(ROOT, "dpo_family.py")) as f:
        tree = ast.parse(f.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "dpo" not in imported and imported <= {"math", "dataclasses", "torch", "torch.nn.functional", "plumbing"}


# ----------------------------------------------------------------------------------------------
# The family in dpo.py's training loop: data options and tiny end-to-end runs

import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import model as M  # noqa: E402
import plumbing as P  # noqa: E402
from data import formats  # noqa: E402

ALL_LOSSES = dpo.LOSS_TYPES + dpo.REFERENCE_FREE + ["kto"]


def test_kto_examples_split_pairs_and_mismatch_completions():
    pairs = [(f"p{i}", f"good{i}", f"bad{i}") for i in range(50)]
    rows = dpo.kto_examples(pairs, random.Random(0))
    assert len(rows) == 100 and sum(r[3] for r in rows) == 50
    for i, (prompt, completion, mismatched, label) in enumerate(rows):
        assert completion == (f"good{prompt[1:]}" if label else f"bad{prompt[1:]}")
        assert mismatched == rows[i - 1][1]  # the previous row's completion, as TRL's KL rows
    # mismatched: almost always a reply to another prompt (the same one only when a prompt's two
    # rows land next to each other after the shuffle)
    own = sum(m.lstrip("godba") == p[1:] for p, _, m, _ in rows)
    assert own <= 5
    few = dpo.kto_examples(pairs, random.Random(0), desirable_share=0.2)
    assert sum(r[3] for r in few) == 10 and len(few) == 60  # all 50 undesirable rows stay


def family_config(tiny_data_dir, init, out, **overrides):
    kw = dict(init=init, data_dir=tiny_data_dir, steps=4, batch_size=4, lr=1e-3, warmup_steps=1,
              eval_problems=0, out=out, device="cpu", log_every=1)
    return dpo.DPOConfig(**{**kw, **overrides})


@pytest.mark.parametrize("loss_type", ALL_LOSSES)
def test_every_loss_name_trains_a_few_steps_end_to_end(loss_type, tiny_sft_ckpt, tiny_data_dir, tmp_path):
    metrics = dpo.train(family_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path), loss_type=loss_type,
                                      label_smoothing=0.1 if loss_type in ("cdpo", "robust") else 0.0))
    assert math.isfinite(metrics["pref_accuracy"]) and math.isfinite(metrics["margin"])
    with open(os.path.join(str(tmp_path), "dpo", "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert len(log) == 4
    for rec in log:
        # every logged value is a number (a NaN would be written as null and read back as None)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in rec.values()), rec
    assert ("kl" in log[0]) == (loss_type not in dpo.REFERENCE_FREE)
    # the policy moved: the saved weights differ from the start
    start, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", os.path.join(tiny_data_dir, "tokenizer.json"))
    end, _ = M.load_checkpoint(os.path.join(str(tmp_path), "dpo", "model.pt"), "cpu",
                               os.path.join(tiny_data_dir, "tokenizer.json"))
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), end.state_dict().values()))


@pytest.mark.parametrize("loss_type", dpo.REFERENCE_FREE)
def test_reference_free_losses_load_one_model_and_never_run_a_reference(loss_type, tiny_sft_ckpt, tiny_data_dir,
                                                                        tmp_path, monkeypatch):
    loaded, scored = [], []
    real_load, real_seq = M.load_checkpoint, dpo.sequence_logprobs

    def counting_load(*args, **kw):
        model, ckpt = real_load(*args, **kw)
        loaded.append(model)
        return model, ckpt

    def spying_seq(model, *args, **kw):
        scored.append(model)
        return real_seq(model, *args, **kw)

    monkeypatch.setattr(M, "load_checkpoint", counting_load)
    monkeypatch.setattr(dpo, "sequence_logprobs", spying_seq)
    dpo.train(family_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path), loss_type=loss_type))
    assert len(loaded) == 1  # the policy: no reference copy in memory
    assert scored and all(m is loaded[0] for m in scored)  # every log-prob came from the policy


def test_kto_reads_trls_unpaired_format(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    rows = formats.read_pairs(os.path.join(tiny_data_dir, "prefs.jsonl"))[:40]
    path = tmp_path / "kto.jsonl"
    with open(path, "w") as f:
        for prompt, chosen, rejected in rows:
            f.write(json.dumps({"prompt": prompt, "completion": chosen, "label": True}) + "\n")
            f.write(json.dumps({"prompt": prompt, "completion": rejected, "label": False}) + "\n")
    metrics = dpo.train(family_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path / "out"), loss_type="kto",
                                      data=str(path), steps=2))
    assert metrics["data_counts"]["kept"] == 80  # 80 unpaired rows (of which 2 steps use a few)


def test_unknown_loss_type_is_refused_before_training(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    with pytest.raises(ValueError, match="known: sigmoid, cdpo"):
        dpo.train(family_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path), loss_type="nope"))


@pytest.mark.parametrize("loss_type", dpo.REFERENCE_FREE + ["kto"])
def test_rpo_alpha_is_refused_where_it_would_be_ignored(loss_type, tiny_sft_ckpt, tiny_data_dir, tmp_path):
    with pytest.raises(ValueError, match="--rpo-alpha"):
        dpo.train(family_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path), loss_type=loss_type, rpo_alpha=1.0))


def test_a_negative_rpo_alpha_is_refused(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    with pytest.raises(ValueError, match="--rpo-alpha must be >= 0"):
        dpo.train(family_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path), rpo_alpha=-0.5))


def test_kto_drops_a_pair_with_one_reply_twice_and_says_so(tiny_sft_ckpt, tiny_data_dir, tmp_path, capsys):
    # such a pair would become a desirable and an undesirable row for the same reply
    rows = formats.read_pairs(os.path.join(tiny_data_dir, "prefs.jsonl"))[:10]
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i, (prompt, chosen, rejected) in enumerate(rows):
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": chosen if i < 3 else rejected}) + "\n")
    metrics = dpo.train(family_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path / "out"), loss_type="kto",
                                      data=str(path), steps=2))
    printed = capsys.readouterr().out
    assert "dpo: kto: 7 desirable and 7 undesirable rows (3 pairs with one reply twice dropped)" in printed
    assert re.search(r"^dpo: [\d.]+ rows/s, ", printed, re.M)  # KTO trains on rows, not pairs
    assert metrics["data_counts"]["kept"] == 14


def test_kto_scores_its_mismatched_rows_without_a_graph_and_the_gradient_is_unchanged(tiny_sft_ckpt, tiny_data_dir,
                                                                                         tiny_enc):
    policy, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", os.path.join(tiny_data_dir, "tokenizer.json"))
    policy.eval()  # dropout off, as in training, so the two passes see the same function
    pairs = formats.read_pairs(os.path.join(tiny_data_dir, "prefs.jsonl"))[:4]
    rows = fam.kto_examples(pairs, random.Random(0))
    examples, _ = dpo.tokenize_pairs(tiny_enc, rows, 96, 192)
    ids, mask = dpo.collate(examples, M.special(tiny_enc, "endoftext"), torch.device("cpu"))
    labels = torch.tensor([ex["label"] for ex in examples])
    B = len(examples)
    # reference log-probs near the policy's, so that no sigmoid saturates and the estimate of z0 is
    # above its clamp at 0: z0 then carries a gradient unless kto_loss detaches it, and the split pass
    # is right only because it does
    with torch.no_grad():
        start = dpo.sequence_logprobs(policy, ids, mask)  # (2B,)
    ref = start - 1 + 0.5 * torch.randn(2 * B, generator=torch.Generator().manual_seed(0))  # (2B,)
    assert (start[B:] - ref[B:]).mean() > 0  # the z0 estimate, before its clamp

    grad_enabled = []  # per forward: (rows, whether autograd records it)
    hook = policy.register_forward_hook(lambda m, args, out: grad_enabled.append((len(args[0]), torch.is_grad_enabled())))
    grads = []
    for logprobs in (dpo.sequence_logprobs, dpo.kto_logprobs):
        grad_enabled.clear()
        policy.zero_grad(set_to_none=True)
        logps = logprobs(policy, ids, mask)
        losses, _, _, _ = fam.kto_loss(logps[:B][labels], logps[:B][~labels], ref[:B][labels], ref[:B][~labels],
                                       logps[B:], ref[B:], beta=0.5)
        losses.mean().backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
        if logprobs is dpo.kto_logprobs:  # the completions with a graph, the mismatched ones without
            assert grad_enabled == [(B, True), (B, False)]
        else:
            assert grad_enabled == [(2 * B, True)]
    hook.remove()
    assert 0 < labels.sum() < B  # both groups present, so both terms of the loss are exercised
    for joint, split in zip(*grads):
        torch.testing.assert_close(split, joint, rtol=1e-4, atol=1e-6)


def test_the_bco_reward_shift_flag_reaches_the_loss_and_is_refused_elsewhere():
    # --bco-reward-shift batch-mean: batch_loss shifts bco_pair's rewards by the batch's mean reward;
    # none (the default) is TRL's formula; with another loss the flag would change nothing
    logps, ref = t([-3.0, -5.0, -6.0, -4.0]), t([-4.0, -4.5, -5.0, -5.5])
    lengths = t([3.0, 4.0, 5.0, 2.0])
    a, b = logps[:2] - ref[:2], logps[2:] - ref[2:]
    for shift, delta in (("none", None), ("batch-mean", fam.bco_reward_shift(a, b, 0.5))):
        config = dpo.DPOConfig(loss_type="bco_pair", beta=0.5, bco_reward_shift=shift)
        loss, _, _ = dpo.batch_loss(config, logps, lengths, ref)
        assert loss.item() == pytest.approx(fam.paired_losses("bco_pair", a, b, 0.5, delta=delta).mean().item())
    with pytest.raises(P.ConfigError, match="--bco-reward-shift does nothing with --loss-type sigmoid"):
        checks.dpo(dpo.DPOConfig(bco_reward_shift="batch-mean"), dpo.BUILDS)
    with pytest.raises(P.ConfigError, match="--bco-reward-shift 'mean' is unknown"):
        checks.dpo(dpo.DPOConfig(loss_type="bco_pair", bco_reward_shift="mean"), dpo.BUILDS)
