"""
The numbers annotate.py --report prints, as pure functions of judged records: the win rate, the
length-controlled win rate (AlpacaEval 2.0), and the MT-bench table. No file I/O, no torch; numpy
only inside the length-controlled fit, so `annotate.py --help` stays light.
"""
import math
from collections import defaultdict

WIN = {"A": 0.0, "tie": 0.5, "B": 1.0}  # B's share of a pair: ties count half

def mean_se(x):
    """-> (mean, standard error of the mean); nan where undefined."""
    n = len(x)
    mean = sum(x) / n if n else float("nan")
    se = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se

# -------------------------------------------------------------------------------------------------
# Length-controlled win rate (AlpacaEval 2.0, Dubois et al. 2024): a logistic model of the judge's
# preference for B,
#     P(B preferred) = sigmoid(w0 + w1 * tanh((len B - len A) / std) + w2 * difficulty),
# fit to the judgments; the LC win rate is its mean prediction with the length term set to zero:
# what the judge would prefer if the two answers were equally long. The instruction term is used
# when the records carry AlpacaEval's per-instruction difficulty (none of ours do).

def fit_logistic(X, y, l2=0.1, iters=100):
    """Newton (IRLS) for P(y=1) = sigmoid(X @ w), targets y in [0, 1] (a tie is 0.5), with a
    penalty l2/2 * |w[1:]|^2 that keeps w finite when the data are separable (a judge that always
    picks the longer answer). Column 0 is the intercept, unpenalized. Backtracking halves a step
    that would raise the loss."""
    import numpy as np
    r = np.r_[0.0, np.ones(X.shape[1] - 1)] * l2

    def loss(w):
        z = X @ w
        return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * np.sum(r * w * w))
    w = np.zeros(X.shape[1])
    cur = loss(w)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(X @ w)))
        g = X.T @ (p - y) + r * w
        H = (X * (p * (1 - p))[:, None]).T @ X + np.diag(r) + 1e-9 * np.eye(len(w))
        step, t = np.linalg.solve(H, g), 1.0
        while (new := loss(w - t * step)) > cur and t > 1e-6:
            t /= 2
        w, done = w - t * step, cur - new < 1e-12
        cur = min(cur, new)
        if done:
            break
    return w

def lc_win_rate(y, len_a, len_b, difficulty=None, boot=200, seed=0):
    """-> (LC win rate of B in %, its bootstrap standard error, the length coefficient w1).
    y: B's share of each pair (0, 0.5, 1); lengths in characters, as AlpacaEval counts them."""
    import numpy as np
    y, delta = np.asarray(y, float), np.asarray(len_b, float) - np.asarray(len_a, float)
    sd = delta.std() or 1.0
    cols = [np.ones_like(y), np.tanh(delta / sd)]
    if difficulty is not None:
        cols.append(np.asarray(difficulty, float))
    X = np.stack(cols, 1)

    def lc(idx):
        w = fit_logistic(X[idx], y[idx])
        no_length = np.delete(X, 1, 1) @ np.delete(w, 1)  # over every instruction
        return 100 * float(np.mean(1 / (1 + np.exp(-no_length)))), float(w[1])
    rate, coef = lc(np.arange(len(y)))
    rng = np.random.default_rng(seed)
    boots = [lc(rng.integers(0, len(y), len(y)))[0] for _ in range(boot)]
    return rate, float(np.std(boots, ddof=1)) if boot > 1 else float("nan"), coef

# -------------------------------------------------------------------------------------------------
# Pairwise: the win rate of B over A from judged records (both orders already combined)

def sides(rec):
    """-> (A's answer, B's answer) of a judged record, or None: a judged pair keeps chosen and
    rejected (the winner says which was A), a tie or a failure keeps its responses."""
    if isinstance(rec.get("responses"), list) and len(rec["responses"]) == 2:
        return tuple(rec["responses"])
    winner = (rec.get("judge") or {}).get("winner")
    if "chosen" in rec and winner in ("A", "B"):
        return (rec["chosen"], rec["rejected"]) if winner == "A" else (rec["rejected"],
                                                                      rec["chosen"])
    return None

def win_rate(recs, boot=200):
    """recs: the records of an --out and its side file, one per pair. -> the report's numbers."""
    judges = [r.get("judge") or {} for r in recs]
    both = [bool(j["consistent"]) for j in judges if "consistent" in j]
    kept = [(r, j.get("winner", "tie")) for r, j in zip(recs, judges)
            if r.get("status") not in ("inconsistent", "failed")]
    won = [w for _, w in kept]
    mean, se = mean_se([WIN[w] for w in won])
    status = defaultdict(int)
    for r in recs:
        status[r.get("status")] += 1
    out = dict(n=len(won), win_rate=100 * mean, standard_error=100 * se, wins_b=won.count("B"),
               wins_a=won.count("A"), ties=won.count("tie"),
               inconsistent_dropped=status["inconsistent"], failed=status["failed"],
               swap_consistency=100 * sum(both) / len(both) if both else float("nan"))
    texts = [(sides(r), WIN[w], r.get("instruction_difficulty")) for r, w in kept]
    texts = [t for t in texts if t[0] and all(isinstance(s, str) for s in t[0])]
    if len(texts) >= 2:
        len_a, len_b = [len(t[0][0]) for t in texts], [len(t[0][1]) for t in texts]
        diff = [t[2] for t in texts]
        diff = diff if all(isinstance(d, (int, float)) for d in diff) else None
        lc, lc_se, coef = lc_win_rate([t[1] for t in texts], len_a, len_b, diff, boot)
        out |= dict(lc_win_rate=lc, lc_standard_error=lc_se, length_coef=coef,
                    lc_instruction_term=diff is not None, avg_len_a=sum(len_a) / len(len_a),
                    avg_len_b=sum(len_b) / len(len_b))
    return out

# -------------------------------------------------------------------------------------------------
# MT-bench: single-answer grades (1-10) -> turn 1, turn 2, overall and per-category means

def mtbench(recs):
    """recs: graded records {model, turn, category, score} and failures {status: failed}.
    -> {model: {"turn 1", "turn 2", "overall", "categories": {category: mean}, "graded",
    "failed"}}. Overall and a category average every graded turn alike, as MT-bench does."""
    by_model = defaultdict(list)
    failed = defaultdict(int)
    for r in recs:
        if r.get("status") == "failed":
            failed[r.get("model")] += 1
        else:
            by_model[r["model"]].append(r)
    out = {}
    for model in sorted(set(by_model) | set(failed), key=str):
        rs = by_model[model]
        avg = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        cats = sorted({r.get("category") or "" for r in rs})
        out[model] = {f"turn {t}": avg([r["score"] for r in rs if r["turn"] == t]) for t in (1, 2)}
        out[model] |= {"overall": avg([r["score"] for r in rs]), "graded": len(rs),
                       "failed": failed[model],
                       "categories": {c: avg([r["score"] for r in rs
                                              if (r.get("category") or "") == c]) for c in cats}}
    return out

def mtbench_table(results):
    """{model: mtbench()'s numbers} -> a markdown table, one column per model."""
    models = list(results)
    cats = sorted({c for m in models for c in results[m]["categories"]})
    rows = [("turn 1", lambda m: results[m]["turn 1"]), ("turn 2", lambda m: results[m]["turn 2"]),
            ("overall", lambda m: results[m]["overall"])]
    rows += [(c or "(none)", lambda m, c=c: results[m]["categories"].get(c, float("nan")))
             for c in cats]
    lines = ["| MT-bench | " + " | ".join(map(str, models)) + " |",
             "|---" * (len(models) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(f"{f(m):.2f}" for m in models) + " |"
              for name, f in rows]
    lines += ["| graded / failed turns | " + " | ".join(
        f"{results[m]['graded']} / {results[m]['failed']}" for m in models) + " |"]
    return "\n".join(lines)
