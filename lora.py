"""
LoRA adapters from scratch (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"),
no peft: train a low-rank change of chosen Linear weights instead of the weights themselves. With
A (r, in) and B (out, r), W' = W + (alpha / r) B A costs r * (in + out) trainable numbers per
layer instead of in * out. The frozen base doubles as the reference model (switch the adapters
off: lora_disabled), and after training B A folds into W (merge_lora): a plain GPT again.

    python dpo.py --lora-rank 16 --lr 1e-3

Departures from the paper's reference code (microsoft/LoRA, loralib):
  1. No dropout on the adapter's input (loralib's lora_dropout); the GPT's own dropout is 0.
  2. The fused q, k, v matrix (c_attn, (3C, C)) gets one A, B: one rank-r update shared by
     q, k and v, where the paper gives W_q and W_v a rank-r update each.
  3. One rank and alpha for every adapted layer.
  4. The MLP is adapted too by default (targets "attn" and "mlp"), where the paper adapts only
     attention weights and freezes the MLP; --lora-targets attn is the nearest to the paper's.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.formats import DataError, write_atomically
import plumbing as P
from plumbing import option, require

LORA_TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"),  # q, k, v (fused) and the output projection
                "mlp": ("mlp.c_fc", "mlp.c_proj")}


@dataclass
class LoRAOptions:
    """LoRA's flags, for a stage's config to inherit (dpo.DPOConfig does)."""
    lora_rank: int = option(0, "LoRA rank r (0: full fine-tuning): train W + (alpha/r) B A with W frozen; the "
                            "reference is then the same model with its adapters off", "lora")
    lora_alpha: float = option(16.0, "LoRA alpha: the update is scaled by alpha / r", "lora")
    lora_targets: str = option("attn,mlp", "the layers that get adapters: attn, mlp, or module suffixes "
                               "(attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), comma-separated", "lora")


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (LoRA eq. 3):

        h = W x + b + (alpha / r) B A x,    i.e.    W' = W + (alpha / r) B A

    A (r, in) is drawn as loralib draws it: kaiming-uniform with a = sqrt(5), nn.Linear's own
    init (uniform in +-1/sqrt(in)), so A x has an ordinary layer's scale whatever r is. B (out, r)
    starts at zero, so W' = W at step 0: the adapted policy equals its reference exactly, and
    every DPO reward is exactly 0 at the first step. The factor alpha / r keeps the update's size
    about the same when r changes (the paper sets alpha once and does not tune it).
    The frozen base stays here as `weight` and `bias`, so their state_dict keys are those of the
    Linear it replaces (blocks.0.attn.c_attn.weight); the adapters add .lora_A and .lora_B.
    enabled = False switches the update off: the module is then exactly its base."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors, now frozen
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # (B, T, out): the frozen base, W x + b
        if not self.enabled:
            return y
        z = F.linear(x, self.lora_A)  # (B, T, r): through the bottleneck, never forming B A
        return y + self.scale * F.linear(z, self.lora_B)  # (B, T, out)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def lora_layers(model):
    """{module name: LoRALinear} for every adapter in the model, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _wrap_linears(model, names, rank, alpha):
    """Freeze every parameter of the model, then put a LoRALinear around each named Linear."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters (merge_lora first to add new ones)")
    for p in model.parameters():
        p.requires_grad_(False)  # embeddings and LayerNorms too: only lora_A, lora_B train
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), rank, alpha))
    return list(names)


def add_lora(model, rank=8, alpha=16, targets=("attn", "mlp")):
    """Adapt `model` in place: freeze all of it and wrap the targeted Linear layers in LoRALinear.
    targets: short names from LORA_TARGETS ("attn", "mlp") or the module-name suffixes they stand
    for ("attn.c_attn", "mlp.c_fc", ...), as a list or a comma-separated string. The tied lm_head
    is never a target: it is the token embedding as well. -> the adapted modules' names, e.g.
    ["blocks.0.attn.c_attn", ...]."""
    suffixes = lora_suffixes(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)]
    return _wrap_linears(model, names, rank, alpha)


def lora_suffixes(targets):
    """LoRA targets (short names or module suffixes, see add_lora; a string may list several,
    comma-separated, as --lora-targets does) -> the module-name suffixes they stand for; an unknown
    one is a ConfigError (a flag value: checked before anything is built)."""
    targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    known = {**LORA_TARGETS, **{s: (s,) for group in LORA_TARGETS.values() for s in group}}
    unknown = [t for t in targets if t not in known]
    require(not unknown, f"unknown LoRA targets {unknown}; known: {sorted(known)}")
    return tuple("." + s for t in targets for s in known[t])


@contextlib.contextmanager
def lora_disabled(model):
    """Inside the block every adapter is off and the model is in eval mode, so it computes its
    frozen base as a reference model must (no dropout noise, should a checkpoint have any): the
    reference of DPO and RL without a second copy in memory. On exit each adapter gets its previous
    state back, and every module its train/eval mode, also when the block raises."""
    layers = list(lora_layers(model).values())
    before, modes = [m.enabled for m in layers], [(m, m.training) for m in model.modules()]
    for m in layers:
        m.enabled = False
    model.eval()
    try:
        yield model
    finally:
        for m, enabled in zip(layers, before):
            m.enabled = enabled
        for m, training in modes:
            m.training = training


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight, W <- W + (alpha / r) B A (whether or not it is
    switched off at the moment), and put a plain nn.Linear back in its place. In place; -> model,
    now a plain GPT with every parameter trainable again and a GPT's state_dict keys exactly, so
    save_checkpoint and load_checkpoint treat it like any other checkpoint."""
    for name, m in lora_layers(model).items():
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                           device=m.weight.device, dtype=m.weight.dtype)
        linear.weight = nn.Parameter(m.weight + m.scale * (m.lora_B @ m.lora_A))  # (out, in)
        linear.bias = m.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model):
    """Only the adapter tensors: {"blocks.0.attn.c_attn.lora_A": (r, in), ..."lora_B": (out, r)}."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def trainable_parameters(model):
    """How many numbers the optimizer moves (after add_lora: the adapters' r * (in + out) each)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_lora(path, model, **extra):
    """Write the adapters alone {rank, alpha, modules, lora tensors, extra}, atomically (temp
    file, rename). Rank, alpha and the adapted modules are read from the model itself, so the file
    cannot disagree with its tensors. The base model is not in the file: keep track of it (e.g.
    base="out/sft/model.pt" in extra)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save (add_lora first)")
    first = next(iter(layers.values()))
    if any((m.rank, m.alpha) != (first.rank, first.alpha) for m in layers.values()):
        raise ValueError("save_lora records one rank and alpha; these adapters differ")
    ckpt = {"rank": first.rank, "alpha": first.alpha, "modules": list(layers),
            "lora": {k: v.detach().cpu() for k, v in lora_state_dict(model).items()}, **extra}
    write_atomically(path, lambda tmp: torch.save(ckpt, tmp))


def load_lora(path, model):
    """Load an adapter file into `model`, in place: a base model first gets the adapters the file
    records (same modules, rank, alpha); a model that has adapters must have those same ones.
    weights_only=True, as for checkpoints. -> the file's dict. A file that does not fit the model
    raises DataError naming the file."""
    ckpt = P.load_weights_only(path, "LoRA adapter file")
    if not isinstance(ckpt, dict) or "lora" not in ckpt:
        raise DataError(f"{path}: not a LoRA adapter file (a full checkpoint? use load_checkpoint)")
    modules, rank, alpha, theirs = ckpt.get("modules"), ckpt.get("rank"), ckpt.get("alpha"), ckpt["lora"]
    if not (isinstance(modules, list) and modules and all(isinstance(n, str) for n in modules)
            and type(rank) is int and rank > 0 and isinstance(alpha, (int, float))
            and isinstance(theirs, dict) and all(isinstance(v, torch.Tensor) for v in theirs.values())):
        raise DataError(f"{path}: not a LoRA adapter file as save_lora writes it (a list of modules, a rank "
                        f"> 0, an alpha and a dict of lora tensors)")
    # every check before the model changes: a file that does not fit leaves it as it was
    layers = lora_layers(model)
    if layers:
        own = {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    else:
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        absent = [n for n in modules if n not in linears]
        if absent:
            raise DataError(f"{path}: adapters for {absent}, which this model has no Linear for")
        own = {k: shape for n in modules for k, shape in ((f"{n}.lora_A", (rank, linears[n].in_features)),
                                                          (f"{n}.lora_B", (linears[n].out_features, rank)))}
    bad = [f"{k}: file {tuple(theirs[k].shape) if k in theirs else 'none'}, model {own.get(k, 'none')}"
           for k in sorted(own.keys() | theirs.keys())
           if k not in own or k not in theirs or own[k] != tuple(theirs[k].shape)]
    if bad:
        raise DataError(f"{path}: the adapters do not fit this model (rank {rank} in the "
                        f"file): " + "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else ""))
    if any(m.alpha != alpha for m in layers.values()):
        raise DataError(f"{path}: alpha {alpha} in the file differs from the model's adapters")
    if not layers:
        _wrap_linears(model, modules, rank, alpha)
    model.load_state_dict(theirs, strict=False)  # strict=False: the base weights are not in the file
    return ckpt


def reference_model(policy, reference):
    """The reference, as a context: the frozen copy, or (reference None, with LoRA) the policy's
    own frozen base, its adapters switched off inside the block."""
    return contextlib.nullcontext(reference) if reference is not None else lora_disabled(policy)
