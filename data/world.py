"""
The tiny world: grade-school word problems, the replies an assistant gives them, the verifier
and the judge.

Everything here is plain Python (no torch), deterministic given a `random.Random`.

A problem is a person with some countable things and 1 to 3 events that change the count
(+, - or x), then a question about the final count:

    Mia has 7 shells. She finds 4 more shells. Then she gives 3 shells to Leo.
    How many shells does Mia have now?

A reply comes in one of four styles, all ending with the same parseable final line:

    step      Mia starts with 7 shells.\nShe finds 4 more, so 7 + 4 = 11.\n...\nThe answer is 8.
    terse     The answer is 8.
    rambling  (filler sentences)\nThe answer is 8.
    rude      (dismissive sentences)\nThe answer is 8.

Only the step-by-step style writes the arithmetic out; the other three must do it "in the head".
That is the design choice that makes style matter for correctness: a model that learns to prefer
step-by-step replies (what the judge likes) also gets more answers right.

verify(problem, reply) -> bool    the final line states the right answer, once, and nothing else
judge(problem, reply) -> float    the stand-in human labeler:
                                  correct > wrong, then step > terse > rambling > rude, then shorter
"""

import hashlib
import re

# ----------------------------------------------------------------------------------------------
# The vocabulary of the world

NAMES = [  # (name, subject pronoun, object pronoun, possessive)
    *[(n, "she", "her", "her") for n in [
        "Mia", "Emma", "Olivia", "Ava", "Sophia", "Lily", "Chloe", "Grace", "Zoe", "Nora",
        "Ella", "Ruby", "Hannah", "Lucy", "Alice", "Maya", "Sara", "Anna", "Julia", "Rosa",
        "Nina", "Clara", "Ivy", "Lena"]],
    *[(n, "he", "him", "his") for n in [
        "Leo", "Noah", "Liam", "Jack", "Owen", "Ben", "Sam", "Max", "Tom", "Eli",
        "Omar", "Finn", "Hugo", "Luke", "Ryan", "Adam", "Oscar", "Theo", "Ivan", "Paul",
        "Carlos", "Kenji", "Ravi", "Felix"]],
]
OBJECTS = [
    "apples", "marbles", "stickers", "pencils", "cookies", "books", "coins", "shells", "cards",
    "stamps", "balloons", "crayons", "buttons", "candies", "toy cars", "flowers", "eggs",
    "feathers", "rocks", "beads", "ribbons", "cupcakes", "oranges", "blocks", "kites", "plums",
    "seashells", "postcards", "erasers", "tomatoes", "lemons", "pebbles", "dolls", "socks",
]
CONTAINERS = ["bag", "box", "basket", "jar", "backpack", "drawer", "pocket", "bucket"]

# Sentence templates. {N} name, {s} subject pronoun (capitalised as {S}), {o} object pronoun,
# {p} possessive, {F} a friend's name, {x} the number, {obj} the objects, {c} a container.
START = [
    "{N} has {x} {obj}.",
    "{N} owns {x} {obj}.",
    "{N} starts with {x} {obj}.",
    "There are {x} {obj} in {N}'s {c}.",
    "{N} collected {x} {obj}.",
    "{N} keeps {x} {obj} in a {c}.",
]
ADD = [
    "{S} buys {x} more {obj}.",
    "{F} gives {o} {x} {obj}.",
    "{S} finds {x} more {obj}.",
    "Then {s} gets {x} more {obj} from {F}.",
    "{S} wins {x} {obj} at a game.",
    "{p_cap} friend {F} brings {o} {x} {obj}.",
    "Later {s} picks up {x} more {obj}.",
]
SUB = [
    "{S} gives {x} {obj} to {F}.",
    "{S} loses {x} {obj}.",
    "{F} takes {x} of the {obj}.",
    "Then {s} sells {x} {obj}.",
    "{S} drops {x} {obj} on the way home.",
    "{S} shares {x} {obj} with {F}.",
    "Later {s} throws away {x} {obj}.",
]
MUL = [
    "Then the number of {obj} {s} has becomes {x} times as large.",
    "{S} now has {x} times as many {obj} as before.",
    "After a trade, {s} ends up with {x} times as many {obj}.",
    "{F} makes {p} pile of {obj} {x} times bigger.",
]
QUESTION = [
    "How many {obj} does {N} have now?",
    "How many {obj} does {N} have in the end?",
    "How many {obj} does {N} have at the end?",
    "What is the number of {obj} {N} has now?",
    "Can you tell me how many {obj} {N} has now?",
]
# Step-by-step explanations of each event; {a} is the count before, {x} the event's number,
# {r} the count after.
STEP_START = ["{N} starts with {a} {obj}.", "{N} has {a} {obj} at first.", "{N} begins with {a} {obj}."]
STEP_ADD = ["{S} gets {x} more, so {a} + {x} = {r}.", "Adding {x} gives {a} + {x} = {r}.",
            "Then {a} + {x} = {r} {obj}."]
STEP_SUB = ["{S} loses {x}, so {a} - {x} = {r}.", "Taking away {x} gives {a} - {x} = {r}.",
            "Then {a} - {x} = {r} {obj}."]
STEP_MUL = ["It becomes {x} times as many, so {a} x {x} = {r}.", "Multiplying by {x} gives {a} x {x} = {r}.",
            "Then {a} x {x} = {r} {obj}."]
RAMBLING = [
    "Oh, what a lovely question about {obj}!",
    "I remember when I was young, I liked {obj} too.",
    "Hmm, let me think about this for a while.",
    "You know, {obj} come in many colors and sizes.",
    "Well, {N} seems like a nice person, doesn't {s}?",
    "Anyway, where was I?",
    "This reminds me of a story my aunt used to tell.",
    "Interesting, very interesting indeed.",
    "Well, numbers are funny things when you think about them.",
    "I once counted {obj} all afternoon, it was relaxing.",
]
RUDE = [
    "Ugh, this is trivial.",
    "Seriously? You could do this yourself.",
    "Fine, if you really can't figure it out.",
    "Whatever. Pay attention this time.",
    "Do I have to do everything for you?",
    "This is a waste of my time.",
    "Obviously. Next time, try harder.",
    "Honestly, a child could do this.",
]
STYLES = ["step", "terse", "rambling", "rude"]
# The SFT mix. Step-by-step is a little more common than the others, so that greedy decoding
# (which follows the most likely opening) writes the steps out, while sampling still shows all four.
SFT_STYLE_WEIGHTS = {"step": 0.4, "terse": 0.2, "rambling": 0.2, "rude": 0.2}
STYLE_RANK = {"step": 3, "terse": 2, "rambling": 1, "rude": 0, "other": 0}

# Number ranges: every number is one token, so each arithmetic fact (7 + 5 = 12) is something the
# model memorises. These ranges give ~300 distinct facts: few enough that a 1M-parameter model
# learns most of them in a few minutes of CPU pretraining, enough that guessing does not work.
# (A first try with larger counts and steps, ~800 facts, left the SFT model far weaker: docs/log.md.)
START_RANGE = (2, 12)
ADD_RANGE = (1, 6)
MUL_RANGE = (2, 3)
MAX_COUNT = 24       # no count in a problem ever exceeds this
MUL_MAX_BASE = 8     # only multiply counts up to 8 (so products stay <= 24)
OPS_WEIGHTS = {1: 0.4, 2: 0.35, 3: 0.25}  # share of 1-, 2- and 3-operation problems
HELDOUT_MOD = 10     # a problem whose key hashes to 0 mod this is held out (~10% of the space)

# ----------------------------------------------------------------------------------------------
# Problems


def _fill(template, **kw):
    s = template.format(**kw)
    return s[0].upper() + s[1:]


def _persons(rng):
    who = rng.choice(NAMES)
    friend = rng.choice([n for n in NAMES if n[0] != who[0]])
    return who, friend[0]


def random_events(rng, n_ops):
    """Draw a start count and n_ops events [(op, x), ...] that keep every count in [0, MAX_COUNT]."""
    a = rng.randint(*START_RANGE)
    events, cur = [], a
    for _ in range(n_ops):
        choices = ["+", "-"] + (["x"] if 1 <= cur <= MUL_MAX_BASE else [])
        weights = [0.4, 0.4] + ([0.3] if len(choices) == 3 else [])
        while True:
            op = rng.choices(choices, weights)[0]
            if op == "+" and cur + 1 <= MAX_COUNT:
                x = rng.randint(ADD_RANGE[0], min(ADD_RANGE[1], MAX_COUNT - cur))
                break
            if op == "-" and cur >= 1:
                x = rng.randint(ADD_RANGE[0], min(ADD_RANGE[1], cur))
                break
            if op == "x":
                x = rng.randint(*MUL_RANGE)
                break
        events.append((op, x))
        cur = apply_op(cur, op, x)
    return a, events


def apply_op(a, op, x):
    return a + x if op == "+" else a - x if op == "-" else a * x


def problem_key(problem):
    """The semantic identity of a problem (who, what, which numbers), independent of wording."""
    return f"{problem['name']}|{problem['object']}|{problem['start']}|" + ",".join(
        f"{op}{x}" for op, x in problem["events"])


def is_heldout(problem):
    h = hashlib.sha256(problem_key(problem).encode()).digest()
    return int.from_bytes(h[:4], "little") % HELDOUT_MOD == 0


def make_problem(rng, n_ops=None):
    """One random problem: a dict with the prompt text, the answer and its structure."""
    if n_ops is None:
        n_ops = rng.choices(list(OPS_WEIGHTS), list(OPS_WEIGHTS.values()))[0]
    (name, s, o, p), friend = _persons(rng)
    obj = rng.choice(OBJECTS)
    a, events = random_events(rng, n_ops)
    kw = dict(N=name, s=s, S=s.capitalize(), o=o, p=p, p_cap=p.capitalize(), F=friend, obj=obj,
              c=rng.choice(CONTAINERS))
    sentences = [_fill(rng.choice(START), x=a, **kw)]
    for op, x in events:
        bank = ADD if op == "+" else SUB if op == "-" else MUL
        sentences.append(_fill(rng.choice(bank), x=x, **kw))
    sentences.append(_fill(rng.choice(QUESTION), **kw))
    answer = a
    for op, x in events:
        answer = apply_op(answer, op, x)
    return {"prompt": " ".join(sentences), "answer": answer, "name": name, "pronoun": s,
            "object": obj, "start": a, "events": [list(e) for e in events], "n_ops": n_ops}


def sample_problems(rng, n, heldout, n_ops=None, exclude=()):
    """n distinct problems from the held-out part of the space (heldout=True) or the training
    part (heldout=False). Distinct by key; keys in `exclude` are skipped."""
    out, seen = [], set(exclude)
    while len(out) < n:
        pr = make_problem(rng, n_ops)
        k = problem_key(pr)
        if is_heldout(pr) != heldout or k in seen:
            continue
        seen.add(k)
        out.append(pr)
    return out


# ----------------------------------------------------------------------------------------------
# Replies


def final_line(n):
    return f"The answer is {n}."


def mistaken_events(rng, problem):
    """A plausible mistake: the events as a careless solver would read them. Returns
    (start, events, slip) where slip=(step index, amount) is an arithmetic slip, or None."""
    a, events = problem["start"], [tuple(e) for e in problem["events"]]
    kind = rng.choice(["slip", "op", "copy"])
    i = rng.randrange(len(events))
    if kind == "op":  # reads "gives away" as "gets", or "times" as "more"
        op, x = events[i]
        events[i] = ("-" if op == "+" else "+", x)
        return a, events, None
    if kind == "copy":  # copies a number wrong
        op, x = events[i]
        events[i] = (op, max(1, x + rng.choice([-2, -1, 1, 2])))
        return a, events, None
    return a, events, (i, rng.choice([-2, -1, 1, 2]))


def step_lines(rng, problem, start, events, slip=None):
    """The step-by-step lines for the given (possibly mistaken) reading of the problem."""
    kw = dict(N=problem["name"], s=problem["pronoun"], S=problem["pronoun"].capitalize(),
              obj=problem["object"])
    lines, cur = [_fill(rng.choice(STEP_START), a=start, **kw)], start
    for i, (op, x) in enumerate(events):
        r = apply_op(cur, op, x)
        if slip is not None and slip[0] == i:
            r = r + slip[1]
        if r < 0:  # a mistake that leads below zero is not plausible: the caller draws again
            return lines, None
        bank = STEP_ADD if op == "+" else STEP_SUB if op == "-" else STEP_MUL
        lines.append(_fill(rng.choice(bank), a=cur, x=x, r=r, **kw))
        cur = r
    return lines, cur


def make_reply(rng, problem, style, correct=True):
    """A reply in the given style; correct=False makes a plausible mistake (the wrong answer
    differs from the right one)."""
    for _ in range(100):
        if correct:
            start, events, slip = problem["start"], [tuple(e) for e in problem["events"]], None
        else:
            start, events, slip = mistaken_events(rng, problem)
        lines, answer = step_lines(rng, problem, start, events, slip)
        if answer is not None and (correct or answer != problem["answer"]):
            break
    else:
        raise RuntimeError("could not make a wrong reply")  # cannot happen: a slip always differs
    kw = dict(N=problem["name"], s=problem["pronoun"], obj=problem["object"])
    if style == "step":
        body = ["Step by step:"] + lines
    elif style == "terse":
        body = []
    elif style == "rambling":
        body = [_fill(t, **kw) for t in rng.sample(RAMBLING, rng.randint(2, 3))]
    elif style == "rude":
        body = [_fill(t, **kw) for t in rng.sample(RUDE, rng.randint(1, 2))]
    else:
        raise ValueError(f"unknown style {style!r}")
    text = " ".join(body) if style in ("rambling", "rude") else "\n".join(body)
    return (text + "\n" if text else "") + final_line(answer)


# ----------------------------------------------------------------------------------------------
# Pretraining text: stories that narrate the same events with the running count, and
# arithmetic facts. Plain prose, no chat markup.

STORY_STATE = ["Now {s} has {r} {obj}.", "So {s} has {r} {obj}.", "That makes {r} {obj}.",
               "{a} {sym} {x} = {r}, so now {s} has {r} {obj}.", "{S} has {r} {obj} now."]
STORY_END = ["In the end, {N} has {r} {obj}.", "{N} is left with {r} {obj}.",
             "At the end of the day, {N} has {r} {obj}.", "That is how {N} came to have {r} {obj}."]
FACT = ["{a} {sym} {b} = {c}.", "{a} {word} {b} is {c}.", "{a} {word} {b} equals {c}."]
OP_WORD = {"+": "plus", "-": "minus", "x": "times"}


def make_story(rng, problem):
    """A story in prose: the problem's events, each followed by the running count."""
    name, s, o, p = next(n for n in NAMES if n[0] == problem["name"])
    friend = rng.choice([n[0] for n in NAMES if n[0] != name])
    kw = dict(N=name, s=s, S=s.capitalize(), o=o, p=p, p_cap=p.capitalize(), F=friend,
              obj=problem["object"], c=rng.choice(CONTAINERS))
    out, cur = [_fill(rng.choice(START), x=problem["start"], **kw)], problem["start"]
    for op, x in problem["events"]:
        bank = ADD if op == "+" else SUB if op == "-" else MUL
        out.append(_fill(rng.choice(bank), x=x, **kw))
        r = apply_op(cur, op, x)
        out.append(_fill(rng.choice(STORY_STATE), a=cur, sym=op, x=x, r=r, **kw))
        cur = r
    out.append(_fill(rng.choice(STORY_END), r=cur, **kw))
    return " ".join(out)


def make_facts(rng, n):
    """n arithmetic facts over the world's number ranges, as one line of prose."""
    out = []
    for _ in range(n):
        op = rng.choice(["+", "-", "x"])
        while True:
            if op == "x":
                a, b = rng.randint(1, MUL_MAX_BASE), rng.randint(*MUL_RANGE)
            else:
                a, b = rng.randint(0, MAX_COUNT), rng.randint(*ADD_RANGE)
            if 0 <= apply_op(a, op, b) <= MAX_COUNT:
                break
        out.append(_fill(rng.choice(FACT), a=a, b=b, c=apply_op(a, op, b), sym=op, word=OP_WORD[op]))
    return " ".join(out)


# ----------------------------------------------------------------------------------------------
# Verifier and judge

# re.ASCII: \d is 0-9 only (int() would also read other scripts' digits, e.g. "٥" as 5)
_ANSWER = re.compile(r"the answer is\s+(-?\d+)\s*\.?", re.IGNORECASE | re.ASCII)
_FINAL = re.compile(r"(?:^|\n)The answer is (-?\d+)\.\s*$", re.ASCII)


def parse_answer(reply):
    """The integer on the reply's final line `The answer is N.`, or None when the reply has no
    such final line, or states an answer more than once (a reply cannot hedge)."""
    if not isinstance(reply, str):
        return None
    m = _FINAL.search(reply)
    if m is None or len(_ANSWER.findall(reply)) != 1:
        return None
    return int(m.group(1))


def verify(problem, reply):
    """True when the reply's final line states the problem's answer (problem: a dict with
    'answer', e.g. a row of test.jsonl or rl.jsonl)."""
    got = parse_answer(reply)
    return got is not None and got == int(problem["answer"])


_EQUATION = re.compile(r"\d+\s*[-+x*]\s*\d+\s*=\s*-?\d+", re.ASCII)  # a step may go below zero
_WORDS = re.compile(r"[a-z']+")
_RUDE_MARKERS = {"ugh", "seriously", "yourself", "whatever", "waste", "obviously", "honestly",
                 "harder", "everything", "figure"}
_RAMBLING_MARKERS = {"lovely", "remember", "hmm", "colors", "anyway", "aunt", "interesting",
                     "funny", "afternoon", "nice", "relaxing"}


def classify_style(reply):
    """Which of the four styles a reply is in ('other' when it is none of them).
    Rudeness spoils any reply, so it is checked first; written-out arithmetic makes a reply
    step-by-step; filler makes it rambling; a bare final line is terse."""
    if not isinstance(reply, str) or not reply.strip():
        return "other"
    words = set(_WORDS.findall(reply.lower()))
    if words & _RUDE_MARKERS:
        return "rude"
    if _EQUATION.search(reply):
        return "step"
    if words & _RAMBLING_MARKERS:
        return "rambling"
    if parse_answer(reply) is not None and reply.strip().count("\n") == 0:
        return "terse"
    return "other"


def judge(problem, reply):
    """The stand-in human labeler. Higher is better:
        10 * correct  +  style rank (step 3, terse 2, rambling 1, rude/other 0)  +  shortness
    where shortness = 1 / (1 + length in characters) lies in (0, 1), so a correct reply always
    beats a wrong one, style decides next, and among equals the shorter reply wins."""
    text = reply if isinstance(reply, str) else ""
    return 10.0 * verify(problem, text) + STYLE_RANK[classify_style(text)] + 1.0 / (1 + len(text))


def score_replies(problems, replies):
    """Aggregate figures for replies to problems (one reply per problem): verifier accuracy,
    mean judge score, the share of each style and the mean length in characters."""
    assert len(problems) == len(replies)
    n = max(1, len(replies))
    styles = [classify_style(r) for r in replies]
    return {
        "accuracy": sum(verify(p, r) for p, r in zip(problems, replies)) / n,
        "judge_score": sum(judge(p, r) for p, r in zip(problems, replies)) / n,
        "style_shares": {s: styles.count(s) / n for s in STYLES + ["other"]},
        "mean_length": sum(len(r) for r in replies) / n,
    }
