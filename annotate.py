"""
LLM-as-judge over the OpenAI API: turn pairs of responses into judged preference pairs (Xwin-Pair),
and report AlpacaEval-style win rates. Each pair is judged twice, once in each order, because judges
favour a position; only verdicts that agree in both orders become chosen/rejected pairs (or, with
--verdict logprobs, the two orders' probabilities are averaged).

    python annotate.py --data pairs.jsonl --out xwin_pair.jsonl --workers 8      # sample.py --n 2 output
    python annotate.py --a ref.jsonl --b ours.jsonl --out judged.jsonl             # two models, matched by id
    python annotate.py --report judged.jsonl                                       # win rate of B over A
    python annotate.py ... --base-url http://127.0.0.1:8000/v1 --judge-model x    # vLLM, chat.py --serve, ...
    python annotate.py ... --verdict logprobs                                      # a weak judge: P(A) vs P(B)

Two ways to read a verdict (--verdict). `text` (the default, for GPT-4-class judges): the judge reasons
briefly and ends with `Verdict: [[A better]]` on a 7-point scale. `logprobs` (for weak or small judges,
which cannot keep a format, and for cheap runs): a short prompt asks for one letter, A or B, and the
request (max_tokens 1, temperature 0, logprobs with the top 20) returns the judge's probabilities of
both letters, P(A) and P(B), read from the first token ("A", " a", ... all count; a letter outside the
top 20 has probability 0; neither letter there = unparseable -> failed). Averaging the two orders
cancels the judge's position bias:
    p = ( P_AB(A) / (P_AB(A) + P_AB(B))  +  P_BA(B) / (P_BA(A) + P_BA(B)) ) / 2
is the probability that the first response is better. |p - 0.5| < --tie-margin is a tie; otherwise the
likelier response is chosen, strength 3 if |p - 0.5| >= 0.3, 2 if >= 0.15, else 1. --inconsistent does
not apply (orders that disagree are averaged, not voted); swap consistency (both orders prefer the same
response) is still recorded and reported. This works with any server that returns logprobs: OpenAI's
API (gpt-4o, gpt-4o-mini, gpt-4.1; top_logprobs up to 20), vLLM, and chat.py --serve.

The key comes from OPENAI_API_KEY only (never printed or written). Azure OpenAI: pass its v1 endpoint,
--base-url https://RESOURCE.openai.azure.com/openai/v1/, and the deployment name as --judge-model.

Outputs. --out holds only decisive pairs {"id", "messages", "chosen", "rejected", "strength", "judge"},
so train_rm.py and dpo.py can read it as preference pairs as is; strength is the mean degree of the two
verdicts (1 slightly better, 2 better, 3 much better; --verdict logprobs: the buckets above), Llama-2's
margin scale. Everything else, ties (both orders say tie, or the orders disagree and --inconsistent is
tie), inconsistent pairs dropped (--inconsistent drop) and failed pairs (attempts exhausted, unparseable
replies), goes to OUT.other.jsonl with a "status" of tie / inconsistent / failed. A rerun skips ids in
either file; --retry-failed judges the failed ones again. --report reads both files.
"""
import json, math, os, random, re, sys, threading, time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, asdict
import data as D

@dataclass
class AnnotateConfig:
    data: list = field(default_factory=list)  # pairs to judge (JSONL): {"id", "messages", "responses": [a, b]}
    a: str = ""  # instead of --data: outputs of model A (JSONL, e.g. sample.py's), matched by id with --b
    b: str = ""  # outputs of model B
    out: str = "xwin_pair.jsonl"  # judged pairs (appended; a rerun resumes); ties and failures in OUT.other.jsonl
    judge_model: str = "gpt-4o"  # judge model name (a GPT-4-class model)
    base_url: str = ""  # OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else api.openai.com)
    workers: int = 8  # pairs judged concurrently
    temperature: float = 0.0  # judge sampling temperature
    max_tokens: int = 1024  # max tokens of one judge reply
    timeout: float = 120.0  # seconds per request before it counts as a timeout
    max_attempts: int = 6  # attempts per request (429, 5xx, timeouts) before the pair is recorded as failed
    backoff: float = 2.0  # seconds before the first retry; doubles each time, with jitter (Retry-After wins if longer)
    max_backoff: float = 120.0  # longest backoff between attempts
    verdict: str = "text"  # text: a reasoned 7-point verdict; logprobs: P(A) vs P(B) of a one-letter answer (weak judges)
    tie_margin: float = 0.02  # --verdict logprobs: a tie when the order-averaged P(first better) is within this of 0.5
    inconsistent: str = "tie"  # --verdict text, the two orders disagree: record a tie (counted half in --report) or drop
    retry_failed: bool = False  # judge again the pairs recorded as failed by an earlier run
    skip_bad: bool = False  # skip (and count) malformed input records instead of stopping
    price_in: float = 0.0  # $ per million prompt tokens, for a cost estimate
    price_out: float = 0.0  # $ per million completion tokens
    report: str = ""  # print the win-rate report of this judged file (an --out of annotate.py) and exit
    seed: int = 1337  # backoff jitter

# ----------------------------------------------------------------------------------------------------
# The judging prompt: edit freely, but keep the verdict format in step with VERDICTS below.

JUDGE_SYSTEM = ("You are an impartial expert judge of AI assistant replies. You compare two replies to the same "
                "conversation and decide which one serves the user better.")

JUDGE_PROMPT = """Below is a conversation between a user and an AI assistant, then two candidate replies to the user's last message. Decide which reply is better.

Judge helpfulness, correctness, relevance, depth and clarity, and how well the reply follows the user's instructions and any system message; take the earlier turns of the conversation into account. Do not let the order of the replies, their length, or the labels A and B sway you: a longer reply is better only when the extra content helps. If they are equally good (or equally bad), say tie.

<conversation>
{conversation}
</conversation>

<reply A>
{a}
</reply A>

<reply B>
{b}
</reply B>

First explain your reasoning briefly (at most five sentences). Then end with a last line that gives your verdict in exactly this format, with one of the seven options:
Verdict: [[A much better]] or [[A better]] or [[A slightly better]] or [[tie]] or [[B slightly better]] or [[B better]] or [[B much better]]"""

REMINDER = ("Your reply did not end with a verdict in the required format. Reply with the verdict line only, "
            "exactly like: Verdict: [[A better]] (options: A much better, A better, A slightly better, tie, "
            "B slightly better, B better, B much better).")

VERDICTS = {"A much better": 3, "A better": 2, "A slightly better": 1, "tie": 0,  # + : the reply shown as A wins
            "B slightly better": -1, "B better": -2, "B much better": -3}

# --verdict logprobs: short, no reasoning asked, a single letter (a small model follows this; GPT-4 too)
LETTER_PROMPT = """Below is a conversation between a user and an AI assistant, then two candidate replies to the user's last message.

<conversation>
{conversation}
</conversation>

<reply A>
{a}
</reply A>

<reply B>
{b}
</reply B>

Which reply is better: more helpful, correct and relevant? Answer with one letter: A or B."""

def judge_messages(messages, first, second, prompt=JUDGE_PROMPT):
    conv = "\n\n".join(f"[{m['role'].capitalize()}]\n{m['content']}" for m in messages)
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": prompt.format(conversation=conv, a=first, b=second)}]

def letter_probs(choice):
    """{"A": P(A), "B": P(B)} from the first generated token's top_logprobs (tokens compared after strip(),
    case-insensitive; variants such as "A" and " A" add up), or None when neither letter is there."""
    content = choice.logprobs.content if choice is not None and choice.logprobs else None
    if not content:
        return None
    p = {"A": 0.0, "B": 0.0}
    for t in content[0].top_logprobs or [content[0]]:
        key = t.token.strip().upper()
        if key in p:
            p[key] += math.exp(t.logprob)
    return p if p["A"] + p["B"] > 0 else None

STRENGTHS = ((0.3, 3.0), (0.15, 2.0))  # |p - 0.5| at least this -> strength; else 1

def combine_probs(p_ab, p_ba, tie_margin):
    """Letter probabilities of the two orders (AB: the first response shown as A; BA: as B) -> (status,
    winner, strength, [P(first response better) in order AB, in order BA]); their mean p decides."""
    first = [p_ab["A"] / (p_ab["A"] + p_ab["B"]), p_ba["B"] / (p_ba["A"] + p_ba["B"])]
    p = sum(first) / 2
    if abs(p - 0.5) < tie_margin:
        return "tie", "tie", 0.0, first
    return "judged", "A" if p > 0.5 else "B", next((s for d, s in STRENGTHS if abs(p - 0.5) >= d), 1.0), first

def parse_verdict(text):
    """The score of the last `Verdict: [[...]]` line in text (+3 .. -3 for the reply shown first), or
    None: no verdict, an unknown one, or several on the line (the format echoed back)."""
    lines = re.findall(r"verdict\W*(\[\[.*)", text or "", re.I)
    found = re.findall(r"\[\[([^\]]+)\]\]", lines[-1]) if lines else []
    return {k.lower(): v for k, v in VERDICTS.items()}.get(" ".join(found[0].lower().split())) if len(found) == 1 else None

def sign(s):
    return (s > 0) - (s < 0)

def combine(s_ab, s_ba, inconsistent="tie"):
    """Scores for A (the first response) from the two orders -> (status, winner, strength). Consistent
    means both orders name the same winner (or both say tie); strength is the mean of the two degrees."""
    if sign(s_ab) != sign(s_ba):
        return ("tie", "tie", 0.0) if inconsistent == "tie" else ("inconsistent", None, 0.0)
    if s_ab == 0:
        return "tie", "tie", 0.0
    return "judged", "A" if s_ab > 0 else "B", (abs(s_ab) + abs(s_ba)) / 2

def log(*a):
    print(*a, file=sys.stderr, flush=True)

# ----------------------------------------------------------------------------------------------------
# Data: pairs to judge, or two models' outputs matched by id

def parse_record(where, rec, n):
    """-> (id, prompt messages, the first n responses). Responses are strings or {"content": ...} (as
    sample.py writes them); AlpacaEval's {"instruction", "output"} records are read too."""
    rid = rec.get("id")
    if not isinstance(rid, str) or not rid:
        raise D.DataError(f"{where}: needs a string 'id'")
    if "messages" not in rec and isinstance(rec.get("instruction"), str):
        rec = rec | {"messages": [{"role": "user", "content": rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")}]}
    msgs = D.get_messages(rec, where, prompt=True)
    rs = rec.get("responses", [rec["output"]] if "output" in rec else None)
    rs = [r.get("content") if isinstance(r, dict) else r for r in rs] if isinstance(rs, list) else []
    if len(rs) < n or not all(isinstance(r, str) for r in rs[:n]):
        raise D.DataError(f"{where}: 'responses' must list {'two responses' if n == 2 else 'a response'} (strings or {{'content': ...}})")
    return rid, msgs, rs[:n]

def load_pairs(cfg):
    def records(paths, n):
        out, skipped = {}, 0
        for where, rec in D.read_records(paths):
            try:
                rid, msgs, rs = parse_record(where, rec, n)
                if rid in out:
                    raise D.DataError(f"{where}: duplicate id {rid!r}")
                out[rid] = msgs, rs
            except D.DataError:
                if not cfg.skip_bad:
                    raise
                skipped += 1
        if skipped:
            log(f"{' '.join(paths)}: skipped {skipped} malformed records (--skip-bad)")
        return out

    if cfg.a or cfg.b:  # two models' outputs for the same prompts: A's response vs B's
        a, b = records([cfg.a], 1), records([cfg.b], 1)
        both = [i for i in a if i in b]
        if len(both) < max(len(a), len(b)):
            log(f"{len(a) - len(both)} ids only in --a and {len(b) - len(both)} only in --b: not judged")
        return [{"id": i, "messages": a[i][0], "responses": a[i][1] + b[i][1]} for i in both]
    if not cfg.data:
        raise SystemExit("error: give --data PAIRS.jsonl, or --a FILE --b FILE (or --report FILE)")
    return [{"id": i, "messages": msgs, "responses": rs} for i, (msgs, rs) in records(cfg.data, 2).items()]

# ----------------------------------------------------------------------------------------------------
# The judge: our own retry loop (the client's is off) so the behaviour is explicit and testable

class Failed(Exception):
    pass

class Fatal(Exception):  # a bad key or an unknown model: every request would fail the same way
    pass

def redact(text, key):
    text = text.replace(key, "***") if key else text
    return re.sub(r"sk-[A-Za-z0-9_\-*]{4,}", "sk-***", text)  # OpenAI echoes masked keys in 401 errors

def retry_after(headers):
    """Seconds the server asked us to wait (retry-after-ms, or Retry-After in seconds or as a date)."""
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        v = headers.get("retry-after")
        if v:
            import email.utils
            return float(v) if re.fullmatch(r"[\d.]+", v.strip()) else max(0.0, email.utils.parsedate_to_datetime(v).timestamp() - time.time())
    except (ValueError, TypeError):
        pass
    return 0.0

def reply_text(choice):
    return (choice.message.content or "") if choice is not None else ""

class Judge:
    def __init__(self, cfg):
        import openai
        self.cfg, self.openai, self.lock = cfg, openai, threading.Lock()
        self.key = os.environ.get("OPENAI_API_KEY", "")
        base = cfg.base_url or os.environ.get("OPENAI_BASE_URL", "")
        if not self.key and re.match(r"https?://(localhost|127\.|\[::1\])", base):
            self.key = "local"  # local servers (chat.py --serve, vLLM) take any key
        if not self.key:
            raise SystemExit("error: set OPENAI_API_KEY (or point --base-url at a local OpenAI-compatible server)")
        self.client = openai.OpenAI(api_key=self.key, base_url=base or None, max_retries=0, timeout=cfg.timeout)
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "retries": 0}
        self.rng = random.Random(cfg.seed)

    def ask(self, messages, **extra):
        """-> the reply's first choice (None if it has none). extra: request fields that override ours."""
        cfg, openai = self.cfg, self.openai
        for attempt in range(1, cfg.max_attempts + 1):
            wait = 0.0
            try:
                r = self.client.chat.completions.create(**dict(model=cfg.judge_model, messages=messages,
                                                               temperature=cfg.temperature, max_tokens=cfg.max_tokens) | extra)
                with self.lock:
                    self.usage["requests"] += 1
                    if r.usage:
                        self.usage["prompt_tokens"] += r.usage.prompt_tokens or 0
                        self.usage["completion_tokens"] += r.usage.completion_tokens or 0
                return r.choices[0] if r.choices else None
            except openai.APIStatusError as e:
                code, msg = e.status_code, redact(str(e.message), self.key)
                if code in (401, 403, 404):
                    raise Fatal(f"HTTP {code} from the judge API: {msg}") from None
                if code not in (408, 409, 429) and code < 500:  # this request is wrong; retrying won't help
                    raise Failed(f"HTTP {code}: {msg}") from None
                error, wait = f"HTTP {code}", retry_after(e.response.headers)
            except openai.APITimeoutError:
                error = f"timeout ({cfg.timeout:g}s)"
            except openai.APIConnectionError as e:
                error = f"connection error ({redact(str(e), self.key)})"
            except openai.APIError as e:  # e.g. a 200 whose body is not a chat completion
                raise Failed(f"{type(e).__name__}: {redact(str(e), self.key)}") from None
            if attempt == cfg.max_attempts:
                raise Failed(f"{error}, after {attempt} attempts")
            with self.lock:
                self.usage["retries"] += 1
                delay = min(cfg.max_backoff, cfg.backoff * 2 ** (attempt - 1)) * self.rng.uniform(0.5, 1.0)
            time.sleep(max(delay, wait))

    def letters(self, messages):
        """-> {"A": P(A), "B": P(B)} of a one-token answer (--verdict logprobs)."""
        choice = self.ask(messages, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20)
        p = letter_probs(choice)
        if p is None:
            top = choice.logprobs.content[0].top_logprobs if choice and choice.logprobs and choice.logprobs.content else []
            raise Failed(f"neither A nor B among the judge's likeliest first tokens: {[t.token for t in top]!r}"
                         + ("" if choice and choice.logprobs else " (the server returned no logprobs)"))
        return p

    def verdict(self, messages):
        """-> (score, rationale text). An unparseable reply gets one reminder of the format."""
        text = reply_text(self.ask(messages))
        score = parse_verdict(text)
        if score is None:
            again = reply_text(self.ask(messages + [{"role": "assistant", "content": text}, {"role": "user", "content": REMINDER}]))
            score = parse_verdict(again)
            if score is None:
                raise Failed(f"unparseable judge reply: {text!r}; after a reminder: {again!r}")
            text = f"{text}\n{again}"
        return score, text

    def pair(self, p):
        """Judge one pair in both orders -> (status, record)."""
        a, b = p["responses"]
        base = {"id": p["id"], "messages": p["messages"]}
        if a == b:  # nothing to judge
            return "tie", base | {"status": "tie", "responses": [a, b], "judge": {"model": self.cfg.judge_model, "winner": "tie", "identical": True}}
        try:
            if self.cfg.verdict == "logprobs":
                return self.pair_logprobs(base, a, b)
            s_ab, r_ab = self.verdict(judge_messages(p["messages"], a, b))
            s_ba, r_ba = self.verdict(judge_messages(p["messages"], b, a))
        except Fatal:
            raise
        except Exception as e:  # recorded, never lost: the run goes on with the other pairs
            msg = str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}"
            return "failed", base | {"status": "failed", "responses": [a, b], "error": redact(msg, self.key)}
        status, winner, strength = combine(s_ab, -s_ba, self.cfg.inconsistent)
        label = {v: k for k, v in VERDICTS.items()}
        judge = {"model": self.cfg.judge_model, "verdicts": [label[s_ab], label[s_ba]], "scores_for_a": [s_ab, -s_ba],
                 "orders": ["AB", "BA"], "rationales": [r_ab, r_ba], "winner": winner, "consistent": sign(s_ab) == sign(-s_ba)}
        if status != "judged":
            return status, base | {"status": status, "responses": [a, b], "judge": judge}
        chosen, rejected = (a, b) if winner == "A" else (b, a)
        return "judged", base | {"chosen": chosen, "rejected": rejected, "strength": strength, "judge": judge}

    def pair_logprobs(self, base, a, b):
        p_ab = self.letters(judge_messages(base["messages"], a, b, LETTER_PROMPT))
        p_ba = self.letters(judge_messages(base["messages"], b, a, LETTER_PROMPT))
        status, winner, strength, first = combine_probs(p_ab, p_ba, self.cfg.tie_margin)
        judge = {"model": self.cfg.judge_model, "verdict": "logprobs", "letter_probs": [p_ab, p_ba], "orders": ["AB", "BA"],
                 "p_first_better": first, "p": sum(first) / 2, "winner": winner,
                 "consistent": sign(first[0] - 0.5) == sign(first[1] - 0.5)}
        if status != "judged":
            return status, base | {"status": status, "responses": [a, b], "judge": judge}
        chosen, rejected = (a, b) if winner == "A" else (b, a)
        return "judged", base | {"chosen": chosen, "rejected": rejected, "strength": strength, "judge": judge}

# ----------------------------------------------------------------------------------------------------
# Report: AlpacaEval-style win rate of B over A (ties count half), with its standard error

def other_path(out):
    return (out[:-6] if out.endswith(".jsonl") else out) + ".other.jsonl"

def report(out):
    recs = {}
    for path in (out, other_path(out)):
        if os.path.exists(path) and os.path.getsize(path):
            for _, r in D.read_jsonl(path):
                if r.get("status") != "failed" or r["id"] not in recs:  # a retried failure is superseded
                    recs[r["id"]] = r
    if not os.path.exists(out):
        raise D.DataError(f"{out}:0: no such file")
    x, counts = [], {"A": 0, "B": 0, "tie": 0, "inconsistent": 0, "failed": 0}
    consistent = both = 0
    for r in recs.values():
        j = r.get("judge") or {}
        if "consistent" in j:
            both += 1
            consistent += bool(j["consistent"])
        if r.get("status") in ("inconsistent", "failed"):
            counts[r["status"]] += 1
            continue
        w = j.get("winner", "tie")
        counts[w] += 1
        x.append({"A": 0.0, "tie": 0.5, "B": 1.0}[w])
    n = len(x)
    mean = sum(x) / n if n else float("nan")
    se = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1) / n) if n > 1 else float("nan")
    return {"n": n, "win_rate": 100 * mean, "standard_error": 100 * se, "wins_b": counts["B"], "wins_a": counts["A"],
            "ties": counts["tie"], "inconsistent_dropped": counts["inconsistent"], "failed": counts["failed"],
            "swap_consistency": 100 * consistent / both if both else float("nan")}

def print_report(out):
    r = report(out)
    print(f"{out}: {r['n']} pairs judged (B wins {r['wins_b']}, ties {r['ties']}, A wins {r['wins_a']}); "
          f"{r['inconsistent_dropped']} inconsistent dropped, {r['failed']} failed")
    print(f"win rate of B over A: {r['win_rate']:.2f}% ± {r['standard_error']:.2f} (standard error; ties count half)")
    print(f"swap consistency: {r['swap_consistency']:.1f}% (same verdict with the replies in either order)")
    return r

# ----------------------------------------------------------------------------------------------------

def run():
    cfg = D.parse_config(AnnotateConfig)
    if cfg.report:
        return print_report(cfg.report)
    if cfg.inconsistent not in ("tie", "drop"):
        raise SystemExit("error: --inconsistent must be tie or drop")
    if cfg.verdict not in ("text", "logprobs"):
        raise SystemExit("error: --verdict must be text or logprobs")
    log(json.dumps(asdict(cfg)))
    pairs = load_pairs(cfg)
    other = other_path(cfg.out)
    done, done_other, failed = D.truncate_torn(cfg.out), D.truncate_torn(other), set()  # (drops a torn last line)
    if done_other:
        failed = {r["id"] for _, r in D.read_jsonl(other) if r.get("status") == "failed"}
    if failed and cfg.retry_failed:  # rewrite the side file without them (temp + rename: a kill loses nothing)
        keep = [r for _, r in D.read_jsonl(other) if r.get("status") != "failed"]
        with open(other + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
        os.replace(other + ".tmp", other)
        done_other -= failed
    elif failed:
        log(f"{len(failed)} pairs failed in an earlier run are skipped (--retry-failed judges them again)")
    done |= done_other
    todo = [p for p in pairs if p["id"] not in done]
    log(f"{len(pairs)} pairs, {len(pairs) - len(todo)} already done, {len(todo)} to judge with {cfg.judge_model}")
    if not todo:
        return print_report(cfg.out)
    judge = Judge(cfg)
    from tqdm import tqdm
    counts = {"judged": 0, "tie": 0, "inconsistent": 0, "failed": 0}
    bar = tqdm(total=len(todo), desc="judge", dynamic_ncols=True, file=sys.stderr)
    pool = ThreadPoolExecutor(max(1, cfg.workers))
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    try:
        with open(cfg.out, "a", encoding="utf-8") as f_out, open(other, "a", encoding="utf-8") as f_other:
            for fut in as_completed([pool.submit(judge.pair, p) for p in todo]):
                status, rec = fut.result()  # only this thread writes: one whole line per record
                f = f_out if status == "judged" else f_other
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                counts[status] += 1
                bar.update(1)
                bar.set_postfix(counts, refresh=False)
    except (Fatal, KeyboardInterrupt) as e:  # stop now: finished records are on disk, in-flight ones are redone
        bar.close()
        log(f"error: {e}" if isinstance(e, Fatal) else "interrupted: rerun the same command to resume")
        os._exit(1 if isinstance(e, Fatal) else 130)  # don't wait for the workers' in-flight requests
    bar.close()
    pool.shutdown()
    u = judge.usage
    cost = (u["prompt_tokens"] * cfg.price_in + u["completion_tokens"] * cfg.price_out) / 1e6
    log(f"done: {counts['judged']} judged pairs -> {cfg.out}; {counts['tie']} ties, {counts['inconsistent']} "
        f"inconsistent, {counts['failed']} failed -> {other}")
    log(f"judge usage: {u['requests']} requests ({u['retries']} retries), {u['prompt_tokens']} prompt + "
        f"{u['completion_tokens']} completion tokens" + (f", estimated cost ${cost:.4f}" if cfg.price_in or cfg.price_out else ""))
    print_report(cfg.out)

if __name__ == "__main__":
    D.run_main(run)
