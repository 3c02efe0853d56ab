"""
Direct Preference Optimization (arXiv 2305.18290) on pairs built from an Xwin-Set or given pairs.
Reference log-probs are computed once (sharded across ranks), cached next to the run, and the
reference is freed before training: training holds one model, as SFT does. Chosen and rejected of a
micro-batch share one packed forward.

    python dpo.py --model runs/rs --data xwin_set.jsonl --pairs mu-2sigma --out runs/dpo
    torchrun --nproc_per_node 8 dpo.py --model runs/rs --data xwin_set.jsonl --out runs/dpo
"""
import array, collections, dataclasses, gc, hashlib, json, math, os, random, re, statistics
import torch
import torch.nn.functional as F
from tqdm import tqdm
import data as D
import model as M
import training as T

@dataclasses.dataclass
class Config(T.TrainConfig):
    lr: float = 5e-7  # peak learning rate (the DPO paper's)
    epochs: int = 1  # passes over the pairs
    ref_model: str = ""  # reference checkpoint (default: --model, the starting point)
    beta: float = 0.1  # how far the policy may move from the reference (for ipo: its tau)
    loss: str = "sigmoid"  # sigmoid (DPO) or ipo
    label_smoothing: float = 0.0  # conservative DPO: the probability that a preference is flipped
    pairs: str = "worst"  # rejected from an Xwin-Set: worst, random, rank:K (K-th best), mu-2sigma
    pairs_per_prompt: int = 1  # pairs per Xwin-Set prompt: the chosen against the next candidates
    min_gap: float = 0.0  # drop built pairs whose reward gap (chosen - rejected) is below this
    ref_cache: bool = True  # cache the reference log-probs (else: a frozen reference runs online)
    ref_cache_file: str = ""  # default OUT/ref_logps.safetensors; reused when data and ref match
    skip_bad: bool = False  # skip and count bad records instead of stopping at the first
    allow_truncated: bool = False  # a response cut at --max-new-tokens may be chosen (off: no)

# -------------------------------------------------------------------------------------------------
# The loss

def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss="sigmoid",
             label_smoothing=0.0, n_chosen=None, n_rejected=None):
    """Per-pair losses from the summed response log-probs of the policy pi and the reference ref,
    and the implicit rewards beta * h_w, beta * h_l of chosen y_w and rejected y_l for a prompt x:

        h = log pi(y|x) - log ref(y|x),  z = beta (h_w - h_l)
        sigmoid (DPO, eq. 7):  L = -(1 - e) log sigmoid(z) - e log sigmoid(-z)
        ipo (arXiv 2310.12036, eq. 17, tau = beta):  L = (h_w / n_w - h_l / n_l - 1 / (2 beta))^2
    e: label smoothing (conservative DPO: the probability that a preference is flipped; 0 in the
    paper). IPO's log-ratios are per response token, as in TRL (confirmed with the IPO authors)."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss == "ipo":
        losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    else:
        z = beta * (chosen - rejected)
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * chosen.detach(), beta * rejected.detach()

Example = collections.namedtuple(  # a tokenized pair; targets: -100 but on the final reply and EOS
    "Example", "chosen_ids chosen_targets rejected_ids rejected_targets n_chosen n_rejected id")

def seq_logps(model, ex, idx):
    """Summed response log-probs of chosen and rejected of pairs idx: all 2*len(idx) sequences in
    one packed forward, summed per sequence by split (index_add's CUDA atomics are not exact)."""
    seqs = [ex[i].chosen_ids for i in idx] + [ex[i].rejected_ids for i in idx]
    tgts = [ex[i].chosen_targets for i in idx] + [ex[i].rejected_targets for i in idx]
    ids, cu = D.pack(seqs, model.device)
    lp = model(ids, cu_seqlens=cu, targets=D.pack(tgts, model.device)[0])  # [0]: concatenated
    s = torch.stack([x.sum() for x in lp.split([len(q) for q in seqs])])
    return s[:len(idx)], s[len(idx):]

def pair_terms(cfg, model, ex, idx, ref):
    """(summed loss, {stat: sum}) of pairs idx; ref: cached [2, n] log-probs or a frozen model."""
    policy_chosen, policy_rejected = seq_logps(model, ex, idx)
    if isinstance(ref, torch.Tensor):
        ref_chosen, ref_rejected = ref[:, idx].to(model.device)
    else:
        with torch.no_grad():
            ref_chosen, ref_rejected = seq_logps(ref, ex, idx)
    n = torch.tensor([(ex[i].n_chosen, ex[i].n_rejected) for i in idx], device=model.device)
    losses, wc, wr = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta,
                              cfg.loss, cfg.label_smoothing, n[:, 0], n[:, 1])  # response tokens
    names = "reward_acc reward_chosen reward_rejected margin logp_chosen logp_rejected".split()
    vals = torch.stack([(wc > wr).float().sum(), wc.sum(), wr.sum(), (wc - wr).sum(),
                        policy_chosen.detach().sum(), policy_rejected.detach().sum()])
    return losses.sum(), dict(zip(names, vals.tolist()))

# -------------------------------------------------------------------------------------------------
# Data: records -> pairs {id, messages (the prompt), chosen, rejected}, the last two as reply texts

def rejected_candidates(resp, strategy, seed, rid, allow_truncated=False):
    """(the chosen response, rejected candidates in the strategy's order of preference), indices.
    Ranked by reward, ties to the earlier response: a file always gives the same pairs."""
    rewards = [x["reward"] for x in resp]
    order = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
    best = next((i for i in order if allow_truncated or not D.truncated(resp[i])), None)
    order = order[order.index(best):] if best is not None else []  # rejected: ranked below best
    rest = [i for i in order[1:] if resp[i]["content"] != resp[best]["content"]]  # no copy of best
    if strategy == "worst":
        return best, sorted(rest, key=lambda i: (rewards[i], i))
    if strategy == "random":  # seeded by record id: the same pairs whatever file order or ranks
        return best, random.Random(f"{seed}:{rid}").sample(rest, len(rest))
    if strategy.startswith("rank:"):
        return best, rest[int(strategy[5:]) - 2:]
    # mu-2sigma (arXiv 2502.16825): nearest mean - 2 std, close to the policy's own typical output
    target = statistics.fmean(rewards) - 2 * statistics.pstdev(rewards)
    return best, sorted(rest, key=lambda i: (abs(rewards[i] - target), order.index(i)))

def as_reply(value, prompt, where, side):
    """A chosen/rejected value -> (prompt messages, reply text). A string answers the record's
    prompt; a message list is the whole conversation (hub binarized sets) or the final reply."""
    if isinstance(value, list) and [isinstance(m, dict) and m.get("role") for m in value] == \
            ["assistant"]:
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
            raise D.DataError(f"{where}: expected 'responses' (an Xwin-Set record) or 'chosen' "
                              "and 'rejected' (a pair)")
        p = rec.get("prompt")
        prompt = lambda: [{"role": "user", "content": p}] if isinstance(p, str) else \
            D.get_messages({"messages": p} if isinstance(p, list) else rec, where, prompt=True)
        (pc, c), (pr, r) = (as_reply(rec[k], prompt, where, k) for k in ("chosen", "rejected"))
        if pc != pr:
            raise D.DataError(f"{where}: chosen and rejected continue different conversations")
        if c == r:
            raise D.DataError(f"{where}: chosen and rejected are identical")
        cut = {f"{k}_truncated": bool(rec.get(f"{k}_truncated")) for k in ("chosen", "rejected")}
        if cut["chosen_truncated"] and not cfg.allow_truncated:  # as from an Xwin-Set
            counts["pairs with a truncated chosen"] += 1
            return []
        return [{"id": rid, "messages": pc, "chosen": c, "rejected": r} | cut]
    n = len(rec["responses"]) if isinstance(rec["responses"], list) else 0
    if n < 2:
        raise D.DataError(f"{where}: needs at least two responses to make a pair, got {n}")
    resp = D.scored_responses(rec, where)
    prompt = D.get_messages(rec, where, prompt=True)
    best, cands = rejected_candidates(resp, cfg.pairs, cfg.seed, rid, cfg.allow_truncated)
    out = []
    for c, r in ((resp[best], resp[i]) for i in cands[:cfg.pairs_per_prompt]):
        gap = c["reward"] - r["reward"]
        if gap <= 0 or gap < cfg.min_gap:  # equal rewards carry no preference
            counts["below --min-gap (or no reward gap)"] += 1
            continue
        out.append({"id": f"{rid}:{len(out)}", "messages": prompt, "chosen": c["content"],
                    "rejected": r["content"], "chosen_reward": c["reward"],
                    "rejected_reward": r["reward"], "chosen_truncated": D.truncated(c),
                    "rejected_truncated": D.truncated(r)})
    if not cands:  # every response cut at --max-new-tokens, or a rank past the end
        counts["prompts with every response truncated" if best is None else
               f"prompts without a candidate for --pairs {cfg.pairs}"] += 1
    return out

def load_pairs(paths, cfg):
    """All pairs of --data (Xwin-Set records or preference pairs, told apart per record), skips."""
    if not re.fullmatch(r"worst|random|mu-2sigma|rank:(?![01]$)\d+", cfg.pairs):  # rank:K, K >= 2
        raise SystemExit(f"error: --pairs {cfg.pairs}: worst, random, rank:K (K>=2) or mu-2sigma")
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
    """-> Examples, and counts of pairs cut to --max-len and dropped (no response token left).
    Targets mark the final reply (and its EOS): earlier turns are context, not what is compared."""
    examples, cut = [], 0
    for p in pairs:
        e = []
        for k in ("chosen", "rejected"):  # a truncated reply is scored as sampled: without an EOS
            conv = p["messages"] + [{"role": "assistant", "content": p[k]}]
            ids, mask = D.render(tok, conv, template, closed=not p.get(f"{k}_truncated"))
            start = len(mask) - mask[::-1].index(0)  # the trailing run of masked tokens
            tgt = [-100] * (start - 1) + ids[start:] + [-100]
            if len(ids) > max_len:  # keep the start, as TRL does
                ids, tgt, cut = ids[:max_len], tgt[:max_len - 1] + [-100], cut + 1
            e += [ids, tgt]
        n = [sum(t >= 0 for t in e[1]), sum(t >= 0 for t in e[3])]
        if min(n) > 0:
            examples.append(Example(*e, *n, p["id"]))
    return examples, cut, len(pairs) - len(examples)

# -------------------------------------------------------------------------------------------------
# The reference: log-probs computed once (each rank its share of the micro-batches), cached

def fingerprint(cfg, ex, batches, world, dtype):
    """What the cached values depend on: the token ids, the micro-batches (packing changes the last
    bits; as in training, step 0 is exactly ln 2), the reference's files, dtype and world size."""
    h = hashlib.sha256()
    path = M.resolve(cfg.ref_model or cfg.model or M.default_model())
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".json")))
    stats = [(f, os.stat(os.path.join(path, f))) for f in files]
    h.update(json.dumps([os.path.abspath(path), str(dtype), world, cfg.device, batches] +
                        [(f, s.st_size, s.st_mtime_ns) for f, s in stats]).encode())
    for e in ex:
        for x in e[:4]:  # ids and targets of chosen and rejected
            h.update(array.array("q", x).tobytes() + b"|")
    return h.hexdigest()

@torch.no_grad()
def reference_logps(ref, ex, batches, d):
    """-> [2, len(ex)] float32 summed log-probs of chosen and rejected, gathered by a sum. Every
    rank runs as many forwards (FSDP needs it): a rank short of batches repeats one, unused."""
    ref.eval()
    out = torch.zeros(2, len(ex), dtype=torch.float64, device=d.device)
    for j in tqdm(range(math.ceil(len(batches) / d.world)), desc="reference log-probs",
                  disable=d.rank != 0, dynamic_ncols=True):
        i = j * d.world + d.rank
        with ref.autocast:
            c, r = seq_logps(ref, ex, batches[i % len(batches)])
        if i < len(batches):
            out[0, batches[i]], out[1, batches[i]] = c.double(), r.double()
    if hasattr(ref, "reshard"):  # FSDP keeps the root unsharded after a forward without
        ref.reshard()  # backward: the optimizer must be built on the sharded parameters
    return torch.tensor(T.all_sum(out.tolist(), d.device)).float()  # summed over ranks

def load_reference(cfg):
    ref = T.prepare_model(dataclasses.replace(cfg, model=cfg.ref_model or cfg.model))[0]
    return ref.requires_grad_(False).eval()

def cached_reference(cfg, model, ex, batches, d):
    from safetensors.torch import safe_open, save_file
    path = cfg.ref_cache_file or os.path.join(cfg.out, "ref_logps.safetensors")
    fp = fingerprint(cfg, ex, batches, d.world, d.dtype)
    ref = None
    if os.path.exists(path):
        with safe_open(path, "pt") as f:
            if f.metadata().get("fingerprint") == fp:
                ref = torch.stack([f.get_tensor("chosen"), f.get_tensor("rejected")])
    if T.all_sum([ref is not None], d.device)[0] == d.world:  # all found it (no shared disk: redo)
        T.print0(f"reference log-probs: reusing {path}")
        return ref
    # the policy before its first step is the reference
    ref_model = model if cfg.ref_model in ("", cfg.model) else load_reference(cfg)
    ref = reference_logps(ref_model, ex, batches, d)
    del ref_model  # the reference leaves memory before training starts
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA
    if d.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({"chosen": ref[0].contiguous(), "rejected": ref[1].contiguous()}, path + ".tmp",
                  metadata={"fingerprint": fp, "ids": json.dumps([e.id for e in ex])})
        os.replace(path + ".tmp", path)
    T.print0(f"reference log-probs: computed for {ref.shape[1]} pairs, saved to {path}")
    return ref

# -------------------------------------------------------------------------------------------------

def train(cfg):
    if not cfg.data:
        raise SystemExit("error: --data is required (an Xwin-Set JSONL, preference pairs, or a "
                         "dataset name)")
    if cfg.loss not in ("sigmoid", "ipo"):
        raise SystemExit(f"error: --loss {cfg.loss}: expected sigmoid or ipo")
    pairs, counts = load_pairs(cfg.data, cfg)  # before loading the model: bad data fails fast
    eval_pairs = load_pairs([cfg.eval_data], cfg)[0] if cfg.eval_data else []
    if cfg.eval_frac and not eval_pairs:
        pairs, eval_pairs = D.split_eval(pairs, cfg.eval_frac, cfg.seed)
    model, tok, template, d = T.prepare_model(cfg)
    T.print0(f"config: {cfg}")
    if d.rank == 0:  # the pairs trained on, for audit (and usable as --data)
        D.write_jsonl_atomic(os.path.join(cfg.out, "pairs.jsonl"), pairs)
    ex, cut, dropped = tokenize(pairs, tok, template, cfg.max_len)
    ev = tokenize(eval_pairs, tok, template, cfg.max_len)[0]
    size = lambda e: len(e.chosen_ids) + len(e.rejected_ids)
    lengths = [size(e) for e in ex]
    gaps = [p["chosen_reward"] - p["rejected_reward"] for p in pairs if "chosen_reward" in p]
    T.print0(f"data: {len(ex)} pairs ({sum(lengths)} tokens), {len(ev)} eval pairs, template "
             f"{template}, {cut} cut to --max-len {cfg.max_len}, {dropped} dropped (no response "
             "left)" + "".join(f", {v} {k}" for k, v in counts.items())
             + (f", mean reward gap {statistics.fmean(gaps):.4g}" if gaps else ""))
    plan = D.plan_batches(lengths, cfg.batch_tokens, cfg.epochs, cfg.seed, docs=2)
    ev_plan = D.plan_batches([size(e) for e in ev], cfg.batch_tokens, 1, 0, shuffle=False)
    ev_batches = [[len(ex) + i for i in b["idx"]] for b in ev_plan]  # eval pairs follow in ex
    first_epoch = D.make_batches(lengths, cfg.batch_tokens, cfg.seed)  # packed as in training
    ex = ex + ev
    ref = cached_reference(cfg, model, ex, first_epoch + ev_batches, d) if cfg.ref_cache \
        else load_reference(cfg)

    def eval_stats(m, idx):
        loss, stats = pair_terms(cfg, m, ex, idx, ref)
        return stats | {"loss": float(loss), "n": len(idx)}
    def eval_fn(model):  # means per held-out pair
        s = T.evaluate(model, ev_batches, eval_stats, d)
        return {k: v / s["n"] for k, v in s.items() if k != "n"}
    step_fn = lambda m, mb: pair_terms(cfg, m, ex, mb["idx"], ref)
    T.fit(cfg, model, plan, step_fn, eval_fn if ev_batches else None, d)
    del ref
    T.export(cfg, model, tok, template)
    return model

def run():
    train(D.parse_config(Config))
    T.barrier_and_destroy()

if __name__ == "__main__":
    D.run_main(run)
