"""
MT-bench's formats (FastChat's): questions {question_id, category, turns}, answers {question_id,
model_id, choices: [{index, turns}]}, reference answers, and the judge prompts of single-answer
grading on 1-10 (ours by default; FastChat's judge_prompts.jsonl with --judge-prompts), the
rating's parsing, and its probability-weighted reading from logprobs. sample.py answers the
questions at MT_BENCH_TEMPERATURES; annotate.py --mode single grades the answers.
"""
import hashlib, re, time
import data as D

MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "stem": 0.1, "humanities": 0.1,
                         "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0}

def category_temperatures(spec, default):
    """-> category -> temperature: MT-bench's, overridden by spec ("CATEGORY=T,..."); a category
    outside the table takes default, and so does every category with spec "off"."""
    if spec == "off":
        return lambda category: default
    table = dict(MT_BENCH_TEMPERATURES)
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        try:
            table[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--category-temperature {item!r}: CATEGORY=T") from None
        if table[name.strip()] < 0:
            raise ValueError(f"--category-temperature {item!r}: a temperature is >= 0")
    return lambda category: table.get(category, default)

# ---- Single-answer grading, 1-10, of each turn; the second turn is graded with the whole
# conversation in view; math, reasoning and coding against a reference answer when there is one.
# The prompts are in the shape of FastChat's judge_prompts.jsonl, with its placeholders, so that
# --judge-prompts FILE swaps FastChat's in (for scores comparable with published ones).
NEED_REF = ("math", "reasoning", "coding")
GRADE_SYSTEM = ("You are a careful, impartial grader of AI assistant answers. You grade one "
                "answer at a time on a scale of 1 to 10.")
GRADE_HOW = ("Grade on a scale of 1 to 10: 1 for an answer that is useless, wrong or harmful, 10 "
             "for one an expert could not improve. Weigh correctness, helpfulness, relevance, how "
             "well the instructions are followed, depth and clarity. Length is no merit in itself:"
             " more text earns a higher grade only when the extra content helps. ")
GRADE_REF = ("A reference answer is given; take it as correct. Compare the assistant's answer "
             "with it first: a wrong result earns at most 3, however well it is written. ")
GRADE_TAIL = ("Explain your grade briefly (at most five sentences), then end with a last line in "
              "exactly this format, N a whole number from 1 to 10:\nRating: [[N]]")
ONE = "<question>\n{question}\n</question>\n\n<answer>\n{answer}\n</answer>\n\n"
ONE_REF = "<reference answer>\n{ref_answer_1}\n</reference answer>\n\n"
TWO = ("<conversation>\n[User]\n{question_1}\n\n[Assistant]\n{answer_1}\n\n[User]\n"
       "{question_2}\n\n[Assistant]\n{answer_2}\n</conversation>\n\n")
TWO_REF = ("<reference answers>\n[to the first message]\n{ref_answer_1}\n\n[to the second "
           "message]\n{ref_answer_2}\n</reference answers>\n\n")
SECOND = "Grade only the assistant's second answer; the first exchange is its context. "
GRADE_PROMPTS = {  # (with a reference, multi-turn) -> FastChat's fields
    (False, False): dict(name="single", prompt_template=GRADE_HOW + "\n\n" + ONE + GRADE_TAIL),
    (True, False): dict(name="single-ref",
                        prompt_template=GRADE_HOW + GRADE_REF + "\n\n" + ONE + ONE_REF
                        + GRADE_TAIL),
    (False, True): dict(name="single-multi-turn",
                        prompt_template=GRADE_HOW + SECOND + "\n\n" + TWO + GRADE_TAIL),
    (True, True): dict(name="single-ref-multi-turn", prompt_template=GRADE_HOW + SECOND + GRADE_REF
                       + "\n\n" + TWO + TWO_REF + GRADE_TAIL),
}
GRADE_PROMPTS = {k: v | {"system_prompt": GRADE_SYSTEM} for k, v in GRADE_PROMPTS.items()}
# --verdict logprobs: the rating alone, read as a distribution over 1..10 (G-Eval's scoring).
# Short: after GRADE_HOW's instructions the bundled 135M judge goes on writing the answer it saw.
RATE_ONLY = "Reply with the rating alone: a whole number from 1 to 10, nothing else."
RATE_ONE = "How good is this answer to the question, on a scale of 1 to 10? "
RATE_TWO = "How good is the assistant's second answer, on a scale of 1 to 10? "
RATE_REF = "(The reference answer is correct.) "
RATING_PROMPTS = {(ref, two): dict(
    name="rate-only" + "-ref" * ref + "-multi-turn" * two,
    system_prompt="You grade AI assistant answers on a scale of 1 to 10.",
    prompt_template=(TWO + TWO_REF * ref if two else ONE + ONE_REF * ref) + RATE_REF * ref
    + (RATE_TWO if two else RATE_ONE) + "Reply with the number only.")
    for ref in (False, True) for two in (False, True)}
RATING_REMINDER = ("Your reply did not end with a rating in the required format. Reply with the "
                   "rating line only, exactly like: Rating: [[5]]")

def read_judge_prompts(path):
    """FastChat's judge_prompts.jsonl -> {(ref, multi-turn): prompt}: its 'single' prompts, by
    category (math: with a reference) and by whether the template holds a second turn."""
    out = {}
    for where, p in D.read_jsonl(path):
        if p.get("type") != "single":
            continue
        fields = ("name", "system_prompt", "prompt_template")
        if not all(isinstance(p.get(k), str) for k in fields):
            raise D.DataError(f"{where}: a judge prompt needs {', '.join(fields)} (strings)")
        key = (p.get("category") == "math", "{answer_2}" in p["prompt_template"])
        out.setdefault(key, p)
    if missing := [k for k in GRADE_PROMPTS if k not in out]:
        raise D.DataError(f"{path}:0: no 'single' prompt for (reference, multi-turn) {missing}")
    return out

def parse_rating(text):
    """The last [[N]] in text (N a number from 1 to 10) as a float, or None."""
    found = re.findall(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", text or "")
    score = float(found[-1]) if found else None
    return score if score is not None and 1 <= score <= 10 else None

def rating_token(tok):  # ASCII digits only: "²".isdigit() is True too
    return bool(re.fullmatch(r"[0-9]+", tok.strip())) and 1 <= int(tok.strip()) <= 10

def rating_of(first, second=None):
    """--verdict logprobs: {rating: probability} from the top logprobs of the reply's first token
    (and, when that token is "1", of the second: a tokenizer that splits digits writes 10 as "1"
    "0"). -> (probabilities of 1..10 renormalized, their mean): G-Eval's probability-weighted
    score. When the first token is not "1", the chance of a "0" after a "1" is unseen: read
    as 1."""
    p = dict.fromkeys(range(1, 11), 0.0)
    for tok, prob in first.items():
        if rating_token(tok):
            p[int(tok.strip())] += prob
    if second is not None:
        zero = sum(v for t, v in second.items() if t.strip() == "0")
        p[10], p[1] = p[10] + p[1] * zero, p[1] * (1 - zero)
    total = sum(p.values())
    if not total > 0:
        return None, None
    p = {k: v / total for k, v in p.items()}
    return p, sum(k * v for k, v in p.items())

def read_answers(paths, questions="", references=""):
    """--mode single: each answer's turns to grade -> [{id, model, question_id, category, turn,
    fields (the prompt's placeholders), ref}]. Questions come with the answer (sample.py's records)
    or from --questions; reference answers from --references or the question."""
    index = lambda path: {str(r.get("question_id")): (w, r) for w, r in D.read_records([path])}
    qfile, questions = questions, index(questions) if questions else {}
    refs = index(references) if references else {}
    items, seen = [], set()
    for where, rec in D.read_records(paths):
        qid, model = rec.get("question_id"), rec.get("model_id")
        if qid is None or not isinstance(model, str):
            raise D.DataError(f"{where}: an MT-bench answer needs question_id and model_id")
        q = rec if isinstance(rec.get("turns"), list) else questions.get(str(qid), (0, None))[1]
        if q is None:
            raise D.DataError(f"{where}: question {qid} is not in the record: give --questions "
                              "question.jsonl" + (f" ({qfile} has no {qid})" if qfile else ""))
        answers = answer_turns(rec, where)
        ref = None
        if q.get("category") in NEED_REF and str(qid) in refs:
            ref = answer_turns(refs[str(qid)][1], refs[str(qid)][0])
        elif q.get("category") in NEED_REF and isinstance(q.get("reference"), list):
            ref = q["reference"]
        f = {"question": q["turns"][0], "answer": answers[0]}
        f |= {f"question_{k + 1}": t for k, t in enumerate(q["turns"])}
        f |= {f"answer_{k + 1}": t for k, t in enumerate(answers)}
        f |= {f"ref_answer_{k + 1}": t for k, t in enumerate(ref or [])}
        for turn in range(1, min(2, len(q["turns"]), len(answers)) + 1):
            rid = f"{model}/{qid}/{turn}"
            if rid in seen:
                raise D.DataError(f"{where}: a second answer of {model} to question {qid}")
            seen.add(rid)
            items.append({"id": rid, "model": model, "question_id": qid, "turn": turn,
                          "category": q.get("category"), "fields": f, "ref": bool(ref)})
    return items

def answer_turns(rec, where):
    """The turns of an answer in FastChat's format (its first choice)."""
    try:
        turns = rec["choices"][0]["turns"]
        assert isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)
    except (KeyError, IndexError, TypeError, AssertionError):
        raise D.DataError(f"{where}: needs choices: [{{index, turns: [strings]}}]") from None
    return turns

# ---- Answering: each turn from the conversation so far, including the model's own answers

def sample_groups(sample_fn, prompts, n, rngs, temps):
    """sample_fn over prompts that may differ in temperature: one call per temperature."""
    out = [None] * len(prompts)
    for t in sorted(set(temps)):
        idx = [i for i, x in enumerate(temps) if x == t]
        for i, res in zip(idx, sample_fn([prompts[i] for i in idx], n, [rngs[i] for i in idx], t)):
            out[i] = res
    return out

def answer_questions(sample_fn, tok, template, mcfg, cfg, batch, questions, rng, model, model_id):
    """The batch's questions, answered turn by turn: turn 1 from the question (n samples sharing
    its prompt), turn k of each sample from that sample's own conversation. -> records in our
    format (messages: sample 0's conversation up to the last question; responses: each sample's
    last answer, all its turns in 'turns') and FastChat's (question_id, model_id, choices).
    sample_fn is sample.py's; rng(key) the generator of a prompt or a sample's later turn."""
    temp_of = category_temperatures(cfg.category_temperature, cfg.temperature)
    qs = [questions[it["id"]] for it in batch]
    temps = [temp_of(q.get("category")) for q in qs]
    convs = [[[] for _ in range(cfg.n)] for _ in qs]  # [question][sample] -> messages so far
    answers = [[[] for _ in range(cfg.n)] for _ in qs]  # [question][sample] -> response dicts
    for k in range(max(len(q["turns"]) for q in qs)):
        # turn 1: a prompt per question, its n samples sharing it; later turns: a prompt per sample
        rows = [(i, j) for i, q in enumerate(qs) if k < len(q["turns"])
                for j in range(cfg.n if k else 1)]
        asked = {(i, j): [{"role": "user", "content": qs[i]["turns"][k]}] for i, j in rows}
        prompts, rngs = [], []
        for i, j in rows:
            ids = D.render(tok, convs[i][j] + asked[i, j], template, prompt=True)[0]
            if len(ids) >= mcfg.max_position_embeddings:
                raise D.DataError(f"question {batch[i]['id']}, turn {k + 1}: {len(ids)} tokens "
                                  f"leave no room to answer (lower --max-new-tokens)")
            prompts.append(ids)
            rngs.append(rng(batch[i]["id"] if k == 0 else f"{batch[i]['id']}/turn{k + 1}/{j}"))
        results = sample_groups(sample_fn, prompts, 1 if k else cfg.n, rngs,
                                [temps[i] for i, _ in rows])
        for (i, j), res in zip(rows, results):
            for jj, r in zip(range(j, j + len(res)), res):  # turn 1: samples 0..n-1; then j
                r["truncated"] = r["finish_reason"] == "length"
                answers[i][jj].append(r)
                convs[i][jj] = convs[i][jj] + asked[i, j] + [{"role": "assistant",
                                                              "content": r["content"]}]
    recs = []
    for it, q, conv, ans, t in zip(batch, qs, convs, answers, temps):
        responses = [a[-1] | {"turns": a} for a in ans]
        recs.append({"id": it["id"], "messages": conv[0][:-1], "responses": responses,
                     "model": model, "sampling": {"temperature": t},
                     "question_id": q["question_id"], "category": q.get("category"),
                     "turns": q["turns"], "model_id": model_id,
                     "answer_id": hashlib.sha256(f"{model_id}:{it['id']}".encode()).hexdigest(),
                     "choices": [{"index": j, "turns": [r["content"] for r in a]}
                                 for j, a in enumerate(ans)], "tstamp": time.time()}
                    | ({"reference": q["reference"]} if "reference" in q else {}))
    return recs
