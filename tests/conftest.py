"""Shared fixtures: the repo root on sys.path, and one tiny generated data directory per session.

The real data in data/ is never touched: tests that need generated files build their own small
copy (well under a second) into a pytest temporary directory, once per session.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from data.prepare import PrepareConfig, prepare  # noqa: E402

import model as M  # noqa: E402
import pairs  # noqa: E402
from data import formats  # noqa: E402

# One thread: the models here are tiny, so a second thread buys nothing on an idle machine, while
# on a busy one (a training run beside the tests) two threads contending for two cores made the
# end-to-end run six times slower (measured: 36 s against 6 s).
torch.set_num_threads(1)

# Small enough to build in about a second, large enough that every file has rows and the BPE
# trainer learns a few hundred merges. pretrain_mb 0.1 rather than 0.05: pretrain_val.txt is 1/50
# of it, and at 0.05 it held barely one validation batch of the end-to-end test (8 x 32 tokens).
TINY = dict(pretrain_mb=0.1, n_sft=300, n_prefs=200, n_test=60, n_prefs_test=50, n_sft_val=30, n_cot=100,
            n_rl=50)


@pytest.fixture(scope="session")
def tiny_config():
    """The PrepareConfig the tiny data directory is built with (a fresh object per call site is
    not needed: PrepareConfig is only read)."""
    return PrepareConfig(**TINY)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, tiny_config):
    """A data directory built by data.prepare with the tiny config. Treat it as read-only: tests
    that rebuild or modify data work in their own tmp_path."""
    out = tmp_path_factory.mktemp("tiny_data")
    prepare(tiny_config, out_dir=str(out), verbose=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny_enc(tiny_data_dir):
    """The tokenizer trained on the tiny data, loaded the way every stage loads it."""
    return M.load_tokenizer(os.path.join(tiny_data_dir, "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_sft_ckpt(tiny_data_dir, tmp_path_factory):
    """A tiny SFT checkpoint (1 layer, width 32, 20 pretraining + 20 SFT steps on the tiny data):
    the start of every DPO and RL run in the tests. Built once per session, in a few seconds."""
    import sft
    out = str(tmp_path_factory.mktemp("tiny_sft"))
    sft.train(sft.SFTConfig(n_layer=1, n_head=2, n_embd=32, pretrain_steps=20, sft_steps=20,
                            pretrain_batch_size=8, pretrain_seq_len=32, sft_batch_size=8,
                            eval_problems=0, eval_every=100, data_dir=tiny_data_dir, out=out,
                            device="cpu", warmup_steps=5, log_every=5))
    return os.path.join(out, "sft", "model.pt")


@pytest.fixture(autouse=True)
def no_report_card(request, monkeypatch):
    """Every stage refreshes out/report.md and report.html at its end (a second or more each); the
    suite runs many tiny stages, so only tests/test_report.py lets them write it, and tests it."""
    if request.module.__name__ != "test_report":
        import report
        monkeypatch.setattr(report, "refresh", lambda out, data_dir: None)


@pytest.fixture(scope="session")
def tiny_pairs(tiny_data_dir):
    return formats.read_pairs(os.path.join(tiny_data_dir, "prefs.jsonl"))


@pytest.fixture(scope="session")
def tiny_examples(tiny_enc, tiny_pairs):
    """The tiny training pairs tokenised with dpo.py's defaults (96 prompt tokens, 192 in all)."""
    examples, counts = pairs.tokenize_pairs(tiny_enc, tiny_pairs, 96, 192)
    return examples, counts
