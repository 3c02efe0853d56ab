"""
Chat decoding speed at batch 1, greedy: ours (model.generate, the path chat.py streams from; eager,
--quantize int8, --compile, both) against transformers' `generate` (its own KV cache, SDPA) and
llama.cpp (llama-cpp-python on the same .gguf file, at the file's own quantization; skipped with a
note when not installed), the same prompt, exactly the same number of new tokens (EOS ignored), same
dtype and threads. Each side runs in its own subprocess so its peak RSS (ru_maxrss) is its own.
Decode tokens/s leaves out the prefill: it is (N - 1) / (time for N new tokens - time for 1 new
token), the best of --repeats runs. Start-up: the side's process start to ready to generate (imports,
load, quantize, compile: the compile sides reuse inductor's on-disk cache after their first run).
The quality line: int8's greedy text against fp32's, and the mean per-token KL(fp32 || int8) of the
next-token distributions along --kl-tokens tokens sampled from the fp32 model (bench_sample's
prompts), teacher-forced through both models' decode steps (bf16 against fp32 beside it).

    python bench/bench_chat.py                                   # the bundled SmolLM2-135M-Instruct
    python bench/bench_chat.py --dtypes float32 bfloat16 --threads 2 --max-new-tokens 256
"""
import json, os, resource, subprocess, sys, time
T0 = time.perf_counter()  # a child's start-up is timed from here
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
    sides: list = field(default_factory=lambda: ["ours", "ours-int8", "ours-compile",
                                                 "ours-int8-compile", "hf", "llama.cpp", "quality"])
        # which to run: ours[-int8][-compile], hf, llama.cpp (once, the file's own dtype), quality
    kl_tokens: int = 1000  # quality: tokens sampled from fp32 to compare int8 (and bf16) along
    threads: int = 0  # torch threads (0: torch's default, one per core)
    child: str = ""  # internal: run one side and print its result as JSON
    dtype: str = "float32"  # internal: the child's dtype

def time_ours(cfg, dtype):
    model, tok, template = M.load_model(M.resolve(cfg.model), dtype=dtype)
    ids, _ = D.render(tok, [{"role": "user", "content": cfg.prompt}], template, prompt=True)
    if "int8" in cfg.child:
        M.quantize_int8(model)
    if "compile" in cfg.child:  # compiled now (chat.py does it at start-up too)
        M.compile_decode(model)
        M.generate(model, [ids], max_new_tokens=2, temperature=0)

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

def time_llamacpp(cfg, dtype):
    from llama_cpp import Llama
    from transformers import AutoTokenizer
    path = M.resolve(cfg.model)  # our tokenizer renders the prompt: the same ids on every side
    tok = AutoTokenizer.from_pretrained(path)
    template = M.checkpoint_template(path, tok)
    ids = D.render(tok, [{"role": "user", "content": cfg.prompt}], template, prompt=True)[0]
    llm = Llama(model_path=cfg.model, n_ctx=2048, n_threads=cfg.threads or os.cpu_count(),
                n_batch=512, verbose=False)

    def gen(n):
        llm.reset()  # no reuse of the previous run's prompt keys
        t, out = time.perf_counter(), []
        for t_id in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            out.append(t_id)
            if len(out) == n:
                break
        return time.perf_counter() - t, out
    return gen, len(ids), lambda out: llm.detokenize(out).decode("utf-8", "replace")

@torch.no_grad()
def quality(cfg):
    """int8 (and bf16) against fp32: greedy text on the bench prompt, mean KL along sampled text."""
    import bench_sample  # its 8 conversations
    ref, tok, template = M.load_model(M.resolve(cfg.model), dtype=torch.float32)
    others = {"int8": M.quantize_int8(M.load_model(M.resolve(cfg.model))[0]),
              "bf16": M.load_model(M.resolve(cfg.model), dtype=torch.bfloat16)[0]}
    ids = D.render(tok, [{"role": "user", "content": cfg.prompt}], template, prompt=True)[0]
    greedy = {k: M.generate(m, [ids], max_new_tokens=cfg.max_new_tokens, temperature=0)[0][0]["ids"]
              for k, m in [("fp32", ref), ("int8", others["int8"])]}
    same = next((i for i, (a, b) in enumerate(zip(*greedy.values())) if a != b),
                min(map(len, greedy.values())))
    convs = bench_sample.conversations(8)
    per = -(-cfg.kl_tokens // len(convs))
    kl, n = {k: 0.0 for k in others}, 0
    g = torch.Generator().manual_seed(0)
    for c in convs:
        p = D.render(tok, c, template, prompt=True)[0]
        text = M.generate(ref, [p], max_new_tokens=per, temperature=0.7, generator=g)[0][0]["ids"]
        seq = torch.tensor([p + text])
        models = {"fp32": ref} | others
        caches = {k: M.KVCache(m.cfg, 1, seq.shape[1] + 1, "cpu", m.dtype) for k, m in models.items()}
        logits = {k: [m(seq[:, :len(p)], cache=caches[k])] for k, m in models.items()}
        with torch.no_grad():
            for i in range(len(p), seq.shape[1] - 1):  # decode steps: int8's one-row kernel
                for k, m in models.items():
                    logits[k].append(m(seq[:, i:i + 1], cache=caches[k]))
        lp = {k: torch.cat(v).float().log_softmax(-1) for k, v in logits.items()}
        for k in others:
            kl[k] += float((lp["fp32"].exp() * (lp["fp32"] - lp[k])).sum())
        n += len(lp["fp32"])
    print(json.dumps({"side": "quality", "greedy_same_tokens": same, "greedy_tokens": len(greedy["fp32"]),
                      "fp32_text": tok.decode(greedy["fp32"])[:160], "int8_text": tok.decode(greedy["int8"])[:160],
                      "kl_tokens": n} | {f"kl_{k}": v / n for k, v in kl.items()}))

def child(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.child == "quality":
        return quality(cfg)
    dtype = M.DTYPES[cfg.dtype]
    timer = time_hf if cfg.child == "hf" else time_llamacpp if cfg.child == "llama.cpp" else time_ours
    gen, n_prompt, decode = timer(cfg, dtype)
    startup = time.perf_counter() - T0
    gen(8)  # warmup: allocator, lazy init
    first = min(gen(1)[0] for _ in range(cfg.repeats))
    runs = [gen(cfg.max_new_tokens) for _ in range(cfg.repeats)]
    total, out = min(runs, key=lambda r: r[0])
    assert len(out) == cfg.max_new_tokens, len(out)
    print(json.dumps({"side": cfg.child, "dtype": cfg.dtype, "prompt_tokens": n_prompt, "new_tokens": len(out),
                      "first_token_s": first, "decode_tok_s": (len(out) - 1) / (total - first) if len(out) > 1 and total > first else float("nan"),
                      "overall_tok_s": len(out) / total, "startup_s": startup, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "threads": torch.get_num_threads(), "text": decode(out)[:80]}))

def run_side(cfg, side, dtype):
    cmd = [sys.executable, __file__, "--child", side, "--dtype", dtype, "--model", cfg.model, "--prompt", cfg.prompt,
           "--max-new-tokens", str(cfg.max_new_tokens), "--repeats", str(cfg.repeats), "--threads", str(cfg.threads),
           "--kl-tokens", str(cfg.kl_tokens)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{side} {dtype} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])

def main():
    import importlib.util
    cfg = D.parse_config(Config)
    cfg.model = cfg.model or M.default_model()
    if cfg.child:
        return child(cfg)
    M.resolve(cfg.model)  # convert a .gguf once, before the timed children
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0] if os.path.exists("/proc/cpuinfo") else ""
    print(f"{os.cpu_count()} cpus, flags: {' '.join(f for f in flags.split() if f.startswith(('avx', 'amx', 'fma')))}")
    results = []
    for side in cfg.sides:
        if side == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
            print("llama.cpp: skipped, llama_cpp is not importable (pip install llama-cpp-python)")
            continue
        if side == "llama.cpp" and not cfg.model.endswith(".gguf"):
            print("llama.cpp: skipped, --model is not a .gguf file")
            continue
        if side == "quality":
            q = run_side(cfg, side, "float32")
            print(f"quality: int8 greedy = fp32 greedy for the first {q['greedy_same_tokens']} of {q['greedy_tokens']} tokens;"
                  f" mean KL(fp32 || int8) {q['kl_int8']:.4f} nats, KL(fp32 || bf16) {q['kl_bf16']:.4f} nats over"
                  f" {q['kl_tokens']} tokens sampled from fp32 (T 0.7)\n  fp32: {q['fp32_text']!r}\n  int8: {q['int8_text']!r}",
                  flush=True)
            continue
        for dtype in (["gguf"] if side == "llama.cpp" else cfg.dtypes):
            r = run_side(cfg, side, "float32" if dtype == "gguf" else dtype)
            r["dtype"] = dtype
            results.append(r)
            print(f"{side:17s} {dtype:9s} decode {r['decode_tok_s']:6.1f} tok/s   first token {r['first_token_s'] * 1e3:6.0f} ms "
                  f"({r['prompt_tokens']} prompt tokens)   start-up {r['startup_s']:5.1f} s   overall {r['overall_tok_s']:6.1f} tok/s"
                  f"   peak RSS {r['peak_rss_gb']:.2f} GB   threads {r['threads']}   {r['text'][:40]!r}", flush=True)
    by = {(r["side"], r["dtype"]): r for r in results}
    cpp = by.get(("llama.cpp", "gguf"))
    for (side, dtype), o in by.items():
        h = by.get(("hf", dtype))
        if side.startswith("ours") and h:
            vs_cpp = f", / llama.cpp {o['decode_tok_s'] / cpp['decode_tok_s']:.2f}x" if cpp else ""
            print(f"{side} {dtype}: decode tokens/s / transformers {o['decode_tok_s'] / h['decode_tok_s']:.2f}x{vs_cpp}, "
                  f"peak RSS / transformers {o['peak_rss_gb'] / h['peak_rss_gb']:.2f}x")

if __name__ == "__main__":
    main()
