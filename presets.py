"""
The named sets of flags that `--preset NAME` makes a stage's defaults (any flag given still wins):
each stage's own, so that dpo.py and rlvr.py build the earlier stages they miss with the same recipe.

    python dpo.py --preset gpu      (then python rlvr.py --preset gpu): docs/scale.md

gpu: a model ~15x the default's (14.5M parameters: 8 layers, 8 heads, 384 wide) on data/gpu's world
(ten times the pretraining text, three times the rows), batches of 64, a lower DPO peak for the
larger model; written to out/gpu/. Chosen, not yet measured on a GPU (docs/scale.md says what is).

RunOptions: --preset itself and the other run flags every stage takes alike (--device, --seed, --report).
"""

import dataclasses
import os

import plumbing as P
from data.prepare import GPU_DATA_DIR
from plumbing import option

HELP = ("a named set of flags, as defaults any flag given still overrides: gpu (a ~15M-parameter model on "
               "a larger world, out/gpu/, for one GPU: docs/scale.md)")



@dataclasses.dataclass
class RunOptions:
    """The run flags every stage's config inherits alike: the device, the seed, the report card, the preset."""
    device: str = option("auto", "auto | cpu | cuda | mps", "run")
    seed: int = option(1337, "random seed", "run")
    report: bool = option(True, "refresh <out>/report.md and report.html at the end (report.py)", "run")
    preset: str = option("", HELP, "run")


_GPU_RUN = dict(data_dir=GPU_DATA_DIR, out=os.path.join(P.OUT_DIR, "gpu"))
PRESETS = {"gpu": {
    "sft": dict(n_layer=8, n_head=8, n_embd=384, pretrain_steps=2000, pretrain_batch_size=64, pretrain_seq_len=192,
                pretrain_lr=1e-3, sft_steps=1000, sft_batch_size=64, sft_lr=3e-4, warmup_steps=100, **_GPU_RUN),
    "dpo": dict(batch_size=64, max_pairs=12000, lr=1e-4, **_GPU_RUN),
    "rlvr": dict(prompts_per_step=32, steps=100, **_GPU_RUN)}}


def of(stage):
    """{preset name: that preset's flags for this stage}, for plumbing.run_cli."""
    return {name: preset[stage] for name, preset in PRESETS.items()}


def flags(stage, name):
    """The flags preset `name` gives a stage ({} for no preset)."""
    return PRESETS[name][stage] if name else {}


def check(config):
    """A preset named in a config built in code (the command line checks its own): ConfigError."""
    P.require(not config.preset or config.preset in PRESETS, f"--preset {config.preset!r} is unknown; known: "
              f"{', '.join(PRESETS)}")


def earlier_stage(config_cls, stage, config, resume):
    """The config of an earlier stage a run builds because its checkpoint is missing: that stage's
    defaults under this run's preset, with this run's output, device and data (resume: the stage was cut)."""
    return config_cls(**{**flags(stage, config.preset), "out": config.out, "device": config.device,
                         "data_dir": config.data_dir, "resume": resume, "preset": config.preset})
