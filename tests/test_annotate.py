import ast, json, math, os, random, re, statistics, subprocess, sys, threading, time
from collections import defaultdict
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
import pytest
from conftest import D, M, T, ROOT, make_checkpoint, run_script, write_jsonl
import annotate as A
import scores as S

KEY = "sk-test-SECRET-0123456789abcdef"

class Judge:
    """A scripted OpenAI-compatible judge on 127.0.0.1. Each pair's responses carry markers (ans-ID-a,
    ans-ID-b); the reply shown first picks the script: script[(ID, "a" | "b")] is a list of actions
    consumed one per request (the last one repeats): ("ok", text), ("429", retry_after), ("500",),
    ("400",), ("sleep", seconds) (answers after the client gave up), ("lp", {token: probability}) (a
    one-token reply with those top_logprobs), ("lps", [{token: probability}, ...]) (a reply of one token a position).
    Bad keys get a 401 echoing the key. route(request) -> (ID, a|b): another way to find the script."""
    def __init__(self, script, delay=0.0, route=None):
        self.script, self.delay, self.log, self.lock = script, delay, [], threading.Lock()
        route = route or (lambda req: re.search(r"ans-(\w+)-([ab])", req["messages"][1]["content"]).groups())
        self.used, self.requests = defaultdict(int), []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self, code, obj, headers=()):
                body = json.dumps(obj).encode()
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    return self.reply(401, {"error": {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error"}})
                pid, first = route(req)
                with judge.lock:
                    acts = judge.script[(pid, first)]
                    act = acts[min(judge.used[(pid, first)], len(acts) - 1)]
                    judge.used[(pid, first)] += 1
                    judge.log.append((pid, first, act[0], time.time(), len(req["messages"])))
                    judge.requests.append(req)
                time.sleep(judge.delay)
                if act[0] == "429":
                    return self.reply(429, {"error": {"message": "slow down", "type": "rate_limit"}}, [("Retry-After", str(act[1]))])
                if act[0] in ("500", "400"):
                    return self.reply(int(act[0]), {"error": {"message": "scripted", "type": "x"}})
                if act[0] == "sleep":
                    time.sleep(act[1])
                text, logprobs = act[-1], None
                if act[0] in ("lp", "lps"):
                    tops = [[{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in pos.items()]
                            for pos in (act[1] if act[0] == "lps" else [act[1]])]
                    text = "".join(top[0]["token"] for top in tops)
                    logprobs = {"content": [top[0] | {"top_logprobs": top} for top in tops]}
                self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": req["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}})

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

def ok(label, why="Both are fine."):
    return ("ok", f"{why}\nVerdict: [[{label}]]")

def pair(pid, same=False):
    return {"id": pid, "messages": [{"role": "user", "content": f"question {pid}"}, {"role": "assistant", "content": "an earlier answer"},
                                    {"role": "user", "content": "and now?"}],
            "responses": [f"answer ans-{pid}-a", {"content": f"answer ans-{pid}-{'a' if same else 'b'}"}]}

def read(path):
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []

def run_annotate(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["annotate.py", *args])
    A.run()

def test_scripted_judge_retries_failures_and_swap_combination(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    script = {
        ("p1", "a"): [ok("A better")], ("p1", "b"): [ok("B better")],                             # A, 2
        ("p2", "a"): [("429", 1), ok("B much better")], ("p2", "b"): [ok("A slightly better")],   # B, 2
        ("p3", "a"): [ok("A better")], ("p3", "b"): [ok("A better")],                             # inconsistent -> tie
        ("p4", "a"): [ok("tie")], ("p4", "b"): [ok("tie")],                                       # tie
        ("p5", "a"): [("500",), ("500",), ok("A much better")], ("p5", "b"): [ok("B much better")],  # A, 3
        ("p6", "a"): [("sleep", 3), ok("A slightly better")], ("p6", "b"): [ok("B slightly better")],  # timeout, A, 1
        ("p7", "a"): [("ok", "I prefer B."), ok("B better")], ("p7", "b"): [ok("A better")],     # reminder, B, 2
        ("p8", "a"): [("ok", "no idea"), ("ok", "still no idea")],                               # failed, raw kept
        ("p9", "a"): [("500",)],                                                                  # failed: attempts
        ("p10", "a"): [("400",)],                                                                 # failed: no retry
    }
    judge = Judge(script)
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(f"p{i}") for i in range(1, 11)] + [pair("p11", same=True)])
    out = str(tmp_path / "xp.jsonl")
    args = ["--data", data, "--out", out, "--base-url", judge.url, "--judge-model", "judge-x", "--workers", "4",
            "--max-attempts", "3", "--backoff", "0.01", "--timeout", "1", "--price-in", "2.5", "--price-out", "10"]
    try:
        run_annotate(monkeypatch, *args)
        main, other = read(out), read(A.other_path(out))
        got = {r["id"]: (r["judge"]["winner"], r["strength"], r["chosen"][-4:]) for r in main}
        assert got == {"p1": ("A", 2.0, "p1-a"), "p2": ("B", 2.0, "p2-b"), "p5": ("A", 3.0, "p5-a"),
                       "p6": ("A", 1.0, "p6-a"), "p7": ("B", 2.0, "p7-b")}
        assert all(r["rejected"] != r["chosen"] and r["judge"]["model"] == "judge-x" and len(r["judge"]["rationales"]) == 2
                   and r["messages"][-1]["content"] == "and now?" for r in main)
        assert main[[r["id"] for r in main].index("p7")]["judge"]["rationales"][0].startswith("I prefer B.")
        status = {r["id"]: r["status"] for r in other}
        assert status == {"p3": "tie", "p4": "tie", "p8": "failed", "p9": "failed", "p10": "failed", "p11": "tie"}
        assert len(other) == 6 and len(main) == 5  # every pair exactly once
        p3 = next(r for r in other if r["id"] == "p3")
        assert p3["judge"]["consistent"] is False and p3["judge"]["verdicts"] == ["A better", "A better"]
        assert "still no idea" in next(r for r in other if r["id"] == "p8")["error"]
        calls = defaultdict(list)
        for pid, first, act, t, n_msgs in judge.log:
            calls[(pid, first)].append((act, t, n_msgs))
        assert len(calls[("p9", "a")]) == 3 and len(calls[("p10", "a")]) == 1 and not calls[("p11", "a")]
        assert [n for _, _, n in calls[("p8", "a")]] == [2, 4] and not calls[("p8", "b")]  # one reminder, then failed
        assert calls[("p2", "a")][1][1] - calls[("p2", "a")][0][1] >= 1.0  # Retry-After honoured over the tiny backoff
        assert len(calls[("p6", "a")]) == 2  # the request that timed out was retried
        err = capsys.readouterr().err
        n_ok = sum(1 for _, _, act, _, _ in judge.log if act == "ok")  # a timed-out reply is never read
        assert f"{n_ok * 100} prompt + {n_ok * 10} completion tokens" in err
        assert f"estimated cost ${(n_ok * 100 * 2.5 + n_ok * 10 * 10) / 1e6:.4f}" in err

        n_before = len(judge.log)  # a rerun judges nothing; --retry-failed only the failed ones
        run_annotate(monkeypatch, *args)
        assert len(judge.log) == n_before and len(read(out)) == 5 and len(read(A.other_path(out))) == 6
        script[("p10", "a")], script[("p10", "b")] = [ok("A better")], [ok("B better")]
        run_annotate(monkeypatch, *args, "--retry-failed")
        assert {r["id"] for r in read(out)} == {"p1", "p2", "p5", "p6", "p7", "p10"} and len(read(out)) == 6
        assert sorted(r["id"] for r in read(A.other_path(out))) == ["p11", "p3", "p4", "p8", "p9"]
        assert {p for p, *_ in judge.log[n_before:]} == {"p8", "p9", "p10"}
    finally:
        judge.close()

def test_logprob_verdicts_average_out_position_bias(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    script = {  # ("ID", "a"): order AB (response a shown as A); ("ID", "b"): order BA
        ("l1", "a"): [("lp", {"A": 0.7, "B": 0.2, "The": 0.1})], ("l1", "b"): [("lp", {" b": 0.5, "a": 0.25})],
        ("l2", "a"): [("lp", {"A": 0.55, "B": 0.45})], ("l2", "b"): [("lp", {"A": 0.95, "B": 0.05})],  # likes seat A
        ("l3", "a"): [("lp", {"A": 0.8, "B": 0.2})], ("l3", "b"): [("lp", {"A": 0.79, "B": 0.21})],    # only seat A: tie
        ("l4", "a"): [("lp", {"A": 0.9, "Sure": 0.1})], ("l4", "b"): [("lp", {"B ": 0.5, "x": 0.5})],  # a missing letter: 0
        ("l5", "a"): [("lp", {"A": 0.6, "B": 0.4})], ("l5", "b"): [("lp", {"A": 0.4, "B": 0.6})],
        ("l6", "a"): [("lp", {"The": 0.9, "I": 0.1})],                                                 # no letter: failed
    }
    judge = Judge(script)
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(f"l{i}") for i in range(1, 7)])
    out = str(tmp_path / "lp.jsonl")
    try:
        run_annotate(monkeypatch, "--data", data, "--out", out, "--base-url", judge.url, "--verdict", "logprobs",
                     "--workers", "2", "--backoff", "0.01")
    finally:
        judge.close()
    assert all(r["max_tokens"] == 1 and r["temperature"] == 0 and r["logprobs"] is True and r["top_logprobs"] == 20
               and r["messages"][1]["content"].endswith("Answer with one letter: A or B.") for r in judge.requests)
    main = {r["id"]: r for r in read(out)}
    # p = (P_AB(A) / (P_AB(A) + P_AB(B)) + P_BA(B) / (P_BA(A) + P_BA(B))) / 2, the chance that a is better
    p = {"l1": (0.7 / 0.9 + 0.5 / 0.75) / 2, "l2": (0.55 + 0.05) / 2, "l4": 1.0, "l5": 0.6}
    assert {i: (r["judge"]["winner"], r["strength"], r["chosen"][-4:]) for i, r in main.items()} == {
        "l1": ("A", 2.0, "l1-a"), "l2": ("B", 2.0, "l2-b"), "l4": ("A", 3.0, "l4-a"), "l5": ("A", 1.0, "l5-a")}
    assert {i: r["judge"]["p"] for i, r in main.items()} == pytest.approx(p)
    assert main["l2"]["judge"]["consistent"] is False and main["l1"]["judge"]["consistent"] is True  # l2: both picked seat A
    assert main["l1"]["judge"]["letter_probs"] == [pytest.approx({"A": 0.7, "B": 0.2}), pytest.approx({"A": 0.25, "B": 0.5})]
    other = {r["id"]: r for r in read(A.other_path(out))}
    assert {i: r["status"] for i, r in other.items()} == {"l3": "tie", "l6": "failed"}
    assert other["l3"]["judge"]["p"] == pytest.approx((0.8 + 0.21) / 2) and "'The', 'I'" in other["l6"]["error"]
    r = A.report(out)
    assert (r["n"], r["wins_a"], r["wins_b"], r["ties"], r["failed"]) == (5, 3, 1, 1, 1)
    assert r["swap_consistency"] == pytest.approx(100 * 3 / 5)  # l1, l4, l5 consistent; l2, l3 not

def test_parse_and_combine():
    assert A.parse_verdict("blah\n**Verdict:** [[B  Much better]]") == -3
    assert A.parse_verdict("Verdict: [[A better]] ... no wait.\nVerdict: [[tie]]") == 0
    assert A.parse_verdict("Verdict: [[C better]]") is None and A.parse_verdict("A is better") is None
    assert A.parse_verdict("Verdict: [[A much better]] or [[A better]] or [[tie]]") is None  # the format, echoed
    assert A.combine(2, 1) == ("judged", "A", 1.5)
    assert A.combine(-3, -1) == ("judged", "B", 2.0)
    assert A.combine(0, 0) == ("tie", "tie", 0.0)
    assert A.combine(2, -1) == ("tie", "tie", 0.0) and A.combine(1, 0) == ("tie", "tie", 0.0)
    assert A.combine(2, -1, "drop") == ("inconsistent", None, 0.0)
    msgs = A.judge_messages([{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                             {"role": "assistant", "content": "R1"}, {"role": "user", "content": "Q2"}], "first one", "second one")
    text = msgs[1]["content"]
    assert all(s in text for s in ("[System]\nS", "[User]\nQ1", "[Assistant]\nR1", "[User]\nQ2"))
    assert text.index("first one") < text.index("second one") and "[[A much better]]" in text

def test_report_win_rate_and_standard_error(tmp_path, monkeypatch, capsys):
    def judged(i, winner, consistent=True):
        return {"id": f"j{i}", "messages": [], "chosen": "c", "rejected": "r", "strength": 2.0,
                "judge": {"winner": winner, "consistent": consistent}}
    out = tmp_path / "judged.jsonl"
    write_jsonl(out, [judged(i, "B") for i in range(6)] + [judged(6, "A"), judged(7, "A")])
    write_jsonl(A.other_path(str(out)), [
        {"id": "t1", "status": "tie", "judge": {"winner": "tie", "consistent": True}},
        {"id": "t2", "status": "tie", "judge": {"winner": "tie", "consistent": False}},
        {"id": "d1", "status": "inconsistent", "judge": {"winner": None, "consistent": False}},
        {"id": "f1", "status": "failed", "error": "x"}])
    x = [1.0] * 6 + [0.0] * 2 + [0.5] * 2
    r = A.report(str(out))
    assert r["n"] == 10 and r["win_rate"] == pytest.approx(70.0)
    assert r["standard_error"] == pytest.approx(100 * statistics.stdev(x) / math.sqrt(10))
    assert r["swap_consistency"] == pytest.approx(100 * 9 / 11)
    assert (r["ties"], r["inconsistent_dropped"], r["failed"]) == (2, 1, 1)
    run_annotate(monkeypatch, "--report", str(out))
    assert f"70.00% ± {100 * statistics.stdev(x) / math.sqrt(10):.2f}" in capsys.readouterr().out

def test_two_files_matched_by_id(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    judge = Judge({("q1", "a"): [ok("A better")], ("q1", "b"): [ok("B better")],
                   ("q2", "a"): [ok("B better")], ("q2", "b"): [ok("A better")]})
    msgs = lambda q: [{"role": "user", "content": f"prompt {q}"}]
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": q, "messages": msgs(q), "responses": [{"content": f"ans-{q}-a"}]} for q in ("q1", "q2", "q3")])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": q, "messages": msgs(q), "responses": [f"ans-{q}-b"]} for q in ("q2", "q1")])
    try:
        run_annotate(monkeypatch, "--a", a, "--b", b, "--out", str(tmp_path / "ab.jsonl"), "--base-url", judge.url, "--backoff", "0.01")
    finally:
        judge.close()
    assert A.report(str(tmp_path / "ab.jsonl"))["win_rate"] == pytest.approx(50.0)
    assert {r["id"]: r["chosen"] for r in read(tmp_path / "ab.jsonl")} == {"q1": "ans-q1-a", "q2": "ans-q2-b"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "messages": msgs("x"), "responses": ["only one"]}])
    p = run_script("annotate.py", "--data", bad, "--out", str(tmp_path / "o.jsonl"), check=False)
    assert p.returncode == 2 and f"{bad}:1: 'responses' must list two responses" in p.stderr and "Traceback" not in p.stderr

def test_kill_and_resume_without_duplicates_and_key_never_leaks(tmp_path):
    script = {(f"k{i}", s): [ok("A better" if s == "a" else "B better", f"reason {i}")] for i in range(14) for s in "ab"}
    judge = Judge(script, delay=0.2)
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(f"k{i}") for i in range(14)])
    out = tmp_path / "xp.jsonl"
    args = [sys.executable, "annotate.py", "--data", data, "--out", str(out), "--base-url", judge.url, "--workers", "2"]
    env = dict(os.environ, OPENAI_API_KEY=KEY, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while len(read(out)) < 4 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.kill()
        first_out, first_err = proc.communicate()
        first = [r["id"] for r in read(out)]
        assert 4 <= len(first) < 14, first_err
        n_first = len(judge.log)
        p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        ids = [r["id"] for r in read(out)]
        assert sorted(ids) == sorted(f"k{i}" for i in range(14)) and not read(A.other_path(str(out)))
        assert not {pid for pid, *_ in judge.log[n_first:]} & set(first)  # finished pairs are never asked again
        bad = subprocess.run(args[:-4] + ["--out", str(tmp_path / "x.jsonl"), "--base-url", judge.url],
                             cwd=ROOT, env=dict(env, OPENAI_API_KEY=KEY + "-wrong"), capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1 and "HTTP 401" in bad.stderr  # the server echoed the key; we must not
    finally:
        judge.close()
    texts = [first_out, first_err, p.stdout, p.stderr, bad.stdout, bad.stderr] + \
            [open(f).read() for f in tmp_path.iterdir() if f.is_file()]
    assert not any(KEY in t for t in texts)

def test_against_chat_serve(tmp_path, monkeypatch, bpe_tokenizer):
    from test_chat import start_server
    path = make_checkpoint(tmp_path / "tiny", bpe_tokenizer, "chatml", tie_word_embeddings=True, max_position_embeddings=4096)
    proc, url, _ = start_server(path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server: a dummy key is used
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(f"s{i}") for i in range(3)])
    out = str(tmp_path / "xp.jsonl")
    try:
        run_annotate(monkeypatch, "--data", data, "--out", out, "--base-url", url, "--judge-model", "tiny",
                     "--max-tokens", "8", "--workers", "2", "--backoff", "0.01")
        run_annotate(monkeypatch, "--data", data, "--out", out + ".lp.jsonl", "--base-url", url, "--judge-model", "tiny",
                     "--verdict", "logprobs", "--workers", "2", "--backoff", "0.01")
        answers = write_jsonl(tmp_path / "answers.jsonl", [answer(q, "tiny") for q in (QS[0], QS[2])])
        run_annotate(monkeypatch, "--mode", "single", "--data", answers, "--out", out + ".mt.jsonl", "--base-url", url,
                     "--judge-model", "tiny", "--verdict", "logprobs", "--workers", "2", "--backoff", "0.01")
    finally:
        proc.kill()
        proc.wait()
    for o in (out, out + ".lp.jsonl"):
        recs = read(o) + read(A.other_path(o))
        assert sorted(r["id"] for r in recs) == ["s0", "s1", "s2"]  # garbage verdicts, but every pair accounted for
        assert all(r.get("status") in (None, "tie", "inconsistent", "failed") for r in recs)
        assert not any("HTTP" in r.get("error", "") or "no logprobs" in r.get("error", "") for r in recs)  # all answered
    for r in read(out + ".lp.jsonl") + read(A.other_path(out + ".lp.jsonl")):  # a random model rarely has A or B in its top 20
        assert 0 <= r["judge"]["p"] <= 1 if "judge" in r else len(ast.literal_eval(r["error"].split("tokens: ")[1])) == 20
    graded = read(out + ".mt.jsonl") + read(A.other_path(out + ".mt.jsonl"))  # MT-bench grades through the same server
    assert sorted(r["id"] for r in graded) == ["tiny/111/1", "tiny/111/2", "tiny/81/1", "tiny/81/2"]
    for r in graded:  # a random model rarely has a digit in its top 20; when it has, a score in range
        assert 1 <= r["score"] <= 10 if "score" in r else len(ast.literal_eval(r["error"].split("tokens: ")[1])) == 20

# ---- MT-bench: single-answer grading, the report's table, FastChat's judge prompts
def last_marker(req):  # the answer being graded is the last one shown (turn 2 shows answer 1 before it)
    return re.findall(r"ans-(\w+)-([ab])", req["messages"][1]["content"])[-1]

def rated(n, why="Fine."):
    return ("ok", f"{why}\nRating: [[{n}]]")

QS = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
      {"question_id": 82, "category": "writing", "turns": ["Write an email.", "Now formal."]},
      {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
      {"question_id": 131, "category": "stem", "turns": ["What is DNA?", "And RNA?"]}]

def answer(q, model, ours=True):  # ours: sample.py's record (the question inside); else FastChat's answer alone
    turns = [f"answer ans-{model}x{q['question_id']}-a", f"answer ans-{model}x{q['question_id']}-b"]
    rec = {"question_id": q["question_id"], "model_id": model, "choices": [{"index": 0, "turns": turns}]}
    return rec | ({"id": str(q["question_id"]), "category": q["category"], "turns": q["turns"]} if ours else {}) | (
        {"reference": q["reference"]} if ours and "reference" in q else {})

def test_mtbench_grading_report_retries_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    grades = {("m1", 81): (8, 6), ("m1", 82): (6, 3), ("m1", 111): (2, 1), ("m1", 131): (9, 7),
              ("m2", 81): (5, 5), ("m2", 82): (4, 4), ("m2", 111): (10, 10), ("m2", 131): (3, 2)}
    script = {(f"{m}x{q}", t): [rated(g[i])] for (m, q), g in grades.items() for i, t in enumerate("ab")}
    script[("m1x82", "a")] = [("ok", "It is decent; I'd give it a six."), rated(6)]  # unparseable, then fine on the reminder
    script[("m2x131", "b")] = [("ok", "no rating"), ("ok", "Rating: [[11]]")]        # never parseable: failed
    script[("m2x82", "a")] = [("429", 0), rated(4)]                                  # retried
    judge = Judge(script, route=last_marker)
    m1 = write_jsonl(tmp_path / "m1.jsonl", [answer(q, "m1") for q in QS])
    m2 = write_jsonl(tmp_path / "m2.jsonl", [answer(q, "m2", ours=False) for q in QS])
    qfile = write_jsonl(tmp_path / "question.jsonl", QS)
    refs = write_jsonl(tmp_path / "ref.jsonl", [{"question_id": 111, "model_id": "gpt-4",
                                                 "choices": [{"index": 0, "turns": ["REF-FOUR", "REF-SIX"]}]}])
    o1, o2 = str(tmp_path / "g1.jsonl"), str(tmp_path / "g2.jsonl")
    common = ["--mode", "single", "--base-url", judge.url, "--judge-model", "judge-x", "--workers", "3", "--backoff", "0.01",
              "--references", refs]
    try:
        run_annotate(monkeypatch, *common, "--data", m1, "--out", o1)
        first = list(judge.log)  # the resume below may grade m1/82/1 again (records land in any order)
        with pytest.raises(D.DataError, match="m2.jsonl:1: question 81 is not in the record: give --questions"):
            run_annotate(monkeypatch, *common, "--data", m2, "--out", o2)
        run_annotate(monkeypatch, *common, "--data", m2, "--out", o2, "--questions", qfile)
        n = len(judge.log)
        run_annotate(monkeypatch, *common, "--data", m2, "--out", o2, "--questions", qfile)  # resume: all done
        assert len(judge.log) == n
        lines = open(o1).readlines()  # a kill after 5 records, the 6th torn: only the missing turns are graded again
        open(o1, "w").write("".join(lines[:5]) + lines[5][:20])
        run_annotate(monkeypatch, *common, "--data", m1, "--out", o1)
        missing = {json.loads(l)["id"] for l in lines[5:]}
        assert {(p, f) for p, f, *_ in judge.log[n:]} == {(f"m1x{i.split('/')[1]}", "ab"[int(i[-1]) - 1]) for i in missing}
    finally:
        judge.close()
    g1, g2 = {r["id"]: r for r in read(o1)}, {r["id"]: r for r in read(o2)}
    assert len(g1) == 8 and len(g2) == 7 and [r["id"] for r in read(A.other_path(o2))] == ["m2/131/2"]
    assert "no rating" in read(A.other_path(o2))[0]["error"] and read(A.other_path(o2))[0]["status"] == "failed"
    assert {i: r["score"] for i, r in g1.items()} == {f"m1/{q}/{t + 1}": float(g[t]) for (m, q), g in grades.items()
                                                       if m == "m1" for t in range(2)}
    assert [a for p, f, a, *_ in first if (p, f) == ("m1x82", "a")] == ["ok", "ok"]  # one reminder
    r = g1["m1/111/2"]  # math: against the reference, the whole conversation in view
    assert r["judge"] == ["judge-x", "single-ref-multi-turn"] and r["turn"] == 2 and r["category"] == "math"
    assert all(s in r["user_prompt"] for s in ("What is 2+2?", "ans-m1x111-a", "And 3+3?", "ans-m1x111-b", "REF-FOUR", "REF-SIX"))
    assert g1["m1/81/1"]["judge"][1] == "single" and "REF" not in g1["m1/81/1"]["user_prompt"]
    assert g1["m1/131/2"]["judge"][1] == "single-multi-turn" and "What is DNA?" in g1["m1/131/2"]["user_prompt"]
    assert g2["m2/111/1"]["judge"][1] == "single-ref" and "REF-FOUR" in g2["m2/111/1"]["user_prompt"]
    # the report: per turn, overall, per category, hand-computed; two files side by side
    capsys.readouterr()
    out = A.report_files([o1, o2])
    assert out["m1"]["turn 1"] == pytest.approx((8 + 6 + 2 + 9) / 4) and out["m1"]["turn 2"] == pytest.approx((6 + 3 + 1 + 7) / 4)
    assert out["m1"]["overall"] == pytest.approx(42 / 8)
    assert out["m1"]["categories"] == pytest.approx({"writing": (8 + 6 + 6 + 3) / 4, "math": 1.5, "stem": 8.0})
    assert out["m2"]["turn 2"] == pytest.approx((5 + 4 + 10) / 3) and out["m2"]["overall"] == pytest.approx(41 / 7)
    assert out["m2"]["categories"]["stem"] == 3.0 and (out["m2"]["graded"], out["m2"]["failed"]) == (7, 1)
    table = capsys.readouterr().out
    assert "| MT-bench | m1 | m2 |" in table and "| turn 1 | 6.25 | 5.50 |" in table and "| math | 1.50 | 10.00 |" in table
    assert "| graded / failed turns | 8 / 0 | 7 / 1 |" in table

def test_mtbench_judge_prompts_file_and_logprob_ratings(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    prompts = [{"name": "pair-v2", "type": "pairwise", "system_prompt": "x", "prompt_template": "{question}", "description": "",
                "category": "general", "output_format": "[[A]]"}]
    for name, cat, tmpl in [("single-v1", "general", "ONE Q={question} A={answer}"),
                            ("single-math-v1", "math", "ONEREF Q={question} R={ref_answer_1} A={answer}"),
                            ("single-v1-multi-turn", "general", "TWO {question_1}|{answer_1}|{question_2}|{answer_2}"),
                            ("single-math-v1-multi-turn", "math", "TWOREF {ref_answer_1}|{ref_answer_2}|{question_1}|"
                                                                   "{answer_1}|{question_2}|{answer_2}")]:
        prompts.append({"name": name, "type": "single", "system_prompt": f"SYS-{name}", "prompt_template": tmpl,
                        "description": "", "category": cat, "output_format": "[[rating]]"})
    pfile = write_jsonl(tmp_path / "judge_prompts.jsonl", prompts)
    qs = [QS[0], QS[2] | {"reference": ["REF-A", "REF-B"]}]  # a reference inside the question
    data = write_jsonl(tmp_path / "a.jsonl", [answer(q, "m") for q in qs])
    script = {("mx81", "a"): [rated(7)], ("mx81", "b"): [rated(3)], ("mx111", "a"): [rated(9)], ("mx111", "b"): [rated(2)]}
    judge = Judge(script, route=last_marker)
    out = str(tmp_path / "g.jsonl")
    try:
        run_annotate(monkeypatch, "--mode", "single", "--data", data, "--out", out, "--base-url", judge.url,
                     "--judge-prompts", pfile, "--backoff", "0.01")
    finally:
        judge.close()
    g = {r["id"]: r for r in read(out)}
    assert {i: (r["judge"][1], r["score"]) for i, r in g.items()} == {
        "m/81/1": ("single-v1", 7.0), "m/81/2": ("single-v1-multi-turn", 3.0),
        "m/111/1": ("single-math-v1", 9.0), "m/111/2": ("single-math-v1-multi-turn", 2.0)}
    by_prompt = {req["messages"][0]["content"]: req["messages"][1]["content"] for req in judge.requests}
    assert by_prompt["SYS-single-v1"] == "ONE Q=Write a poem. A=answer ans-mx81-a"
    assert by_prompt["SYS-single-math-v1-multi-turn"] == (
        "TWOREF REF-A|REF-B|What is 2+2?|answer ans-mx111-a|And 3+3?|answer ans-mx111-b")
    # --verdict logprobs: the rating alone, scored as the probability-weighted mean of the rating tokens
    script = {("mx81", "a"): [("lps", [{"7": 0.5, "8": 0.3, "²": 0.1, "Sure": 0.1}, {"\n": 1.0}])],  # "²" is no rating
              ("mx81", "b"): [("lps", [{"1": 0.6, "9": 0.2, "x": 0.2}, {"0": 0.75, "\n": 0.25}])],  # "10" as "1" "0"
              ("mx111", "a"): [("lps", [{"The": 0.9, "I": 0.1}])],  # no rating token: failed
              ("mx111", "b"): [("lps", [{"Rating": 0.9, "The": 0.1}, {":": 1.0}, {" [[": 1.0}, {" 3": 0.5, "4": 0.5},
                                        {"]]": 1.0}])]}  # read at the first digit written
    judge = Judge(script, route=last_marker)
    out = str(tmp_path / "lp.jsonl")
    try:
        run_annotate(monkeypatch, "--mode", "single", "--data", data, "--out", out, "--base-url", judge.url,
                     "--verdict", "logprobs", "--backoff", "0.01")
    finally:
        judge.close()
    assert all(r["max_tokens"] == 8 and r["logprobs"] is True and r["top_logprobs"] == 20 and
               r["messages"][1]["content"].endswith("on a scale of 1 to 10? Reply with the number only.") for r in judge.requests)
    assert {tuple(r["judge"]) for r in read(out)} >= {("gpt-4o", "rate-only"), ("gpt-4o", "rate-only-multi-turn")}
    g = {r["id"]: r for r in read(out)}
    assert g["m/81/1"]["score"] == pytest.approx((7 * 0.5 + 8 * 0.3) / 0.8)
    assert g["m/81/2"]["score"] == pytest.approx((10 * 0.45 + 1 * 0.15 + 9 * 0.2) / 0.8)
    assert g["m/111/2"]["score"] == pytest.approx(3.5) and g["m/81/2"]["rating_probs"]["10"] == pytest.approx(0.45 / 0.8)
    assert g["m/81/1"]["rating_mass"] == pytest.approx(0.8) and g["m/111/2"]["rating_mass"] == pytest.approx(1.0)
    assert [r["id"] for r in read(A.other_path(out))] == ["m/111/1"]

# ---- Length control (AlpacaEval 2.0) on synthetic judgments
def synthetic_judgments(path, prefer_longer, n=600, seed=0):
    rng, recs = random.Random(seed), []
    lens = [(la := rng.randint(200, 1500), max(1, la + int(rng.gauss(400, 500)))) for _ in range(n)]
    sd = statistics.pstdev([lb - la for la, lb in lens])
    for i, (la, lb) in enumerate(lens):
        p_b = 1 / (1 + math.exp(-4 * math.tanh((lb - la) / sd))) if prefer_longer else 0.7
        a, b, winner = "a" * la, "b" * lb, "B" if rng.random() < p_b else "A"
        if i % 10 == 0:  # a few ties, which keep their responses
            recs.append({"id": f"t{i}", "status": "tie", "responses": [a, b], "judge": {"winner": "tie", "consistent": True}})
            continue
        chosen, rejected = (b, a) if winner == "B" else (a, b)
        recs.append({"id": f"j{i}", "messages": [], "chosen": chosen, "rejected": rejected, "strength": 2.0,
                     "judge": {"winner": winner, "consistent": True}})
    write_jsonl(path, recs)
    return lens

def test_length_controlled_win_rate(tmp_path, capsys):
    out = str(tmp_path / "longer.jsonl")
    lens = synthetic_judgments(out, prefer_longer=True)
    r = A.report(out, show=True)
    assert r["n"] == 600 and r["win_rate"] > 70  # B is longer on most prompts, and the judge likes length
    assert abs(r["lc_win_rate"] - 50) < 8 and r["win_rate"] - r["lc_win_rate"] > 15 and r["length_coef"] > 2
    assert 0 < r["lc_standard_error"] < 5
    assert r["avg_len_a"] == pytest.approx(statistics.mean(la for la, _ in lens))
    assert r["avg_len_b"] == pytest.approx(statistics.mean(lb for _, lb in lens))
    text = capsys.readouterr().out
    assert f"length-controlled win rate of B: {r['lc_win_rate']:.2f}% ± {r['lc_standard_error']:.2f}" in text
    assert f"average length (characters): A {r['avg_len_a']:.0f}, B {r['avg_len_b']:.0f}" in text
    out = str(tmp_path / "blind.jsonl")  # a judge blind to length: the two rates agree
    synthetic_judgments(out, prefer_longer=False)
    r = A.report(out)
    assert 60 < r["win_rate"] < 75 and abs(r["lc_win_rate"] - r["win_rate"]) < 3 and abs(r["length_coef"]) < 0.5

def test_logistic_fit_matches_known_coefficients():
    import numpy as np
    rng = np.random.default_rng(0)
    X = np.c_[np.ones(20000), rng.normal(size=(20000, 2))]
    w = np.array([0.3, -1.2, 2.0])
    y = (rng.random(20000) < 1 / (1 + np.exp(-X @ w))).astype(float)
    assert np.allclose(S.fit_logistic(X, y, l2=0.0), w, atol=0.08)
    sep = S.fit_logistic(X[:200], (X[:200, 1] > 0).astype(float))  # separable: finite, the right sign
    assert np.all(np.isfinite(sep)) and sep[1] > 5

# ---- The files people have: AlpacaEval's JSON array as --a, a folder of parquet files as --b
def test_alpaca_eval_array_and_parquet_folder(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    qs = ["Name a fruit.", "Say hi, [politely]."]
    ref = [{"instruction": q, "output": f"ref ans-e{i}-a", "generator": "gpt4_1106_preview", "dataset": "helpful_base"}
           for i, q in enumerate(qs)]
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(ref, indent=4))
    ours = [{"instruction": q, "output": f"ours ans-e{i}-b", "generator": "mine", "dataset": "helpful_base"}
            for i, q in reversed(list(enumerate(qs)))]
    (tmp_path / "ours").mkdir()
    datasets.Dataset.from_list(ours).to_parquet(str(tmp_path / "ours" / "train.parquet"))
    judge = Judge({("e0", "a"): [ok("A better")], ("e0", "b"): [ok("B better")],
                   ("e1", "a"): [ok("B better")], ("e1", "b"): [ok("A much better")]})
    out = str(tmp_path / "win.jsonl")
    try:
        run_annotate(monkeypatch, "--a", str(tmp_path / "alpaca_eval.json"), "--b", str(tmp_path / "ours"), "--out", out,
                     "--base-url", judge.url, "--backoff", "0.01")
    finally:
        judge.close()
    got = {r["messages"][0]["content"]: r["chosen"] for r in read(out)}
    assert got == {"Name a fruit.": "ref ans-e0-a", "Say hi, [politely].": "ours ans-e1-b"}
    assert A.report(out)["win_rate"] == pytest.approx(50.0)
    bad = ref + [{"instruction": "x", "output": ["not", "a string"]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    p = run_script("annotate.py", "--a", str(tmp_path / "bad.json"), "--b", str(tmp_path / "alpaca_eval.json"),
                   "--out", str(tmp_path / "o.jsonl"), check=False)
    assert p.returncode == 2 and f"{tmp_path / 'bad.json'}[2]: 'responses' must list a response" in p.stderr, p.stderr
