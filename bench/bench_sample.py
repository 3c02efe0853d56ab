"""
Sampling throughput and peak memory: sample.py's engine (model.generate: one prefill per prompt, its n
samples sharing its keys through cascade attention, finished samples leaving the batch, batches by
--batch-tokens) against transformers' generate(num_return_sequences=n, do_sample=True) with SDPA
attention, on the same model (SmolLM2-135M-Instruct from the bundled GGUF), the same 8 multi-turn
prompts, the same dtype, temperature, top-p and max new tokens, on this machine. Each side runs in
its own subprocess (peak RSS is its own). Tokens are the generated ones up to EOS (not counting it or
the padding after it), so tokens/s is the useful output rate.

    python bench/bench_sample.py                               # n = 16 and 64, 64 new tokens: ~6 min
    python bench/bench_sample.py --ns 4 --max-new-tokens 8     # a quick check
"""
import dataclasses, json, os, resource, subprocess, sys, time
from dataclasses import dataclass, field
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import model as M  # noqa: E402

@dataclass
class Config:
    model: str = ""  # HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)
    ns: list = field(default_factory=lambda: [16, 64])  # samples per prompt to compare
    prompts: int = 8  # how many of the 8 conversations to use
    max_new_tokens: int = 64  # per response, both sides
    temperature: float = 0.7  # both sides
    top_p: float = 1.0  # both sides (1: off)
    dtype: str = "auto"  # float32, bfloat16, or auto (bfloat16 where the CPU has native bf16, as sample.py)
    batch_tokens: int = 65536  # ours: sample.py --batch-tokens
    hf_batch: str = "prompt"  # transformers: one generate per prompt (prompt) or all prompts left-padded (all)
    hf_cache: str = "static"  # transformers: static (its faster one here, ~1.2x) or dynamic KV cache
    sides: list = field(default_factory=lambda: ["ours", "ours-int8", "ours-compile", "ours-int8-compile", "hf"])
        # which engines to run: ours (sample.py), with --quantize int8 and/or --compile, and transformers
    threads: int = 0  # torch threads (0: torch's default, one per core)
    seed: int = 0  # sampling seed
    child: str = ""  # internal: run one side with --n and print its result
    n: int = 0  # internal: the child's n

CONVERSATIONS = [
    ["I'm planning a trip to Japan in April. Which cities should I visit in ten days?",
     "Tokyo, Kyoto and Osaka make a good first loop: Tokyo for food and neighborhoods, Kyoto for temples and "
     "gardens, Osaka for street food. Add Nara as a day trip from Kyoto, and Hiroshima if you can spare a day.",
     "How many days should I spend in Kyoto, and which temples should I not miss?"],
    ["Can you explain what a hash table is?",
     "A hash table stores key-value pairs in an array. A hash function turns each key into an index, so lookups, "
     "inserts and deletes take constant time on average. Collisions are handled by chaining or open addressing.",
     "What happens when the table gets too full?"],
    ["Write a haiku about autumn leaves."],
    ["My tomato plants have yellow leaves at the bottom. What is wrong with them?",
     "Yellowing lower leaves are often caused by early blight, a nitrogen deficiency, or overwatering. Check for "
     "brown spots with rings (blight), and whether the soil stays soggy.",
     "There are brown spots with rings. What should I do now?",
     "That sounds like early blight. Remove the affected leaves, water at the base rather than on the leaves, "
     "mulch the soil, and consider a copper-based fungicide.",
     "Will the tomatoes themselves still be safe to eat?"],
    ["Summarize the causes of the First World War in a few sentences."],
    ["I have 3 apples and buy 2 bags with 6 apples each. Then I give away half. How many are left?",
     "You start with 3 apples and buy 12 more, so you have 15. Half of 15 is 7.5, so you cannot give away exactly "
     "half with whole apples: you would keep 7 or 8.",
     "Ok, say I give away 7. Now write that as one equation."],
    ["What's a good beginner workout routine I can do at home without equipment?"],
    ["Translate 'Where is the train station?' into French and Spanish.",
     "French: « Où est la gare ? » Spanish: «¿Dónde está la estación de tren?»",
     "And how would I ask when the next train to the airport leaves, in both languages?"],
]

def conversations(k):
    return [[{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(turns)] for turns in CONVERSATIONS[:k]]

def run_ours(cfg, path, prompts, eos, dtype):
    import torch
    import sample
    model, tok, _ = M.load_model(path, dtype=dtype)
    if "int8" in cfg.child:  # as sample.py --quantize int8 / --compile
        M.quantize_int8(model)
    if "compile" in cfg.child:  # compiled by the warm-up below, outside the timing
        M.compile_decode(model)
    c = sample.Config(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                      batch_tokens=cfg.batch_tokens, seed=cfg.seed, compile="compile" in cfg.child)
    sample.sample_ours(model, tok, eos, dataclasses.replace(c, max_new_tokens=2), [prompts[0]], 2, [None])  # warm up
    t0, c0, counts = time.time(), time.process_time(), []
    items = [{"id": str(i), "ids": p} for i, p in enumerate(prompts)]
    for batch in sample.batches(items, c):  # sample.py's loop, without the file writing
        rngs = [sample.rng_of(c, torch.device("cpu"), it["id"]) for it in batch]
        for res in sample.sample_ours(model, tok, eos, c, [it["ids"] for it in batch], c.n, rngs):
            counts += [r["num_tokens"] for r in res]
    return t0, c0, counts

def run_hf(cfg, path, prompts, eos, dtype):
    import torch, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else sorted(eos)[0]
    kw = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
              num_return_sequences=cfg.n, eos_token_id=sorted(eos), pad_token_id=pad)
    if cfg.hf_cache == "static":
        kw["cache_implementation"] = "static"
    torch.manual_seed(cfg.seed)

    def useful(rows):  # generated tokens up to the first EOS
        counts = []
        for r in rows.tolist():
            counts.append(next((i for i, t in enumerate(r) if t in eos), len(r)))
        return counts
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), **(kw | dict(max_new_tokens=2, num_return_sequences=2)))  # warm up
        t0, c0, counts = time.time(), time.process_time(), []
        if cfg.hf_batch == "all":  # left padding, one call
            L = max(map(len, prompts))
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
            counts = useful(model.generate(ids, attention_mask=mask, **kw)[:, L:])
        else:
            for p in prompts:
                counts += useful(model.generate(torch.tensor([p]), **kw)[:, len(p):])
    return t0, c0, counts

def child(cfg):
    import torch
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = M.resolve(cfg.model)
    model_cfg = json.load(open(os.path.join(path, "config.json")))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    template = M.checkpoint_template(path, tok)
    prompts = [D.render(tok, c, template, prompt=True)[0] for c in conversations(cfg.prompts)]
    eos = D.stop_ids(tok, template, model_cfg["eos_token_id"])
    dtype = M.DTYPES[cfg.dtype]
    t0, c0, counts = (run_hf if cfg.child == "hf" else run_ours)(cfg, path, prompts, eos, dtype)
    wall, cpu = time.time() - t0, time.process_time() - c0
    res = {"tokens": sum(counts), "wall_s": wall, "tokens_per_s": sum(counts) / wall, "tokens_per_cpu_s": sum(counts) / cpu,
           "mean_len": sum(counts) / len(counts), "at_max": sum(c == cfg.max_new_tokens for c in counts) / len(counts),
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print("RESULT " + json.dumps(res), flush=True)

def main():
    cfg = D.parse_config(Config)
    cfg.model = cfg.model or M.default_model()
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if M.native_bf16() else "float32"
    if cfg.child:
        return child(cfg)
    from transformers import AutoTokenizer
    path = M.resolve(cfg.model)
    tok = AutoTokenizer.from_pretrained(path)
    template = M.checkpoint_template(path, tok)
    lens = [len(D.render(tok, c, template, prompt=True)[0]) for c in conversations(cfg.prompts)]
    print(f"{len(lens)} prompts of {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f}); "
          f"max {cfg.max_new_tokens} new tokens, temperature {cfg.temperature}, top-p {cfg.top_p}, {cfg.dtype}; "
          f"transformers: batch per {cfg.hf_batch}, {cfg.hf_cache} cache, sdpa; model {path}; {os.cpu_count()} cpus", flush=True)
    for n in map(int, cfg.ns):
        results = {}
        for side in cfg.sides:
            argv = sys.argv[1:] + ["--child", side, "--n", str(n), "--model", cfg.model, "--dtype", cfg.dtype]
            p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
            line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{side} n={n} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
                continue
            results[side] = r = json.loads(line[-1][7:])
            print(f"n={n:3d} {side:17s} {r['tokens_per_s']:8.1f} tokens/s {r['tokens_per_cpu_s']:8.1f} tokens/cpu-s  "
                  f"{r['tokens']} tokens in {r['wall_s']:.1f}s (mean {r['mean_len']:.0f}, {r['at_max']:.0%} hit max)  "
                  f"peak RSS {r['peak_rss_gb']:.2f} GiB", flush=True)
        for side, o in results.items():
            if side.startswith("ours") and "hf" in results:
                h = results["hf"]
                print(f"n={n}: {side}/transformers tokens/s {o['tokens_per_s'] / h['tokens_per_s']:.2f}x (target >= 5x at n=64), "
                      f"tokens/cpu-s {o['tokens_per_cpu_s'] / h['tokens_per_cpu_s']:.2f}x, "
                      f"peak RSS {o['peak_rss_gb'] / h['peak_rss_gb']:.2f}x", flush=True)

if __name__ == "__main__":
    main()
