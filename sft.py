"""
Supervised finetuning on multi-turn conversations: loss on every assistant turn (and its EOS) only,
conversations packed into varlen micro-batches (no attention across them, no padding), FSDP2 under
torchrun. `train(cfg, conversations)` is also what rejection_sft.py runs.

    python sft.py --model base_or_gguf --data convs.jsonl --out runs/sft
    torchrun --nproc_per_node 8 sft.py --model meta-llama/Llama-2-7b-hf --data sharegpt.jsonl \\
        --out runs/sft
"""
from dataclasses import dataclass
import torch
import data as D
import training as T

@dataclass
class Config(T.TrainConfig):
    column: str = "messages"  # dataset column of the conversation (ShareGPT 'conversations' too)
    debug_mask: bool = False  # print the first example, loss-masked tokens highlighted, then train

def sft_loss(token_logps):
    """The SFT objective, summed over a micro-batch's target tokens (assistant turns, their EOS):

        L(theta) = - sum_{t in targets} log p_theta(x_t | x_<t)

    token_logps: log p of each packed position's next token, 0 where it is no target. fit() divides
    the sum by the step's total target-token count (all micro-batches, all ranks): a step's loss is
    the mean over its target tokens, whatever the packing, accumulation or number of ranks."""
    return -token_logps.sum()

# -------------------------------------------------------------------------------------------------
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

def plan(examples, batch_tokens, epochs, seed):
    """The run's micro-batches; each one's loss normalizer is its number of target tokens."""
    lengths = [len(ids) for ids, _ in examples]
    counts = [sum(mask[1:]) for _, mask in examples]
    return D.plan_batches(lengths, batch_tokens, epochs, seed, counts=counts)

# -------------------------------------------------------------------------------------------------
# Model: the log-probs of a micro-batch's target tokens in one packed forward

def target_logps(model, examples, idx):
    """log p of every target token of examples[idx], all packed into one row (0 at non-targets)."""
    ids, cu = D.pack([examples[i][0] for i in idx], model.device)
    targets = torch.tensor([t for i in idx for t in targets_of(*examples[i])], device=model.device)
    return model(ids, cu_seqlens=cu, targets=targets)

# -------------------------------------------------------------------------------------------------

def train(cfg, conversations, eval_conversations=None):
    model, tok, template, d = T.prepare_model(cfg)
    T.print0(f"config: {cfg}")
    if cfg.eval_frac and not eval_conversations:
        conversations, eval_conversations = D.split_eval(conversations, cfg.eval_frac, cfg.seed)
    examples, truncated, dropped = tokenize(conversations, tok, template, cfg.max_len)
    n_tok, n_trained = sum(len(e[0]) for e in examples), sum(sum(m) for _, m in examples)
    T.print0(f"data: {len(examples)} conversations, {n_tok} tokens ({n_trained} trained on), "
             f"template {template}, {truncated} truncated to --max-len {cfg.max_len}, "
             f"{dropped} dropped")
    if cfg.debug_mask:
        T.print0(D.show_mask(tok, *examples[0]))
    eval_fn = None
    if eval_conversations:
        ev, _, _ = tokenize(eval_conversations, tok, template, cfg.max_len)
        ev_batches = [b["idx"] for b in plan(ev, cfg.batch_tokens, 1, 0)]

        def eval_sums(m, idx):
            return {"nll": float(sft_loss(target_logps(m, ev, idx))),
                    "n": sum(sum(ev[i][1][1:]) for i in idx)}

        def eval_fn(model):
            s = T.evaluate(model, ev_batches, eval_sums, d)
            return {"loss": s["nll"] / s["n"]}

    def step_fn(model, mb):
        return sft_loss(target_logps(model, examples, mb["idx"])), {}
    T.fit(cfg, model, plan(examples, cfg.batch_tokens, cfg.epochs, cfg.seed), step_fn, eval_fn, d)
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
