"""
sft.py's training text as tokens: the pretraining stream (each document opened by <|endoftext|>),
the SFT and CoT conversations as (ids, mask) rows with the loss mask on the assistant's tokens
(model.render_chat), validated line by line, and the batches the SFT loop draws from them.
"""

import torch

import model as M
import plumbing as P
from data import formats


def pretrain_stream(enc, path):
    """The pretraining text as one token stream, each document (line) opened by <|endoftext|>."""
    bos = M.special(enc, "endoftext")
    with open(path, encoding="utf-8") as f:
        docs = [line.rstrip("\n") for line in f if line.strip()]
    ids = []
    for doc_ids in enc.encode_ordinary_batch(docs):
        ids.append(bos)
        ids += doc_ids
    return torch.tensor(ids, dtype=torch.long)


def sft_examples(enc, path, block_size):
    """Conversations of a {"messages": [...]} JSONL file -> list of (ids, mask), validated."""
    out = []
    for n, msgs in formats.read_conversations(path):
        ids, mask = M.render_chat(enc, msgs)
        if not any(mask[1:block_size]):  # (token 0 is never predicted) a row with nothing to learn from
            raise P.DataError(f"{path}:{n}: no assistant token within the first {block_size} tokens (--block-size): "
                              f"the conversation is cut there")
        out.append((ids[:block_size], mask[:block_size]))  # over-long rows are cut, not dropped
    return out


def row_batches(rows, batch_size, rng, pad, device):
    """train_stage's batches: batch_size of the (ids, mask) rows, each once per shuffled pass.
    -> (next_batch, the objects the order comes from: the rng and the pass in progress)"""
    order = []

    def next_batch():
        batch = [rows[i] for i in P.next_indices(order, len(rows), batch_size, rng)]
        return M.pad_batch([b[0] for b in batch], [b[1] for b in batch], pad, device)
    return next_batch, {"rng": rng, "order": order}


def fixed_batches(rows, pad, device, size=64):
    """The validation rows in padded batches of `size`, in order."""
    return [M.pad_batch([r[0] for r in rows[i: i + size]], [r[1] for r in rows[i: i + size]], pad, device)
            for i in range(0, len(rows), size)]
