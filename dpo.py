"""
Direct Preference Optimization (arXiv 2305.18290) on pairs built from an Xwin-Set (n scored responses per
prompt) or on given preference pairs. The reference model's log-probs are computed once, in a first pass
sharded across ranks, cached next to the run, and the reference is freed before training starts: training
holds one model, as SFT does. Chosen and rejected of a micro-batch go through one packed forward.

    python dpo.py --model runs/rs --data xwin_set.jsonl --pairs mu-2sigma --out runs/dpo
    torchrun --nproc_per_node 8 dpo.py --model runs/rs --data xwin_set.jsonl --out runs/dpo
"""
import collections, dataclasses, gc, hashlib, json, math, os, random, re, statistics
from array import array
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from tqdm import tqdm
import data as D
import model as M
import training as T

@dataclass
class Config(T.TrainConfig):
    lr: float = 5e-7  # peak learning rate (the DPO paper's)
    epochs: int = 1  # passes over the pairs
    ref_model: str = ""  # reference checkpoint (default: --model, the starting point)
    beta: float = 0.1  # how far the policy may move from the reference (for ipo: its tau)
    loss: str = "sigmoid"  # sigmoid (DPO) or ipo
    label_smoothing: float = 0.0  # conservative DPO: the assumed probability that a preference is flipped
    pairs: str = "worst"  # rejected response from an Xwin-Set: worst, random, rank:K (K-th best), mu-2sigma
    pairs_per_prompt: int = 1  # pairs per Xwin-Set prompt: the chosen against the strategy's next candidates
    min_gap: float = 0.0  # drop built pairs whose reward gap (chosen - rejected) is below this
    ref_cache: bool = True  # reference log-probs computed once and cached (else: a frozen reference run online)
    ref_cache_file: str = ""  # the cache (default OUT/ref_logps.safetensors); reused when data and reference match
    skip_bad: bool = False  # skip and count bad records instead of stopping at the first

# ----------------------------------------------------------------------------------------------------
# Data: records -> pairs {id, messages (the prompt), chosen, rejected} with chosen/rejected as reply texts

def rejected_candidates(resp, strategy, seed, rid):
    """(index of the chosen response, indices of rejected candidates in the strategy's order of preference).
    Ranking is by reward, ties going to the earlier response, so the same file always gives the same pairs."""
    rewards = [x["reward"] for x in resp]
    order = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
    best = order[0]
    rest = [i for i in order[1:] if resp[i]["content"] != resp[best]["content"]]  # a copy of the chosen is no rejected
    if strategy == "worst":
        return best, sorted(rest, key=lambda i: (rewards[i], i))
    if strategy == "random":  # seeded by record id: the same pairs whatever the file order or rank count
        return best, random.Random(f"{seed}:{rid}").sample(rest, len(rest))
    if strategy.startswith("rank:"):
        return best, rest[int(strategy[5:]) - 2:]
    # mu-2sigma (arXiv 2502.16825): the response nearest mean - 2 std, close to the policy's own typical output
    target = statistics.fmean(rewards) - 2 * statistics.pstdev(rewards)
    return best, sorted(rest, key=lambda i: (abs(rewards[i] - target), order.index(i)))

def as_reply(value, prompt, where, side):
    """A chosen/rejected value -> (prompt messages, reply text). A string answers the record's prompt; a
    message list is the whole conversation (hub binarized sets) or just the final assistant turn."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if isinstance(value, str):
        return prompt(), value
    if not isinstance(value, list):
        raise D.DataError(f"{where}: '{side}' must be a string or a list of messages")
    msgs = D.get_messages({"messages": value}, f"{where}: '{side}'")
    return msgs[:-1], msgs[-1]["content"]

def record_pairs(rec, where, cfg, counts):
    rid = str(rec.get("id", where))
    if "responses" not in rec:  # a preference pair
        if "chosen" not in rec or "rejected" not in rec:
            raise D.DataError(f"{where}: expected 'responses' (an Xwin-Set record) or 'chosen' and 'rejected' (a pair)")
        p = rec.get("prompt")
        prompt = lambda: [{"role": "user", "content": p}] if isinstance(p, str) else \
            D.get_messages({"messages": p} if isinstance(p, list) else rec, where, prompt=True)
        (pc, c), (pr, r) = as_reply(rec["chosen"], prompt, where, "chosen"), as_reply(rec["rejected"], prompt, where, "rejected")
        if pc != pr:
            raise D.DataError(f"{where}: chosen and rejected continue different conversations")
        if c == r:
            raise D.DataError(f"{where}: chosen and rejected are identical")
        return [{"id": rid, "messages": pc, "chosen": c, "rejected": r}]
    resp = rec["responses"]
    if not isinstance(resp, list) or len(resp) < 2:
        raise D.DataError(f"{where}: needs at least two responses to make a pair, got {len(resp) if isinstance(resp, list) else 0}")
    for i, x in enumerate(resp):
        if not isinstance(x, dict) or not isinstance(x.get("content"), str):
            raise D.DataError(f"{where}: response {i} needs a string 'content'")
        rw = x.get("reward")
        if isinstance(rw, bool) or not isinstance(rw, (int, float)) or not math.isfinite(rw):
            raise D.DataError(f"{where}: response {i} has no numeric 'reward' (score the set: sample.py --reward-model)")
    prompt = D.get_messages(rec, where, prompt=True)
    best, cands = rejected_candidates(resp, cfg.pairs, cfg.seed, rid)
    out = []
    for i in cands[:cfg.pairs_per_prompt]:
        gap = resp[best]["reward"] - resp[i]["reward"]
        if gap <= 0 or gap < cfg.min_gap:  # equal rewards carry no preference
            counts["below --min-gap (or no reward gap)"] += 1
            continue
        out.append({"id": f"{rid}:{len(out)}", "messages": prompt, "chosen": resp[best]["content"], "rejected": resp[i]["content"],
                    "chosen_reward": resp[best]["reward"], "rejected_reward": resp[i]["reward"]})
    if not cands:
        counts[f"prompts without a candidate for --pairs {cfg.pairs}"] += 1
    return out

def load_pairs(paths, cfg):
    """All pairs of --data (Xwin-Set records or preference pairs, told apart per record) and skip counts."""
    if not re.fullmatch(r"worst|random|mu-2sigma|rank:\d+", cfg.pairs) or cfg.pairs in ("rank:0", "rank:1"):
        raise SystemExit(f"error: --pairs {cfg.pairs}: expected worst, random, rank:K (K >= 2) or mu-2sigma")
    pairs, counts = [], collections.Counter()
    for where, rec in D.read_records(paths, cfg.split):
        try:
            pairs += record_pairs(rec, where, cfg, counts)
        except D.DataError:
            if not cfg.skip_bad:
                raise
            counts["bad records (--skip-bad)"] += 1
    return pairs, counts

def tokenize(pairs, tok, template, max_len):
    """-> examples [chosen ids, chosen targets, rejected ids, rejected targets, n chosen, n rejected, pair id],
    and counts of pairs cut to --max-len and dropped (no response token left). Targets mark the final
    assistant turn and its EOS only: earlier turns are context, not the response being compared."""
    examples, cut, dropped = [], 0, 0
    for p in pairs:
        e = []
        for reply in (p["chosen"], p["rejected"]):
            ids, mask = D.render(tok, p["messages"] + [{"role": "assistant", "content": reply}], template)
            start = len(mask) - mask[::-1].index(0)  # the trailing run of masked tokens
            tgt = [-100] * (start - 1) + ids[start:] + [-100]
            if len(ids) > max_len:  # keep the start, as TRL does
                ids, tgt, cut = ids[:max_len], tgt[:max_len - 1] + [-100], cut + 1
            e += [ids, tgt]
        n = [sum(t >= 0 for t in e[1]), sum(t >= 0 for t in e[3])]
        if min(n) == 0:
            dropped += 1
        else:
            examples.append(e + n + [p["id"]])
    return examples, cut, dropped

# ----------------------------------------------------------------------------------------------------
# Log-probs and the loss

def seq_logps(model, ex, idx):
    """Summed response log-probs of chosen and rejected of pairs idx: all 2*len(idx) sequences in one packed
    forward. Summed per sequence with split (not index_add, whose atomics on CUDA are not deterministic)."""
    dev = model.model.embed_tokens.weight.device
    seqs = [ex[i][0] for i in idx] + [ex[i][2] for i in idx]
    ids, cu = D.pack(seqs, dev)
    targets = torch.tensor([t for i in idx for t in ex[i][1]] + [t for i in idx for t in ex[i][3]], device=dev)
    lp = model(ids, cu_seqlens=cu, targets=targets)
    s = torch.stack([x.sum() for x in lp.split([len(q) for q in seqs])])
    return s[:len(idx)], s[len(idx):]

def dpo_loss(cfg, pc, pr, rc, rr, nc=None, nr=None):
    """Per-pair losses and implicit rewards beta * log(pi / ref) of chosen and rejected, from summed
    log-probs of the policy (pc, pr) and the reference (rc, rr); nc, nr: response token counts (ipo)."""
    chosen, rejected = pc - rc, pr - rr
    if cfg.loss == "ipo":  # per-token log-ratios, as TRL does (confirmed there with the IPO authors)
        losses = (chosen / nc - rejected / nr - 1 / (2 * cfg.beta)) ** 2
    else:
        z = cfg.beta * (chosen - rejected)
        losses = -(1 - cfg.label_smoothing) * F.logsigmoid(z) - cfg.label_smoothing * F.logsigmoid(-z)
    return losses, cfg.beta * chosen.detach(), cfg.beta * rejected.detach()

def pair_terms(cfg, model, ex, idx, ref):
    """(summed loss, {stat: sum}) of pairs idx; ref is the cached [2, n] log-probs or a frozen model."""
    pc, pr = seq_logps(model, ex, idx)
    if isinstance(ref, torch.Tensor):
        rc, rr = ref[:, idx].to(pc.device)
    else:
        with torch.no_grad():
            rc, rr = seq_logps(ref, ex, idx)
    n = torch.tensor([[ex[i][k] for i in idx] for k in (4, 5)], device=pc.device)
    losses, wc, wr = dpo_loss(cfg, pc, pr, rc, rr, *n)
    names = ["reward_acc", "reward_chosen", "reward_rejected", "margin", "logp_chosen", "logp_rejected"]
    vals = torch.stack([(wc > wr).float().sum(), wc.sum(), wr.sum(), (wc - wr).sum(), pc.detach().sum(), pr.detach().sum()])
    return losses.sum(), dict(zip(names, vals.tolist()))

# ----------------------------------------------------------------------------------------------------
# The reference: log-probs computed once (each rank its share of the micro-batches), cached by fingerprint

def fingerprint(cfg, ex, batches, world, dtype):
    """What the cached values depend on: the token ids, the micro-batches (packing changes the last bits,
    and the same batches make step 0 exactly ln 2), the reference weights' files, dtype and world size."""
    h = hashlib.sha256()
    path = M.resolve(cfg.ref_model or cfg.model or M.default_model())
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".json")))
    h.update(json.dumps([os.path.abspath(path), str(dtype), world, cfg.device, batches] +
                        [(f, os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns) for f in files]).encode())
    for e in ex:
        for x in e[:4]:
            h.update(array("q", x).tobytes() + b"|")
    return h.hexdigest()

@torch.no_grad()
def reference_logps(ref, ex, batches, dist_info):
    """-> [2, len(ex)] float32 summed log-probs of chosen and rejected. Every rank runs the same number of
    forwards (FSDP's collectives need it; a rank short of batches repeats one, unused); a sum gathers them."""
    import torch.distributed as dist
    rank, world, dev = dist_info
    ref.eval()
    out = torch.zeros(2, len(ex), dtype=torch.float64, device=dev)
    for j in tqdm(range(math.ceil(len(batches) / world)), desc="reference log-probs", disable=rank != 0, dynamic_ncols=True):
        i = j * world + rank
        with ref.autocast:
            c, r = seq_logps(ref, ex, batches[i % len(batches)])
        if i < len(batches):
            out[0, batches[i]], out[1, batches[i]] = c.double(), r.double()
    if hasattr(ref, "reshard"):  # FSDP keeps the root unsharded after a forward without backward: the
        ref.reshard()  # optimizer must be built on the sharded parameters
    if dist.is_initialized():
        dist.all_reduce(out)
    return out.float().cpu()

def load_reference(cfg):
    ref = T.prepare_model(dataclasses.replace(cfg, model=cfg.ref_model or cfg.model))[0]
    return ref.requires_grad_(False).eval()

def cached_reference(cfg, model, ex, ids, batches, dist_info, dtype, log):
    from safetensors import safe_open
    from safetensors.torch import save_file
    rank, world, dev = dist_info
    path = cfg.ref_cache_file or os.path.join(cfg.out, "ref_logps.safetensors")
    fp = fingerprint(cfg, ex, batches, world, dtype)
    ref = None
    if os.path.exists(path):
        with safe_open(path, "pt") as f:
            if f.metadata().get("fingerprint") == fp:
                ref = torch.stack([f.get_tensor("chosen"), f.get_tensor("rejected")])
    if T.all_sum([ref is not None], dev)[0] == world:  # every rank found it (no shared disk: all recompute)
        log(f"reference log-probs: reusing {path}")
        return ref
    same = cfg.ref_model in ("", cfg.model)
    ref_model = model if same else load_reference(cfg)  # the policy before its first step is the reference
    ref = reference_logps(ref_model, ex, batches, dist_info)
    del ref_model  # the reference leaves memory before training starts
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({"chosen": ref[0].contiguous(), "rejected": ref[1].contiguous()}, path + ".tmp",
                  metadata={"fingerprint": fp, "ids": json.dumps(ids)})
        os.replace(path + ".tmp", path)
    log(f"reference log-probs: computed for {ref.shape[1]} pairs, saved to {path}")
    return ref

# ----------------------------------------------------------------------------------------------------

def plan_batches(ex, cfg, epochs, seed, offset=0, shuffle=True):
    lengths = [len(e[0]) + len(e[2]) for e in ex]
    plan = []
    for epoch in range(epochs):
        for idx in D.make_batches(lengths, cfg.batch_tokens, seed + epoch, shuffle):
            plan.append({"idx": [i + offset for i in idx], "tokens": sum(lengths[i] for i in idx), "docs": 2 * len(idx), "count": len(idx)})
    return plan

def train(cfg):
    if cfg.loss not in ("sigmoid", "ipo"):
        raise SystemExit(f"error: --loss {cfg.loss}: expected sigmoid or ipo")
    pairs, counts = load_pairs(cfg.data, cfg)  # before loading the model: bad data fails fast
    eval_pairs = load_pairs([cfg.eval_data], cfg)[0] if cfg.eval_data else []
    if cfg.eval_frac and not eval_pairs:
        pairs = pairs[:]
        random.Random(cfg.seed).shuffle(pairs)
        k = max(1, int(len(pairs) * cfg.eval_frac))
        pairs, eval_pairs = pairs[k:], pairs[:k]
    model, tok, template, dist_info = T.prepare_model(cfg)
    rank, world, dev = dist_info
    dtype = T.setup_dist(cfg)[3]
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"config: {cfg}")
    if rank == 0:  # the pairs trained on, for audit (and usable as --data)
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "pairs.jsonl.tmp"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        os.replace(os.path.join(cfg.out, "pairs.jsonl.tmp"), os.path.join(cfg.out, "pairs.jsonl"))
    ex, cut, dropped = tokenize(pairs, tok, template, cfg.max_len)
    ev, _, _ = tokenize(eval_pairs, tok, template, cfg.max_len)
    gaps = [p["chosen_reward"] - p["rejected_reward"] for p in pairs if "chosen_reward" in p]
    log(f"data: {len(ex)} pairs ({sum(len(e[0]) + len(e[2]) for e in ex)} tokens), {len(ev)} eval pairs, template {template}, "
        f"{cut} cut to --max-len {cfg.max_len}, {dropped} dropped (no response left)"
        + "".join(f", {v} {k}" for k, v in counts.items()) + (f", mean reward gap {statistics.fmean(gaps):.4g}" if gaps else ""))
    plan = plan_batches(ex, cfg, cfg.epochs, cfg.seed)
    ev_batches = [b["idx"] for b in plan_batches(ev, cfg, 1, 0, offset=len(ex), shuffle=False)]
    first_epoch = [b["idx"] for b in plan_batches(ex, cfg, 1, cfg.seed)]  # the same packs as step 0 onwards
    ex = ex + ev
    if cfg.ref_cache:
        ref = cached_reference(cfg, model, ex, [e[6] for e in ex], first_epoch + ev_batches, dist_info, dtype, log)
    else:
        ref = load_reference(cfg)

    eval_fn = None
    if ev_batches:
        def eval_fn(model):
            def fn(m, idx):
                loss, stats = pair_terms(cfg, m, ex, idx, ref)
                return stats | {"loss": float(loss), "n": len(idx)}
            s = T.evaluate(model, ev_batches, fn, dist_info)
            return {k: v / s["n"] for k, v in s.items() if k != "n"}
    T.fit(cfg, model, plan, lambda m, mb: pair_terms(cfg, m, ex, mb["idx"], ref), eval_fn, dist_info)
    del ref
    T.export(cfg, model, tok, template)
    return model

def run():
    cfg = D.parse_config(Config)
    if not cfg.data:
        raise SystemExit("error: --data is required (an Xwin-Set JSONL, preference pairs, or a dataset name)")
    train(cfg)
    T.barrier_and_destroy()

if __name__ == "__main__":
    D.run_main(run)
