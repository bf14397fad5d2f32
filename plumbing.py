"""
The plumbing every script shares, kept out of the lessons: a config dataclass as a command line,
one-line errors, strict and atomic JSON writes, the learning-rate schedule and the batch order,
torch files loaded safely, the device (its precision, its peak FLOP/s, eval mode) and memory.
Nothing here knows about a stage.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch

from data.formats import DataError, write_text  # noqa: F401 (DataError: the stages raise it as P.DataError)

# the stages' outputs, anchored to the repository: relative to the working directory, a run
# started elsewhere would find the data but not the earlier stages' checkpoints, and rebuild them
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

# ----------------------------------------------------------------------------------------------
# Errors: a bad file or flag stops the run in one line


class ConfigError(ValueError):
    """A bad flag value: the message names the flag and what is wrong."""


def require(ok, message):
    """A flag check: raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


def check_flags(config, positive=(), non_negative=()):
    """Numeric flags that cannot work (a batch of 0, a negative step count) stop with a one-line
    ConfigError naming the flag, before anything is built."""
    for names, ok, want in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(config, name)
            require(ok(value), f"--{name.replace('_', '-')} must be {want}, got {value}")


def check_out(out):
    """--out names a directory to write into: a path that exists as a file stops here, in one line."""
    require(not os.path.exists(out) or os.path.isdir(out), f"--out {out}: exists and is not a directory")


def require_file(path, what="checkpoint"):
    """A path the user named must exist: checked before anything is built (DataError otherwise)."""
    if path and not os.path.exists(path):
        raise DataError(f"{path}: no such {what}")
    return path


def previous_stage(init, default_path, build, announcement):
    """The checkpoint a stage starts from: `init` when given (it must exist), else default_path,
    built first by calling build() (and saying so) when it is missing, so that every stage runs on
    a fresh clone."""
    if init:
        return require_file(init)
    if not os.path.exists(default_path):
        print(announcement)
        build()
    return default_path


# ----------------------------------------------------------------------------------------------
# The command line: one --kebab-case flag per config field


def option(default, help, group):
    """A config field with its --help text and argparse group (read by add_config_args)."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group})


def add_config_args(parser, config):
    """One --kebab-case flag per dataclass field, grouped by the field's metadata 'group', with
    the metadata 'help' and the default in the help text."""
    groups = {}
    own = vars(config if isinstance(config, type) else type(config)).get("__annotations__", {})
    # the stage's own flags first, then those it inherits (the family's, LoRA's)
    for f in sorted(dataclasses.fields(config), key=lambda f: f.name not in own):
        group_name = f.metadata.get("group", "options")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        default = getattr(config, f.name)
        help_text = f.metadata.get("help", "")
        if "(default:" not in help_text:  # a help text may say what an empty default means instead
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            groups[group_name].add_argument(flag, action=argparse.BooleanOptionalAction,
                                            default=default, help=help_text)
        else:
            kind = type(default) if default is not None else str
            groups[group_name].add_argument(flag, type=kind, default=default, help=help_text,
                                            dest=f.name)
    return parser


def config_from_args(config_cls, args):
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def run_cli(doc, config_cls, train, argv=None, show_config=True, presets=None):
    """The command line every stage shares: flags from the config dataclass, print the resolved
    config, run train(config); a bad input file or flag ends with its one-line error, exit code 1.
    presets: {name: {field: value}}, the named sets of flags --preset NAME makes the defaults (a flag
    given on the command line still wins)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_config_args(parser, config_cls())
    name = parser.parse_known_args(argv)[0].preset if presets else ""
    if name:
        if name not in presets:
            sys.exit(f"error: --preset {name!r} is unknown; known: {', '.join(presets)}")
        parser.set_defaults(**presets[name])
    config = config_from_args(config_cls, parser.parse_args(argv))
    if show_config:
        print("config:", dataclasses.asdict(config))
    return one_line_errors(train, config)


def one_line_errors(fn, *args):
    """fn(*args), for a command line: a bad input file or flag value (DataError, ConfigError) ends the
    program with its one-line message and exit code 1, not a traceback."""
    try:
        return fn(*args)
    except (DataError, ConfigError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C: a stage that saved its state says so (see resume.saving)
        print(f"\n{e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# Outputs: strict JSON, written atomically


def strict_json(obj):
    """obj with every number that is not finite (a diverged loss, a validation loss with no validation
    batch) replaced by None, written as null: NaN and Infinity are not JSON, and readers outside
    Python refuse the whole file or line that holds one."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path, obj):
    """obj as strict JSON (see strict_json), written atomically."""
    write_text(path, json.dumps(strict_json(obj), indent=1, allow_nan=False))


def new_log(out_dir):
    """<out_dir>/log.jsonl, emptied: a stage's log holds this run's lines only. -> the path"""
    path = os.path.join(out_dir, "log.jsonl")
    open(path, "w").close()
    return path


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------------
# The schedule and the batch order


LR_SCHEDULES = ("linear", "cosine", "constant")


def scheduled_lr(schedule, step, total, peak, warmup, min_ratio=0.0):
    """The learning rate at step (counted from 0) of `total`: a linear warmup to `peak` over the first
    `warmup` steps, then
        constant  peak
        linear    a straight line down to min_ratio * peak at step `total` (min_ratio 0: TRL's default)
        cosine    half a cosine down to min_ratio * peak at step `total`
    (steps run 0..total-1, so the last one is one step short of the floor)"""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))  # 0 at the end of warmup, 1 at `total`
    decay = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (min_ratio + (1 - min_ratio) * decay)


def warmup_note(stage, warmup, steps):
    """Print (and return) a note when the warmup covers the whole run (warmup >= steps > 0); else
    None: the learning rate then climbs to at most steps / warmup of its peak and never starts its
    schedule, which a short test run (--steps 4 against a warmup of 10) would otherwise do silently."""
    if steps == 0 or warmup < steps:
        return None
    note = (f"{stage}: note: --warmup-steps {warmup} covers the whole run of {steps} steps: the learning rate "
            f"climbs to at most {steps / warmup:.0%} of its peak")
    print(note)
    return note


def next_indices(order, n, batch, rng, lengths=None, span=8):
    """The next `batch` indices into n examples, popped from the end of `order`, a list of shuffled
    passes over range(n) to which a new pass is appended (one rng.shuffle each) when fewer than
    `batch` are left. Every index comes once per pass (the few left of a pass wait below the next
    one), and a file smaller than a batch repeats within the batch.
    lengths (n,): bucket each pass, so a batch pads little: the shuffled pass is cut into chunks of
    span batches, each chunk sorted by length and cut into batches, and the batches shuffled."""
    while len(order) < batch:
        more = list(range(n))
        rng.shuffle(more)
        if lengths is not None:
            chunks = [sorted(more[i: i + span * batch], key=lambda j: lengths[j])
                      for i in range(0, n, span * batch)]
            batches = [c[i: i + batch] for c in chunks for i in range(0, len(c), batch)]
            rng.shuffle(batches)
            more = [j for b in batches for j in reversed(b)]  # popped from the end: each batch whole
        order.extend(more)
    return [order.pop() for _ in range(batch)]


# ----------------------------------------------------------------------------------------------
# Loading torch files safely


def load_weights_only(path, what):
    """torch.load(path, weights_only=True): the file cannot run code on load. A file torch cannot read
    that way (not written by torch.save, cut short, or holding objects beyond tensors and plain data)
    raises DataError naming it, instead of torch's page-long message."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:  # the path, not the file
        raise DataError(f"{path}: {e.strerror}") from e
    except MemoryError:
        raise
    except Exception as e:  # a bad file raises many kinds: UnpicklingError, RuntimeError, UnicodeDecodeError, ...
        message = str(e)
        at = message.find("Unsupported global")  # "...: GLOBAL <the object refused> was not an allowed global ..."
        reason = type(e).__name__ + (": " + message[at:].split(" was not")[0].split("\n")[0] if at >= 0 else "")
        raise DataError(f"{path}: not a {what} that torch.load(weights_only=True) can read ({reason})") from e


# ----------------------------------------------------------------------------------------------
# The device, its precision, its peak FLOP/s, memory


def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; a named device must exist here (else ConfigError)."""
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    require(device is not None and device.type in ("cpu", "cuda", "mps"),
            f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    require(device.type != "cuda" or torch.cuda.is_available(), f"--device {name}: no CUDA device on this machine")
    require(device.type != "mps" or mps, f"--device {name}: no Apple MPS device on this machine")
    if device.type == "cuda" and device.index is not None:  # else the run would die later, at .to(device)
        n = torch.cuda.device_count()
        require(device.index < n, f"--device {name}: this machine has {n} CUDA device{'s' if n > 1 else ''} "
                f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
    require(device.type != "mps" or not device.index, f"--device {name}: there is one MPS device, mps (mps:0)")
    return device


_PEAK = {}  # str(device) -> FLOP/s, measured or read once per process


# dense bf16 tensor-core peaks from the spec sheets, the first match in the device's name wins
# (the PCIe and NVL cards run at lower clocks than the SXM ones)
GPU_PEAKS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("A100", 312e12)]


def peak_flops(device):
    """The device's peak matmul FLOP/s in the dtype training runs in: fp32 on CPU and MPS, bf16 on
    CUDA. An H100, H200 or A100 reads its spec sheet; anything else is measured by a short matmul
    probe, once per process."""
    device = torch.device(device)
    if str(device) in _PEAK:
        return _PEAK[str(device)]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((p for key, p in GPU_PEAKS if key in name), None)
        if peak is not None:
            _PEAK[str(device)] = peak
            return peak
    # the best of many single matmuls: on a shared machine a short timing is more likely to fall in a
    # quiet moment, and MFU is only worth comparing against a steady denominator (docs/speed.md)
    sizes = (4096, 8192) if device.type == "cuda" else (1024,)  # a GPU needs large ones to reach its peak
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as autocast() runs the forward
    gen = torch.Generator(device=device).manual_seed(0)  # its own: the stage's seeded RNG stays as it was
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        a @ b  # warm up
        for _ in range(50):  # about 0.6 s on a 2-core CPU
            synchronize(device)
            t0 = time.perf_counter()
            a @ b
            synchronize(device)  # a GPU returns before the work is done: wait for it, or time the queueing
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    _PEAK[str(device)] = best
    return best


def synchronize(device):
    """Wait until the device has done the work queued so far (CPU work is done when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def describe(model, device):
    """A one-line description: parameters and the device's peak."""
    return (f"{model.num_params() / 1e6:.2f}M parameters | {device} | "
            f"peak {peak_flops(device) / 1e9:.0f} GFLOP/s")


def training_memory(total_params, trainable, model_copies):
    """What training needs for the model, in MB of fp32: every weight of each copy held at once
    (policy, and the reference while its pass runs), a gradient per trainable weight, and AdamW's
    two moments per trainable weight; and the process's peak resident memory (all of Python and
    torch included, so it moves far less than the model's share)."""
    try:
        import resource  # POSIX only
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        peak_mb = peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10
    except ImportError:
        peak_mb = float("nan")
    mb = 4 / 2 ** 20
    weights, grads, optimizer = model_copies * total_params * mb, trainable * mb, 2 * trainable * mb
    return {"weights": weights, "grads": grads, "optimizer": optimizer,
            "total": weights + grads + optimizer, "peak_process": peak_mb}


def autocast(device):
    """bf16 autocast on CUDA only; fp32 on CPU and MPS (where bf16 is slow or unsupported)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model):
    """Inside the block the model is in eval mode (no dropout); on exit it gets its mode back,
    also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pyplot():
    """matplotlib.pyplot drawing to files (no screen needed), or None when matplotlib, which stays
    optional, is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
