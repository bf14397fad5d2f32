"""The GPU recipe (--preset gpu) and the CUDA path. The recipe's shapes and flags run here on the
CPU on a shortened schedule, so that only its CUDA run is left untested on a machine without a GPU;
the tests marked cuda run where a GPU is (scripts/gpu_check.sh runs them) and are skipped, saying
so, everywhere else.
"""

import dataclasses
import os

import pytest
import torch

import dpo
import model as M
import plumbing as P
import presets
import rlvr
import sft
from data.prepare import GPU_WORLD, PrepareConfig, config_problem

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (scripts/gpu_check.sh runs "
                          "these on a GPU)")


def test_preset_gpu_sets_the_recipe_as_defaults_and_a_given_flag_still_wins():
    config = P.run_cli(sft.__doc__, sft.SFTConfig, lambda c: c, ["--preset", "gpu", "--sft-steps", "7"],
                       show_config=False, presets=presets.of("sft"))
    assert (config.n_layer, config.n_embd, config.sft_steps) == (8, 384, 7)
    assert config.data_dir.endswith(os.path.join("data", "gpu")) and config.out.endswith(os.path.join("out", "gpu"))
    assert P.run_cli(sft.__doc__, sft.SFTConfig, lambda c: c, [], show_config=False,
                     presets=presets.of("sft")) == sft.SFTConfig()  # without --preset: today's defaults
    with pytest.raises(SystemExit, match="--preset 'tpu' is unknown; known: gpu"):
        P.run_cli(dpo.__doc__, dpo.DPOConfig, lambda c: c, ["--preset", "tpu"], presets=presets.of("dpo"))


def test_the_recipe_is_a_larger_model_on_a_larger_world():
    shape = presets.PRESETS["gpu"]["sft"]
    gpt = M.GPT(M.GPTConfig(vocab_size=1012, block_size=192, n_layer=shape["n_layer"], n_head=shape["n_head"],
                            n_embd=shape["n_embd"]))
    assert 10e6 < gpt.num_params() < 30e6  # the range; the default is 0.92M
    assert config_problem(GPU_WORLD) is None
    default = PrepareConfig()
    assert GPU_WORLD.pretrain_mb >= 10 * default.pretrain_mb and GPU_WORLD.n_prefs > default.n_prefs
    # the pretraining tokens grow with the model: steps x batch x window
    tokens = shape["pretrain_steps"] * shape["pretrain_batch_size"] * shape["pretrain_seq_len"]
    assert tokens > 10 * (sft.SFTConfig.pretrain_steps * sft.SFTConfig.pretrain_batch_size
                          * sft.SFTConfig.pretrain_seq_len)


def test_the_recipe_runs_through_every_stage_on_the_cpu_on_a_short_schedule(tiny_data_dir, tmp_path):
    """sft.py, dpo.py and rlvr.py with the recipe's flags, its schedule cut to a few steps of small
    batches (the tiny data holds no 64 x 192 validation batch)."""
    out, short = str(tmp_path), dict(data_dir=tiny_data_dir, device="cpu", report=False)
    sft.train(sft.SFTConfig(**{**presets.PRESETS["gpu"]["sft"], **short, "out": out, "pretrain_steps": 2, "sft_steps": 2,
                               "pretrain_batch_size": 2, "pretrain_seq_len": 64, "sft_batch_size": 4,
                               "eval_problems": 2, "max_new_tokens": 8}))
    m = dpo.train(dpo.DPOConfig(**{**presets.PRESETS["gpu"]["dpo"], **short, "out": out, "steps": 2, "batch_size": 4,
                                   "eval_problems": 2, "max_new_tokens": 8}))
    assert m["steps"] == 2 and m["trainable_parameters"] > 10e6
    r = rlvr.train(rlvr.RLVRConfig(**{**presets.PRESETS["gpu"]["rlvr"], **short, "out": out, "steps": 1, "prompts_per_step": 2,
                                      "group_size": 2, "eval_problems": 2, "eval_samples": 2, "max_new_tokens": 8}))
    assert r["steps"] == 1


@cuda
def test_cuda_logprobs_under_bf16_autocast_stay_near_fp32():
    """On CUDA the forward runs under bf16 autocast and the log-probs come back in fp32: a tiny GPT's
    sequence log-probs there agree with the CPU's fp32 ones to bf16's rounding (a few hundredths per token)."""
    torch.manual_seed(0)
    gpt = M.GPT(M.GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=64))
    ids, mask = torch.randint(300, (4, 40)), torch.ones(4, 40, dtype=torch.long)
    mask[:, :10] = 0
    cpu = dpo.sequence_logprobs(gpt, ids, mask)
    gpu = dpo.sequence_logprobs(gpt.cuda(), ids.cuda(), mask.cuda())
    assert gpu.dtype == torch.float32
    assert torch.allclose(gpu.cpu(), cpu, atol=0.05 * 30, rtol=0)


@cuda
def test_cuda_pipeline_runs_end_to_end(tiny_data_dir, tmp_path):
    out, short = str(tmp_path), dict(data_dir=tiny_data_dir, device="cuda", report=False, out=str(tmp_path))
    sft.train(sft.SFTConfig(n_layer=1, n_head=2, n_embd=32, pretrain_steps=10, sft_steps=10, pretrain_batch_size=8,
                            pretrain_seq_len=32, sft_batch_size=8, eval_problems=4, max_new_tokens=12, **short))
    m = dpo.train(dpo.DPOConfig(steps=5, batch_size=8, eval_problems=4, max_new_tokens=12, **short))
    assert m["device"].startswith("cuda") and m["steps"] == 5
    r = rlvr.train(rlvr.RLVRConfig(steps=2, prompts_per_step=4, group_size=4, eval_problems=4, eval_samples=2,
                                   max_new_tokens=12, **short))
    assert r["steps"] == 2 and os.path.exists(os.path.join(out, "rlvr", "model.pt"))


@cuda
def test_cuda_compile_gives_the_eager_losses(tiny_data_dir, tmp_path):
    logs = {}
    for compile_ in (False, True):
        out = str(tmp_path / str(compile_))
        sft.train(sft.SFTConfig(n_layer=1, n_head=2, n_embd=32, pretrain_steps=6, sft_steps=0, stages="pretrain",
                                pretrain_batch_size=8, pretrain_seq_len=32, eval_problems=0, log_every=1,
                                data_dir=tiny_data_dir, out=out, device="cuda", report=False, compile=compile_))
        logs[compile_] = [line for line in open(os.path.join(out, "pretrain", "log.jsonl"))]
    import json
    a, b = ([json.loads(line)["loss"] for line in logs[k]] for k in (False, True))
    assert a == pytest.approx(b, rel=2e-2)  # bf16 autocast both ways; the fused kernels round differently


def test_the_config_dataclasses_hold_every_preset_field():
    for stage, cls in (("sft", sft.SFTConfig), ("dpo", dpo.DPOConfig), ("rlvr", rlvr.RLVRConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(presets.PRESETS["gpu"][stage]) <= fields


def test_gpu_summary_gathers_every_stage_it_finds_and_the_steps_skipped(tmp_path):
    import json
    import subprocess
    import sys
    (tmp_path / "times.txt").write_text("tests 12.5\ndefault_dpo 140.0\ngpu_dpo skipped\n")
    written = {}
    for run, stage, m in (("default", "sft", {"wall_seconds": 50.0, "tokens_per_second": 12345.6, "mfu": 0.25,
                                              "peak_flops": 9.9e14, "accuracy": 0.5, "unlisted": 1}),
                          ("default", "dpo", {"wall_seconds": 30.0, "tokens_per_second": 2000.0, "mfu": 0.125,
                                              "mfu_needed": 0.1, "peak_flops": 9.9e14, "win_rate": 0.7})):
        (tmp_path / run / stage).mkdir(parents=True)
        (tmp_path / run / stage / "metrics.json").write_text(json.dumps(m))
        written[f"{run}/{stage}"] = {k: v for k, v in m.items() if k != "unlisted"}
    subprocess.run([sys.executable, "scripts/gpu_summary.py", str(tmp_path)], check=True, capture_output=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures == {"times": {"tests": 12.5, "default_dpo": 140.0, "gpu_dpo": "skipped"}, **written}
    table = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert table[2:] == ["| default | sft | 50.0 | 12,346 | 25.0% | - | 990 |",
                         "| default | dpo | 30.0 | 2,000 | 12.5% | 10.0% | 990 |"]


def test_gpu_check_runs_to_its_end_when_the_budget_skips_every_step(tmp_path):
    import json
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(["bash", "scripts/gpu_check.sh"], check=True, capture_output=True, cwd=root,
                   env={**os.environ, "OUT": str(tmp_path), "BUDGET": "-1"})
    steps = ["tests", "default_dpo", "default_rlvr", "gpu_dpo", "gpu_rlvr", "eager_dpo", "compile_dpo"]
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == {"times": {s: "skipped" for s in steps}}
