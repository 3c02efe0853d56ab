"""
Supervised finetuning on multi-turn conversations: loss on every assistant turn (and its EOS) only,
conversations packed into varlen micro-batches (no attention across them, no padding), FSDP2 under
torchrun. `train(cfg, conversations)` is also what rejection_sft.py runs.

    python sft.py --model base_or_gguf --data convs.jsonl --out runs/sft
    torchrun --nproc_per_node 8 sft.py --model meta-llama/Llama-2-7b-hf --data sharegpt.jsonl --out runs/sft
"""
import random
from dataclasses import dataclass
import torch
import data as D
import model as M
import training as T

@dataclass
class Config(T.TrainConfig):
    column: str = "messages"  # dataset column holding the conversation (ShareGPT 'conversations' also read)
    debug_mask: bool = False  # print the first example with its loss-masked tokens highlighted, then train

# ----------------------------------------------------------------------------------------------------
# Data: conversations -> (ids, mask), truncated at a turn boundary when longer than --max-len

def load_conversations(paths, split="train", column="messages"):
    out = []
    for where, rec in D.read_records(paths, split):
        if column != "messages" and column in rec:
            rec = {"messages": rec[column]}
        out.append((where, D.get_messages(rec, where)))
    return out

def tokenize(conversations, tok, template, max_len):
    """-> examples [(ids, mask)], and counts of truncated and dropped conversations. A conversation
    too long is cut after its last assistant turn that fits; if even the first does not, its tokens
    are cut at max_len (dropped if no assistant token is left)."""
    examples, truncated, dropped = [], 0, 0
    for where, msgs in conversations:
        ids, mask = D.render(tok, msgs, template)
        if len(ids) > max_len:
            truncated += 1
            ends = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            for end in reversed(ends[:-1]):
                ids, mask = D.render(tok, msgs[:end + 1], template)
                if len(ids) <= max_len:
                    break
            ids, mask = ids[:max_len], mask[:max_len]
            if sum(mask[1:]) == 0:
                dropped += 1
                continue
        examples.append((ids, mask))
    return examples, truncated, dropped

def targets_of(ids, mask):
    """Next-token targets within one conversation: -100 where the next token is not trained on."""
    return [t if m else -100 for t, m in zip(ids[1:], mask[1:])] + [-100]

def plan_batches(examples, cfg, epochs, seed):
    """Every micro-batch of the run (a list of example indices), epoch after epoch, each epoch in its
    own seeded order: deterministic, so a resumed run and any number of ranks see the same batches."""
    lengths = [len(ids) for ids, _ in examples]
    plan = []
    for epoch in range(epochs):
        for idx in D.make_batches(lengths, cfg.batch_tokens, seed + epoch):
            plan.append({"idx": idx, "tokens": sum(lengths[i] for i in idx), "docs": len(idx),
                         "count": sum(sum(examples[i][1][1:]) for i in idx)})
    return plan

def sft_loss(model, examples, idx):
    """Summed negative log-likelihood of the target tokens of examples[idx], packed into one row."""
    dev = model.model.embed_tokens.weight.device
    ids, cu = D.pack([examples[i][0] for i in idx], dev)
    targets = torch.tensor([t for i in idx for t in targets_of(*examples[i])], device=dev)
    return -model(ids, cu_seqlens=cu, targets=targets).sum()

# ----------------------------------------------------------------------------------------------------

def train(cfg, conversations, eval_conversations=None):
    model, tok, template, dist_info = T.prepare_model(cfg)
    rank = dist_info[0]
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"config: {cfg}")
    if cfg.eval_frac and not eval_conversations:
        conversations = conversations[:]
        random.Random(cfg.seed).shuffle(conversations)
        k = max(1, int(len(conversations) * cfg.eval_frac))
        conversations, eval_conversations = conversations[k:], conversations[:k]
    examples, truncated, dropped = tokenize(conversations, tok, template, cfg.max_len)
    n_tok = sum(len(e[0]) for e in examples)
    log(f"data: {len(examples)} conversations, {n_tok} tokens ({sum(sum(m) for _, m in examples)} trained on), "
        f"template {template}, {truncated} truncated to --max-len {cfg.max_len}, {dropped} dropped")
    if cfg.debug_mask and rank == 0:
        print(D.show_mask(tok, *examples[0]))
    plan = plan_batches(examples, cfg, cfg.epochs, cfg.seed)
    eval_fn = None
    if eval_conversations:
        ev, _, _ = tokenize(eval_conversations, tok, template, cfg.max_len)
        ev_batches = [b["idx"] for b in plan_batches(ev, cfg, 1, 0)]

        def eval_fn(model):
            s = T.evaluate(model, ev_batches, lambda m, idx: {"nll": float(sft_loss(m, ev, idx)),
                                                              "n": sum(sum(ev[i][1][1:]) for i in idx)}, dist_info)
            return {"loss": s["nll"] / s["n"]}
    T.fit(cfg, model, plan, lambda m, mb: (sft_loss(m, examples, mb["idx"]), {}), eval_fn, dist_info)
    T.export(cfg, model, tok, template)
    return model

def run():
    cfg = D.parse_config(Config)
    if not cfg.data:
        raise SystemExit("error: --data is required (JSONL conversations or a dataset name)")
    evals = load_conversations([cfg.eval_data], cfg.split, cfg.column) if cfg.eval_data else None
    train(cfg, load_conversations(cfg.data, cfg.split, cfg.column), evals)
    T.barrier_and_destroy()

if __name__ == "__main__":
    D.run_main(run)
