"""Several processes (distributed.py): the global batch split across 2 gloo processes, or into 2
micro-batches on one, trains the same model as one process on the whole batch, up to the order of
floating-point sums, for SFT and DPO; RL runs with its rollouts sharded; flags that cannot split
stop in one line before any work. The runs are real torchrun launches on the CPU.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import distributed as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SFT = ["sft.py", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--pretrain-steps", "12", "--sft-steps", "12",
       "--pretrain-batch-size", "8", "--pretrain-seq-len", "32", "--sft-batch-size", "8", "--eval-problems", "0",
       "--warmup-steps", "3", "--log-every", "3", "--eval-every", "6", "--no-report", "--device", "cpu"]


def launch(argv, out, processes=1, **env):
    """A stage's command line in new processes (torchrun for 2), one thread each. -> CompletedProcess"""
    cmd = (TORCHRUN if processes == 2 else [sys.executable]) + argv + ["--out", out]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    return done


def losses(out, stage):
    with open(os.path.join(out, stage, "log.jsonl")) as f:
        return torch.tensor([json.loads(line)["loss"] for line in f])


def weights(out, stage):
    return torch.load(os.path.join(out, stage, "model.pt"), weights_only=True)["model"]


def assert_same_training(a, b, stage):
    """The loss curves and the final weights of two runs agree to float-sum reordering."""
    la, lb = losses(a, stage), losses(b, stage)
    assert len(la) == len(lb) and torch.allclose(la, lb, rtol=1e-4, atol=1e-6), (la, lb)
    wa, wb = weights(a, stage), weights(b, stage)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), k


def test_micro_batches_cover_the_batch_in_order_and_weigh_its_shares():
    rows = (torch.arange(12).view(6, 2), list(range(6)))
    parts = list(D.micro_batches(torch.nn.Linear(1, 1), rows, 3))  # one process: its share is the batch
    assert [p[1] for p, _ in parts] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(torch.cat([p[0] for p, _ in parts]), rows[0])
    assert sum(w for _, w in parts) == pytest.approx(1.0)  # the weighted means add up to the batch's mean


@pytest.fixture(scope="module")
def sft_runs(tiny_data_dir, tmp_path_factory):
    """SFT trained as 1 x 8, 2 processes x 4, and 1 x (4 x 2 accumulation)."""
    root = tmp_path_factory.mktemp("ddp_sft")
    argv = SFT + ["--data-dir", tiny_data_dir]
    runs = {"one": str(root / "one"), "two": str(root / "two"), "accum": str(root / "accum")}
    launch(argv, runs["one"])
    two = launch(argv, runs["two"], processes=2)
    launch(argv + ["--grad-accum", "2"], runs["accum"])
    return runs, two


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_sft_on_two_processes_or_two_micro_batches_trains_the_same_model(sft_runs, stage):
    runs, _ = sft_runs
    assert_same_training(runs["one"], runs["two"], stage)
    assert_same_training(runs["one"], runs["accum"], stage)


def test_only_rank_0_writes_and_prints(sft_runs):
    _, two = sft_runs
    assert two.stdout.count("sft: done in") == 1 and two.stdout.count("pretrain: loss") == 1


def test_dpo_on_two_processes_or_two_micro_batches_trains_the_same_model(sft_runs, tiny_data_dir, tmp_path):
    runs, _ = sft_runs
    argv = ["dpo.py", "--init", os.path.join(runs["one"], "sft", "model.pt"), "--data-dir", tiny_data_dir,
            "--device", "cpu", "--steps", "8", "--batch-size", "8", "--max-pairs", "64", "--eval-problems", "4",
            "--max-new-tokens", "12", "--log-every", "2", "--no-report"]
    out = {k: str(tmp_path / k) for k in ("one", "two", "accum")}
    launch(argv, out["one"])
    launch(argv, out["two"], processes=2)  # the reference pass sharded across the two and gathered
    launch(argv + ["--grad-accum", "2"], out["accum"])
    for k in ("two", "accum"):
        assert_same_training(out["one"], out[k], "dpo")
        with open(os.path.join(out["one"], "dpo", "metrics.json")) as f, open(os.path.join(out[k], "dpo",
                                                                                           "metrics.json")) as g:
            a, b = json.load(f), json.load(g)
        assert a["pairs"] == b["pairs"] and a["pref_accuracy"] == pytest.approx(b["pref_accuracy"], abs=0.021)
        assert b["pairs_per_second"] > 0


def test_rl_runs_on_two_processes_with_its_rollouts_sharded(sft_runs, tiny_data_dir, tmp_path):
    runs, _ = sft_runs
    argv = ["rlvr.py", "--init", os.path.join(runs["one"], "sft", "model.pt"), "--data-dir", tiny_data_dir,
            "--device", "cpu", "--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--eval-problems",
            "4", "--eval-samples", "2", "--max-new-tokens", "12", "--log-every", "1", "--format-reward", "0.5",
            "--no-report"]
    launch(argv, str(tmp_path), processes=2)
    with open(tmp_path / "rlvr" / "metrics.json") as f:
        m = json.load(f)
    assert m["steps"] == 3 and m["samples"] == 3 * 4 * 4  # every rank's share of the prompts gathered


@pytest.mark.parametrize("argv,message", [
    (["dpo.py", "--batch-size", "7"], "--batch-size 7 does not cut into 2 process(es) x --grad-accum 1"),
    (["dpo.py", "--batch-size", "1"], "--batch-size 1 is smaller than the 2 processes"),
    (["dpo.py", "--grad-accum", "3"], "--batch-size 32 does not cut into 2 process(es) x --grad-accum 3"),
    (["dpo.py", "--loss-type", "kto"], "--loss-type kto (dpo_family.py: not a mean of paired terms"),
    (["dpo.py", "--rpo-alpha", "1"], "--rpo-alpha (its NLL is one mean"),
    (["sft.py", "--sft-batch-size", "5"], "--sft-batch-size 5 does not cut into 2 process(es)"),
    (["rlvr.py", "--prompts-per-step", "3"], "--prompts-per-step 3 does not cut into 2 process(es)"),
    (["rlvr.py", "--max-seconds", "60"], "--max-seconds: each process would stop at its own time"),
])
def test_flags_that_cannot_split_stop_in_one_line_before_any_work(argv, message, tmp_path):
    """Checked before torch.distributed is joined: WORLD_SIZE=2 alone (no other process) is enough."""
    done = subprocess.run([sys.executable] + argv + ["--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"})
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)


def test_grad_accum_that_does_not_divide_the_batch_stops_on_one_process_too(tmp_path):
    done = subprocess.run([sys.executable, "dpo.py", "--grad-accum", "5", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "--batch-size 32 does not cut into 1 process(es) x --grad-accum 5" in done.stderr


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ "
                    "compiler, and this machine has none (g++ or c++ on the PATH)")
def test_compile_trains_to_the_same_losses_as_eager(tiny_data_dir, tmp_path):
    """--compile: the training forward through torch.compile (inductor's fused CPU kernels) gives the
    eager losses to float rounding, step after step, and the same final weights."""
    import sft
    runs = {}
    for compile_ in (False, True):
        out = str(tmp_path / str(compile_))
        sft.train(sft.SFTConfig(n_layer=1, n_head=2, n_embd=32, pretrain_steps=6, sft_steps=6, pretrain_batch_size=8,
                                pretrain_seq_len=32, sft_batch_size=8, eval_problems=0, warmup_steps=2, log_every=1,
                                eval_every=3, data_dir=tiny_data_dir, out=out, device="cpu", report=False,
                                compile=compile_))
        runs[compile_] = out
    for stage in ("pretrain", "sft"):
        assert_same_training(runs[False], runs[True], stage)
