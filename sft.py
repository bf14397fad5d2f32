"""
Stage 1 and 2: pretrain a tiny GPT on the world's prose, then supervised fine-tuning (SFT) on
conversations, with the loss on the assistant's tokens only.

    python sft.py                      (data, pretraining, SFT and evaluation)
    python sft.py --stages sft         (SFT only, from out/pretrain/model.pt)
    python sft.py --stages cot         (CoT-SFT from out/sft/model.pt; then dpo.py --init out/cot/model.pt)
    python sft.py --stages preferred-ft  (Preferred-FT, DPO's baseline, from out/sft/model.pt)
    python sft.py --resume             (a cut run goes on from out/<stage>/state.pt: docs/scale.md)
    python sft.py --help

Pretraining is next-token prediction on random windows of the text stream, each document opened
by <|endoftext|>:
    L_pretrain = -1/T sum_t log p(x_t | x_<t)
SFT is the same loss restricted to the reply: with m_t = 1 on assistant tokens (and the <|end|>
closing the reply; 0 on the prompt, the template and padding),
    L_sft = -sum_t m_t log p(x_t | x_<t) / sum_t m_t
averaged over every assistant token of the batch (a token-level mean, so long replies count in
proportion to their length).

Two later stages start from the SFT model and reuse the same loss and loop on other replies:
CoT-SFT on step-by-step replies only (data/cot.jsonl), the stage between SFT and DPO in the
pretrain -> SFT -> CoT -> DPO -> RL pipeline; and Preferred-FT, the DPO paper's baseline: the SFT
loss on the chosen reply of each of DPO's training pairs, in DPO's batches, for DPO's steps and
learning-rate schedule, so that what DPO buys with the rejected reply can be measured
(experiments/preferred_ft.py).

At the end the SFT model answers the held-out problems (data/test.jsonl) greedily and by sampling
at temperature 1; the verifier scores both and the share of each reply style is counted.
Outputs: out/pretrain/ and out/sft/ (out/cot/, out/preferred_ft/), each with model.pt, log.jsonl
and metrics.json. The text and conversations become token rows and batches in corpus.py.

How this departs from a real pipeline:
1. The "pretraining corpus" is a few MB of synthetic text from the same world as the tasks.
2. SFT rows are padded to the batch's longest row (no packing): simpler, but a share of the tokens
   through the model are padding (measured: docs/log.md).
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
from corpus import fixed_batches, pretrain_stream, row_batches, sft_examples
from data import formats
from data.prepare import DATA_DIR, ensure_data
from pairs import DPO_LENGTHS, preferred_rows  # noqa: F401 (sft.preferred_rows)
from plumbing import option

STAGES = ("pretrain", "sft", "cot", "preferred-ft")
# Preferred-FT trains as dpo.py does (tests/test_sft.py holds it to dpo.DPOConfig's defaults): its
# schedule and optimizer; its rows are pairs.preferred_rows, dpo.py's pairs in dpo.py's order
DPO_SCHEDULE = {"schedule": "linear", "warmup": 10, "min_ratio": 0.0, "weight_decay": 0.0}


@dataclass
class SFTConfig(R.ResumeOptions, presets.RunOptions):
    # model
    n_layer: int = option(4, "transformer blocks", "model")
    n_head: int = option(4, "attention heads", "model")
    n_embd: int = option(128, "embedding width", "model")
    block_size: int = option(192, "longest sequence the model can take", "model")
    # pretraining
    pretrain_steps: int = option(800, "pretraining optimizer steps", "pretraining")
    # small batches, many steps: memorising the arithmetic tables takes optimizer steps more than
    # tokens (the facts-only probe that showed it: docs/log.md)
    pretrain_batch_size: int = option(16, "windows per pretraining step", "pretraining")
    pretrain_seq_len: int = option(128, "tokens per pretraining window", "pretraining")
    pretrain_lr: float = option(3e-3, "peak learning rate (tiny models like a high one)", "pretraining")
    # SFT
    sft_steps: int = option(600, "SFT optimizer steps", "sft")
    sft_batch_size: int = option(16, "conversations per SFT step", "sft")
    grad_accum: int = option(1, "gradient accumulation: each process's share of a batch (on several processes, "
                             "torchrun) in K micro-batches, one after the other (the same step, less memory)",
                             "optimisation")
    sft_lr: float = option(1e-3, "peak SFT learning rate", "sft")
    # shared optimisation
    warmup_steps: int = option(30, "linear warmup steps, then cosine decay to 10%", "optimisation")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not on norms)", "optimisation")
    grad_clip: float = option(1.0, "clip the gradient norm to this", "optimisation")
    compile: bool = option(False, "run the training forward through torch.compile (the first steps compile it)",
                           "optimisation")
    # evaluation
    eval_every: int = option(200, "steps between validation losses", "evaluation")
    eval_problems: int = option(500, "held-out problems answered at the end (0 = skip)", "evaluation")
    max_new_tokens: int = option(96, "longest reply sampled at evaluation", "evaluation")
    # the later stages, from the SFT model; Preferred-FT's defaults are dpo.py's (steps, batch, lr, pairs)
    init: str = option("", "checkpoint cot and preferred-ft start from (default: <out>/sft/model.pt)", "later stages")
    cot_steps: int = option(200, "CoT-SFT steps, on <data-dir>/cot.jsonl", "later stages")
    cot_lr: float = option(3e-4, "peak CoT-SFT learning rate", "later stages")
    pft_data: str = option("", "the pairs Preferred-FT imitates the chosen replies of (default: "
                           "<data-dir>/prefs.jsonl)", "later stages")
    pft_steps: int = option(0, "Preferred-FT steps (0: one pass over the pairs, as dpo.py)", "later stages")
    pft_batch_size: int = option(32, "pairs per Preferred-FT step", "later stages")
    pft_lr: float = option(2.5e-4, "peak Preferred-FT learning rate", "later stages")
    pft_max_pairs: int = option(3000, "Preferred-FT uses at most this many pairs (0: all)", "later stages")
    # run
    stages: str = option("pretrain,sft", "which stages to run, comma-separated: pretrain, sft, cot, preferred-ft "
                         "(empty: only build the data)", "run")
    data_dir: str = option(DATA_DIR, "where the data files live (built if missing)", "run")
    out: str = option(P.OUT_DIR, "output root: writes <out>/pretrain and <out>/sft (default: out/ in the repository)", "run")
    log_every: int = option(25, "steps between log lines", "run")




def lm_loss(model, ids, mask, scored_total=None):
    """Mean next-token NLL over the tokens with mask == 1, a token-level mean over the batch.
    ids, mask (B, T); the shift by one happens in M.shifted_logprobs. scored_total: the tokens
    scored in the whole batch, when these rows are a micro-batch of it (its share of the mean)."""
    logps, scored = M.shifted_logprobs(model, ids, mask)  # (B, T-1) each
    return -M.masked_mean(logps, scored, scored_total)  # negate: NLL = -log p


def make_optimizer(model, lr, weight_decay):
    """AdamW with decay on matrices only (norms and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def train_stage(name, model, batches, val_batches, steps, lr, config, out_dir, device, inputs, schedule=None):
    """The loop every stage here shares: AdamW, warmup + cosine to 10% (or `schedule`, a dict of
    schedule, warmup, min_ratio, weight_decay), gradient clipping, periodic validation loss; logs to
    out_dir/log.jsonl; a training state every --save-every steps (resume.py). batches: (next_batch,
    the objects its order comes from), next_batch() -> (ids, mask); inputs: {what: path} it reads."""
    next_batch, order_state = batches
    sched = schedule or {"schedule": "cosine", "warmup": config.warmup_steps, "min_ratio": 0.1,
                         "weight_decay": config.weight_decay}
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "log.jsonl")
    opt = make_optimizer(model, lr, sched["weight_decay"])
    P.warmup_note(name, sched["warmup"], steps)
    peak_flops = P.peak_flops(device) * D.world_size()  # (on several processes, their sum)
    model.train()
    # what the loop carries from step to step, all of it in the training state
    run = dict(tokens=0, scored=0, flops=0.0, seconds=0.0, loss=float("nan"), val_loss=float("nan"))
    things = {"model": model, "optimizer": opt, "run": run, **order_state}
    tokenizer = M.tokenizer_fingerprint(os.path.join(config.data_dir, "tokenizer.json"))
    fingerprint = R.fingerprint(config, inputs, tokenizer=tokenizer)
    saver = R.start(config, out_dir, fingerprint, things, log_path)
    t_start, t_log, tok_log, flops_log = time.time() - run["seconds"], time.time(), 0, 0.0
    bar = tqdm(R.steps(saver, steps), desc=name, dynamic_ncols=True, initial=saver["first"], total=steps,
               disable=not D.is_main())
    train_model = D.training_model(model, device, config.compile)  # compiled, DDP's: distributed.py
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = P.scheduled_lr(sched["schedule"], step, steps, lr, sched["warmup"], min_ratio=sched["min_ratio"])
        ids, mask = next_batch()  # the whole batch: every process draws the same
        opt.zero_grad(set_to_none=True)
        loss = step_gradient(train_model, ids, mask, config.grad_accum)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        n_tok, n_scored = ids[:, 1:].numel(), int(mask[:, 1:].sum())  # padding included: it costs FLOPs
        flops = M.training_flops(model, n_tok, n_scored, ids.shape[1])
        run.update(tokens=run["tokens"] + n_tok, scored=run["scored"] + n_scored, flops=run["flops"] + flops,
                   loss=loss)
        tok_log, flops_log = tok_log + n_tok, flops_log + flops
        last = step == steps - 1
        if step % config.eval_every == 0 or last:
            run["val_loss"] = evaluate_loss(model, val_batches)
        if step % config.log_every == 0 or last:
            dt = time.time() - t_log
            # the clock runs through the validation passes, so tokens/s and MFU read a little low on the
            # lines that hold one (step 0 among them, with its one-time costs)
            tps, mfu = tok_log / max(1e-9, dt), flops_log / max(1e-9, dt) / peak_flops
            rec = {"step": step, "loss": run["loss"], "val_loss": run["val_loss"], "lr": opt.param_groups[0]["lr"],
                   "grad_norm": grad_norm.item(), "tokens_per_second": tps, "mfu": mfu,
                   "scored_share": run["scored"] / run["tokens"]}
            if D.is_main():
                P.append_jsonl(log_path, rec)
            bar.set_postfix(loss=f"{run['loss']:.3f}", val=f"{run['val_loss']:.3f}", tok_s=f"{tps / 1e3:.1f}k",
                            mfu=f"{mfu:.0%}")
            t_log, tok_log, flops_log = time.time(), 0, 0.0
        run["seconds"] = time.time() - t_start
    wall = time.time() - t_start
    return {"loss": run["loss"], "val_loss": run["val_loss"], "tokens": run["tokens"], "device": str(device),
            "tokens_per_second": run["tokens"] / wall, "mfu": run["flops"] / wall / peak_flops,
            "scored_share": run["scored"] / run["tokens"], "peak_flops": peak_flops, "wall_seconds": wall}


def step_gradient(model, ids, mask, grad_accum):
    """The gradient of one step's loss on a batch: each of this process's micro-batches (the whole
    batch on one process without --grad-accum; distributed.py) adds its share of the batch's
    token-level mean. -> the batch's loss (a float, the same on every process)"""
    scored_total, loss = mask[:, 1:].sum(), 0.0
    for (ids_k, mask_k), _ in D.micro_batches(model, (ids, mask), grad_accum):
        part = lm_loss(model, ids_k, mask_k, scored_total)
        (part * D.world_size()).backward()  # DDP averages the ranks' gradients: undo its 1/W
        loss += part.item()
    return D.sum_over_ranks({"loss": loss})["loss"]


@torch.no_grad()
def evaluate_loss(model, batches):
    """The validation loss, dropout off: the mean of the batches' token-level means (a short last
    batch weighs as much as a full one)."""
    with P.eval_mode(model):
        losses = [lm_loss(model, ids, mask).item() for ids, mask in batches]
    return sum(losses) / len(losses) if losses else float("nan")


def sft_inputs(config, stages, enc, device, tok_path, pretrain_dir):
    """Every file the SFT stage reads, read and checked before pretraining spends minutes: a bad row
    stops the run here, in one line with its file and line, and nothing is built.
    -> (the pretrained model when pretraining does not run, else None; train rows; val rows; problems)"""
    gpt = None
    path = os.path.join(pretrain_dir, "model.pt")
    if "pretrain" in stages:
        context = config.block_size
    else:
        if not os.path.exists(path):
            raise P.DataError(f"sft: no pretrained checkpoint at {path}; run `python sft.py` (both stages)")
        gpt, _ = M.load_checkpoint(path, device, tok_path)
        context = gpt.config.block_size
        shape = ("n_layer", "n_head", "n_embd", "block_size")
        if any(getattr(gpt.config, k) != getattr(config, k) for k in shape):  # the flags shape a new model only
            print(f"sft: the model's shape comes from {path} (" + ", ".join(
                f"{k} {getattr(gpt.config, k)}" for k in shape) + "); --n-layer, --n-head, --n-embd and "
                "--block-size shape the model pretraining builds")
    train_rows = sft_examples(enc, os.path.join(config.data_dir, "sft.jsonl"), context)
    val_rows = sft_examples(enc, os.path.join(config.data_dir, "sft_val.jsonl"), context)
    return gpt, train_rows, val_rows, E.held_out_problems(config, enc, context)




def later_stage(name, config, enc, tok_path, device):
    """CoT-SFT or Preferred-FT: the SFT loss and loop on other replies, from the SFT model (or --init).
    -> (the model, its metrics, its output directory)"""
    init = config.init or os.path.join(config.out, "sft", "model.pt")
    if not os.path.exists(init):
        raise P.DataError(f"{name}: no checkpoint to start from at {init}; run `python sft.py` first, or pass --init")
    gpt, _ = M.load_checkpoint(init, device, tok_path)
    print(f"{name}: from {init} | {P.describe(gpt, device)}")
    rng, pad = random.Random(config.seed), M.special(enc, "endoftext")
    context = gpt.config.block_size
    if name == "cot":
        inputs = {"CoT rows": os.path.join(config.data_dir, "cot.jsonl"),
                  "validation rows": os.path.join(config.data_dir, "sft_val.jsonl")}
        rows, val = (sft_examples(enc, inputs[k], context) for k in ("CoT rows", "validation rows"))
        steps, batch_size, lr, schedule = config.cot_steps, config.sft_batch_size, config.cot_lr, None
    else:
        rows, val = preferred_rows(config, enc, rng)
        inputs = {"pairs": config.pft_data or os.path.join(config.data_dir, "prefs.jsonl")}
        P.require(rows and DPO_LENGTHS[1] <= context, f"preferred-ft: no pairs left, or pairs longer than the "
                  f"model's context ({context})")
        batch_size = min(config.pft_batch_size, len(rows))
        steps, lr, schedule = config.pft_steps or max(1, len(rows) // batch_size), config.pft_lr, DPO_SCHEDULE
    print(f"{name}: {len(rows)} rows, {steps} steps x {batch_size}")
    out_dir = os.path.join(config.out, name.replace("-", "_"))
    metrics = train_stage(name, gpt, row_batches(rows, batch_size, rng, pad, device), fixed_batches(val, pad, device),
                          steps, lr, config, out_dir, device, {**inputs, "start model": init}, schedule)
    metrics.update(init=init, rows=len(rows), steps=steps)
    return gpt, metrics, out_dir


def finish_stage(name, gpt, metrics, problems, config, enc, tok_path, out_dir, t_stage, t_all):
    """A fine-tuned stage's end: its held-out answers (greedy and sampled), the checkpoint (atomic),
    metrics.json and the summary. SFT keeps its replies for DPO's evaluation (out/sft/replies.json).
    On several processes rank 0 alone does it; the others wait for it."""
    if not D.is_main():
        return D.finished(metrics)
    if problems:
        t_eval = time.time()
        ev, greedy, sampled = E.evaluate_answers(gpt, enc, problems, config.max_new_tokens, config.seed)
        if name == "sft":
            E.save_replies(os.path.join(out_dir, "replies.json"), gpt, [p["prompt"] for p in problems],
                           config.max_new_tokens, config.seed, {1.0: sampled, 0.0: greedy})
        metrics.update(ev, eval_problems=len(problems))
        metrics["eval_seconds"] = time.time() - t_eval
        E.show_replies(f"the {name} model (greedy | sampled)", problems, {"greedy": greedy, "sampled": sampled})
    metrics["wall_seconds"] = time.time() - t_stage
    metrics["total_wall_seconds"] = time.time() - t_all
    R.finish(out_dir, gpt, tok_path, name, config, metrics)
    E.print_lm_summary(name, metrics)
    print(f"{name}: done in {metrics['total_wall_seconds']:.0f}s -> {out_dir}/")
    return D.finished(metrics)


def train(config):
    """Run the stages in config.stages; returns the metrics of the last one."""
    t0 = time.time()
    stages = checks.sft(config, STAGES)
    stage_dirs = [os.path.join(config.out, name.replace("-", "_")) for name in stages]
    R.require_state(config, [os.path.basename(d) for d in stage_dirs], "python sft.py")
    while stages and R.done_before(config, stage_dirs[0]):  # --resume: the stages before the cut one are done
        print(f"{stages[0]}: done before with this config ({stage_dirs.pop(0)}/model.pt): skipped")
        stages = stages[1:]
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device = D.setup(P.pick_device(config.device))  # on several processes (torchrun): this rank's
    ensure_data(config.data_dir)
    tok_path = os.path.join(config.data_dir, "tokenizer.json")
    enc = M.load_tokenizer(tok_path)
    pretrain_dir = os.path.join(config.out, "pretrain")
    metrics = {}

    # every file the stages read is read and checked now, before pretraining spends minutes
    if "sft" in stages:
        gpt, train_rows, val_rows, problems = sft_inputs(config, stages, enc, device, tok_path, pretrain_dir)
    if "cot" in stages:
        list(formats.read_conversations(os.path.join(config.data_dir, "cot.jsonl")))
    if "preferred-ft" in stages:
        formats.read_pairs(config.pft_data or os.path.join(config.data_dir, "prefs.jsonl"))

    if "pretrain" in stages:
        gpt = M.GPT(M.GPTConfig(vocab_size=enc.n_vocab, block_size=config.block_size,
                                n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd)).to(device)
        print(f"pretrain: {P.describe(gpt, device)}")
        stream = pretrain_stream(enc, os.path.join(config.data_dir, "pretrain.txt"))
        val_path = os.path.join(config.data_dir, "pretrain_val.txt")
        val_stream = pretrain_stream(enc, val_path)
        T, B = config.pretrain_seq_len, config.pretrain_batch_size
        gen = torch.Generator().manual_seed(config.seed)
        print(f"pretrain: {len(stream) / 1e6:.2f}M tokens; {config.pretrain_steps} steps x {B} x {T} "
              f"= {config.pretrain_steps * B * T / len(stream):.2f} epochs")

        def windows(src, starts):
            x = torch.stack([src[s: s + T + 1] for s in starts.tolist()])  # (B, T+1)
            return x.to(device), torch.ones_like(x)

        def next_batch():
            return windows(stream, torch.randint(len(stream) - T - 1, (B,), generator=gen))
        inputs = {"pretraining text": os.path.join(config.data_dir, "pretrain.txt"), "validation text": val_path}

        val_batches = [windows(val_stream, torch.arange(i * B * T, (i + 1) * B * T, T))
                       for i in range(min(4, (len(val_stream) - 1) // (B * T)))]
        P.require(val_batches, f"{val_path}: {len(val_stream)} tokens hold no validation batch of --pretrain-batch-size "
                  f"{B} x --pretrain-seq-len {T} (+1) tokens")
        metrics = train_stage("pretrain", gpt, (next_batch, {"generator": gen}), val_batches, config.pretrain_steps,
                              config.pretrain_lr, config, pretrain_dir, device, inputs)
        if D.is_main():  # (on several processes, rank 0 writes; the others wait for it)
            R.finish(pretrain_dir, gpt, tok_path, "pretrain", config, metrics)
            E.print_lm_summary("pretrain", metrics)
        D.finished(metrics)

    if "sft" in stages:
        t_sft = time.time()
        print(f"sft: {P.describe(gpt, device)}")
        pad = M.special(enc, "endoftext")
        sft_dir = os.path.join(config.out, "sft")
        inputs = {"SFT rows": os.path.join(config.data_dir, "sft.jsonl"), "validation rows": os.path.join(
            config.data_dir, "sft_val.jsonl"), "pretrained model": os.path.join(pretrain_dir, "model.pt")}
        metrics = train_stage("sft", gpt, row_batches(train_rows, config.sft_batch_size, rng, pad, device),
                              fixed_batches(val_rows, pad, device), config.sft_steps, config.sft_lr, config, sft_dir,
                              device, inputs)
        metrics = finish_stage("sft", gpt, metrics, problems, config, enc, tok_path, sft_dir, t_sft, t0)

    for name in [s for s in STAGES[2:] if s in stages]:  # cot, preferred-ft: from the SFT model
        t_stage = time.time()
        gpt, metrics, stage_dir = later_stage(name, config, enc, tok_path, device)
        problems = E.held_out_problems(config, enc, gpt.config.block_size)
        metrics = finish_stage(name, gpt, metrics, problems, config, enc, tok_path, stage_dir, t_stage, t0)
    if stages and config.report and D.is_main():
        report.refresh(config.out, config.data_dir)  # the run's report card, with this stage in it
    return metrics


def main(argv=None):
    P.run_cli(__doc__, SFTConfig, train, argv, presets=presets.of("sft"))


if __name__ == "__main__":
    main()
