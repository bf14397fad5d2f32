"""data/world.py: the problem generator, the replies, the verifier and the judge.

The verifier and the judge are the ground truth every stage is measured against, so they are
pinned here by hand-written replies; the generator is checked against brute-force recomputation.
"""

import itertools
import random

import pytest

from data import world

# ----------------------------------------------------------------------------------------------
# parse_answer / verify: hand-written replies


@pytest.mark.parametrize("reply, expected", [
    ("The answer is 42.", 42),
    # the usual step-by-step shape: the answer on its own final line
    ("Mia starts with 7 shells.\nShe finds 4 more, so 7 + 4 = 11.\nThe answer is 11.", 11),
    ("The answer is -3.", -3),                      # the format allows a sign
    ("The answer is 7.  \n\n", 7),                  # trailing whitespace is not a new line of text
    ("The answer is 7.\t", 7),
    ("Hmm, let me think.\nThe answer is 0.", 0),
    # no final line of the right shape
    ("I think it is 42.", None),
    ("The answer is 42", None),                     # no full stop
    ("The answer is 42.\nHope that helps!", None),  # the answer is not the final line
    ("So the answer is 42.", None),                 # not on a line of its own
    ("The answer is 4.5.", None),                   # not an integer
    # hedging: more than one stated answer, or two numbers in one
    ("The answer is 4.\nThe answer is 5.", None),
    ("The answer is 5.\nThe answer is 5.", None),   # even the same number twice counts as hedging
    ("The answer is 5 or 6.", None),
    ("the answer is 4, no wait.\nThe answer is 5.", None),
    # garbage and non-strings
    ("asdf )(*&^ 12 qwerty", None),
    ("", None),
    ("   \n ", None),
    (None, None),
    (42, None),
])
def test_parse_answer(reply, expected):
    assert world.parse_answer(reply) == expected


@pytest.mark.parametrize("reply, ok", [
    ("The answer is 8.", True),
    ("Ben has 5 cards.\nThen 5 + 3 = 8 cards.\nThe answer is 8.", True),
    ("The answer is 9.", False),
    ("The answer is 8 or 9.", False),
    ("The answer is 8.\nThe answer is 9.", False),
    ("8", False),
    ("", False),
    (None, False),
])
def test_verify(reply, ok):
    assert world.verify({"answer": 8}, reply) is ok


def test_only_ascii_digits_are_read():
    # int() reads other scripts' digits too ("\u0665" is an Arabic-Indic 5): the verifier must not
    assert world.parse_answer("The answer is \u0665.") is None
    assert not world.verify({"answer": 5}, "The answer is \u0665.")
    assert world.classify_style("Mia has \u0663 pens.\nSo \u0663 + 2 = 5.\nThe answer is 5.") == "other"


def test_verify_accepts_answer_given_as_string():
    # rows from an external --data file may carry the answer as a JSON string
    assert world.verify({"answer": "8"}, "The answer is 8.")
    assert not world.verify({"answer": "8"}, "The answer is 9.")


# ----------------------------------------------------------------------------------------------
# classify_style: hand-written replies


@pytest.mark.parametrize("reply, style", [
    ("Mia starts with 7 shells.\nShe finds 4 more, so 7 + 4 = 11.\nThe answer is 11.", "step"),
    ("Tom has 3 kites.\nMultiplying by 2 gives 3 x 2 = 6.\nThe answer is 6.", "step"),
    ("The answer is 11.", "terse"),
    ("The answer is 11.\n", "terse"),
    ("Hmm, let me think about this for a while.\nThe answer is 11.", "rambling"),
    ("Oh, what a lovely question about shells!\nThe answer is 11.", "rambling"),
    ("Ugh, this is trivial.\nThe answer is 11.", "rude"),
    # rudeness spoils any reply, even one that shows its work
    ("Obviously 7 + 4 = 11.\nThe answer is 11.", "rude"),
    # a step that goes below zero (the world never does; a model may) is still written out
    ("Mia starts with 3 pens.\nShe gives away 5, so 3 - 5 = -2.\nThe answer is -2.", "step"),
    # none of the four
    ("", "other"),
    ("   \n", "other"),
    (None, "other"),
    ("blah blah", "other"),
    ("The answer is 5 or 6.", "other"),
    ("The answer is 4.\nThe answer is 5.", "other"),
    ("Let me see.\nThe answer is 4.", "other"),  # two lines, no filler marker, no arithmetic
])
def test_classify_style(reply, style):
    assert world.classify_style(reply) == style


# ----------------------------------------------------------------------------------------------
# Generated replies and the judge


def _problems(seed, n):
    rng = random.Random(seed)
    return [world.make_problem(rng) for _ in range(n)]


def _replies(rng, problem):
    """One correct and one wrong reply in each style."""
    right = {s: world.make_reply(rng, problem, s, correct=True) for s in world.STYLES}
    wrong = {s: world.make_reply(rng, problem, s, correct=False) for s in world.STYLES}
    return right, wrong


def test_generated_replies_have_their_style_and_correctness():
    rng = random.Random(1)
    for problem in _problems(0, 300):
        right, wrong = _replies(rng, problem)
        for s in world.STYLES:
            assert world.classify_style(right[s]) == s, right[s]
            assert world.classify_style(wrong[s]) == s, wrong[s]
            assert world.verify(problem, right[s]), (problem, right[s])


def test_wrong_reply_is_always_judged_wrong_and_parses():
    rng = random.Random(2)
    for problem in _problems(3, 500):
        for s in world.STYLES:
            reply = world.make_reply(rng, problem, s, correct=False)
            got = world.parse_answer(reply)
            assert isinstance(got, int), reply          # a parseable, plausible mistake ...
            assert got != problem["answer"], reply      # ... that is really a mistake
            assert not world.verify(problem, reply)


def test_judge_correct_beats_wrong_in_every_style_combination():
    rng = random.Random(4)
    for problem in _problems(5, 200):
        right, wrong = _replies(rng, problem)
        for s1, s2 in itertools.product(world.STYLES, repeat=2):
            assert world.judge(problem, right[s1]) > world.judge(problem, wrong[s2]), (s1, s2)


def test_judge_orders_styles_among_correct_and_among_wrong_replies():
    order = ["step", "terse", "rambling", "rude"]  # the labeler's taste, best first
    rng = random.Random(6)
    for problem in _problems(7, 200):
        right, wrong = _replies(rng, problem)
        for replies in (right, wrong):
            scores = [world.judge(problem, replies[s]) for s in order]
            assert all(a > b for a, b in zip(scores, scores[1:])), (problem, replies)


def test_judge_prefers_the_shorter_reply_among_equals():
    problem = {"answer": 8}
    short = "Hmm.\nThe answer is 8."
    long = "Hmm, let me think about this for a while.\nThe answer is 8."
    assert world.classify_style(short) == world.classify_style(long) == "rambling"
    assert world.judge(problem, short) > world.judge(problem, long)
    # the same among wrong replies, and among step-by-step ones
    assert world.judge(problem, short.replace("8", "9")) > world.judge(problem, long.replace("8", "9"))
    step_short = "Ann has 5.\n5 + 3 = 8.\nThe answer is 8."
    step_long = "Ann has 5 pens.\nShe gets 3 more, so 5 + 3 = 8.\nThe answer is 8."
    assert world.judge(problem, step_short) > world.judge(problem, step_long)
    # but length never outweighs style: a long step reply beats the shortest terse one
    assert world.judge(problem, step_long) > world.judge(problem, "The answer is 8.")


def test_judge_among_generated_replies_of_one_style_shorter_wins():
    rng = random.Random(8)
    compared = 0
    for problem in _problems(9, 200):
        for s in ("step", "rambling", "rude"):  # terse replies to one problem all look the same
            for correct in (True, False):
                a = world.make_reply(rng, problem, s, correct)
                b = world.make_reply(rng, problem, s, correct)
                if world.verify(problem, a) != world.verify(problem, b) or len(a) == len(b):
                    continue
                short, long = sorted([a, b], key=len)
                assert world.judge(problem, short) > world.judge(problem, long)
                compared += 1
    assert compared > 500  # the loop really compared many pairs


def test_judge_is_deterministic_and_handles_non_strings():
    problem = {"answer": 3}
    assert world.judge(problem, "The answer is 3.") == world.judge(problem, "The answer is 3.")
    # None is treated as the empty reply: wrong, style 'other', shortness 1/(1+0)
    assert world.judge(problem, None) == world.judge(problem, "") == 1.0


# ----------------------------------------------------------------------------------------------
# The generator


def test_generator_is_deterministic():
    def run(seed):
        rng = random.Random(seed)
        problems = [world.make_problem(rng) for _ in range(50)]
        sampled = world.sample_problems(rng, 30, heldout=False)
        sampled_heldout = world.sample_problems(rng, 10, heldout=True)
        stories = [world.make_story(rng, p) for p in problems]
        facts = [world.make_facts(rng, 8) for _ in range(10)]
        replies = [world.make_reply(rng, p, s, c) for p in problems[:10]
                   for s in world.STYLES for c in (True, False)]
        return problems, sampled, sampled_heldout, stories, facts, replies

    assert run(11) == run(11)
    # and the seed matters (otherwise the equality above would prove nothing)
    assert run(11)[0] != run(12)[0]


def _brute_force_answer(start, events):
    """The final count, and every count along the way, by direct simulation."""
    counts = [start]
    for op, x in events:
        if op == "+":
            counts.append(counts[-1] + x)
        elif op == "-":
            counts.append(counts[-1] - x)
        elif op == "x":
            counts.append(counts[-1] * x)
        else:
            raise AssertionError(f"unknown operation {op!r}")
    return counts[-1], counts


def test_problem_answers_match_brute_force_and_counts_stay_in_range():
    rng = random.Random(13)
    for _ in range(3000):
        p = world.make_problem(rng)
        answer, counts = _brute_force_answer(p["start"], p["events"])
        assert p["answer"] == answer, p
        assert all(0 <= c <= world.MAX_COUNT for c in counts), p
        assert 1 <= p["n_ops"] == len(p["events"]) <= 3
        assert world.START_RANGE[0] <= p["start"] <= world.START_RANGE[1]
        for (op, x), before in zip(p["events"], counts):
            if op == "x":
                # multiplication only of small counts, by a small factor
                assert 1 <= before <= world.MUL_MAX_BASE and world.MUL_RANGE[0] <= x <= world.MUL_RANGE[1]
            else:
                assert world.ADD_RANGE[0] <= x <= world.ADD_RANGE[1]
        # the prompt names the person and the things, and the question comes last
        assert p["prompt"].startswith(p["name"]) or f"in {p['name']}'s" in p["prompt"]
        assert p["object"] in p["prompt"] and p["prompt"].endswith("?")


def test_make_problem_respects_n_ops():
    rng = random.Random(14)
    for n in (1, 2, 3):
        assert all(len(world.make_problem(rng, n)["events"]) == n for _ in range(100))


def test_heldout_split_is_disjoint_by_key():
    rng = random.Random(15)
    held = world.sample_problems(rng, 300, heldout=True)
    train = world.sample_problems(rng, 3000, heldout=False)
    held_keys = {world.problem_key(p) for p in held}
    train_keys = {world.problem_key(p) for p in train}
    assert len(held_keys) == len(held) and len(train_keys) == len(train)  # distinct by key
    assert not held_keys & train_keys
    assert all(world.is_heldout(p) for p in held)
    assert not any(world.is_heldout(p) for p in train)


def test_heldout_share_is_about_a_tenth():
    rng = random.Random(16)
    share = sum(world.is_heldout(world.make_problem(rng)) for _ in range(5000)) / 5000
    assert abs(share - 1 / world.HELDOUT_MOD) < 0.03


def test_problem_key_ignores_wording():
    # the split is by meaning: rewording a problem keeps its key and its side of the split
    rng = random.Random(17)
    for _ in range(50):
        p = world.make_problem(rng)
        q = dict(p, prompt="A completely different wording.")
        assert world.problem_key(q) == world.problem_key(p)
        assert world.is_heldout(q) == world.is_heldout(p)


def test_sample_problems_skips_excluded_keys():
    rng = random.Random(18)
    first = world.sample_problems(rng, 200, heldout=False, n_ops=1)
    excluded = {world.problem_key(p) for p in first}
    second = world.sample_problems(random.Random(18), 200, heldout=False, n_ops=1, exclude=excluded)
    assert not excluded & {world.problem_key(p) for p in second}


def test_facts_are_true():
    # every fact in the pretraining text is arithmetic that holds, with numbers in range
    rng = random.Random(19)
    words = {"plus": "+", "minus": "-", "times": "x"}
    n = 0
    for _ in range(200):
        for fact in world.make_facts(rng, 10).split(". "):
            tokens = fact.rstrip(".").split()
            a, op, b, c = int(tokens[0]), words.get(tokens[1], tokens[1]), int(tokens[2]), int(tokens[-1])
            assert _brute_force_answer(a, [(op, b)])[0] == c, fact
            assert 0 <= c <= world.MAX_COUNT
            n += 1
    assert n == 2000


# ----------------------------------------------------------------------------------------------
# score_replies: a hand-computed example


def test_score_replies_hand_computed():
    problems = [{"answer": 3}, {"answer": 5}, {"answer": 5}, {"answer": 1}]
    replies = [
        "The answer is 3.",                      # correct, terse, 16 characters
        "Ugh.\nThe answer is 4.",                # wrong, rude, 21 characters
        "Ann has 2.\n2 + 3 = 5.\nThe answer is 5.",  # correct, step, 10 + 1 + 10 + 1 + 16 = 38
        "",                                      # wrong, other, 0 characters
    ]
    got = world.score_replies(problems, replies)
    assert got["accuracy"] == pytest.approx(2 / 4)
    judge_scores = [10 + 2 + 1 / 17, 0 + 0 + 1 / 22, 10 + 3 + 1 / 39, 0 + 0 + 1 / 1]
    assert got["judge_score"] == pytest.approx(sum(judge_scores) / 4)
    assert got["style_shares"] == pytest.approx(
        {"step": 0.25, "terse": 0.25, "rambling": 0.0, "rude": 0.25, "other": 0.25})
    assert got["mean_length"] == pytest.approx((16 + 21 + 38 + 0) / 4)
