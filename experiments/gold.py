"""
Ground truth for the recipe experiment: IFEval-style verifiable instructions, a deterministic
checker, prompt generation from a seed, and a gold judge served as an OpenAI-compatible chat
endpoint.

    python experiments/gold.py prompts --out runs/recipe/prompts --train 160 --heldout 48
    python experiments/gold.py serve --port 8011   # annotate.py --base-url URL/v1
    python experiments/gold.py score samples.jsonl       # gold score of sample.py output

A prompt is a short base task (a template about a topic) followed by one to three instructions. The
held-out split uses topics that never occur in training, so its base tasks are unseen; the
instruction types are shared (that is what the reward model has to learn to check).

The judge reads annotate.py's judge prompt: the conversation inside
<conversation>...</conversation> (rendered as "[User]\\n..." blocks), the replies inside <reply
A>/<reply B>. It finds the instructions in the last user turn by their wording (INSTRUCTIONS
below), scores both replies, and answers one line of reasoning plus `Verdict: [[...]]` on
annotate.py's 7-point scale: the side with the higher fraction of instructions met wins, the
strength grows with the gap, equal scores are a tie. Stdlib only, so the tests and the recipe
import it without torch.
"""

import argparse, json, os, random, re, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# -------------------------------------------------------------------------------------------------
# Instructions: (name, the sentence added to the prompt, a regex that finds it again, the checker).
# Chosen so that SmolLM2-135M-Instruct meets each in some but not most samples (best-of-N needs
# headroom): a probe at temperature 0.8 met each in 10-65% of samples. "All lowercase" (3%) and
# "all capitals" (0%) were dropped as too rare; the rates of a run are in its results.json (the
# full run's held-out rates: 5-83%). Parameters (a word, a number) are part of the sentence, so the
# judge recovers them from the prompt text alone.

KEYWORDS = ["banana", "river", "purple", "robot", "garden", "winter"]
START_WORDS = ["Yes", "Sure", "Well"]
WORD_LIMITS = [20, 30]


def words(text):
    return re.findall(r"[A-Za-z0-9']+", text)


def bullets(text):
    return [l for l in text.splitlines() if re.match(r"\s*[-*\u2022]\s+\S", l)]


INSTRUCTIONS = {
    # name: (template, regex recovering the parameter from the prompt, checker(text, param))
    "include": (
        'Include the word "{p}" in your answer.',
        r"Include the word \"(\w+)\" in your answer\.",
        lambda t, p: re.search(rf"\b{re.escape(p)}\b", t, re.I) is not None,
    ),
    "no_commas": (
        "Do not use any commas.",
        r"Do not use any commas\.",
        lambda t, p: "," not in t and bool(t.strip()),
    ),
    "start": (
        'Start your answer with the word "{p}".',
        r"Start your answer with the word \"(\w+)\"\.",
        lambda t, p: (words(t)[:1] or [""])[0].lower() == p.lower(),
    ),
    "three_bullets": (
        'Answer with exactly 3 bullet points, each on its own line starting with "- ".',
        r"Answer with exactly 3 bullet points",
        lambda t, p: len(bullets(t)) == 3,
    ),
    "max_words": (
        "Answer in fewer than {p} words.",
        r"Answer in fewer than (\d+) words\.",
        lambda t, p: 0 < len(words(t)) < int(p),
    ),
    "no_the": (
        'Do not use the word "the".',
        r"Do not use the word \"the\"\.",
        lambda t, p: re.search(r"\bthe\b", t, re.I) is None and bool(t.strip()),
    ),
    "end_question": (
        "End your answer with a question.",
        r"End your answer with a question\.",
        lambda t, p: t.rstrip().endswith("?"),
    ),
    "number": (
        "Include at least one number written in digits.",
        r"Include at least one number written in digits\.",
        lambda t, p: re.search(r"\d", t) is not None,
    ),
    "exclaim": (
        "Use at least one exclamation mark.",
        r"Use at least one exclamation mark\.",
        lambda t, p: "!" in t,
    ),
}
PARAMS = {"include": KEYWORDS, "start": START_WORDS, "max_words": WORD_LIMITS}
# pairs that contradict each other (or make one trivial) never share a prompt
CONFLICTS = {
    frozenset(p)
    for p in [
        ("three_bullets", "max_words"),
        ("three_bullets", "start"),
        ("three_bullets", "end_question"),
    ]
}


def render(name, param):
    return INSTRUCTIONS[name][0].format(p=param)


def find_instructions(text):
    """The instructions in a prompt text, by their wording: [(name, param or None)], in
    INSTRUCTIONS order.
    """
    found = []
    for name, (_, rx, _) in INSTRUCTIONS.items():
        m = re.search(rx, text)
        if m:
            found.append((name, m.group(1) if m.groups() else None))
    return found


def check(text, instructions):
    """-> [bool per instruction]. text: the response; instructions: [(name, param)]."""
    return [bool(INSTRUCTIONS[n][2](text, p)) for n, p in instructions]


def score(text, instructions):
    """-> (fraction of instructions met, all met). A prompt without instructions scores (0, False).
    """
    ok = check(text, instructions)
    return (sum(ok) / len(ok), all(ok)) if ok else (0.0, False)


def score_prompt(prompt_text, response):
    return score(response, find_instructions(prompt_text))


# -------------------------------------------------------------------------------------------------
# Prompts: base tasks (template x topic) x 1-3 instructions, from a seed

TEMPLATES = [
    "Describe {t} briefly.",
    "Give one short tip about {t}.",
    "Explain {t} to a child.",
    "Write a short note about {t}.",
    "What is interesting about {t}?",
    "Tell me a fun fact about {t}.",
]
TOPICS = [
    "cats",
    "the moon",
    "coffee",
    "rain",
    "bicycles",
    "volcanoes",
    "bread",
    "music",
    "the ocean",
    "trees",
    "chess",
    "honey",
    "trains",
    "snow",
    "libraries",
    "bees",
    "the sun",
    "mountains",
    "tea",
    "birds",
    "clocks",
    "maps",
    "soap",
    "kites",
    "apples",
    "bridges",
    "candles",
    "deserts",
    "owls",
    "rivers",
    "pencils",
    "penguins",
    "gardening",
    "recycling",
    "sleep",
    "friendship",
    "the wind",
    "dolphins",
    "pizza",
    "rainbows",
    "castles",
    "frogs",
    "umbrellas",
    "stars",
    "cheese",
    "lighthouses",
    "robots",
    "islands",
]
# the last topics of the shuffled list: their base tasks never appear in training
HELDOUT_TOPICS = 12


def make_prompt(rng, topic, pid):
    task = rng.choice(TEMPLATES).format(t=topic)
    k = rng.choice([1, 2, 2, 3])
    names = list(INSTRUCTIONS)
    while True:
        chosen = rng.sample(names, k)
        if not any(frozenset((a, b)) in CONFLICTS for a in chosen for b in chosen if a != b):
            break
    chosen.sort(key=names.index)  # a fixed order, as the judge finds them
    instr = [(n, str(rng.choice(PARAMS[n])) if n in PARAMS else None) for n in chosen]
    text = " ".join([task] + [render(n, p) for n, p in instr])
    return {
        "id": pid,
        "messages": [{"role": "user", "content": text}],
        "instructions": [[n, p] for n, p in instr],
        "task": task,
    }


def make_splits(seed, n_train, n_heldout):
    """-> (train prompts, held-out prompts). Held-out topics are disjoint from the training topics.
    """
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    train_t, held_t = topics[:-HELDOUT_TOPICS], topics[-HELDOUT_TOPICS:]
    train = [make_prompt(rng, rng.choice(train_t), f"train-{i:04d}") for i in range(n_train)]
    held = [
        make_prompt(rng, held_t[i % len(held_t)], f"heldout-{i:04d}") for i in range(n_heldout)
    ]
    return train, held


# -------------------------------------------------------------------------------------------------
# The gold judge: an OpenAI-compatible /v1/chat/completions that reads annotate.py's judge prompt


def parse_judge_prompt(text):
    """-> (last user turn, reply A, reply B) from annotate.py's JUDGE_PROMPT (or LETTER_PROMPT)
    text.
    """
    conv = re.search(r"<conversation>\n(.*?)\n</conversation>", text, re.S)
    a = re.search(r"<reply A>\n(.*?)\n</reply A>", text, re.S)
    b = re.search(r"<reply B>\n(.*?)\n</reply B>", text, re.S)
    if not (conv and a and b):
        raise ValueError("not a judge prompt: needs <conversation>, <reply A> and <reply B>")
    users = re.findall(
        r"(?:^|\n\n)\[User\]\n(.*?)(?=\n\n\[(?:User|Assistant|System)\]\n|\Z)", conv.group(1), re.S
    )
    if not users:
        raise ValueError("no [User] turn in the conversation")
    return users[-1], a.group(1), b.group(1)


def strength_word(gap):
    """Score gap (fraction of instructions, > 0) -> annotate.py's degree: slightly / plain / much
    better.
    """
    return "much better" if gap >= 0.66 else "better" if gap >= 0.5 else "slightly better"


def judge(text):
    """annotate.py's judge prompt -> the judge's reply: one line of reasoning, then the verdict
    line.
    """
    user, a, b = parse_judge_prompt(text)
    instr = find_instructions(user)
    sa, sb = score(a, instr)[0], score(b, instr)[0]
    why = (
        f"Reply A meets {sa * len(instr):.0f} and reply B meets {sb * len(instr):.0f} of the "
        f"{len(instr)} instructions ({', '.join(n for n, _ in instr) or 'none found'})."
    )
    if sa == sb:
        verdict = "tie"
    else:
        verdict = f"{'A' if sa > sb else 'B'} {strength_word(abs(sa - sb))}"
    return f"{why}\nVerdict: [[{verdict}]]"


class Handler(BaseHTTPRequestHandler):
    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # /v1/models, so clients that list models first are happy
        self._send(
            200,
            {"object": "list", "data": [{"id": "gold", "object": "model", "owned_by": "gold"}]},
        )

    def do_POST(self):
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            text = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
            reply = judge(text)
        except (
            ValueError,
            KeyError,
            StopIteration,
            TypeError,
        ) as e:  # a 400 is not retried by annotate.py
            return self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
        self._send(
            200,
            {
                "id": "gold",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "gold"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": reply},
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
        )

    def log_message(self, *a):  # quiet: annotate.py's bar shows the progress
        pass


def serve(port=0, host="127.0.0.1"):
    """Start the judge in a daemon thread -> the server (its port: server.server_port)."""
    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# -------------------------------------------------------------------------------------------------


def write_jsonl(path, recs):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts", help="write train.jsonl and heldout.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=160)
    p.add_argument("--heldout", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("serve", help="serve the gold judge until killed")
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("score", help="per-instruction rates of sample.py output")
    c.add_argument("samples")
    args = ap.parse_args()
    if args.cmd == "prompts":
        train, held = make_splits(args.seed, args.train, args.heldout)
        write_jsonl(os.path.join(args.out, "train.jsonl"), train)
        write_jsonl(os.path.join(args.out, "heldout.jsonl"), held)
        print(f"{len(train)} train, {len(held)} held-out prompts -> {args.out}")
    elif args.cmd == "serve":
        server = serve(args.port)
        print(f"gold judge on http://127.0.0.1:{server.server_port}/v1", flush=True)
        threading.Event().wait()
    else:
        print(json.dumps(instruction_rates([json.loads(l) for l in open(args.samples)]), indent=1))


def instruction_rates(records):
    """Per instruction: the fraction of samples that meet it, and of prompts where some sample
    does.
    """
    met, tot, any_met, prompts = {}, {}, {}, {}
    for r in records:
        instr = find_instructions(r["messages"][-1]["content"])
        oks = [check(x["content"], instr) for x in r["responses"]]
        for j, (n, _) in enumerate(instr):
            met[n] = met.get(n, 0) + sum(o[j] for o in oks)
            tot[n] = tot.get(n, 0) + len(oks)
            any_met[n] = any_met.get(n, 0) + any(o[j] for o in oks)
            prompts[n] = prompts.get(n, 0) + 1
    return {
        n: {
            "sample_rate": met[n] / tot[n],
            "prompt_any_rate": any_met[n] / prompts[n],
            "prompts": prompts[n],
        }
        for n in sorted(met)
    }


if __name__ == "__main__":
    sys.exit(main())
