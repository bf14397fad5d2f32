"""Resume (resume.py): a stage killed in the middle and resumed ends with the same weights, log and
metrics as the run that was never cut, bit for bit on CPU; a kill during a save leaves the
previous state; a state of another run, or none, stops in one line before any work.

The runs are real processes (tests/cut_run.py kills them with SIGKILL at a chosen save), on the
tiny data, one thread each, so that both sides of each comparison run the same kernels.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import resume as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("seconds", "per_second", "mfu", "memory", "peak_flops")  # the keys a resumed run may differ in
SFT_FLAGS = dict(n_layer=1, n_head=2, n_embd=32, pretrain_steps=12, sft_steps=12, pretrain_batch_size=8,
                 pretrain_seq_len=32, sft_batch_size=8, eval_problems=4, max_new_tokens=12, eval_every=5,
                 warmup_steps=3, log_every=3, report=False)


def flags(d):
    out = []
    for k, v in d.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [f"--no-{flag[2:]}"] if v is False else [flag, str(v)]
    return out


def run(args, when="never", n=0, stage="none", env=None):
    """A stage's command line in a new process, through tests/cut_run.py. -> CompletedProcess"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "tests/cut_run.py", when, str(n), stage, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def without_timings(obj):
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def assert_same_run(a, b, stage):
    """The stage's weights equal bit for bit; its metrics and log equal in every key but timings."""
    wa = torch.load(os.path.join(a, stage, "model.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(b, stage, "model.pt"), weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{stage}: weights differ"
    for name, read in (("metrics.json", json.load), ("log.jsonl", lambda f: [json.loads(line) for line in f])):
        with open(os.path.join(a, stage, name)) as fa, open(os.path.join(b, stage, name)) as fb:
            assert without_timings(read(fa)) == without_timings(read(fb)), f"{stage}/{name} differs"
    assert not os.path.exists(R.state_path(os.path.join(b, stage))), "the state outlived the stage"


# ----------------------------------------------------------------------------------------------
# The pieces: capture and restore, fingerprints


def test_capture_and_restore_continue_every_generator_and_object_exactly():
    """After restore, each object goes on exactly as the original did from the captured moment."""
    torch.manual_seed(0)
    rng, gen, order, totals = random.Random(1), torch.Generator().manual_seed(2), [3, 1, 2], {"tokens": 5}
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    things = {"rng": rng, "generator": gen, "order": order, "totals": totals, "net": net, "optimizer": opt}
    saved = R.capture(things)

    def go_on():  # a step of everything: draws, a pop, a count, an optimizer step
        draws = (rng.random(), torch.rand(2, generator=gen).tolist(), torch.rand(1).item(), order.pop())
        totals["tokens"] += 1
        opt.zero_grad()
        net(torch.ones(1, 3)).sum().backward()
        opt.step()
        return draws, totals["tokens"], [p.detach().clone() for p in net.parameters()]

    first = go_on()
    R.restore(things, saved)
    again = go_on()
    assert first[:2] == again[:2]
    assert all(torch.equal(x, y) for x, y in zip(first[2], again[2]))


def test_a_state_of_another_run_is_named_by_what_differs(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("a\n")

    from dataclasses import make_dataclass
    Config = make_dataclass("Config", [("lr", float, 1e-3), ("resume", bool, False), ("save_every", int, 10)])
    saved = R.fingerprint(Config(), {"SFT rows": str(data)})
    assert R.difference(saved, R.fingerprint(Config(resume=True, save_every=5), {"SFT rows": str(data)})) is None
    assert R.difference(saved, R.fingerprint(Config(lr=2e-3), {"SFT rows": str(data)})) == "--lr was 0.001, is 0.002"
    data.write_text("b\n")
    assert "the SFT rows changed" in R.difference(saved, R.fingerprint(Config(), {"SFT rows": str(data)}))
    data.write_text("a\n")
    assert "this run has 2" in R.difference(saved, R.fingerprint(Config(), {"SFT rows": str(data)}, world_size=2))


# ----------------------------------------------------------------------------------------------
# Killed and resumed, each stage


@pytest.fixture(scope="module")
def uncut(tiny_data_dir, tmp_path_factory):
    """The runs never cut: pretraining and SFT, then DPO and RL from that SFT model."""
    out = str(tmp_path_factory.mktemp("uncut"))
    base = ["--data-dir", tiny_data_dir, "--device", "cpu", "--save-every", "4", "--out", out]
    done = run(["sft", *flags(SFT_FLAGS), *base])
    assert done.returncode == 0, done.stderr[-2000:]
    sft_model = os.path.join(out, "sft", "model.pt")
    dpo = ["dpo", "--init", sft_model, "--steps", "10", "--batch-size", "8", "--max-pairs", "80",
           "--eval-problems", "4", "--max-new-tokens", "12", "--log-every", "3", "--no-report", *base[:4]]
    rlvr = ["rlvr", "--init", sft_model, "--steps", "6", "--prompts-per-step", "4", "--group-size", "4",
            "--eval-problems", "4", "--eval-samples", "2", "--max-new-tokens", "12", "--log-every", "2",
            "--no-report", *base[:4]]
    for args in (dpo, rlvr):
        done = run([*args, "--save-every", "3", "--out", out])
        assert done.returncode == 0, done.stderr[-2000:]
    return {"out": out, "sft": ["sft", *flags(SFT_FLAGS), *base[:-2]], "dpo": dpo, "rlvr": rlvr}


@pytest.mark.parametrize("stage,when", [("pretrain", "after"), ("sft", "after"), ("sft", "during")])
def test_sft_py_killed_in_a_stage_resumes_to_the_same_models(uncut, tmp_path, stage, when):
    """Killed at the second save of pretraining or of SFT (or halfway through writing it: the
    previous state is loaded), `sft.py --resume` ends with both models equal to the uncut run's."""
    out = str(tmp_path)
    cut = run([*uncut["sft"], "--out", out], when, 2, stage)
    assert cut.returncode == -9 and os.path.exists(R.state_path(os.path.join(out, stage)))
    done = run([*uncut["sft"], "--out", out, "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming at step {4 if when == 'during' else 8}" in done.stdout
    assert ("pretrain: done before" in done.stdout) == (stage == "sft")
    for s in ("pretrain", "sft"):
        assert_same_run(uncut["out"], out, s)


@pytest.mark.parametrize("stage,when", [("dpo", "after"), ("dpo", "during"), ("rlvr", "after")])
def test_dpo_and_rl_killed_mid_stage_resume_to_the_same_model(uncut, tmp_path, stage, when):
    out = str(tmp_path)
    cut = run([*uncut[stage], "--save-every", "3", "--out", out], when, 2, stage)
    assert cut.returncode == -9
    done = run([*uncut[stage], "--save-every", "3", "--out", out, "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming at step {3 if when == 'during' else 6}" in done.stdout
    assert not [f for f in os.listdir(os.path.join(out, stage)) if ".tmp" in f]  # the cut save's temp file
    assert_same_run(uncut["out"], out, stage)


def test_online_dpo_cut_inside_a_round_resumes_on_that_rounds_pairs(uncut, tmp_path):
    """Three rounds of 4 steps, cut at step 6 (inside round 2): the resumed run reads round 2's
    pairs back, samples round 3 from the resumed policy, and ends where the uncut run does."""
    online = [*uncut["dpo"][:-4], "--steps", "12", "--max-pairs", "48", "--pairs", "on-policy", "--rounds", "3",
              "--samples-per-prompt", "2", "--save-every", "3", *uncut["dpo"][-4:]]
    ref, out = str(tmp_path / "uncut"), str(tmp_path / "cut")
    assert run([*online, "--out", ref]).returncode == 0
    assert run([*online, "--out", out], "after", 2, "dpo").returncode == -9
    done = run([*online, "--out", out, "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming at step 6" in done.stdout and "pairs_round3.jsonl" in done.stdout
    assert "pairs_round1.jsonl" not in done.stdout  # round 1 read back, not sampled again
    assert_same_run(ref, out, "dpo")


def test_dpo_py_resume_resumes_the_sft_model_it_was_building(tiny_data_dir, tmp_path):
    """`python dpo.py` on an empty --out builds the SFT model; killed in SFT, `python dpo.py --resume`
    resumes SFT (pretraining done before), then trains DPO: both equal to the uncut pipeline's."""
    env = {"CUT_SFT": json.dumps({k: v for k, v in SFT_FLAGS.items()})}
    args = ["dpo", "--data-dir", tiny_data_dir, "--device", "cpu", "--steps", "4", "--batch-size", "8",
            "--eval-problems", "0", "--no-report"]
    ref, out = str(tmp_path / "uncut"), str(tmp_path / "cut")
    assert run([*args, "--out", ref], env=env).returncode == 0
    assert run([*args, "--out", out], "after", 1, "sft", env=env).returncode == -9
    done = run([*args, "--out", out, "--resume"], env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrain: done before" in done.stdout and "sft/state.pt: resuming at step" in done.stdout
    for stage in ("sft", "dpo"):
        assert_same_run(ref, out, stage)


def test_ctrl_c_saves_the_state_and_stops_with_how_to_resume(uncut, tmp_path):
    out = str(tmp_path)
    cut = run([*uncut["dpo"], "--save-every", "3", "--out", out], "interrupt", 1, "dpo")
    assert cut.returncode == 130
    assert "stopped at step 3" in cut.stderr and "rerun with --resume" in cut.stderr
    done = run([*uncut["dpo"], "--save-every", "3", "--out", out, "--resume"])
    assert done.returncode == 0 and "resuming at step 3" in done.stdout
    assert_same_run(uncut["out"], out, "dpo")


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, before any work


def test_resume_without_a_state_stops_in_one_line(uncut, tmp_path):
    for module in ("sft", "dpo", "rlvr"):
        done = run([*uncut[module], "--out", str(tmp_path), "--resume"] + (["--save-every", "3"] if module != "sft"
                                                                            else []))
        assert done.returncode == 1
        assert done.stderr.strip().startswith("error: --resume: no training state in")
        assert len(done.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)


def test_a_state_of_another_run_or_a_corrupt_one_stops_in_one_line(uncut, tmp_path):
    out = str(tmp_path)
    assert run([*uncut["dpo"], "--save-every", "3", "--out", out], "after", 1, "dpo").returncode == -9
    done = run([*uncut["dpo"], "--save-every", "3", "--out", out, "--resume", "--lr", "1e-4"])
    assert done.returncode == 1 and "a state of another run: --lr was 0.00025, is 0.0001" in done.stderr
    assert "step-0 check" not in done.stdout  # stopped before the reference pass
    path = R.state_path(os.path.join(out, "dpo"))
    with open(path, "r+b") as f:
        f.truncate(100)
    done = run([*uncut["dpo"], "--save-every", "3", "--out", out, "--resume"])
    assert done.returncode == 1 and f"{path}: not a training state that torch.load" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
