"""
DPO training speed side by side with TRL's DPOTrainer, on this machine: the same model shape (a
GPT-2 of our width, depth, heads, vocabulary and context on TRL's side), fed this project's own
preference pairs with exactly their token lengths, batch 32, the reference log-probs precomputed
on both sides, fp32 (TRL without gradient checkpointing: its fastest on a CPU), optimizer steps
only: `dpo.py --steps 40 --eval-problems 0` from a random-init checkpoint against DPOTrainer for
40 steps, in alternating runs, each in its own process. Prints pairs/s per run and the median ratio.

TRL is no dependency of this project: run this from an environment that has it, e.g.

    python -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 trl==1.16.0 tiktoken tqdm
    .venv-trl/bin/python experiments/vs_trl.py [--runs 3] [--sizes default,5m]

Results go to out/experiments/vs_trl/ (results.json, results.md); docs/speed.md holds the figures.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import model as M  # noqa: E402
import plumbing as P  # noqa: E402
from data.prepare import DATA_DIR, ensure_data  # noqa: E402

SIZES = {"default": dict(n_layer=4, n_head=4, n_embd=128), "5m": dict(n_layer=6, n_head=8, n_embd=256)}
STEPS, BATCH = 40, 32


def our_pairs(data_dir):
    """The token ids of the pairs `dpo.py --steps 40` trains on (its seed, shuffle and cut)."""
    import dpo
    import pairs
    from data import formats
    config = dpo.DPOConfig(steps=STEPS, batch_size=BATCH, data_dir=data_dir)
    enc = M.load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    examples, *_ = pairs.training_pairs(config, enc, random.Random(config.seed),
                                        formats.read_dpo_inputs(), os.path.join(data_dir, "prefs.jsonl"),
                                        os.path.join(data_dir, "prefs_test.jsonl"))
    return examples, enc.n_vocab


def run_ours(size, out, data_dir, device, flags=()):
    """dpo.py from a random-init checkpoint of this size, in its own process. -> pairs/s"""
    enc = M.load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    ckpt = os.path.join(out, f"random_{size}.pt")
    if not os.path.exists(ckpt):
        import torch
        torch.manual_seed(0)
        gpt = M.GPT(M.GPTConfig(vocab_size=enc.n_vocab, block_size=192, **SIZES[size]))
        M.save_checkpoint(ckpt, gpt, os.path.join(data_dir, "tokenizer.json"), stage="random")
    run_out = os.path.join(out, f"ours_{size}")
    subprocess.run([sys.executable, os.path.join(ROOT, "dpo.py"), "--init", ckpt, "--steps", str(STEPS),
                    "--batch-size", str(BATCH), "--eval-problems", "0", "--out", run_out, "--data-dir", data_dir,
                    "--device", device, "--no-report", *flags], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(run_out, "dpo", "metrics.json")) as f:
        m = json.load(f)
    return {"pairs_per_second": m["pairs_per_second"], "peak_gflops": m["peak_flops"] / 1e9}


def trl_side(size, data_dir, device):
    """DPOTrainer on a GPT-2 of this size, fed our pairs' token ids (its own tokenisation skipped),
    40 steps of 32 pairs; timed from the first step's start to the last step's end. -> pairs/s"""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    examples, vocab = our_pairs(data_dir)
    torch.manual_seed(0)
    shape = SIZES[size]
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=192, n_embd=shape["n_embd"],
                                      n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1},
                                                                              unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<eos>")
    data = Dataset.from_list([{"prompt_ids": ex["prompt"], "chosen_ids": ex["chosen"],
                               "rejected_ids": ex["rejected"]} for ex in examples])

    class Ours(DPOTrainer):  # the ids are ours already: no re-tokenisation
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not times:
                times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = DPOConfig(output_dir=os.path.join(P.OUT_DIR, "experiments", "vs_trl", "trl_tmp"), max_steps=STEPS,
                     per_device_train_batch_size=BATCH, learning_rate=2.5e-4, beta=1.0, max_length=192,
                     precompute_ref_log_probs=True, precompute_ref_batch_size=64, bf16=False,
                     gradient_checkpointing=False, use_cpu=device == "cpu", report_to=[], save_strategy="no",
                     logging_steps=10, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Ours(model=gpt2, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return {"pairs_per_second": STEPS * BATCH / (times[-1] - times[0])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per side and size")
    parser.add_argument("--sizes", default="default,5m", help="comma-separated: default, 5m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dpo-flags", default="", help="more flags for dpo.py's runs, e.g. '--bucket-by-length'")
    parser.add_argument("--side", default="", help=argparse.SUPPRESS)  # internal: one TRL run, in its own process
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    P.require(set(sizes) <= set(SIZES), f"--sizes {args.sizes!r}: name some of {', '.join(SIZES)}")
    try:
        import trl  # noqa: F401
    except ImportError:
        raise P.ConfigError("TRL is not installed here: run this from an environment that has it (see --help)")
    ensure_data(DATA_DIR)
    if args.side:
        print(json.dumps(trl_side(args.side, DATA_DIR, args.device)))
        return None
    out = os.path.join(P.OUT_DIR, "experiments", "vs_trl")
    os.makedirs(out, exist_ok=True)
    rows = []
    for size in sizes:
        ours, theirs = [], []
        for _ in range(args.runs):  # alternating, so a slow minute of a shared machine hits both
            ours.append(run_ours(size, out, DATA_DIR, args.device, args.dpo_flags.split()))
            line = subprocess.run([sys.executable, __file__, "--side", size, "--device", args.device], check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
            theirs.append(json.loads(line))
            print(f"vs_trl: {size}: ours {ours[-1]['pairs_per_second']:.1f} pairs/s, TRL "
                  f"{theirs[-1]['pairs_per_second']:.1f} pairs/s (peak {ours[-1]['peak_gflops']:.0f} GFLOP/s)")
        a = statistics.median(r["pairs_per_second"] for r in ours)
        b = statistics.median(r["pairs_per_second"] for r in theirs)
        rows.append({"size": size, "ours": a, "ours_runs": [r["pairs_per_second"] for r in ours], "trl": b,
                     "trl_runs": [r["pairs_per_second"] for r in theirs], "ratio": a / b,
                     "peak_gflops": [r["peak_gflops"] for r in ours]})
    P.write_json(os.path.join(out, "results.json"), {"rows": rows, "steps": STEPS, "batch": BATCH,
                                                     "dpo_flags": args.dpo_flags})
    lines = ["| size | dpo.py pairs/s | TRL DPOTrainer pairs/s | ratio | peak GFLOP/s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['ours']:.1f} ({min(r['ours_runs']):.1f}-{max(r['ours_runs']):.1f}) | "
                     f"{r['trl']:.1f} ({min(r['trl_runs']):.1f}-{max(r['trl_runs']):.1f}) | {r['ratio']:.2f}x | "
                     f"{min(r['peak_gflops']):.0f}-{max(r['peak_gflops']):.0f} |")
    P.write_text(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    P.one_line_errors(main)
