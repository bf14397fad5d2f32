"""
The DPO family: the paired preference losses of TRL's DPOTrainer (same names, same formulas), and
three relatives that want something other than a pair of log-ratios: SimPO (no reference model),
ORPO's odds-ratio term (no reference model; added to an SFT loss) and KTO (unpaired replies, each
labelled good or bad on its own).

Every function is pure: log-probs in (summed over response tokens, as everywhere in this project;
an `avg` name means divided by the response length), per-example losses and detached diagnostics
out. dpo.py imports this file (never the reverse): dpo.dpo_loss computes plain DPO (eq. 7) itself
and hands every other loss_type to paired_losses; dpo.simpo_loss, dpo.odds_ratio_loss and
dpo.kto_loss are the functions below.

Notation: a = log pi(y_w|x)/pi_ref(y_w|x), b = the same for y_l, z = a - b (DPO's margin),
s = sigmoid, eps = label_smoothing, n_w, n_l = response lengths in tokens.

  sigmoid       -(1-eps) log s(beta z) - eps log s(-beta z)          DPO (Rafailov et al. 2023)
  cdpo          the same: each label flipped with probability eps    cDPO (Mitchell 2023)
  robust        ((1-eps)(-log s(beta z)) + eps log s(-beta z)) / (1-2 eps)   rDPO (Chowdhury et al. 2024)
  hinge         relu(1 - beta z)                                     SLiC (Zhao et al. 2023)
  ipo           (a/n_w - b/n_l - 1/(2 beta))^2                       IPO (Azar et al. 2023, eq. 17)
  sigmoid_norm  -log s(beta (a/n_w - b/n_l))                         DPO on per-token averages
  exo_pair      KL( softmax(beta [a, b]) || [1-eps, eps] )           EXO (Ji et al. 2024, eq. 16)
  nca_pair      -log s(beta a) - log s(-beta a)/2 - log s(-beta b)/2 NCA (Chen et al. 2024)
  bco_pair      -log s(beta a - delta) - log s(delta - beta b)       BCO (Jung et al. 2024), delta = 0 as TRL
  sppo_hard     (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2              SPPO (Wu et al. 2024), hard labels
  apo_zero      1 - s(beta a) + s(beta b)                            APO (D'Oosterlinck et al. 2024, eq. 7)
  apo_down      s(beta a) + 1 - s(beta z)                            APO (eq. 8)
  discopop      (1-m)(-log s(beta z)) + m exp(-beta z),              DiscoPOP (Chan et al. 2024, eq. 5)
                  m = s(beta z / 0.05)
  SimPO         -log s(beta (avg_w - avg_l) - gamma), no reference   SimPO (Meng et al. 2024)
  ORPO's term   -lam log s(log odds(y_w) - log odds(y_l)), odds = p/(1-p) of avg   ORPO (Hong et al. 2024)
  KTO           1 - s(beta (a - z0)) for a good reply, 1 - s(beta (z0 - b)) for a bad one, z0 = KL
                estimate on mismatched pairs                         KTO (Ethayarajh et al. 2024, eq. 8)

Run one with dpo.py:

    python dpo.py --loss-type ipo
    python dpo.py --loss-type robust --label-smoothing 0.1      (cdpo and robust need eps > 0)
    python dpo.py --loss-type simpo [--simpo-beta 2 --simpo-gamma 0.5]
    python dpo.py --loss-type orpo [--orpo-lambda 0.1]
    python dpo.py --loss-type kto [--kto-desirable-weight 1 --kto-undesirable-weight 1]

How this departs from TRL:
1. cdpo is a name of its own here; TRL spells it sigmoid with label_smoothing > 0 (both work).
2. bco_pair: TRL computes it with no reward shift (delta = 0), and so does the default here. The
   BCO paper shifts the rewards by delta, the mean reward seen so far; --bco-reward-shift batch-mean
   takes this batch's mean instead of a running one (a pure function keeps no state).
3. ipo averages each log-ratio over its response tokens, as TRL does; the IPO paper writes sums.
4. discopop's tau is fixed at TRL's default, 0.05, and its exponential term is computed as
   exp(log m - beta z), finite where m * exp(-beta z) overflows.
5. ORPO's term is returned as a loss, per example (TRL returns its negative, and subtracts it).
6. TRL's aot, aot_pair and sft loss types are left out.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plumbing import option, require

PAIRED_LOSS_TYPES = ["sigmoid", "cdpo", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair",
                     "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop"]
DISCOPOP_TAU = 0.05  # TRL's default discopop_tau
REFERENCE_FREE = ["simpo", "orpo"]  # no reference model: one model in memory, no reference pass
BCO_REWARD_SHIFTS = ("none", "batch-mean")
LABEL_SMOOTHED = ["sigmoid", "cdpo", "robust", "exo_pair", "simpo"]  # the losses label_smoothing enters


@dataclass
class FamilyOptions:
    """The family's flags (dpo.DPOConfig inherits them; check_family_flags checks them)."""
    label_smoothing: float = option(0.0, "eps: the assumed share of wrong labels, for " + ", ".join(LABEL_SMOOTHED)
                                    + " (cdpo and robust need eps > 0; sigmoid with eps > 0 is cdpo)", "family")
    rpo_alpha: float = option(0.0, "RPO: add alpha * the chosen replies' NLL per token to the paired loss", "family")
    simpo_beta: float = option(2.0, "SimPO's beta (its reward is beta * per-token average log-prob)", "family")
    simpo_gamma: float = option(0.5, "SimPO's target reward margin gamma", "family")
    orpo_lambda: float = option(0.1, "ORPO's weight lambda of the odds-ratio term beside the SFT loss", "family")
    kto_desirable_weight: float = option(1.0, "KTO's weight on desirable (good) replies", "family")
    kto_undesirable_weight: float = option(1.0, "KTO's weight on undesirable (bad) replies", "family")
    bco_reward_shift: str = option("none", "bco_pair's reward shift delta: none (TRL) or batch-mean (the BCO "
                                   "paper's mean reward, over the batch)", "family")
    kto_desirable_share: float = option(1.0, "KTO on pairs: keep only this share of the desirable rows "
                                        "(imbalanced data: then raise --kto-desirable-weight)", "family")


def per_token(logratios, lengths, loss_type):
    """A summed log-ratio divided by its response length (clamped at 1 token, as TRL does)."""
    if lengths is None:
        raise ValueError(f"loss_type {loss_type!r} averages over response tokens: "
                         f"pass chosen_lengths and rejected_lengths")
    return logratios / torch.as_tensor(lengths, dtype=logratios.dtype, device=logratios.device).clamp(min=1)


def paired_losses(loss_type, chosen_logratios, rejected_logratios, beta, label_smoothing=0.0,
                  chosen_lengths=None, rejected_lengths=None, delta=None):
    """Per-example loss of one paired DPO-family variant (formulas: the table above, and each on
    its own line below), a function of the two log-ratios a, b and the margin z = a - b.
    Shape: chosen_logratios (B,)    a = log pi(y_w|x) - log pi_ref(y_w|x), summed over tokens
    Shape: rejected_logratios (B,)  b = log pi(y_l|x) - log pi_ref(y_l|x)
    Shape: chosen_lengths (B,)      response tokens of y_w (only ipo and sigmoid_norm use them)
    Shape: rejected_lengths (B,)    response tokens of y_l
    Shape: delta ()                 bco_pair's reward shift (default 0, as TRL; see bco_reward_shift)
    Returns losses (B,)."""
    a, b, eps = chosen_logratios, rejected_logratios, label_smoothing
    # z = a - b: the reference's beta log Z(x) has cancelled, as in DPO. The losses that use a or b
    # alone (nca_pair, bco_pair, sppo_hard, apo_*) treat beta a as an absolute reward, in which it does
    # not cancel; BCO's delta (and KTO's z0, below) stand in for that missing baseline
    z = a - b
    if loss_type in ("sigmoid", "cdpo"):  # cDPO: the expected DPO loss when a label is wrong w.p. eps
        return -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    if loss_type == "robust":  # rDPO: unbiased under flips w.p. eps, hence the division
        if not 0 <= eps < 0.5:
            raise ValueError(f"loss_type 'robust' needs 0 <= label_smoothing < 0.5, got {eps}")
        return ((1 - eps) * -F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
    if loss_type == "hinge":  # SLiC: relu(1 - beta z)
        return torch.relu(1 - beta * z)
    if loss_type == "ipo":  # IPO eq. 17 on per-token averages (as TRL, confirmed with IPO's authors)
        z_avg = per_token(a, chosen_lengths, loss_type) - per_token(b, rejected_lengths, loss_type)
        return (z_avg - 1 / (2 * beta)) ** 2  # squared: the margin has a target, it cannot run off
    if loss_type == "sigmoid_norm":  # eq. 7 on per-token averages: length no longer buys margin
        z_avg = per_token(a, chosen_lengths, loss_type) - per_token(b, rejected_lengths, loss_type)
        return -F.logsigmoid(beta * z_avg)
    if loss_type == "exo_pair":  # EXO eq. 16: reverse KL from the model's to the smoothed labels
        eps = eps or 1e-3  # as TRL: eps = 0 would put log 0 in the target
        return (torch.sigmoid(beta * z) * (F.logsigmoid(beta * z) - math.log(1 - eps))
                + torch.sigmoid(-beta * z) * (F.logsigmoid(-beta * z) - math.log(eps)))
    if loss_type == "nca_pair":  # NCA: absolute rewards, so y_w's likelihood is pushed up, not only the gap
        return -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
    if loss_type == "bco_pair":  # BCO: y_w classified above the shift delta, y_l below it
        delta = 0.0 if delta is None else delta
        return -F.logsigmoid(beta * a - delta) - F.logsigmoid(-(beta * b - delta))
    if loss_type == "sppo_hard":  # SPPO with P(y_w > y_l) = 1: a -> +1/(2 beta), b -> -1/(2 beta)
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "apo_zero":  # APO-zero eq. 7: y_w better than the model's own replies: a up, b down
        return torch.sigmoid(-beta * a) + torch.sigmoid(beta * b)  # = 1 - s(beta a) + s(beta b)
    if loss_type == "apo_down":  # APO-down eq. 8: y_w worse than the model's: a down, b down more
        return torch.sigmoid(beta * a) + torch.sigmoid(-beta * z)  # = s(beta a) + 1 - s(beta z)
    if loss_type == "discopop":  # DiscoPOP eq. 5: logistic for z < 0, exponential for z > 0
        m = torch.sigmoid(beta * z / DISCOPOP_TAU)
        # m exp(-beta z) as exp(log m - beta z): equal, but finite where exp(-beta z) alone overflows
        return (1 - m) * -F.logsigmoid(beta * z) + torch.exp(F.logsigmoid(beta * z / DISCOPOP_TAU) - beta * z)
    raise ValueError(f"unknown loss_type {loss_type!r}; known: {', '.join(PAIRED_LOSS_TYPES)}")


def bco_reward_shift(chosen_logratios, rejected_logratios, beta):
    """The BCO paper's reward shift delta, the mean reward, here over this batch's 2B rewards beta a and
    beta b (detached: a baseline, not a target). -> a scalar tensor for paired_losses(delta=)."""
    return torch.cat([beta * chosen_logratios, beta * rejected_logratios]).mean().detach()


def simpo_loss(chosen_avg_logps, rejected_avg_logps, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """SimPO (Meng et al. 2024): reference-free; the reward is beta * the per-token average log-prob,
    and the chosen reward must beat the rejected one by a margin gamma:
        L = -log sigmoid(beta * (avg_w - avg_l) - gamma)
    (TRL's CPOTrainer writes beta * (avg_w - avg_l - gamma / beta): the same number.)
    With label_smoothing eps, cDPO's mix of both labels (as TRL).
    Shape: chosen_avg_logps (B,)    log pi(y_w|x) / |y_w|
    Shape: rejected_avg_logps (B,)  log pi(y_l|x) / |y_l|
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards detached."""
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma  # gamma: the target reward margin
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, (beta * chosen_avg_logps).detach(), (beta * rejected_avg_logps).detach()


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012): log(-expm1(x)) near 0, where
    1 - exp(x) cancels; log1p(-exp(x)) below -ln 2. Each branch sees only its own safe inputs, so
    the branch torch.where discards cannot send an inf or NaN gradient back."""
    x = x.clamp(max=-1e-20)  # avg log-prob exactly 0 (p = 1 in fp32): odds would be infinite
    near_zero = x > -math.log(2)
    return torch.where(near_zero, torch.log(-torch.expm1(x.clamp(min=-math.log(2)))),
                       torch.log1p(-torch.exp(x.clamp(max=-math.log(2)))))


def odds_ratio_loss(chosen_avg_logps, rejected_avg_logps, lam=0.1):
    """ORPO's odds-ratio term (Hong et al. 2024), added by ORPO to the SFT loss on y_w; with
    p = exp(avg logp), odds(y|x) = p / (1 - p):
        log_odds = (avg_w - avg_l) - (log(1 - exp(avg_w)) - log(1 - exp(avg_l)))
        L_OR = -lam * log sigmoid(log_odds)            per example; ORPO adds its batch mean
    (TRL's function of the same name returns +lam * log sigmoid(log_odds) and its trainer subtracts
    the mean; here the term is a loss like every other, and is added.)
    Shape: chosen_avg_logps (B,)    log pi(y_w|x) / |y_w|, < 0
    Shape: rejected_avg_logps (B,)  log pi(y_l|x) / |y_l|, < 0
    Returns (losses (B,), log_odds (B,) detached)."""
    log_odds = ((chosen_avg_logps - rejected_avg_logps)
                - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps)))  # log odds(y_w) / odds(y_l)
    return -lam * F.logsigmoid(log_odds), log_odds.detach()


def kto_loss(policy_desirable_logps, policy_undesirable_logps, ref_desirable_logps, ref_undesirable_logps,
             policy_kl_logps, ref_kl_logps, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024, eq. 8) as TRL's KTOTrainer: each reply is judged against a
    reference point z0, an estimate of KL(pi || pi_ref) on mismatched (prompt, completion) pairs:
        z0 = max(0, mean(policy_kl_logps - ref_kl_logps)), detached
        L(desirable y)   = desirable_weight   * (1 - sigmoid(beta * (log pi/pi_ref(y) - z0)))
        L(undesirable y) = undesirable_weight * (1 - sigmoid(beta * (z0 - log pi/pi_ref(y))))
    Shape: policy_desirable_logps (N_d,)    log pi(y|x) of the good replies (N_d may be 0)
    Shape: policy_undesirable_logps (N_u,)  log pi(y|x) of the bad replies (N_u may be 0)
    Shape: ref_desirable_logps (N_d,)       log pi_ref(y|x) of the good replies
    Shape: ref_undesirable_logps (N_u,)     log pi_ref(y|x) of the bad replies
    Shape: policy_kl_logps (M,)             log pi(y'|x) for completions y' of other prompts
    Shape: ref_kl_logps (M,)                log pi_ref(y'|x)
    Returns (losses (N_d + N_u,), desirable_rewards (N_d,), undesirable_rewards (N_u,), kl ()),
    the rewards beta * log pi/pi_ref, detached."""
    # detached, as in the paper: z0 only sets the point of comparison; its gradient would be noise
    kl = (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()  # a KL is >= 0: clamp the estimate
    desirable = policy_desirable_logps - ref_desirable_logps
    undesirable = policy_undesirable_logps - ref_undesirable_logps
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (desirable - kl))),  # gain above z0
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - undesirable)))])  # loss below z0
    return losses, (beta * desirable).detach(), (beta * undesirable).detach(), kl


def kto_examples(rows, rng, desirable_share=1.0):
    """KTO's training rows: (prompt, completion, mismatched completion, label).
    rows: (prompt, completion, label), e.g. TRL's unpaired file; or pairs (prompt, chosen, rejected),
    split into a desirable row (chosen) and an undesirable one (rejected), keeping only a share
    desirable_share of the desirable rows (imbalanced data, where the weights matter).
    The mismatched completion is the previous row's (after a shuffle), as TRL builds its KL rows:
    pi and pi_ref scored on a reply to another prompt estimate the reference point z0."""
    if rows and len(rows[0]) == 3 and isinstance(rows[0][2], str):  # pairs: split them
        good = [(p, c, True) for p, c, _ in rows]
        bad = [(p, r, False) for p, _, r in rows]
        rows = rng.sample(good, round(desirable_share * len(good))) + bad
    rows = list(rows)
    rng.shuffle(rows)
    return [(p, c, rows[i - 1][1], label) for i, (p, c, label) in enumerate(rows)]


def kto_rows(pairs, unpaired, rng, desirable_share=1.0):
    """KTO's training rows from a file's rows (see kto_examples), saying how many of each; a pair
    with one reply twice is neither desirable nor undesirable, and is dropped."""
    kept = pairs if unpaired else [(p, c, r) for p, c, r in pairs if c != r]
    rows = kto_examples(kept, rng, desirable_share)
    n_good = sum(row[3] for row in rows)
    print(f"dpo: kto: {n_good} desirable and {len(rows) - n_good} undesirable rows ({len(pairs) - len(kept)} "
          f"pairs with one reply twice dropped)")
    return rows


def chosen_nll(policy_chosen_logps, chosen_lengths):
    """The SFT loss on the chosen replies, one mean over all their tokens (as TRL; the RPO paper
    averages per reply first): NLL = -sum log pi(y_w|x) / sum |y_w|  (negate: NLL = -logp).
    Shape: policy_chosen_logps (B,)  log pi(y_w|x), summed over response tokens
    Shape: chosen_lengths (B,)       response tokens of y_w
    Returns a scalar; an empty mask gives 0, not NaN."""
    return -policy_chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)


def family_loss(config, logps, lengths, ref_logps, labels):
    """SimPO, ORPO and KTO on one batch of 2B rows, as dpo.batch_loss lays it out (its docstring
    gives the shapes). -> (loss, first rewards, second rewards), rewards detached."""
    B = len(logps) // 2
    if config.loss_type == "simpo":
        avg = logps / lengths.clamp(min=1)  # SimPO's reward is the per-token average, scaled by beta
        losses, chosen_rewards, rejected_rewards = simpo_loss(avg[:B], avg[B:], config.simpo_beta,
                                                              config.simpo_gamma, config.label_smoothing)
        return losses.mean(), chosen_rewards, rejected_rewards
    if config.loss_type == "orpo":  # one stage: SFT on the chosen reply + lambda * odds-ratio term
        avg = logps / lengths.clamp(min=1)
        odds_losses, _ = odds_ratio_loss(avg[:B], avg[B:], config.orpo_lambda)
        loss = chosen_nll(logps[:B], lengths[:B]) + odds_losses.mean()
        return loss, (config.orpo_lambda * avg[:B]).detach(), (config.orpo_lambda * avg[B:]).detach()
    good = labels  # kto
    losses, desirable_rewards, undesirable_rewards, _ = kto_loss(
        logps[:B][good], logps[:B][~good], ref_logps[:B][good], ref_logps[:B][~good],
        logps[B:], ref_logps[B:], config.beta, config.kto_desirable_weight, config.kto_undesirable_weight)
    return losses.mean(), desirable_rewards, undesirable_rewards


def check_family_flags(config):
    """The family's flags, checked before anything is built (ConfigError): a known --loss-type, and
    no flag that changes nothing with it (that would let a run pass for what it is not)."""
    known = PAIRED_LOSS_TYPES + REFERENCE_FREE + ["kto"]
    require(config.loss_type in known, f"--loss-type {config.loss_type!r} is unknown; known: {', '.join(known)}")
    require(not config.rpo_alpha or config.loss_type in PAIRED_LOSS_TYPES, f"--rpo-alpha adds an NLL term to the "
            f"paired losses; {config.loss_type} has its own loss (orpo already includes the NLL): use --rpo-alpha 0")
    require(0 <= config.label_smoothing < 0.5, f"--label-smoothing is the assumed share of wrong labels, in "
            f"[0, 0.5), got {config.label_smoothing}")
    require(config.label_smoothing > 0 or config.loss_type not in ("cdpo", "robust"), f"--loss-type "
            f"{config.loss_type} needs --label-smoothing > 0: with 0 it is plain DPO (sigmoid)")
    require(config.label_smoothing == 0 or config.loss_type in LABEL_SMOOTHED, f"--label-smoothing does nothing "
            f"with --loss-type {config.loss_type}; it enters {', '.join(LABEL_SMOOTHED)}")
    require(0 <= config.kto_desirable_share <= 1, f"--kto-desirable-share is a share of the desirable rows, "
            f"in [0, 1], got {config.kto_desirable_share}")
    require(config.kto_desirable_share == 1 or config.loss_type == "kto", f"--kto-desirable-share does "
            f"nothing with --loss-type {config.loss_type}; it enters kto")
    require(config.bco_reward_shift in BCO_REWARD_SHIFTS, f"--bco-reward-shift {config.bco_reward_shift!r} is "
            f"unknown; known: {', '.join(BCO_REWARD_SHIFTS)}")
    require(config.bco_reward_shift == "none" or config.loss_type == "bco_pair", f"--bco-reward-shift does "
            f"nothing with --loss-type {config.loss_type}; it enters bco_pair")


def unsplittable(config):
    """Why a dpo.py run cannot be split across processes or micro-batches (distributed.py; None: it
    can). A paired loss is a mean over the batch's pairs, so the micro-batches' means, weighted, add
    up to it; these are not (and on-policy sampling runs in one process)."""
    if config.loss_type in ("kto", "simpo", "orpo"):
        return f"--loss-type {config.loss_type} (dpo_family.py: not a mean of paired terms over the batch)"
    if config.rpo_alpha:
        return "--rpo-alpha (its NLL is one mean over all the batch's chosen tokens)"
    if config.bco_reward_shift == "batch-mean":
        return "--bco-reward-shift batch-mean (a shift estimated on the whole batch)"
    if config.pairs == "on-policy":
        return "--pairs on-policy (its sampling runs in one process)"
    return None
