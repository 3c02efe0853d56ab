"""
Reward model training (Xwin-RM) on judged preference pairs, with held-out evaluation.

The policy architecture plus a scalar `score` head (zero-initialised on a policy checkpoint, so the
first loss is exactly ln 2), trained with the ranking loss
-log sigmoid(r_chosen - r_rejected - margin). Chosen and rejected go through one packed forward;
each reward is read at its sequence's last token, the closing EOS of the last assistant turn.
Evaluates on held-out pairs and saves an HF folder that transformers loads as
LlamaForSequenceClassification.

    python train_rm.py --model runs/sft --data pairs.jsonl --out runs/rm --eval-frac 0.05 --margin
    torchrun --nproc_per_node 8 train_rm.py --model runs/sft --out runs/rm \\
        --data HuggingFaceH4/ultrafeedback_binarized --split train_prefs
"""
import math, random
from collections import Counter
from dataclasses import dataclass
import torch
import torch.nn.functional as F
import data as D
import training as T

@dataclass
class Config(T.TrainConfig):
    epochs: int = 1  # passes over the data (RMs overfit after one)
    lr: float = 1e-5  # peak learning rate
    margin: bool = False  # subtract a margin by preference strength (MARGINS) inside the loss
    center_coef: float = 0.0  # reward centering: + center_coef * (r_c + r_r)^2 a pair (e.g. 0.01)
    skip_bad: bool = False  # skip bad pairs (identical or missing responses), counted

def rm_loss(r_chosen, r_rejected, margin, center_coef=0.0):
    """The per-pair loss: Llama-2's ranking loss with a margin m (0, or set by the preference's
    strength), plus reward centering (Eisenstein et al. 2023), which pins the rewards' level that
    the ranking loss leaves free (it sees only their difference):

        L = -log sigmoid(r_chosen - r_rejected - m) + center_coef * (r_chosen + r_rejected)^2"""
    ranking = -F.logsigmoid(r_chosen - r_rejected - margin)
    return ranking + center_coef * (r_chosen + r_rejected) ** 2

# The margin by preference strength (--margin), on Llama-2's RM scale: the clearer the judge's
# preference, the wider the gap between the two rewards before the loss lets go. annotate.py writes
# a number on this scale (the mean degree of its two verdicts), which is the margin itself; words
# are read too. A tie carries no preference, so tied pairs (and pairs the judge failed on) are
# skipped, with a count.
MARGINS = {"much better": 3.0, "significantly better": 3.0, "better": 2.0, "slightly better": 1.0,
           "negligibly better": 0.0}
TIES = {"tie", "equal", "same", "unsure"}

# -------------------------------------------------------------------------------------------------
# Data: records -> pairs of whole conversations (chosen, rejected), a strength label and a margin

def strength_of(s, where):
    """-> (label for accuracy-by-strength, margin); label 'tie' for ties, 'none' when absent."""
    if s is None:
        return "none", 0.0
    if isinstance(s, str):
        key = " ".join(s.lower().replace("_", " ").split())
        # "A much better": the seat is already resolved
        key = key[2:] if key[:2] in ("a ", "b ") else key
        try:
            s = float(key)
        except ValueError:
            if key in TIES:
                return "tie", 0.0
            if key not in MARGINS:
                raise D.DataError(f"{where}: unknown strength {s!r} "
                                  f"(one of: {', '.join(MARGINS)}, tie, or a number)") from None
            return key, MARGINS[key]
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or s < 0:
        raise D.DataError(f"{where}: bad strength {s!r} (a word or a number >= 0)")
    return ("tie" if s == 0 else f"{s:g}"), float(s)

def prompt_of(rec, where):
    if "messages" in rec or "conversations" in rec:
        return D.get_messages(rec, where, prompt=True)
    p = rec.get("prompt")
    if p is None:
        raise D.DataError(f"{where}: missing 'messages' (the conversation the responses answer)")
    p = [{"role": "user", "content": p}] if isinstance(p, str) else p
    return D.get_messages({"messages": p}, where, prompt=True)

def conversation(rec, side, where):
    """The whole conversation ending with the `side` response. A string answers rec's messages
    (which end with a user turn); a message list is the whole conversation (binarized hub sets), or
    only the reply turns after rec's messages/prompt when it starts with the assistant (TRL's
    conversational format)."""
    resp = rec.get(side)
    if resp is None:
        raise D.DataError(f"{where}: missing '{side}'")
    if isinstance(resp, str):
        resp = [{"role": "assistant", "content": resp}]
    if not isinstance(resp, list) or not resp or not all(isinstance(m, dict) for m in resp):
        raise D.DataError(f"{where}: '{side}' must be a string or a list of messages")
    if resp[0].get("role") == "assistant":
        resp = prompt_of(rec, where) + resp
    try:
        D.check_messages(resp)
    except ValueError as e:
        raise D.DataError(f"{where}: {side}: {e}") from None
    return [{"role": m["role"], "content": m["content"]} for m in resp]

def parse_pairs(records, skip_bad=False):
    """-> pairs [{chosen, rejected, strength, margin}], and counts of what was skipped and why."""
    pairs, skipped = [], Counter()
    for where, rec in records:
        judge = rec.get("judge") if isinstance(rec.get("judge"), dict) else {}
        failed = rec.get("failed") or judge.get("failed")
        if failed or rec.get("status") in ("failed", "inconsistent"):
            skipped[f"judge {rec.get('status', 'failed')}"] += 1  # annotate.py's side file
            continue
        try:
            strength, margin = strength_of(rec.get("strength"), where)
            # binarized hub sets score both sides
            scores_tie = "score_chosen" in rec and rec["score_chosen"] == rec.get("score_rejected")
            if strength == "tie" or rec.get("status") == "tie" or scores_tie:
                skipped["tie"] += 1
                continue
            chosen = conversation(rec, "chosen", where)
            rejected = conversation(rec, "rejected", where)
            if chosen == rejected:
                raise D.DataError(f"{where}: chosen and rejected are identical")
        except D.DataError as e:
            if not skip_bad:
                raise
            skipped[str(e)[len(where) + 2:]] += 1  # the reason, without file:line
            continue
        pairs.append(dict(chosen=chosen, rejected=rejected, strength=strength, margin=margin))
    return pairs, skipped

def load_pairs(paths, split="train", skip_bad=False):
    return parse_pairs(D.read_records(paths, split), skip_bad)

def tokenize(pairs, tok, template, max_len):
    """-> [(chosen ids, rejected ids)], each cut to max_len keeping the first token and the end
    (the reward is read at the closing EOS; sample.reward_scores cuts the same way), and the number
    of pairs cut."""
    out, cut = [], 0
    for p in pairs:
        ids = [D.render(tok, p[k], template)[0] for k in ("chosen", "rejected")]
        cut += any(len(x) > max_len for x in ids)
        out.append(tuple(D.keep_end(x, max_len) for x in ids))
    return out, cut

def plan(toks, batch_tokens, epochs, seed):
    """The run's micro-batches: a pair never straddles two, and counts 1 in the loss normalizer."""
    return D.plan_batches([len(c) + len(r) for c, r in toks], batch_tokens, epochs, seed, docs=2)

# -------------------------------------------------------------------------------------------------
# Model: the rewards of a micro-batch in one packed forward, and the held-out metrics

def pair_rewards(model, toks, idx):
    """(r_chosen, r_rejected) for pairs idx: all 2n sequences packed as chosen, rejected, chosen,
    ...; the model reads each reward at its sequence's last token (cu_seqlens[1:] - 1)."""
    ids, cu = D.pack([x for i in idx for x in toks[i]], model.device)
    r = model(ids, cu_seqlens=cu).float()
    return r[0::2], r[1::2]

def make_eval(pairs, toks, cfg, d):
    """eval_fn(model) -> loss, accuracy (r_chosen > r_rejected) overall and by strength, reward
    means and std."""
    margins = [p["margin"] if cfg.margin else 0.0 for p in pairs]
    batches = [b["idx"] for b in plan(toks, cfg.batch_tokens, 1, 0)]
    labels = sorted({p["strength"] for p in pairs})

    def sums(model, idx):
        r_chosen, r_rejected = pair_rewards(model, toks, idx)
        win = (r_chosen > r_rejected).tolist()
        margin = torch.tensor([margins[i] for i in idx], device=r_chosen.device)
        s = {"loss": rm_loss(r_chosen, r_rejected, margin, cfg.center_coef).sum(), "n": len(idx),
             "win": sum(win), "r_chosen": r_chosen.sum(), "r_rejected": r_rejected.sum(),
             "r2": (r_chosen ** 2 + r_rejected ** 2).sum()}
        s |= {f"{k} {l}": 0 for l in labels for k in ("n", "win")}  # every rank sums the same keys
        for i, w in zip(idx, win):
            s[f"n {pairs[i]['strength']}"] += 1
            s[f"win {pairs[i]['strength']}"] += w
        return s

    def eval_fn(model):
        s = T.evaluate(model, batches, sums, d)
        n, mean = s["n"], (s["r_chosen"] + s["r_rejected"]) / (2 * s["n"])
        out = {"loss": s["loss"] / n, "accuracy": s["win"] / n, "reward_chosen": s["r_chosen"] / n,
               "reward_rejected": s["r_rejected"] / n, "reward_mean": mean,
               "reward_std": math.sqrt(max(0.0, s["r2"] / (2 * n) - mean ** 2))}
        if len(labels) > 1:
            out |= {f"accuracy_{l.replace(' ', '_')}": s[f"win {l}"] / s[f"n {l}"] for l in labels}
        return out
    return eval_fn

# -------------------------------------------------------------------------------------------------

def train(cfg, pairs, eval_pairs=None):
    model, tok, template, d = T.prepare_model(cfg, reward=True)
    T.print0(f"config: {cfg}")
    if cfg.eval_frac and not eval_pairs:
        pairs, eval_pairs = D.split_eval(pairs, cfg.eval_frac, cfg.seed)
    toks, cut = tokenize(pairs, tok, template, cfg.max_len)
    strengths = Counter(p["strength"] for p in pairs)
    T.print0(f"data: {len(toks)} pairs, {sum(len(c) + len(r) for c, r in toks)} tokens, "
             f"template {template}, {cut} cut to --max-len {cfg.max_len}; strengths: "
             + ", ".join(f"{n} {s}" for s, n in sorted(strengths.items()))
             + f"; held out: {len(eval_pairs or [])} pairs")
    margins = torch.tensor([p["margin"] if cfg.margin else 0.0 for p in pairs], device=d.device)

    def step_fn(model, mb):
        r_chosen, r_rejected = pair_rewards(model, toks, mb["idx"])
        loss = rm_loss(r_chosen, r_rejected, margins[mb["idx"]], cfg.center_coef).sum()
        r_chosen, r_rejected = r_chosen.detach(), r_rejected.detach()
        return loss, {"accuracy": (r_chosen > r_rejected).sum(), "reward_chosen": r_chosen.sum(),
                      "reward_rejected": r_rejected.sum(), "margin": (r_chosen - r_rejected).sum()}

    eval_fn = None
    if eval_pairs:
        eval_toks = tokenize(eval_pairs, tok, template, cfg.max_len)[0]
        eval_fn = make_eval(eval_pairs, eval_toks, cfg, d)
    T.fit(cfg, model, plan(toks, cfg.batch_tokens, cfg.epochs, cfg.seed), step_fn, eval_fn, d)
    # The final reward statistics, logged: on held-out pairs, else on (a sample of) the training
    # ones: a forward over every training pair would cost a third of the training again
    if eval_fn is None:
        keep = sorted(random.Random(cfg.seed).sample(range(len(pairs)), min(len(pairs), 256)))
        eval_fn = make_eval([pairs[i] for i in keep], [toks[i] for i in keep], cfg, d)
    final = eval_fn(model)
    T.print0(f"{'eval' if eval_pairs else f'train, {len(keep)} pairs'} (final): "
             + " ".join(f"{k} {v:.4f}" for k, v in final.items()))
    T.export(cfg, model, tok, template, hint="score with: python sample.py --reward-model")
    return model, final

def run():
    cfg = D.parse_config(Config)
    if not cfg.data:
        raise SystemExit("error: --data is required (JSONL preference pairs or a dataset name)")
    pairs, skipped = load_pairs(cfg.data, cfg.split, cfg.skip_bad)
    eval_pairs, eval_skipped = None, Counter()
    if cfg.eval_data:
        eval_pairs, eval_skipped = load_pairs([cfg.eval_data], cfg.split, cfg.skip_bad)
    for name, counts in (("data", skipped), ("eval data", eval_skipped)):
        if counts:
            why = ", ".join(f"{n} ({reason})" for reason, n in counts.most_common())
            T.print0(f"{name}: skipped {why}")
    if not pairs:
        raise D.DataError(f"{cfg.data[0]}:0: no usable preference pairs")
    train(cfg, pairs, eval_pairs)
    T.barrier_and_destroy()

if __name__ == "__main__":
    D.run_main(run)
