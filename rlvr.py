"""
Reinforcement learning with verifiable rewards, GRPO-style (Shao et al. 2024, arXiv 2402.03300):
the policy samples G replies to each prompt, a program checks each final answer, and the policy
is pushed toward the replies that scored above their group's average. The lesson after DPO: the
same KL anchor to a frozen reference and the same per-token log-ratios, but the signal now comes
from the policy's own samples, online, instead of a fixed set of pairs.

    python rlvr.py                 (builds data, SFT and DPO if missing, then RL)
    python rlvr.py --init out/sft/model.pt --steps 40 --kl-coef 0
    python rlvr.py --data my_problems.jsonl        (rows {"prompt": ..., "answer": <integer>})
    python rlvr.py --resume        (a cut run goes on, in whichever stage was cut: docs/scale.md)
    python rlvr.py --help

The objective, in the GRPO paper's notation (q a prompt, o_1..o_G the replies sampled for it from
the policy as it was at sampling time, pi_old; |o_i| the reply's length in tokens):

  reward          r_i = 1 if the verifier accepts o_i's final answer, else 0
  advantage       A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)       (Dr. GRPO: no division)
  ratio           rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})
  clipped term    min( rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps, 1 + eps) A_i )        (PPO)
  KL to pi_ref    D_{i,t} = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1                (eq. 4)
  J(theta) = E_q [ 1/G sum_i 1/|o_i| sum_t ( clipped term - beta_KL * D_{i,t} ) ]    (eq. 3)

and we minimise -J. D is Schulman's k3 estimator: >= 0, and on the policy's own samples an unbiased
estimate of the value KL(pi_theta || pi_ref). As a loss on those samples, though, its expected
gradient is that of KL(pi_ref || pi_theta), the other direction; GRPO uses it so, and so do we. Every reply token is scored: the mask is 1 on the reply's tokens (its <|end|>
included) and 0 on prompt and padding, the convention sequence_logprobs in dpo.py uses, built on
the same model.shifted_logprobs.

How this departs from the GRPO paper:
1. The aggregation is a token-level mean over the whole batch (DAPO, Dr. GRPO):
   J = 1/(scored tokens of the step) * sum over every scored reply i and token t of its term,
   so each token weighs the same and long replies are not down-weighted; --aggregation sequence
   gives the paper's per-reply mean, then the mean over the step's scored replies.
2. Groups whose replies all scored the same (all right or all wrong) have zero advantage: they
   are counted and left out of the loss entirely, its normaliser and their KL term included (in
   the paper the KL term still acts on them). The batch is not refilled with other prompts, as
   DAPO's dynamic sampling does; --mask-truncated leaves out cut-off replies the same way.
3. With one update per batch of rollouts (--inner-steps 1, the default) the data is on-policy, so
   pi_old is the policy itself: the ratio is exactly 1 and only its gradient acts (then the
   clipped objective reduces to the plain policy gradient A_i * grad log pi).
4. The reward is the verifier's 0/1 and nothing else by default (--format-reward adds a small
   term for a well-formed final line); a reply cut off before <|end|> scores 0.
5. The group's std is the sample std (Bessel's correction) floored at --std-floor, so a group that
   is nearly constant (possible with --format-reward) cannot blow its advantages up; with 0/1
   rewards and G = 8 the floor never acts.
6. Ratio and KL are taken at the sampling temperature (--temperature), the distribution the replies
   were drawn from, so the KL is between the tempered policy and the tempered reference.
7. The model is ~1M parameters and the problems a toy world's (data/world.py).
"""

import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import checks
import evaluation as E
import model as M
import plumbing as P
import presets
import distributed as D
import report
import resume as R
from data import formats, world
from data.prepare import DATA_DIR, ensure_data
from plumbing import option


@dataclass
class RLVRConfig(R.ResumeOptions, presets.RunOptions):
    # rollouts
    prompts_per_step: int = option(16, "prompts per step", "rollouts")
    group_size: int = option(8, "replies sampled per prompt (G)", "rollouts")
    temperature: float = option(1.0, "sampling temperature (the ratio uses the same one)", "rollouts")
    max_new_tokens: int = option(96, "longest reply; a reply cut off there scores 0", "rollouts")
    mask_truncated: bool = option(False, "leave replies that hit --max-new-tokens out of the loss", "rollouts")
    format_reward: float = option(0.0, "extra reward for a well-formed final line (0 = verifier only)", "rollouts")
    # the objective
    scale_rewards: bool = option(True, "divide advantages by the group's std (GRPO); "
                                   "--no-scale-rewards: only subtract the mean (Dr. GRPO)", "objective")
    std_floor: float = option(0.1, "smallest std divided by, so a near-constant group cannot explode", "objective")
    clip_eps: float = option(0.2, "PPO clip range: the ratio is clipped to [1 - eps, 1 + eps] (see --clip-eps-high)", "objective")
    clip_eps_high: float = option(0.0, "upper clip eps (DAPO's clip-higher); 0 = same as --clip-eps", "objective")
    kl_coef: float = option(0.02, "beta_KL: weight of the k3 KL penalty to the reference (0 = no reference pass)", "objective")
    aggregation: str = option("token", "token: mean over all reply tokens of the batch; "
                                "sequence: mean per reply, then over replies (GRPO paper)", "objective")
    inner_steps: int = option(1, "mu: optimizer updates per batch of rollouts", "objective")
    # optimisation
    steps: int = option(50, "RL steps (each: sample, score, update)", "optimisation")
    max_seconds: float = option(0.0, "stop after the step that passes this many seconds of sampling and "
                                  "training (0 = run every step): a wall-clock budget", "optimisation")
    lr: float = option(1e-4, "peak learning rate", "optimisation")
    warmup_steps: int = option(5, "linear warmup steps, then constant", "optimisation")
    grad_clip: float = option(1.0, "clip the gradient norm to this", "optimisation")
    compile: bool = option(False, "run the training forward through torch.compile (the sampler stays eager)",
                           "optimisation")
    micro_batch: int = option(0, "replies per forward/backward (0 = all of a step's at once); "
                                "the same loss and gradient either way", "optimisation")
    # data and evaluation
    data_dir: str = option(DATA_DIR, "the tokenizer and default data files (built if missing)", "data")
    data: str = option("", "RL problems, JSONL {prompt, answer} (default: <data-dir>/rl.jsonl)", "data")
    eval_problems_file: str = option("", "held-out problems (default: <data-dir>/test.jsonl)", "data")
    eval_problems: int = option(300, "held-out problems for greedy accuracy and pass@k (0 = skip)", "evaluation")
    eval_samples: int = option(8, "sampled replies per held-out problem for pass@k (k <= this)", "evaluation")
    # run
    init: str = option("", "checkpoint to start from (default: <out>/dpo/model.pt, built if missing)", "run")
    eval_reference: str = option("", "checkpoint the evaluation's KL is measured against (default: the start; "
                                   "e.g. out/sft/model.pt to compare stages)", "run")
    out: str = option(P.OUT_DIR, "output root: writes <out>/rlvr (default: out/ in the repository)", "run")
    log_every: int = option(1, "steps between log lines", "run")


# ----------------------------------------------------------------------------------------------
# Problems and the reward


def reward(problem, reply, finished, format_weight=0.0):
    """The verifiable reward: 1 when the reply's final answer is right, else 0.
    The verifier (world.verify) reads only a final line `The answer is N.` stated exactly once, so
    a reply that hedges (lists several answers, repeats the final line with other numbers) or is
    empty scores 0; so does a reply cut off before its <|end|> (finished=False).
    format_weight > 0 adds that much for a well-formed final line, right or wrong."""
    if not finished:
        return 0.0
    well_formed = world.parse_answer(reply) is not None
    return float(world.verify(problem, reply)) + format_weight * well_formed


def group_advantages(rewards, scale=True, std_floor=0.1):
    """Group-relative advantages. rewards (P, G): G replies to each of P prompts.
        A_i = r_i - mean(r)            (Dr. GRPO)
        A_i = (r_i - mean(r)) / std(r) (GRPO; std floored at std_floor)
    -> advantages (P, G), has_spread (P,) bool: False where every reply scored the same (then
    every A_i is exactly 0 and the group teaches nothing)."""
    mean = rewards.mean(dim=1, keepdim=True)  # (P, 1)
    advantages = rewards - mean  # (P, G), sums to 0 per group
    has_spread = (rewards != rewards[:, :1]).any(dim=1)  # (P,)
    if scale:
        # the sample std (Bessel's correction), floored: departure 5 of the docstring
        std = rewards.std(dim=1, keepdim=True) if rewards.size(1) > 1 else torch.zeros_like(mean)  # (P, 1)
        advantages = advantages / std.clamp(min=std_floor)  # (P, G)
    return advantages * has_spread[:, None], has_spread


# ----------------------------------------------------------------------------------------------
# The loss


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps=0.2, clip_eps_high=None,
              kl_coef=0.0, aggregation="token", normaliser=None):
    """The clipped GRPO objective, negated (a loss), with its diagnostics.
    Shape: logps (N, T)      log pi_theta of each reply token (with grad), at the sampling temperature
    Shape: old_logps (N, T)  log pi_old, the policy that sampled the replies (no grad)
    Shape: ref_logps (N, T)  log pi_ref, the frozen reference (no grad; unused when kl_coef is 0)
    Shape: advantages (N,)   A_i of each reply
    Shape: mask (N, T)       1 on scored reply tokens, 0 on prompt, padding and left-out replies
    normaliser: what the summed loss is divided by: the number of scored tokens (aggregation
    "token") or of scored replies ("sequence"). By default this batch's own; pass the whole step's
    when it is split into micro-batches, so the loss and gradient do not depend on the split.
    -> (loss scalar, stats): stats holds sums over the mask, detached, for the caller to divide by
    "tokens": "kl" (of D), "ratio" (of rho), "clipped" (tokens whose clipped branch won), "tokens"."""
    mask = mask.bool()
    clip_eps_high = clip_eps if not clip_eps_high else clip_eps_high
    # where(), not a product with the mask: padded positions may hold anything (even inf or NaN)
    # and must not reach exp(). The clamp keeps exp() finite: a hard cap on the ratio at e^20 (only
    # reachable with --inner-steps > 1), past which a token gets no gradient at all, like dual-clip PPO.
    log_ratio = torch.where(mask, logps - old_logps, 0.0).clamp(-20, 20)  # (N, T)
    ratio = log_ratio.exp()  # rho_{i,t}; exactly 1 when pi_old is the policy itself
    A = advantages[:, None]  # (N, 1)
    unclipped = ratio * A  # (N, T)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps_high) * A  # (N, T)
    objective = torch.min(unclipped, clipped)  # PPO's pessimistic bound: no gain from leaving the clip range
    per_token = -objective  # negate: we minimise
    ref_log_ratio = torch.where(mask, ref_logps - logps, 0.0).clamp(-20, 20)  # log pi_ref/pi_theta
    kl = ref_log_ratio.exp() - ref_log_ratio - 1  # (N, T) D_{i,t}, eq. 4: k3, >= 0
    if kl_coef:
        per_token = per_token + kl_coef * kl
    per_token = torch.where(mask, per_token, 0.0)  # (N, T)
    if aggregation == "token":
        total = per_token.sum()
        default_normaliser = mask.sum()
    elif aggregation == "sequence":
        lengths = mask.sum(-1)  # (N,)
        total = (per_token.sum(-1) / lengths.clamp(min=1)).sum()
        default_normaliser = (lengths > 0).sum()
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; known: token, sequence")
    normaliser = default_normaliser if normaliser is None else normaliser
    loss = total / max(1, float(normaliser))  # an empty mask gives 0, not NaN
    with torch.no_grad():
        # a token is clipped when the clipped branch is the smaller one and strictly so
        clipped_now = (clipped < unclipped) & mask
        stats = {"kl": (kl * mask).sum().item(), "clipped": clipped_now.sum().item(),
                 "ratio": (ratio * mask).sum().item(), "tokens": mask.sum().item()}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Rollouts


def rollout(policy, enc, problems, group_size, config, generator):
    """Sample group_size replies to each problem and score them.
    -> dict of per-reply lists (prompt_ids, reply_ids, sample_logps, finished, correct, texts) and
    rewards (P, G). sample_logps are the sampler's own log-probs; training recomputes them (see
    train), and the tests check that the two agree."""
    end = M.special(enc, "end")
    prompt_ids = [M.render_prompt(enc, p["prompt"]) for p in problems for _ in range(group_size)]
    reply_ids, sample_logps = M.generate(policy, prompt_ids, config.max_new_tokens, end,
                                         config.temperature, generator=generator)
    finished = [len(r) > 0 and r[-1] == end for r in reply_ids]
    texts = [M.decode_reply(enc, r) for r in reply_ids]
    correct = [f and world.verify(problems[i // group_size], t) for i, (f, t) in enumerate(zip(finished, texts))]
    rewards = torch.tensor([reward(problems[i // group_size], texts[i], finished[i], config.format_reward)
                            for i in range(len(texts))]).view(len(problems), group_size)  # (P, G)
    return {"prompt_ids": prompt_ids, "reply_ids": reply_ids, "sample_logps": sample_logps,
            "finished": finished, "correct": correct, "texts": texts, "rewards": rewards}


# ----------------------------------------------------------------------------------------------
# Training


BUILDS = ("pretrain", "sft", "dpo")  # the stages ensure_init runs when the DPO model (and its SFT model) is missing


def ensure_init(config):
    """The checkpoint RL starts from; the default DPO one is built (announced) when missing."""
    def build():
        import dpo  # only needed to build the missing stage; --resume resumes it if it was cut
        resume = config.resume and R.cut_before(config, BUILDS)
        dpo.train(presets.earlier_stage(dpo.DPOConfig, "dpo", config, resume))

    path = os.path.join(config.out, "dpo", "model.pt")
    return P.previous_stage(config.init, path, build, f"rlvr: no DPO checkpoint at {path}; building it now "
                            f"with dpo.py (and the data and SFT model if missing)")


def policy_update(model, reference, opt, ro, rows, advantages, config, pad, device):
    """The update(s) of one step on the informative replies (rows): per-token clipped ratios and the
    KL penalty, --inner-steps optimizer steps, in micro-batches of --micro-batch replies. model: the
    policy, or the forward it trains through (--compile: distributed.training_model).
    -> (stats of the rollouts as sampled, summed over tokens; the loss; rho summed over the last inner
    step's tokens; clipped tokens over every inner step; the last gradient norm; tokens through the
    policy)"""
    stats = {"kl": 0.0, "clipped": 0.0, "ratio": 0.0, "tokens": 0}
    grad_norm = step_loss = clipped = ratio_sum = 0.0
    if not rows:
        return stats, step_loss, ratio_sum, clipped, grad_norm, None
    ids, mask = M.prompt_response_batch([ro["prompt_ids"][i] for i in rows], [ro["reply_ids"][i] for i in rows],
                                        pad, device)
    adv = advantages.flatten()[rows].to(device)  # (N,)
    mb = config.micro_batch or len(rows)
    chunks = [slice(i, i + mb) for i in range(0, len(rows), mb)]
    ref_logps = [None] * len(chunks)
    if config.kl_coef:
        with torch.no_grad():
            ref_logps = [M.shifted_logprobs(reference, ids[c], mask[c], config.temperature)[0] for c in chunks]
    normaliser = mask[:, 1:].sum() if config.aggregation == "token" else len(rows)
    old_logps = [None] * len(chunks)
    for inner in range(config.inner_steps):
        opt.zero_grad(set_to_none=True)
        ratio_sum = 0.0  # each inner step starts it again: the log keeps the last one's
        for j, c in enumerate(chunks):
            logps, m = M.shifted_logprobs(model, ids[c], mask[c], config.temperature)  # (n, T-1)
            if old_logps[j] is None:  # on-policy at the first inner step: pi_old = pi_theta
                # recomputed, not the sampler's log-probs: the sampler's KV-cache forward (bf16
                # on CUDA) rounds differently, and the ratio would not be exactly 1
                old_logps[j] = logps.detach()
            ref = ref_logps[j] if ref_logps[j] is not None else logps.detach()
            loss, s = grpo_loss(logps, old_logps[j], ref, adv[c], m, config.clip_eps,
                                config.clip_eps_high, config.kl_coef, config.aggregation, normaliser)
            loss.backward()
            clipped += s["clipped"]  # over every inner step: clipping needs mu > 1
            ratio_sum += s["ratio"]
            if inner == 0:  # the figures of the rollouts as sampled (ratio 1: on-policy)
                step_loss += loss.item()
                for k in stats:
                    stats[k] += s[k]
        grad_norm = torch.nn.utils.clip_grad_norm_(M.unwrap(model).parameters(), config.grad_clip).item()
        opt.step()
    return stats, step_loss, ratio_sum, clipped, grad_norm, ids


def rates(run, peak):
    """Sampling and training throughput so far, and the training MFU (the sampling's is not counted)."""
    return {"sample_tokens_per_second": run["sample_tokens"] / max(1e-9, run["sample_seconds"]),
            "train_tokens_per_second": run["train_tokens"] / max(1e-9, run["train_seconds"]),
            "mfu": run["train_flops"] / max(1e-9, run["train_seconds"]) / peak}


def load_models(config, init, device, tokenizer_path, enc, problems, eval_problems, data_path, eval_source):
    """The policy (trainable copy of the start, dropout off: its log-probs must be those the sampler
    saw), the frozen reference, and the model the evaluation's KL is measured against (the start, or
    --eval-reference); every prompt's replies checked to fit each model's context first.
    -> (policy, reference, kl_reference)"""
    policy, _ = M.load_checkpoint(init, device, tokenizer_path)
    reference, _ = M.load_checkpoint(init, device, tokenizer_path)
    reference.requires_grad_(False).eval()
    policy.eval()
    print(f"rlvr: start from {init} | {P.describe(policy, device)} | {len(problems)} RL problems, "
          f"{len(eval_problems)} held-out")
    if config.steps:  # rollouts sample after the training problems (--steps 0 only evaluates)
        E.check_replies_fit(policy.config.block_size, enc, [p["prompt"] for p in problems], config.max_new_tokens,
                            data_path)
    eval_prompts = [p["prompt"] for p in eval_problems]
    E.check_replies_fit(policy.config.block_size, enc, eval_prompts, config.max_new_tokens, eval_source)
    # the evaluation's KL is against the start, or against --eval-reference (a third model, eval only)
    kl_reference = reference
    if config.eval_reference:
        kl_reference, _ = M.load_checkpoint(config.eval_reference, device, tokenizer_path)
        kl_reference.requires_grad_(False).eval()
        E.check_replies_fit(kl_reference.config.block_size, enc, eval_prompts, config.max_new_tokens, eval_source,
                            model=config.eval_reference)  # the KL scores prompt and reply on it too
    return policy, reference, kl_reference


def train(config):
    """Run RL as configured; returns the metrics dict (also written to <out>/rlvr/metrics.json)."""
    t_all = time.time()
    checks.rlvr(config, BUILDS)
    device = D.setup(P.pick_device(config.device))  # on several processes (torchrun): this rank's
    user_problems = formats.read_problems(config.data) if config.data else None  # validated before anything else
    user_eval = formats.read_problems(config.eval_problems_file) if config.eval_problems_file else None
    P.require_file(config.eval_reference)
    init = ensure_init(config)
    ensure_data(config.data_dir)
    peak = P.peak_flops(device)
    t0 = time.time()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    # the sampler's generator: on several processes each rank draws its own stream (rank 0's is one process's)
    generator = torch.Generator(device=device).manual_seed(config.seed + 1000 * D.rank())
    tokenizer_path = os.path.join(config.data_dir, "tokenizer.json")
    enc = M.load_tokenizer(tokenizer_path)
    pad = M.special(enc, "endoftext")
    out_dir = os.path.join(config.out, "rlvr")
    os.makedirs(out_dir, exist_ok=True)
    data_path = config.data or os.path.join(config.data_dir, "rl.jsonl")
    eval_source = config.eval_problems_file or os.path.join(config.data_dir, "test.jsonl")
    problems = user_problems or formats.read_problems(data_path)
    fingerprint = R.fingerprint(config, {"start model": init, "RL problems": data_path, "held-out problems": eval_source},
                                tokenizer=M.tokenizer_fingerprint(tokenizer_path))
    R.check(config, out_dir, fingerprint)  # a state of another run stops here, before any work
    eval_problems = (user_eval or formats.read_problems(eval_source))[: config.eval_problems]

    policy, reference, kl_reference = load_models(config, init, device, tokenizer_path, enc, problems, eval_problems,
                                                  data_path, eval_source)
    before, greedy, sampled = E.rl_start_figures(policy, kl_reference, enc, eval_problems, config, device, D.is_main())

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.lr,
                            weight_decay=0.0, betas=(0.9, 0.95))
    P.warmup_note("rlvr", config.warmup_steps, config.steps)
    order, curve = [], []
    # tokens and seconds, sampling and training apart; scored: reply tokens through the output layer
    run = dict(sample_tokens=0, sample_seconds=0.0, train_tokens=0, train_seconds=0.0, train_flops=0.0, scored=0)
    saver = R.start(config, out_dir, fingerprint, {"policy": policy, "optimizer": opt, "rng": rng, "generator": generator,
                                                   "order": order, "curve": curve, "run": run},
                    os.path.join(out_dir, "log.jsonl"))
    # every rank holds every rollout and makes the same update (no DDP): only --compile wraps it
    train_model = D.training_model(policy, device, config.compile, ddp=False)
    bar = tqdm(R.steps(saver, config.steps), desc="rlvr", dynamic_ncols=True, initial=saver["first"],
               total=config.steps, disable=not D.is_main())
    for step in bar:
        if config.max_seconds and run["sample_seconds"] + run["train_seconds"] >= config.max_seconds:
            tqdm.write(f"rlvr: time budget of {config.max_seconds:g}s spent after {step} steps")
            break
        batch = [problems[i] for i in P.next_indices(order, len(problems), config.prompts_per_step, rng)]

        # 1. rollouts: G replies per prompt from the current policy, scored by the verifier (on several
        # processes each samples its share of the prompts, then every one holds them all: distributed.py)
        t_sample = time.time()
        ro = D.gathered(rollout(policy, enc, D.my_share(batch), config.group_size, config, generator))
        run["sample_seconds"] += time.time() - t_sample
        run["sample_tokens"] += sum(len(r) for r in ro["reply_ids"])

        # 2. advantages, relative to each prompt's group
        advantages, has_spread = group_advantages(ro["rewards"], config.scale_rewards, config.std_floor)
        keep = has_spread.repeat_interleave(config.group_size)  # (P*G,): replies that carry signal
        if config.mask_truncated:
            keep &= torch.tensor(ro["finished"])
        rows = keep.nonzero().flatten().tolist()

        # 3. the update(s) on the informative replies, at one lr per step whatever the inner steps
        t_train = time.time()
        for g in opt.param_groups:
            g["lr"] = P.scheduled_lr("constant", step, config.steps, config.lr, config.warmup_steps)
        stats, step_loss, ratio_sum, clipped, grad_norm, ids = policy_update(
            train_model, reference, opt, ro, rows, advantages, config, pad, device)
        if ids is not None:
            # tokens through the policy, prompt and padding included (they cost FLOPs); the reference's
            # forward and the sampling are not counted in the training MFU
            run["train_tokens"] += ids[:, 1:].numel() * config.inner_steps
            run["scored"] += stats["tokens"] * config.inner_steps  # through the head: the replies' tokens
            run["train_flops"] += config.inner_steps * M.training_flops(policy, ids[:, 1:].numel(), stats["tokens"],
                                                                        ids.shape[1] - 1)
            if step == 0:  # the invariant before any update moved the policy: pi_old = pi_theta = pi_ref
                tqdm.write(f"rlvr: step-0 check: ratio {stats['ratio'] / stats['tokens']:.4f} (1 on-policy)"
                           + (f", KL {stats['kl'] / stats['tokens']:.4f} (0 at the start)" if config.kl_coef else ""))
        run["train_seconds"] += time.time() - t_train

        rec = E.rlvr_step_record(step, ro, has_spread, stats, step_loss, ratio_sum, clipped, grad_norm, opt, config)
        rec.update(rates(run, peak))
        curve.append(rec)
        if (step + 1) % config.log_every == 0 or step == config.steps - 1:
            if D.is_main():
                P.append_jsonl(saver["log_path"], rec)
            recent = curve[-10:]
            bar.set_postfix(reward=f"{sum(r['reward'] for r in recent) / len(recent):.3f}",
                            zero=f"{rec['zero_spread_groups']:.2f}",
                            **({"kl": f"{rec['kl']:.4f}"} if "kl" in rec else {}),  # --kl-coef 0 measures none
                            clip=f"{rec['clip_fraction']:.3f}", len=f"{rec['reply_length']:.0f}",
                            sample=f"{rec['sample_tokens_per_second'] / 1e3:.1f}k",
                            train=f"{rec['train_tokens_per_second'] / 1e3:.1f}k", mfu=f"{rec['mfu']:.0%}")

    if not D.is_main():  # rank 0 alone evaluates and writes; the others wait for it, then end
        return D.finished({})
    metrics = {"steps": len(curve), "samples": len(curve) * config.prompts_per_step * config.group_size,
               "reward_curve": [r["reward"] for r in curve], **rates(run, peak),
               "scored_share": run["scored"] / max(1, run["train_tokens"]),
               "sample_seconds": run["sample_seconds"], "train_seconds": run["train_seconds"]}
    if eval_problems:
        after = before
        if curve:  # with no step, the model is the start: no need to evaluate it twice
            after, greedy, sampled = E.evaluate_pass_at_k(policy, kl_reference, enc, eval_problems, config, device)
        metrics.update(E.before_after(before, after), eval_problems=len(eval_problems))
        E.show_replies("after RL (greedy | sampled)", eval_problems, {"greedy": greedy, "sampled": sampled})
    metrics.update({"peak_flops": peak, "device": str(device), "wall_seconds": time.time() - t0,
                    "total_wall_seconds": time.time() - t_all})
    R.finish(out_dir, policy, tokenizer_path, "rlvr", config, metrics)
    E.print_rlvr_summary(metrics, config.eval_reference or "the start", out_dir)
    if config.report:
        report.refresh(config.out, config.data_dir)  # the run's report card, with this stage in it
    return D.finished(metrics)


def main(argv=None):
    P.run_cli(__doc__, RLVRConfig, train, argv, presets=presets.of("rlvr"))


if __name__ == "__main__":
    main()
