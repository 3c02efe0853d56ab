"""The recipe experiment (experiments/): the gold checker on hand-written cases for every
instruction, the gold judge endpoint through the openai client and annotate.py's own parser (both
orders, ties), prompt splits, and the --quick chain end to end (tiny random model, no network)."""

import json, os, subprocess, sys
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import gold  # noqa: E402

# name -> (param, responses that meet it, responses that do not)
CASES = {
    "include": (
        "banana",
        ["I like a Banana split.", "banana"],
        ["Bananas are yellow.", "No fruit here."],
    ),
    "no_commas": (None, ["Cats sleep a lot. They purr."], ["Cats, dogs and birds.", ""]),
    "start": (
        "Yes",
        ["Yes, the moon is bright.", "yes it is", '  "Yes" indeed'],
        ["Yesterday it rained.", "Well, yes."],
    ),
    "three_bullets": (
        None,
        ["- one\n- two\n- three", "Intro:\n* a\n* b\n- c\nBye."],
        ["- one\n- two", "- a\n- b\n- c\n- d", "1. a\n2. b\n3. c"],
    ),
    "max_words": ("20", ["Short and sweet.", " ".join(["w"] * 19)], [" ".join(["w"] * 20), ""]),
    "no_the": (
        None,
        ["Cats purr when happy.", "There they go."],
        ["The cat sat.", "Look at THE sun."],
    ),
    "end_question": (
        None,
        ["Do you like tea?", "Tea is nice. Want some?  \n"],
        ["Tea is nice.", "Why? Because."],
    ),
    "number": (None, ["There are 3 cats.", "In 1999 it snowed."], ["There are three cats."]),
    "exclaim": (None, ["Wow!", "It is great! Really."], ["It is great.", ""]),
}


def test_every_instruction_has_cases():
    assert set(CASES) == set(gold.INSTRUCTIONS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_checker(name):
    param, good, bad = CASES[name]
    for text in good:
        assert gold.check(text, [(name, param)]) == [True], (name, text)
    for text in bad:
        assert gold.check(text, [(name, param)]) == [False], (name, text)


def test_score_and_prompt_parsing():
    prompt = (
        "Describe cats briefly. "
        + gold.render("include", "river")
        + " "
        + gold.render("max_words", "20")
        + " "
        + gold.render("no_commas", None)
    )
    assert sorted(gold.find_instructions(prompt)) == [
        ("include", "river"),
        ("max_words", "20"),
        ("no_commas", None),
    ]
    assert gold.score_prompt(prompt, "Cats swim in a river.") == (1.0, True)
    assert gold.score_prompt(prompt, "Cats, by the river.") == (pytest.approx(2 / 3), False)
    assert gold.score_prompt(prompt, "Cats, dogs.") == (pytest.approx(1 / 3), False)
    assert gold.score_prompt("Describe cats.", "Cats.") == (0.0, False)  # nothing to check


def test_rm_length_bias():
    """The length diagnostic on hand-made pools: disjoint adjacent pairs of unequal length only;
    the RM's side from its rewards (ties left out), gold's from decisive pairs, and the RM's
    accuracy split by whether gold's winner is the shorter reply. A prompt without instructions
    has no decisive pairs (gold scores it 0 for every reply)."""
    import recipe

    def rec(prompt, *replies):  # replies: (text, tokens, reward)
        return {"messages": [{"role": "user", "content": prompt}],
                "responses": [{"content": c, "num_tokens": n, "reward": r} for c, n, r in replies]}
    p = "Describe cats briefly. " + gold.render("include", "river")
    pool = [
        rec(p, ("Cats swim in a river.", 6, 1.0), ("Cats nap.", 3, 2.0),  # gold: longer; RM: shorter
            ("A river cat.", 4, 0.5), ("Cats like to nap all day long.", 8, 0.0),  # both: shorter
            ("Cats.", 2, 1.0), ("Dogs.", 2, 0.0)),  # equal length: left out
        rec(p, ("Cats nap a lot.", 4, 3.0), ("Cats nap in the sun.", 5, 3.0)),  # gold tie, RM tie
        rec("Describe cats briefly.", ("Cats.", 2, 1.0), ("Cats are cute.", 4, 0.0)),  # no instr.
    ]
    lb = recipe.rm_length_bias(pool)
    assert lb["rm_prefers_shorter"] == pytest.approx(3 / 3)  # the tie is left out
    assert lb["gold_prefers_shorter"] == pytest.approx(1 / 2)
    assert lb["accuracy_gold_winner"] == {"shorter": {"accuracy": 1.0, "pairs": 1},
                                          "longer": {"accuracy": 0.0, "pairs": 1}}
    empty = recipe.rm_length_bias([])
    assert empty["accuracy_gold_winner"]["longer"]["pairs"] == 0


def test_splits_are_seeded_and_heldout_tasks_unseen():
    train, held = gold.make_splits(3, 120, 30)
    again = gold.make_splits(3, 120, 30)
    assert (train, held) == again
    assert not {p["task"] for p in train} & {p["task"] for p in held}
    for p in train + held:
        found = gold.find_instructions(p["messages"][-1]["content"])
        assert [list(f) for f in found] == p["instructions"] and 1 <= len(found) <= 3


# -------------------------------------------------------------------------------------------------
# The judge endpoint, through the openai client, read by annotate.py's own parser


@pytest.fixture(scope="module")
def judge_url():
    server = gold.serve(0)
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def ask(url, messages):
    import openai

    client = openai.OpenAI(api_key="gold", base_url=url, max_retries=0)
    return (
        client.chat.completions.create(model="gold", messages=messages, temperature=0)
        .choices[0]
        .message.content
    )


def test_judge_verdicts_parse_in_both_orders(judge_url):
    sys.path.insert(0, ROOT)
    from annotate import (
        judge_messages,
        parse_verdict,
        JUDGE_PROMPT,
    )  # noqa: F401 (the public names we rely on)

    conv = [
        {
            "role": "user",
            "content": "Tell me about owls. "
            + gold.render("include", "winter")
            + " "
            + gold.render("exclaim", None),
        }
    ]
    both, one, none = "Owls hunt in winter!", "Owls hunt in winter.", "Owls hunt at night."
    # +3 when the first shown reply meets both and the other none; +2 for a gap of one of two; tie
    # on equals
    for a, b, expect in [
        (both, none, 3),
        (none, both, -3),
        (both, one, 2),
        (one, both, -2),
        (one, one + " ", 0),
        (none, "Owls sleep.", 0),
    ]:
        reply = ask(judge_url, judge_messages(conv, a, b))
        assert parse_verdict(reply) == expect, (a, b, reply)
        assert len(reply.splitlines()) == 2  # one line of reasoning, then the verdict line
    # the last user turn of a multi-turn conversation carries the instructions
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ] + conv
    assert parse_verdict(ask(judge_url, judge_messages(multi, none, both))) == -3
    # three instructions: a gap of one is "slightly"
    conv3 = [{"role": "user", "content": conv[0]["content"] + " " + gold.render("no_the", None)}]
    assert (
        parse_verdict(ask(judge_url, judge_messages(conv3, both, "The owls hunt in winter!"))) == 1
    )


def test_judge_rejects_other_prompts(judge_url):
    import openai

    with pytest.raises(openai.BadRequestError):
        ask(judge_url, [{"role": "user", "content": "hello"}])


# -------------------------------------------------------------------------------------------------
# The --quick chain, end to end through the stage scripts' command lines


def test_quick_chain(tmp_path):
    out = tmp_path / "quick"
    env = dict(
        os.environ, XWIN_CACHE=os.environ.get("XWIN_CACHE", os.path.expanduser("~/.cache/xwin"))
    )
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "recipe.py"),
            "--quick",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "$ (cd " in p.stdout and "python train_rm.py" in p.stdout  # the commands are printed
    res = json.load(open(out / "results.json"))
    assert set(res["policies"]) == {"start", "rs", "dpo"}
    assert [r["n"] for r in res["best_of_n"]] == [1, 2, 4, 8]
    assert all(w is not None for w in res["win_rates"].values())
    assert (out / "best_of_n.png").stat().st_size > 0 and (out / "results.md").exists()
    # a rerun skips every stage
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "recipe.py"),
            "--quick",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0 and "$ (cd" not in p.stdout and "done already" in p.stdout


def test_changed_flags_stop_a_rerun(tmp_path):
    """A rerun skips the stages whose marker holds the same command line, and stops at the first
    one run with other flags (its outputs would be resumed by id, two settings in one file)."""
    import recipe

    out, started = str(tmp_path / "q"), []
    r = recipe.Runner(recipe.parse_args(["--quick", "--out", out]))
    r.start = lambda n, a, k: started.append(n) or subprocess.Popen([sys.executable, "-c", "pass"])
    stage = [("s", ["script.py", "--flag", 1])]
    r.run(stage)
    assert open(os.path.join(out, "done", "s")).read() == "script.py --flag 1" and started == ["s"]
    r.run(stage)  # the same command line: skipped
    assert started == ["s"]
    changed = r"\[s\] .* another command line:\n.*--flag 1\nnow:\n.*--flag 2"
    with pytest.raises(SystemExit, match=changed):
        r.run([("s", ["script.py", "--flag", 2])])
    moved = recipe.Runner(recipe.parse_args(["--quick", "--out", str(tmp_path / "q2")]))
    assert moved.command([os.path.join(moved.out, "x.jsonl")]) == r.command([r.p("x.jsonl")])
    open(os.path.join(out, "done", "old"), "w").close()  # an older run's empty marker: done
    r.run([("old", ["anything"])])
    assert started == ["s"]


def test_changed_flags_stop_a_half_done_stage(tmp_path):
    """A stage killed half-way (no done marker) resumes by id on a rerun: with the same command
    line only, else the rerun stops before starting it."""
    import recipe

    out = str(tmp_path / "q")
    r = recipe.Runner(recipe.parse_args(["--quick", "--out", out]))
    killed = ["-c", "import sys; sys.exit(1)"]  # python -c ...: a stage that dies
    fresh = ["-c", "import sys; sys.exit(1)", "--lr", 1]  # one that starts afresh: never held
    with pytest.raises(SystemExit, match=r"\[t\] failed"):
        r.run([("t", fresh)])
    r.run([("t", ["-c", "pass", "--lr", 2])])
    r.RESUMING = ("-c",)  # python -c stages stand for sample.py and annotate.py from here on
    with pytest.raises(SystemExit, match=r"\[s\] failed"):
        r.run([("s", killed + ["--flag", 1])])
    assert not os.path.exists(os.path.join(out, "done", "s"))
    with pytest.raises(SystemExit, match=r"\[s\] .* half done with another command line"):
        r.run([("s", killed + ["--flag", 2])])
    with pytest.raises(SystemExit, match=r"\[s\] failed"):  # the same line: started again
        r.run([("s", killed + ["--flag", 1])])
    # side by side: a refused stage stops the group before any of it starts
    with pytest.raises(SystemExit, match=r"\[s\] .* half done"):
        r.run([("a", ["-c", "pass"]), ("s", killed + ["--flag", 2])])
    assert not os.path.exists(os.path.join(out, "started", "a"))
    os.remove(os.path.join(out, "started", "s"))  # as the message says: then it starts anew
    r.run([("s", ["-c", "pass", "--flag", 1])])
    assert not os.path.exists(os.path.join(out, "started", "s"))  # finished: done marker only
    os.remove(os.path.join(out, "done", "s"))  # as the done-mismatch message says: any flags
    r.run([("s", ["-c", "pass", "--flag", 3])])
    assert open(os.path.join(out, "done", "s")).read().endswith("--flag 3")


def test_bad_rm_dtype_stops_before_any_stage(tmp_path):
    """--rm-dtype is sample.py's, but checked at the start: a typo would otherwise stop the chain
    only at the Xwin-Set, after sampling, judging and RM training."""
    import recipe

    with pytest.raises(SystemExit, match="--rm-dtype 'bf16'"):
        recipe.main(["--quick", "--out", str(tmp_path / "q"), "--rm-dtype", "bf16"])
    assert not (tmp_path / "q").exists()
