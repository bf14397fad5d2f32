"""experiments/: each experiment's --quick run end to end (a tiny world, seconds each), the data the
length-bias experiment builds, that the beta sweep really passes each beta to the loss, the plot
with and without matplotlib, and that a stage called from Python gives what its command line gives.
"""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import beta_sweep  # noqa: E402
import common  # noqa: E402
import dpo  # noqa: E402
import helpers  # noqa: E402
import ipo_vs_dpo  # noqa: E402
import kv_cache  # noqa: E402
import length_bias  # noqa: E402
import model as M  # noqa: E402
import plumbing as P  # noqa: E402
from data import formats  # noqa: E402
import offline_vs_online  # noqa: E402
import on_policy  # noqa: E402
import overtraining  # noqa: E402
import preferred_ft  # noqa: E402
import throughput  # noqa: E402


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("experiments"))


def results(out, name):
    with open(os.path.join(out, "experiments", "quick", name, "results.json")) as f:
        return json.load(f)


def finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_beta_sweep_quick_passes_each_beta_to_the_loss(out, monkeypatch):
    seen = []
    real = dpo.dpo_loss

    def spy(*args, **kw):
        seen.append(args[4] if len(args) > 4 else kw["beta"])
        return real(*args, **kw)

    monkeypatch.setattr(dpo, "dpo_loss", spy)
    beta_sweep.main(["--quick", "--out", out])
    assert sorted(set(seen)) == sorted(beta_sweep.BETAS)
    r = results(out, "beta_sweep")
    assert [row["beta"] for row in r["rows"]] == beta_sweep.BETAS
    for row in r["rows"]:
        for key in ("beta", "kl", "win_rate", "pref_accuracy", "accuracy"):
            assert finite(row[key]), (key, row)
    assert os.path.exists(os.path.join(out, "experiments", "quick", "beta_sweep", "results.md"))


def test_overtraining_quick(out):
    real = os.path.join(out, "experiments", "overtraining")  # a full run's results, as left by one
    os.makedirs(real)
    with open(os.path.join(real, "results.json"), "w") as f:
        f.write('{"real": true}')
    overtraining.main(["--quick", "--out", out])
    with open(os.path.join(real, "results.json")) as f:  # --quick wrote apart, and left them alone
        assert f.read() == '{"real": true}'
    assert os.listdir(real) == ["results.json"]
    r = results(out, "overtraining")
    for key in ("chosen_logp_start", "chosen_logp_end", "margin_start", "margin_end", "judge_score_best",
                "judge_score_end"):
        assert finite(r[key]), key
    assert "warning_step" in r and r["curve"] and all(finite(c["margin"]) for c in r["curve"])
    # the curve is the run's own log, step by step
    log = common.read_log(os.path.join(out, "experiments", "quick", "overtraining", "sigmoid", "dpo", "log.jsonl"))
    assert [c["chosen_logp"] for c in r["curve"]] == [x["logps/chosen"] for x in log]


def test_ipo_vs_dpo_quick(out):
    ipo_vs_dpo.main(["--quick", "--out", out])
    r = results(out, "ipo_vs_dpo")
    assert [row["loss_type"] for row in r["rows"]] == ["sigmoid", "ipo"]
    for row in r["rows"]:
        for key in ("margin_end", "judge_score_end", "kl"):
            assert finite(row[key]), key


def test_length_bias_quick(out):
    length_bias.main(["--quick", "--out", out])
    r = results(out, "length_bias")
    assert [row["data"] for row in r["rows"]] == ["default", "biased", "balanced", "biased", "shorter"]
    for row in r["rows"]:
        for key in ("len_policy", "len_ref", "win_rate"):
            assert finite(row[key]), key


def test_offline_vs_online_quick(out):
    offline_vs_online.main(["--quick", "--out", out])
    r = results(out, "offline_vs_online")
    assert [row["method"].split()[0] for row in r["rows"]] == ["SFT", "DPO", "RLVR"]
    for row in r["rows"]:
        for key in ("accuracy", "pass_at_8", "judge_score", "kl", "wall_seconds"):
            assert finite(row[key]), key
    assert r["rows"][2]["samples"] > 0


def test_preferred_ft_quick_measures_every_arm_against_sft(out):
    preferred_ft.main(["--quick", "--out", out])
    r = results(out, "preferred_ft")
    assert [row["arm"] for row in r["medians"]] == list(preferred_ft.ARMS)
    for row in r["medians"][1:]:  # each trained arm, measured against the SFT model
        for key in preferred_ft.MEASURES:
            assert finite(row[key]), (row["arm"], key)
        assert 0 <= row["win_rate"] <= 1 and 0 <= row["pref_accuracy"] <= 1
    sft_row = r["medians"][0]
    assert sft_row["kl"] == 0 and "win_rate" not in sft_row  # the baseline is not compared with itself
    # each arm's checkpoint trained from the SFT model: Preferred-FT's chosen replies rose; the rest moved too
    pft = r["medians"][1]
    assert pft["logp_chosen_change"] > 0
    assert os.path.exists(os.path.join(out, "experiments", "quick", "preferred_ft", "results.md"))


def test_on_policy_quick_runs_every_source_and_loss(out, monkeypatch):
    on_policy.main(["--quick", "--out", out])
    r = results(out, "on_policy")
    assert [row["setting"] for row in r["rows"]] == [f"{s}, {l}" for s in on_policy.SOURCES for l in on_policy.LOSSES]
    for name, runs in r["runs"].items():
        for run in runs:
            assert finite(run["win_rate"]) and finite(run["kl"]) and 0 <= run["pref_accuracy"] <= 1
            assert (run["samples"] > 0) == (not name.startswith("off-policy")), name
    base = os.path.join(out, "experiments", "quick", "on_policy")
    # RPO on-policy trained on the DPO run's sampled file, read back as --data: the same pairs
    assert os.path.exists(os.path.join(base, "on_policy_dpo", "seed1", "dpo", "pairs_round1.jsonl"))
    assert not os.path.exists(os.path.join(base, "on_policy_rpo", "seed1", "dpo", "pairs_round1.jsonl"))
    assert os.path.exists(os.path.join(base, "online_rpo", "seed1", "dpo", "pairs_round3.jsonl"))
    # run again: every run finished before with the same config, so nothing trains and the table is the same
    monkeypatch.setattr(on_policy.dpo, "train", lambda config: pytest.fail(f"{config.out} trained again"))
    on_policy.main(["--quick", "--out", out])
    assert results(out, "on_policy")["runs"] == r["runs"]


def test_vs_trl_without_trl_says_so_in_one_line_and_builds_nothing(monkeypatch):
    import builtins
    import vs_trl
    real_import = builtins.__import__

    def no_trl(name, *args, **kwargs):
        if name == "trl":
            raise ImportError("No module named 'trl'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_trl)
    monkeypatch.setattr(vs_trl, "ensure_data", lambda *a: pytest.fail("built data before the check"))
    with pytest.raises(P.ConfigError, match="TRL is not installed here"):
        vs_trl.main(["--runs", "1"])
    with pytest.raises(P.ConfigError, match="--sizes 'huge'"):
        vs_trl.main(["--sizes", "huge"])


def test_throughput_quick_times_every_layout(out):
    throughput.main(["--quick", "--out", out])
    rows = results(out, "throughput")["rows"]
    assert [r["variant"] for r in rows] == ["plain", "scored", "shared prefix", "shared prefix, packed, one pass",
                                            "shared prefix, packed", "shared prefix, packed, bucketed"]
    plain, scored, shared, one_pass, packed, bucketed = rows
    assert plain["speedup"] == 1 and all(r["speedup"] > 0 for r in rows)
    # the same batches: the same positions per pair for the two row-per-reply layouts, and the same
    # scored tokens per pair for the four that draw the same pairs
    assert plain["tokens_per_second"] / plain["pairs_per_second"] == pytest.approx(
        scored["tokens_per_second"] / scored["pairs_per_second"])
    for row in (scored, shared, one_pass, packed):
        assert row["scored_tokens_per_second"] / row["pairs_per_second"] == pytest.approx(
            plain["scored_tokens_per_second"] / plain["pairs_per_second"])
    for row in rows[1:]:
        assert row["mfu_needed"] <= row["mfu"] * 1.0001
    assert plain["mfu_needed"] < plain["mfu"]
    # packing the same pairs, the emptier rows in a shorter second pass, or drawing pairs of similar
    # length, pads less: more of the work done is work the loss needs
    share = {r["variant"]: r["mfu_needed"] / r["mfu"] for r in rows}
    assert share["shared prefix, packed"] > share["shared prefix, packed, one pass"] > share["shared prefix"]
    assert share["shared prefix, packed, bucketed"] > share["shared prefix"]


def test_kv_cache_quick_samples_the_same_tokens_faster(out):
    kv_cache.main(["--quick", "--out", out])
    r = results(out, "kv_cache")
    cached, uncached = r["rows"]
    assert cached["sampler"] == "KV cache" and uncached["sampler"] == "recomputed prefix"
    assert r["speedup"] == pytest.approx(uncached["seconds"] / cached["seconds"])
    assert r["peak_flops"] > 0


def test_the_kv_cache_benchmark_draws_the_same_tokens_both_ways(tiny_enc):
    # the comparison is fair only if the cache changes the work, not the draw
    model = helpers.tiny_gpt(tiny_enc.n_vocab, seed=3, std=0.3)
    prompts = [M.render_prompt(tiny_enc, p) for p in ("Ana has 7 pens.", "Ben has 3 cards. He gets 2 more.")]
    draws = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(5)
        draws.append(M.generate(model, prompts, 12, stop_token=-1, generator=gen, use_cache=use_cache)[0])
    assert draws[0] == draws[1] and all(len(r) == 12 for r in draws[0])
    cached, uncached = kv_cache.kv_cache_speedup(model, prompts, new_tokens=12)
    assert cached > 0 and uncached > 0


def test_the_kv_cache_benchmark_samples_only_what_the_context_has_room_for(tiny_sft_ckpt, tiny_data_dir):
    # a prompt that leaves fewer than 64 free context tokens: the benchmark samples that many, and a
    # prompt with no room left at all stops in one line that says so
    enc = M.load_tokenizer(os.path.join(tiny_data_dir, "tokenizer.json"))
    model, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", os.path.join(tiny_data_dir, "tokenizer.json"))
    prompt = M.render_prompt(enc, "Mia has 3 pens. " * 25 + "How many pens does Mia have?")
    room = model.config.block_size - len(prompt)
    assert 0 < room < 64  # the premise
    assert kv_cache.room_for(model, [prompt], "long.jsonl") == room
    assert kv_cache.room_for(model, [prompt[:10]], "short.jsonl") == 64
    too_long = M.render_prompt(enc, "Mia has 3 pens. " * 40 + "How many pens does Mia have?")
    with pytest.raises(P.ConfigError, match=r"^long\.jsonl: the longest prompt is \d+ tokens long, leaving no room "
                       r"in the model's 192-token context$"):
        kv_cache.room_for(model, [too_long], "long.jsonl")


def test_length_biased_data_is_biased_and_the_balanced_data_is_not(tiny_data_dir):
    rows = [r for _, r in formats.read_jsonl(os.path.join(tiny_data_dir, "prefs.jsonl"))]
    gap = length_bias.length_gap(rows)
    padded = sum(length_bias.paddable(r["chosen"]) for r in rows) / len(rows)
    filler = len("\n".join(length_bias.FILLER)) + 1  # the lines and the newline before them
    assert padded > 0.5
    assert length_bias.length_gap(length_bias.biased(rows)) == pytest.approx(gap + padded * filler)
    balanced = length_bias.balanced(rows, random.Random(0))
    longest_line = max(len(f) for f in length_bias.FILLER) + 1
    kept = [a for a in rows if length_bias.paddable(min(a["chosen"], a["rejected"], key=len))]
    assert len(balanced) == len(kept) > len(rows) / 2
    for a, b in zip(kept, balanced):  # filler only, only on the shorter reply, up to the longer one
        assert (b["chosen"] == a["chosen"]) or (b["rejected"] == a["rejected"])
        assert 0 <= max(len(b["chosen"]), len(b["rejected"])) - min(len(b["chosen"]), len(b["rejected"])) \
            <= longest_line
    assert abs(length_bias.length_gap(balanced)) < longest_line / 2


def test_shorter_pairs_differ_only_in_length(tiny_data_dir, monkeypatch):
    # every replaced pair is one that only the judge's last rule decides: both replies right, one
    # style, the shorter chosen, for the training problem it was drawn for; the rest untouched
    from data import world
    drawn, real = [], world.sample_problems

    def recording(rng, n, heldout, **kw):
        out = real(rng, n, heldout, **kw)
        drawn.extend((heldout, p) for p in out)
        return out

    monkeypatch.setattr(world, "sample_problems", recording)
    rows = [r for _, r in formats.read_jsonl(os.path.join(tiny_data_dir, "prefs.jsonl"))]
    new = length_bias.shorter(rows, random.Random(0), share=0.5)
    assert len(new) == len(rows)
    replaced = [b for a, b in zip(rows, new) if b != a]
    assert 0.4 * len(rows) < len(replaced) < 0.6 * len(rows)
    by_prompt = {p["prompt"]: p for heldout, p in drawn}
    assert not any(heldout or world.is_heldout(p) for heldout, p in drawn)
    for b in replaced:
        problem = by_prompt[b["prompt"]]  # the replies answer the problem the prompt states
        assert b["answer"] == problem["answer"]
        assert world.verify(problem, b["chosen"]) and world.verify(problem, b["rejected"])
        assert world.classify_style(b["chosen"]) == world.classify_style(b["rejected"]) != "other"
        assert len(b["chosen"]) < len(b["rejected"])
        assert world.judge(problem, b["chosen"]) > world.judge(problem, b["rejected"])
    assert length_bias.shorter(rows, random.Random(0), share=0.0) == rows
    with pytest.raises(ValueError, match="terse"):
        length_bias.shorter(rows, random.Random(0), styles=("terse",))
    only_steps = length_bias.shorter(rows, random.Random(0), share=0.5, styles=("step",))
    assert {world.classify_style(b[k]) for a, b in zip(rows, only_steps) if b != a for k in ("chosen", "rejected")} \
        == {"step"}


def test_filler_keeps_the_judges_labels(tiny_data_dir):
    from data import world
    rows = [r for _, r in formats.read_jsonl(os.path.join(tiny_data_dir, "prefs.jsonl"))]
    kept = [a for a in rows if length_bias.paddable(min(a["chosen"], a["rejected"], key=len))]
    for old, new in ((rows, length_bias.biased(rows)), (kept, length_bias.balanced(rows, random.Random(0)))):
        for a, b in zip(old, new):
            for key in ("chosen", "rejected"):  # style and stated answer unchanged: the judge agrees
                assert world.classify_style(b[key]) == world.classify_style(a[key])
                assert world.parse_answer(b[key]) == world.parse_answer(a[key])


def test_plot_without_matplotlib_says_how_and_still_writes_results(tmp_path, monkeypatch, capsys):
    helpers.without_matplotlib(monkeypatch)
    s = {"dir": str(tmp_path), "quick": True}
    common.write_results(s, {"rows": [{"a": 1.0}]}, ["a"], "t")
    assert common.plot(s, lambda plt: plt.plot([0, 1], [0, 1])) is None
    assert "pip install matplotlib" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "results.json") and os.path.exists(tmp_path / "results.md")
    assert not os.path.exists(tmp_path / "plot.png")


def test_results_hold_strict_json_and_the_table_says_nan(tmp_path):
    s = {"dir": str(tmp_path), "quick": False}
    common.write_results(s, {"rows": [{"beta": 0.1, "kl": float("nan")}]}, ["beta", "kl"], "t")
    with open(tmp_path / "results.json") as f:
        assert helpers.strict_loads(f.read()) == {"rows": [{"beta": 0.1, "kl": None}]}
    assert "| 0.1 | nan |" in (tmp_path / "results.md").read_text()


def test_read_log_reads_a_logged_nan_back_as_nan(tmp_path):
    path = str(tmp_path / "log.jsonl")
    common.P.append_jsonl(path, {"step": 0, "loss": float("nan"), "kl": 0.5})
    (rec,) = common.read_log(path)
    assert rec["step"] == 0 and rec["kl"] == 0.5 and math.isnan(rec["loss"])


def test_plot_with_matplotlib_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")  # CI installs it; requirements.txt does not
    path = common.plot({"dir": str(tmp_path), "quick": True}, lambda plt: plt.plot([0, 1], [0, 1]))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_experiment_runs_use_dpo_defaults_but_for_what_they_set():
    # the exercise book measures dpo.py as a user runs it: a full-size run differs from DPOConfig()
    # only in where it starts and writes (no report card per run), and in the experiment's own overrides
    from dataclasses import asdict
    s = {"init": "sft.pt", "data_dir": "d", "dir": "exp", "device": "cpu", "quick": False}
    got = asdict(common.dpo_config(s, "run", beta=0.3))
    want = {**asdict(dpo.DPOConfig()), "init": "sft.pt", "data_dir": "d", "out": os.path.join("exp", "run"),
            "device": "cpu", "beta": 0.3, "report": False}
    assert got == want


def test_spearman_hand_worked():
    assert common.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1
    assert common.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # d = 0, 1, 1: 1 - 6*2/(3*8)


def test_stage_from_python_equals_the_command_line(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    flags = dict(init=tiny_sft_ckpt, data_dir=tiny_data_dir, steps=3, batch_size=4, eval_problems=4,
                 max_new_tokens=8, device="cpu")
    in_process = dpo.train(dpo.DPOConfig(**flags, out=str(tmp_path / "py")))
    argv = [sys.executable, "dpo.py", "--out", str(tmp_path / "cli")]
    for k, v in flags.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "cli" / "dpo" / "metrics.json") as f:
        cli = json.load(f)
    for key in ("pref_accuracy", "margin", "win_rate", "judge_score_policy", "judge_score_ref", "accuracy_policy",
                "kl", "steps", "pairs"):
        assert cli[key] == pytest.approx(in_process[key], abs=1e-6), key


EXPERIMENTS = [beta_sweep, ipo_vs_dpo, kv_cache, length_bias, offline_vs_online, overtraining, throughput]


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda m: m.__name__)
def test_a_bad_flag_stops_an_experiment_in_one_line_before_building_anything(experiment, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        common.run(lambda: experiment.main(["--quick", "--device", "tpu", "--out", str(out)]))
    assert e.value.code == "error: --device 'tpu': expected auto, cpu, cuda, cuda:N or mps"
    assert not out.exists()  # no data, no SFT model, no results
    with open(experiment.__file__) as f:  # and the script's own command line goes through common.run
        assert f.read().rstrip().endswith('if __name__ == "__main__":\n    common.run(main)')


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda m: m.__name__)
def test_an_out_that_is_a_file_stops_an_experiment_in_one_line(experiment, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")  # os.makedirs under it used to raise NotADirectoryError, a traceback
    with pytest.raises(SystemExit) as e:
        common.run(lambda: experiment.main(["--quick", "--out", str(out)]))
    assert e.value.code == f"error: --out {out}: exists and is not a directory"


def test_quick_data_is_rebuilt_when_its_settings_change(tmp_path, monkeypatch):
    # --quick used to reuse any data dir with a manifest in it, whatever settings built it
    args = common.parse_args("x", ["--quick", "--out", str(tmp_path)])
    built = []
    monkeypatch.setattr(common.P, "previous_stage", lambda *a: built.append(a) or "sft.pt")
    small = dict(common.QUICK_DATA, n_rl=10)
    s = common.setup("x", args, quick_data=small)
    with open(os.path.join(s["data_dir"], "rl.jsonl")) as f:
        assert len(f.readlines()) == 10
    s = common.setup("x", args, quick_data=dict(small, n_rl=12))
    with open(os.path.join(s["data_dir"], "rl.jsonl")) as f:
        assert len(f.readlines()) == 12


def test_an_experiments_command_line_prints_one_line_and_exits_1(tmp_path):
    done = subprocess.run([sys.executable, "experiments/overtraining.py", "--device", "tpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr == "error: --device 'tpu': expected auto, cpu, cuda, cuda:N or mps\n"
