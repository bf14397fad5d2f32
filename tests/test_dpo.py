"""dpo.py: the loss against the paper's formula, sequence log-probs against a hand-worked example
and a position-by-position brute force, the reference pass, a categorical toy that DPO must rank
exactly, the data path (tokenisation, masks, truncation, the command line's checks on flags and
files), and tiny end-to-end runs. Reading the pair files is test_formats.py's; the evaluation's
measures are test_evaluation.py's.

Every model here is tiny (1-2 layers, width 32) and built from a fixed seed; the whole file runs
in well under a minute on a busy 2-core CPU.
"""

import json
import math
import os
import time

import pytest
import torch

import checks
import dpo
from helpers import pad_id, reply_logp, tiny_gpt
from data.prepare import write_jsonl
import model as M
import plumbing as P
from data import formats
from test_formats import PAIR as GOOD, write_pairs_with_bad_line as write_with_bad_line
import evaluation as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LN2 = math.log(2)


def t(values, dtype=torch.float32, **kw):
    return torch.tensor(values, dtype=dtype, **kw)


def tiny_path(tiny_data_dir, name):
    return os.path.join(tiny_data_dir, name)


# ----------------------------------------------------------------------------------------------
# The loss, against eq. 7 written out by hand


def test_loss_is_ln2_and_rewards_zero_when_policy_equals_reference():
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 10.0, 300.0):  # any log-prob values, however large
        chosen = -scale * torch.rand(7, generator=g)
        rejected = -scale * torch.rand(7, generator=g)
        for beta in (0.1, 0.5, 3.0):
            loss, rc, rr = dpo.dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=beta)
            # rel, not abs=1e-7: the fp32 mean of ln 2 rounds by an ulp or two, differently per CPU
            assert loss.item() == pytest.approx(LN2, rel=1e-5)
            assert torch.equal(rc, torch.zeros(7)) and torch.equal(rr, torch.zeros(7))


def test_larger_margin_lowers_the_loss_and_swapping_raises_it():
    ref_c, ref_r = t([-20.0]), t([-22.0])
    losses = []
    for margin in (-3.0, -1.0, 0.0, 0.5, 2.0, 8.0):
        # policy chosen up by margin/2, rejected down by margin/2: log-ratio margin = margin
        loss, _, _ = dpo.dpo_loss(ref_c + margin / 2, ref_r - margin / 2, ref_c, ref_r, beta=0.5)
        losses.append(loss.item())
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    pc, pr = t([-18.0, -30.0]), t([-25.0, -31.0])
    rc, rr = t([-20.0, -30.5]), t([-24.0, -30.0])  # positive margins: 3 and 1.5
    right, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.2)
    swapped, _, _ = dpo.dpo_loss(pr, pc, rr, rc, beta=0.2)
    assert swapped.item() > right.item() + 0.1
    assert right.item() < LN2 < swapped.item()


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_loss_and_rewards_match_the_formula_in_python_floats(beta):
    pc = [-12.5, -3.25, -40.0, -7.0]
    pr = [-11.0, -9.5, -38.0, -7.0]
    rc = [-12.0, -4.0, -41.5, -6.0]
    rr = [-13.0, -9.0, -37.0, -8.5]
    policy_c = t(pc, requires_grad=True)
    policy_r = t(pr, requires_grad=True)
    loss, chosen_r, rejected_r = dpo.dpo_loss(policy_c, policy_r, t(rc), t(rr), beta=beta)

    def neg_log_sigmoid(x):
        return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))

    per = [neg_log_sigmoid(beta * ((a - c) - (b - d))) for a, b, c, d in zip(pc, pr, rc, rr)]
    # fp32 logsigmoid against Python's floats: ~80 ulps of room, as fp32 kernels differ by CPU
    assert loss.item() == pytest.approx(sum(per) / len(per), rel=1e-5)
    assert chosen_r.tolist() == pytest.approx([beta * (a - c) for a, c in zip(pc, rc)], abs=1e-5)
    assert rejected_r.tolist() == pytest.approx([beta * (b - d) for b, d in zip(pr, rr)], abs=1e-5)
    # the rewards are diagnostics: detached even though the policy log-probs carry gradient
    assert loss.requires_grad
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    # and the gradient is the paper's: d loss / d pc_i = -beta * sigmoid(-beta * m_i) / B
    loss.backward()
    expect = [-beta / (1 + math.exp(beta * ((a - c) - (b - d)))) / len(pc)
              for a, b, c, d in zip(pc, pr, rc, rr)]
    assert policy_c.grad.tolist() == pytest.approx(expect, rel=1e-5, abs=1e-6)
    assert policy_r.grad.tolist() == pytest.approx([-e for e in expect], rel=1e-5, abs=1e-6)


def test_implicit_reward_is_linear_in_beta():
    policy, ref = t([-3.0, -10.0, -2.5]), t([-4.0, -7.5, -2.5])
    base = [p - r for p, r in zip(policy.tolist(), ref.tolist())]  # [1, -2.5, 0]
    for beta in (0.05, 0.1, 0.4, 1.0, 7.0):
        got = dpo.implicit_reward(policy, ref, beta=beta)
        assert got.tolist() == pytest.approx([beta * d for d in base], abs=1e-6)
        assert torch.allclose(got, 2 * dpo.implicit_reward(policy, ref, beta=beta / 2), atol=1e-6)
    assert dpo.implicit_reward(policy, ref).tolist() == pytest.approx([0.1, -0.25, 0.0], abs=1e-6)


def test_partition_function_cancels():
    # eq. 5-6: r = beta log pi/pi_ref + beta log Z(x); a per-prompt constant added to both
    # responses' log-probs cancels in the margin, so the loss is unchanged
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-20 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(4))
    shift = t([3.0, -7.0, 0.5, 12.0, -1.25], dtype=torch.float64)  # one constant per prompt
    loss, c0, r0 = dpo.dpo_loss(pc, pr, rc, rr, beta=0.3)
    shifted, c1, r1 = dpo.dpo_loss(pc + shift, pr + shift, rc, rr, beta=0.3)
    assert shifted.item() == pytest.approx(loss.item(), abs=1e-12)
    # the rewards themselves move by beta * constant: only their difference is identified
    assert torch.allclose(c1 - c0, 0.3 * shift) and torch.allclose(r1 - r0, 0.3 * shift)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_rpo_adds_alpha_times_the_chosen_nll_per_token(alpha):
    # batch_loss with rpo_alpha: eq. 7 plus alpha * (-sum of chosen log-probs / chosen tokens),
    # written out here by hand from the same numbers
    pc, pr = [-12.5, -3.25, -40.0], [-11.0, -9.5, -38.0]
    rc, rr = [-12.0, -4.0, -41.5], [-13.0, -9.0, -37.0]
    chosen_tokens, rejected_tokens = [10, 3, 25], [9, 7, 30]
    beta = 0.5
    logps = t(pc + pr, dtype=torch.float64, requires_grad=True)
    lengths = t(chosen_tokens + rejected_tokens, dtype=torch.float64)
    config = dpo.DPOConfig(beta=beta, rpo_alpha=alpha)
    loss, chosen_r, rejected_r = dpo.batch_loss(config, logps, lengths, t(rc + rr, dtype=torch.float64))
    dpo_part = sum(math.log1p(math.exp(-beta * ((a - c) - (b - d)))) for a, b, c, d in zip(pc, pr, rc, rr)) / 3
    nll_per_token = -sum(pc) / sum(chosen_tokens)
    assert loss.item() == pytest.approx(dpo_part + alpha * nll_per_token, rel=1e-12)
    # the rewards stay DPO's: the NLL term changes the loss, not the implicit reward
    assert chosen_r.tolist() == pytest.approx([beta * (a - c) for a, c in zip(pc, rc)], abs=1e-12)
    assert rejected_r.tolist() == pytest.approx([beta * (b - d) for b, d in zip(pr, rr)], abs=1e-12)
    # its gradient: -alpha / (chosen tokens) on every chosen row, nothing on the rejected rows
    loss.backward()
    with_rpo = logps.grad.clone()
    logps.grad = None
    dpo.batch_loss(dpo.DPOConfig(beta=beta), logps, lengths, t(rc + rr, dtype=torch.float64))[0].backward()
    extra = (with_rpo - logps.grad).tolist()
    assert extra == pytest.approx([-alpha / sum(chosen_tokens)] * 3 + [0.0] * 3, abs=1e-12)


def test_unknown_loss_type_lists_the_known_ones():
    x = t([-1.0])
    with pytest.raises(ValueError) as e:
        dpo.dpo_loss(x, x, x, x, loss_type="no-such-loss")
    assert "no-such-loss" in str(e.value)
    assert dpo.LOSS_TYPES and all(name in str(e.value) for name in dpo.LOSS_TYPES)
    assert "sigmoid" in dpo.LOSS_TYPES


# ----------------------------------------------------------------------------------------------
# Training with a frozen reference


def test_gradient_reaches_the_policy_and_never_the_reference(tiny_enc, tiny_examples):
    examples, _ = tiny_examples
    policy = tiny_gpt(tiny_enc.n_vocab, seed=3, n_layer=2)
    reference = tiny_gpt(tiny_enc.n_vocab, seed=3, n_layer=2)
    reference.requires_grad_(False).eval()
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for step in range(3):
        ids, mask = dpo.collate(examples[4 * step: 4 * step + 4], pad_id(tiny_enc), "cpu")
        logps = dpo.sequence_logprobs(policy, ids, mask)  # (2B,)
        ref = dpo.sequence_logprobs(reference, ids, mask)  # no no_grad(): requires_grad(False) suffices
        assert not ref.requires_grad
        loss, _, _ = dpo.dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in policy.named_parameters():
            assert p.grad is not None, name
            assert p.grad.abs().sum() > 0, name
        opt.step()
    for name, p in reference.named_parameters():
        assert p.grad is None, name
    after = reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and the policy did move
    assert not torch.equal(policy.state_dict()["wte.weight"], after["wte.weight"])


def test_one_step_raises_the_chosen_log_ratio_over_the_rejected(tiny_enc, tiny_examples):
    examples, _ = tiny_examples
    batch = examples[:8]
    ids, mask = dpo.collate(batch, pad_id(tiny_enc), "cpu")
    policy = tiny_gpt(tiny_enc.n_vocab, seed=4)
    reference = tiny_gpt(tiny_enc.n_vocab, seed=4).requires_grad_(False).eval()
    with torch.no_grad():
        ref = dpo.sequence_logprobs(reference, ids, mask)

    def margin_and_loss():
        logps = dpo.sequence_logprobs(policy, ids, mask)
        loss, rc, rr = dpo.dpo_loss(logps[:8], logps[8:], ref[:8], ref[8:], beta=0.1)
        return (rc - rr).mean().item(), loss

    m0, loss = margin_and_loss()
    assert m0 == 0.0  # policy == reference
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    opt.zero_grad()
    loss.backward()
    opt.step()
    m1, loss1 = margin_and_loss()
    assert m1 > m0 + 1e-4, (m0, m1)
    assert loss1.item() < loss.item()


# ----------------------------------------------------------------------------------------------
# sequence_logprobs


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are given, whatever the input ids (of the right shape)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, idx):
        assert idx.shape == self.logits.shape[:2]
        return self.logits


def test_sequence_logprobs_hand_worked():
    # V = 3; row 0: ids [0, 2, 1, 1], the last two are the response; row 1: ids [2, 0, 1, pad],
    # only the middle one is scored. logits[b, t] predicts ids[b, t + 1].
    ids = torch.tensor([[0, 2, 1, 1], [2, 0, 1, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    logits = t([[[5.0, 5.0, 5.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]],
                [[0.0, math.log(3.0), 0.0], [9.0, 9.0, 9.0], [4.0, 4.0, 4.0]]])
    model = FixedLogits(logits)
    # row 0: p(1 | [1, 2, 3]) = e^2 / (e + e^2 + e^3); p(1 | uniform) = 1/3
    row0 = math.log(math.e ** 2 / (math.e + math.e ** 2 + math.e ** 3)) + math.log(1 / 3)
    # row 1: p(0 | [0, ln 3, 0]) = 1 / (1 + 3 + 1)
    row1 = math.log(1 / 5)
    got = dpo.sequence_logprobs(model, ids, mask)
    assert got.dtype == torch.float32
    # fp32 log_softmax against Python's floats: relative (kernels round differently by CPU)
    assert got.tolist() == pytest.approx([row0, row1], rel=1e-5, abs=1e-6)
    avg = dpo.sequence_logprobs(model, ids, mask, average=True)
    assert avg.tolist() == pytest.approx([row0 / 2, row1 / 1], rel=1e-5, abs=1e-6)


def brute_force_logps(model, example, key):
    """log p(response | prompt) one position at a time: feed each unpadded prefix alone, take the
    log-softmax of its last position in float64 and add the log-prob of the next response token.
    The response positions come from the example's own lists, not from any mask."""
    seq = example["prompt"] + example[key]
    total = 0.0
    with torch.no_grad():
        for pos in range(len(example["prompt"]), len(seq)):
            last = model(torch.tensor([seq[:pos]]))[0, -1].double()  # (V,)
            total += float(torch.log_softmax(last, -1)[seq[pos]])
    return total


def test_sequence_logprobs_matches_brute_force_on_a_real_gpt(tiny_enc, tiny_examples):
    examples, _ = tiny_examples
    batch = examples[:3]  # responses of different lengths, so rows are right-padded
    ids, mask = dpo.collate(batch, pad_id(tiny_enc), "cpu")
    lengths = [len(e["prompt"]) + len(e[k]) for k in ("chosen", "rejected") for e in batch]
    assert min(lengths) < ids.shape[1]  # some padding is present
    model = tiny_gpt(tiny_enc.n_vocab, seed=5, std=0.1).eval()
    with torch.no_grad():
        got = dpo.sequence_logprobs(model, ids, mask)
    expect = [brute_force_logps(model, e, k) for k in ("chosen", "rejected") for e in batch]
    assert got.tolist() == pytest.approx(expect, abs=1e-4, rel=1e-5)

    # average=True is the sum over the number of response tokens
    n_tokens = [len(e[k]) for k in ("chosen", "rejected") for e in batch]
    with torch.no_grad():
        avg = dpo.sequence_logprobs(model, ids, mask, average=True)
    assert avg.tolist() == pytest.approx([s / n for s, n in zip(expect, n_tokens)], rel=1e-5, abs=1e-5)

    # the ids at padded positions change nothing (they are never scored and, the model being
    # causal, never seen by a scored position)
    g = torch.Generator().manual_seed(0)
    scrambled = ids.clone()
    for row, n in enumerate(lengths):
        scrambled[row, n:] = torch.randint(0, tiny_enc.n_vocab, (ids.shape[1] - n,), generator=g)
    assert not torch.equal(scrambled, ids)
    with torch.no_grad():
        assert torch.allclose(dpo.sequence_logprobs(model, scrambled, mask), got, rtol=1e-5, atol=1e-5)

    # extra right padding changes nothing either (to rounding: a longer row sums in another order;
    # a leak through the padding would be off by far more than 1e-5 relative)
    extra = 7
    ids_x = torch.cat([ids, torch.full((ids.shape[0], extra), pad_id(tiny_enc))], 1)
    mask_x = torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=mask.dtype)], 1)
    with torch.no_grad():
        assert torch.allclose(dpo.sequence_logprobs(model, ids_x, mask_x), got, rtol=1e-5, atol=1e-5)


def test_reference_pass_equals_live_reference(tiny_enc, tiny_examples):
    examples, _ = tiny_examples
    examples = examples[:23]
    model = tiny_gpt(tiny_enc.n_vocab, seed=6, std=0.1).eval()
    pc, pr = dpo.pair_logprobs(model, examples, pad_id(tiny_enc), "cpu")  # one batch of 64
    assert pc.shape == pr.shape == (23,)
    for bs in (1, 5, 8):
        live_c, live_r = [], []
        for i in range(0, len(examples), bs):
            batch = examples[i: i + bs]
            ids, mask = dpo.collate(batch, pad_id(tiny_enc), "cpu")
            with torch.no_grad():
                logps = dpo.sequence_logprobs(model, ids, mask)
            live_c.append(logps[: len(batch)])
            live_r.append(logps[len(batch):])
        # within 1e-5 relative (plus 1e-5 absolute): these sums reach ~-375, where one float32
        # ulp is 3e-5, and a batch of another shape may round the last bit differently
        assert torch.allclose(torch.cat(live_c), pc, rtol=1e-5, atol=1e-5), bs
        assert torch.allclose(torch.cat(live_r), pr, rtol=1e-5, atol=1e-5), bs
    # and the function's own batch_size does not matter either
    pc3, pr3 = dpo.pair_logprobs(model, examples, pad_id(tiny_enc), "cpu", batch_size=3)
    assert torch.allclose(pc3, pc, rtol=1e-5, atol=1e-5) and torch.allclose(pr3, pr, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# A categorical toy: DPO alone must recover a known ranking through the implicit reward


def test_categorical_toy_recovers_both_rankings():
    # 2 prompts x 6 responses; pi(y|x) = softmax(theta[x]), uniform at the start, and pi_ref the
    # same uniform. The data: every ordered pair (better, worse) under a known ranking.
    rankings = [[3, 0, 5, 1, 4, 2], [1, 4, 2, 5, 0, 3]]  # best first, a different one per prompt
    prompts, chosen, rejected = [], [], []
    for x, ranking in enumerate(rankings):
        for a in range(6):
            for b in range(a + 1, 6):
                prompts.append(x)
                chosen.append(ranking[a])
                rejected.append(ranking[b])
    assert len(prompts) == 2 * 15
    prompts, chosen, rejected = map(torch.tensor, (prompts, chosen, rejected))
    torch.manual_seed(0)
    theta = torch.zeros(2, 6, requires_grad=True)
    ref_logp = torch.log_softmax(torch.zeros(2, 6), -1)  # (2, 6) uniform
    opt = torch.optim.Adam([theta], lr=0.05)
    beta = 0.1
    for _ in range(300):
        logp = torch.log_softmax(theta, -1)  # (2, 6)
        loss, _, _ = dpo.dpo_loss(logp[prompts, chosen], logp[prompts, rejected],
                                  ref_logp[prompts, chosen], ref_logp[prompts, rejected], beta=beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < LN2 - 0.1  # it learned something
    with torch.no_grad():
        reward = dpo.implicit_reward(torch.log_softmax(theta, -1), ref_logp, beta=beta)  # (2, 6)
    for x, ranking in enumerate(rankings):
        order = sorted(range(6), key=lambda y: -reward[x, y].item())
        assert order == ranking, (x, reward[x].tolist())
        # strictly separated, not a tie broken by sort order
        gaps = [reward[x, ranking[i]] - reward[x, ranking[i + 1]] for i in range(5)]
        assert min(gaps) > 1e-3, gaps


# ----------------------------------------------------------------------------------------------
# Step 0: policy loaded from the same checkpoint as the reference


def test_rewards_are_exactly_zero_at_step_0(tiny_enc, tiny_data_dir, tiny_examples, tmp_path):
    examples, _ = tiny_examples
    tok = tiny_path(tiny_data_dir, "tokenizer.json")
    path = str(tmp_path / "start.pt")
    M.save_checkpoint(path, tiny_gpt(tiny_enc.n_vocab, seed=7, std=0.1), tok)
    policy, _ = M.load_checkpoint(path, "cpu", tok)
    reference, _ = M.load_checkpoint(path, "cpu", tok)
    reference.requires_grad_(False).eval()
    policy.train()  # no dropout: train mode computes the same numbers
    assert policy.config.dropout == 0.0
    assert next(policy.parameters()).dtype == next(reference.parameters()).dtype == torch.float32
    ids, mask = dpo.collate(examples[:16], pad_id(tiny_enc), "cpu")
    pol = dpo.sequence_logprobs(policy, ids, mask)
    with torch.no_grad():
        ref = dpo.sequence_logprobs(reference, ids, mask)
    loss, rc, rr = dpo.dpo_loss(pol[:16], pol[16:], ref[:16], ref[16:])
    assert torch.equal(rc, torch.zeros(16)) and torch.equal(rr, torch.zeros(16))
    assert loss.item() == pytest.approx(LN2, rel=1e-5)  # the fp32 mean of ln 2, to an ulp or two


# ----------------------------------------------------------------------------------------------
# Data: the scored region, prompt boundaries, truncation, validation, conversational rows


@pytest.mark.parametrize("case", ["missing", "not_json", "missing_field", "empty_chosen", "empty_file",
                                  "not_object"])
def test_main_reports_bad_data_in_one_line_before_building_anything(tmp_path, case):
    path = tmp_path / "pairs.jsonl"
    line = None
    if case == "not_json":
        write_with_bad_line(path, '{"prompt": oops}')
        line = 3
    elif case == "missing_field":
        write_with_bad_line(path, '{"prompt": "Ben?", "rejected": "z"}')
        line = 3
    elif case == "empty_chosen":
        write_with_bad_line(path, '{"prompt": "Ben?", "chosen": "", "rejected": "z"}')
        line = 3
    elif case == "empty_file":
        path.write_text("")
    elif case == "not_object":
        write_with_bad_line(path, "[1]")
        line = 3
    out = tmp_path / "out"  # holds no SFT checkpoint: a run that got past validation would build one
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        dpo.main(["--data", str(path), "--out", str(out), "--device", "cpu"])
    assert time.time() - t0 < 10
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ")
    assert "\n" not in msg and "Traceback" not in msg
    assert str(path) in msg
    if line is not None:
        assert f"{path}:{line}:" in msg
    assert not out.exists()  # nothing was built or written


@pytest.mark.parametrize("flags,message", [
    (["--loss-type", "nope"], "--loss-type 'nope' is unknown"),
    (["--rpo-alpha", "-1"], "--rpo-alpha must be >= 0, got -1.0"),
    (["--loss-type", "simpo", "--rpo-alpha", "1"], "simpo has its own loss"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--beta", "0"], "--beta must be > 0"),
    (["--eval-temperature", "-1"], "--eval-temperature must be >= 0"),
    (["--steps", "-3"], "--steps must be >= 0"),
    (["--epochs", "0"], "leaves nothing to train"),
    (["--lr-schedule", "step"], "--lr-schedule 'step' is unknown; known: linear, cosine, constant"),
    (["--label-noise", "1.5"], "--label-noise is a share"),
    (["--label-smoothing", "0.5"], "--label-smoothing is the assumed share"),
    # flags that would change nothing: cDPO and rDPO at eps 0 are plain DPO; hinge has no eps
    (["--loss-type", "cdpo"], "--loss-type cdpo needs --label-smoothing > 0: with 0 it is plain DPO (sigmoid)"),
    (["--loss-type", "robust"], "--loss-type robust needs --label-smoothing > 0"),
    (["--loss-type", "hinge", "--label-smoothing", "0.1"], "--label-smoothing does nothing with --loss-type hinge; "
                                                           "it enters sigmoid, cdpo, robust, exo_pair, simpo"),
    (["--loss-type", "kto", "--kto-desirable-share", "1.5"], "--kto-desirable-share is a share of the desirable "
                                                              "rows, in [0, 1], got 1.5"),
    (["--kto-desirable-share", "0.5"], "--kto-desirable-share does nothing with --loss-type sigmoid; it enters kto"),
    (["--no-prefix-sharing", "--no-packing"], "--no-packing does nothing with --no-prefix-sharing"),
    (["--loss-type", "kto", "--no-packing"], "--no-packing does nothing with --no-prefix-sharing or --loss-type kto"),
    (["--log-every", "0"], "--log-every must be > 0"),
    (["--grad-clip", "0"], "--grad-clip must be > 0"),  # 0 would zero every update, a negative one reverse it
    (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
    (["--lora-rank", "4", "--lora-targets", "attn,mpl"], "unknown LoRA targets ['mpl']"),
    (["--lora-targets", "attn,foo"], "unknown LoRA targets ['foo']"),  # checked without --lora-rank too
    (["--device", "cuad"], "--device 'cuad': expected auto, cpu, cuda, cuda:N or mps"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA device on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["--eval-problems-file", "{d}/problems.jsonl"], "{d}/problems.jsonl:2: missing field 'answer'"),
    (["--eval-problems-file", "{d}/answers.jsonl"], "{d}/answers.jsonl:1: 'answer' must be an integer"),
    (["--data", "{d}/latin1.jsonl"], "{d}/latin1.jsonl:2: not UTF-8 text"),
    (["--data", "{d}/kto.jsonl"], "{d}/kto.jsonl:1: an unpaired row (prompt, completion, label) in a file of pairs "
                                  "(prompt, chosen, rejected); unpaired rows need --loss-type kto"),
    (["--loss-type", "kto", "--kto-desirable-share", "0.5", "--data", "{d}/kto.jsonl"],
     "{d}/kto.jsonl: --kto-desirable-share thins the desirable rows split from pairs"),
    (["--pairs", "sampled"], "--pairs 'sampled' is unknown; known: file, on-policy"),
    (["--pairs", "on-policy", "--samples-per-prompt", "1"], "--samples-per-prompt must be >= 2"),
    (["--pairs", "on-policy", "--sample-temperature", "0"], "--sample-temperature must be > 0: at 0.0 all 4 replies"),
    (["--rounds", "2"], "--rounds samples each round's pairs from the policy: it needs --pairs on-policy"),
    (["--pairs", "on-policy", "--rounds", "2", "--data", "{d}/problems.jsonl"], "--data holds pairs written "
                                                                                "elsewhere"),
    (["--pairs", "on-policy", "--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--pairs", "on-policy", "--loss-type", "kto"], "--pairs on-policy: the judge labels the pairs"),
    (["--samples-per-prompt", "8"], "--samples-per-prompt and --sample-temperature shape sampled pairs"),
    (["--loss-type", "kto", "--test-data", "{d}/kto.jsonl"], "{d}/kto.jsonl:1: an unpaired row (prompt, completion, "
                                                              "label) in a file of pairs (prompt, chosen, rejected); "
                                                              "held-out rows are pairs, with --loss-type kto too"),
])
def test_main_reports_bad_flags_and_files_in_one_line_before_building_anything(tmp_path, flags, message):
    (tmp_path / "problems.jsonl").write_text('{"prompt": "Ben has 2 cards.", "answer": 2}\n{"prompt": "Ana?"}\n')
    (tmp_path / "answers.jsonl").write_text('{"prompt": "Ben has 2 cards.", "answer": "two"}\n')
    latin1 = '{"prompt": "Zoë"}\n'.encode("latin-1")  # not UTF-8
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + latin1)
    (tmp_path / "kto.jsonl").write_text('{"prompt": "Ben?", "completion": "The answer is 2.", "label": true}\n')
    flags, message = [f.format(d=tmp_path) for f in flags], message.format(d=tmp_path)
    out = tmp_path / "out"  # holds no SFT checkpoint: a run that got past the checks would build one
    with pytest.raises(SystemExit) as e:
        dpo.main(["--device", "cpu", "--out", str(out), *flags])  # the flags under test come last, and win
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg
    assert message in msg, msg
    assert not out.exists()  # nothing was built or written


@pytest.mark.parametrize("flag", ["--init", "--eval-reference"])
def test_a_file_that_is_no_checkpoint_stops_the_run_before_training(tiny_data_dir, tiny_sft_ckpt, tmp_path, flag):
    # --eval-reference is used only after training: it is checked before, like --init
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint\n")
    out = tmp_path / "out"
    checkpoints = {"--init": tiny_sft_ckpt, "--eval-reference": tiny_sft_ckpt, flag: str(bad)}
    argv = ["--data-dir", tiny_data_dir, "--data", tiny_path(tiny_data_dir, "prefs.jsonl"),
            "--test-data", tiny_path(tiny_data_dir, "prefs_test.jsonl"),
            "--eval-problems-file", tiny_path(tiny_data_dir, "test.jsonl"), "--steps", "5", "--batch-size", "4",
            "--eval-problems", "4", "--max-new-tokens", "8", "--out", str(out), "--device", "cpu",
            *[arg for item in checkpoints.items() for arg in item]]
    with pytest.raises(SystemExit) as e:
        dpo.main(argv)
    msg = e.value.code
    assert "\n" not in msg
    assert msg.startswith(f"error: {bad}: not a checkpoint that torch.load(weights_only=True) can read (")
    assert not (out / "dpo" / "log.jsonl").exists() and not (out / "dpo" / "model.pt").exists()


def test_eval_reference_leaves_training_unchanged(tiny_data_dir, tiny_sft_ckpt, tmp_path):
    # an evaluation-only flag must not move training: checking the file early builds a model, and
    # with LoRA the adapters' random init would shift if that happened after the seed was set
    outs = [str(tmp_path / name) for name in ("plain", "with_ref")]
    for out, ref in zip(outs, ["", tiny_sft_ckpt]):
        dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out, steps=3, eval_problems=0, lora_rank=2,
                                  eval_reference=ref))
    plain, with_ref = (torch.load(os.path.join(out, "dpo", "model.pt"), weights_only=True)["model"] for out in outs)
    assert plain.keys() == with_ref.keys() and all(torch.equal(plain[k], with_ref[k]) for k in plain)
    start = torch.load(tiny_sft_ckpt, weights_only=True)["model"]
    assert not all(torch.equal(plain[k], start[k]) for k in plain)  # and training did move the weights


def test_eval_temperature_zero_is_greedy_and_allowed():
    checks.dpo(dpo.DPOConfig(eval_temperature=0.0), dpo.BUILDS)  # the README's T = 0 row: greedy decoding


def test_max_length_beyond_the_models_context_is_refused(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    block = M.load_checkpoint(tiny_sft_ckpt, "cpu", tiny_path(tiny_data_dir, "tokenizer.json"))[0].config.block_size
    with pytest.raises(P.ConfigError, match=f"--max-length {block + 1} is longer than the model's context"):
        dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path), max_length=block + 1))
    assert not (tmp_path / "dpo" / "model.pt").exists()


def test_conversational_rows_give_the_same_ids_as_strings(tiny_enc, tmp_path):
    rows = [GOOD, {"prompt": "Ava has 5 pens. She gives away 2. How many pens?",
                   "chosen": "Step by step:\n5 - 2 = 3.\nThe answer is 3.",
                   "rejected": "Fine.\nThe answer is 3."}]
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    write_jsonl(str(tmp_path / "str.jsonl"), rows)
    write_jsonl(str(tmp_path / "conv.jsonl"), conv)
    a, _ = dpo.tokenize_pairs(tiny_enc, formats.read_pairs(str(tmp_path / "str.jsonl")), 96, 192)
    b, _ = dpo.tokenize_pairs(tiny_enc, formats.read_pairs(str(tmp_path / "conv.jsonl")), 96, 192)
    assert len(a) == len(b) == 2 and a == b
    # TRL's implicit prompt (the replies carry the whole conversation, no "prompt") and the
    # "-trl-style" sets (a "prompt" string, and the whole conversation again in each reply)
    for with_prompt in (False, True):
        whole = [{**({"prompt": r["prompt"]} if with_prompt else {}),
                  **{k: [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[k]}]
                     for k in ("chosen", "rejected")}} for r in rows]
        write_jsonl(str(tmp_path / "whole.jsonl"), whole)
        c, _ = dpo.tokenize_pairs(tiny_enc, formats.read_pairs(str(tmp_path / "whole.jsonl")), 96, 192)
        assert c == a
    # a system turn in a conversational prompt is kept, in the template
    sys_prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": rows[0]["prompt"]}]
    c, _ = dpo.tokenize_pairs(tiny_enc, [(sys_prompt, rows[0]["chosen"], rows[0]["rejected"])], 96, 192)
    assert c[0]["prompt"] == M.render_chat(tiny_enc, sys_prompt, add_generation_prompt=True)[0]
    assert c[0]["prompt"] != a[0]["prompt"] and c[0]["chosen"] == a[0]["chosen"]


# ----------------------------------------------------------------------------------------------
# End to end on a tiny config


def tiny_dpo_config(tiny_data_dir, init, out, **overrides):
    kw = dict(init=init, data_dir=tiny_data_dir, data=tiny_path(tiny_data_dir, "prefs.jsonl"),
              test_data=tiny_path(tiny_data_dir, "prefs_test.jsonl"),
              eval_problems_file=tiny_path(tiny_data_dir, "test.jsonl"), steps=30, batch_size=8,
              lr=1e-3, warmup_steps=5, eval_problems=8, max_new_tokens=16, out=out, device="cpu",
              log_every=5)
    return dpo.DPOConfig(**{**kw, **overrides})


def read_log(out):
    with open(os.path.join(out, "dpo", "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_chosen_nll_is_the_mean_over_chosen_tokens_and_0_when_empty():
    assert dpo.chosen_nll(t([-6.0, -2.0]), t([3, 1])).item() == pytest.approx(2.0)
    assert dpo.chosen_nll(t([]), t([])).item() == 0.0


def test_rpo_run_logs_dpo_loss_plus_alpha_times_the_chosen_nll(tiny_sft_ckpt, tiny_data_dir, tiny_enc, tmp_path):
    # a 4-pair file and a batch of 4: step 0's batch is the whole file, in some order; at step 0 the
    # DPO part is ln 2 exactly, so the logged loss is ln 2 + alpha * NLL of the start model on the
    # file's chosen replies, computed here with a plain forward pass and log_softmax
    with open(tiny_path(tiny_data_dir, "prefs.jsonl")) as f:
        rows = [json.loads(line) for line in f][:4]
    path = tmp_path / "four.jsonl"
    write_jsonl(str(path), rows)
    alpha = 0.7
    out = str(tmp_path / "out")
    dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out, data=str(path), steps=1, batch_size=4,
                              log_every=1, eval_problems=0, rpo_alpha=alpha))
    start, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", tiny_path(tiny_data_dir, "tokenizer.json"))
    start.eval()
    total, tokens = 0.0, 0
    for r in rows:
        reply = M.render_response(tiny_enc, r["chosen"])
        total += reply_logp(start, M.render_prompt(tiny_enc, r["prompt"]), reply)
        tokens += len(reply)
    (rec,) = read_log(out)
    assert rec["nll_loss"] == pytest.approx(-total / tokens, rel=1e-4)
    assert rec["loss"] == pytest.approx(LN2 + alpha * (-total / tokens), rel=1e-4)


def test_tiny_end_to_end_run_raises_held_out_preference_accuracy(tiny_sft_ckpt, tiny_data_dir, tiny_enc,
                                                                 tmp_path):
    # step 0, computed here: the SFT model scored against itself ranks no pair strictly (acc 0)
    tok = tiny_path(tiny_data_dir, "tokenizer.json")
    start, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", tok)
    test_ex, _ = dpo.tokenize_pairs(tiny_enc, formats.read_pairs(tiny_path(tiny_data_dir, "prefs_test.jsonl")),
                                    96, 192)
    rc, rr = dpo.pair_logprobs(start.eval(), test_ex, pad_id(tiny_enc), "cpu")
    acc0, margin0, _ = dpo.preference_accuracy(start, test_ex, rc, rr, 0.1, pad_id(tiny_enc), "cpu")
    assert acc0 == 0.0 and margin0 == 0.0

    out = str(tmp_path)
    metrics = dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out))
    # after: above chance, and above what the start's own likelihood orders (checked below)
    assert metrics["pref_accuracy"] >= 0.6, metrics["pref_accuracy"]
    assert metrics["pref_accuracy"] > metrics["ref_likelihood_accuracy"]
    assert metrics["margin"] > 0
    with open(os.path.join(out, "dpo", "metrics.json")) as f:
        saved = json.load(f)
    for key in ("pref_accuracy", "margin", "win_rate", "judge_score_policy", "judge_score_ref",
                "accuracy_policy", "accuracy_ref", "style_shares_policy", "style_shares_ref", "kl",
                "pairs_per_second", "tokens_per_second", "wall_seconds", "greedy_accuracy_policy",
                "greedy_accuracy_ref", "pref_accuracy_by_kind"):
        assert key in saved, key
    assert saved["pref_accuracy"] == metrics["pref_accuracy"]
    assert 0.0 <= saved["win_rate"] <= 1.0 and saved["pairs_per_second"] > 0
    # the likelihood baseline, brute force: log pi_ref(chosen) > log pi_ref(rejected), one pair at a
    # time, in float64, from the start checkpoint (which training must not have touched)
    test_pairs = formats.read_pairs(tiny_path(tiny_data_dir, "prefs_test.jsonl"))
    answers = [row["answer"] for _, row in formats.read_jsonl(tiny_path(tiny_data_dir, "prefs_test.jsonl"))]
    gaps = [reply_logp(start, ex["prompt"], ex["chosen"]) - reply_logp(start, ex["prompt"], ex["rejected"])
            for ex in test_ex]
    assert min(abs(g) for g in gaps) > 1e-4  # no near-tie that float32 could flip
    assert saved["ref_likelihood_accuracy"] == pytest.approx(sum(g > 0 for g in gaps) / len(gaps))
    by_kind = E.accuracy_by_pair_kind(test_pairs, test_ex, torch.tensor(gaps), answers)
    assert saved["ref_likelihood_accuracy_by_kind"] == {k: {"accuracy": pytest.approx(a), "pairs": n}
                                                        for k, (a, n) in by_kind.items()}
    # the right-against-wrong pairs by style: the trained policy re-scored here, split by hand-checked
    # code; the three relations cover exactly the correct_vs_wrong pairs
    policy, _ = M.load_checkpoint(os.path.join(out, "dpo", "model.pt"), "cpu", tok)
    acc, _, margins = dpo.preference_accuracy(policy, test_ex, rc, rr, 1.0, pad_id(tiny_enc), "cpu")
    assert acc == pytest.approx(saved["pref_accuracy"])
    by_style = saved["pref_accuracy_correct_vs_wrong_by_style"]
    assert by_style == {r: {"accuracy": pytest.approx(a), "pairs": n} for r, (a, n) in
                        E.correct_vs_wrong_by_style(test_pairs, test_ex, margins, answers).items()}
    cvw = saved["pref_accuracy_by_kind"]["correct_vs_wrong"]
    assert sum(v["pairs"] for v in by_style.values()) == cvw["pairs"] > 0
    assert sum(v["accuracy"] * v["pairs"] for v in by_style.values()) == pytest.approx(cvw["accuracy"] * cvw["pairs"])
    log = read_log(out)
    assert [r["step"] for r in log] == [4, 9, 14, 19, 24, 29]
    for rec in log:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                    "rewards/accuracies", "logps/chosen", "logps/rejected", "kl", "grad_norm", "lr"):
            assert key in rec and math.isfinite(rec[key]), key
    assert log[-1]["loss"] < LN2
    # the checkpoint records the tiny tokenizer it was trained with, and loads with it
    model, ckpt = M.load_checkpoint(os.path.join(out, "dpo", "model.pt"), "cpu", tok)
    assert ckpt["stage"] == "dpo" and ckpt["train_config"]["steps"] == 30
    assert model.config == start.config


def test_a_trl_style_conversational_file_trains_like_the_string_file(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    # the same pairs as whole conversations, the form of the "-trl-style" sets: the same losses
    rows = [row for _, row in formats.read_jsonl(tiny_path(tiny_data_dir, "prefs.jsonl"))]
    conv = [{"prompt": r["prompt"], **{k: [{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r[k]}] for k in ("chosen", "rejected")}}
            for r in rows]
    path = tmp_path / "conv.jsonl"
    write_jsonl(str(path), conv)
    losses = []
    for name, data in (("str", tiny_path(tiny_data_dir, "prefs.jsonl")), ("conv", str(path))):
        out = str(tmp_path / name)
        dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out, data=data, steps=3, batch_size=4,
                                  eval_problems=0, log_every=1))
        losses.append([r["loss"] for r in read_log(out)])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_a_missing_sft_checkpoint_is_built_and_announced(tiny_sft_ckpt, tmp_path, monkeypatch, capsys):
    # `python dpo.py` on a fresh clone: no out/sft/model.pt, so sft.train runs first (stubbed here
    # by a copy of the tiny checkpoint), with dpo's --out; a given --init is never rebuilt
    import shutil
    import sft
    calls = []

    def fake_sft_train(config):
        calls.append(config)
        os.makedirs(os.path.join(config.out, "sft"))
        shutil.copy(tiny_sft_ckpt, os.path.join(config.out, "sft", "model.pt"))

    monkeypatch.setattr(sft, "train", fake_sft_train)
    config = dpo.DPOConfig(out=str(tmp_path), device="cpu")
    path = dpo.ensure_init(config)
    assert path == os.path.join(str(tmp_path), "sft", "model.pt") and os.path.exists(path)
    assert len(calls) == 1 and calls[0].out == str(tmp_path) and calls[0].data_dir == config.data_dir
    assert "no SFT checkpoint" in capsys.readouterr().out
    assert dpo.ensure_init(config) == path and len(calls) == 1  # now there: not built again
    assert dpo.ensure_init(dpo.DPOConfig(init=tiny_sft_ckpt, out=str(tmp_path / "x"))) == tiny_sft_ckpt
    assert len(calls) == 1


def test_live_reference_gives_the_same_losses(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    losses = []
    for live in (False, True):
        out = str(tmp_path / ("live" if live else "pre"))
        dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out, steps=3, batch_size=4,
                                  eval_problems=0, log_every=1, live_reference=live))
        losses.append([r["loss"] for r in read_log(out)])
    assert len(losses[0]) == 3
    # the precomputed reference was scored in batches of another shape than the step's: its sums
    # (~-300, 1 fp32 ulp = 3e-5) may round differently, so the losses agree to rounding (train()'s own
    # fp32 tolerance for this gap is 1e-3), while a reference for the wrong rows is off by nats
    assert losses[0][0] == pytest.approx(LN2, abs=1e-3)  # step 0: policy == reference
    # steps 1 and 2 (the policy has moved) are the discriminating ones: the precomputed
    # reference log-probs must be the ones a live reference gives for the same batch
    assert abs(losses[0][2] - LN2) > 1e-3
    assert losses[1] == pytest.approx(losses[0], abs=1e-3)


def test_a_checkpoint_with_dropout_trains_with_dropout_off(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    """DPO turns dropout off: the same weights saved with dropout 0.5 train exactly as with 0 (with it
    on, the step-0 check would find nonzero rewards, and every loss would carry the noise)."""
    tok = tiny_path(tiny_data_dir, "tokenizer.json")
    model, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", tok)
    model.config.dropout = 0.5
    noisy = str(tmp_path / "dropout.pt")
    M.save_checkpoint(noisy, model, tok)
    assert M.load_checkpoint(noisy, "cpu", tok)[0].blocks[0].mlp.dropout.p == 0.5
    losses = []
    for name, init in (("plain", tiny_sft_ckpt), ("noisy", noisy)):
        out = str(tmp_path / name)
        dpo.train(tiny_dpo_config(tiny_data_dir, init, out, steps=3, batch_size=4, eval_problems=0, log_every=1))
        losses.append([r["loss"] for r in read_log(out)])
    assert abs(losses[0][2] - LN2) > 1e-3  # the policy has moved by the last step: a real comparison
    assert losses[1] == losses[0]


def test_data_dir_alone_supplies_tokenizer_and_default_files(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    # --data-dir DIR, with no --data/--test-data/--eval-problems-file: everything comes from DIR
    # (tokenizer included: the tiny SFT checkpoint would be refused under data/'s tokenizer)
    out = str(tmp_path)
    metrics = dpo.train(dpo.DPOConfig(init=tiny_sft_ckpt, data_dir=tiny_data_dir, steps=1, batch_size=4,
                                      eval_problems=2, max_new_tokens=4, out=out, device="cpu"))
    assert metrics["data_counts"]["kept"] == 200 and "win_rate" in metrics  # the tiny prefs.jsonl has 200 rows
    M.load_checkpoint(os.path.join(out, "dpo", "model.pt"), "cpu", tiny_path(tiny_data_dir, "tokenizer.json"))


def test_a_batch_larger_than_the_data_still_trains(tiny_sft_ckpt, tiny_data_dir, tmp_path, capsys):
    # with fewer pairs than --batch-size, the batch shrinks to the data (and says so) rather than
    # popping indices from an epoch that has too few
    with open(tiny_path(tiny_data_dir, "prefs.jsonl")) as f:
        rows = [json.loads(line) for line in f][:3]
    path = tmp_path / "few.jsonl"
    write_jsonl(str(path), rows)
    metrics = dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path / "out"),
                                        data=str(path), steps=2, batch_size=8, eval_problems=0))
    assert metrics["steps"] == 2 and metrics["pairs"] == 3
    assert "only 3 pairs: batch size 8 -> 3" in capsys.readouterr().out


def test_readme_equation_map_points_at_the_right_lines():
    # The README maps each equation to a line of dpo.py ("`code` (l. N"); a line number that
    # drifts after an edit would send the reader to the wrong line.
    import re
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "dpo.py")) as f:
        lines = f.read().splitlines()
    refs = re.findall(r"`([^`]+)` \(l\. (\d+)", readme)
    assert len(refs) >= 6
    for code, n in refs:
        snippet = code.split(" ...")[0]  # "chosen_logratios = ..." names the line's start
        assert snippet in lines[int(n) - 1], (code, n, lines[int(n) - 1])
    (n,) = re.findall(r"the training log computes it in evaluation\.py, at l\. (\d+)", readme)
    with open(os.path.join(ROOT, "evaluation.py")) as f:
        evaluation_lines = f.read().splitlines()
    assert "(margins > 0)" in evaluation_lines[int(n) - 1], (n, evaluation_lines[int(n) - 1])


def test_eval_every_logs_the_held_out_judge_score_of_the_policy_at_that_step(tiny_sft_ckpt, tiny_data_dir,
                                                                              tmp_path):
    from data import world
    out = str(tmp_path)
    dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out, steps=4, log_every=4, eval_every=2,
                              eval_every_problems=6, eval_problems=0))
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 3]  # a line at every evaluation, and at the last step
    assert all("judge_score" in r and "accuracy" in r for r in log)
    # the last one is the saved policy's: sample the same problems with the same seed, judge
    tok = tiny_path(tiny_data_dir, "tokenizer.json")
    policy, _ = M.load_checkpoint(os.path.join(out, "dpo", "model.pt"), "cpu", tok)
    problems = [r for _, r in formats.read_jsonl(tiny_path(tiny_data_dir, "test.jsonl"))][:6]
    replies = M.sample_replies(policy, M.load_tokenizer(tok), [p["prompt"] for p in problems], 16, 1.0, 1337)
    assert log[-1]["judge_score"] == pytest.approx(sum(world.judge(p, r) for p, r in zip(problems, replies)) / 6)


def test_a_short_run_scores_only_the_pairs_it_trains_on(tiny_data_dir, tiny_sft_ckpt, tmp_path, capsys):
    # --steps 3 x 4 pairs meets 12 pairs: the reference pass scores those 12, not the whole file, and
    # training is exactly that of a run given those 12 (the same first 12 after the same shuffle)
    runs = {}
    for name, extra in [("short", {}), ("twelve", {"max_pairs": 12})]:
        out = str(tmp_path / name)
        metrics = dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out, steps=3, batch_size=4,
                                            eval_problems=0, **extra))
        runs[name] = (metrics, torch.load(os.path.join(out, "dpo", "model.pt"), weights_only=True)["model"])
    assert "training on the first 12 pairs" in capsys.readouterr().out
    (short, short_w), (twelve, twelve_w) = runs["short"], runs["twelve"]
    assert short["pairs"] == twelve["pairs"] == 12
    assert all(torch.equal(short_w[k], twelve_w[k]) for k in short_w)
    assert short["pref_accuracy"] == twelve["pref_accuracy"]


# ----------------------------------------------------------------------------------------------
# Prefix sharing: one row per pair, the prompt computed once


def shared_examples(enc):
    pairs = [("Ben has 3 cards. He gets 2 more cards. How many cards does Ben have now?",
              "Step by step:\n3 + 2 = 5.\nThe answer is 5.", "The answer is 6."),
             ("Ana has 7 pens.", "7", "Ugh. Obviously the answer is 7, count them yourself."),
             ("Why?", "Because.", "Because!"), ("Who?", "Ana.", "Ben!")]  # "Who?" packs beside "Ana has 7 pens."
    examples, _ = dpo.tokenize_pairs(enc, pairs, 96, 192)
    cut, counts = dpo.tokenize_pairs(enc, pairs[:1], 96, 24)  # a pair whose replies are cut at --max-length
    assert counts["response_truncated"] == 1
    return examples + cut


def test_shared_prefix_logprobs_equal_a_row_per_reply_values_and_gradients(tiny_enc):
    model = tiny_gpt(tiny_enc.n_vocab, seed=5, std=0.3)
    examples = shared_examples(tiny_enc)
    assert any(len(ex["chosen"]) == 2 for ex in examples)  # "7" and its <|end|>: a reply of one text token
    for average in (False, True):
        grads = []
        for layout in ("rows", "shared", "packed, one pass", "packed"):
            model.zero_grad()
            if layout == "rows":
                logps = dpo.sequence_logprobs(model, *dpo.collate(examples, 0, "cpu"), average=average)
            else:
                batch = dpo.shared_prefix_batch(examples, 0, "cpu", packed=layout != "shared", split=layout == "packed")
                rows = [len(p["ids"]) for p in batch["passes"]]  # a row per pair, or fewer: packed
                assert len(rows) == (2 if layout == "packed" else 1)
                assert sum(rows) == len(examples) if layout == "shared" else sum(rows) < len(examples)
                logps = dpo.shared_prefix_logprobs(model, batch, average)
            logps.sum().backward()
            grads.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
        (rows, rows_grads), *shared_layouts = grads
        for shared, shared_grads in shared_layouts:
            # two routes (a masked attention over one row, a causal one over two) round differently:
            # a gradient entry near 0 is held to the rounding of the tensor's largest ones
            assert torch.allclose(shared, rows, rtol=1e-5, atol=1e-5)
            assert all(torch.allclose(a, b, rtol=1e-4, atol=5e-6 * max(1.0, b.abs().max().item()))
                       for a, b in zip(shared_grads, rows_grads))


def test_a_shared_row_hides_each_reply_from_the_other(tiny_enc):
    # changing the chosen reply leaves the rejected one's log-prob as it was, and the other way round
    model = tiny_gpt(tiny_enc.n_vocab, seed=6, std=0.3)
    ex = shared_examples(tiny_enc)[0]
    other = dict(ex, chosen=list(reversed(ex["chosen"])))
    a = dpo.shared_prefix_logprobs(model, dpo.shared_prefix_batch([ex], 0, "cpu"))
    b = dpo.shared_prefix_logprobs(model, dpo.shared_prefix_batch([other], 0, "cpu"))
    assert a[1].item() == pytest.approx(b[1].item(), rel=1e-6, abs=1e-6) and a[0] != b[0]
    (row,) = dpo.shared_prefix_batch([ex], 0, "cpu")["passes"]
    n_p, n_c = len(ex["prompt"]), len(ex["chosen"])
    assert row["positions"][0, n_p + n_c].item() == n_p  # the rejected reply restarts after the prompt
    assert not row["mask"][0, 0, n_p + n_c:, n_p: n_p + n_c].any()


def test_prefix_sharing_trains_as_a_row_per_reply_does(tiny_data_dir, tiny_sft_ckpt, tmp_path):
    logs = []
    for shared in (False, True):
        out = str(tmp_path / str(shared))
        dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out, steps=4, log_every=1, eval_problems=0,
                                  prefix_sharing=shared))
        with open(os.path.join(out, "dpo", "log.jsonl")) as f:
            logs.append([json.loads(line) for line in f])
    for rows, shared in zip(*logs):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert shared[key] == pytest.approx(rows[key], rel=1e-3, abs=1e-4), key
        assert shared["tokens_per_second"] > 0 and 0 < shared["scored_share"] <= 1
    assert dpo.row_layout(dpo.DPOConfig()) == {"shared": True, "kto": False, "packed": True}
    assert dpo.row_layout(dpo.DPOConfig(prefix_sharing=False)) == {"shared": False, "kto": False, "packed": True}
    assert dpo.row_layout(dpo.DPOConfig(packing=False)) == {"shared": True, "kto": False, "packed": False}
    # KTO's replies answer two prompts: a row each, the mismatched ones without a graph
    assert dpo.row_layout(dpo.DPOConfig(loss_type="kto")) == {"shared": False, "kto": True, "packed": True}


# ----------------------------------------------------------------------------------------------
# On-policy pairs and online DPO


def test_on_policy_run_trains_on_the_start_models_own_judged_replies(tiny_sft_ckpt, tiny_data_dir, tiny_enc,
                                                                    tmp_path):
    out = str(tmp_path / "a")
    kw = dict(init=tiny_sft_ckpt, data_dir=tiny_data_dir, pairs="on-policy", max_pairs=12, batch_size=4,
              samples_per_prompt=3, max_new_tokens=16, eval_problems=0, log_every=1, warmup_steps=1, device="cpu",
              report=False)
    metrics = dpo.train(dpo.DPOConfig(out=out, **kw))
    path = os.path.join(out, "dpo", "pairs_round1.jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert metrics["pairs"] == len(rows) == 12 and metrics["steps"] == 3
    s = metrics["sampling"]
    assert s["rounds"] == 1 and s["samples"] == 3 * s["used"] and s["used"] >= 12 and s["samples_per_second"] > 0
    # each pair is two of the start model's own samples for its prompt, the judge's best above its worst
    problems = {p["prompt"]: p for p in formats.read_problems(os.path.join(tiny_data_dir, "prefs.jsonl"))}
    from data import world
    for row in rows:
        assert world.judge(problems[row["prompt"]], row["chosen"]) > world.judge(problems[row["prompt"]],
                                                                                 row["rejected"])
    # the file is a TRL-format pair file: --data reads it, and trains on it as on the sampled run
    again = dpo.train(dpo.DPOConfig(out=str(tmp_path / "b"), data=path, **{**kw, "pairs": "file",
                                                                           "samples_per_prompt": 4}))
    assert again["pairs"] == metrics["pairs"] and again["data_counts"] == metrics["data_counts"]
    logs = [[json.loads(line)["loss"] for line in open(os.path.join(d, "dpo", "log.jsonl"))] for d in (out, tmp_path / "b")]
    assert logs[1] == pytest.approx(logs[0], rel=1e-6, abs=1e-7) and len(logs[0]) == 3
    # seeded: the same run samples the same pairs
    dpo.train(dpo.DPOConfig(out=str(tmp_path / "c"), **kw))
    assert open(os.path.join(tmp_path, "c", "dpo", "pairs_round1.jsonl")).read() == open(path).read()


def test_online_rounds_sample_from_the_current_policy_against_the_frozen_start(tiny_sft_ckpt, tiny_data_dir,
                                                                              tmp_path, monkeypatch):
    import online
    seen, scored = [], []
    real_sample, real_logprobs = online.sample_pairs, dpo.pair_logprobs

    def spy_sample(model, *args):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_sample(model, *args)

    def spy_logprobs(model, *args, **kw):
        scored.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_logprobs(model, *args, **kw)

    monkeypatch.setattr(online, "sample_pairs", spy_sample)
    monkeypatch.setattr(dpo, "pair_logprobs", spy_logprobs)
    out = str(tmp_path)
    metrics = dpo.train(dpo.DPOConfig(init=tiny_sft_ckpt, data_dir=tiny_data_dir, pairs="on-policy", rounds=2,
                                      max_pairs=16, batch_size=4, samples_per_prompt=2, max_new_tokens=16,
                                      bucket_by_length=True,  # bucketed anew in each round
                                      lr=1e-3, eval_problems=0, log_every=1, warmup_steps=1, out=out, device="cpu",
                                      report=False))
    start = M.load_checkpoint(tiny_sft_ckpt, "cpu", os.path.join(tiny_data_dir, "tokenizer.json"))[0].state_dict()
    assert len(seen) == 2 and metrics["sampling"]["rounds"] == 2 and metrics["steps"] == 4
    assert all(torch.equal(seen[0][k], start[k]) for k in start)  # round 1: the start model's samples
    assert any(not torch.equal(seen[1][k], start[k]) for k in start)  # round 2: the trained policy's
    # every reference pass, round 2's included, is the frozen start's
    assert scored and all(all(torch.equal(w[k], start[k]) for k in start) for w in scored[:-1])
    r1, r2 = (open(os.path.join(out, "dpo", f"pairs_round{r}.jsonl")).read() for r in (1, 2))
    assert r1 != r2 and not set(json.loads(x)["prompt"] for x in r1.splitlines()) & set(
        json.loads(x)["prompt"] for x in r2.splitlines())  # each round its own prompts


def test_bucketed_batches_pad_less_and_train_on_the_same_pairs(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    kw = dict(init=tiny_sft_ckpt, data_dir=tiny_data_dir, steps=6, batch_size=8, max_pairs=48, eval_problems=0,
              log_every=1, warmup_steps=1, device="cpu", report=False)
    plain = dpo.train(dpo.DPOConfig(out=str(tmp_path / "plain"), **kw))
    bucketed = dpo.train(dpo.DPOConfig(out=str(tmp_path / "bucketed"), bucket_by_length=True, **kw))
    assert bucketed["pairs"] == plain["pairs"] == 48 and bucketed["steps"] == plain["steps"]
    # the same scored tokens (each pair once in the 6 x 8), fewer positions through the model
    assert bucketed["scored_share"] > plain["scored_share"]
