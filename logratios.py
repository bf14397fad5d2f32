"""
See which tokens DPO pushed: every response token of a preference pair coloured by its log-ratio
under the policy against the reference,

    log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t),

pushed up in green, pushed down in red, the stronger the further it moved. Summed over a response
they give log pi(y|x) - log pi_ref(y|x), and beta times that sum is the implicit reward (eq. 5) the
training log reports, so each pair's header shows both rewards and their margin: this is the DPO
gradient's work, token by token (which tokens of a rejected reply went down: its style words? its
wrong number? the ending both replies share?).

    python logratios.py                      (held-out pairs 0-2: out/dpo/model.pt against out/sft/model.pt)
    python logratios.py --pair 7 --first 1   (held-out pair 7 alone)
    python logratios.py --prompt "Ana has 7 pens." --chosen "The answer is 7." --rejected "The answer is 9."
    python logratios.py --policy out/rlvr/model.pt --reference out/dpo/model.pt --sample 3
                                             (three replies the RL policy samples, against its DPO start)

Writes the terminal view (ANSI colour; plain text with the numbers when stdout is not a terminal or
NO_COLOR is set) and a self-contained HTML page (inline CSS, nothing loaded from anywhere; each
token's exact value on hover), out/logratios.html by default.
"""

import html
import os
import sys
from dataclasses import dataclass

import torch

import model as M
import plumbing as P
from data import formats
from data.prepare import DATA_DIR, ensure_data
from plumbing import option


@dataclass
class LogratioConfig:
    policy: str = option("", "the policy checkpoint (default: <out>/dpo/model.pt)", "models")
    reference: str = option("", "the reference checkpoint (default: <out>/sft/model.pt)", "models")
    beta: float = option(0.0, "the implicit reward's beta (0: the policy's own, from its checkpoint, else 1)",
                         "models")
    pair: int = option(0, "the first held-out pair shown (a row of <data-dir>/prefs_test.jsonl)", "replies")
    first: int = option(3, "how many held-out pairs, from --pair on", "replies")
    prompt: str = option("", "a prompt of your own: with --chosen and --rejected, or with --sample", "replies")
    chosen: str = option("", "the chosen reply to --prompt", "replies")
    rejected: str = option("", "the rejected reply to --prompt", "replies")
    sample: int = option(0, "instead of pairs: this many replies sampled from the policy (to --prompt, or to "
                         "held-out problems from --pair on) against the reference", "replies")
    seed: int = option(1337, "random seed for --sample", "replies")
    html: str = option("", "the HTML page written (default: <out>/logratios.html)", "run")
    out: str = option(P.OUT_DIR, "where the stages wrote their checkpoints (default: out/ in the repository)", "run")
    data_dir: str = option(DATA_DIR, "the tokenizer and the held-out files (built if missing)", "run")
    device: str = option("auto", "auto | cpu | cuda | mps", "run")


# ----------------------------------------------------------------------------------------------
# The numbers: the per-token log-ratio, its sum, the implicit reward


@torch.no_grad()
def token_logratios(policy, reference, prompt_ids, response_ids, device="cpu"):
    """Per response token: log pi(y_t | x, y_<t) and log pi_ref(y_t | x, y_<t), both fp32, in one
    batch for all the responses (each a list of ids after its prompt's).
    -> [(policy_logps, ref_logps)] per response, each a list of len(response) floats."""
    pad = 0  # padded positions are masked out, so the pad id does not matter
    ids, mask = M.prompt_response_batch(prompt_ids, response_ids, pad, device)
    with P.eval_mode(policy), P.eval_mode(reference):
        policy_logps, scored = M.shifted_logprobs(policy, ids, mask)  # (N, T-1) each
        ref_logps, _ = M.shifted_logprobs(reference, ids, mask)  # (N, T-1)
    out = []
    for n, response in enumerate(response_ids):
        keep = scored[n].bool()  # position t-1 holds token t's values
        out.append((policy_logps[n][keep].tolist(), ref_logps[n][keep].tolist()))
        assert len(out[-1][0]) == len(response)
    return out


def view(enc, policy, reference, items, beta, device="cpu"):
    """items: [{"prompt", "replies": [(label, reply ids)]}]. -> the same items with, for each reply,
    its tokens (text pieces), per-token log-ratios, their sum and beta times it (the reward)."""
    prompts = [M.render_prompt(enc, it["prompt"]) for it in items for _ in it["replies"]]
    responses = [ids for it in items for _, ids in it["replies"]]
    scores = iter(token_logratios(policy, reference, prompts, responses, device))
    shown = []
    for it in items:
        replies = []
        for label, ids in it["replies"]:
            pol, ref = next(scores)
            ratios = [p - r for p, r in zip(pol, ref)]
            replies.append({"label": label, "tokens": [piece(enc, t) for t in ids], "logratios": ratios,
                            "policy_logps": pol, "ref_logps": ref, "sum": sum(ratios), "reward": beta * sum(ratios)})
        shown.append({**it, "replies": replies})
    return shown


def piece(enc, token):
    """A token's text (a special token by its name)."""
    return enc.decode_single_token_bytes(token).decode("utf-8", errors="replace")


def most_moved(shown, n=5):
    """The tokens that moved most over everything shown: (pushed up, pushed down), each a list of
    (token text, mean log-ratio, count), n each, among tokens seen at least twice."""
    seen = {}
    for it in shown:
        for r in it["replies"]:
            for tok, v in zip(r["tokens"], r["logratios"]):
                seen.setdefault(tok, []).append(v)
    means = [(tok, sum(v) / len(v), len(v)) for tok, v in seen.items() if len(v) >= 2 and abs(sum(v) / len(v)) >= 5e-3]
    means.sort(key=lambda x: x[1])
    return list(reversed(means[-n:])), means[:n]


# ----------------------------------------------------------------------------------------------
# The pictures: the terminal and an HTML page


def scale(shown):
    """The colour scale: the largest |log-ratio| shown (so the strongest token is the brightest)."""
    return max([abs(v) for it in shown for r in it["replies"] for v in r["logratios"]] + [1e-6])


def header(it, r):
    return f"[{r['label']}] reward {r['reward']:+.3f} (sum of log-ratios {r['sum']:+.3f})"


def margin_line(it):
    rewards = {r["label"]: r["reward"] for r in it["replies"]}
    if set(rewards) == {"chosen", "rejected"}:
        return f"margin r_w - r_l = {rewards['chosen'] - rewards['rejected']:+.3f}"
    return ""


def terminal(shown, color):
    """The view as text: ANSI background colours, or plain text with each token's value after it."""
    top = scale(shown)
    lines = []
    for it in shown:
        lines.append(f"USER: {prompt_text(it['prompt'])}" + (f"  ({it['title']})" if it.get("title") else ""))
        for r in it["replies"]:
            lines.append(header(it, r))
            if color:
                text = "".join(ansi(tok, v, top) for tok, v in zip(r["tokens"], r["logratios"]))
            else:
                text = "".join(f"{tok}({v:+.2f})" for tok, v in zip(r["tokens"], r["logratios"]))
            lines.append("  " + text.replace("\n", "\n  "))
        if margin_line(it):
            lines.append(margin_line(it))
        lines.append("")
    return "\n".join(lines)


def rgb(value, top):
    """Green for up, red for down, from white at 0 to full at |value| = top."""
    a = min(1.0, abs(value) / top)
    return (round(255 * (1 - a)), 255, round(255 * (1 - a))) if value > 0 else (255, round(255 * (1 - a)),
                                                                                 round(255 * (1 - a)))


def ansi(token, value, top):
    r, g, b = rgb(value, top)
    on = f"\x1b[48;2;{r};{g};{b}m\x1b[30m"  # the background by value, black text
    return "\n".join(on + part + "\x1b[0m" if part else "" for part in token.split("\n"))


def page(shown, title):
    """A self-contained HTML page: inline CSS, one <span class="tok"> per response token, its exact
    log-ratio in data-logratio and on hover."""
    top = scale(shown)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}"
             "</title>\n<style>\n" + CSS + "</style>\n</head>\n<body>\n"
             f"<h1>{html.escape(title)}</h1>\n<p class=\"legend\">Each response token is coloured by log pi(y_t) - "
             f"log pi_ref(y_t): <span class=\"up\">pushed up</span>, <span class=\"down\">pushed down</span>, "
             f"full colour at |{top:.3f}| nats. Hover a token for its value.</p>\n"]
    for it in shown:
        parts.append("<section class=\"pair\">\n<p class=\"prompt\"><b>USER</b> " + html.escape(prompt_text(it["prompt"]))
                     + (f" <i>({html.escape(it['title'])})</i>" if it.get("title") else "") + "</p>\n")
        for r in it["replies"]:
            parts.append(f"<p class=\"head\">{html.escape(header(it, r))}</p>\n<p class=\"reply\">")
            for tok, v, pl, rl in zip(r["tokens"], r["logratios"], r["policy_logps"], r["ref_logps"]):
                red, green, blue = rgb(v, top)
                parts.append(f"<span class=\"tok\" data-logratio=\"{v:.6f}\" style=\"background:rgb({red},{green},"
                             f"{blue})\" title=\"{v:+.4f} (policy {pl:.4f}, reference {rl:.4f})\">"
                             f"{html.escape(tok)}</span>")
            parts.append("</p>\n")
        if margin_line(it):
            parts.append(f"<p class=\"margin\">{html.escape(margin_line(it))}</p>\n")
        parts.append("</section>\n")
    parts.append("</body>\n</html>\n")
    return "".join(parts)


CSS = """body { font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; color: #222; }
.pair { border-top: 1px solid #ccc; padding: 0.5em 0; }
.reply { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; }
.tok { border-radius: 2px; }
.up { background: rgb(120, 255, 120); } .down { background: rgb(255, 120, 120); }
.head, .margin { color: #555; margin: 0.3em 0; }
"""


# ----------------------------------------------------------------------------------------------
# The command line


def check_replies(config):
    """The flags that say what to show, checked before any model is loaded (ConfigError)."""
    P.check_flags(config, positive=("first",), non_negative=("pair", "sample", "beta"))
    P.require(not (config.chosen or config.rejected) or (config.prompt and not config.sample),
              "--chosen and --rejected go with --prompt, and not with --sample")
    P.require(not config.prompt or config.sample or (config.chosen and config.rejected),
              "--prompt needs --chosen and --rejected (or --sample N)")


def prompt_text(prompt):
    """A prompt as text: a string as it is, a conversation one "role: content" line per message."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def fits(enc, item, context):
    """Whether every reply of an item, after its prompt, fits a model's context."""
    prompt = len(M.render_prompt(enc, item["prompt"]))
    return all(prompt + len(ids) <= context for _, ids in item["replies"])


def items_from(config, enc, policy):
    """What to show: held-out pairs, a pair of your own, or replies sampled from the policy."""
    if config.sample:
        if config.prompt:
            prompts, titles = [config.prompt] * config.sample, [f"sample {i}" for i in range(config.sample)]
        else:
            problems = formats.read_problems(os.path.join(config.data_dir, "test.jsonl"))
            P.require(config.pair < len(problems), f"--pair {config.pair}: there are {len(problems)} held-out "
                      f"problems")
            problems = problems[config.pair: config.pair + config.sample]
            prompts, titles = [p["prompt"] for p in problems], [f"held-out problem {config.pair + i}"
                                                                  for i in range(len(problems))]
        _, ids = M.sample_replies(policy, enc, prompts, seed=config.seed, return_ids=True)
        return [{"prompt": p, "title": t, "replies": [("sample", r)]} for p, t, r in zip(prompts, titles, ids)]
    if config.prompt:
        pairs, titles = [(config.prompt, config.chosen, config.rejected)], ["your pair"]
    else:
        every = formats.read_pairs(os.path.join(config.data_dir, "prefs_test.jsonl"))
        P.require(config.pair < len(every), f"--pair {config.pair}: there are {len(every)} held-out pairs")
        pairs = every[config.pair: config.pair + config.first]
        titles = [f"held-out pair {config.pair + i}" for i in range(len(pairs))]
    return [{"prompt": p, "title": t, "replies": [("chosen", M.render_response(enc, c)),
                                                  ("rejected", M.render_response(enc, r))]}
            for (p, c, r), t in zip(pairs, titles)]


def policy_beta(ckpt, beta):
    """--beta, or the beta the policy was trained with (its checkpoint's train_config), else 1."""
    return beta or float((ckpt.get("train_config") or {}).get("beta", 1.0))


def run(config):
    check_replies(config)
    device = P.pick_device(config.device)
    policy_path = P.require_file(config.policy or os.path.join(config.out, "dpo", "model.pt"))
    reference_path = P.require_file(config.reference or os.path.join(config.out, "sft", "model.pt"))
    ensure_data(config.data_dir)
    tokenizer_path = os.path.join(config.data_dir, "tokenizer.json")
    enc = M.load_tokenizer(tokenizer_path)
    policy, ckpt = M.load_checkpoint(policy_path, device, tokenizer_path)
    reference, _ = M.load_checkpoint(reference_path, device, tokenizer_path)
    beta = policy_beta(ckpt, config.beta)
    items = items_from(config, enc, policy)
    context = min(policy.config.block_size, reference.config.block_size)
    P.require(all(fits(enc, it, context) for it in items), f"a reply after its prompt runs past the models' "
              f"context of {context} tokens: pick shorter ones")
    shown = view(enc, policy, reference, items, beta, device)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(terminal(shown, color))
    up, down = most_moved(shown)
    print("most pushed up:   " + ", ".join(f"{t!r} {v:+.2f} (x{n})" for t, v, n in up))
    print("most pushed down: " + ", ".join(f"{t!r} {v:+.2f} (x{n})" for t, v, n in down))
    path = config.html or os.path.join(config.out, "logratios.html")
    P.write_text(path, page(shown, f"log pi / pi_ref per token: {policy_path} against {reference_path} "
                                   f"(beta {beta:g})"))
    print(f"logratios: {path}")
    return shown


def main(argv=None):
    P.run_cli(__doc__, LogratioConfig, run, argv, show_config=False)


if __name__ == "__main__":
    main()
