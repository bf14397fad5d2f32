"""
What every stage measures on held-out data, and how it says so: the judge's win rate of one model
over another on the same prompts (same seed, same settings) and what decided it, verifier accuracy
greedy and sampled, pass@k, KL to a reference on the model's own samples, style shares, held-out
preference accuracy split by what separates a pair, and the stages' printed summaries. Nothing here
trains anything.
"""

import hashlib
import json
import math
import os
import time

import torch

import model as M
import plumbing as P
from data import formats, world
from dpo_family import chosen_nll
from lora import reference_model
from plumbing import require

def check_replies_fit(context, enc, prompts, max_new_tokens, source, model="the model"):
    """Stop before any training when a reply of max_new_tokens after the longest of these prompts
    would run past a model's context of `context` tokens (generation would fail there, after the
    work was done)."""
    longest = max((len(M.render_prompt(enc, p)) for p in prompts), default=0)
    room = context - longest
    require(max_new_tokens <= room, f"--max-new-tokens {max_new_tokens} does not fit: the longest prompt in "
            f"{source} takes {longest} of {model}'s {context} context tokens, leaving {max(room, 0)}")


def pass_at_k(n, c, k):
    """The unbiased pass@k estimate from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k samples drawn without replacement include a
    correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def accuracy_by_ops(problems, correct):
    """The share of right replies per number of operations (problems with an "n_ops" field);
    correct[i] = (right replies to problem i, replies to it). -> {"1": share, ...}"""
    by_ops = {}
    for k in sorted({p["n_ops"] for p in problems if "n_ops" in p}):
        idx = [i for i, p in enumerate(problems) if p.get("n_ops") == k]
        by_ops[str(k)] = sum(correct[i][0] for i in idx) / sum(correct[i][1] for i in idx)
    return by_ops


def evaluate_answers(model, enc, problems, max_new_tokens, seed):
    """Greedy and temperature-1 replies to held-out problems, scored by the verifier."""
    prompts = [p["prompt"] for p in problems]
    greedy = M.sample_replies(model, enc, prompts, max_new_tokens, temperature=0.0, seed=seed)
    sampled = M.sample_replies(model, enc, prompts, max_new_tokens, temperature=1.0, seed=seed)
    g, s = world.score_replies(problems, greedy), world.score_replies(problems, sampled)
    by_ops = accuracy_by_ops(problems, [(world.verify(p, r), 1) for p, r in zip(problems, greedy)])
    return {"accuracy": g["accuracy"], "accuracy_sampled": s["accuracy"], "accuracy_by_ops": by_ops,
            "style_shares": s["style_shares"], "style_shares_greedy": g["style_shares"],
            "judge_score_sampled": s["judge_score"]}, greedy, sampled


@torch.no_grad()
def evaluate_pass_at_k(model, reference, enc, problems, config, device, batch_size=128):
    """Held-out figures: greedy verifier accuracy; pass@k for k in {1, 4, 8} (unbiased, from
    config.eval_samples sampled replies per problem at the training temperature); the judge's
    mean score, the mean reply length, the style shares, on the first sampled reply per problem;
    and KL(model || reference) per reply on those samples."""
    prompts = [p["prompt"] for p in problems]
    greedy = M.sample_replies(model, enc, prompts, config.max_new_tokens, temperature=0.0, seed=config.seed)
    n = config.eval_samples
    expanded = [p for p in prompts for _ in range(n)]
    sampled, sampled_ids = M.sample_replies(model, enc, expanded, config.max_new_tokens, config.temperature,
                                            seed=config.seed + 1, batch_size=batch_size, return_ids=True)
    correct = [sum(world.verify(problems[i], sampled[i * n + j]) for j in range(n)) for i in range(len(problems))]
    first = [sampled[i * n] for i in range(len(problems))]
    scores = world.score_replies(problems, first)
    metrics = {"accuracy": world.score_replies(problems, greedy)["accuracy"],
               "pass_at_k": {str(k): sum(pass_at_k(n, c, k) for c in correct) / len(problems)
                             for k in (1, 4, 8) if k <= n},
               "judge_score": scores["judge_score"], "mean_length": scores["mean_length"],
               "style_shares": scores["style_shares"],
               "kl": kl_on_samples(model, reference, enc, prompts, sampled_ids[::n], device),
               "pass_at_1_by_ops": accuracy_by_ops(problems, [(c, n) for c in correct])}
    return metrics, greedy, first


def rl_start_figures(policy, kl_reference, enc, problems, config, device, main=True):
    """rlvr.py's start model on the held-out problems, before any step (evaluate_pass_at_k), printed;
    on several processes rank 0 alone (main) evaluates. -> (figures, greedy replies, sampled
    replies), or Nones without problems or off rank 0"""
    if not problems or not main:
        return None, None, None
    t_eval = time.time()
    before, greedy, sampled = evaluate_pass_at_k(policy, kl_reference, enc, problems, config, device)
    print(f"rlvr: before: greedy accuracy {before['accuracy']:.1%}, " + ", ".join(
        f"pass@{k} {v:.1%}" for k, v in before["pass_at_k"].items())
        + f", judge {before['judge_score']:.2f} ({time.time() - t_eval:.0f}s)")
    return before, greedy, sampled


@torch.no_grad()
def kl_on_samples(policy, reference, enc, prompts, reply_ids, device, batch_size=64):
    """KL(pi || pi_ref) per reply, estimated on the policy's own samples:
        KL = E_{y ~ pi} [ log pi(y|x) - log pi_ref(y|x) ]
    where y is exactly the sampled token sequence (reply_ids, from sample_replies(return_ids=True):
    its <|end|> when it stopped, none when cut at the length cap). A Monte Carlo mean: the KL itself is
    never negative, but the estimate of a policy that has barely moved can read a little below 0.
    reference None: the policy's LoRA base (see reference_model)."""
    total = 0.0
    for i in range(0, len(prompts), batch_size):
        ids, mask = M.prompt_response_batch([M.render_prompt(enc, p) for p in prompts[i: i + batch_size]],
                                            reply_ids[i: i + batch_size], M.special(enc, "endoftext"), device)
        with reference_model(policy, reference) as ref_model:
            ref_logps, scored = M.shifted_logprobs(ref_model, ids, mask)  # (B, T-1) each
        logps, _ = M.shifted_logprobs(policy, ids, mask)  # (B, T-1)
        total += ((logps * scored).sum(-1) - (ref_logps * scored).sum(-1)).sum().item()  # sum of log-ratios
    return total / max(1, len(prompts))


def judge_during_training(policy, enc, problems, config):
    """The policy's replies to a few held-out problems, sampled as at evaluation (in eval mode, as
    generate() samples), judged."""
    replies = M.sample_replies(policy, enc, [p["prompt"] for p in problems], config.max_new_tokens,
                               config.eval_temperature, config.seed)
    scores = world.score_replies(problems, replies)
    return {"judge_score": scores["judge_score"], "accuracy": scores["accuracy"], "length": scores["mean_length"]}


def win_rate_by_decider(problems, policy_replies, ref_replies):
    """The judge's verdict on each (policy, reference) pair of replies, a tie counting half, split by
    what decided it, which says where a win rate can still grow:
      "correctness"  one reply is right and the other wrong: the right one wins, whatever its style
      "style"        both right or both wrong, in styles of different rank: the better style wins
      "length"       both right or both wrong, styles of equal rank: the shorter reply wins (equal
                     lengths, e.g. the same reply sampled by both models, are a tie)
    -> (win rate, {decider: {"comparisons": n, "win_rate": policy's wins / n}})"""
    assert len(problems) == len(policy_replies) == len(ref_replies)
    verdicts = {}
    for p, a, b in zip(problems, policy_replies, ref_replies):
        ja, jb = world.judge(p, a), world.judge(p, b)
        rank_a, rank_b = (world.STYLE_RANK[world.classify_style(r)] for r in (a, b))
        decider = ("correctness" if world.verify(p, a) != world.verify(p, b) else
                   "style" if rank_a != rank_b else "length")
        verdicts.setdefault(decider, []).append(1.0 if ja > jb else 0.5 if ja == jb else 0.0)
    win_rate = sum(map(sum, verdicts.values())) / len(problems)
    return win_rate, {d: {"comparisons": len(verdicts[d]), "win_rate": sum(verdicts[d]) / len(verdicts[d])}
                      for d in ("correctness", "style", "length") if d in verdicts}


def replies_key(model, prompts, max_new_tokens, seed):
    """What decides a model's replies as sample_replies draws them: its weights, the prompts, the
    length cap, the seed and the device (another device rounds differently). -> a sha256 hex digest"""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps([prompts, max_new_tokens, seed, str(next(model.parameters()).device)]).encode())
    return h.hexdigest()


def save_replies(path, model, prompts, max_new_tokens, seed, replies):
    """Keep a model's replies ({temperature: texts}) with the key that decided them (replies_key),
    so a later stage that would draw the same ones can read them instead."""
    P.write_json(path, {"key": replies_key(model, prompts, max_new_tokens, seed),
                        "replies": {str(t): texts for t, texts in replies.items()}})


def known_replies(path, model, prompts, max_new_tokens, seed):
    """The replies save_replies kept at path, {temperature: texts}, if the same model drew them for
    the same prompts and settings (the key matches); else {}."""
    if model is None or not os.path.exists(path):
        return {}
    with open(path) as f:
        kept = json.load(f)
    if kept.get("key") != replies_key(model, prompts, max_new_tokens, seed):
        return {}
    return {float(t): texts for t, texts in kept["replies"].items()}


def compare_by_sampling(policy, reference, enc, problems, config, device, known=None):
    """Sample the reference and the policy on the same held-out prompts, same settings and seed;
    the judge compares them reply by reply (a tie counts half). Greedy replies of both are scored
    too: sampling shows the style a model favours, greedy its best answer. known: the reference's
    replies already drawn with these settings ({temperature: texts}, see known_replies).
    -> (metrics, the reference's sampled replies, the policy's sampled replies)"""
    prompts = [p["prompt"] for p in problems]
    known = known or {}
    with reference_model(policy, reference) as ref_model:
        ref_replies = known.get(config.eval_temperature) or M.sample_replies(
            ref_model, enc, prompts, config.max_new_tokens, config.eval_temperature, config.seed)
        ref_greedy = known.get(0.0) or M.sample_replies(ref_model, enc, prompts, config.max_new_tokens, 0.0,
                                                        config.seed)
    pol_replies, pol_ids = M.sample_replies(policy, enc, prompts, config.max_new_tokens, config.eval_temperature,
                                            config.seed, return_ids=True)
    pol_greedy = M.sample_replies(policy, enc, prompts, config.max_new_tokens, 0.0, config.seed)
    win_rate, by_decider = win_rate_by_decider(problems, pol_replies, ref_replies)
    ref_scores, pol_scores = world.score_replies(problems, ref_replies), world.score_replies(problems, pol_replies)
    return {"win_rate": win_rate, "win_rate_by_decider": by_decider,
            "judge_score_policy": pol_scores["judge_score"], "judge_score_ref": ref_scores["judge_score"],
            "accuracy_policy": pol_scores["accuracy"], "accuracy_ref": ref_scores["accuracy"],
            "greedy_accuracy_policy": world.score_replies(problems, pol_greedy)["accuracy"],
            "greedy_accuracy_ref": world.score_replies(problems, ref_greedy)["accuracy"],
            "style_shares_policy": pol_scores["style_shares"], "style_shares_ref": ref_scores["style_shares"],
            "length_policy": pol_scores["mean_length"], "length_ref": ref_scores["mean_length"],
            "kl": kl_on_samples(policy, reference, enc, prompts, pol_ids, device)}, ref_replies, pol_replies


def pair_kind(chosen, rejected, answer=None):
    """What separates two replies (see accuracy_by_pair_kind); None when either states no answer."""
    stated = world.parse_answer(chosen), world.parse_answer(rejected)
    if None in stated:
        return None
    answer = answer if isinstance(answer, int) and not isinstance(answer, bool) else None
    if stated[0] == stated[1]:
        return "style"
    if answer is None:
        return "answer"
    return "correct_vs_wrong" if answer in stated else "both_wrong"


def accuracy_by_pair_kind(pairs, examples, margins, answers=None):
    """Held-out preference accuracy split by what separates the two replies, which says what the
    implicit reward has learned to see:
      "style"            both state the same final answer: the judge orders them by style, then length
      "correct_vs_wrong" one states the right answer (answers[row] known): ordering it takes arithmetic
      "both_wrong"       different answers, neither right: the judge orders them by style again
      "answer"           different answers, the right one unknown (a file without an integer "answer")
    Pairs whose replies state no parseable answer (not this world's data) are left out. Replies are
    read whole, as written in the file (the default length budget truncates none of this world's).
    Shape: margins (N,)  r_w - r_l per example, in the order of examples
    -> {kind: (accuracy, pairs)}"""
    right = {}
    for example, margin in zip(examples, margins.tolist()):
        _, chosen, rejected = pairs[example["row"]][:3]
        kind = pair_kind(chosen, rejected, answers[example["row"]] if answers else None)
        if kind is not None:
            right.setdefault(kind, []).append(margin > 0)
    return {kind: (sum(v) / len(v), len(v)) for kind, v in right.items()}


def correct_vs_wrong_by_style(pairs, examples, margins, answers):
    """The correct_vs_wrong pairs' accuracy split by how the right reply's style ranks against the
    wrong one's, which says whether the reward sees the arithmetic or only the style:
      "better"  the right reply's style ranks higher: style alone orders the pair as the judge does
      "same"    the same rank: only the answer tells the replies apart
      "worse"   the right reply's style ranks lower: style alone orders it against the judge
    A reward that has learned the style order and no arithmetic gets all of "better", none of "worse".
    Shape: margins (N,)  r_w - r_l per example, in the order of examples
    -> {relation: (accuracy, pairs)}"""
    right = {}
    for example, margin in zip(examples, margins.tolist()):
        _, chosen, rejected = pairs[example["row"]][:3]
        answer = answers[example["row"]]
        if pair_kind(chosen, rejected, answer) != "correct_vs_wrong":
            continue
        good, bad = (chosen, rejected) if world.parse_answer(chosen) == answer else (rejected, chosen)
        rank = world.STYLE_RANK[world.classify_style(good)] - world.STYLE_RANK[world.classify_style(bad)]
        right.setdefault("better" if rank > 0 else "same" if rank == 0 else "worse", []).append(margin > 0)
    return {r: (sum(right[r]) / len(right[r]), len(right[r])) for r in ("better", "same", "worse") if r in right}


def show_replies(title, problems, replies):
    """Print the first three held-out problems with each model's reply: replies {label: texts}."""
    print(f"\n--- three held-out prompts: {title} ---")
    width = max(len(label) for label in replies) + 2
    for i, p in enumerate(problems[:3]):
        print(f"USER: {p['prompt']}  (answer {p['answer']})")
        for label, texts in replies.items():
            print(f"{'[' + label + ']':<{width}} {texts[i]!r}")
        print()


def preference_metrics(accuracy, margin, margins, ref_margins, pairs, examples, answers):
    """Held-out preference accuracy with its splits (see accuracy_by_pair_kind and
    correct_vs_wrong_by_style), and the baseline the start's own likelihood gives before any training
    (ref_margins = log pi_ref(y_w) - log pi_ref(y_l); None without a reference).
    Shape: margins (N,)  r_w - r_l per example, in the order of examples"""
    def table(split):
        return {k: {"accuracy": acc, "pairs": n} for k, (acc, n) in split.items()}

    metrics = {"pref_accuracy": accuracy, "margin": margin,
               "pref_accuracy_by_kind": table(accuracy_by_pair_kind(pairs, examples, margins, answers)),
               "pref_accuracy_correct_vs_wrong_by_style": table(correct_vs_wrong_by_style(pairs, examples, margins,
                                                                                          answers))}
    if ref_margins is not None:
        metrics["ref_likelihood_accuracy"] = (ref_margins > 0).float().mean().item()
        metrics["ref_likelihood_accuracy_by_kind"] = table(accuracy_by_pair_kind(pairs, examples, ref_margins,
                                                                                 answers))
    return metrics


def print_dpo_summary(metrics, unit, has_reference, model_copies, out_dir):
    """The DPO stage's closing lines, read from its metrics."""
    by_kind, by_style = metrics["pref_accuracy_by_kind"], metrics["pref_accuracy_correct_vs_wrong_by_style"]
    print(f"dpo: held-out preference accuracy {metrics['pref_accuracy']:.1%} (margin {metrics['margin']:.2f})"
          + "".join(f"; {v['accuracy']:.1%} of the {v['pairs']} {kind} pairs" for kind, v in by_kind.items()))
    if by_style:
        print("dpo: the correct_vs_wrong pairs by the right reply's style against the wrong one's: " + ", ".join(
            f"{r} {v['accuracy']:.0%} of {v['pairs']}" for r, v in by_style.items()) + " (style alone orders "
            "the 'better' ones as the judge does, the 'worse' ones against it)")
    if "ref_likelihood_accuracy" in metrics:
        print(f"dpo: baseline, the reference's likelihood log pi_ref(chosen) > log pi_ref(rejected): "
              f"{metrics['ref_likelihood_accuracy']:.1%}" + "".join(
                  f"; {v['accuracy']:.1%} of the {kind} pairs"
                  for kind, v in metrics["ref_likelihood_accuracy_by_kind"].items()))
    if "win_rate" in metrics:
        sp, sr = metrics["style_shares_policy"], metrics["style_shares_ref"]
        print(f"dpo: judge win rate of policy over reference {metrics['win_rate']:.1%}; judge score "
              f"{metrics['judge_score_ref']:.2f} -> {metrics['judge_score_policy']:.2f}; verifier accuracy "
              f"{metrics['accuracy_ref']:.1%} -> {metrics['accuracy_policy']:.1%} sampled, "
              f"{metrics['greedy_accuracy_ref']:.1%} -> {metrics['greedy_accuracy_policy']:.1%} greedy; "
              f"KL {metrics['kl']:.2f} nats/reply (estimated on the policy's samples)")
        print("dpo: what decided the judge's verdicts: " + "; ".join(
            f"{d} {v['comparisons']} (policy won {v['win_rate']:.0%})"
            for d, v in metrics["win_rate_by_decider"].items()))
        print("dpo: styles (reference -> policy): " + ", ".join(f"{s} {sr[s]:.0%}->{sp[s]:.0%}" for s in sp))
    reference_note = ("no reference pass" if not has_reference else
                      f"reference pass {metrics['reference_pass_seconds']:.1f}s once vs ~"
                      f"{metrics['live_reference_seconds_estimate']:.1f}s for a live reference")
    print(f"dpo: {metrics['pairs_per_second']:.1f} {unit}/s, {metrics['tokens_per_second'] / 1e3:.1f}k tok/s, "
          f"MFU {metrics['mfu']:.0%} of the work done, {metrics['mfu_needed']:.0%} of the work the loss needs "
          f"({metrics['scored_share']:.0%} of the positions scored; peak {metrics['peak_flops'] / 1e9:.0f} "
          f"GFLOP/s); {reference_note}; DPO stage {metrics['wall_seconds']:.0f}s -> {out_dir}/")
    mem = metrics["memory_mb"]
    print(f"dpo: memory: {metrics['trainable_parameters']:,} trainable parameters ({metrics['trainable_share']:.1%}); "
          f"weights {mem['weights']:.1f} MB ({model_copies} {'copies' if model_copies > 1 else 'copy'}) + grads "
          f"{mem['grads']:.1f} + AdamW {mem['optimizer']:.1f} = {mem['total']:.1f} MB; "
          f"peak process {mem['peak_process']:.0f} MB")


def before_after(before, after):
    """The RL stage's held-out figures (evaluate_pass_at_k's) before and after training, as metrics."""
    return {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "pass_at_k": {k: {"before": before["pass_at_k"][k], "after": after["pass_at_k"][k]}
                          for k in after["pass_at_k"]},
            "judge_score_before": before["judge_score"], "judge_score_after": after["judge_score"],
            "length_before": before["mean_length"], "length_after": after["mean_length"],
            "style_shares_before": before["style_shares"], "style_shares_after": after["style_shares"],
            "pass_at_1_by_ops_before": before["pass_at_1_by_ops"],
            "pass_at_1_by_ops_after": after["pass_at_1_by_ops"],
            "kl_before": before["kl"], "kl": after["kl"]}


def print_rlvr_summary(metrics, reference_name, out_dir):
    """The RL stage's closing lines, read from its metrics."""
    r = metrics["reward_curve"]
    if r:
        head, tail = r[: max(1, len(r) // 5)], r[-max(1, len(r) // 5):]
        print(f"rlvr: reward {sum(head) / len(head):.3f} (first fifth of steps) -> {sum(tail) / len(tail):.3f} "
              f"(last fifth)")
    if "pass_at_k" in metrics:
        pk = metrics["pass_at_k"]
        print(f"rlvr: held-out greedy accuracy {metrics['accuracy_before']:.1%} -> {metrics['accuracy_after']:.1%}; "
              + ", ".join(f"pass@{k} {v['before']:.1%} -> {v['after']:.1%}" for k, v in pk.items()))
        print(f"rlvr: judge score {metrics['judge_score_before']:.2f} -> {metrics['judge_score_after']:.2f}; "
              f"reply length {metrics['length_before']:.0f} -> {metrics['length_after']:.0f} chars; "
              f"KL to {reference_name} {metrics['kl']:.2f} nats/reply")
    print(f"rlvr: sampling {metrics['sample_tokens_per_second'] / 1e3:.1f}k tok/s, training "
          f"{metrics['train_tokens_per_second'] / 1e3:.1f}k tok/s, MFU {metrics['mfu']:.0%} (peak "
          f"{metrics['peak_flops'] / 1e9:.0f} GFLOP/s); RL stage {metrics['wall_seconds']:.0f}s -> {out_dir}/")


def check_sampling_fits(config, context, eval_reference_context, enc, problems, source):
    """DPO's evaluations sample replies after these prompts: they must fit the policy's context (and
    --eval-reference's), checked before training."""
    sampled = max(config.eval_problems, config.eval_every_problems if config.eval_every else 0)
    prompts = [p["prompt"] for p in problems[:sampled]]
    if sampled:
        check_replies_fit(context, enc, prompts, config.max_new_tokens, source)
    if config.eval_problems and eval_reference_context:  # the final one samples that model too
        check_replies_fit(eval_reference_context, enc, prompts[: config.eval_problems], config.max_new_tokens,
                            source, model=config.eval_reference)


def dpo_evaluation(config, policy, reference, init, enc, problems, accuracy, test_refs, test_pairs, test_examples,
                   test_path, device):
    """The DPO stage's held-out figures, against the start (or --eval-reference): the preference accuracy
    (dpo.preference_accuracy's (accuracy, mean margin, margins)) split by pair kind, then both models
    sampled on the same problems. test_refs: the reference's log-probs of the held-out pairs. -> metrics"""
    if config.eval_problems > 0 and (config.eval_reference or (reference is None and not config.lora_rank)):
        reference, _ = M.load_checkpoint(config.eval_reference or init, device, os.path.join(config.data_dir, "tokenizer.json"))
        reference.requires_grad_(False).eval()
    answers = [row.get("answer") for _, row in formats.read_jsonl(test_path)]  # this world's pairs carry one
    ref_margins = None if test_refs[0] is None else test_refs[0] - test_refs[1]
    metrics = preference_metrics(*accuracy, ref_margins, test_pairs, test_examples, answers)
    if config.eval_problems > 0:
        # the start's replies, if sft.py already drew them from the same weights with these settings
        known = known_replies(os.path.join(config.out, "sft", "replies.json"), reference,
                              [p["prompt"] for p in problems], config.max_new_tokens, config.seed)
        if known:
            print(f"dpo: the reference's replies read from {config.out}/sft/replies.json: the same weights, "
                  f"prompts and settings drew them")
        gen_metrics, ref_replies, pol_replies = compare_by_sampling(policy, reference, enc, problems, config, device,
                                                                    known)
        metrics.update(gen_metrics, eval_problems=len(problems))
        method = ("RPO" if config.rpo_alpha else "DPO") if config.loss_type == "sigmoid" else config.loss_type
        reference_name = config.eval_reference or init + (" without its adapters" if config.lora_rank else "")
        show_replies(f"reference ({reference_name}) | policy ({method})", problems,
                       {"reference": ref_replies, "policy": pol_replies})
    return metrics


def over_optimisation_warning(step, fall, margin, has_reference):
    """DPO's early warning: the chosen replies' log-prob fell while the margin grew."""
    below = "the reference's" if has_reference else "their start (a fixed batch)"
    return (f"warning: step {step}: the chosen log-prob fell {fall:.1f} nats below {below} on the same replies "
            f"while the margin grew to {margin:.2f}: both replies are being pushed down (over-optimisation; "
            f"lower --lr or --epochs{', or raise --beta' if has_reference else ''})")


def mean_or_0(values):
    return values.mean().item() if values.numel() else 0.0


def dpo_step_record(config, loss, logps, ref_logps, chosen_rewards, rejected_rewards, labels, lengths, grad_norm):
    """One DPO step's figures, in TRL's names (the shapes are dpo.batch_loss's): the loss, the rewards and their margin, the share of
    pairs ordered right, the log-probs, the gradient norm (and kl, nll_loss where they exist)."""
    B = len(logps) // 2
    if config.loss_type == "kto":  # unpaired: compare the two groups' means; right = reward's sign
        chosen_logps, rejected_logps = logps[:B][labels], logps[:B][~labels]  # desirable, undesirable
        margin = mean_or_0(chosen_rewards) - mean_or_0(rejected_rewards)
        accuracy = torch.cat([chosen_rewards > 0, rejected_rewards < 0]).float().mean().item()
    else:
        chosen_logps, rejected_logps = logps[:B], logps[B:]
        margins = chosen_rewards - rejected_rewards
        margin, accuracy = margins.mean().item(), (margins > 0).float().mean().item()  # strict: a tie is no win
    record = {
        "loss": loss.item(),
        "rewards/chosen": mean_or_0(chosen_rewards),
        "rewards/rejected": mean_or_0(rejected_rewards),
        "rewards/margins": margin,
        "rewards/accuracies": accuracy,
        "logps/chosen": mean_or_0(chosen_logps.detach()),
        "logps/rejected": mean_or_0(rejected_logps.detach()),
        "grad_norm": grad_norm.item()}
    if ref_logps is not None:  # the mean log-ratio on the batch's own replies (cheap, off-policy)
        record["kl"] = (logps.detach() - ref_logps).mean().item()
    if config.rpo_alpha:  # loss includes alpha * this: loss - alpha * nll_loss compares with plain DPO's
        record["nll_loss"] = chosen_nll(chosen_logps.detach(), lengths[:B]).item()
    return record


def rlvr_step_record(step, ro, has_spread, stats, step_loss, ratio_sum, clipped, grad_norm, opt, config):
    """One RL step's figures: the loss, reward, accuracy, the share of groups with no spread, the ratio
    and clipping, reply lengths, the gradient norm, and the KL when the reference ran."""
    n_tok = max(1, stats["tokens"])
    rec = {"step": step, "loss": step_loss, "reward": ro["rewards"].mean().item(),
           "accuracy": sum(ro["correct"]) / len(ro["correct"]),
           "zero_spread_groups": 1 - has_spread.float().mean().item(),
           # rho at the last inner step: exactly 1 with --inner-steps 1; with more, the drift
           "ratio": ratio_sum / n_tok if stats["tokens"] else 1.0,  # no update: nothing moved from 1
           "clip_fraction": clipped / (n_tok * config.inner_steps),
           "reply_length": sum(len(r) for r in ro["reply_ids"]) / len(ro["reply_ids"]),
           "capped": 1 - sum(ro["finished"]) / len(ro["finished"]),
           "grad_norm": grad_norm, "lr": opt.param_groups[0]["lr"]}
    if config.kl_coef:  # measured only when the reference runs (--kl-coef 0 skips it)
        rec["kl"] = stats["kl"] / n_tok
    return rec


def print_lm_summary(stage, metrics):
    """Pretraining's or SFT's closing lines, read from its metrics."""
    print(f"{stage}: loss {metrics['loss']:.3f}, val {metrics['val_loss']:.3f}, "
          f"{metrics['tokens_per_second'] / 1e3:.1f}k tok/s, MFU {metrics['mfu']:.0%} "
          f"(peak {metrics['peak_flops'] / 1e9:.0f} GFLOP/s), {metrics['wall_seconds']:.0f}s")
    if "accuracy" in metrics:
        by_ops = ", ".join(f"{k}: {v:.0%}" for k, v in metrics["accuracy_by_ops"].items())
        shares = ", ".join(f"{k} {v:.0%}" for k, v in metrics["style_shares"].items())
        print(f"{stage}: held-out accuracy greedy {metrics['accuracy']:.1%} (by operations: {by_ops}), "
              f"sampled {metrics['accuracy_sampled']:.1%}; sampled styles: {shares}")


def forward_passes(config, live_reference):
    """Forward passes' worth of work per row of a DPO step: the policy's forward and backward (1 + 2;
    KTO's mismatched rows, half of them, a forward only: see dpo.kto_logprobs), plus the forward of a
    live reference."""
    return (2 if config.loss_type == "kto" else 3) + (1 if live_reference else 0)


def count_work(work, policy, batch, rows, lengths, forwards):
    """Add one step's work to `work`: pairs, positions through the body (padding included: it costs
    FLOPs), scored positions, FLOPs done (the scored positions through the head) and FLOPs the loss
    needs (each prompt once, no padding), for `forwards` forward passes' worth (a forward and
    backward is 3). rows: the positions through the model (dpo.batch_logprobs), a tensor of ids
    per pass through it, its attention as long as its rows."""
    scored = int(lengths.sum())
    real = sum(len(ex["prompt"]) + len(ex["chosen"]) + len(ex["rejected"]) - 1 for ex in batch)  # each prompt once
    work["pairs"] += len(batch)
    work["tokens"] += sum(ids.numel() for ids in rows)
    work["scored"] += scored
    body = sum(M.training_flops(policy, ids.numel(), 0, ids.shape[1]) for ids in rows)
    work["done"] += (body + M.training_flops(policy, 0, scored, 0)) * forwards / 3
    context = max(len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"])) for ex in batch)  # any layout's
    work["needed"] += M.training_flops(policy, real, scored, context) * forwards / 3


def rates(work, seconds, peak):
    """Throughput and MFU of the work so far (count_work), over `seconds` of training."""
    return {"pairs_per_second": work["pairs"] / seconds, "tokens_per_second": work["tokens"] / seconds,
            "mfu": work["done"] / seconds / peak, "mfu_needed": work["needed"] / seconds / peak,
            "scored_share": work["scored"] / work["tokens"]}


def held_out_problems(config, enc, context):
    """The held-out problems a stage answers at the end (none with --eval-problems 0): their replies
    must fit the model's context, checked before any training."""
    if config.eval_problems <= 0:
        return []
    test_path = os.path.join(config.data_dir, "test.jsonl")
    problems = formats.read_problems(test_path)[: config.eval_problems]
    check_replies_fit(context, enc, [p["prompt"] for p in problems], config.max_new_tokens, test_path)
    return problems
