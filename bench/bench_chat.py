"""
Chat decoding speed at batch 1, greedy: ours (model.generate, the path chat.py streams from) against
transformers' `generate` (its own KV cache, SDPA) on the same checkpoint, the same prompt, exactly the
same number of new tokens (EOS ignored on both sides), same dtype and threads. Each side runs in its
own subprocess so its peak RSS (ru_maxrss) is its own. Decode tokens/s leaves out the prefill: it is
(N - 1) / (time for N new tokens - time for 1 new token), the best of --repeats runs.

    python bench/bench_chat.py                                   # the bundled SmolLM2-135M-Instruct
    python bench/bench_chat.py --dtypes float32 bfloat16 --threads 2 --max-new-tokens 256
"""
import json, os, resource, subprocess, sys, time
from dataclasses import dataclass, field
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import data as D  # noqa: E402
import model as M  # noqa: E402

@dataclass
class Config:
    model: str = ""  # HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)
    prompt: str = "Write a short story about a robot who learns to paint."  # the user message
    max_new_tokens: int = 128  # tokens generated per run (EOS ignored)
    repeats: int = 3  # timed runs per side (the best is reported), after one warmup
    dtypes: list = field(default_factory=lambda: ["float32"] + ["bfloat16"] * M.native_bf16())  # weight/activation dtypes to compare (bf16 where the CPU has it)
    sides: list = field(default_factory=lambda: ["ours", "hf"])  # which implementations to run
    threads: int = 0  # torch threads (0: torch's default, one per core)
    child: str = ""  # internal: run one side and print its result as JSON
    dtype: str = "float32"  # internal: the child's dtype

def time_ours(cfg, dtype):
    model, tok, template = M.load_model(M.resolve(cfg.model), dtype=dtype)
    ids, _ = D.render(tok, [{"role": "user", "content": cfg.prompt}], template, prompt=True)

    def gen(n):
        t = time.perf_counter()
        out = M.generate(model, [ids], max_new_tokens=n, temperature=0, eos_ids=())[0][0]["ids"]
        return time.perf_counter() - t, out
    return gen, len(ids), lambda out: tok.decode(out)

def time_hf(cfg, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = M.resolve(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(path)
    template = M.checkpoint_template(path, tok)
    ids = torch.tensor([D.render(tok, [{"role": "user", "content": cfg.prompt}], template, prompt=True)[0]])

    @torch.no_grad()
    def gen(n):
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=tok.pad_token_id or 0)[0, ids.shape[1]:].tolist()
        return time.perf_counter() - t, out
    return gen, ids.shape[1], lambda out: tok.decode(out)

def child(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    gen, n_prompt, decode = (time_ours if cfg.child == "ours" else time_hf)(cfg, dtype)
    gen(8)  # warmup: allocator, lazy init
    first = min(gen(1)[0] for _ in range(cfg.repeats))
    runs = [gen(cfg.max_new_tokens) for _ in range(cfg.repeats)]
    total, out = min(runs, key=lambda r: r[0])
    assert len(out) == cfg.max_new_tokens, len(out)
    print(json.dumps({"side": cfg.child, "dtype": cfg.dtype, "prompt_tokens": n_prompt, "new_tokens": len(out),
                      "first_token_s": first, "decode_tok_s": (len(out) - 1) / (total - first) if len(out) > 1 and total > first else float("nan"),
                      "overall_tok_s": len(out) / total, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "threads": torch.get_num_threads(), "text": decode(out)[:80]}))

def main():
    cfg = D.parse_config(Config)
    cfg.model = cfg.model or M.default_model()
    if cfg.child:
        return child(cfg)
    M.resolve(cfg.model)  # convert a .gguf once, before the timed children
    results = []
    for dtype in cfg.dtypes:
        for side in cfg.sides:
            cmd = [sys.executable, __file__, "--child", side, "--dtype", dtype, "--model", cfg.model, "--prompt", cfg.prompt,
                   "--max-new-tokens", str(cfg.max_new_tokens), "--repeats", str(cfg.repeats), "--threads", str(cfg.threads)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{side} {dtype} failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{side:5s} {dtype:9s} decode {r['decode_tok_s']:6.1f} tok/s   first token {r['first_token_s'] * 1e3:6.0f} ms "
                  f"({r['prompt_tokens']} prompt tokens)   overall {r['overall_tok_s']:6.1f} tok/s   peak RSS {r['peak_rss_gb']:.2f} GB   "
                  f"threads {r['threads']}   {r['text'][:40]!r}", flush=True)
    by = {(r["side"], r["dtype"]): r for r in results}
    for dtype in cfg.dtypes:
        if ("ours", dtype) in by and ("hf", dtype) in by:
            o, h = by[("ours", dtype)], by[("hf", dtype)]
            print(f"{dtype}: ours / transformers decode tokens/s = {o['decode_tok_s'] / h['decode_tok_s']:.2f}x, "
                  f"peak RSS {o['peak_rss_gb'] / h['peak_rss_gb']:.2f}x")

if __name__ == "__main__":
    main()
