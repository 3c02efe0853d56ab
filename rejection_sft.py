"""
Rejection-sampling finetuning (Xwin-LM's RS stage): from an Xwin-Set (prompts with reward-scored
responses, from `sample.py --reward-model`), keep each prompt's highest-reward response among its first
--n candidates, write the chosen conversations to OUT/selected.jsonl for audit, then train on them
with sft.py's train() (same packing, masks, schedule, FSDP2, resume).

    python rejection_sft.py --model runs/sft --data xwin_set.jsonl --n 16 --out runs/rs16
    torchrun --nproc_per_node 8 -- rejection_sft.py --model runs/sft --data xwin_set.jsonl --n 16 --out runs/rs16

(torchrun needs the `--` here: its own parser reads `--n` as an ambiguous abbreviation of its flags.)
"""
import json, math, os
from dataclasses import dataclass
import data as D
import training as T
import sft

@dataclass
class Config(sft.Config):
    n: int = 0  # best of the first N candidates per prompt (0: all), so one Xwin-Set file serves a best-of-N sweep
    min_reward: float = -math.inf  # drop prompts whose best reward is below this
    skip_bad: bool = False  # skip (and count) records without rewards or responses instead of stopping

# ----------------------------------------------------------------------------------------------------
# Data: Xwin-Set records -> the best response of each prompt

def best_response(rec, where, n):
    """-> (prompt messages, index of the best of the first n responses, its content, its reward).
    Ties go to the earliest candidate, so a sweep over --n is reproducible."""
    messages = D.get_messages(rec, where, prompt=True)
    responses = rec.get("responses")
    if not isinstance(responses, list) or not responses:
        raise D.DataError(f"{where}: no responses (an Xwin-Set record needs 'responses': [{{content, reward}}, ...])")
    cands = responses[:n] if n > 0 else responses
    for i, r in enumerate(cands):
        if not isinstance(r, dict) or not isinstance(r.get("content"), str):
            raise D.DataError(f"{where}: response {i} needs a string 'content'")
        reward = r.get("reward")
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise D.DataError(f"{where}: response {i} has no numeric reward ({reward!r}); "
                              "score the responses with sample.py --reward-model")
    best = max(range(len(cands)), key=lambda i: cands[i]["reward"])  # max() keeps the first of equals
    return messages, best, cands[best]["content"], float(cands[best]["reward"])

def select(records, cfg):
    """-> (selected records {id, where, index, reward, messages}, counts, mean reward of all candidates seen)."""
    selected, bad, low, seen, first_bad = [], 0, 0, [], ""
    for where, rec in records:
        try:
            messages, i, content, reward = best_response(rec, where, cfg.n)
        except D.DataError as e:
            if not cfg.skip_bad:
                raise
            bad, first_bad = bad + 1, first_bad or f" (first: {e})"
            continue
        k = len(rec["responses"]) if cfg.n <= 0 else min(cfg.n, len(rec["responses"]))
        seen += [float(r["reward"]) for r in rec["responses"][:k]]
        if reward < cfg.min_reward:
            low += 1
            continue
        selected.append({"id": str(rec.get("id", where)), "where": where, "index": i, "reward": reward,
                         "messages": messages + [{"role": "assistant", "content": content}]})
    return selected, {"bad": bad, "below_min_reward": low, "first_bad": first_bad}, sum(seen) / max(1, len(seen))

def load_selected(paths, cfg, what):
    records = D.read_records(paths, cfg.split)
    selected, counts, mean_all = select(records, cfg)
    if not selected:
        raise D.DataError(f"{paths[0]}:0: no prompt left to train on ({counts['bad']} bad, "
                          f"{counts['below_min_reward']} below --min-reward {cfg.min_reward})")
    mean = sum(s["reward"] for s in selected) / len(selected)
    summary = (f"{what}: kept {len(selected)} of {len(records)} prompts (best of "
               f"{'all' if cfg.n <= 0 else f'first {cfg.n}'}), {counts['below_min_reward']} below --min-reward, "
               f"mean selected reward {mean:.4f} (mean of all candidates {mean_all:.4f}); "
               f"skipped {counts['bad']} bad{counts['first_bad']}")
    return selected, summary

def write_selected(path, selected):
    """The audit file: written aside then renamed, so a killed run never leaves half of it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for s in selected:
            f.write(json.dumps({"id": s["id"], "messages": s["messages"], "reward": s["reward"], "index": s["index"]},
                               ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)

# ----------------------------------------------------------------------------------------------------

def run(argv=None):
    cfg = D.parse_config(Config, argv)
    if not cfg.data:
        raise SystemExit("error: --data is required (an Xwin-Set JSONL: {id, messages, responses: [{content, reward}]})")
    rank = T.setup_dist(cfg)[0]  # sft.train's prepare_model reuses the same process group
    selected, summary = load_selected(cfg.data, cfg, "selection")
    evals = None
    if cfg.eval_data:
        ev, ev_summary = load_selected([cfg.eval_data], cfg, "eval selection")
        evals = [(s["where"], s["messages"]) for s in ev]
    if rank == 0:
        print(summary)
        if cfg.eval_data:
            print(ev_summary)
        write_selected(os.path.join(cfg.out, "selected.jsonl"), selected)
    sft.train(cfg, [(s["where"], s["messages"]) for s in selected], evals)
    T.barrier_and_destroy()

if __name__ == "__main__":
    D.run_main(run)
