"""
Talk to the stages: each problem you type is answered by every stage's model in turn (sft, dpo,
rlvr: whichever exist under out/), labelled, token by token as it is sampled. Under each reply:
its style, the judge's score and, when the answer is known, the verifier's verdict.

    python chat.py                         (Enter alone: a random held-out problem; a number N: problem N)
    python chat.py --temperature 0         (greedy: each model's best answer)
    python chat.py --models sft=out/sft/model.pt,lora=out/dpo/adapter.pt
    python chat.py --prompt "Mia has 7 shells. She finds 4 more shells. How many shells does Mia have now?"
    python chat.py < problems.txt          (not a terminal: one problem per line)

Every model answers with the same seed and settings, so the replies differ only by the model. A
problem's answer is known when it is a held-out problem (chosen by number or at random) or when the
text you type is one of the world's problems word for word; otherwise the judge scores the style and
the length alone (its 10 points for a right answer cannot be given).
"""

import codecs
import os
import random
import sys
from dataclasses import dataclass

import torch

import lora
import model as M
import plumbing as P
from data import formats, world
from data.prepare import DATA_DIR, ensure_data
from plumbing import option

STAGES = ("sft", "dpo", "rlvr")


@dataclass
class ChatConfig:
    models: str = option("", "label=checkpoint pairs, comma-separated; a LoRA adapter file is merged into the "
                         "base it names (default: <out>/sft, dpo, rlvr, whichever exist)", "models")
    out: str = option(P.OUT_DIR, "where the stages wrote their checkpoints (default: out/ in the repository)",
                      "models")
    temperature: float = option(1.0, "sampling temperature (0: greedy)", "sampling")
    top_k: int = option(0, "sample among the k likeliest tokens only (0: all)", "sampling")
    seed: int = option(1337, "random seed: every model answers a problem with the same one", "sampling")
    max_new_tokens: int = option(96, "longest reply", "sampling")
    prompt: str = option("", "answer this one problem and exit", "run")
    data_dir: str = option(DATA_DIR, "the tokenizer and the held-out problems (built if missing)", "run")
    device: str = option("auto", "auto | cpu | cuda | mps", "run")


def model_paths(config):
    """[(label, path)]: --models as given, or the stages' checkpoints under --out that exist."""
    if not config.models:
        found = [(s, os.path.join(config.out, s, "model.pt")) for s in STAGES]
        found = [(label, path) for label, path in found if os.path.exists(path)]
        P.require(found, f"no checkpoint under {config.out}/ (sft, dpo or rlvr): build them with `python dpo.py`")
        return found
    pairs = [item.split("=", 1) for item in config.models.split(",") if item.strip()]
    P.require(pairs and all(len(p) == 2 and p[0].strip() and p[1].strip() for p in pairs),
              f"--models {config.models!r}: expected label=checkpoint pairs, comma-separated")
    labels = [label.strip() for label, _ in pairs]
    P.require(len(set(labels)) == len(labels), f"--models {config.models!r}: each label names one model")
    return [(label, P.require_file(path.strip())) for label, (_, path) in zip(labels, pairs)]


def load_model(path, device, tokenizer_path):
    """A checkpoint, or a LoRA adapter file merged into the base checkpoint it records."""
    ckpt = P.load_weights_only(path, "checkpoint or LoRA adapter file")
    if isinstance(ckpt, dict) and "lora" in ckpt:
        base = ckpt.get("base")
        if not isinstance(base, str) or not os.path.exists(base):
            raise P.DataError(f"{path}: a LoRA adapter needs its base model, and the file names none that exists "
                              f"({base!r}): merge it first, or pass the base checkpoint")
        model, _ = M.load_checkpoint(base, device, tokenizer_path)
        lora.load_lora(path, model)
        return lora.merge_lora(model).eval()
    return M.load_checkpoint(path, device, tokenizer_path)[0].eval()


def answer(model, enc, prompt, config, write):
    """Sample one reply, writing its text as each token arrives. -> the reply's text."""
    ids = M.render_prompt(enc, prompt)
    end = M.special(enc, "end")
    room = model.config.block_size - len(ids)
    P.require(room > 0, f"the prompt takes {len(ids)} tokens, the whole of the model's {model.config.block_size}")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token may end mid-character
    pieces = []

    def stream(new):  # a list of one id: this batch has one row
        if new[0] != end:
            pieces.append(decoder.decode(enc.decode_single_token_bytes(new[0])))
            write(pieces[-1])

    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(config.seed)
    M.generate(model, [ids], min(config.max_new_tokens, room), end, config.temperature, config.top_k or None,
               generator=generator, on_token=stream)
    pieces.append(decoder.decode(b"", final=True))
    write(pieces[-1])
    return "".join(pieces)


def verdict(problem, reply):
    """One line under a reply: its style, the judge's score, the verifier's verdict if it can say."""
    style = world.classify_style(reply)
    if problem.get("answer") is None:
        score = world.STYLE_RANK[style] + 1.0 / (1 + len(reply))  # the judge without its correctness term
        return f"style {style} | judge {score:.2f} (style and length; the answer is unknown)"
    right = world.verify(problem, reply)
    return (f"style {style} | judge {world.judge(problem, reply):.2f} | verifier: "
            f"{'right' if right else 'wrong'} (answer {problem['answer']})")


def pick(line, held_out, known, rng):
    """What a typed line asks for: Enter alone, a random held-out problem; a number, that held-out
    problem; any other text, itself, with its answer when it is one of the world's problems."""
    line = line.strip()
    if not line:
        i = rng.randrange(len(held_out))
        return {**held_out[i], "label": f"held-out problem {i}"}
    if line.isdecimal():
        i = int(line)
        P.require(i < len(held_out), f"there are {len(held_out)} held-out problems: pick 0 to {len(held_out) - 1}")
        return {**held_out[i], "label": f"held-out problem {i}"}
    return {"prompt": line, "answer": known.get(line), "label": "typed"}


def converse(models, enc, problem, config, write=None):
    """Every model's reply to one problem, each streamed as it is sampled. -> {label: reply}"""
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    write(f"USER: {problem['prompt']}  ({problem['label']})\n")
    width = max(len(label) for label in models) + 3
    indent = "\n" + " " * width  # a reply's later lines line up under its first

    replies = {}
    for label, model in models.items():
        write(f"[{label}]".ljust(width))
        replies[label] = answer(model, enc, problem["prompt"], config, lambda t: write(t.replace("\n", indent)))
        write(indent + verdict(problem, replies[label]) + "\n")
    write("\n")
    return replies


def chat(config, lines=None):
    """Answer config.prompt, or each of `lines` (stdin when not a terminal), or talk at the
    terminal until EOF or Ctrl-C. -> the list of {label: reply}, one per problem."""
    P.check_flags(config, positive=("max_new_tokens",), non_negative=("temperature", "top_k"))
    device = P.pick_device(config.device)
    paths = model_paths(config)
    ensure_data(config.data_dir)
    tokenizer_path = os.path.join(config.data_dir, "tokenizer.json")
    enc = M.load_tokenizer(tokenizer_path)
    models = {label: load_model(path, device, tokenizer_path) for label, path in paths}
    held_out = formats.read_problems(os.path.join(config.data_dir, "test.jsonl"))
    known = {p["prompt"]: p["answer"] for name in ("rl.jsonl", "test.jsonl")
             for p in formats.read_problems(os.path.join(config.data_dir, name))}
    rng = random.Random(config.seed)
    if config.prompt:
        return [converse(models, enc, pick(config.prompt, held_out, known, rng), config)]
    if lines is None and not sys.stdin.isatty():
        lines = sys.stdin
    if lines is not None:  # one problem a line; a line that cannot be answered is said, and the rest go on
        done = []
        for line in (line for line in lines if line.strip()):
            try:
                done.append(converse(models, enc, pick(line, held_out, known, rng), config))
            except P.ConfigError as e:
                print(f"error: {e}")
        return done
    print(f"chat: {', '.join(f'{label} ({path})' for label, path in paths)} | T={config.temperature:g}")
    print("Type a problem, a number N for held-out problem N, or Enter for a random one; Ctrl-D ends.")
    done = []
    try:
        while True:
            line = input("you> ")
            try:
                done.append(converse(models, enc, pick(line, held_out, known, rng), config))
            except P.ConfigError as e:  # a number out of range, a prompt too long: say so, and go on
                print(f"error: {e}")
    except (EOFError, KeyboardInterrupt):
        print()
    return done


def main(argv=None):
    P.run_cli(__doc__, ChatConfig, chat, argv, show_config=False)


if __name__ == "__main__":
    main()
