"""
The GPT and what every stage does with it: score tokens (the one log-prob helper), talk (the
tokenizer and chat template, with the loss mask), sample (a KV cache), keep (checkpoints), and
count (the FLOPs). Nothing here knows about a stage, a data set or a file format. Read it first;
then sft.py, dpo.py, rlvr.py.

The GPT is nanoGPT's (pre-norm transformer blocks: LayerNorm -> causal self-attention -> residual,
LayerNorm -> MLP -> residual; a final LayerNorm; a language-model head tied to the token embedding)
with one change: positions enter through rotary embeddings (RoPE, Su et al. 2021) on queries and
keys instead of a learned position table. Every skill this world needs is a relative lookup
("the number two tokens back", "the name in the prompt"), and with RoPE attention scores depend
on relative position directly, where a learned absolute table must learn each offset at every
position (docs/log.md).
"""

import base64
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.formats import ROLES, DataError, write_atomically
from data.prepare import DATA_DIR
from plumbing import autocast, eval_mode, load_weights_only, require

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

    def forward(self, idx, positions=None, attn_mask=None, caches=None, hidden=False):
        """idx (B, T) token ids -> logits (B, T, vocab_size), or with hidden=True the last layer's
        states (B, T, n_embd) before the output layer (lm_head), for a caller that needs logits at
        some positions only. positions (B, T) overrides 0..T-1 (left-padded rows start counting at
        their first real token); attn_mask (B, 1, T, Tk) bool, True = may attend; caches: one
        KVCache per block."""
        B, T = idx.shape
        if positions is None:
            positions = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
        if not torch.compiler.is_compiling():  # (a tensor read back would break torch.compile's graph)
            assert int(positions.max()) < self.config.block_size, "sequence longer than block_size"
        rope = rope_angles(positions, self.config.n_embd // self.config.n_head)
        x = self.drop(self.wte(idx))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, attn_mask, None if caches is None else caches[i])
        x = self.ln_f(x)  # (B, T, C)
        return x if hidden else self.lm_head(x)  # (B, T, V)

    def num_params(self):
        """Parameter count, the tied embedding counted once (it is also the output layer, so each
        of its weights costs FLOPs)."""
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------
# Log-probs: the one helper every stage uses to score tokens


def token_logprobs(logits, targets):
    """log p(targets) under logits, per position: log_softmax + gather (never log(softmax)).
    logits (..., V), targets (...) -> (...), always in fp32 whatever the forward dtype."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (..., V)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)


def shifted_logprobs(model, input_ids, loss_mask, temperature=1.0):
    """The log-prob of every scored token given the ones before it: the one helper SFT, DPO and
    RL build their losses on (each then sums or averages over the mask itself).
    input_ids, loss_mask (B, T); loss_mask[b, t] = 1 marks token t as scored, so the shift by one
    happens here: the logits at t-1 predict token t. temperature divides the logits, as the
    sampler does (RL scores its samples under the distribution they were drawn from).
    Only the scored positions go through the output layer and its log_softmax over the vocabulary:
    the prompt's and the padding's logits would be computed to be thrown away.
    -> logps (B, T-1) fp32, 0 where not scored; mask (B, T-1) fp32 (position t-1 holds token t's)."""
    scored = loss_mask[:, 1:].bool()  # (B, T-1)
    inner = unwrap(model)
    with autocast(input_ids.device):
        if isinstance(inner, GPT):
            states = model(input_ids[:, :-1], hidden=True)  # (B, T-1, C)
            logits = inner.lm_head(states[scored])  # (N, V), N scored positions
        else:  # any other model that returns the logits (B, T-1, V)
            logits = model(input_ids[:, :-1])[scored]  # (N, V)
    if temperature != 1.0:
        logits = logits.float() / temperature
    logps = torch.zeros(scored.shape, device=input_ids.device)  # (B, T-1) fp32
    logps = logps.masked_scatter(scored, token_logprobs(logits, input_ids[:, 1:][scored]))  # (N,) into place
    return logps, scored.float()  # (B, T-1) each


def unwrap(model):
    """The GPT inside the wrappers the training forward may run through (distributed.training_model):
    DDP's (.module) and torch.compile's (._orig_mod); the model itself when there are none."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def masked_mean(values, mask, count=None):
    """Mean of values over mask == 1; 0 (not NaN) when the mask is empty. count: divide by it instead
    of the mask's own count (a micro-batch's share of a whole batch's mean)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (mask.sum() if count is None else count).clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat template

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
             generator=None, use_cache=True, on_token=None):
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
    use_cache=False recomputes the whole prefix at every step (same result, for comparison).
    on_token(ids), if given, sees each step's new tokens, a list of one id per row, as they are sampled."""
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
            if on_token is not None:
                on_token(nxt.tolist())
            done |= nxt == stop_token
            t += 1
            if bool(done.all()):
                break
    n = t - P  # tokens sampled per row (rows that stopped early ignore the rest)
    out = [row[:L] for row, L in zip(idx[:, P: P + n].tolist(), lengths.clamp(max=n).tolist())]
    out_logp = [row[:L] for row, L in zip(new_logps[:, :n].tolist(), lengths.clamp(max=n).tolist())]
    return out, out_logp


# ----------------------------------------------------------------------------------------------
# Checkpoints


def tokenizer_fingerprint(path=TOKENIZER_PATH):
    """sha256 of the tokenizer files: a checkpoint is only valid with the tokenizer it learned."""
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
    state = model.state_dict()
    if any(k.endswith((".lora_A", ".lora_B")) for k in state):  # a file load_checkpoint could not read
        raise ValueError("the model has LoRA adapters: lora.merge_lora(model) first, or lora.save_lora")
    ckpt = {"config": dataclasses.asdict(model.config),
            "model": {k: v.detach().cpu() for k, v in state.items()},
            "tokenizer": {"path": os.path.abspath(tokenizer_path),
                          "sha256": tokenizer_fingerprint(tokenizer_path)},
            **extra}
    write_atomically(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path, device="cpu", tokenizer_path=TOKENIZER_PATH):
    """-> (model, checkpoint dict), the file written by save_checkpoint (see load_weights_only).
    Refuses a checkpoint trained with another tokenizer than tokenizer_path (None: no check)."""
    ckpt = load_weights_only(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"config", "model", "tokenizer"} <= ckpt.keys():
        hint = " (a LoRA adapter file? load it with lora.load_lora)" if isinstance(ckpt, dict) and "lora" in ckpt else ""
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
# Measuring: parameter count, FLOPs, MFU


def training_flops(model, positions, scored, T):
    """FLOPs of a forward and backward pass (6 per weight per token) over `positions` token
    positions of rows T long, of which `scored` go through the output layer: the body's weights at
    every position, the head's (the tied embedding, vocab_size x n_embd) at the scored ones only,
    plus attention's 6 * n_layer * T * n_embd per position for the QK^T and AV matmuls. PaLM
    (appendix B) and nanoGPT count 12 * n_layer * T * n_embd, every score of the T x T matrix; we
    count the half a causal mask leaves, so MFU credits only useful work."""
    cfg = model.config
    head = cfg.vocab_size * cfg.n_embd
    return (6 * (model.num_params() - head) + 6 * cfg.n_layer * T * cfg.n_embd) * positions + 6 * head * scored


# ----------------------------------------------------------------------------------------------
# Batches and replies: what every stage scores and samples


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


