"""
Does DPO beat fine-tuning on the chosen replies? The DPO paper's baseline, Preferred-FT (the SFT
loss on each pair's chosen reply, in DPO's batches, for DPO's steps and learning-rate schedule),
against DPO on the same pairs; and the CoT-SFT stage (SFT on step-by-step replies only) before
DPO. Five arms from the same SFT model, each trained with five seeds and measured against the SFT
model on the same held-out problems and pairs:

    SFT | SFT + Preferred-FT | SFT + DPO | SFT + CoT-SFT | SFT + CoT-SFT + DPO

The measures: the judge's win rate against SFT, greedy and sampled accuracy, the step-by-step
share of the sampled replies, KL to SFT on the arm's own samples, held-out preference accuracy of
the implicit reward beta log pi/pi_SFT (beta 1, as dpo.py), and how far the held-out pairs'
rejected and chosen replies' log-probs moved from SFT's (DPO pushes the rejected down;
Preferred-FT need not). The training seed varies; the evaluation's sampling seed does not.

    python experiments/preferred_ft.py          (about 20 minutes on a 2-core CPU: docs/exercises.md)
    python experiments/preferred_ft.py --quick  (seconds: a tiny world, for tests)
"""

import os
import statistics

import common
import dpo
import evaluation as E
import model as M
import pairs
import plumbing as P
import sft
from data import formats

SEEDS = (1, 2, 3, 4, 5)
ARMS = ("SFT", "SFT + Preferred-FT", "SFT + DPO", "SFT + CoT-SFT", "SFT + CoT-SFT + DPO")
MEASURES = ("win_rate", "greedy_accuracy", "sampled_accuracy", "step_share", "kl", "pref_accuracy",
            "logp_rejected_change", "logp_chosen_change", "train_seconds")


def train_arms(s, seed):
    """Each arm's checkpoint for one training seed, and its training seconds."""
    out = os.path.join(s["dir"], f"seed{seed}")
    quick = dict(cot_steps=4, pft_steps=4, pft_batch_size=4, sft_batch_size=4, log_every=1, warmup_steps=1)
    later = dict(init=s["init"], seed=seed, out=out, data_dir=s["data_dir"], device=s["device"], eval_problems=0,
                 report=False, **(quick if s["quick"] else {}))
    pft = sft.train(sft.SFTConfig(stages="preferred-ft", **later))
    cot = sft.train(sft.SFTConfig(stages="cot", **later))
    cot_path = os.path.join(out, "cot", "model.pt")
    d = dpo.train(common.dpo_config(s, f"seed{seed}", seed=seed, eval_problems=0))
    cot_dpo = dpo.train(common.dpo_config(s, f"seed{seed}/cot", init=cot_path, seed=seed, eval_problems=0))
    return {"SFT + Preferred-FT": (os.path.join(out, "preferred_ft", "model.pt"), pft["wall_seconds"]),
            "SFT + DPO": (os.path.join(out, "dpo", "model.pt"), d["train_seconds"] + d["reference_pass_seconds"]),
            "SFT + CoT-SFT": (cot_path, cot["wall_seconds"]),
            "SFT + CoT-SFT + DPO": (os.path.join(out, "cot", "dpo", "model.pt"),
                                    cot["wall_seconds"] + cot_dpo["train_seconds"] + cot_dpo["reference_pass_seconds"])}


def held_out(s, enc):
    """The evaluation's problems and tokenised held-out pairs, and its settings (dpo.py's defaults)."""
    config = common.dpo_config(s, "eval")  # the evaluation's settings, its sampling seed fixed
    problems = formats.read_problems(os.path.join(s["data_dir"], "test.jsonl"))[: config.eval_problems]
    test_pairs = formats.read_pairs(os.path.join(s["data_dir"], "prefs_test.jsonl"))
    examples, _ = pairs.tokenize_pairs(enc, test_pairs, config.max_prompt_len, config.max_length)
    return config, problems, examples


def against_sft(s, path, reference, ref_logps, enc, config, problems, examples):
    """One arm's checkpoint measured against the SFT model (reference) on the held-out problems, by
    paired sampling, and on the held-out pairs, by the implicit reward and the log-probs."""
    device = P.pick_device(s["device"])
    pad = M.special(enc, "endoftext")
    policy, _ = M.load_checkpoint(path, device, os.path.join(s["data_dir"], "tokenizer.json"))
    policy.eval()
    known = E.known_replies(os.path.join(s["stages"], "sft", "replies.json"), reference,
                            [p["prompt"] for p in problems], config.max_new_tokens, config.seed)
    sampled, _, _ = E.compare_by_sampling(policy, reference, enc, problems, config, device, known)
    accuracy, _, _ = dpo.preference_accuracy(policy, examples, *ref_logps, config.beta, pad, device)
    chosen, rejected = dpo.pair_logprobs(policy, examples, pad, device)
    return {"win_rate": sampled["win_rate"], "greedy_accuracy": sampled["greedy_accuracy_policy"],
            "sampled_accuracy": sampled["accuracy_policy"], "step_share": sampled["style_shares_policy"]["step"],
            "kl": sampled["kl"], "pref_accuracy": accuracy,
            "logp_rejected_change": (rejected - ref_logps[1]).mean().item(),
            "logp_chosen_change": (chosen - ref_logps[0]).mean().item()}, sampled


def summary(runs):
    """Per arm and measure: the median over seeds and its range, as numbers and as table cells."""
    medians, cells = [], []
    for arm in ARMS:
        median, cell = {"arm": arm, "seeds": len(runs[arm])}, {"arm": arm, "seeds": len(runs[arm])}
        for k in MEASURES:
            values = [r[k] for r in runs[arm] if r.get(k) is not None]
            if values:
                median[k], median[k + "_range"] = statistics.median(values), [min(values), max(values)]
                cell[k] = f"{median[k]:.3g}" + (f" ({min(values):.3g} to {max(values):.3g})" if len(values) > 1 else "")
        medians.append(median)
        cells.append(cell)
    return medians, cells


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    s = common.setup("preferred_ft", args)
    device = P.pick_device(s["device"])
    tok_path = os.path.join(s["data_dir"], "tokenizer.json")
    enc = M.load_tokenizer(tok_path)
    config, problems, examples = held_out(s, enc)
    reference, _ = M.load_checkpoint(s["init"], device, tok_path)
    reference.requires_grad_(False).eval()
    ref_logps = dpo.pair_logprobs(reference, examples, M.special(enc, "endoftext"), device)
    runs = {arm: [] for arm in ARMS}
    seeds = SEEDS[:1] if s["quick"] else SEEDS
    for seed in seeds:
        for arm, (path, seconds) in train_arms(s, seed).items():
            measured, sampled = against_sft(s, path, reference, ref_logps, enc, config, problems, examples)
            runs[arm].append({**measured, "train_seconds": seconds, "seed": seed})
            print(f"preferred_ft: seed {seed}, {arm}: win {measured['win_rate']:.1%}, greedy "
                  f"{measured['greedy_accuracy']:.1%}, sampled {measured['sampled_accuracy']:.1%}")
    # the SFT model itself, once: its figures against itself are the table's baseline (no win rate, KL 0)
    runs["SFT"] = [{"greedy_accuracy": sampled["greedy_accuracy_ref"], "sampled_accuracy": sampled["accuracy_ref"],
                    "step_share": sampled["style_shares_ref"]["step"], "kl": 0.0, "logp_rejected_change": 0.0,
                    "logp_chosen_change": 0.0}]
    medians, cells = summary(runs)
    common.write_results(s, {"rows": cells, "medians": medians, "runs": runs, "eval_problems": len(problems),
                             "seeds": list(seeds)}, ["arm", "seeds", *MEASURES], f"Preferred-FT, DPO and CoT-SFT from the same SFT model: medians over "
                         f"{len(seeds)} seeds, {len(problems)} held-out problems, {len(examples)} held-out pairs")

    def draw(plt):
        for arm in ARMS[1:]:
            xs = [r["greedy_accuracy"] for r in runs[arm]]
            ys = [r["win_rate"] for r in runs[arm]]
            plt.scatter(xs, ys, label=arm, alpha=0.7)
        plt.axvline(runs["SFT"][0]["greedy_accuracy"], color="gray", linestyle="--", label="SFT's greedy accuracy")
        plt.axhline(0.5, color="gray", linestyle=":")
        plt.xlabel("greedy accuracy (held-out problems)")
        plt.ylabel("judge win rate against SFT")
        plt.legend(fontsize=7)

    common.plot(s, draw)
    return medians


if __name__ == "__main__":
    common.run(main)
