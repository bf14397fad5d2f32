"""
The report card of a run: out/report.md and out/report.html, built only from what the stages wrote
(out/<stage>/metrics.json and log.jsonl, and the DPO and SFT checkpoints for the per-token view).
Each stage refreshes it at its end; a stage that has not run is noted, not an error.

    python report.py               (the run under out/)
    python report.py --out DIR     (a run written with --out DIR)

What it holds: the pipeline table (SFT -> DPO on DPO's held-out problems, DPO -> RLVR on RL's), each
stage's training curves (PNG plots when matplotlib is installed; the tables are always written),
the style shares stage by stage, the tokens DPO pushed on a few held-out pairs (logratios.py), and
the run's environment (device, peak FLOP/s, torch, git commit, each stage's time, tokens/s, MFU).
"""

import base64
import html
import io
import json
import os
import subprocess
import time
from dataclasses import dataclass

import torch

import logratios
import model as M
import plumbing as P
from data import formats
from data.prepare import DATA_DIR
from plumbing import option

STAGES = ("pretrain", "sft", "dpo", "rlvr")
STYLES = ("step", "terse", "rambling", "rude", "other")


@dataclass
class ReportConfig:
    out: str = option(P.OUT_DIR, "the run's output root: reads <out>/<stage>, writes <out>/report.md and "
                      "report.html (default: out/ in the repository)", "run")
    data_dir: str = option(DATA_DIR, "the tokenizer and the held-out pairs, for the per-token view", "run")
    pairs: int = option(3, "held-out pairs in the per-token view (0: none)", "run")


def read_stage(out, stage):
    """(metrics, log records, train_config) of one stage, or Nones where it has not run."""
    folder = os.path.join(out, stage)
    metrics = log = config = None
    if os.path.exists(os.path.join(folder, "metrics.json")):
        with open(os.path.join(folder, "metrics.json")) as f:
            metrics = json.load(f)
    if os.path.exists(os.path.join(folder, "log.jsonl")):
        with open(os.path.join(folder, "log.jsonl")) as f:
            log = [json.loads(line) for line in f if line.strip()]
    if os.path.exists(os.path.join(folder, "model.pt")):
        config = P.load_weights_only(os.path.join(folder, "model.pt"), "checkpoint").get("train_config")
    return metrics, log, config


# ----------------------------------------------------------------------------------------------
# The tables


def pct(x):
    return "—" if x is None else f"{100 * x:.1f}%"


def num(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def pipeline_rows(run):
    """The pipeline table's rows, each measured on the same held-out problems as the row it is
    compared with: SFT and DPO from DPO's evaluation, DPO and RLVR from RL's."""
    rows = []
    dpo, rl = run["dpo"][0], run["rlvr"][0]
    sft = run["sft"][0]
    if dpo is not None and "win_rate" in dpo:
        n = dpo.get("eval_problems")
        for name, side in (("SFT", "ref"), ("DPO", "policy")):
            rows.append({"model": name, "problems": n, "greedy": dpo[f"greedy_accuracy_{side}"],
                         "sampled": dpo[f"accuracy_{side}"], "pass@8": None, "judge": dpo[f"judge_score_{side}"],
                         "win rate vs SFT": dpo["win_rate"] if side == "policy" else None,
                         "step share": dpo[f"style_shares_{side}"]["step"],
                         "KL to start": dpo["kl"] if side == "policy" else None, "evaluated by": "dpo.py"})
    elif sft is not None and "accuracy" in sft:
        rows.append({"model": "SFT", "problems": sft.get("eval_problems"),
                     "greedy": sft["accuracy"], "sampled": sft["accuracy_sampled"], "pass@8": None,
                     "judge": sft["judge_score_sampled"], "win rate vs SFT": None,
                     "step share": sft["style_shares"]["step"], "KL to start": None, "evaluated by": "sft.py"})
    if rl is not None and "pass_at_k" in rl:
        n = rl.get("eval_problems")
        for name, when in (("DPO (RL's start)", "before"), ("RLVR", "after")):
            pk = rl["pass_at_k"]
            rows.append({"model": name, "problems": n, "greedy": rl[f"accuracy_{when}"],
                         "sampled": pk["1"][when], "pass@8": pk["8"][when] if "8" in pk else None,
                         "judge": rl[f"judge_score_{when}"], "win rate vs SFT": None,
                         "step share": rl[f"style_shares_{when}"]["step"],
                         "KL to start": rl["kl"] if when == "after" else None, "evaluated by": "rlvr.py"})
    return rows


PIPELINE_COLUMNS = ["model", "problems", "greedy", "sampled", "pass@8", "judge", "win rate vs SFT", "step share",
                    "KL to start", "evaluated by"]


def cells(row):
    fmt = {"greedy": pct, "sampled": pct, "pass@8": pct, "win rate vs SFT": pct, "step share": pct,
           "judge": num, "KL to start": num}
    return [fmt[c](row[c]) if c in fmt else ("—" if row[c] is None else str(row[c])) for c in PIPELINE_COLUMNS]


def style_rows(run):
    """The style shares of each model, sampled at T = 1, as its stage measured them."""
    rows = []
    sft, dpo, rl = run["sft"][0], run["dpo"][0], run["rlvr"][0]
    if dpo is not None and "style_shares_ref" in dpo:
        rows += [("SFT (dpo.py)", dpo["style_shares_ref"]), ("DPO (dpo.py)", dpo["style_shares_policy"])]
    elif sft is not None and "style_shares" in sft:
        rows.append(("SFT (sft.py)", sft["style_shares"]))
    if rl is not None and "style_shares_after" in rl:
        rows += [("DPO (rlvr.py)", rl["style_shares_before"]), ("RLVR (rlvr.py)", rl["style_shares_after"])]
    return rows


def environment_rows(run):
    rows = []
    for stage in STAGES:
        m = run[stage][0]
        if m is None:
            rows.append([stage, "not run", "", "", "", ""])
            continue
        tps = m.get("tokens_per_second", m.get("train_tokens_per_second"))
        rows.append([stage, m.get("device", "—"), num((m.get("peak_flops") or 0) / 1e9, 0) + " GFLOP/s",
                     num(m.get("wall_seconds"), 0) + " s", num((tps or 0) / 1e3, 1) + "k tok/s", pct(m.get("mfu"))])
    return rows


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown_table(columns, rows):
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def html_table(columns, rows):
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


# ----------------------------------------------------------------------------------------------
# The curves (matplotlib, when installed)


def curves(run):
    """[(title, name, [(stage, y keys)])]: the plots to draw."""
    return [("Pretraining: loss (validation at each evaluation)", "pretrain", [("pretrain", ["loss", "val_loss"])]),
            ("SFT: loss on the assistant's tokens (validation at each evaluation)", "sft",
             [("sft", ["loss", "val_loss"])]),
            ("DPO: loss, margin, accuracy", "dpo", [("dpo", ["loss", "rewards/margins", "rewards/accuracies"])]),
            ("DPO: log-probs of the chosen and rejected replies", "dpo_logps",
             [("dpo", ["logps/chosen", "logps/rejected"])]),
            ("RL: reward, KL and pass@1 of the rollouts", "rl", [("rlvr", ["reward", "kl", "accuracy"])])]


def points(run, stage, key):
    """(step, value) of one logged figure; val_loss only where it was measured (it is logged as the
    latest value at every line)."""
    log, config = run[stage][1] or [], run[stage][2] or {}
    every = config.get("eval_every") if key == "val_loss" else None
    last = log[-1]["step"] if log else None
    return [(r["step"], r[key]) for r in log if r.get(key) is not None
            and (not every or r["step"] % every == 0 or r["step"] == last)]


def draw(plt, run, title, series):
    fig = plt.figure(figsize=(6, 3.4))
    for stage, keys in series:
        for i, key in enumerate(keys):
            xy = points(run, stage, key)
            if xy:
                plt.plot(*zip(*xy), label=key, linestyle=("-", "--", ":")[i % 3], marker="." if len(xy) < 30 else None)
    warning_step = (run["dpo"][0] or {}).get("warning_step")
    if warning_step is not None and any(s == "dpo" for s, _ in series):
        plt.axvline(warning_step, color="red", linestyle=":", label=f"early warning (step {warning_step})")
    plt.title(title, fontsize=9)
    plt.xlabel("step")
    plt.legend(fontsize=7)
    plt.tight_layout()
    return fig


def styles_figure(plt, rows):
    fig = plt.figure(figsize=(6, 3.4))
    width = 0.8 / max(1, len(rows))
    for i, (name, shares) in enumerate(rows):
        plt.bar([j + i * width for j in range(len(STYLES))], [shares.get(s, 0) for s in STYLES], width, label=name)
    plt.xticks([j + 0.4 - width / 2 for j in range(len(STYLES))], STYLES)
    plt.title("Style shares of the sampled replies", fontsize=10)
    plt.legend(fontsize=7)
    plt.tight_layout()
    return fig


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def figures(run, out):
    """{name: PNG bytes} of every plot with data, each also written as out/report_<name>.png; {} without
    matplotlib."""
    plt = P.pyplot()
    if plt is None:
        return {}
    pngs = {}
    for title, name, series in curves(run):
        if any(run[stage][1] for stage, _ in series):
            pngs[name] = draw(plt, run, title, series)
    if style_rows(run):
        pngs["styles"] = styles_figure(plt, style_rows(run))
    for name, fig in list(pngs.items()):
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=90, format="png")
        plt.close(fig)
        pngs[name] = buffer.getvalue()
        path = os.path.join(out, f"report_{name}.png")
        formats.write_atomically(path, lambda tmp, data=pngs[name]: write_bytes(tmp, data))
    return pngs


# ----------------------------------------------------------------------------------------------
# The report


def token_view(config):
    """logratios.view of the first held-out pairs, DPO's policy against the SFT model; None when
    either checkpoint is missing."""
    policy_path, reference_path = (os.path.join(config.out, s, "model.pt") for s in ("dpo", "sft"))
    tokenizer_path = os.path.join(config.data_dir, "tokenizer.json")
    if not config.pairs or not all(os.path.exists(p) for p in (policy_path, reference_path, tokenizer_path)):
        return None
    enc = M.load_tokenizer(tokenizer_path)
    policy, ckpt = M.load_checkpoint(policy_path, "cpu", tokenizer_path)
    reference, _ = M.load_checkpoint(reference_path, "cpu", tokenizer_path)
    pairs = formats.read_pairs(os.path.join(config.data_dir, "prefs_test.jsonl"))
    items = [{"prompt": p, "title": f"held-out pair {i}", "replies": [("chosen", M.render_response(enc, c)),
                                                                      ("rejected", M.render_response(enc, r))]}
             for i, (p, c, r) in enumerate(pairs)]
    context = min(policy.config.block_size, reference.config.block_size)
    items = [it for it in items if logratios.fits(enc, it, context)][: config.pairs]  # the first that fit
    return logratios.view(enc, policy, reference, items, logratios.policy_beta(ckpt, 0.0)) if items else None


def write_report(config):
    """Write <out>/report.md and <out>/report.html. -> their paths."""
    run = {stage: read_stage(config.out, stage) for stage in STAGES}
    missing = [s for s in STAGES if run[s][0] is None]
    pipeline = [cells(r) for r in pipeline_rows(run)]
    styles = [[name] + [pct(shares.get(s, 0)) for s in STYLES] for name, shares in style_rows(run)]
    env = environment_rows(run)
    pngs = figures(run, config.out)
    shown = token_view(config)
    meta = f"torch {torch.__version__}, git commit {git_commit()}"
    note = f"Not run yet: {', '.join(missing)}." if missing else "Every stage has run."
    md = ["# The run's report card", "", f"{config.out} | {meta}. {note}", "", "## The pipeline", "",
          markdown_table(PIPELINE_COLUMNS, pipeline) if pipeline else "No held-out evaluation yet.", "",
          "Rows compared with each other share their held-out problems and sampling settings: SFT and DPO "
          "come from dpo.py's evaluation, DPO and RLVR from rlvr.py's. Sampled accuracy is pass@1 at T = 1.", ""]
    if styles:
        md += ["## Styles", "", markdown_table(["model"] + list(STYLES), styles), ""]
    md += ["## Training curves", ""]
    md += [f"![{name}](report_{name}.png)" for name in pngs] or ["(matplotlib is not installed: "
                                                                 "`pip install matplotlib` for the plots)"]
    if shown:
        up, down = logratios.most_moved(shown)
        md += ["", "## The tokens DPO pushed", "", "log pi(y_t) - log pi_ref(y_t) per response token, DPO against "
               "SFT (the coloured view: report.html, or `python logratios.py`):", "", "```",
               logratios.terminal(shown, color=False), "```", "",
               "Most pushed up: " + ", ".join(f"`{t!r}` {v:+.2f}" for t, v, _ in up) + "; most pushed down: "
               + ", ".join(f"`{t!r}` {v:+.2f}" for t, v, _ in down) + "."]
    md += ["", "## Environment", "", markdown_table(["stage", "device", "peak", "time", "throughput", "MFU"], env), ""]
    body = [f"<h1>The run's report card</h1>\n<p>{html.escape(config.out)} | {html.escape(meta)}. "
            f"{html.escape(note)}</p>\n<h2>The pipeline</h2>\n",
            html_table(PIPELINE_COLUMNS, pipeline) if pipeline else "<p>No held-out evaluation yet.</p>\n"]
    if styles:
        body += ["<h2>Styles</h2>\n", html_table(["model"] + list(STYLES), styles)]
    body += ["<h2>Training curves</h2>\n"] + [f"<img alt=\"{n}\" src=\"data:image/png;base64,"
                                              f"{base64.b64encode(b).decode()}\">\n" for n, b in pngs.items()]
    if shown:
        view = logratios.page(shown, "")
        body.append("<h2>The tokens DPO pushed</h2>\n" + view[view.index("<section"): view.rindex("</body>")])
    body += ["<h2>Environment</h2>\n", html_table(["stage", "device", "peak", "time", "throughput", "MFU"], env)]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>The run's report card"
            "</title>\n<style>\n" + logratios.CSS + "table { border-collapse: collapse; } td, th { border: 1px solid "
            "#ccc; padding: 0.2em 0.5em; }\n</style>\n</head>\n<body>\n" + "".join(body) + "</body>\n</html>\n")
    md_path, html_path = os.path.join(config.out, "report.md"), os.path.join(config.out, "report.html")
    P.write_text(md_path, "\n".join(md) + "\n")
    P.write_text(html_path, page)
    return md_path, html_path


def write_and_say(config):
    """Write the report and say where it is (in one line) and how long it took."""
    P.check_flags(config, non_negative=("pairs",))
    P.require(os.path.isdir(config.out), f"--out {config.out}: no such directory (a run writes one: `python dpo.py`)")
    t0 = time.time()
    md_path, html_path = write_report(config)
    print(f"report: {md_path} and {html_path} ({time.time() - t0:.1f}s)")
    return md_path, html_path


def refresh(out, data_dir):
    """The stages' call at their end: rewrite the report of the run under `out`. The stage's work is
    saved by then, so a report that cannot be written (a stale checkpoint beside it, say) is said in
    one line, never an error of the stage."""
    try:
        return write_and_say(ReportConfig(out=out, data_dir=data_dir))
    except Exception as e:  # noqa: BLE001 (whatever it is, the run that called it has finished)
        print(f"report: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None


def main(argv=None):
    P.run_cli(__doc__, ReportConfig, write_and_say, argv, show_config=False)


if __name__ == "__main__":
    main()
