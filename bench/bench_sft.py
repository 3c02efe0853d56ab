"""
SFT throughput and peak memory: sft.py's training path (training.prepare_model + sft.tokenize /
plan / target_logps / sft_loss + training.fit) against TRL's SFTTrainer, on the same model
(SmolLM2-135M from the bundled GGUF), the same token ids and loss masks, the same tokens per
micro-batch, steps, optimizer, schedule and dtype, on this machine. TRL runs packed (trl-bfd: BFD
packing, padding-free with position ids, the mode the issue names) and, as a check, padded
(trl-padded: rows padded to the batch's longest, grouped by length). Each trainer runs in its own
subprocess, so peak RSS (ru_maxrss) is its own. tokens/s counts real tokens over the steps after
--warmup.

    pip install trl==1.16.0   # the bench only; nothing else imports trl
    python bench/bench_sft.py                                     # 4096 tokens/step, fp32 and bf16
    python bench/bench_sft.py --threads 1 --batch-tokens 1024 --steps 4 --warmup 1 \\
        --convs 60   # a quick check
"""
import json, os, random, resource, subprocess, sys, time
from dataclasses import dataclass, field
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import model as M  # noqa: E402
import training as T  # noqa: E402

def default_dtypes():  # and bf16 autocast over fp32 weights where the CPU has native bf16
    return ["float32"] + ["bfloat16"] * M.native_bf16()

@dataclass
class Config:
    model: str = ""  # HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)
    out: str = "bench_out/sft"  # scratch folder: data, runs, results.json
    convs: int = 300  # synthetic conversations
    min_tokens: int = 200  # rendered length range of a conversation (approximate)
    max_tokens: int = 600  # (and the --max-len of both trainers)
    batch_tokens: int = 4096  # tokens per micro-batch: our --batch-tokens, TRL's packed max_length
    steps: int = 8  # optimizer steps, each one micro-batch
    warmup: int = 2  # first steps left out of tokens/s (allocator warmup, lazy init)
    dtypes: list = field(default_factory=default_dtypes)  # float32, and bfloat16 on native bf16
    sides: list = field(default_factory=lambda: ["ours", "trl-bfd", "trl-padded"])  # the trainers
    trl_attn: str = "sdpa"  # TRL's attn_implementation (sdpa or eager; no flex_attention backward)
    trl_optim: str = "adamw_torch_fused"  # TRL's optim (adamw_torch_fused, adamw_torch)
    lr: float = 2e-5  # peak lr, cosine decay, no warmup (both)
    seed: int = 0  # data and order
    threads: int = 0  # torch threads per trainer (0: torch's default, one per core)
    child: str = ""  # internal: run one side with --dtype and print its result
    dtype: str = "float32"  # internal: the child's dtype

WORDS = ("the of and to in is that for it as with was on be by this are or at from an which have "
         "not but model data train loss token value function return list string number file error "
         "result first second python code example answer question because however therefore "
         "simple method class step between each other could would should about after before "
         "system memory process output input explain write show how why what when where small "
         "large fast slow always never often usually history science music river mountain city "
         "country language world people time year day night").split()

def synth(cfg, tok, template):
    """Multi-turn conversations of random words whose rendered lengths spread over [min, max]
    tokens."""
    rng = random.Random(cfg.seed)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(max(1, n))).capitalize() + "."
    out = []
    while len(out) < cfg.convs:
        target, turns = rng.randint(cfg.min_tokens, cfg.max_tokens), rng.choice([1, 2, 2, 3])
        msgs = [{"role": "system", "content": words(12)}] if rng.random() < 0.3 else []
        for _ in range(turns):
            per_turn = target // turns
            u = rng.randint(8, per_turn // 3)
            msgs += [{"role": "user", "content": words(u)},
                     {"role": "assistant", "content": words(per_turn - u)}]
        n = len(D.render(tok, msgs, template)[0])
        if cfg.min_tokens // 2 <= n <= cfg.max_tokens:
            out.append({"id": f"b{len(out)}", "messages": msgs})
    return out

def now():
    return time.time(), time.process_time()

def timed(step_tokens, step_ends, start, warmup):
    """tokens per second of wall time and per second of this process's CPU time (all threads: on a
    busy shared machine the wall figure is noise, the CPU one much less so), over the steps after
    warmup."""
    ends = [start] + step_ends
    n = sum(step_tokens[warmup:])
    return {"tokens_per_s": n / (ends[-1][0] - ends[warmup][0]),
            "tokens_per_cpu_s": n / (ends[-1][1] - ends[warmup][1])}

def run_ours(cfg, data, out):
    import sft
    c = sft.Config(model=cfg.model, data=[data], out=out, max_len=cfg.max_tokens,
                   batch_tokens=cfg.batch_tokens, max_steps=cfg.steps + 1, epochs=100, lr=cfg.lr,
                   dtype=cfg.dtype, seed=cfg.seed, log_every=1)
    model, tok, template, dist = T.prepare_model(c)
    examples, _, _ = sft.tokenize(sft.load_conversations(c.data), tok, template, c.max_len)
    plan = sft.plan(examples, c.batch_tokens, c.epochs, c.seed)
    ends = []

    def step_fn(m, mb):  # fit() calls this once a step (grad_accum 1): the previous step has ended
        ends.append(now())
        return sft.sft_loss(sft.target_logps(m, examples, mb["idx"])), {}
    t0 = now()  # one step more than timed: a step's end is read when the next one starts
    recs = T.fit(c, model, plan, step_fn, None, dist)[:cfg.steps]
    ends = ends[1:]
    tokens = [mb["tokens"] for mb in plan[:cfg.steps]]
    return timed(tokens, ends, t0, cfg.warmup) | {"tokens_per_step": sum(tokens) / len(tokens),
                                                  "first_loss": recs[0]["loss"],
                                                  "last_loss": recs[-1]["loss"]}

def run_trl(cfg, data, out):
    import torch, datasets, transformers
    from trl import SFTConfig, SFTTrainer
    path = M.resolve(cfg.model)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    template = M.checkpoint_template(path, tok)
    rows = []  # the ids and assistant masks of ours: TRL builds its labels from assistant_masks
    for where, rec in D.read_jsonl(data):
        ids, mask = D.render(tok, D.get_messages(rec, where), template)
        rows.append({"input_ids": ids, "assistant_masks": mask})
    packed = cfg.child == "trl-bfd"
    # padded: as many rows a batch as fill --batch-tokens on average, each padded to the longest
    total = sum(len(r["input_ids"]) for r in rows)
    rows_per_batch = 1 if packed else max(1, round(cfg.batch_tokens * len(rows) / total))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation=cfg.trl_attn)
    args = SFTConfig(output_dir=out, max_length=cfg.batch_tokens if packed else cfg.max_tokens,
                     packing=packed, packing_strategy="bfd",
                     per_device_train_batch_size=rows_per_batch, gradient_accumulation_steps=1,
                     train_sampling_strategy="random" if packed else "group_by_length",
                     max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="cosine",
                     warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                     adam_epsilon=1e-8, max_grad_norm=1.0, optim=cfg.trl_optim,
                     bf16=cfg.dtype == "bfloat16", gradient_checkpointing=False,
                     use_cpu=not torch.cuda.is_available(), shuffle_dataset=True, logging_steps=1,
                     save_strategy="no", report_to="none", seed=cfg.seed, disable_tqdm=True,
                     dataloader_num_workers=0)
    tokens, ends, losses = [], [], []

    class Trainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            # real tokens only: a packed row has no padding, padded rows have an attention mask
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(now())

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=tok, callbacks=[Clock()])
    t0 = now()
    trainer.train()
    return timed(tokens, ends, t0, cfg.warmup) | {"tokens_per_step": sum(tokens) / len(tokens),
                                                  "first_loss": losses[0], "last_loss": losses[-1]}

def child(cfg):
    import torch
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = os.path.join(cfg.out, "data.jsonl")
    out = os.path.join(cfg.out, f"{cfg.child}_{cfg.dtype}")
    res = (run_ours if cfg.child == "ours" else run_trl)(cfg, data, out)
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        res["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(res), flush=True)

def main():
    cfg = D.parse_config(Config)
    cfg.model = cfg.model or M.default_model()
    if cfg.child:
        return child(cfg)
    if not set(cfg.sides) <= {"ours", "trl-bfd", "trl-padded"}:
        raise SystemExit(f"error: --sides {cfg.sides}: choose among ours, trl-bfd, trl-padded")
    from transformers import AutoTokenizer
    path = M.resolve(cfg.model)
    tok = AutoTokenizer.from_pretrained(path)
    template = M.checkpoint_template(path, tok)
    convs = synth(cfg, tok, template)
    os.makedirs(cfg.out, exist_ok=True)
    data = os.path.join(cfg.out, "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in convs)
    lens = [len(D.render(tok, c["messages"], template)[0]) for c in convs]
    print(f"data: {len(convs)} conversations, {sum(lens)} tokens, {min(lens)}-{max(lens)} "
          f"(mean {sum(lens) / len(lens):.0f}) tokens each; {cfg.steps} steps of "
          f"<= {cfg.batch_tokens} tokens; model {path}; {os.cpu_count()} cpus")
    results = {}
    for dtype in cfg.dtypes:
        for side in cfg.sides:
            argv = sys.argv[1:] + ["--child", side, "--dtype", dtype, "--model", cfg.model]
            p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv],
                               capture_output=True, text=True)
            line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{side} {dtype} failed ({p.returncode}):\n{p.stdout[-2000:]}\n"
                      f"{p.stderr[-4000:]}")
                continue
            results[(side, dtype)] = r = json.loads(line[-1][7:])
            print(f"{side:10s} {dtype:9s} {r['tokens_per_s']:8.0f} tokens/s "
                  f"{r['tokens_per_cpu_s']:7.0f} tokens/cpu-s  "
                  f"peak RSS {r['peak_rss_gb']:.2f} GiB  {r['tokens_per_step']:.0f} tokens/step  "
                  f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}", flush=True)
        for trl in [s for s in cfg.sides if s != "ours"]:
            if ("ours", dtype) in results and (trl, dtype) in results:
                o, t = results[("ours", dtype)], results[(trl, dtype)]
                print(f"{dtype}: ours/{trl} tokens/s "
                      f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x (target >= 1.5x), "
                      f"tokens/cpu-s {o['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x, "
                      f"peak RSS {o['peak_rss_gb'] / t['peak_rss_gb']:.2f}x", flush=True)
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump([{"side": s, "dtype": d} | r for (s, d), r in results.items()], f, indent=2)

if __name__ == "__main__":
    main()
