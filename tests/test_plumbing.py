"""plumbing.py: a config dataclass as a command line, --out and the default output directory,
strict (NaN-free) JSON writes, the device and its peak FLOP/s, autocast, the learning-rate schedules
and the all-warmup note, the batch order.
"""

import argparse
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

import helpers
import plumbing as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Config on the command line


@dataclass
class DemoConfig:
    n_layer: int = field(default=4, metadata={"help": "transformer blocks", "group": "model"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate", "group": "optim"})
    name: str = field(default="run", metadata={"help": "run name"})
    compile: bool = field(default=False, metadata={"help": "compile the model"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle the data"})
    note: Optional[str] = None


def _parse(argv, cls=DemoConfig):
    parser = P.add_config_args(argparse.ArgumentParser(), cls())
    return P.config_from_args(cls, parser.parse_args(argv)), parser


def test_config_args_round_trip():
    assert _parse([])[0] == DemoConfig()
    got, parser = _parse(["--n-layer", "2", "--lr", "0.1", "--name", "x", "--compile",
                          "--no-shuffle", "--note", "hi"])
    assert got == DemoConfig(n_layer=2, lr=0.1, name="x", compile=True, shuffle=False, note="hi")
    assert isinstance(got.n_layer, int) and isinstance(got.lr, float)
    help_text = parser.format_help()
    for flag in ("--n-layer", "--lr", "--name", "--compile", "--no-compile", "--shuffle", "--note"):
        assert flag in help_text
    assert "transformer blocks" in help_text and "model:" in help_text and "optim:" in help_text


def test_config_args_ignore_unrelated_arguments():
    parser = P.add_config_args(argparse.ArgumentParser(), DemoConfig())
    parser.add_argument("--extra", default="e")
    assert P.config_from_args(DemoConfig, parser.parse_args(["--extra", "z"])) == DemoConfig()


@dataclass
class PercentConfig:
    warmup: int = field(default=5, metadata={"help": "warmup steps, then decay to 10% of the peak"})


def test_config_help_may_contain_a_percent_sign():
    # argparse %-formats help strings, so a literal "%" in a field's help must be escaped;
    # SFTConfig.warmup_steps says "decay to 10%", and `python sft.py --help` must not crash
    _, parser = _parse([], PercentConfig)
    assert "10% of the peak" in parser.format_help()


# ----------------------------------------------------------------------------------------------
# Where the outputs go


@pytest.mark.parametrize("stage", ["dpo", "sft", "rlvr"])
def test_each_stage_refuses_an_out_that_is_a_file(tmp_path, stage):
    module = __import__(stage)
    not_a_dir = tmp_path / "notes.txt"
    not_a_dir.write_text("x")
    data = tmp_path / "data"  # does not exist: a run past the checks would build it
    with pytest.raises(SystemExit) as e:
        module.main(["--out", str(not_a_dir), "--data-dir", str(data), "--device", "cpu"])
    assert e.value.code == f"error: --out {not_a_dir}: exists and is not a directory"
    assert not data.exists() and not_a_dir.read_text() == "x"


def test_outputs_default_to_the_repositorys_out_wherever_the_scripts_run(monkeypatch):
    # data/ is the repository's: if out/ followed the working directory, a run started elsewhere would
    # find the data but not the earlier stages' checkpoints, and silently rebuild them there. The
    # defaults are absolute paths under the repository, so the working directory cannot matter
    import dpo
    import rlvr
    import sft
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    import common
    root_out = os.path.join(ROOT, "out")
    assert dpo.DPOConfig().out == sft.SFTConfig().out == rlvr.RLVRConfig().out == root_out
    assert common.parse_args("doc", []).out == root_out
    assert dpo.DPOConfig().data_dir == os.path.join(ROOT, "data")  # the same anchor as the data


# ----------------------------------------------------------------------------------------------
# Strict JSON: NaN and Infinity are written as null


def test_append_jsonl_writes_non_finite_numbers_as_null(tmp_path):
    path = tmp_path / "log.jsonl"
    P.append_jsonl(str(path), {"step": 0, "loss": float("nan"), "val_loss": float("inf"), "lr": 1e-3})
    P.append_jsonl(str(path), {"step": 1, "loss": 2.5, "val_loss": float("-inf"), "lr": 0.0})
    rows = [helpers.strict_loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 0, "loss": None, "val_loss": None, "lr": 1e-3},
                    {"step": 1, "loss": 2.5, "val_loss": None, "lr": 0.0}]


def test_write_json_writes_non_finite_numbers_as_null_at_any_depth(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    metrics = {"loss": 0.5, "memory_mb": {"total": 17.5, "peak_process": float("nan")},
               "curve": [1.0, float("inf"), {"kl": float("-inf")}], "by_ops": (0.25, float("nan")), "name": "dpo"}
    P.write_json(str(path), metrics)
    assert helpers.strict_loads(path.read_text()) == {
        "loss": 0.5, "memory_mb": {"total": 17.5, "peak_process": None},
        "curve": [1.0, None, {"kl": None}], "by_ops": [0.25, None], "name": "dpo"}
    assert math.isnan(metrics["memory_mb"]["peak_process"])  # the caller's dict is left as it was
    assert not (tmp_path / "out" / "metrics.json.tmp").exists()


# ----------------------------------------------------------------------------------------------
# Device, peak FLOP/s, autocast


def test_pick_device():
    assert P.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert P.pick_device("auto") == torch.device("cpu")


def test_pick_device_refuses_a_device_number_the_machine_lacks(monkeypatch):
    # a one-GPU machine: cuda:1 used to pass, and the run died later at .to(device) with a traceback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert P.pick_device("cuda:0") == torch.device("cuda:0")
    assert P.pick_device("cuda") == torch.device("cuda")
    with pytest.raises(P.ConfigError, match=r"^--device cuda:1: this machine has 1 CUDA device \(cuda:0\)$"):
        P.pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert P.pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(P.ConfigError, match=r"this machine has 2 CUDA devices \(cuda:0 to cuda:1\)$"):
        P.pick_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert P.pick_device("mps") == torch.device("mps")
    with pytest.raises(P.ConfigError, match="there is one MPS device"):
        P.pick_device("mps:1")


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_a_known_gpu_reads_its_peak_from_the_spec_sheet_per_device(monkeypatch, name, peak):
    monkeypatch.setattr(P, "_PEAK", {})
    names = {0: name, 1: "NVIDIA A100-SXM4-80GB"}  # two different cards in one machine
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: names[torch.device(d).index or 0])
    assert P.peak_flops("cuda:0") == peak
    assert P.peak_flops("cuda:1") == 312e12  # its own card's figure, not cuda:0's cached one


def test_the_cpu_peak_probe_leaves_the_global_rng_as_it_found_it(monkeypatch):
    # a stage seeds torch, then measures the machine: the probe must not shift what it draws next
    monkeypatch.setattr(P, "_PEAK", {})  # force a fresh probe
    torch.manual_seed(1)
    expected = torch.rand(5)
    torch.manual_seed(1)
    assert P.peak_flops("cpu") > 0
    assert torch.equal(torch.rand(5), expected)


def tiny_gpt():
    return helpers.tiny_gpt(50, block_size=32, n_layer=2, std=0.3).eval()


def test_autocast_is_fp32_on_cpu():
    m = tiny_gpt()
    with P.autocast("cpu"):
        out = m(torch.zeros(1, 4, dtype=torch.long))
    assert out.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Learning rate


def test_cosine_schedule_hand_computed():
    # peak 2.0, 10 warmup steps, 110 in all: 100 decay steps, floor 0.1 * peak = 0.2
    lr = lambda step: P.scheduled_lr("cosine", step, 110, 2.0, 10, min_ratio=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.2)       # warmup: peak * (step + 1) / warmup
    assert lr(4) == pytest.approx(1.0)
    assert lr(9) == pytest.approx(2.0)       # warmup ends at the peak ...
    assert lr(10) == pytest.approx(2.0)      # ... and the decay starts there
    # a quarter of the way: cos(pi/4) = sqrt(2)/2, so 2 * (0.1 + 0.9 * (1 + sqrt(2)/2) / 2)
    assert lr(35) == pytest.approx(2 * (0.1 + 0.45 * (1 + 2 ** 0.5 / 2)))
    assert lr(60) == pytest.approx(2 * (0.1 + 0.45))  # half way: cos = 0
    assert lr(110) == pytest.approx(0.2)
    assert lr(1000) == pytest.approx(0.2)    # past the end it stays at the floor
    assert P.scheduled_lr("cosine", 0, 10, 1.0, 0) == pytest.approx(1.0)  # no warmup: start at the peak
    assert P.scheduled_lr("cosine", 10, 10, 1.0, 0) == pytest.approx(0.0)  # no floor: down to 0


def test_linear_and_constant_schedules_hand_computed():
    # peak 3.0, 2 warmup steps, 6 in all: warmup 1.5, 3.0; then a straight line over 4 steps to 0 at step 6
    linear = [P.scheduled_lr("linear", step, 6, 3.0, 2) for step in range(7)]
    assert linear == pytest.approx([1.5, 3.0, 3.0, 2.25, 1.5, 0.75, 0.0])
    # a floor: down to min_ratio * peak = 1.0 instead of 0, over the same 4 steps
    floored = [P.scheduled_lr("linear", step, 6, 3.0, 2, min_ratio=1 / 3) for step in range(2, 7)]
    assert floored == pytest.approx([3.0, 2.5, 2.0, 1.5, 1.0])
    constant = [P.scheduled_lr("constant", step, 6, 3.0, 2) for step in range(7)]
    assert constant == pytest.approx([1.5, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    # no warmup: the first step is at the peak
    assert P.scheduled_lr("linear", 0, 4, 3.0, 0) == P.scheduled_lr("constant", 0, 4, 3.0, 0) == 3.0
    for step in (0, 3):  # an unknown name is refused in the warmup too, not only once the decay starts
        with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
            P.scheduled_lr("step", step, 6, 3.0, 2)


def test_warmup_note_exactly_when_every_step_of_the_run_is_warmup():
    # brute force over the schedule itself: the note is due when the run has steps and each step's lr
    # is the warmup's peak * (step + 1) / warmup; it quotes the last step's share of the peak
    for warmup, steps in [(10, 4), (4, 4), (3, 4), (1, 1), (0, 1), (0, 5), (10, 93), (5, 2), (5, 0), (0, 0)]:
        lrs = [P.scheduled_lr("linear", step, steps, 2.0, warmup) for step in range(steps)]
        all_warmup = bool(lrs) and warmup > 0 and all(
            lr == pytest.approx(2.0 * (step + 1) / warmup) for step, lr in enumerate(lrs))
        note = P.warmup_note("rlvr", warmup, steps)  # steps 0: rlvr's evaluation-only run, no note
        assert (note is not None) == all_warmup, (warmup, steps)
        if note:
            assert note.startswith(f"rlvr: note: --warmup-steps {warmup} covers the whole run of {steps} steps")
            assert note.endswith(f"climbs to at most {lrs[-1] / 2.0:.0%} of its peak")


# ----------------------------------------------------------------------------------------------
# Batch order


def test_next_indices_covers_each_pass_once_and_repeats_a_small_file():
    import random
    rng, order = random.Random(0), []
    first = P.next_indices(order, 6, 4, rng)
    # by hand: the first pass is one shuffle of range(6), drawn from its end
    one_pass = list(range(6))
    random.Random(0).shuffle(one_pass)
    assert first == one_pass[::-1][:4] and order == one_pass[:2]
    # two more draws complete two whole passes (the two left of the first wait below the second): 12
    # indices, each index exactly twice
    flat = first + P.next_indices(order, 6, 4, rng) + P.next_indices(order, 6, 4, rng)
    assert sorted(flat) == sorted(list(range(6)) * 2) and order == []
    small = P.next_indices([], 2, 5, random.Random(1))  # a file of 2 for a batch of 5: three passes drawn
    assert len(small) == 5 and sorted(small).count(0) >= 2 and sorted(small).count(1) >= 2

def test_bucketed_batches_cover_each_pass_once_and_pad_little():
    import random
    lengths = [random.Random(i).randrange(10, 200) for i in range(64)]
    rng, order = random.Random(7), []
    batches = [P.next_indices(order, 64, 4, rng, lengths, span=4) for _ in range(32)]  # two passes of 16 batches
    for first in (0, 16):  # each pass holds every index once, as without buckets
        assert sorted(i for b in batches[first: first + 16] for i in b) == list(range(64))
    # a batch comes from one sorted chunk: its lengths spread far less than a batch of the plain order's
    plain_rng, plain_order = random.Random(7), []
    plain = [P.next_indices(plain_order, 64, 4, plain_rng) for _ in range(32)]

    def spread(bs):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs)
    assert spread(batches) < 0.5 * spread(plain)
    # seeded: the same rng state draws the same batches
    again_rng, again_order = random.Random(7), []
    assert [P.next_indices(again_order, 64, 4, again_rng, lengths, span=4) for _ in range(32)] == batches
