"""report.py: the run's report card, built from a tiny run's outputs (every stage, and with stages
missing), with and without matplotlib; its HTML is well-formed and holds the per-token view."""

import html.parser
import json
import os
import shutil

import pytest

import helpers

import dpo
import plumbing as P
import report
import rlvr
from data import formats


@pytest.fixture(scope="module")
def run_out(tiny_sft_ckpt, tiny_data_dir, tmp_path_factory):
    """A tiny whole run: the session's SFT (and pretraining) outputs, then DPO and RL on top, each
    stage refreshing the report as it ends."""
    out = str(tmp_path_factory.mktemp("run"))
    for stage in ("pretrain", "sft"):
        shutil.copytree(os.path.join(os.path.dirname(os.path.dirname(tiny_sft_ckpt)), stage), os.path.join(out, stage))
    dpo.train(dpo.DPOConfig(data_dir=tiny_data_dir, steps=4, batch_size=4, eval_problems=6, max_new_tokens=16,
                            out=out, device="cpu", log_every=1, warmup_steps=1))
    rlvr.train(rlvr.RLVRConfig(data_dir=tiny_data_dir, steps=2, prompts_per_step=2, group_size=2,
                               max_new_tokens=8, eval_problems=4, eval_samples=2, out=out, device="cpu"))
    return out


def metrics(out, stage):
    with open(os.path.join(out, stage, "metrics.json")) as f:
        return json.load(f)


class Checker(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.replies, self.images = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "p" and attrs.get("class") == "reply":
            self.replies.append(0)
        if tag == "span" and attrs.get("class") == "tok":
            self.replies[-1] += 1
        if tag == "img":
            self.images += attrs["src"].startswith("data:image/png;base64,")
        if tag not in ("meta", "img", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_each_stage_refreshes_the_report_with_its_figures(run_out, tiny_data_dir, capsys):
    d, r = metrics(run_out, "dpo"), metrics(run_out, "rlvr")
    with open(os.path.join(run_out, "report.md")) as f:
        md = f.read()
    assert "Every stage has run." in md
    sft_row = next(line for line in md.splitlines() if line.startswith("| SFT |"))
    assert sft_row.split(" | ")[2:4] == [f"{100 * d['greedy_accuracy_ref']:.1f}%", f"{100 * d['accuracy_ref']:.1f}%"]
    dpo_row = next(line for line in md.splitlines() if line.startswith("| DPO |"))
    assert f"| {100 * d['win_rate']:.1f}% |" in dpo_row and f"| {d['kl']:.2f} |" in dpo_row
    rl_row = next(line for line in md.splitlines() if line.startswith("| RLVR |"))
    assert f"| {100 * r['pass_at_k']['1']['after']:.1f}% |" in rl_row and "| 4 |" in rl_row  # 4 problems
    assert "## The tokens DPO pushed" in md and "(held-out pair 2)" in md
    for stage in ("pretrain", "sft", "dpo", "rlvr"):
        assert f"| {stage} | cpu |" in md
    for name in ("pretrain", "sft", "dpo", "dpo_logps", "rl", "styles"):  # matplotlib is installed for the tests
        assert f"![{name}](report_{name}.png)" in md and os.path.exists(os.path.join(run_out, f"report_{name}.png"))
    # the stages said where it is
    report.refresh(run_out, tiny_data_dir)
    assert f"report: {run_out}/report.md and {run_out}/report.html" in capsys.readouterr().out


def test_the_html_is_well_formed_and_holds_one_element_per_response_token(run_out, tiny_data_dir, tiny_enc):
    with open(os.path.join(run_out, "report.html")) as f:
        page = f.read()
    checker = Checker()
    checker.feed(page)
    assert checker.errors == [] and checker.stack == []
    pairs = formats.read_pairs(os.path.join(tiny_data_dir, "prefs_test.jsonl"))[:3]
    expected = [len(tiny_enc.encode_ordinary(reply)) + 1 for _, c, r in pairs for reply in (c, r)]  # + <|end|>
    assert checker.replies == expected
    assert checker.images == 6 and "http" not in page


def test_without_matplotlib_the_tables_are_still_written(run_out, tiny_data_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    shutil.copytree(run_out, out)
    for name in os.listdir(out):
        if name.startswith("report"):
            os.remove(os.path.join(out, name))
    helpers.without_matplotlib(monkeypatch)
    md_path, _ = report.write_report(report.ReportConfig(out=out, data_dir=tiny_data_dir))
    with open(md_path) as f:
        md = f.read()
    assert "matplotlib is not installed" in md and "| RLVR |" in md
    assert not [n for n in os.listdir(out) if n.endswith(".png")]


def test_a_missing_stage_is_noted_not_an_error(run_out, tiny_data_dir, tmp_path):
    out = str(tmp_path / "half")
    for stage in ("pretrain", "sft"):
        shutil.copytree(os.path.join(run_out, stage), os.path.join(out, stage))
    md_path, html_path = report.write_report(report.ReportConfig(out=out, data_dir=tiny_data_dir))
    with open(md_path) as f:
        md = f.read()
    assert "Not run yet: dpo, rlvr." in md and "| dpo | not run |" in md
    assert "The tokens DPO pushed" not in md  # it needs the DPO checkpoint
    empty = str(tmp_path / "nothing")
    md_path, _ = report.write_report(report.ReportConfig(out=empty, data_dir=tiny_data_dir))
    with open(md_path) as f:
        assert "Not run yet: pretrain, sft, dpo, rlvr." in f.read()


def test_a_report_that_cannot_be_written_never_fails_the_stage_that_asked(run_out, tiny_data_dir, tmp_path, capsys):
    out = str(tmp_path / "stale")
    shutil.copytree(run_out, out)
    with open(os.path.join(out, "dpo", "model.pt"), "wb") as f:
        f.write(b"not a checkpoint")  # a stale or broken file beside the stage that just finished
    assert report.refresh(out, tiny_data_dir) is None
    assert capsys.readouterr().out.startswith("report: skipped (DataError: ")
    with pytest.raises(P.ConfigError, match="no such directory"):
        report.write_and_say(report.ReportConfig(out=str(tmp_path / "typo"), data_dir=tiny_data_dir))
    with pytest.raises(P.ConfigError, match="--pairs must be >= 0"):
        report.write_and_say(report.ReportConfig(out=run_out, data_dir=tiny_data_dir, pairs=-1))
