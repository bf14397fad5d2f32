"""
Training states, so that a killed run picks up where it stopped. Every stage saves one every
--save-every steps, at the end of its loop and on Ctrl-C, beside its checkpoint (e.g.
out/dpo/state.pt), and removes it once the checkpoint is written; `--resume` continues from it.

A state holds everything that changes from step to step: the weights, the optimizer's moments,
the step (the LR schedule's position is a function of it), every random generator (Python's, the
torch generators, the data order), the partial log and the stage's running figures. Restored
into the same objects, a resumed run on CPU ends with the same weights and metrics as a run that
was never cut, bit for bit: every draw is seeded, and the same ops run on the same inputs.

A state is valid for one run only: its fingerprint (the config but the resume flags, the sha256
of every file the stage reads, the tokenizer, the world size) must match, or the run stops in one
line naming what differs, before any work. States are written atomically (temp file, then
rename), so a kill during a save leaves the previous one, and loaded with weights_only=True.

Nothing here knows about a stage: a stage passes a dict of its live objects (see capture).
"""

import copy
import dataclasses
import glob
import hashlib
import os
import random
import signal
import threading

import torch
from tqdm import tqdm

import distributed as D
import model as M
import plumbing as P
from data.formats import write_atomically, write_text
from plumbing import option

RESUME_FLAGS = ("resume", "save_every")  # they change how a run is saved, not what it computes


@dataclasses.dataclass
class ResumeOptions:
    """The resume flags, for a stage's config to inherit."""
    save_every: int = option(100, "save a training state (out/<stage>/state.pt) every N steps, at the end of "
                             "the loop and on Ctrl-C (0: only on Ctrl-C)", "resume")
    resume: bool = option(False, "continue the run that was cut, from its state.pt (with dpo.py or rlvr.py: "
                          "whichever stage of the pipeline was cut), with the flags it was started with", "resume")


def state_path(out_dir):
    return os.path.join(out_dir, "state.pt")


def run_config(config):
    """The config a state and a checkpoint are matched on: every field but the resume flags."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUME_FLAGS}


def file_hash(path):
    """sha256 of a file's bytes (None for a file that is not there)."""
    if not os.path.exists(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(config, files, world_size=None, **hashes):
    """What a state is valid for. files: {what it is: path} of every file the stage reads; hashes:
    {what it is: a digest computed elsewhere} (the tokenizer's)."""
    return {"config": run_config(config), "files": {**{k: file_hash(v) for k, v in files.items()}, **hashes},
            "world_size": world_size or D.world_size()}


def difference(saved, now):
    """The first thing that differs between two fingerprints, in words; None when they match."""
    for key in sorted(saved["config"].keys() | now["config"].keys()):
        a, b = saved["config"].get(key), now["config"].get(key)
        if a != b:
            return f"--{key.replace('_', '-')} was {a!r}, is {b!r}"
    for key in sorted(saved["files"].keys() | now["files"].keys()):
        if saved["files"].get(key) != now["files"].get(key):
            return f"the {key} changed since it was saved"
    if saved["world_size"] != now["world_size"]:
        return f"it was saved by a run on {saved['world_size']} process(es), this run has {now['world_size']}"
    return None


# ----------------------------------------------------------------------------------------------
# What a state holds: the live objects of a loop, captured and restored in place


def capture(things):
    """A plain-data copy of each live object (a module, an optimizer, a random generator, a list or
    dict of plain values), torch.save-able and loadable with weights_only=True."""
    def one(x):
        if isinstance(x, (torch.nn.Module, torch.optim.Optimizer)):
            return copy.deepcopy(x.state_dict())  # a state_dict's tensors are the live ones
        if isinstance(x, random.Random):
            return x.getstate()
        if isinstance(x, torch.Generator):
            return x.get_state()
        if isinstance(x, (list, dict)):
            return type(x)(x)  # a shallow copy: the values are plain data or tensors not changed in place
        raise TypeError(f"resume.capture: cannot save a {type(x).__name__}")
    return {"torch": torch.get_rng_state(), **{k: one(v) for k, v in things.items()}}


def restore(things, saved):
    """Put a capture back into the same live objects (the inverse of capture)."""
    torch.set_rng_state(saved["torch"])
    for k, x in things.items():
        s = saved[k]
        if isinstance(x, (torch.nn.Module, torch.optim.Optimizer)):
            x.load_state_dict(s)
        elif isinstance(x, random.Random):
            x.setstate(s)
        elif isinstance(x, torch.Generator):
            x.set_state(s)
        elif isinstance(x, list):
            x[:] = s
        else:
            x.clear()
            x.update(s)


# ----------------------------------------------------------------------------------------------
# Saving, loading, and the loop's hook


def save(path, print_, step, things, log_path):
    """Write the state at `step` (the steps before it done) atomically."""
    with open(log_path) as f:
        log = f.read()
    state = {"fingerprint": print_, "step": step, "things": capture(things), "log": log}
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def load(path, print_):
    """The state at path, checked against this run's fingerprint (DataError naming what differs)."""
    state = P.load_weights_only(path, "training state")
    if not isinstance(state, dict) or not {"fingerprint", "step", "things", "log"} <= state.keys():
        raise P.DataError(f"{path}: not a training state (it lacks the fingerprint, step and objects resume.save "
                          f"writes)")
    why = difference(state["fingerprint"], print_)
    if why:
        raise P.DataError(f"{path}: a state of another run: {why}; start over without --resume, or resume "
                          f"with the flags and files it was saved with")
    return state


def check(config, out_dir, print_):
    """With --resume, the state in out_dir is loaded and checked now, before any work (DataError)."""
    if config.resume and os.path.exists(state_path(out_dir)):
        load(state_path(out_dir), print_)


def start(config, out_dir, print_, things, log_path):
    """Before the loop: a fresh start (the log emptied), or with --resume and a state in out_dir,
    every object and the log put back as they were at the saved step.
    -> the saver steps() needs; its "first" is the step to start from"""
    path = state_path(out_dir)
    saver = {"path": path, "fingerprint": print_, "things": things, "log_path": log_path,
             "every": config.save_every, "first": 0}
    if not (config.resume and os.path.exists(path)):
        if os.path.exists(path) and D.is_main():
            print(f"{path}: a state of a cut run is here; --resume would continue it: starting over")
        if D.is_main():  # (on several processes, rank 0 writes every file)
            open(log_path, "w").close()
        return saver
    state = load(path, print_)
    restore(things, state["things"])  # every rank: they all go on from the same state
    if D.is_main():
        write_text(log_path, state["log"])
    print(f"{path}: resuming at step {state['step']}")
    return {**saver, "first": state["step"]}


def steps(saver, total):
    """The loop's steps, from saver["first"] to total - 1. Before each, the state is saved every
    --save-every steps; after a Ctrl-C it is saved and the run stops (KeyboardInterrupt; a second
    Ctrl-C stops at once); after the last, saved once more, so that a cut in what follows (the
    evaluation) resumes there."""
    asked, first = [], saver["first"]

    def on_interrupt(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        tqdm.write("Ctrl-C: saving the state at the end of this step (again to stop at once)")

    def save_due(step, final=False):
        due = asked or (saver["every"] and step != first and (final or step % saver["every"] == 0))
        if due and D.is_main():
            save(saver["path"], saver["fingerprint"], step, saver["things"], saver["log_path"])
        if asked:
            raise KeyboardInterrupt(f"stopped at step {step}; the state is in {saver['path']}: rerun with --resume")

    main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGINT, on_interrupt) if main else None
    try:
        for step in range(first, total):
            save_due(step)
            yield step
        save_due(total, final=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def finish(out_dir, model, tokenizer_path, stage, config, metrics):
    """A stage's end on disk: its checkpoint (atomic; the config and metrics inside), then its
    training state, of no more use, removed (with any temp file a kill during a save left), then
    metrics.json. A kill before the checkpoint's rename leaves the state to resume from."""
    M.save_checkpoint(os.path.join(out_dir, "model.pt"), model, tokenizer_path, stage=stage,
                      train_config=dataclasses.asdict(config), metrics=metrics)
    for path in glob.glob(state_path(out_dir)) + glob.glob(state_path(out_dir) + ".tmp*"):
        os.remove(path)
    P.write_json(os.path.join(out_dir, "metrics.json"), metrics)


def done_before(config, out_dir):
    """With --resume, a stage with no state whose checkpoint this very config wrote is done: skip it."""
    path = os.path.join(out_dir, "model.pt")
    if not config.resume or os.path.exists(state_path(out_dir)) or not os.path.exists(path):
        return False
    saved = P.load_weights_only(path, "checkpoint").get("train_config")
    return isinstance(saved, dict) and {k: v for k, v in saved.items() if k not in RESUME_FLAGS} == run_config(config)


def cut_before(config, stages):
    """Whether one of the earlier stages a run would build (directories under config.out; none with
    --init) holds a training state: a run cut there, which --resume resumes first."""
    return not config.init and any(os.path.exists(state_path(os.path.join(config.out, s))) for s in stages)


def require_state(config, stages, command, builds=()):
    """--resume needs a state to resume, in one of the stages (directories under config.out), or in an
    earlier stage the run builds when its checkpoint is missing (builds; none with --init): checked
    before any work (ConfigError)."""
    dirs = [os.path.join(config.out, s) for s in (() if config.init else builds) + tuple(stages)]
    P.require(not config.resume or any(os.path.exists(state_path(d)) for d in dirs),
              f"--resume: no training state in {', '.join(os.path.join(d, 'state.pt') for d in dirs)} "
              f"(a run cut before its first save leaves none): run `{command}` without --resume")
