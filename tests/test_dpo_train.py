"""dpo.train() from the outside: the command line lists every flag, the reference model is frozen and
never stepped (and, when its log-probs are precomputed, freed before the first step), the
over-optimisation warning fires exactly when its condition first holds in the log, the learning rate
of each step, and the reply budget checked before training.

Each run is a few steps of the tiny SFT checkpoint from conftest.py, on the CPU, seeded.
"""

import gc
import json
import os
import re
import subprocess
import sys
import weakref

import pytest
import torch

import checks
import dpo
import model as M
import plumbing as P
from test_dpo import ROOT, read_log, tiny_dpo_config, tiny_path


def recording_loader(monkeypatch, record):
    """Patch dpo.M.load_checkpoint so that record(model) sees every model train() loads."""
    original = M.load_checkpoint

    def load(*args, **kwargs):
        model, ckpt = original(*args, **kwargs)
        record(model)
        return model, ckpt

    monkeypatch.setattr(dpo.M, "load_checkpoint", load)


def recording_adamw(monkeypatch):
    """Patch dpo's AdamW to record what train() gives it: -> (the parameter list of each optimiser
    made, the lr of each optimiser step, read as the step runs)."""
    optimised, lrs = [], []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, *args, **kwargs):
            params = list(params)
            optimised.append(params)
            super().__init__(params, *args, **kwargs)

        def step(self, *args, **kwargs):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(dpo.torch.optim, "AdamW", RecordingAdamW)
    return optimised, lrs


def test_cli_help_lists_every_flag():
    result = subprocess.run([sys.executable, "dpo.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # argparse puts each option at the start of its own indented line in the options list; taking
    # whole option names from there means --data is not found inside --data-dir, nor --steps in the
    # help text of --epochs ("ignored when --steps is set")
    lines = result.stdout.splitlines()
    options = {}  # option name -> its help text (the option line and its continuation lines)
    current = None
    for line in lines:
        m = re.match(r"^\s+(--[a-z][a-z-]*)\b(?![a-z-])", line)
        if m:
            current = m.group(1)
            options[current] = line
            for extra in re.findall(r", (--[a-z][a-z-]*)", line):  # --live-reference, --no-live-reference
                options[extra] = line
        elif current and line.startswith(" " * 10) and line.strip():
            options[current] += " " + line.strip()
        else:
            current = None
    wanted = {"--beta", "--lr", "--epochs", "--steps", "--batch-size", "--data", "--data-dir", "--test-data",
              "--device", "--out", "--seed", "--init", "--log-every", "--loss-type", "--rpo-alpha",
              "--live-reference"}
    assert wanted <= set(options), sorted(wanted - set(options))
    for flag in sorted(wanted):
        assert "(default:" in options[flag], (flag, options[flag])


def test_train_freezes_the_reference_and_steps_only_the_policy(tiny_sft_ckpt, tiny_data_dir, tmp_path,
                                                               monkeypatch):
    loaded = []
    recording_loader(monkeypatch, loaded.append)
    optimised, _ = recording_adamw(monkeypatch)  # the parameter lists train() hands to AdamW
    # live_reference: the reference is kept and run at every step, so it must survive all of them
    dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path / "out"), steps=4, batch_size=4,
                              eval_problems=0, live_reference=True, lr=1e-3, warmup_steps=1))
    assert len(loaded) == 2 and loaded[0] is not loaded[1]
    policy, reference = loaded
    start, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", tiny_path(tiny_data_dir, "tokenizer.json"))
    start_sd = start.state_dict()

    ref_params = list(reference.parameters())
    assert ref_params and all(not p.requires_grad and p.grad is None for p in ref_params)
    assert not reference.training and not any(m.training for m in reference.modules())
    ref_sd = reference.state_dict()
    assert ref_sd.keys() == start_sd.keys()
    for k in start_sd:
        assert torch.equal(ref_sd[k], start_sd[k]), k
    # the policy did move: some weight differs from the checkpoint's
    assert any(not torch.equal(v, start_sd[k]) for k, v in policy.state_dict().items())

    assert len(optimised) == 1
    given = {id(p) for p in optimised[0]}
    assert not given & {id(p) for p in ref_params}
    assert given == {id(p) for p in policy.parameters()}


def test_precomputed_reference_is_freed_before_training(tiny_sft_ckpt, tiny_data_dir, tmp_path, monkeypatch):
    refs = []  # weak references only: a strong one here would keep the reference alive by itself
    recording_loader(monkeypatch, lambda model: refs.append(weakref.ref(model)))
    alive = []  # at each batch_loss call: is the reference (the second model loaded) still alive?
    original = dpo.batch_loss

    def batch_loss(*args, **kwargs):
        gc.collect()  # a cycle holding the reference would still count as freed once collected
        alive.append(refs[1]() is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(dpo, "batch_loss", batch_loss)
    steps = 3
    dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path / "out"), steps=steps, batch_size=4,
                              eval_problems=0))
    assert len(refs) == 2  # policy, reference; nothing reloaded with eval_problems=0
    # the first call is the step-0 check, which runs the reference: alive there shows the weakref
    # tracks the right object (a dead one from the start would make the rest pass vacuously)
    assert len(alive) == 1 + steps and alive[0]
    assert alive[1:] == [False] * steps, alive


def test_warning_fires_when_the_chosen_logprob_falls_while_the_margin_grows(tiny_sft_ckpt, tiny_data_dir,
                                                                           tmp_path, capsys, monkeypatch):
    # The chosen log-prob must really fall, not just look lower on a batch of longer replies: four
    # pairs and a batch of four make every step score the same pairs. Each rejected reply is its
    # chosen one said three times: the shared first copy cancels in the margin, and pushing the
    # repeats down drags the chosen reply's tokens down with them (measured: -193 -> -244 nats in
    # 12 steps at lr 3e-3, beta 0.1, the margin positive from step 1).
    with open(tiny_path(tiny_data_dir, "prefs.jsonl")) as f:
        rows = [json.loads(line) for line in f][:4]
    path = tmp_path / "repeats.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"],
                                        "rejected": " ".join([r["chosen"]] * 3)}) + "\n" for r in rows))
    steps = 8
    # log_every=1: each logged record is one step's own numbers (no averaging window). The warning's
    # condition, the chosen replies' fall below the reference (= the start) on the same replies,
    #   -rewards/chosen / beta > threshold  and  rewards/margins > 0,
    # can then be evaluated exactly on the log; with the same pairs at every step the fall is also
    # the drop of logps/chosen from step 0 (where policy == reference), which checks it independently
    threshold = 20.0  # crossed a few steps in, so the step it names is not trivially the first

    def run(warn, name):
        out = str(tmp_path / name)
        metrics = dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out, data=str(path), steps=steps,
                                            batch_size=4, eval_problems=0, lr=3e-3, beta=0.1, warmup_steps=1,
                                            log_every=1, chosen_logp_warn=warn))
        return metrics, read_log(out), capsys.readouterr().out

    def fall(r):
        return -r["rewards/chosen"] / 0.1

    def first_warning(log, warn):
        return next((r["step"] for r in log if fall(r) > warn and r["rewards/margins"] > 0), None)

    metrics, log, out = run(threshold, "warn")
    assert [r["step"] for r in log] == list(range(steps))
    for r in log:
        assert fall(r) == pytest.approx(log[0]["logps/chosen"] - r["logps/chosen"], abs=1e-2)
    step = metrics["warning_step"]
    assert step is not None and step > 1 and step == first_warning(log, threshold)
    # the step before did not yet qualify; at the step, the chosen reply had fallen past the threshold
    assert fall(log[step - 1]) <= threshold
    assert fall(log[step]) > threshold and log[step]["rewards/margins"] > 0
    lines = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith(f"warning: step {step}: the chosen log-prob fell")

    metrics, log, out = run(1e9, "quiet")
    assert metrics["warning_step"] is None and first_warning(log, 1e9) is None
    assert "warning:" not in out

    # the margin clause: the same training (the loss is untouched, so the same log-probs), with
    # batch_loss reporting the two rewards swapped, so that the logged margin is never positive
    original = dpo.batch_loss

    def swapped_rewards(*args, **kwargs):
        loss, chosen_rewards, rejected_rewards = original(*args, **kwargs)
        return loss, rejected_rewards, chosen_rewards

    monkeypatch.setattr(dpo, "batch_loss", swapped_rewards)
    metrics, swapped, out = run(threshold, "swapped")
    assert [r["logps/chosen"] for r in swapped] == [r["logps/chosen"] for r in log]  # fell just as far
    assert all(r["rewards/margins"] <= 0 for r in swapped)
    assert any(-r["rewards/rejected"] / 0.1 > threshold for r in swapped)  # the chosen replies did fall that far
    assert metrics["warning_step"] is None and "warning:" not in out


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])  # with a reference, and without (a probe batch)
def test_no_warning_when_only_the_batches_reply_lengths_differ(tiny_sft_ckpt, tiny_data_dir, tmp_path, capsys,
                                                               loss_type):
    # A summed log-prob is lower for a longer reply: comparing one batch's chosen log-prob with another
    # batch's would read a batch of longer replies as a fall. At a learning rate too small to move
    # anything, the chosen replies fell nowhere (measured on the same replies), so no warning.
    out = str(tmp_path)
    metrics = dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out, steps=12, batch_size=4, lr=1e-7,
                                        warmup_steps=1, log_every=1, eval_problems=0, chosen_logp_warn=0.5,
                                        loss_type=loss_type))
    log = read_log(out)
    # what a batch-to-batch comparison would have flagged: a later batch's chosen log-prob more than
    # the threshold below the first one's, with a positive margin
    assert any(r["logps/chosen"] < log[0]["logps/chosen"] - 0.5 and r["rewards/margins"] > 0 for r in log)
    if loss_type == "sigmoid":
        assert all(-r["rewards/chosen"] / 1.0 < 0.01 for r in log)  # beta 1.0 (the default): nothing fell
    assert metrics["warning_step"] is None and "warning:" not in capsys.readouterr().out


@pytest.mark.parametrize("schedule,factors", [
    # peak 3e-3, 2 warmup steps, 6 steps: warmup, then down a straight line that would reach 0 at step 6
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_each_step_runs_at_the_scheduled_learning_rate(tiny_sft_ckpt, tiny_data_dir, tmp_path, monkeypatch,
                                                        schedule, factors):
    _, used = recording_adamw(monkeypatch)  # the lr AdamW actually steps with, read inside step()
    out = str(tmp_path / "out")
    dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out, steps=6, batch_size=4, eval_problems=0,
                              lr=3e-3, warmup_steps=2, lr_schedule=schedule, log_every=1))
    assert used == pytest.approx([3e-3 * f for f in factors])
    assert [r["lr"] for r in read_log(out)] == pytest.approx(used)  # the log reports the same


@pytest.mark.parametrize("warmup, noted", [(5, True), (3, True), (2, False)])
@pytest.mark.parametrize("length", [dict(steps=3), dict(steps=0, epochs=1, max_pairs=12)])  # 12 / 4 = 3 steps
def test_a_run_that_is_all_warmup_says_so(tiny_sft_ckpt, tiny_data_dir, tmp_path, monkeypatch, capsys,
                                          warmup, noted, length):
    _, used = recording_adamw(monkeypatch)
    dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, str(tmp_path), batch_size=4, lr=1e-3,
                              eval_problems=0, warmup_steps=warmup, **length))
    notes = [line for line in capsys.readouterr().out.splitlines() if "covers the whole run" in line]
    # the steps it ran: every one still climbing (peak * (step + 1) / warmup) exactly when noted
    assert len(used) == 3
    climbing = used == pytest.approx([1e-3 * (step + 1) / warmup for step in range(3)])
    assert climbing == noted and len(notes) == int(noted)
    if noted:
        assert notes[0] == (f"dpo: note: --warmup-steps {warmup} covers the whole run of 3 steps: the learning "
                            f"rate climbs to at most {used[-1] / 1e-3:.0%} of its peak")


def test_without_a_reference_the_warning_watches_a_fixed_batch(tiny_sft_ckpt, tiny_data_dir, tmp_path, capsys):
    # SimPO has no reference: the fall is measured on a probe batch re-scored at each log line. A large
    # learning rate pushes its chosen replies down; the advice then leaves out beta (SimPO's is not DPO's)
    out = str(tmp_path)
    metrics = dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, out, steps=20, batch_size=4, lr=1e-2,
                                        warmup_steps=1, log_every=1, eval_problems=0, loss_type="simpo"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert metrics["warning_step"] is not None and len(lines) == 1
    assert "nats below their start (a fixed batch) on the same replies" in lines[0]
    assert lines[0].endswith("(over-optimisation; lower --lr or --epochs)")


def test_a_reply_budget_past_the_context_stops_before_training(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    # the evaluations sample after training: a budget that cannot fit must fail before the first step
    out = tmp_path / "out"
    with pytest.raises(P.ConfigError, match=r"^--max-new-tokens 1000 does not fit: the longest prompt in .*test"):
        dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, str(out), max_new_tokens=1000, eval_problems=4))
    assert not (out / "dpo" / "model.pt").exists() and not (out / "dpo" / "log.jsonl").exists()
    checks.dpo(dpo.DPOConfig(max_new_tokens=1000), dpo.BUILDS)  # alone it is no error: no model, no prompts yet


def test_an_eval_reference_with_a_shorter_context_is_checked_before_training(tiny_sft_ckpt, tiny_data_dir, tiny_enc,
                                                                             tmp_path):
    # the final evaluation samples the --eval-reference too: a context too short for its replies fails first
    tok = tiny_path(tiny_data_dir, "tokenizer.json")
    short = M.GPT(M.GPTConfig(vocab_size=tiny_enc.n_vocab, block_size=40, n_layer=1, n_head=2, n_embd=32))
    M.save_checkpoint(str(tmp_path / "short.pt"), short, tok)
    out = tmp_path / "out"
    with pytest.raises(P.ConfigError, match=r"^--max-new-tokens 16 does not fit: the longest prompt in .* takes "
                                            r"\d+ of .*short.pt's 40 context tokens"):
        dpo.train(tiny_dpo_config(tiny_data_dir, tiny_sft_ckpt, str(out), eval_problems=4,
                                  eval_reference=str(tmp_path / "short.pt")))
    assert not (out / "dpo" / "model.pt").exists()


def test_dpo_reads_the_sft_models_replies_when_the_same_weights_drew_them(tiny_data_dir, tmp_path, capsys):
    # sft.py keeps its held-out replies; DPO's evaluation of the same model on the same problems with the
    # same settings reads them instead of sampling them again, and every figure is what sampling gives
    import sft
    out = str(tmp_path / "run")
    sft.train(sft.SFTConfig(n_layer=1, n_head=2, n_embd=32, pretrain_steps=10, sft_steps=10, pretrain_batch_size=8,
                            pretrain_seq_len=32, sft_batch_size=8, eval_problems=6, max_new_tokens=16,
                            eval_every=100, data_dir=tiny_data_dir, out=out, device="cpu", warmup_steps=2))
    init = f"{out}/sft/model.pt"
    runs = {}
    for name, keep in (("read", True), ("sampled", False)):
        if not keep:
            os.remove(f"{out}/sft/replies.json")
        capsys.readouterr()
        runs[name] = dpo.train(tiny_dpo_config(tiny_data_dir, init, out, steps=2, eval_problems=6))
        assert ("the reference's replies read from" in capsys.readouterr().out) == keep
    for key in ("accuracy_ref", "greedy_accuracy_ref", "judge_score_ref", "win_rate", "style_shares_ref", "kl"):
        assert runs["read"][key] == runs["sampled"][key], key
