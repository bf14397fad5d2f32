"""Helpers shared by the test files."""

import builtins
import json

import torch

import model as M


def strict_loads(text):
    """json.loads that refuses NaN and Infinity, as readers outside Python do."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def tiny_gpt(vocab_size, seed=0, block_size=192, n_layer=1, std=None):
    """A tiny GPT (2 heads, width 32); std widens the init so that logits are far from uniform."""
    torch.manual_seed(seed)
    m = M.GPT(M.GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=2,
                          n_embd=32))
    if std is not None:
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
    return m


@torch.no_grad()
def reply_logp(model, prompt_ids, reply_ids):
    """log p(reply | prompt) the plain way, an independent check on the masked, batched code: one
    unpadded sequence, a float64 log_softmax over its logits, the reply's tokens summed one by one
    (the logits at position t-1 predict token t)."""
    logits = model(torch.tensor([prompt_ids + reply_ids]))
    logits = logits[0] if isinstance(logits, tuple) else logits
    logp = torch.log_softmax(logits[0].double(), -1)
    return sum(logp[len(prompt_ids) + i - 1, tok].item() for i, tok in enumerate(reply_ids))


def without_matplotlib(monkeypatch):
    """Make `import matplotlib` fail from here on in the test, as on a machine without it."""
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)


def pad_id(enc):
    """The id batches are padded with (<|endoftext|>)."""
    return M.special(enc, "endoftext")
