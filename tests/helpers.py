"""Helpers shared by the test files."""

import torch

import model as M


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
