"""online.py: on-policy pairs, the judge's best against its worst (the rounds run end to end in
test_dpo.py)."""

import online


def test_on_policy_pairs_put_the_judges_best_above_its_worst_and_drop_ties():
    problems = [{"prompt": "Ava has 3 pens. How many pens?", "answer": 3},
                {"prompt": "Ben has 2 cups. How many cups?", "answer": 2},
                {"prompt": "Mia has 5 jars. How many jars?", "answer": 5}]
    replies = {problems[0]["prompt"]: ["Ugh. The answer is 3.", "The answer is 4.",
                                       "Step by step:\nAva starts with 3 pens.\n3 + 0 = 3.\nThe answer is 3.", "The answer is 3."],
               problems[1]["prompt"]: ["The answer is 2."] * 3 + [" "],  # an empty reply left out, the rest tie
               problems[2]["prompt"]: ["The answer is 6.", "The answer is 5.", "The answer is 5.", "The answer is 6."]}
    asked = []

    def stub(prompts):  # k copies of each prompt, in order, as the sampler is asked
        asked.extend(prompts)
        counts = {}
        out = []
        for p in prompts:
            out.append(replies[p][counts.get(p, 0)])
            counts[p] = counts.get(p, 0) + 1
        return out

    rows, ties = online.on_policy_pairs(stub, problems, 4)
    only_one = online.on_policy_pairs(lambda prompts: ["The answer is 2.", "", "\n", ""], problems[1:2], 4)
    assert only_one == ([], 1)  # one reply with text: nothing to pair it with
    assert asked == [p["prompt"] for p in problems for _ in range(4)]
    assert ties == 1 and [r["prompt"] for r in rows] == [problems[0]["prompt"], problems[2]["prompt"]]
    # the judge: right beats wrong, then step > terse > rude (a rude reply's answer line is not read); the
    # first of equals is kept
    assert rows[0]["chosen"].startswith("Step by step") and rows[0]["rejected"] == "Ugh. The answer is 3."
    assert rows[1] == {"prompt": problems[2]["prompt"], "chosen": "The answer is 5.", "rejected": "The answer is 6.",
                       "answer": 5}
