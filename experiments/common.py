"""
What the experiment scripts share: the command line (--quick, --out, --device), the starting
checkpoint and data, and writing the results (results.json, results.md, and plot.png when
matplotlib is installed). The experiments themselves call the stages as functions
(dpo.train(config), rlvr.train(config)); nothing here trains or computes a loss.
"""

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import dpo  # noqa: E402
import plumbing as P  # noqa: E402
from data import formats  # noqa: E402
from data.prepare import DATA_DIR, PrepareConfig, ensure_data, prepare  # noqa: E402

# --quick: a tiny world (built in about a second) and a tiny SFT model (a few seconds), so that an
# experiment runs end to end in seconds; its figures mean nothing, its plumbing is the real one
QUICK_DATA = dict(pretrain_mb=0.1, n_sft=300, n_prefs=200, n_test=60, n_prefs_test=50, n_sft_val=30, n_rl=50,
                  n_cot=100)
QUICK_SFT = dict(n_layer=1, n_head=2, n_embd=32, pretrain_steps=20, sft_steps=20, pretrain_batch_size=8,
                 pretrain_seq_len=32, sft_batch_size=8, eval_problems=0, eval_every=100, warmup_steps=5)


def parse_args(doc, argv=None):
    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny world and model: seconds, for tests "
                        "(results under <out>/experiments/quick/<name>)")
    parser.add_argument("--out", default=P.OUT_DIR, help="output root: results go to <out>/experiments/<name> "
                        "(default: out/ in the repository)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    return parser.parse_args(argv)


def run(main):
    """An experiment's command line: main(), where a bad flag value or input file ends in its one-line
    error and exit code 1, as in every stage."""
    return P.one_line_errors(main)


def setup(name, args, quick_data=QUICK_DATA, quick_sft=QUICK_SFT):
    """-> {"dir", "data_dir", "init", "stages", "quick", "device"}: where this experiment writes, the
    data, the SFT checkpoint every run starts from (built, announced, when missing), where the
    stages' own outputs go, whether this is a --quick run, and the device."""
    import sft
    P.pick_device(args.device)  # a device this machine lacks stops here, before anything is built
    P.check_out(args.out)
    # --quick writes apart, under experiments/quick/: its figures must never replace a real run's
    root = os.path.join(args.out, "experiments", "quick" if args.quick else "")
    out_dir = os.path.join(root, name)
    os.makedirs(out_dir, exist_ok=True)
    if args.quick:
        data_dir = os.path.join(root, "data")
        prepare(PrepareConfig(**quick_data), out_dir=data_dir, verbose=False)  # rebuilt only when out of date
        stage_out = os.path.join(root, "stages")
        config = sft.SFTConfig(**quick_sft, data_dir=data_dir, out=stage_out, device=args.device)
    else:
        data_dir = DATA_DIR
        ensure_data(data_dir)
        stage_out = args.out
        config = sft.SFTConfig(data_dir=data_dir, out=stage_out, device=args.device)
    path = os.path.join(stage_out, "sft", "model.pt")
    init = P.previous_stage("", path, lambda: sft.train(config),
                            f"{name}: no SFT checkpoint at {path}; building it now with sft.py")
    return {"dir": out_dir, "data_dir": data_dir, "init": init, "stages": stage_out, "quick": args.quick,
            "device": args.device}


def dpo_config(s, run, **overrides):
    """A DPOConfig for one run of the experiment, starting from its SFT checkpoint; --quick
    shrinks the run (a few steps, a few evaluation problems)."""
    kw = dict(init=s["init"], data_dir=s["data_dir"], out=os.path.join(s["dir"], run), device=s["device"],
              report=False)  # one report card per run of a sweep would cost seconds each and tell nothing
    if s["quick"]:
        kw.update(steps=4, batch_size=4, eval_problems=8, max_new_tokens=16, log_every=1, warmup_steps=1)
    kw.update(overrides)
    return dpo.DPOConfig(**kw)


def write_results(s, results, columns, title, takeaway=""):
    """results.json (the figures), results.md (a table of results["rows"], or of the scalars)."""
    P.write_json(os.path.join(s["dir"], "results.json"), results)
    rows = results.get("rows") or [{k: v for k, v in results.items() if not isinstance(v, (list, dict))}]
    if s["quick"]:
        title = f"[--quick: a tiny world and model; the figures test the plumbing, they mean nothing] {title}"

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if math.isfinite(v) else "nan"
        return str(v)

    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    if takeaway:
        lines += ["", takeaway]
    P.write_text(os.path.join(s["dir"], "results.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(s, draw):
    """Call draw(plt) and save plot.png when matplotlib is installed; otherwise say how to get it
    (the results are written either way). -> the PNG's path, or None."""
    plt = P.pyplot()
    if plt is None:
        print("plot: matplotlib is not installed (pip install matplotlib), so no plot.png; "
              "results.json and results.md are written")
        return None
    fig = plt.figure(figsize=(6, 4))
    draw(plt)
    plt.tight_layout()
    path = os.path.join(s["dir"], "plot.png")
    formats.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))  # as every output
    plt.close(fig)
    print(f"plot: {path}")
    return path


def read_log(path):
    """The records of a stage's log.jsonl, with null read back as NaN: the log writes a number that
    is not finite as null (strict JSON), and the tables and plots here expect numbers."""
    with open(path) as f:
        return [{k: float("nan") if v is None else v for k, v in json.loads(line).items()} for line in f]


def spearman(xs, ys):
    """Rank correlation of two lists (no ties expected)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0] * len(v)
        for rank, i in enumerate(order):
            r[i] = rank
        return r
    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))
