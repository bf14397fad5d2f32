"""
The pieces every stage shares: the GPT, the tokenizer and chat template, KV-cache sampling,
checkpoints, LoRA adapters, the device, and small helpers the scripts share (the config CLI and
its errors, batching and padding, the learning-rate schedule, JSONL reading and strict-JSON
writing, reply sampling, MFU).
LoRA (Hu et al. 2021) is written out here, no peft: W' = W + (alpha / r) B A on chosen Linears.

Nothing here knows about a stage or a data set. Read it first; then sft.py, dpo.py, rlvr.py.

The GPT is nanoGPT's (pre-norm transformer blocks: LayerNorm -> causal self-attention -> residual,
LayerNorm -> MLP -> residual; a final LayerNorm; a language-model head tied to the token embedding)
with one change: positions enter through rotary embeddings (RoPE, Su et al. 2021) on queries and
keys instead of a learned position table. Every skill this world needs is a relative lookup
("the number two tokens back", "the name in the prompt"), and with RoPE attention scores depend
on relative position directly: a learned absolute table left a 1M-parameter model unable to learn
even single arithmetic facts in a few minutes of CPU training; with RoPE it learns them.
"""

import argparse
import base64
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class GPTConfig:
    vocab_size: int = 1040
    block_size: int = 192   # longest sequence: a problem and its longest reply fit in ~120 tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False      # no biases in Linear/LayerNorm: a little faster, no worse


def rope_angles(positions, head_dim, base=10000.0):
    """cos and sin of the rotation angles pos * base^(-2i/head_dim), i < head_dim / 2.
    positions (B, T) or (1, T) -> cos, sin each (B, 1, T, head_dim / 2), broadcast over heads."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x, cos, sin):
    """Rotate each pair (x1_i, x2_i) of the two halves of x by its angle. x (B, H, T, D).
    Then q_s . k_t depends on the positions only through s - t. The paper pairs adjacent dimensions
    (2i, 2i+1); pairing dimension i with i + D/2 (GPT-NeoX, Llama) is the same up to a fixed
    permutation of the dimensions, which the learned weights absorb."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        assert config.n_embd // config.n_head % 2 == 0, "RoPE rotates pairs of dimensions: the head size must be even"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, rope, attn_mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # rotate by position before caching k
        if cache is not None:  # append this chunk's keys and values, attend over all so far
            k, v = cache.update(k, v)  # (B, H, Tk, D)
        dropout = self.dropout if self.training else 0.0
        if attn_mask is None:
            # plain causal attention. Right padding is harmless here: no real token attends forward to
            # it. Not for a cache: is_causal aligns its mask top-left, so a one-token decode step would
            # see only key 0; sampling with a cache passes attn_mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), since each block adds two
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, positions=None, attn_mask=None, caches=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size).
        positions (B, T) overrides 0..T-1 (left-padded rows start counting at their first real
        token); attn_mask (B, 1, T, Tk) bool, True = may attend; caches: one KVCache per block."""
        B, T = idx.shape
        if positions is None:
            positions = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
        assert int(positions.max()) < self.config.block_size, "sequence longer than block_size"
        rope = rope_angles(positions, self.config.n_embd // self.config.n_head)
        x = self.drop(self.wte(idx))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, attn_mask, None if caches is None else caches[i])
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def num_params(self):
        """Parameter count, the tied embedding counted once (it is also the output layer, so each
        of its weights costs FLOPs)."""
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------
# Log-probs: the one helper every stage uses to score tokens


def token_logprobs(logits, targets):
    """log p(targets) under logits, per position: log_softmax + gather (never log(softmax)).
    logits (B, T, V), targets (B, T) -> (B, T), always in fp32 whatever the forward dtype."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)


def shifted_logprobs(model, input_ids, loss_mask, temperature=1.0):
    """The log-prob of every scored token given the ones before it: the one helper SFT, DPO and
    RL build their losses on (each then sums or averages over the mask itself).
    input_ids, loss_mask (B, T); loss_mask[b, t] = 1 marks token t as scored, so the shift by one
    happens here: the logits at t-1 predict token t. temperature divides the logits, as the
    sampler does (RL scores its samples under the distribution they were drawn from).
    -> logps (B, T-1) fp32, mask (B, T-1) fp32 (position t-1 holds token t's values)."""
    with autocast(input_ids.device):
        logits = model(input_ids[:, :-1])  # (B, T-1, V)
    if temperature != 1.0:
        logits = logits.float() / temperature
    logps = token_logprobs(logits, input_ids[:, 1:])  # (B, T-1), fp32
    return logps, loss_mask[:, 1:].to(logps.dtype)  # (B, T-1) each


def masked_mean(values, mask):
    """Mean of values over mask == 1; 0 (not NaN) when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat template

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# the stages' outputs, also anchored to the repository: relative to the working directory, a run
# started elsewhere would find the data but not the earlier stages' checkpoints, and rebuild them
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
TOKENIZER_PATH = os.path.join(DATA_DIR, "tokenizer.json")


def load_tokenizer(path=TOKENIZER_PATH):
    """The byte-level BPE tokenizer from data/, as a tiktoken.Encoding. Reads the rank file
    directly (tiktoken.load caches by path in a temp dir, which would serve a stale tokenizer
    after data/ is rebuilt) and never touches the network."""
    with open(path) as f:
        meta = json.load(f)
    ranks = {}
    with open(os.path.join(os.path.dirname(path), meta["ranks_file"])) as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("tinydpo", pat_str=meta["pattern"], mergeable_ranks=ranks,
                             special_tokens=meta["special_tokens"])


def special(enc, name):
    """The id of a special token, e.g. special(enc, "end") for <|end|>."""
    return enc.encode_single_token(f"<|{name}|>")


ROLES = ("system", "user", "assistant")


def render_chat(enc, messages, add_generation_prompt=False):
    """A conversation -> (ids, mask), lists of equal length; mask is 1 exactly on the tokens the
    assistant must learn to produce: its content and the <|end|> closing its turn.

        <|endoftext|><|user|>text<|end|><|assistant|>text<|end|>...

    Message text is encoded as ordinary text, so a message containing the literal string
    "<|end|>" cannot forge a turn boundary: special tokens come from this template only.
    add_generation_prompt appends <|assistant|> so that a model continues with the reply."""
    ids, mask = [special(enc, "endoftext")], [0]
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r} (expected one of {ROLES})")
        body = enc.encode_ordinary(m["content"]) + [special(enc, "end")]
        ids += [special(enc, m["role"])] + body
        mask += [0] + [int(m["role"] == "assistant")] * len(body)
    if add_generation_prompt:
        ids.append(special(enc, "assistant"))
        mask.append(0)
    return ids, mask


def render_prompt(enc, prompt):
    """Prompt ids for a reply: a string is one user turn; a list is a conversation."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_chat(enc, messages, add_generation_prompt=True)[0]


def render_response(enc, response):
    """Response ids: the reply's text (ordinary tokens) and the <|end|> that closes the turn."""
    return enc.encode_ordinary(response) + [special(enc, "end")]


def decode_reply(enc, ids):
    """Reply text from generated ids, cut at the first <|end|>."""
    end = special(enc, "end")
    if end in ids:
        ids = ids[: ids.index(end)]
    return enc.decode(ids)


# ----------------------------------------------------------------------------------------------
# Sampling with a KV cache


class KVCache:
    """Keys and values of one attention layer, preallocated for the whole generation."""

    def __init__(self, B, H, T_max, D, device, dtype):
        self.k = torch.zeros(B, H, T_max, D, device=device, dtype=dtype)
        self.v = torch.zeros(B, H, T_max, D, device=device, dtype=dtype)
        self.length = 0

    def update(self, k, v):
        T = k.shape[2]
        self.k[:, :, self.length: self.length + T] = k
        self.v[:, :, self.length: self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


@torch.no_grad()
def generate(model, prompts, max_new_tokens, stop_token, temperature=1.0, top_k=None,
             generator=None, use_cache=True):
    """Sample replies for a batch of prompts of different lengths.

    prompts: a list of token-id lists. They are left-padded to a common length; each row's
    positions count from its own first real token and padded keys are masked out, so a row's
    reply does not depend on how long the other prompts are. A row stops at `stop_token` (which is
    kept) or after max_new_tokens. temperature 0 is greedy.
    Returns (replies, logprobs): per row the new token ids and, for each, its log-prob under the
    sampling distribution: softmax(logits / temperature), renormalised over the top_k tokens when
    top_k is given; with temperature 0 (greedy), under softmax(logits), the T = 1 distribution.
    The tests check them (without top_k) against a teacher-forced pass (shifted_logprobs at the same
    temperature); the RL update recomputes its own.
    use_cache=False recomputes the whole prefix at every step (same result, for comparison)."""
    P = max(len(p) for p in prompts)
    require(P + max_new_tokens <= model.config.block_size, f"a reply of {max_new_tokens} tokens (--max-new-tokens) "
            f"after a prompt of {P} tokens runs past the model's context of {model.config.block_size} tokens")
    require(top_k is None or top_k >= 1, f"top_k must be >= 1 (None: no cut), got {top_k}")
    device = next(model.parameters()).device
    B = len(prompts)
    T_max = P + max_new_tokens
    idx = torch.zeros(B, T_max, dtype=torch.long, device=device)
    valid = torch.zeros(B, T_max, dtype=torch.bool, device=device)  # real (non-pad) tokens
    for b, p in enumerate(prompts):
        idx[b, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        valid[b, P - len(p): P] = True
    valid[:, P:] = True  # every generated slot is real (finished rows just stop being read)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T_max)
    causal = torch.ones(T_max, T_max, dtype=torch.bool, device=device).tril()
    # may attend = causal and the key is real; a pad query attends to itself so softmax is defined
    mask = (causal & valid[:, None, :]) | torch.eye(T_max, dtype=torch.bool, device=device)
    mask = mask.unsqueeze(1)  # (B, 1, T_max, T_max)

    cfg = model.config
    caches = None
    if use_cache:
        caches = [KVCache(B, cfg.n_head, T_max, cfg.n_embd // cfg.n_head, device,
                          next(model.parameters()).dtype) for _ in range(cfg.n_layer)]
    new_logps = torch.zeros(B, max_new_tokens, device=device)  # each sampled token's log-prob
    lengths = torch.full((B,), max_new_tokens, device=device)  # reply length, once a row stops
    done = torch.zeros(B, dtype=torch.bool, device=device)
    t = P  # slot of the next token to be written
    with eval_mode(model):  # no dropout while sampling; the mode comes back even if sampling fails
        for step in range(max_new_tokens):
            with autocast(device):
                if use_cache:
                    lo = 0 if step == 0 else t - 1  # the prefill, then one new token at a time
                    logits = model(idx[:, lo:t], positions[:, lo:t], mask[:, :, lo:t, :t], caches)
                else:
                    logits = model(idx[:, :t], positions[:, :t], mask[:, :, :t, :t])
            logits = logits[:, -1].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1)  # (B,)
                logp = F.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                logp_all = F.log_softmax(logits, -1)  # (B, V)
                # a draw from p: argmax_v p_v / E_v with E_v ~ Exp(1) independent (the exponential race,
                # the same as Gumbel-max); several times faster than torch.multinomial on CPU
                race = torch.empty_like(logp_all).exponential_(generator=generator)  # (B, V)
                nxt = (logp_all.exp() / race).argmax(-1)  # (B,)
                logp = logp_all.gather(-1, nxt[:, None]).squeeze(-1)
            idx[:, t] = nxt
            new_logps[:, step] = logp
            lengths = torch.where(~done & (nxt == stop_token), step + 1, lengths)
            done |= nxt == stop_token
            t += 1
            if bool(done.all()):
                break
    n = t - P  # tokens sampled per row (rows that stopped early ignore the rest)
    out = [row[:L] for row, L in zip(idx[:, P: P + n].tolist(), lengths.clamp(max=n).tolist())]
    out_logp = [row[:L] for row, L in zip(new_logps[:, :n].tolist(), lengths.clamp(max=n).tolist())]
    return out, out_logp


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


# ----------------------------------------------------------------------------------------------
# Device and precision


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


def autocast(device):
    """bf16 autocast on CUDA only; fp32 on CPU and MPS (where bf16 is slow or unsupported)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Checkpoints


def tokenizer_fingerprint(path=TOKENIZER_PATH):
    """sha256 of the tokenizer files: a checkpoint is only valid with the tokenizer it learned."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        meta = f.read()
    h.update(meta)
    with open(os.path.join(os.path.dirname(path), json.loads(meta)["ranks_file"]), "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def save_checkpoint(path, model, tokenizer_path=TOKENIZER_PATH, **extra):
    """Write {config, model weights, tokenizer reference, extra} atomically (temp file, rename),
    so an interrupted run never leaves a half-written checkpoint."""
    if lora_layers(model):  # its lora_A/B keys would make a file load_checkpoint cannot read
        raise ValueError("the model has LoRA adapters: merge_lora(model) first, or save_lora")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt = {"config": dataclasses.asdict(model.config),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "tokenizer": {"path": os.path.abspath(tokenizer_path),
                          "sha256": tokenizer_fingerprint(tokenizer_path)},
            **extra}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


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


def load_checkpoint(path, device="cpu", tokenizer_path=TOKENIZER_PATH):
    """-> (model, checkpoint dict), the file written by save_checkpoint (see load_weights_only).
    Refuses a checkpoint trained with another tokenizer than tokenizer_path (None: no check)."""
    ckpt = load_weights_only(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"config", "model", "tokenizer"} <= ckpt.keys():
        hint = " (a LoRA adapter file? load it with load_lora)" if isinstance(ckpt, dict) and "lora" in ckpt else ""
        raise DataError(f"{path}: not a model checkpoint: it lacks the config, weights and tokenizer record "
                        f"that save_checkpoint writes{hint}")
    if tokenizer_path is not None and ckpt["tokenizer"]["sha256"] != tokenizer_fingerprint(tokenizer_path):
        raise DataError(f"{path}: trained with a different tokenizer than {tokenizer_path} "
                        f"(data/ was rebuilt?); retrain it, e.g. `python sft.py`")
    unknown = ckpt["config"].keys() - {f.name for f in dataclasses.fields(GPTConfig)}
    if unknown:
        raise DataError(f"{path}: its config has fields this code does not know: {sorted(unknown)}")
    model = GPT(GPTConfig(**ckpt["config"]))
    own, theirs = model.state_dict(), ckpt["model"]
    misfits = sorted(own.keys() ^ theirs.keys()) + [k for k in own.keys() & theirs.keys()
                                                    if own[k].shape != theirs[k].shape]
    if misfits:
        raise DataError(f"{path}: its weights do not fit its config: {len(misfits)} tensors missing, unexpected "
                        f"or of another shape ({', '.join(misfits[:3])}{', ...' if len(misfits) > 3 else ''})")
    model.load_state_dict(theirs)
    return model.to(device), ckpt


# ----------------------------------------------------------------------------------------------
# LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")
#
# Train a low-rank change of chosen Linear weights instead of the weights themselves: with
# A (r, in) and B (out, r), W' = W + (alpha / r) B A costs r * (in + out) trainable numbers per
# layer instead of in * out. The frozen base doubles as the reference model (switch the adapters
# off: lora_disabled), and after training B A folds into W (merge_lora): a plain GPT again.
# Departures from the paper's reference code (microsoft/LoRA, loralib):
#   1. No dropout on the adapter's input (loralib's lora_dropout); the GPT's own dropout is 0.
#   2. The fused q, k, v matrix (c_attn, (3C, C)) gets one A, B: one rank-r update shared by
#      q, k and v, where the paper gives W_q and W_v a rank-r update each.
#   3. One rank and alpha for every adapted layer.
#   4. The MLP is adapted too by default (targets "attn" and "mlp"), where the paper adapts only
#      attention weights and freezes the MLP; --lora-targets attn is the nearest to the paper's.

LORA_TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"),  # q, k, v (fused) and the output projection
                "mlp": ("mlp.c_fc", "mlp.c_proj")}


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt = {"rank": first.rank, "alpha": first.alpha, "modules": list(layers),
            "lora": {k: v.detach().cpu() for k, v in lora_state_dict(model).items()}, **extra}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_lora(path, model):
    """Load an adapter file into `model`, in place: a base model first gets the adapters the file
    records (same modules, rank, alpha); a model that has adapters must have those same ones.
    weights_only=True, as for checkpoints. -> the file's dict. A file that does not fit the model
    raises DataError naming the file."""
    ckpt = load_weights_only(path, "LoRA adapter file")
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


# ----------------------------------------------------------------------------------------------
# Measuring: parameter count, FLOPs, MFU


def flops_per_token(model, T):
    """Training FLOPs per token (forward + backward): 6 per parameter, plus attention's
    6 * n_layer * T * n_embd for the QK^T and AV matmuls, forward and backward. PaLM (appendix B)
    and nanoGPT count 12 * n_layer * T * n_embd, every score of the T x T matrix; we count the half
    a causal mask leaves, so MFU credits only useful work (the attention term is ~6% of the total
    at the pretraining length, so the two counts differ by about that much in MFU)."""
    cfg = model.config
    return 6 * model.num_params() + 6 * cfg.n_layer * T * cfg.n_embd


_PEAK = {}  # str(device) -> FLOP/s, measured or read once per process
# dense bf16 tensor-core peaks from the spec sheets, the first match in the device's name wins
# (the PCIe and NVL cards run at lower clocks than the SXM ones)
GPU_PEAKS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("A100", 312e12)]


def peak_flops(device):
    """The device's peak matmul FLOP/s in the dtype training runs in: fp32 on CPU and MPS, bf16 on
    CUDA. An H100, H200 or A100 reads its spec sheet; anything else is measured by a short matmul
    probe (once per process: ~0.5 s on the fast 2-core CPU, ~1.5 s on the slow one)."""
    device = torch.device(device)
    if str(device) in _PEAK:
        return _PEAK[str(device)]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((p for key, p in GPU_PEAKS if key in name), None)
        if peak is not None:
            _PEAK[str(device)] = peak
            return peak
    n = 4096 if device.type == "cuda" else 1024  # a GPU needs a large matmul to reach its peak
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as autocast() runs the forward
    # its own generator: measuring the machine must not move the global RNG a stage seeded
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(10):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)  # a GPU returns before the work is done: wait for it, or time the queueing
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
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


# ----------------------------------------------------------------------------------------------
# Small shared helpers: configs on the command line, logs, outputs


def option(default, help, group):
    """A config field with its --help text and argparse group (read by add_config_args)."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group})


def add_config_args(parser, config):
    """One --kebab-case flag per dataclass field, grouped by the field's metadata 'group', with
    the metadata 'help' and the default in the help text."""
    groups = {}
    for f in dataclasses.fields(config):
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


def run_cli(doc, config_cls, train, argv=None):
    """The command line every stage shares: flags from the config dataclass, print the resolved
    config, run train(config); a bad input file or flag ends with its one-line error, exit code 1."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_config_args(parser, config_cls())
    config = config_from_args(config_cls, parser.parse_args(argv))
    print("config:", dataclasses.asdict(config))
    return one_line_errors(train, config)


def one_line_errors(fn, *args):
    """fn(*args), for a command line: a bad input file or flag value (DataError, ConfigError) ends the
    program with its one-line message and exit code 1, not a traceback."""
    try:
        return fn(*args)
    except (DataError, ConfigError) as e:
        sys.exit(f"error: {e}")


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


def write_text(path, text):
    """Temp file, then rename: a run killed mid-write leaves the old file, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(path, obj):
    """obj as strict JSON (see strict_json), written atomically."""
    write_text(path, json.dumps(strict_json(obj), indent=1, allow_nan=False))


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")


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


def next_indices(order, n, batch, rng):
    """The next `batch` indices into n examples, popped from the end of `order`, a list of shuffled
    passes over range(n) to which a new pass is appended (one rng.shuffle each) when fewer than
    `batch` are left. Every index comes once per pass (the few left of a pass wait below the next
    one), and a file smaller than a batch repeats within the batch."""
    while len(order) < batch:
        more = list(range(n))
        rng.shuffle(more)
        order.extend(more)
    return [order.pop() for _ in range(batch)]


def pad_batch(seqs, masks, pad_id, device="cpu"):
    """Right-pad token lists (and their masks) to the batch's own longest row.
    -> ids (B, T) LongTensor, mask (B, T) LongTensor with 0 on padding."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, (s, m) in enumerate(zip(seqs, masks)):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(m)] = torch.tensor(m, dtype=torch.long)
    return ids.to(device), mask.to(device)


def prompt_response_batch(prompt_ids, response_ids, pad_id, device="cpu"):
    """Rows prompt + response, right-padded, with the loss mask on the response's tokens only
    (set by position, never by token id): the batch DPO, RL and their evaluations score.
    -> input_ids (N, T), loss_mask (N, T)."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompt_ids, response_ids)]
    return pad_batch(seqs, masks, pad_id, device)


def sample_replies(model, enc, prompts, max_new_tokens=96, temperature=1.0, seed=0,
                   batch_size=128, return_ids=False):
    """Reply texts for a list of prompts (strings or conversations), in batches.
    The same seed and settings give the same replies, so two models are compared on equal terms.
    return_ids: -> (texts, ids), ids the sampled tokens themselves (with the <|end|> that stopped
    the reply; none for a reply cut at max_new_tokens), which is what a log-prob must score:
    decoding and re-encoding need not give back the same tokens."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    replies, reply_ids = [], []
    for i in range(0, len(prompts), batch_size):
        ids = [render_prompt(enc, p) for p in prompts[i: i + batch_size]]
        out, _ = generate(model, ids, max_new_tokens, special(enc, "end"), temperature,
                          generator=gen)
        replies += [decode_reply(enc, o) for o in out]
        reply_ids += out
    return (replies, reply_ids) if return_ids else replies


class DataError(ValueError):
    """A bad input file: the message names the file, the line and what is wrong."""


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


def check_replies_fit(context, enc, prompts, max_new_tokens, source, model="the model"):
    """Stop before any training when a reply of max_new_tokens after the longest of these prompts
    would run past a model's context of `context` tokens (generation would fail there, after the
    work was done)."""
    longest = max((len(render_prompt(enc, p)) for p in prompts), default=0)
    room = context - longest
    require(max_new_tokens <= room, f"--max-new-tokens {max_new_tokens} does not fit: the longest prompt in "
            f"{source} takes {longest} of {model}'s {context} context tokens, leaving {max(room, 0)}")


def previous_stage(init, default_path, build, announcement):
    """The checkpoint a stage starts from: `init` when given (it must exist), else default_path,
    built first by calling build() (and saying so) when it is missing, so that every stage runs on
    a fresh clone."""
    if init:
        if not os.path.exists(init):
            raise DataError(f"{init}: no such checkpoint")
        return init
    if not os.path.exists(default_path):
        print(announcement)
        build()
    return default_path


def read_jsonl(path):
    """Rows of a JSONL file as (line number, dict). Raises DataError naming the file and line on
    a missing file, bytes that are not UTF-8, bad JSON, a row that is not an object, or a file with
    no rows."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{n}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


def valid_prompt(value):
    """A prompt the chat template can render: a string, or a non-empty list of {role, content}
    messages."""
    if isinstance(value, str):
        return True
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)


def check_row(path, n, row, keys):
    """The checks every data file shares (preference, unpaired and RL rows): the fields are
    there, and a prompt among them is something the chat template can render."""
    for key in keys:
        if key not in row:
            raise DataError(f"{path}:{n}: missing field '{key}'")
    if "prompt" not in keys:
        return
    if isinstance(row["prompt"], str) and not row["prompt"].strip():
        raise DataError(f"{path}:{n}: 'prompt' must be non-empty text ('prompt' is empty)")
    if not valid_prompt(row["prompt"]):
        raise DataError(f"{path}:{n}: 'prompt' must be a non-empty string or a list of {{role, content}} messages")


def read_problems(path):
    """Validate a problem file (held-out problems to sample at evaluation, or RL prompts);
    -> list of {"prompt", "answer": int, ...}. Any problem stops with a DataError naming the file
    and line."""
    problems = []
    for n, row in read_jsonl(path):
        check_row(path, n, row, ("prompt", "answer"))
        answer = row["answer"]
        if isinstance(answer, str) and re.fullmatch(r"\s*-?[0-9]+\s*", answer):
            answer = int(answer)
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise DataError(f"{path}:{n}: 'answer' must be an integer, got {row['answer']!r}")
        problems.append({**row, "answer": answer})
    return problems
