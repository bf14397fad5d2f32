"""logratios.py: the per-token log-ratio view. Its numbers are the method's (they sum to the
sequence log-ratio dpo.sequence_logprobs gives, and beta times that is the implicit reward), and its
HTML page holds one token element per response token with those values."""

import html.parser
import os

import pytest
import torch

import dpo
import logratios
import model as M
import plumbing as P
from helpers import reply_logp, tiny_gpt


@pytest.fixture
def models(tiny_enc):
    return tiny_gpt(tiny_enc.n_vocab, seed=1, std=0.3), tiny_gpt(tiny_enc.n_vocab, seed=2, std=0.3)


def items(enc):
    return [{"prompt": "Ben has 3 cards. He gets 2 more. How many cards?", "title": "one",
             "replies": [("chosen", M.render_response(enc, "Step by step:\n3 + 2 = 5.\nThe answer is 5.")),
                         ("rejected", M.render_response(enc, "Ugh. The answer is 6."))]},
            {"prompt": "Ana has 7 pens.", "replies": [("chosen", M.render_response(enc, "7")),
                                                       ("rejected", M.render_response(enc, "The answer is 9."))]}]


def test_the_per_token_values_sum_to_the_sequence_log_ratio_and_the_reward(tiny_enc, models):
    policy, reference = models
    shown = logratios.view(tiny_enc, policy, reference, items(tiny_enc), beta=0.5)
    for it in shown:
        prompt = M.render_prompt(tiny_enc, it["prompt"])
        for r, (_, ids) in zip(it["replies"], next(x for x in items(tiny_enc) if x["prompt"] == it["prompt"])["replies"]):
            assert len(r["tokens"]) == len(r["logratios"]) == len(ids)  # every response token, <|end|> too
            batch, mask = M.prompt_response_batch([prompt], [ids], 0)
            seq = (dpo.sequence_logprobs(policy, batch, mask) - dpo.sequence_logprobs(reference, batch, mask)).item()
            assert r["sum"] == pytest.approx(seq, rel=1e-5, abs=1e-4)
            # and against the plain float64 loop, one model at a time
            brute = reply_logp(policy, prompt, ids) - reply_logp(reference, prompt, ids)
            assert r["sum"] == pytest.approx(brute, rel=1e-4, abs=1e-4)
            reward = dpo.implicit_reward(torch.tensor(r["sum"]), torch.tensor(0.0), beta=0.5).item()
            assert r["reward"] == pytest.approx(reward, rel=1e-6)


class Checker(html.parser.HTMLParser):
    """Well-formedness (every tag closed, in order) and the token spans with their values."""
    VOID = {"meta", "br"}

    def __init__(self):
        super().__init__()
        self.stack, self.replies, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "p" and attrs.get("class") == "reply":
            self.replies.append([])
        if tag == "span" and attrs.get("class") == "tok":
            self.replies[-1].append(float(attrs["data-logratio"]))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_the_page_is_well_formed_with_one_element_per_token_holding_its_value(tiny_enc, models):
    shown = logratios.view(tiny_enc, *models, items(tiny_enc), beta=1.0)
    text = logratios.page(shown, "a <title> & more")
    checker = Checker()
    checker.feed(text)
    assert checker.errors == [] and checker.stack == []
    expected = [r["logratios"] for it in shown for r in it["replies"]]
    assert [len(r) for r in checker.replies] == [len(r) for r in expected] and len(expected) == 4
    for got, want in zip(checker.replies, expected):
        assert got == pytest.approx(want, abs=1e-6)  # written to 6 decimals
    assert "http" not in text and "<script" not in text and "<link" not in text  # nothing loaded from anywhere
    assert "a &lt;title&gt; &amp; more" in text


def test_the_terminal_view_is_coloured_or_plain_with_the_numbers(tiny_enc, models):
    shown = logratios.view(tiny_enc, *models, items(tiny_enc)[:1], beta=1.0)
    plain = logratios.terminal(shown, color=False)
    assert "\x1b[" not in plain and f"({shown[0]['replies'][0]['logratios'][0]:+.2f})" in plain
    assert "margin r_w - r_l = " in plain
    colored = logratios.terminal(shown, color=True)
    assert colored.count("\x1b[48;2;") >= len(shown[0]["replies"][0]["tokens"])


def test_the_colour_grows_with_the_value_and_keeps_its_sign():
    assert logratios.rgb(0.0, 1.0) == (255, 255, 255)
    assert logratios.rgb(1.0, 1.0) == (0, 255, 0) and logratios.rgb(-1.0, 1.0) == (255, 0, 0)
    assert logratios.rgb(0.5, 1.0) == (128, 255, 128) and logratios.rgb(-5.0, 1.0) == (255, 0, 0)


def test_most_moved_averages_each_token_over_its_occurrences():
    shown = [{"replies": [{"tokens": ["a", "b", "a", "c"], "logratios": [1.0, -2.0, 3.0, 9.0]},
                          {"tokens": ["b", "c"], "logratios": [-4.0, -1.0]}]}]
    up, down = logratios.most_moved(shown, n=1)
    assert up == [("c", 4.0, 2)] and down == [("b", -3.0, 2)]


def test_the_command_line_writes_the_page(tiny_sft_ckpt, tiny_data_dir, tmp_path, capsys):
    path = str(tmp_path / "view.html")
    shown = logratios.run(logratios.LogratioConfig(policy=tiny_sft_ckpt, reference=tiny_sft_ckpt, first=2,
                                                   data_dir=tiny_data_dir, html=path, device="cpu"))
    assert len(shown) == 2 and os.path.exists(path)
    assert f"logratios: {path}" in capsys.readouterr().out
    # the policy against itself: every token's log-ratio is exactly 0 (the same ops on the same inputs)
    assert all(v == 0.0 for it in shown for r in it["replies"] for v in r["logratios"])
    sampled = logratios.run(logratios.LogratioConfig(policy=tiny_sft_ckpt, reference=tiny_sft_ckpt, sample=2,
                                                     data_dir=tiny_data_dir, html=path, device="cpu"))
    assert [it["replies"][0]["label"] for it in sampled] == ["sample", "sample"]
    with pytest.raises(P.ConfigError, match="--prompt needs --chosen and --rejected"):
        logratios.run(logratios.LogratioConfig(policy=tiny_sft_ckpt, reference=tiny_sft_ckpt, prompt="hi",
                                               data_dir=tiny_data_dir, html=path, device="cpu"))
    with pytest.raises(P.DataError, match="no such checkpoint"):
        logratios.run(logratios.LogratioConfig(policy=str(tmp_path / "none.pt"), data_dir=tiny_data_dir))


def test_flags_that_say_what_to_show_are_checked_before_any_model_is_loaded(tmp_path):
    missing = str(tmp_path / "none.pt")  # the checks come first: no DataError for the missing files
    for flags, message in ((dict(chosen="a"), "--chosen and --rejected go with --prompt"),
                           (dict(prompt="p", chosen="a", rejected="b", sample=2), "not with --sample"),
                           (dict(prompt="p"), "--prompt needs --chosen and --rejected")):
        with pytest.raises(P.ConfigError, match=message):
            logratios.run(logratios.LogratioConfig(policy=missing, reference=missing, **flags))


def test_a_conversation_is_shown_as_text_and_a_reply_too_long_is_refused(tiny_sft_ckpt, tiny_data_dir, tiny_enc,
                                                                         models, tmp_path):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ana has 7 pens."}]
    item = {"prompt": conversation, "replies": [("chosen", M.render_response(tiny_enc, "7"))]}
    shown = logratios.view(tiny_enc, *models, [item], beta=1.0)
    assert "USER: system: Be brief.\nuser: Ana has 7 pens." in logratios.terminal(shown, color=False)
    assert "user: Ana has 7 pens." in logratios.page(shown, "t")
    assert not logratios.fits(tiny_enc, {"prompt": "x " * 300, "replies": [("r", [1])]}, 192)
    with pytest.raises(P.ConfigError, match="runs past the models' context of 192 tokens"):
        logratios.run(logratios.LogratioConfig(policy=tiny_sft_ckpt, reference=tiny_sft_ckpt, prompt="x " * 300,
                                               chosen="a", rejected="b", data_dir=tiny_data_dir,
                                               html=str(tmp_path / "p.html"), device="cpu"))
    with pytest.raises(P.ConfigError, match="--pair 100000: there are"):
        logratios.run(logratios.LogratioConfig(policy=tiny_sft_ckpt, reference=tiny_sft_ckpt, sample=2, pair=100000,
                                               data_dir=tiny_data_dir, html=str(tmp_path / "p.html"), device="cpu"))
