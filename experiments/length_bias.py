"""
Does DPO make replies longer? DPO from the same SFT checkpoint on three versions of the same
preference pairs: the default; "biased", where every chosen reply gets filler lines, so that
longer is systematically preferred; and "balanced", where the shorter reply of every pair is
padded with the same filler until it is as long as the other, so that length says nothing. The
judge's labels do not change: the filler has no style and no arithmetic, and correctness and style
decide every pair by margins the filler's length cannot reach. (A terse reply is one line, and a
filler line would make it another style, so terse replies are never padded, and the balanced set
leaves out the pairs whose shorter reply is terse.) A fourth run trains on the biased
pairs with sigmoid_norm, DPO on per-token average log-ratios, which length cannot inflate.
A fifth asks the opposite question: the judge prefers the shorter of two replies alike in
correctness and style, but no default pair sets two such replies against each other; with a
fifth of the pairs replaced by ones that do ("shorter"), does the policy learn to be brief?

    python experiments/length_bias.py           (minutes on a 2-core CPU: docs/exercises.md)
    python experiments/length_bias.py --quick   (seconds: a tiny world, for tests)
"""

import os
import random

import common
from data import formats, world
from data.prepare import write_jsonl

FILLER = ["Let me write that out clearly.", "Here is how I worked it out in my head."]
EVAL_PROBLEMS = 300


def pad(reply, lines):
    """The reply with filler lines inserted before its final line (which must stay last)."""
    head, _, final = reply.rpartition("\n")
    return "\n".join(([head] if head else []) + lines + [final])


def paddable(reply):
    """Filler keeps every style but terse, whose one line is the style."""
    return world.classify_style(reply) != "terse"


def biased(rows, filler=FILLER):
    """Every chosen reply gets the filler lines (but terse ones): longer is preferred more often."""
    return [{**r, "chosen": pad(r["chosen"], filler)} if paddable(r["chosen"]) else r for r in rows]


def balanced(rows, rng, filler=FILLER):
    """The shorter reply of each pair gets filler lines until it is at least as long as the other:
    after this, length no longer tells chosen from rejected. Pairs whose shorter reply is terse
    are left out: it cannot be padded without becoming another style."""
    out = []
    for r in rows:
        short, long_ = ("chosen", "rejected") if len(r["chosen"]) < len(r["rejected"]) else ("rejected", "chosen")
        if not paddable(r[short]):
            continue
        lines = []
        while len(pad(r[short], lines)) < len(r[long_]):
            lines.append(rng.choice(filler))
        out.append({**r, short: pad(r[short], lines)})
    return out


# enough pairs (~600 of the 3000 trained on) to teach a rule, while most still teach style and answers
SHORTER_SHARE = 0.2


def shorter(rows, rng, share=SHORTER_SHARE, styles=tuple(world.STYLES)):
    """A share of the pairs, drawn at random, replaced by pairs that only the judge's last rule
    decides: two right replies to a new training problem, in one style (drawn from styles), the
    shorter one chosen."""
    if not set(styles) - {"terse"}:  # the draw below would never end
        raise ValueError("two terse replies to one problem are the same line: no length to prefer")
    out = []
    for r in rows:
        if rng.random() >= share:
            out.append(r)
            continue
        while True:  # equal lengths (two terse replies are the same line) leave nothing to prefer: draw again
            pr = world.sample_problems(rng, 1, heldout=False)[0]
            style = rng.choice(styles)
            a, b = (world.make_reply(rng, pr, style) for _ in range(2))
            if len(a) != len(b):
                break
        chosen, rejected = sorted((a, b), key=len)
        out.append({"prompt": pr["prompt"], "chosen": chosen, "rejected": rejected, "answer": pr["answer"]})
    return out


def length_gap(rows):
    """Mean characters by which chosen is longer than rejected."""
    return sum(len(r["chosen"]) - len(r["rejected"]) for r in rows) / len(rows)


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    s = common.setup("length_bias", args)
    rows = [r for _, r in formats.read_jsonl(os.path.join(s["data_dir"], "prefs.jsonl"))]
    sets = {"default": rows, "biased": biased(rows), "balanced": balanced(rows, random.Random(0)),
            "shorter": shorter(rows, random.Random(0))}
    runs = [("default", "sigmoid"), ("biased", "sigmoid"), ("balanced", "sigmoid"), ("biased", "sigmoid_norm"),
            ("shorter", "sigmoid")]
    out = []
    for data, loss_type in runs:
        path = os.path.join(s["dir"], f"prefs_{data}.jsonl")
        write_jsonl(path, sets[data])
        overrides = {} if s["quick"] else {"eval_problems": EVAL_PROBLEMS}
        m = common.dpo.train(common.dpo_config(s, f"{data}_{loss_type}", data=path, loss_type=loss_type, **overrides))
        out.append({"data": data, "loss_type": loss_type, "pairs": len(sets[data]),
                    "chosen_minus_rejected_chars": length_gap(sets[data]),
                    "len_ref": m["length_ref"], "len_policy": m["length_policy"], "win_rate": m["win_rate"],
                    "judge_score": m["judge_score_policy"], "accuracy": m["accuracy_policy"], "kl": m["kl"]})
    common.write_results(s, {"rows": out}, ["data", "loss_type", "pairs", "chosen_minus_rejected_chars", "len_ref",
                                            "len_policy", "win_rate", "judge_score", "accuracy", "kl"],
                         "DPO on default, length-biased, length-balanced and shorter-preferred pairs (reply lengths in characters)")

    def draw(plt):
        labels = [f"{r['data']}\n{r['loss_type']}" for r in out]
        plt.bar(labels, [r["len_policy"] for r in out], label="policy")
        plt.axhline(out[0]["len_ref"], color="black", linestyle="--", label="SFT reference")
        plt.ylabel("mean reply length (characters)")
        plt.legend()

    common.plot(s, draw)
    return out


if __name__ == "__main__":
    common.run(main)
