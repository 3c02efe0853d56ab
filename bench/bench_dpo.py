"""
DPO throughput and peak memory: dpo.py's training path (reference log-probs cached in a first pass, then
training.fit over packed chosen+rejected micro-batches) against TRL's DPOTrainer, on the same model
(SmolLM2-135M from the bundled GGUF), the same pairs, max length, pairs per micro-batch, steps, schedule
and dtype, on this machine. Sides:
  ours      dpo.py as it comes: torch AdamW (fused), grad clipping 1.0
  lowmem    dpo.py --optim adamw-lowmem --grad-clip 0: AdamW stepped in backward, bf16 moments
  trl       DPOTrainer at its best for memory: precompute_ref_log_probs (no reference model in training)
  trl-live  DPOTrainer's default: a reference model held and run beside the policy
Both sides use activation checkpointing by default (TRL's DPOConfig default; --no-grad-ckpt: neither).
TRL 1.16's padding_free falls back to padding. Each trainer runs in its own subprocess, so peak RSS
(ru_maxrss) is its own. tokens/s counts real (non-pad) tokens, over the steps after --warmup; the
reference pass is timed apart. training.py backs large CPU tensors with huge pages (THP_MEM_ALLOC_ENABLE=1),
and every side imports it: all run with the same allocator (THP_MEM_ALLOC_ENABLE=0: all without).

    pip install trl==1.16.0   # the bench only; nothing else imports trl
    python bench/bench_dpo.py --pairs 16 --pairs-per-batch 4 --steps 4 --warmup 1   # ~20 min on 2 cores
"""
import json, os, random, resource, shutil, subprocess, sys, time
from dataclasses import dataclass, field
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import model as M  # noqa: E402
import training as T  # noqa: E402

@dataclass
class Config:
    model: str = ""  # HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)
    out: str = "bench_out/dpo"  # scratch folder: data, runs, results.json
    pairs: int = 64  # synthetic preference pairs
    min_tokens: int = 150  # rendered length range of prompt + response (approximate)
    max_tokens: int = 512  # (and the max length of both trainers)
    pairs_per_batch: int = 4  # pairs per micro-batch (TRL's per_device_train_batch_size)
    steps: int = 12  # optimizer steps, each one micro-batch
    warmup: int = 2  # first steps left out of tokens/s (allocator warmup, lazy init)
    dtypes: list = field(default_factory=lambda: ["float32"] + ["bfloat16"] * M.native_bf16())  # and bf16 autocast over fp32 weights where the CPU has native bf16
    sides: list = field(default_factory=lambda: ["ours", "lowmem", "trl", "trl-live"])  # which trainers to run (see above)
    grad_ckpt: bool = True  # activation checkpointing on both sides (TRL's gradient_checkpointing, our --act-ckpt)
    trl_attn: str = "sdpa"  # TRL's attn_implementation (sdpa, eager, flash_attention_2)
    lr: float = 5e-7  # peak lr, cosine decay, no warmup (both)
    seed: int = 0  # data and order
    child: str = ""  # internal: run one side (ours or trl) with --dtype and print its result
    dtype: str = "float32"  # internal: the child's dtype

PROMPTS = ["Explain how {} works.", "Write a short story about {}.", "What are the pros and cons of {}?",
           "Give me three tips for {}.", "Summarize the history of {}.", "How would you teach {} to a child?"]
TOPICS = ["photosynthesis", "the stock market", "learning Python", "a trip to Paris", "black holes", "gardening",
          "the French revolution", "machine learning", "healthy sleep", "public speaking", "jazz", "volcanoes"]
WORDS = ("the of and to in is that for it as with was on be by this are or at from an which have not but "
         "model data train because however therefore simple method step between each other could would "
         "should about after before first second example answer important often usually always never "
         "history science music river mountain city country language world people time year day night").split()

def synth(cfg, tok, template):
    """Preference pairs: demo-like prompts, random-word replies whose rendered lengths spread over the range."""
    rng = random.Random(cfg.seed)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(max(1, n))).capitalize() + "."
    out = []
    while len(out) < cfg.pairs:
        msgs = [{"role": "user", "content": rng.choice(PROMPTS).format(rng.choice(TOPICS))}]
        head = len(D.render(tok, msgs, template, prompt=True)[0])
        c, r = (words(rng.randint(max(8, cfg.min_tokens - head), cfg.max_tokens - head - 8)) for _ in range(2))
        if c != r and max(len(D.render(tok, msgs + [{"role": "assistant", "content": x}], template)[0]) for x in (c, r)) <= cfg.max_tokens:
            out.append({"id": f"b{len(out)}", "messages": msgs, "chosen": c, "rejected": r})
    return out

def timed(step_tokens, step_ends, t_start, warmup):
    ends = [t_start] + step_ends
    return sum(step_tokens[warmup:]) / (ends[-1] - ends[warmup])

def run_ours(cfg, data, out):
    import dpo
    c = dpo.Config(model=cfg.model, data=[data], out=out, max_len=cfg.max_tokens, max_steps=cfg.steps + 1, epochs=100,
                   lr=cfg.lr, dtype=cfg.dtype, seed=cfg.seed, act_ckpt=cfg.grad_ckpt, log_every=1)
    if cfg.child == "lowmem":
        c.optim, c.grad_clip = "adamw-lowmem", 0.0
    model, tok, template, d = T.prepare_model(c)
    ex, _, _ = dpo.tokenize(dpo.load_pairs(c.data, c)[0], tok, template, c.max_len)
    P, plan, ref_batches = cfg.pairs_per_batch, [], None  # fixed pairs per micro-batch (TRL's batch size)
    while len(plan) < cfg.steps + 1:  # a seeded order per epoch; the reference pass covers every pair once
        order = random.Random(cfg.seed + len(plan)).sample(range(len(ex)), len(ex))
        ref_batches = ref_batches or [order[i:i + P] for i in range(0, len(ex), P)]
        plan += [{"idx": b, "tokens": sum(len(ex[i].chosen_ids) + len(ex[i].rejected_ids) for i in b), "docs": 2 * len(b), "count": len(b)}
                 for b in (order[i:i + P] for i in range(0, len(ex) - P + 1, P))]
    t0 = time.time()
    ref = dpo.cached_reference(c, model, ex, ref_batches, d)
    ref_s, ends, peaks = time.time() - t0, [], {}

    def step_fn(m, mb):  # fit() calls this once per step (grad_accum 1): the previous step has ended
        ends.append(time.time())
        if len(ends) == cfg.steps + 1:  # peaks of the timed steps, before fit()'s final save (TRL saves nothing)
            peaks.update(peak_memory())
        return dpo.pair_terms(c, m, ex, mb["idx"], ref)
    t0 = time.time()  # one step more than timed: the last one ends with fit() saving its training state
    recs = T.fit(c, model, plan, step_fn, None, d)[:cfg.steps]
    tokens = [mb["tokens"] for mb in plan[:cfg.steps]]
    return {"tokens_per_s": timed(tokens, ends[1:], t0, cfg.warmup), "tokens_per_step": sum(tokens) / len(tokens),
            "ref_pass_s": ref_s, "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"]} | peaks

def run_trl(cfg, data, out):
    import torch, datasets, transformers
    from trl import DPOConfig, DPOTrainer
    path = M.resolve(cfg.model)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    rows = [{"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for _, r in D.read_jsonl(data)]
    cuda = torch.cuda.is_available()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=cfg.trl_attn)
    args = DPOConfig(output_dir=out, max_length=cfg.max_tokens, per_device_train_batch_size=cfg.pairs_per_batch,
                     gradient_accumulation_steps=1, max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="cosine",
                     warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                     optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=cfg.dtype == "bfloat16",
                     gradient_checkpointing=cfg.grad_ckpt, use_cpu=not cuda, beta=0.1, loss_type=["sigmoid"],
                     precompute_ref_log_probs=cfg.child == "trl", precompute_ref_batch_size=cfg.pairs_per_batch, logging_steps=1,
                     save_strategy="no", report_to="none", seed=cfg.seed, disable_tqdm=True, dataloader_num_workers=0)
    tokens, ends, losses = [], [], []

    class Trainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens.append(int(inputs["attention_mask"].sum()))  # real tokens, padding left out
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
    t0 = time.time()  # the constructor tokenizes and precomputes the reference log-probs
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                      callbacks=[Clock()])
    ref_s = time.time() - t0
    t0 = time.time()
    trainer.train()
    return {"tokens_per_s": timed(tokens, ends, t0, cfg.warmup), "tokens_per_step": sum(tokens) / len(tokens),
            "ref_pass_s": ref_s, "first_loss": losses[0], "last_loss": losses[-1]}

def peak_memory():
    import torch
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_cuda_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}

def child(cfg):
    data, out = os.path.join(cfg.out, "data.jsonl"), os.path.join(cfg.out, f"{cfg.child}_{cfg.dtype}")
    shutil.rmtree(out, ignore_errors=True)  # no cached reference log-probs from an earlier run
    os.environ["HF_DATASETS_CACHE"] = os.path.join(out, "hf_datasets")  # nor TRL's
    res = (run_trl if cfg.child.startswith("trl") else run_ours)(cfg, data, out)
    res = peak_memory() | res  # ours reports its peak before the final save
    print("RESULT " + json.dumps(res), flush=True)

def main():
    cfg = D.parse_config(Config)
    cfg.model = cfg.model or M.default_model()
    if cfg.child:
        return child(cfg)
    from transformers import AutoTokenizer
    path = M.resolve(cfg.model)
    tok = AutoTokenizer.from_pretrained(path)
    template = M.checkpoint_template(path, tok)
    pairs = synth(cfg, tok, template)
    os.makedirs(cfg.out, exist_ok=True)
    data = os.path.join(cfg.out, "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    lens = [len(D.render(tok, p["messages"] + [{"role": "assistant", "content": p[k]}], template)[0]) for p in pairs for k in ("chosen", "rejected")]
    print(f"data: {len(pairs)} pairs, {sum(lens)} tokens, sequences of {min(lens)}-{max(lens)} (mean {sum(lens) / len(lens):.0f}) "
          f"tokens; {cfg.steps} steps of {cfg.pairs_per_batch} pairs; model {path}; {os.cpu_count()} cpus")
    results, mem = {}, "peak_cuda_gb" if __import__("torch").cuda.is_available() else "peak_rss_gb"
    for dtype in cfg.dtypes:
        for side in cfg.sides:
            argv = sys.argv[1:] + ["--child", side, "--dtype", dtype, "--model", cfg.model]
            p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
            line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{side} {dtype} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
                continue
            results[(side, dtype)] = r = json.loads(line[-1][7:])
            print(f"{side:8s} {dtype:9s} {r['tokens_per_s']:9.0f} tokens/s  peak RSS {r['peak_rss_gb']:.2f} GiB  "
                  f"peak CUDA {r['peak_cuda_gb']:.2f} GiB  reference pass {r['ref_pass_s']:.1f} s  "
                  f"{r['tokens_per_step']:.0f} tokens/step  loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}", flush=True)
        for a in ("ours", "lowmem"):
            for b in ("trl", "trl-live"):
                if (a, dtype) in results and (b, dtype) in results:
                    o, t = results[(a, dtype)], results[(b, dtype)]
                    print(f"{dtype}: {a}/{b} tokens/s {o['tokens_per_s'] / t['tokens_per_s']:.2f}x (target >= 1.5x), "
                          f"peak memory ({mem}) {o[mem] / t[mem]:.2f}x (target <= 0.6x)", flush=True)
    json.dump([{"side": s, "dtype": d} | r for (s, d), r in results.items()], open(os.path.join(cfg.out, "results.json"), "w"), indent=2)

if __name__ == "__main__":
    main()
