"""lora.py: LoRA adapters, W' = W + (alpha / r) B A on the targeted Linear layers: one layer by
hand, wrapping a GPT, switching the adapters off (the base as the reference), training only them,
merging, the adapter files, and dpo.py --lora-rank end to end.

Models are tiny (vocab 50, 2 layers, width 32). A fresh adapter has B = 0 and changes nothing,
so the tests that need an adapter to matter first give B random values (`perturb`).
"""

import copy
import math
import os

import pytest
import torch
import torch.nn as nn

import helpers
import model as M
import plumbing as P
import lora

V = 50
TARGET_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tiny_gpt(seed=0):
    return helpers.tiny_gpt(V, seed, block_size=32, n_layer=2, std=0.3).eval()


def tokens(seed=0, B=2, T=12):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=1, std=0.5):
    """Give every B random values, so that each adapter changes its layer's output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------------------------
# One adapted layer


def test_lora_linear_computes_w_plus_scaled_ba_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(5, 3, bias=True)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = lora.LoRALinear(base, rank=2, alpha=6)
    # the base is frozen and keeps its keys; the adapters are A (r, in) and B (out, r)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (2, 5) and layer.lora_B.shape == (3, 2)
    # init: B = 0; A kaiming-uniform (a = sqrt(5)), i.e. uniform in +-1/sqrt(in), not zero
    assert torch.equal(layer.lora_B, torch.zeros(3, 2))
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(5) and layer.lora_A.abs().min() > 0
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(3, 2))
    x = torch.randn(4, 7, 5)
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    expected = x.double() @ (W.double() + 6 / 2 * B @ A).T + b.double()  # x W'^T + b, in fp64
    got = layer(x)
    assert got.shape == (4, 7, 3)
    # fp32 with the adapter beside W against fp64 with it folded in: relative to outputs of ~9
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
    # switched off it is exactly the base Linear
    layer.enabled = False
    assert torch.equal(layer(x), x @ W.T + b)


# ----------------------------------------------------------------------------------------------
# Adding adapters to a GPT


def test_adapted_model_starts_exactly_equal_to_the_base():
    base = tiny_gpt()
    adapted = copy.deepcopy(base)
    names = lora.add_lora(adapted, rank=4, alpha=8)
    assert names == [f"blocks.{i}.{s}" for i in range(2) for s in TARGET_SUFFIXES]
    x = tokens()
    # B = 0: bit-for-bit the base, so at DPO's step 0 policy = reference and every reward is 0
    assert torch.equal(logits(adapted, x), logits(base, x))


def test_state_dict_keeps_the_base_keys_and_adds_only_adapters():
    base = tiny_gpt()
    adapted = copy.deepcopy(base)
    names = lora.add_lora(adapted, rank=2, alpha=2)
    keys = set(adapted.state_dict())
    lora_keys = {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    assert keys == set(base.state_dict()) | lora_keys
    assert set(lora.lora_state_dict(adapted)) == lora_keys
    # so a base state_dict loads into the adapted model, only the adapters missing
    result = perturb(adapted).load_state_dict(base.state_dict(), strict=False)
    assert set(result.missing_keys) == lora_keys and not result.unexpected_keys


def test_targets_pick_the_adapted_layers():
    m = tiny_gpt()
    names = lora.add_lora(m, rank=2, alpha=2, targets="attn")
    assert names == [f"blocks.{i}.attn.{s}" for i in range(2) for s in ("c_attn", "c_proj")]
    for i in range(2):
        block = m.blocks[i]
        assert isinstance(block.attn.c_attn, lora.LoRALinear) and isinstance(block.attn.c_proj, lora.LoRALinear)
        assert type(block.mlp.c_fc) is nn.Linear and type(block.mlp.c_proj) is nn.Linear
    assert type(m.lm_head) is nn.Linear and m.lm_head.weight is m.wte.weight  # never the tied head
    # a module-name suffix picks one kind of layer
    m = tiny_gpt()
    assert lora.add_lora(m, 2, 2, targets=["mlp.c_fc"]) == ["blocks.0.mlp.c_fc", "blocks.1.mlp.c_fc"]
    # --lora-targets' comma-separated form names the same layers as the list
    assert lora.add_lora(tiny_gpt(), 2, 2, targets="attn.c_proj, mlp.c_fc") == lora.add_lora(
        tiny_gpt(), 2, 2, targets=["attn.c_proj", "mlp.c_fc"])
    # unknown names (the tied head included) are refused, naming the known ones
    for bad in (["qkv"], ["attn", "lm_head"]):
        with pytest.raises(ValueError, match="unknown LoRA targets") as e:
            lora.add_lora(tiny_gpt(), 2, 2, targets=bad)
        assert "'attn'" in str(e.value) and "'mlp'" in str(e.value)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(m, 2, 2)


def test_trainable_share_matches_a_hand_count_on_the_default_config():
    base_total = M.GPT(M.GPTConfig()).num_params()
    C, L = 128, 4  # GPTConfig's n_embd, n_layer
    # targeted Linear(in, out) per block: c_attn (C, 3C), attn.c_proj (C, C), c_fc (C, 4C),
    # mlp.c_proj (4C, C); each adapter holds r * (in + out) numbers
    per_rank = L * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert per_rank == 8192
    shares = {}
    for r in (4, 16):
        m = M.GPT(M.GPTConfig())
        lora.add_lora(m, rank=r, alpha=2 * r)
        assert lora.trainable_parameters(m) == r * per_rank
        assert m.num_params() == base_total + r * per_rank
        shares[r] = lora.trainable_parameters(m) / m.num_params()
    # r = 4: 32,768 of 953,472 (3.4%). r = 16: 131,072 of 1,051,776 (12.5%): on a model only 128
    # wide, r = 16 is an eighth of the width, so LoRA saves little; r * (in + out) << in * out
    # needs r << 128.
    assert shares[4] < 0.04
    assert shares[16] == pytest.approx(131072 / 1051776)
    # attention only at r = 16: 4 * 16 * (4C + 2C) = 49,152, 5.1% of the total
    m = M.GPT(M.GPTConfig())
    lora.add_lora(m, rank=16, alpha=32, targets="attn")
    assert lora.trainable_parameters(m) == 4 * 16 * (4 * C + 2 * C)
    assert lora.trainable_parameters(m) / m.num_params() < 0.10


# ----------------------------------------------------------------------------------------------
# Switching adapters off: the base as the reference


def test_lora_disabled_gives_the_base_model_exactly():
    base = tiny_gpt()
    adapted = copy.deepcopy(base)
    lora.add_lora(adapted, rank=4, alpha=8)
    perturb(adapted)
    x = tokens(1)
    mask = torch.ones_like(x)
    assert not torch.allclose(logits(adapted, x), logits(base, x), atol=1e-3)  # adapters matter
    with lora.lora_disabled(adapted):
        assert torch.equal(logits(adapted, x), logits(base, x))
        with torch.no_grad():
            ref_logps, _ = M.shifted_logprobs(adapted, x, mask)
        assert not any(m.enabled for m in lora.lora_layers(adapted).values())
    assert all(m.enabled for m in lora.lora_layers(adapted).values())  # back on after the block
    with torch.no_grad():
        base_logps, _ = M.shifted_logprobs(base, x, mask)
    assert torch.equal(ref_logps, base_logps)
    assert not torch.allclose(logits(adapted, x), logits(base, x), atol=1e-3)


def test_lora_disabled_restores_the_previous_state_even_after_an_exception():
    m = tiny_gpt()
    lora.add_lora(m, 2, 2)
    layers = list(lora.lora_layers(m).values())
    layers[0].enabled = False  # one adapter was already off: it must stay off afterwards
    with pytest.raises(RuntimeError, match="boom"):
        with lora.lora_disabled(m):
            raise RuntimeError("boom")
    assert [layer.enabled for layer in layers] == [False] + [True] * (len(layers) - 1)


def test_lora_disabled_is_the_base_in_eval_mode_even_with_dropout():
    # a policy training with dropout: its reference (the base, adapters off) must still be the
    # deterministic eval-mode base, and the policy must come back in train mode afterwards
    torch.manual_seed(0)
    base = M.GPT(M.GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.5)).eval()
    adapted = copy.deepcopy(base)
    lora.add_lora(adapted, rank=4, alpha=8)
    perturb(adapted)
    adapted.train()
    x = tokens(2)
    torch.manual_seed(1)
    assert not torch.equal(logits(adapted, x), logits(adapted, x))  # train mode: dropout draws differ
    with lora.lora_disabled(adapted):
        assert not adapted.training and not any(m.training for m in adapted.modules())
        first, second = logits(adapted, x), logits(adapted, x)
    assert torch.equal(first, second) and torch.equal(first, logits(base, x))
    assert adapted.training and all(m.training for m in adapted.modules())
    with pytest.raises(RuntimeError, match="boom"):  # and back in train mode when the block raises
        with lora.lora_disabled(adapted):
            raise RuntimeError("boom")
    assert adapted.training
    # every module gets its own mode back: an eval-mode model stays in eval, a mixed one stays mixed
    for modes in ([False] * len(list(adapted.modules())), [i % 2 == 0 for i in range(len(list(adapted.modules())))]):
        for m, training in zip(adapted.modules(), modes):
            m.training = training
        with lora.lora_disabled(adapted):
            assert not any(m.training for m in adapted.modules())
        assert [m.training for m in adapted.modules()] == modes


# ----------------------------------------------------------------------------------------------
# Training moves only the adapters


def test_only_adapters_get_gradients_and_base_weights_stay_bit_identical():
    m = tiny_gpt()
    lora.add_lora(m, rank=4, alpha=8)
    m.train()
    base = {k: v.clone() for k, v in m.state_dict().items() if "lora_" not in k}
    x = tokens(2)
    before = logits(m, x)
    targets = torch.roll(x, -1, dims=1)

    def loss_fn():
        out = m(x)
        return nn.functional.cross_entropy(out.reshape(-1, V), targets.reshape(-1))

    loss_fn().backward()
    for name, p in m.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # with B = 0 the first gradient reaches B only: dL/dA = (alpha / r) B^T (dL/dh) x^T = 0
    for layer in lora.lora_layers(m).values():
        assert torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))
        assert layer.lora_B.grad.abs().max() > 0
    # every parameter handed to AdamW, as a careless caller would: frozen ones have no gradient,
    # so AdamW skips them (weight decay included)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
    for k, v in m.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base[k]), k
    assert not torch.allclose(logits(m, x), before, atol=1e-4)  # yet the model changed


# ----------------------------------------------------------------------------------------------
# Merging, and the files


def test_merge_folds_the_adapters_into_a_plain_gpt(tmp_path, tiny_data_dir):
    m = tiny_gpt()
    lora.add_lora(m, rank=4, alpha=8)
    perturb(m)
    x = tokens(3)
    adapted = logits(m, x)
    merged = lora.merge_lora(m)
    assert not lora.lora_layers(merged)
    assert all(type(mod) is nn.Linear for n, mod in merged.named_modules() if n.endswith(TARGET_SUFFIXES))
    assert set(merged.state_dict()) == set(tiny_gpt().state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    assert merged.lm_head.weight is merged.wte.weight  # the tie survives
    # W + s B A folded into one matrix rounds differently from W and B A apart: by ~1e-5 (1.13e-5 on
    # an AVX-512 CPU failed atol=1e-5, rtol=0), the rounding of logits up to ~7, which small logits
    # carry too (hence the atol); a wrong merge is off by far more
    assert torch.allclose(logits(merged, x), adapted, rtol=1e-4, atol=1e-4)
    # saved and loaded like any checkpoint
    tok = os.path.join(tiny_data_dir, "tokenizer.json")
    path = str(tmp_path / "merged.pt")
    M.save_checkpoint(path, merged, tok)
    loaded, _ = M.load_checkpoint(path, tokenizer_path=tok)
    assert torch.equal(logits(loaded.eval(), x), logits(merged, x))


def test_save_checkpoint_refuses_an_unmerged_model(tmp_path, tiny_data_dir):
    m = tiny_gpt()
    lora.add_lora(m, 2, 2)
    with pytest.raises(ValueError, match="merge_lora"):
        M.save_checkpoint(str(tmp_path / "x.pt"), m, os.path.join(tiny_data_dir, "tokenizer.json"))
    assert not os.listdir(tmp_path)


def test_adapter_file_round_trips_into_a_fresh_base(tmp_path, tiny_data_dir):
    m = tiny_gpt()
    lora.add_lora(m, rank=2, alpha=4, targets="attn")
    perturb(m)
    path = str(tmp_path / "lora" / "adapter.pt")
    lora.save_lora(path, m, base="out/sft/model.pt")
    assert os.listdir(tmp_path / "lora") == ["adapter.pt"]  # the temp file was renamed away
    fresh = tiny_gpt()  # the same base weights, no adapters
    info = lora.load_lora(path, fresh)
    assert (info["rank"], info["alpha"], info["base"]) == (2, 4, "out/sft/model.pt")
    assert list(lora.lora_layers(fresh)) == list(lora.lora_layers(m))
    assert lora.lora_layers(fresh)["blocks.0.attn.c_attn"].scale == 2.0
    x = tokens(4)
    assert torch.equal(logits(fresh, x), logits(m, x))
    assert lora.trainable_parameters(fresh) == lora.trainable_parameters(m)  # the base frozen there too
    # the adapters alone are a small fraction of the full model's file
    full = str(tmp_path / "full.pt")
    M.save_checkpoint(full, tiny_gpt(), os.path.join(tiny_data_dir, "tokenizer.json"))
    assert os.path.getsize(path) < os.path.getsize(full) / 5


def test_load_lora_refuses_a_file_that_does_not_fit(tmp_path, tiny_data_dir):
    m = tiny_gpt()
    lora.add_lora(m, rank=4, alpha=8)
    path = str(tmp_path / "r4.pt")
    lora.save_lora(path, m)
    # a model already carrying rank-2 adapters: the shapes differ
    other = tiny_gpt()
    lora.add_lora(other, rank=2, alpha=8)
    with pytest.raises(P.DataError, match="do not fit") as e:
        lora.load_lora(path, other)
    assert path in str(e.value) and "(4, 32)" in str(e.value)
    # a base with one block: the file's second-block adapters have nowhere to go
    one_block = helpers.tiny_gpt(V, 0, block_size=32, n_layer=1)
    with pytest.raises(P.DataError, match="blocks.1") as e:
        lora.load_lora(path, one_block)
    assert path in str(e.value) and not lora.lora_layers(one_block)  # left untouched
    # a full checkpoint is not an adapter file
    full = str(tmp_path / "full.pt")
    M.save_checkpoint(full, tiny_gpt(), os.path.join(tiny_data_dir, "tokenizer.json"))
    with pytest.raises(P.DataError, match="not a LoRA adapter file") as e:
        lora.load_lora(full, tiny_gpt())
    assert full in str(e.value)



def test_load_lora_checks_the_whole_file_before_it_changes_the_model(tmp_path):
    m = tiny_gpt()
    lora.add_lora(m, rank=4, alpha=8)
    good = str(tmp_path / "r4.pt")
    lora.save_lora(good, m)
    saved = torch.load(good, weights_only=True)
    n_params = len(list(tiny_gpt().parameters()))
    # malformed files used to raise KeyError, ZeroDivisionError or AttributeError, or to load no
    # adapter at all and leave the whole model frozen
    for i, broken in enumerate([{"lora": {}}, {**saved, "rank": 0}, {**saved, "lora": "x"},
                                {**saved, "modules": []}, {**saved, "alpha": "8"}]):
        path = str(tmp_path / f"broken{i}.pt")
        torch.save(broken, path)
        base = tiny_gpt()
        with pytest.raises(P.DataError, match=f"^{path}: not a LoRA adapter file as save_lora writes it"):
            lora.load_lora(path, base)
        assert not lora.lora_layers(base) and lora.trainable_parameters(base) == lora.trainable_parameters(tiny_gpt())
    # tensors of the wrong shape for this base: refused before any Linear is wrapped or frozen
    small = {**saved, "lora": {k: v[:, :3] if k.endswith("lora_A") else v for k, v in saved["lora"].items()}}
    path = str(tmp_path / "small.pt")
    torch.save(small, path)
    base = tiny_gpt()
    with pytest.raises(P.DataError, match="do not fit this model"):
        lora.load_lora(path, base)
    assert not lora.lora_layers(base) and all(p.requires_grad for p in base.parameters())
    assert len(list(base.parameters())) == n_params
    # the same base with its adapters: an alpha that differs is named
    other = tiny_gpt()
    lora.add_lora(other, rank=4, alpha=16)
    with pytest.raises(P.DataError, match="alpha 8 in the file differs"):
        lora.load_lora(good, other)


# ----------------------------------------------------------------------------------------------
# DPO with LoRA: dpo.py --lora-rank, end to end on a tiny model

import json  # noqa: E402

import dpo  # noqa: E402


def test_lora_dpo_run_holds_one_model_starts_at_zero_rewards_and_raises_accuracy(tiny_sft_ckpt, tiny_data_dir,
                                                                                 tmp_path, monkeypatch):
    loaded = []
    real_load = M.load_checkpoint

    def counting_load(*args, **kw):
        loaded.append(args[0])
        return real_load(*args, **kw)

    monkeypatch.setattr(M, "load_checkpoint", counting_load)
    out = str(tmp_path)
    # lr_schedule: the accuracy asserted below was set with a constant lr
    config = dpo.DPOConfig(init=tiny_sft_ckpt, data_dir=tiny_data_dir, steps=30, batch_size=8, lr=3e-3,
                           warmup_steps=5, eval_problems=4, max_new_tokens=8, out=out, device="cpu",
                           log_every=1, lora_rank=4, lora_alpha=8.0, lr_schedule="constant")
    metrics = dpo.train(config)
    assert loaded == [tiny_sft_ckpt]  # one copy of the weights: no reference model, not even to evaluate

    with open(os.path.join(out, "dpo", "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    # step 0: B = 0, so the policy is its base exactly (train()'s step-0 check holds the rewards to 0
    # exactly on one batch); the log compares it with the one-time reference pass, scored in batches
    # of another shape, whose sums (~-300, 1 fp32 ulp = 3e-5) may round differently: 0 to rounding
    assert log[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-3)
    assert log[0]["rewards/rejected"] == pytest.approx(0.0, abs=1e-3)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    # the held-out accuracy starts at 0 (no pair ranked strictly while policy == base) and rises
    assert metrics["pref_accuracy"] >= 0.6 and metrics["margin"] > 0
    # r (in + out) per adapted Linear, counted from the start checkpoint's own layers
    start_model, _ = real_load(tiny_sft_ckpt, "cpu", os.path.join(tiny_data_dir, "tokenizer.json"))
    targets = [m for n, m in start_model.named_modules()
               if isinstance(m, nn.Linear) and n.endswith(TARGET_SUFFIXES)]
    assert metrics["trainable_parameters"] == sum(4 * (m.in_features + m.out_features) for m in targets)

    # model.pt is the merged policy: base + adapters from adapter.pt, a plain checkpoint
    tok = os.path.join(tiny_data_dir, "tokenizer.json")
    merged, _ = real_load(os.path.join(out, "dpo", "model.pt"), "cpu", tok)
    base, _ = real_load(tiny_sft_ckpt, "cpu", tok)
    lora.load_lora(os.path.join(out, "dpo", "adapter.pt"), base)
    x = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # merged against adapted weights: they round differently (see the merge test above)
        assert torch.allclose(merged.eval()(x), base.eval()(x), rtol=1e-4, atol=1e-4)
        with lora.lora_disabled(base):  # and with the adapters off, the untouched SFT weights
            start, _ = real_load(tiny_sft_ckpt, "cpu", tok)
            assert torch.equal(base(x), start.eval()(x))


def test_lora_and_full_reference_log_probs_agree(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    # the reference pass with adapters off equals the one through a separately loaded base
    runs = {}
    for rank in (0, 4):
        out = str(tmp_path / f"r{rank}")
        dpo.train(dpo.DPOConfig(init=tiny_sft_ckpt, data_dir=tiny_data_dir, steps=1, batch_size=4, eval_problems=0,
                                out=out, device="cpu", log_every=1, lora_rank=rank))
        with open(os.path.join(out, "dpo", "log.jsonl")) as f:
            runs[rank] = json.loads(f.readline())
    assert runs[4]["loss"] == runs[0]["loss"] and runs[4]["logps/chosen"] == runs[0]["logps/chosen"]
