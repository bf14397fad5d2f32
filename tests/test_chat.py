"""chat.py: the stages answer typed problems side by side, streamed token by token; driven here
through --prompt and through lines as stdin gives them, with the tiny SFT checkpoint."""

import os

import pytest
import torch

import chat
import lora
import model as M
import plumbing as P
from data import formats, world


def config(tiny_data_dir, models, **kw):
    return chat.ChatConfig(models=models, data_dir=tiny_data_dir, device="cpu", max_new_tokens=24, **kw)


def test_a_streamed_reply_is_the_sampler_reply_with_the_same_seed(tiny_sft_ckpt, tiny_data_dir, tiny_enc):
    # the text written token by token is the reply sample_replies draws with the same seed and settings
    model = chat.load_model(tiny_sft_ckpt, "cpu", os.path.join(tiny_data_dir, "tokenizer.json"))
    prompt = "Ben has 3 cards. He gets 2 more cards. How many cards does Ben have now?"
    for temperature in (1.0, 0.0):
        c = config(tiny_data_dir, "", temperature=temperature, seed=7)
        pieces = []
        text = chat.answer(model, tiny_enc, prompt, c, pieces.append)
        assert "".join(pieces) == text
        assert text == M.sample_replies(model, tiny_enc, [prompt], 24, temperature, seed=7)[0]


def test_prompt_answers_once_with_every_model_labelled(tiny_sft_ckpt, tiny_data_dir, capsys):
    held_out = formats.read_problems(os.path.join(tiny_data_dir, "test.jsonl"))
    replies = chat.chat(config(tiny_data_dir, f"a={tiny_sft_ckpt},b={tiny_sft_ckpt}", prompt="1"))
    out = capsys.readouterr().out
    assert len(replies) == 1 and set(replies[0]) == {"a", "b"}
    assert replies[0]["a"] == replies[0]["b"]  # the same model, the same seed: the same reply
    assert f"\nUSER: {held_out[1]['prompt']}  (held-out problem 1)\n[a] " in out
    right = "right" if world.verify(held_out[1], replies[0]["a"]) else "wrong"
    expected = (f"style {world.classify_style(replies[0]['a'])} | judge "
                f"{world.judge(held_out[1], replies[0]['a']):.2f} | verifier: {right} (answer {held_out[1]['answer']})")
    assert out.count(expected) == 2


def test_lines_are_answered_one_problem_each(tiny_sft_ckpt, tiny_data_dir, capsys):
    # as stdin gives them: a number, a blank line (skipped), a number out of range (said, and the
    # rest go on), a problem of the world typed out (its answer is known), and free text (it is not)
    rl = formats.read_problems(os.path.join(tiny_data_dir, "rl.jsonl"))
    lines = ["2\n", "\n", "100000\n", rl[0]["prompt"] + "\n", "What is this?\n", "\u00b2\n"]
    replies = chat.chat(config(tiny_data_dir, f"sft={tiny_sft_ckpt}"), lines=lines)
    out = capsys.readouterr().out
    assert len(replies) == 4 and out.count("USER: ") == 4  # "²" is no number: typed text
    assert "(held-out problem 2)" in out and out.count("(held-out problem ") == 1
    assert "error: there are " in out and "pick 0 to" in out
    assert f"(answer {rl[0]['answer']})" in out.split("USER: ")[2]
    assert "the answer is unknown" in out.split("USER: ")[3]


def test_the_stages_under_out_are_found_and_a_missing_one_is_said_in_one_line(tiny_sft_ckpt, tiny_data_dir,
                                                                               tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        chat.main(["--out", str(out), "--data-dir", tiny_data_dir, "--prompt", "hi"])
    assert e.value.code == f"error: no checkpoint under {out}/ (sft, dpo or rlvr): build them with `python dpo.py`"
    for stage in ("sft", "rlvr"):  # no dpo: the others are still found, in pipeline order
        os.makedirs(out / stage)
        (out / stage / "model.pt").write_bytes(open(tiny_sft_ckpt, "rb").read())
    assert chat.model_paths(chat.ChatConfig(out=str(out))) == [
        ("sft", str(out / "sft" / "model.pt")), ("rlvr", str(out / "rlvr" / "model.pt"))]


def test_bad_models_and_files_stop_in_one_line(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    for spec in ("sft", "=x.pt", "a=,b=c"):
        with pytest.raises(P.ConfigError, match="expected label=checkpoint pairs"):
            chat.model_paths(chat.ChatConfig(models=spec))
    with pytest.raises(P.ConfigError, match="each label names one model"):
        chat.model_paths(chat.ChatConfig(models=f"a={tiny_sft_ckpt},a={tiny_sft_ckpt}"))
    with pytest.raises(P.DataError, match="no such checkpoint"):
        chat.model_paths(chat.ChatConfig(models=f"x={tmp_path / 'none.pt'}"))
    text = tmp_path / "text.pt"
    text.write_text("not a model")
    with pytest.raises(P.DataError, match="not a checkpoint or LoRA adapter file"):
        chat.load_model(str(text), "cpu", None)
    with pytest.raises(P.ConfigError, match="pick 0 to"):
        chat.chat(config(tiny_data_dir, f"sft={tiny_sft_ckpt}", prompt="100000"))


def test_a_lora_adapter_is_merged_into_the_base_it_names(tiny_sft_ckpt, tiny_data_dir, tmp_path):
    tok = os.path.join(tiny_data_dir, "tokenizer.json")
    adapted, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", tok)
    lora.add_lora(adapted, rank=2, alpha=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(adapted).values():
            layer.lora_B.normal_(0, 0.1)  # a trained-looking adapter: B is no longer 0
    path = str(tmp_path / "adapter.pt")
    lora.save_lora(path, adapted, base=tiny_sft_ckpt)
    merged = chat.load_model(path, "cpu", tok)
    x = torch.randint(0, adapted.config.vocab_size, (2, 12))
    expected = lora.merge_lora(adapted).eval()(x)
    assert torch.allclose(merged(x), expected, rtol=1e-4, atol=1e-5)  # the same merge, the same weights
    orphan, _ = M.load_checkpoint(tiny_sft_ckpt, "cpu", tok)
    lora.add_lora(orphan, rank=2, alpha=4)
    lora.save_lora(str(tmp_path / "orphan.pt"), orphan)  # no base recorded
    with pytest.raises(P.DataError, match="a LoRA adapter needs its base model"):
        chat.load_model(str(tmp_path / "orphan.pt"), "cpu", tok)


def test_the_command_line_reads_one_problem_per_line_from_a_pipe(tiny_sft_ckpt, tiny_data_dir):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "chat.py"), "--models", f"sft={tiny_sft_ckpt}",
                          "--data-dir", tiny_data_dir, "--max-new-tokens", "6", "--device", "cpu"],
                         input="0\n1\n", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("USER: ") == 2 and "(held-out problem 1)" in run.stdout
    assert "you> " not in run.stdout  # no prompt when stdin is not a terminal
