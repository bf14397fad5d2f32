"""sft.py: the loss, the SFT mask, data validation, and end-to-end runs of both stages on a tiny
config (seconds)."""

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

import checks
import helpers
import model as M
import plumbing
import sft
from data import formats
from data import prepare as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return M.GPT(M.GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))


def chat_batch(enc):
    """Two conversations of different lengths, right-padded as the SFT loop pads them."""
    convs = [[{"role": "user", "content": "Mia has 3 pens. How many pens does Mia have now?"},
              {"role": "assistant", "content": "The answer is 3."}],
             [{"role": "user", "content": "Ben has 2 cards. He finds 1 more cards. How many cards?"},
              {"role": "assistant",
               "content": "Ben starts with 2 cards.\nThen 2 + 1 = 3 cards.\nThe answer is 3."}]]
    rendered = [M.render_chat(enc, c) for c in convs]
    return M.pad_batch([r[0] for r in rendered], [r[1] for r in rendered], M.special(enc, "endoftext"))


# ----------------------------------------------------------------------------------------------
# The loss


def test_lm_loss_matches_float64_brute_force(tiny_enc):
    ids, mask = chat_batch(tiny_enc)
    m = tiny_model(tiny_enc.n_vocab).eval()
    with torch.no_grad():
        got = sft.lm_loss(m, ids, mask)
        logits = m(ids).double()  # (B, T, V); causal, so position t-1 sees only ids[:, :t]
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                row = [float(v) for v in logits[b, t - 1]]
                top = max(row)
                log_z = top + math.log(sum(math.exp(v - top) for v in row))
                total += -(row[int(ids[b, t])] - log_z)
                count += 1
    assert count == int(mask[:, 1:].sum()) > 0
    assert float(got) == pytest.approx(total / count, rel=1e-5)  # fp32 against fp64: relative


def test_sft_mask_changes_the_loss(tiny_enc):
    # a refactor that silently dropped the mask would train on the prompt as well
    ids, mask = chat_batch(tiny_enc)
    m = tiny_model(tiny_enc.n_vocab).eval()
    with torch.no_grad():
        masked = float(sft.lm_loss(m, ids, mask))
        full = float(sft.lm_loss(m, ids, torch.ones_like(mask)))
    assert abs(masked - full) > 1e-3


def _fixed_logits_model(shape, seed=0):
    """A stand-in model whose logits are one leaf tensor, whatever the input: the loss's gradient
    lands on it position by position, and changing an input id changes only the targets."""
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    return logits, (lambda idx: logits)


def test_prompt_tokens_get_no_gradient(tiny_enc):
    ids, mask = chat_batch(tiny_enc)
    B, T = ids.shape
    logits, fake = _fixed_logits_model((B, T - 1, tiny_enc.n_vocab))
    sft.lm_loss(fake, ids, mask).backward()
    per_position = logits.grad.abs().sum(-1)  # (B, T-1): logits at t-1 predict token t
    scored = mask[:, 1:].bool()
    assert torch.all(per_position[~scored] == 0)
    assert torch.all(per_position[scored] > 0)


def test_changing_an_unscored_target_leaves_the_loss_unchanged(tiny_enc):
    ids, mask = chat_batch(tiny_enc)
    B, T = ids.shape
    _, fake = _fixed_logits_model((B, T - 1, tiny_enc.n_vocab))
    base = sft.lm_loss(fake, ids, mask).item()
    prompt_positions = [(b, t) for b in range(B) for t in range(1, T) if not mask[b, t]]
    for b, t in prompt_positions:
        y = ids.clone()
        y[b, t] = (y[b, t] + 1) % tiny_enc.n_vocab
        assert sft.lm_loss(fake, y, mask).item() == base
    # while changing a scored (assistant) target does change it
    b, t = next((b, t) for b in range(B) for t in range(1, T) if mask[b, t])
    y = ids.clone()
    y[b, t] = (y[b, t] + 1) % tiny_enc.n_vocab
    assert sft.lm_loss(fake, y, mask).item() != base


def test_right_padding_does_not_change_the_loss(tiny_enc):
    # with a real model: the padding after the last reply is neither scored nor seen by any
    # scored position (the model is causal), so its ids do not matter
    ids, mask = chat_batch(tiny_enc)
    m = tiny_model(tiny_enc.n_vocab).eval()
    short = 0  # the first conversation is the shorter one: its row ends in padding
    pads = (ids[short] == M.special(tiny_enc, "endoftext")).nonzero().flatten()[1:]  # skip BOS
    assert len(pads) > 0 and int(pads[-1]) == ids.shape[1] - 1
    y = ids.clone()
    y[short, pads] = 7
    with torch.no_grad():
        assert torch.allclose(sft.lm_loss(m, y, mask), sft.lm_loss(m, ids, mask), atol=1e-6)


def test_optimizer_decays_matrices_only():
    m = tiny_model(50)
    opt = sft.make_optimizer(m, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


# ----------------------------------------------------------------------------------------------
# End to end on a tiny config


def tiny_sft_config(data_dir, out, **overrides):
    # sft_lr 3e-3 (default 1e-3): with only 30 steps from a barely pretrained model, the
    # default moves the SFT loss too little to tell learning from batch noise
    kw = dict(n_layer=1, n_head=2, n_embd=32, block_size=192, pretrain_steps=30, sft_steps=30,
              pretrain_batch_size=8, pretrain_seq_len=32, sft_batch_size=8, sft_lr=3e-3,
              eval_every=10, eval_problems=10, max_new_tokens=16, data_dir=data_dir, out=out,
              device="cpu", warmup_steps=5, log_every=5)
    return sft.SFTConfig(**{**kw, **overrides})


@pytest.fixture(scope="module")
def sft_run(tiny_data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft_out"))
    metrics = sft.train(tiny_sft_config(tiny_data_dir, out))
    return out, metrics


def _log(out, stage):
    with open(os.path.join(out, stage, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_training_losses_fall(sft_run, tiny_enc, stage):
    out, _ = sft_run
    log = _log(out, stage)
    assert [r["step"] for r in log] == [0, 5, 10, 15, 20, 25, 29]  # every log_every, and the last
    # a clear margin (about 1.3 nats in both stages here), far above the batch-to-batch noise
    assert log[-1]["loss"] < log[0]["loss"] - 0.5, (log[0]["loss"], log[-1]["loss"])
    # (with no validation batch at all evaluate_loss gives NaN, logged as null: this comparison
    # would then fail)
    assert log[0]["val_loss"] > 1.0
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.3, (log[0]["val_loss"], log[-1]["val_loss"])
    if stage == "pretrain":
        # an untrained model is about uniform over the vocabulary: loss ln(vocab size)
        assert abs(log[0]["loss"] - math.log(tiny_enc.n_vocab)) < 0.2
        with open(os.path.join(out, "pretrain", "metrics.json")) as f:
            assert json.load(f)["tokens"] == 30 * 8 * 32  # steps x windows x window length


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_log_lines_are_strict_json_with_a_throughput_on_every_line(sft_run, stage):
    # NaN and Infinity are not JSON: jq and most readers outside Python refuse the line
    out, _ = sft_run
    with open(os.path.join(out, stage, "log.jsonl")) as f:
        rows = [helpers.strict_loads(line) for line in f]
    # (a NaN is written as null, so the real check is that step 0 has a throughput at all)
    assert rows and all(r["tokens_per_second"] is not None and r["tokens_per_second"] > 0 and r["mfu"] > 0
                        for r in rows)


def test_outputs_are_written(sft_run, tiny_data_dir, tiny_enc):
    out, metrics = sft_run
    for stage in ("pretrain", "sft"):
        for name in ("model.pt", "log.jsonl", "metrics.json"):
            assert os.path.isfile(os.path.join(out, stage, name)), (stage, name)
    with open(os.path.join(out, "sft", "metrics.json")) as f:
        saved = json.load(f)
    for key in ("accuracy", "accuracy_sampled", "style_shares", "tokens_per_second", "mfu",
                "wall_seconds"):
        assert key in saved, key
    assert 0.0 <= saved["accuracy"] <= 1.0 and 0.0 <= saved["accuracy_sampled"] <= 1.0
    assert sum(saved["style_shares"].values()) == pytest.approx(1.0)
    assert saved["tokens_per_second"] > 0 and saved["mfu"] > 0
    assert saved["accuracy"] == metrics["accuracy"]  # the file holds what train() returned
    # the checkpoint carries the resolved config and loads into the same architecture
    model, ckpt = M.load_checkpoint(os.path.join(out, "sft", "model.pt"),
                                    tokenizer_path=os.path.join(tiny_data_dir, "tokenizer.json"))
    assert ckpt["stage"] == "sft" and ckpt["train_config"]["n_embd"] == 32
    assert model.config.n_layer == 1 and model.config.vocab_size == tiny_enc.n_vocab


def test_sft_stage_alone_resumes_from_the_pretrained_checkpoint(sft_run, tiny_data_dir, tmp_path,
                                                                 monkeypatch):
    # `--stages sft` starts from out/pretrain/model.pt: its first batch (same seed, same order)
    # must score exactly as the first SFT batch of the run that trained that checkpoint
    out, _ = sft_run
    shutil.copytree(os.path.join(out, "pretrain"), tmp_path / "pretrain")
    metrics = sft.train(tiny_sft_config(tiny_data_dir, str(tmp_path), stages="sft", sft_steps=2,
                                        eval_problems=0, log_every=1))
    resumed_first = _log(str(tmp_path), "sft")[0]["loss"]
    assert resumed_first == pytest.approx(_log(out, "sft")[0]["loss"], abs=1e-5)
    assert "accuracy" not in metrics and metrics["tokens"] > 0  # eval_problems=0 skips answering


def test_sft_stage_alone_without_checkpoint_exits(tiny_data_dir, tmp_path, monkeypatch):
    with pytest.raises(plumbing.DataError, match="no pretrained checkpoint"):
        sft.train(tiny_sft_config(tiny_data_dir, str(tmp_path), stages="sft"))
    with pytest.raises(SystemExit, match="no pretrained checkpoint"):  # one line on the command line
        sft.main(["--data-dir", tiny_data_dir, "--out", str(tmp_path), "--stages", "sft", "--device", "cpu"])


def test_main_reports_bad_data_file_and_line(tiny_data_dir, tmp_path, monkeypatch):
    # the command line turns a DataError into a one-line exit message naming file and line
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    lines = (data / "sft.jsonl").read_text().splitlines(keepends=True)
    lines[4] = '{"messages": []}\n'
    (data / "sft.jsonl").write_text("".join(lines))
    argv = ["--data-dir", str(data), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--pretrain-steps", "1",
            "--pretrain-batch-size", "2", "--pretrain-seq-len", "16", "--eval-problems", "0"]
    with pytest.raises(SystemExit) as e:
        sft.main(argv)
    assert "sft.jsonl:5" in str(e.value.code) and str(data) in str(e.value.code)
    # found before pretraining spent its minutes: nothing was built
    assert not (tmp_path / "out" / "pretrain").exists()


@pytest.mark.parametrize("row, message", [
    ({"answer": 3}, "missing field 'prompt'"),
    ({"prompt": "Mia has 3 pens. How many pens does Mia have?", "answer": "three"}, "'answer' must be an integer"),
])
def test_a_bad_held_out_problem_stops_before_pretraining(tiny_data_dir, tmp_path, row, message):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    lines = (data / "test.jsonl").read_text().splitlines(keepends=True)
    lines[1] = json.dumps(row) + "\n"
    (data / "test.jsonl").write_text("".join(lines))
    out = tmp_path / "out"
    with pytest.raises(plumbing.DataError, match=f"test.jsonl:2: {message}"):
        sft.train(tiny_sft_config(str(data), str(out), eval_problems=4))
    assert not (out / "pretrain").exists()
    # a run that answers no held-out problems never reads the file
    sft.train(tiny_sft_config(str(data), str(out), eval_problems=0, pretrain_steps=2, sft_steps=2))
    assert (out / "sft" / "model.pt").exists()


def test_train_does_not_rebuild_given_data(tiny_data_dir):
    # `--data-dir DIR` names existing data ("built if missing"): train must use it as it is, not
    # rebuild it because it was made with other settings than PrepareConfig's defaults (e.g. by
    # `python data/prepare.py --pretrain-mb 8`, as prepare.py's docstring suggests).
    before = {f: os.stat(os.path.join(tiny_data_dir, f)).st_mtime_ns for f in P.FILES}
    sft.train(tiny_sft_config(tiny_data_dir, "unused", stages=""))  # no stage: only the data step
    after = {f: os.stat(os.path.join(tiny_data_dir, f)).st_mtime_ns for f in P.FILES}
    assert before == after, "sft.train rewrote an existing, complete data directory"


def test_cli_help():
    result = subprocess.run([sys.executable, "sft.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--device", "--out", "--seed"):
        assert flag in result.stdout


@pytest.mark.parametrize("flags,message", [
    (["--stages", "pretrian"], "--stages 'pretrian': name some of pretrain, sft, cot, preferred-ft"),
    (["--init", "x.pt"], "--init: only the cot and preferred-ft stages start from a checkpoint"),
    (["--stages", "cot", "--init", "missing.pt"], "missing.pt: no such checkpoint"),
    (["--stages", "preferred-ft", "--pft-batch-size", "0"], "--pft-batch-size must be > 0, got 0"),
    (["--stages", "cot", "--cot-steps", "0"], "--cot-steps must be > 0, got 0"),
    (["--n-embd", "30", "--n-head", "4"], "--n-embd 30 must be a multiple of --n-head 4"),
    (["--pretrain-seq-len", "500"], "--pretrain-seq-len 500 is longer than the model's context, --block-size 192"),
    (["--sft-batch-size", "0"], "--sft-batch-size must be > 0, got 0"),
    (["--pretrain-steps", "0"], "--pretrain-steps must be > 0, got 0"),
    (["--grad-clip", "-1"], "--grad-clip must be > 0, got -1.0"),  # a negative limit flips every gradient
    (["--n-embd", "12", "--n-head", "4"], "--n-embd 12 / --n-head 4 gives heads of 3 dimensions; RoPE rotates "
                                          "them in pairs: make it even"),
])
def test_main_reports_bad_flags_in_one_line_before_building_anything(tmp_path, flags, message):
    # a typo in --stages used to run no stage at all, silently
    out, data = tmp_path / "out", tmp_path / "data"  # neither exists: a run past the checks would build them
    with pytest.raises(SystemExit) as e:
        sft.main([*flags, "--out", str(out), "--data-dir", str(data), "--device", "cpu"])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith(f"error: {message}") and "\n" not in msg
    assert not out.exists() and not data.exists()


def test_a_pretraining_batch_larger_than_the_validation_text_stops_before_training(tiny_data_dir, tmp_path):
    # it used to leave no validation batch at all, and every val_loss was NaN, silently
    val_path = os.path.join(tiny_data_dir, "pretrain_val.txt")
    enc = M.load_tokenizer(os.path.join(tiny_data_dir, "tokenizer.json"))
    n_val = len(sft.pretrain_stream(enc, val_path))
    B, T = n_val // 32 + 1, 32  # one batch needs B * T + 1 > n_val tokens
    out = tmp_path / "out"
    with pytest.raises(plumbing.ConfigError, match=f"^{val_path}: {n_val} tokens hold no validation batch of "
                                            f"--pretrain-batch-size {B} x --pretrain-seq-len {T}"):
        sft.train(tiny_sft_config(tiny_data_dir, str(out), pretrain_batch_size=B, pretrain_seq_len=T))
    assert not (out / "pretrain" / "model.pt").exists()


def test_pretraining_flags_are_checked_only_when_pretraining_runs():
    # --stages sft starts from the pretrained checkpoint: its window length is not this run's business
    checks.sft(sft.SFTConfig(stages="sft", block_size=50, pretrain_seq_len=128), sft.STAGES)
    with pytest.raises(plumbing.ConfigError, match="--pretrain-seq-len 128 is longer than the model's context"):
        checks.sft(sft.SFTConfig(stages="pretrain,sft", block_size=50, pretrain_seq_len=128), sft.STAGES)


def test_sft_stage_alone_says_whose_shape_it_trains_and_checks_replies_fit_first(tiny_sft_ckpt, tiny_data_dir,
                                                                                tmp_path, capsys):
    # --stages sft continues the pretrained checkpoint (1 layer, width 32 here): the shape flags, at
    # their defaults, do not describe it, and the run says so. A reply budget past the model's context
    # stops the run before any step, not in the final evaluation after the training.
    os.makedirs(tmp_path / "pretrain")
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(tiny_sft_ckpt)), "pretrain", "model.pt"),
                tmp_path / "pretrain" / "model.pt")
    with pytest.raises(SystemExit) as e:
        sft.main(["--stages", "sft", "--out", str(tmp_path), "--data-dir", tiny_data_dir, "--device", "cpu",
                  "--eval-problems", "4", "--max-new-tokens", "1000", "--sft-steps", "2"])
    assert e.value.code.startswith("error: --max-new-tokens 1000 does not fit: the longest prompt in ")
    assert not (tmp_path / "sft" / "log.jsonl").exists()
    out = capsys.readouterr().out
    assert ("the model's shape comes from " + str(tmp_path / "pretrain" / "model.pt") +
            " (n_layer 1, n_head 2, n_embd 32, block_size 192)") in out


def test_sft_stage_alone_cuts_rows_to_the_checkpoints_context(tiny_sft_ckpt, tiny_data_dir, tmp_path, monkeypatch):
    # --block-size shapes only the model pretraining builds: SFT on a pretrained checkpoint cuts its
    # rows to that checkpoint's context (192 here), not to the flag's 64
    os.makedirs(tmp_path / "pretrain")
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(tiny_sft_ckpt)), "pretrain", "model.pt"),
                tmp_path / "pretrain" / "model.pt")
    seen = []
    original = sft.sft_examples
    monkeypatch.setattr(sft, "sft_examples", lambda enc, path, block_size: seen.append(block_size) or
                        original(enc, path, block_size))
    sft.train(sft.SFTConfig(stages="sft", block_size=64, pretrain_seq_len=32, sft_steps=1, sft_batch_size=4,
                            eval_problems=0, out=str(tmp_path), data_dir=tiny_data_dir, device="cpu",
                            warmup_steps=1, log_every=1))
    assert seen == [192, 192]


# ----------------------------------------------------------------------------------------------
# The later stages: CoT-SFT and Preferred-FT (DPO's baseline)


def test_preferred_ft_loss_is_the_sft_loss_on_the_chosen_replies(tiny_enc, tiny_data_dir, tmp_path):
    # two hand-built pairs: the loss is the NLL of the chosen replies' tokens given their prompts, one
    # mean over all of them, and the rejected replies play no part
    rows = [{"prompt": "Ava has 3 pens. How many pens?", "chosen": "The answer is 3.", "rejected": "The answer is 4."},
            {"prompt": "Ben has 2 cups and gets 1 more. How many cups?",
             "chosen": "Step by step:\nBen starts with 2 cups.\n2 + 1 = 3.\nThe answer is 3.",
             "rejected": "Ugh. The answer is 3."}]
    P.write_jsonl(str(tmp_path / "pairs.jsonl"), rows)
    config = sft.SFTConfig(pft_data=str(tmp_path / "pairs.jsonl"), data_dir=tiny_data_dir, pft_max_pairs=0)
    train_rows, _ = sft.preferred_rows(config, tiny_enc, random.Random(0))
    model = helpers.tiny_gpt(tiny_enc.n_vocab, seed=3)
    ids, mask = M.pad_batch([r[0] for r in train_rows], [r[1] for r in train_rows], 0, "cpu")
    got = sft.lm_loss(model, ids, mask).item()
    total, n = 0.0, 0
    for row in rows:
        prompt, reply = M.render_prompt(tiny_enc, row["prompt"]), M.render_response(tiny_enc, row["chosen"])
        total += helpers.reply_logp(model, prompt, reply)
        n += len(reply)
    assert got == pytest.approx(-total / n, rel=1e-5, abs=1e-6)
    for (row_ids, row_mask), row in zip(sorted(train_rows, key=lambda r: len(r[0])), rows):  # the shorter first
        reply = M.render_response(tiny_enc, row["chosen"])
        assert row_ids[-len(reply):] == reply and row_mask == [0] * (len(row_ids) - len(reply)) + [1] * len(reply)


def test_preferred_ft_trains_with_dpos_defaults():
    import dpo
    d, s = dpo.DPOConfig(), sft.SFTConfig()
    assert sft.DPO_SCHEDULE == {"schedule": d.lr_schedule, "warmup": d.warmup_steps, "min_ratio": 0.0,
                                "weight_decay": 0.0}
    assert sft.DPO_LENGTHS == (d.max_prompt_len, d.max_length)
    assert (s.pft_batch_size, s.pft_lr, s.pft_max_pairs) == (d.batch_size, d.lr, d.max_pairs)
    assert s.pft_steps == d.steps == 0 and d.epochs == 1  # 0: one pass over the pairs, in both


def test_cot_data_holds_only_right_step_by_step_replies(tiny_data_dir, tiny_config):
    from data import world
    rows = list(formats.read_conversations(os.path.join(tiny_data_dir, "cot.jsonl")))
    assert len(rows) == tiny_config.n_cot
    for _, messages in rows:
        reply = messages[1]["content"]
        assert world.classify_style(reply) == "step", reply
        # right: every written-out step holds, and the final answer is the last step's result
        steps = re.findall(r"(\d+) ([-+x]) (\d+) = (-?\d+)", reply)
        assert steps, reply
        for a, op, b, r in steps:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op] == int(r), reply
        assert world.parse_answer(reply) == int(steps[-1][3]), reply
    assert len({m[0]["content"] for _, m in rows}) > 0.9 * len(rows)  # fresh problems, not one repeated


def test_cot_and_preferred_ft_run_from_the_sft_model_then_dpo_from_cot(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    import dpo
    out = str(tmp_path)
    metrics = sft.train(sft.SFTConfig(stages="cot,preferred-ft", init=tiny_sft_ckpt, cot_steps=6, pft_steps=3,
                                      pft_batch_size=4, sft_batch_size=4, eval_problems=4, max_new_tokens=8,
                                      eval_every=100, log_every=1, warmup_steps=1, data_dir=tiny_data_dir, out=out,
                                      device="cpu"))
    assert metrics["steps"] == 3 and metrics["init"] == tiny_sft_ckpt and metrics["eval_problems"] == 4
    for name, steps in (("cot", 6), ("preferred_ft", 3)):
        with open(os.path.join(out, name, "metrics.json")) as f:
            m = json.load(f)
        assert m["steps"] == steps and 0 <= m["accuracy"] <= 1 and math.isfinite(m["val_loss"])
        assert len(_log(out, name)) == steps
        ckpt = torch.load(os.path.join(out, name, "model.pt"), weights_only=True)
        assert ckpt["stage"] == name.replace("_", "-")
    tok = os.path.join(tiny_data_dir, "tokenizer.json")
    start = M.load_checkpoint(tiny_sft_ckpt, "cpu", tok)[0].state_dict()
    cot = M.load_checkpoint(os.path.join(out, "cot", "model.pt"), "cpu", tok)[0].state_dict()
    assert any(not torch.equal(start[k], cot[k]) for k in start)  # it trained
    # the five-stage pipeline's DPO step: from the CoT model
    d = dpo.train(dpo.DPOConfig(init=os.path.join(out, "cot", "model.pt"), steps=2, batch_size=4, eval_problems=0,
                                log_every=1, warmup_steps=1, data_dir=tiny_data_dir, out=out, device="cpu",
                                report=False))
    assert d["steps"] == 2 and os.path.exists(os.path.join(out, "dpo", "model.pt"))
