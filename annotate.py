"""
LLM-as-judge over the OpenAI API. Pairwise (the default): response pairs -> Xwin-Pair preference
pairs, both orders judged (judges favour a position); --a/--b: two models' outputs, matched by id
(AlpacaEval's JSON files too). --mode single: MT-bench, each answer's turns graded 1-10.
--report OUT...: B's win rate with its length-controlled one (AlpacaEval 2.0), or the MT-bench
table of graded files side by side. The key comes from OPENAI_API_KEY only (Azure:
--base-url https://RESOURCE.openai.azure.com/openai/v1/, the deployment as --judge-model).
"""
import email.utils, json, math, os, random, re, sys, threading, time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, asdict
import data as D
import mtbench as MT
import scores as S

@dataclass
class AnnotateConfig:
    mode: str = "pair"  # pair: which of two responses is better; single: MT-bench grades 1-10
    data: list = field(default_factory=list)  # pairs to judge, JSONL: {id, messages, responses};
        # --mode single: answers (sample.py's MT-bench records, or FastChat's model_answer files)
    a: str = ""  # instead of --data: outputs of model A (JSONL), matched by id with --b
    b: str = ""  # outputs of model B
    out: str = "xwin_pair.jsonl"  # judged pairs (appended; a rerun resumes); see OUT.other.jsonl
    judge_model: str = "gpt-4o"  # judge model name (a GPT-4-class model)
    base_url: str = ""  # OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI's)
    workers: int = 8  # pairs judged concurrently
    temperature: float = 0.0  # judge sampling temperature
    max_tokens: int = 1024  # max tokens of one judge reply
    timeout: float = 120.0  # seconds per request before it counts as a timeout
    max_attempts: int = 6  # attempts per request (429, 5xx, timeouts) before the pair has failed
    backoff: float = 2.0  # seconds before the first retry; doubles, with jitter (or Retry-After)
    max_backoff: float = 120.0  # longest backoff between attempts
    verdict: str = "text"  # text: a reasoned 7-point verdict; logprobs: P(A) vs P(B) of one letter
    tie_margin: float = 0.02  # --verdict logprobs: a tie when P(first better) is this near 0.5
    inconsistent: str = "tie"  # --verdict text, the orders disagree: a tie (half a win) or drop
    retry_failed: bool = False  # judge again the pairs recorded as failed by an earlier run
    skip_bad: bool = False  # skip (and count) malformed input records instead of stopping
    price_in: float = 0.0  # $ per million prompt tokens, for a cost estimate
    price_out: float = 0.0  # $ per million completion tokens
    questions: str = ""  # --mode single: MT-bench's question.jsonl, for answers without their
        # questions (FastChat's model_answer files)
    references: str = ""  # --mode single: reference answers (FastChat's reference_answer/X.jsonl)
        # for math, reasoning and coding; else a question's own 'reference' when it has one
    judge_prompts: str = ""  # --mode single: FastChat's judge_prompts.jsonl instead of our prompts
    report: list = field(default_factory=list)  # print the report of judged or graded files (an
        # --out each) and exit: win rates; MT-bench tables side by side
    seed: int = 1337  # backoff jitter

# ---- The judging prompts: edit freely, but keep the verdict format in step with VERDICTS below.
JUDGE_SYSTEM = ("You are an impartial expert judge of AI assistant replies. You compare two "
                "replies to the same conversation and decide which one serves the user better.")
INTRO = ("Below is a conversation between a user and an AI assistant, then two candidate replies "
         "to the user's last message.")
PAIR = ("\n\n<conversation>\n{conversation}\n</conversation>\n\n"
        "<reply A>\n{a}\n</reply A>\n\n<reply B>\n{b}\n</reply B>\n\n")
JUDGE_PROMPT = INTRO + """ Decide which reply is better.

Judge helpfulness, correctness, relevance, depth and clarity, and how well the reply follows the \
user's instructions and any system message; take the earlier turns of the conversation into \
account. Do not let the order of the replies, their length, or the labels A and B sway you: a \
longer reply is better only when the extra content helps. If they are equally good (or equally \
bad), say tie.""" + PAIR + """\
First explain your reasoning briefly (at most five sentences). Then end with a last line that \
gives your verdict in exactly this format, with one of the seven options:
Verdict: [[A much better]] or [[A better]] or [[A slightly better]] or [[tie]] or \
[[B slightly better]] or [[B better]] or [[B much better]]"""
# --verdict logprobs: short, no reasoning asked, a single letter (a small model follows this)
LETTER_PROMPT = INTRO + PAIR + "Which reply is better: more helpful, correct and relevant? " \
    "Answer with one letter: A or B."
REMINDER = ("Your reply did not end with a verdict in the required format. Reply with the verdict "
            "line only, exactly like: Verdict: [[A better]] (options: A much better, A better, "
            "A slightly better, tie, B slightly better, B better, B much better).")
VERDICTS = {"A much better": 3, "A better": 2, "A slightly better": 1, "tie": 0,  # +: A wins
            "B slightly better": -1, "B better": -2, "B much better": -3}

def judge_messages(messages, first, second, prompt=JUDGE_PROMPT):
    conv = "\n\n".join(f"[{m['role'].capitalize()}]\n{m['content']}" for m in messages)
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": prompt.format(conversation=conv, a=first, b=second)}]

def parse_verdict(text):
    """The score of the last `Verdict: [[...]]` line in text (+3 .. -3 for the reply shown first),
    or None: no verdict, an unknown one, or several on the line (the format echoed back)."""
    lines = re.findall(r"verdict\W*(\[\[.*)", text or "", re.I)
    found = re.findall(r"\[\[([^\]]+)\]\]", lines[-1]) if lines else []
    scores = {k.lower(): v for k, v in VERDICTS.items()}
    return scores.get(" ".join(found[0].lower().split())) if len(found) == 1 else None

def sign(s):
    return (s > 0) - (s < 0)

def combine(s_ab, s_ba, inconsistent="tie"):
    """--verdict text: scores for A (the first response) in the two orders -> (status, winner,
    strength). Only a winner (or tie) named in both orders counts; strength is the mean degree."""
    if sign(s_ab) != sign(s_ba):
        return ("tie", "tie", 0.0) if inconsistent == "tie" else ("inconsistent", None, 0.0)
    if s_ab == 0:
        return "tie", "tie", 0.0
    return "judged", "A" if s_ab > 0 else "B", (abs(s_ab) + abs(s_ba)) / 2

STRENGTHS = ((0.3, 3.0), (0.15, 2.0))  # |p - 0.5| at least this -> strength; else 1
def combine_probs(p_ab, p_ba, tie_margin):
    """--verdict logprobs: P(A), P(B) in order AB (the first response shown as A) and BA ->
    (status, winner, strength, [P(first better) in AB, in BA]). The mean cancels position bias:
        p = ( P_AB(A) / (P_AB(A) + P_AB(B))  +  P_BA(B) / (P_BA(A) + P_BA(B)) ) / 2"""
    first = [p_ab["A"] / (p_ab["A"] + p_ab["B"]), p_ba["B"] / (p_ba["A"] + p_ba["B"])]
    p = sum(first) / 2
    if abs(p - 0.5) < tie_margin:
        return "tie", "tie", 0.0, first
    strength = next((s for d, s in STRENGTHS if abs(p - 0.5) >= d), 1.0)
    return "judged", "A" if p > 0.5 else "B", strength, first

def log(*a):
    print(*a, file=sys.stderr, flush=True)

def read_pairs(cfg, paths, n):
    """-> {id: {id, messages, the first n responses}}. A response is a string or {"content": ...};
    AlpacaEval's {"instruction", "output"} records are read too. --skip-bad skips and counts."""
    out, skipped = {}, 0
    for where, rec in D.read_records(paths):
        try:
            rec = D.alpaca_record(rec)
            if not isinstance(rid := rec.get("id"), str) or not rid:
                raise D.DataError(f"{where}: needs a string 'id'")
            msgs = D.get_messages(rec, where, prompt=True)
            rs = rec.get("responses", [rec["output"]] if "output" in rec else None)
            rs = [r.get("content") if isinstance(r, dict) else r
                  for r in rs[:n]] if isinstance(rs, list) else []
            if len(rs) < n or not all(isinstance(r, str) for r in rs):
                what = "two responses" if n == 2 else "a response"
                raise D.DataError(f"{where}: 'responses' must list {what} (strings or "
                                  "{'content': ...})")
            if rid in out:
                raise D.DataError(f"{where}: duplicate id {rid!r}")
            out[rid] = {"id": rid, "messages": msgs, "responses": rs} | (
                {"instruction_difficulty": d}  # AlpacaEval's, for the LC win rate's fit
                if isinstance(d := rec.get("instruction_difficulty"), (int, float)) else {})
        except D.DataError:
            if not cfg.skip_bad:
                raise
            skipped += 1
    if skipped:
        log(f"{' '.join(paths)}: skipped {skipped} malformed records (--skip-bad)")
    return out

def load_pairs(cfg):
    if not (cfg.a or cfg.b or cfg.data):
        raise SystemExit("error: give --data PAIRS.jsonl, or --a FILE --b FILE (or --report FILE)")
    if not (cfg.a or cfg.b):
        return list(read_pairs(cfg, cfg.data, 2).values())
    a, b = read_pairs(cfg, [cfg.a], 1), read_pairs(cfg, [cfg.b], 1)  # A's response vs B's
    both = [i for i in a if i in b]
    if len(both) < max(len(a), len(b)):
        log(f"{len(a) - len(both)} ids only in --a, {len(b) - len(both)} only in --b: not judged")
    return [a[i] | {"responses": a[i]["responses"] + b[i]["responses"]} for i in both]

# ---- The judge: our own retry loop (the client's is off), so its behaviour is explicit
class Failed(Exception):  # this pair failed: recorded in OUT.other.jsonl, the run goes on
    pass

class Fatal(BaseException):  # a bad key or an unknown model: every request would fail alike
    pass  # (not an Exception: it passes pair()'s handler and stops the run)

def redact(text, key):
    text = text.replace(key, "***") if key else text
    return re.sub(r"sk-[A-Za-z0-9_\-*]{4,}", "sk-***", text)  # OpenAI echoes masked keys in 401s

def retry_after(headers):
    """Seconds the server asked us to wait (retry-after-ms, or Retry-After: seconds or a date)."""
    ms, v = headers.get("retry-after-ms"), (headers.get("retry-after") or "").strip() or "0"
    try:
        return (float(ms) / 1000 if ms else float(v) if re.fullmatch(r"[\d.]+", v) else
                max(0.0, email.utils.parsedate_to_datetime(v).timestamp() - time.time()))
    except (ValueError, TypeError):
        return 0.0

class Judge:
    def __init__(self, cfg):
        import openai
        self.cfg, self.openai, self.lock = cfg, openai, threading.Lock()
        base = cfg.base_url or os.environ.get("OPENAI_BASE_URL", "")
        local = re.match(r"https?://(localhost|127\.|\[::1\])", base)  # chat.py --serve, vLLM
        self.key = os.environ.get("OPENAI_API_KEY", "") or ("local" if local else "")  # any key
        if not self.key:
            raise SystemExit("error: set OPENAI_API_KEY "
                             "(or point --base-url at a local OpenAI-compatible server)")
        self.client = openai.OpenAI(api_key=self.key, base_url=base or None, max_retries=0,
                                    timeout=cfg.timeout)
        self.usage, self.rng = Counter(), random.Random(cfg.seed)
        self.prompts = (MT.read_judge_prompts(cfg.judge_prompts) if cfg.judge_prompts else
                        MT.RATING_PROMPTS if cfg.verdict == "logprobs" else MT.GRADE_PROMPTS)

    def ask(self, messages, **extra):
        """-> the reply's first choice (None if it has none). extra: request fields over ours."""
        cfg, openai = self.cfg, self.openai
        request = dict(model=cfg.judge_model, messages=messages, temperature=cfg.temperature,
                       max_tokens=cfg.max_tokens) | extra
        for attempt in range(1, cfg.max_attempts + 1):
            try:
                r = self.client.chat.completions.create(**request)
                with self.lock:  # r.usage may be None
                    self.usage.update(requests=1, **{k: getattr(r.usage, k, 0) or 0 for k in
                                                     ("prompt_tokens", "completion_tokens")})
                return r.choices[0] if r.choices else None
            except openai.APIStatusError as e:
                code, msg = e.status_code, redact(str(e.message), self.key)
                if code in (401, 403, 404):
                    raise Fatal(f"HTTP {code} from the judge API: {msg}") from None
                if code not in (408, 409, 429) and code < 500:  # a wrong request: don't retry
                    raise Failed(f"HTTP {code}: {msg}") from None
                error, wait = f"HTTP {code}", retry_after(e.response.headers)
            except openai.APIConnectionError as e:  # a timeout is one too
                timeout = isinstance(e, openai.APITimeoutError)
                error, wait = (f"timeout ({cfg.timeout:g}s)" if timeout else
                               f"connection error ({redact(str(e), self.key)})"), 0.0
            except openai.APIError as e:  # e.g. a 200 whose body is not a chat completion
                raise Failed(f"{type(e).__name__}: {redact(str(e), self.key)}") from None
            if attempt == cfg.max_attempts:
                raise Failed(f"{error}, after {attempt} attempts")
            with self.lock:
                self.usage["retries"] += 1
                jitter = self.rng.uniform(0.5, 1.0)
            time.sleep(max(jitter * min(cfg.max_backoff, cfg.backoff * 2 ** (attempt - 1)), wait))

    def verdict(self, messages, parse=parse_verdict, reminder=REMINDER):
        """-> (score, rationale text). An unparseable reply gets one reminder of the format."""
        text = lambda c: (c.message.content or "") if c is not None else ""
        first = text(self.ask(messages))
        if (score := parse(first)) is not None:
            return score, first
        again = text(self.ask(messages + [{"role": "assistant", "content": first},
                                          {"role": "user", "content": reminder}]))
        if (score := parse(again)) is None:
            raise Failed(f"unparseable judge reply: {first!r}; after a reminder: {again!r}")
        return score, f"{first}\n{again}"

    def top_tokens(self, messages, n):
        """-> the reply's first n tokens, each (token, {token: probability} from its
        top_logprobs, the token alone if the server sent none), and the reply's logprobs."""
        choice = self.ask(messages, max_tokens=n, temperature=0.0, logprobs=True, top_logprobs=20)
        lps = choice and choice.logprobs
        return [(h.token, {t.token: math.exp(t.logprob) for t in (h.top_logprobs or [h])})
                for h in (lps.content or [] if lps else [])], lps

    def letters(self, messages):
        """-> {"A": P(A), "B": P(B)} from a one-token answer's top_logprobs ("A", " a": both A)."""
        heads, lps = self.top_tokens(messages, 1)
        top = heads[0][1] if heads else {}
        p = {k: sum(v for t, v in top.items() if t.strip().upper() == k) for k in "AB"}
        if not p["A"] + p["B"] > 0:
            raise Failed(f"neither A nor B among the judge's likeliest first tokens: "
                         f"{list(top)!r}"
                         + ("" if lps else " (the server returned no logprobs)"))
        return p

    def pair(self, p):
        """One pair, judged in both orders (AB: the first shown as A; BA) -> (status, record)."""
        (a, b), msgs, cfg = p["responses"], p["messages"], self.cfg
        rec = {k: p[k] for k in ("id", "messages", "instruction_difficulty") if k in p}
        both = ((a, b), (b, a))  # the two orders
        try:
            if a == b:  # nothing to judge
                status, strength, judge = "tie", 0.0, {"winner": "tie", "identical": True}
            elif cfg.verdict == "logprobs":
                p_ab, p_ba = [self.letters(judge_messages(msgs, *o, LETTER_PROMPT)) for o in both]
                status, winner, strength, first = combine_probs(p_ab, p_ba, cfg.tie_margin)
                judge = {"verdict": "logprobs", "letter_probs": [p_ab, p_ba],
                         "orders": ["AB", "BA"], "p_first_better": first, "p": sum(first) / 2,
                         "winner": winner, "consistent": len({sign(f - 0.5) for f in first}) == 1}
            else:
                (s_ab, r_ab), (s_ba, r_ba) = [self.verdict(judge_messages(msgs, *o)) for o in both]
                status, winner, strength = combine(s_ab, -s_ba, cfg.inconsistent)
                label = {v: k for k, v in VERDICTS.items()}
                judge = {"verdicts": [label[s_ab], label[s_ba]], "scores_for_a": [s_ab, -s_ba],
                         "orders": ["AB", "BA"], "rationales": [r_ab, r_ba], "winner": winner,
                         "consistent": sign(s_ab) == sign(-s_ba)}
        except Exception as e:  # recorded, never lost: the run goes on with the other pairs
            msg = str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}"
            return "failed", rec | {"status": "failed", "responses": [a, b],
                                    "error": redact(msg, self.key)}
        judge = {"model": cfg.judge_model} | judge
        if status != "judged":
            return status, rec | {"status": status, "responses": [a, b], "judge": judge}
        chosen, rejected = (a, b) if judge["winner"] == "A" else (b, a)
        return status, rec | dict(chosen=chosen, rejected=rejected, strength=strength, judge=judge)

    def rating(self, messages, n=8):
        """--verdict logprobs, MT-bench: the rating alone -> (its probability-weighted mean over
        1..10, the probabilities), read at the reply's first digit among its first n tokens: a
        small judge asked for the number alone still writes "Rating: [[" before it."""
        heads, lps = self.top_tokens(messages, n)
        # G-Eval reads the first token's distribution whatever was sampled: with no digit written,
        # position 0's digits, however unlikely (rating_mass says how much they weighed)
        at = next((i for i, (t, _) in enumerate(heads) if MT.rating_token(t)), 0)
        first = heads[at][1] if heads else {}
        one = at + 1 < len(heads) and heads[at][0].strip() == "1"  # then "10" may be "1" "0"
        probs, score = MT.rating_of(first, heads[at + 1][1] if one else None)
        if probs is None:
            raise Failed(f"no rating 1-10 among the judge's likeliest first tokens: "
                         f"{list(first)!r}" + ("" if lps else " (no logprobs returned)"))
        return score, probs, sum(p for t, p in first.items() if MT.rating_token(t))

    def grade(self, item):
        """One turn of an MT-bench answer, graded 1-10 -> (status, record): FastChat's judgment
        fields (question_id, model, judge [model, prompt], user_prompt, judgment, score, turn)."""
        cfg, turn = self.cfg, item["turn"]
        prompt = self.prompts[(item["ref"], turn == 2)]
        rec = {k: item[k] for k in ("id", "question_id", "model", "turn", "category")}
        rec["judge"] = [cfg.judge_model, prompt["name"]]
        try:
            user = prompt["prompt_template"].format(**item["fields"])
            if cfg.verdict == "logprobs" and cfg.judge_prompts:  # theirs ask for reasons first
                user += "\n\n" + MT.RATE_ONLY
            messages = [{"role": "system", "content": prompt["system_prompt"]},
                        {"role": "user", "content": user}]
            if cfg.verdict == "logprobs":
                score, probs, mass = self.rating(messages)
                rec |= {"rating_probs": {str(k): v for k, v in probs.items()}, "judgment": "",
                        "rating_mass": mass}
            else:
                score, rec["judgment"] = self.verdict(messages, MT.parse_rating,
                                                      MT.RATING_REMINDER)
        except Exception as e:  # recorded, never lost: the run goes on with the other answers
            msg = str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}"
            return "failed", rec | {"status": "failed", "error": redact(msg, self.key)}
        return "judged", rec | {"user_prompt": user, "score": score, "verdict": cfg.verdict,
                                "tstamp": time.time()}

# ---- Report: B's win rate over A, raw and length-controlled; MT-bench tables of graded files
def other_path(out):
    return (out[:-6] if out.endswith(".jsonl") else out) + ".other.jsonl"

def judged_records(out):
    """An --out and its side file -> their records, one per id."""
    if not os.path.exists(out):
        raise D.DataError(f"{out}:0: no such file")
    recs = {}
    for path in (out, other_path(out)):  # a retry's record supersedes the failure
        for _, r in D.read_jsonl(path) if os.path.exists(path) and os.path.getsize(path) else ():
            if r.get("status") != "failed" or r["id"] not in recs:
                recs[r["id"]] = r
    return list(recs.values())

def report(out, show=False):
    """A pairwise --out: B's AlpacaEval-style win rate over A (ties count half) with its standard
    error, and its length-controlled win rate (scores.lc_win_rate) with a bootstrap one."""
    r = S.win_rate(judged_records(out))
    if show:
        print("{out}: {n} pairs judged (B wins {wins_b}, ties {ties}, A wins {wins_a}); "
              "{inconsistent_dropped} inconsistent dropped, {failed} failed\nwin rate of B over "
              "A: {win_rate:.2f}% ± {standard_error:.2f} (standard error; ties count half)\nswap "
              "consistency: {swap_consistency:.1f}% (same verdict with the replies in either "
              "order)".format(out=out, **r))
    if show and "lc_win_rate" in r:
        print("length-controlled win rate of B: {lc_win_rate:.2f}% ± {lc_standard_error:.2f} "
              "(bootstrap standard error; length coefficient {length_coef:.2f}{term})\naverage "
              "length (characters): A {avg_len_a:.0f}, B {avg_len_b:.0f}".format(
                  term=", with the instruction term" * r["lc_instruction_term"], **r))
    return r

def report_files(paths):
    """--report: each pairwise file's win rates; the graded files' MT-bench table, one column per
    model (files side by side, or several models in one file). -> the numbers."""
    graded, out = {}, {}
    for path in paths:
        recs = judged_records(path)
        if not any("turn" in r for r in recs):
            out[path] = report(path, show=True)
            continue
        for model, numbers in S.mtbench(recs).items():
            graded[f"{model} ({path})" if model in graded else model] = numbers
    if graded:
        print(S.mtbench_table(graded))
    return out | graded

def run():
    cfg = D.parse_config(AnnotateConfig)
    if cfg.report:
        return report_files(cfg.report)
    for name, ok in (("inconsistent", ("tie", "drop")), ("verdict", ("text", "logprobs")),
                     ("mode", ("pair", "single"))):
        if getattr(cfg, name) not in ok:
            raise SystemExit(f"error: --{name} must be {' or '.join(ok)}")
    log(json.dumps(asdict(cfg)))
    single = cfg.mode == "single"
    if single and (cfg.a or cfg.b or not cfg.data):
        raise SystemExit("error: --mode single grades --data ANSWERS.jsonl (no --a/--b)")
    items = (MT.read_answers(cfg.data, cfg.questions, cfg.references) if single else
             load_pairs(cfg))
    other = other_path(cfg.out)
    what = "answer turns" if single else "pairs"
    done, done_other = D.truncate_torn(cfg.out), D.truncate_torn(other)
    rest = [r for _, r in D.read_jsonl(other)] if done_other else []
    failed = {r["id"] for r in rest if r.get("status") == "failed"}
    if failed and cfg.retry_failed:  # the side file without them (a kill loses nothing)
        D.write_jsonl_atomic(other, [r for r in rest if r.get("status") != "failed"])
        done_other -= failed
    elif failed:
        log(f"{len(failed)} {what} failed in an earlier run: skipped (--retry-failed redoes them)")
    todo = [p for p in items if p["id"] not in done | done_other]
    log(f"{len(items)} {what}, {len(items) - len(todo)} already done, {len(todo)} to judge with "
        f"{cfg.judge_model}")
    if not todo:
        return report_files([cfg.out])
    judge, counts = Judge(cfg), dict.fromkeys(("judged", "tie", "inconsistent", "failed"), 0)
    from tqdm import tqdm
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    for path in (cfg.out, other):
        D.append_jsonl(path, [])  # both files exist, even when empty
    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        work = judge.grade if single else judge.pair
        bar = tqdm(as_completed([pool.submit(work, p) for p in todo]), total=len(todo),
                   desc="judge", dynamic_ncols=True, file=sys.stderr)
        try:
            for fut in bar:
                status, rec = fut.result()  # only this thread writes: one whole line per record
                D.append_jsonl(cfg.out if status == "judged" else other, [rec])
                counts[status] += 1
                bar.set_postfix(counts)
        except (Fatal, KeyboardInterrupt) as e:  # stop now: in-flight items are redone on a rerun
            bar.close()
            fatal = isinstance(e, Fatal)
            log(f"error: {e}" if fatal else "interrupted: rerun the same command to resume")
            os._exit(1 if fatal else 130)  # don't wait for the workers' requests
    u = judge.usage
    cost = (u["prompt_tokens"] * cfg.price_in + u["completion_tokens"] * cfg.price_out) / 1e6
    log(f"done: {counts['judged']} judged {what} -> {cfg.out}; {counts['tie']} ties, "
        f"{counts['inconsistent']} inconsistent, {counts['failed']} failed -> {other}")
    log(f"judge usage: {u['requests']} requests ({u['retries']} retries), {u['prompt_tokens']} "
        f"prompt + {u['completion_tokens']} completion tokens"
        + (f", estimated cost ${cost:.4f}" if cfg.price_in or cfg.price_out else ""))
    return report_files([cfg.out])

if __name__ == "__main__":
    D.run_main(run)
