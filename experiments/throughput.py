"""
How fast is a DPO step, and how much of its work does the loss need? DPO training steps on this
project's own preference pairs (batch 32, reference log-probs precomputed, as dpo.py trains), at
the default size and at ~5M parameters (6 layers, 8 heads, 256 wide), from a random init: the
output layer and its log_softmax over the vocabulary at every position (plain), only at the
response positions the loss scores (scored: model.shifted_logprobs, what dpo.py runs), and the
prompt computed once for both replies of a pair (shared prefix: dpo.shared_prefix_logprobs, with
--prefix-sharing and --no-packing), short pairs packed several to a row, in one pass through the
model or in two, the emptier rows in a shorter second one (packed: what dpo.py runs), and that on
batches of pairs of similar length (bucketed: dpo.py's --bucket-by-length, plumbing.next_indices).
Each variant runs several times in this one process, alternating; the table gives medians, the
ratio to plain, and MFU two ways: of the work done, and of the work the loss needs (each prompt
once, no padding, the head on scored positions).

    python experiments/throughput.py            (a few minutes on a 2-core CPU)
    python experiments/throughput.py --quick    (seconds: a tiny world, for tests)
"""

import functools
import os
import random
import statistics
import time

import common
import torch

import dpo
import model as M
import pairs
import plumbing as P
from data import formats

SIZES = {"default": dict(n_layer=4, n_head=4, n_embd=128), "5M": dict(n_layer=6, n_head=8, n_embd=256)}
BATCH, STEPS, REPEATS = 32, 8, 3


def plain_sequence_logprobs(model, ids, mask):
    """dpo.sequence_logprobs the plain way: the output layer at every position, then the mask."""
    with P.autocast(ids.device):
        logits = model(ids[:, :-1])  # (B, T-1, V)
    logps = M.token_logprobs(logits, ids[:, 1:])  # (B, T-1)
    return (logps * mask[:, 1:]).sum(-1)  # (B,)


# each variant: how its batches of pairs are drawn (from the whole shuffled file, or bucketed by
# length), how a batch is laid out, and how its (2B,) log-probs are computed
VARIANTS = {"plain": ("shuffled", pairs.collate, lambda model, batch: plain_sequence_logprobs(model, *batch)),
            "scored": ("shuffled", pairs.collate, lambda model, batch: dpo.sequence_logprobs(model, *batch)),
            "shared prefix": ("shuffled", functools.partial(pairs.shared_prefix_batch, packed=False),
                              dpo.shared_prefix_logprobs),
            "shared prefix, packed, one pass": ("shuffled", functools.partial(pairs.shared_prefix_batch, split=False),
                                                dpo.shared_prefix_logprobs),
            "shared prefix, packed": ("shuffled", pairs.shared_prefix_batch, dpo.shared_prefix_logprobs),
            "shared prefix, packed, bucketed": ("bucketed", pairs.shared_prefix_batch, dpo.shared_prefix_logprobs)}


def draws(examples, steps):
    """The batches each way of drawing them: BATCH pairs at random from the file, or as dpo.py's
    --bucket-by-length draws them (a shuffled pass, bucketed by row length)."""
    rng, order, lengths = random.Random(0), [], pairs.row_lengths(examples)
    return {"shuffled": [rng.sample(examples, BATCH) for _ in range(steps)],
            "bucketed": [[examples[i] for i in P.next_indices(order, len(examples), BATCH, rng, lengths)]
                         for _ in range(steps)]}


def through_the_body(batch):
    """The ids a laid-out batch sends through the model, a tensor per pass (as dpo.batch_logprobs
    returns them): a row per reply (ids, mask) all but its last token, which is only a target; a
    shared-prefix batch each pass's rows whole (its prompt's last state is a source)."""
    return [p["ids"] for p in batch["passes"]] if isinstance(batch, dict) else [batch[0][:, :-1]]


def body_flops(policy, batch):
    """FLOPs of a forward and backward through the model's body (the output layer apart) on a
    laid-out batch: each pass's attention as long as its own rows."""
    return sum(M.training_flops(policy, ids.numel(), 0, ids.shape[1]) for ids in through_the_body(batch))


def timed_steps(policy, opt, batches, ref, logprobs):
    """Seconds for DPO steps on these batches (each: log-probs, the loss, backward, AdamW)."""
    t0 = time.perf_counter()
    for batch, (rc, rr) in zip(batches, ref):
        logps = logprobs(policy, batch)  # (2B,): chosen replies, then rejected
        B = len(logps) // 2
        loss, _, _ = dpo.dpo_loss(logps[:B], logps[B:], rc, rr, beta=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def measure(size, examples, vocab, device, steps, repeats):
    torch.manual_seed(0)
    policy = M.GPT(M.GPTConfig(vocab_size=vocab, **SIZES[size])).to(device).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    drawn = draws(examples, steps)
    batches = {name: [layout(batch, 0, device) for batch in drawn[how]] for name, (how, layout, _) in VARIANTS.items()}
    per_draw = {}  # each way of drawing: the reference's log-probs, the scored tokens, FLOPs the loss needs
    for how, drawn_batches in drawn.items():
        two_rows = [pairs.collate(batch, 0, device) for batch in drawn_batches]  # the reference scores these
        with torch.no_grad():
            ref = [(lp[:BATCH], lp[BATCH:]) for lp in (dpo.sequence_logprobs(policy, *b) for b in two_rows)]
        scored = sum(int(mask[:, 1:].sum()) for _, mask in two_rows)
        # each prompt once, no padding, attention as long as a batch's longest prompt and reply (as dpo.py counts)
        needed = sum(M.training_flops(policy, sum(n - 1 for n in pairs.row_lengths(batch)), int(mask[:, 1:].sum()),
                                      ids.shape[1]) for batch, (ids, mask) in zip(drawn_batches, two_rows))
        per_draw[how] = {"ref": ref, "scored": scored, "needed": needed}
    positions, done = {}, {}
    for name, (how, _, _) in VARIANTS.items():
        positions[name] = sum(ids.numel() for b in batches[name] for ids in through_the_body(b))
        head = positions[name] if name == "plain" else per_draw[how]["scored"]  # plain: the head everywhere
        done[name] = sum(body_flops(policy, b) for b in batches[name]) + M.training_flops(policy, 0, head, 0)
    for name, (how, _, fn) in VARIANTS.items():  # warm up
        timed_steps(policy, opt, batches[name][:1], per_draw[how]["ref"][:1], fn)
    seconds = {v: [] for v in VARIANTS}
    for _ in range(repeats):  # alternating, so a drift of the machine's speed hits all alike
        for name, (how, _, fn) in VARIANTS.items():
            seconds[name].append(timed_steps(policy, opt, batches[name], per_draw[how]["ref"], fn))
    peak = P.peak_flops(device)
    rows = []
    for name, (how, _, _) in VARIANTS.items():
        s, d = statistics.median(seconds[name]), per_draw[how]
        rows.append({"size": size, "parameters": policy.num_params(), "variant": name,
                     "pairs_per_second": BATCH * steps / s, "tokens_per_second": positions[name] / s,
                     "scored_tokens_per_second": d["scored"] / s, "mfu": done[name] / s / peak,
                     "mfu_needed": d["needed"] / s / peak,
                     "speedup": statistics.median(seconds["plain"]) / s, "peak_gflops": peak / 1e9,
                     "range_seconds": f"{min(seconds[name]):.2f}-{max(seconds[name]):.2f}"})
    return rows


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    s = common.setup("throughput", args)
    device = P.pick_device(args.device)
    enc = M.load_tokenizer(os.path.join(s["data_dir"], "tokenizer.json"))
    raw = formats.read_pairs(os.path.join(s["data_dir"], "prefs.jsonl"))
    examples, _ = pairs.tokenize_pairs(enc, raw, 96, 192)
    steps, repeats, sizes = (2, 2, ["default"]) if s["quick"] else (STEPS, REPEATS, list(SIZES))
    rows = [row for size in sizes for row in measure(size, examples, enc.n_vocab, device, steps, repeats)]
    common.write_results(s, {"rows": rows}, ["size", "parameters", "variant", "pairs_per_second",
                                             "tokens_per_second", "scored_tokens_per_second", "mfu", "mfu_needed",
                                             "speedup", "peak_gflops", "range_seconds"],
                         f"DPO steps, batch {BATCH}, {steps} steps x {repeats} alternating runs (medians)")


if __name__ == "__main__":
    common.run(main)
