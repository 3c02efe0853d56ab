"""
Rejection-sampling finetuning (Xwin-LM's RS stage): from an Xwin-Set (prompts with reward-scored
responses, from `sample.py --reward-model`), keep each prompt's highest-reward response among its
first --n candidates, write the chosen conversations to OUT/selected.jsonl for audit, then train on
them with sft.py's train() (same packing, masks, schedule, FSDP2, resume). A response cut at
sample.py's --max-new-tokens (truncated) is never the best unless --allow-truncated: it never
ended, and training on it would teach an EOS at the cut.

    python rejection_sft.py --model runs/sft --data xwin_set.jsonl --n 16 --out runs/rs16
    torchrun --nproc_per_node 8 -- rejection_sft.py --model runs/sft --data xwin_set.jsonl \\
        --n 16 --out runs/rs16

(torchrun needs the `--` here: its own parser reads `--n` as an ambiguous abbreviation of its
flags.)
"""
import math, os
from dataclasses import dataclass
import data as D
import training as T
import sft

@dataclass
class Config(sft.Config):
    n: int = 0  # best of the first N candidates per prompt (0: all): one Xwin-Set for an N sweep
    min_reward: float = -math.inf  # drop prompts whose best reward is below this
    skip_bad: bool = False  # skip (and count) records without rewards or responses, not stop
    allow_truncated: bool = False  # a response cut at --max-new-tokens may be the best (off: no)

# -------------------------------------------------------------------------------------------------
# Data: Xwin-Set records -> the best response of each prompt

def best_response(rec, where, n, allow_truncated=False):
    """-> (prompt messages, index of the best of the first n responses, its content, its reward),
    or None when every candidate is truncated (and allow_truncated is off). Ties go to the
    earliest candidate, so a sweep over --n is reproducible."""
    messages = D.get_messages(rec, where, prompt=True)
    cands = D.scored_responses(rec, where, n)
    ok = [i for i, c in enumerate(cands) if allow_truncated or not D.truncated(c)]
    if not ok:
        return None
    best = max(ok, key=lambda i: cands[i]["reward"])  # the first of equals wins
    return messages, best, cands[best]["content"], float(cands[best]["reward"])

def select(records, cfg):
    """-> (selected records {id, where, index, reward, messages}, counts, mean reward of all the
    candidates seen)."""
    selected, bad, low, cut, seen, first_bad = [], 0, 0, 0, [], ""
    for where, rec in records:
        try:
            best = best_response(rec, where, cfg.n, cfg.allow_truncated)
        except D.DataError as e:
            if not cfg.skip_bad:
                raise
            bad, first_bad = bad + 1, first_bad or f" (first: {e})"
            continue
        k = len(rec["responses"]) if cfg.n <= 0 else min(cfg.n, len(rec["responses"]))
        seen += [float(r["reward"]) for r in rec["responses"][:k]]
        if best is None:
            cut += 1
            continue
        messages, i, content, reward = best
        if reward < cfg.min_reward:
            low += 1
            continue
        messages = messages + [{"role": "assistant", "content": content}]
        selected.append({"id": str(rec.get("id", where)), "where": where, "index": i,
                         "reward": reward, "messages": messages})
    counts = {"bad": bad, "below_min_reward": low, "all_truncated": cut, "first_bad": first_bad}
    return selected, counts, sum(seen) / max(1, len(seen))

def load_selected(paths, cfg, what):
    records = D.read_records(paths, cfg.split)
    selected, counts, mean_all = select(records, cfg)
    if not selected:
        raise D.DataError(f"{paths[0]}:0: no prompt left to train on ({counts['bad']} bad, "
                          f"{counts['below_min_reward']} below --min-reward {cfg.min_reward}, "
                          f"{counts['all_truncated']} with every candidate truncated)")
    mean = sum(s["reward"] for s in selected) / len(selected)
    summary = (f"{what}: kept {len(selected)} of {len(records)} prompts (best of "
               f"{'all' if cfg.n <= 0 else f'first {cfg.n}'}), "
               f"{counts['below_min_reward']} below --min-reward, {counts['all_truncated']} "
               f"with every candidate truncated, mean selected reward {mean:.4f} "
               f"(mean of all candidates {mean_all:.4f}); "
               f"skipped {counts['bad']} bad{counts['first_bad']}")
    return selected, summary

# -------------------------------------------------------------------------------------------------

def run(argv=None):
    cfg = D.parse_config(Config, argv)
    if not cfg.data:
        raise SystemExit("error: --data is required "
                         "(an Xwin-Set JSONL: {id, messages, responses: [{content, reward}]})")
    rank = T.setup_dist(cfg).rank  # sft.train's prepare_model reuses the same process group
    selected, summary = load_selected(cfg.data, cfg, "selection")
    evals = None
    if cfg.eval_data:
        ev, ev_summary = load_selected([cfg.eval_data], cfg, "eval selection")
        evals = [(s["where"], s["messages"]) for s in ev]
    if rank == 0:
        print(summary)
        if cfg.eval_data:
            print(ev_summary)
        # the audit file, written aside then renamed so that a killed run never leaves half of it
        audit = [{k: s[k] for k in ("id", "messages", "reward", "index")} for s in selected]
        D.write_jsonl_atomic(os.path.join(cfg.out, "selected.jsonl"), audit)
    sft.train(cfg, [(s["where"], s["messages"]) for s in selected], evals)
    T.barrier_and_destroy()

if __name__ == "__main__":
    D.run_main(run)
