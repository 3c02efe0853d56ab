"""
Where the time of one decode step goes (batch 1, the bundled model, a 64-token context): for each
variant (dtype x int8 x compiled) the step time (median of --steps), the bytes of weights it reads
(and the bandwidth that implies, next to the machine's read bandwidth measured here), the matmul
share of an eager step and its op count (torch.profiler: the rest is per-op overhead), and the time
of sampling one token (top-p 0.9, temperature 0.7) from the logits.

    python bench/profile_decode.py --threads 2                  # eager variants
    python bench/profile_decode.py --threads 2 --compile        # and the compiled ones (minutes)
    python bench/profile_decode.py --random --device cuda       # a random model of the same shape
"""
import os, sys, time
from dataclasses import dataclass
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import data as D  # noqa: E402
import model as M  # noqa: E402

@dataclass
class Config:
    model: str = ""  # HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)
    random: bool = False  # a random model of SmolLM2-135M's shape instead (no files needed)
    device: str = "cpu"  # cpu or cuda
    threads: int = 0  # torch threads (0: torch's default)
    steps: int = 50  # timed decode steps per variant
    compile: bool = False  # also the compiled variants (each compiles once: minutes on a small CPU)

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
               max_position_embeddings=8192, rope_theta=100000.0)

def build(cfg, dtype):
    if not cfg.random:
        return M.load_model(cfg.model or M.default_model(), device=cfg.device, dtype=dtype)[0]
    torch.manual_seed(0)
    with torch.device(cfg.device):
        model = M.Llama(M.LlamaConfig(**SMOLLM2))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval()

def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()

def weight_bytes(model):
    """Bytes a step reads from the weights: every matmul's (int8 + scales, or float) and the head."""
    n = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, M.Int8Linear)):
            n += sum(t.numel() * t.element_size() for t in m.buffers()) if isinstance(m, M.Int8Linear) \
                else m.weight.numel() * m.weight.element_size()
    if not isinstance(getattr(model, "lm_head", None), (torch.nn.Linear, M.Int8Linear)):  # tied float head
        n += model.head_weight().numel() * model.head_weight().element_size()
    return n

@torch.no_grad()
def step_times(model, cfg, steps):
    cache = M.KVCache(model.cfg, 1, 64 + steps + 8, cfg.device, model.dtype)
    model(torch.arange(1, 65, device=cfg.device)[None], cache=cache)
    tok = torch.tensor([[42]], device=cfg.device)
    for _ in range(3):  # warm-up (and the compile)
        model.decode(tok, cache)
    times = []
    for _ in range(steps):
        sync(cfg.device)
        t = time.perf_counter()
        model.decode(tok, cache)
        sync(cfg.device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], cache

@torch.no_grad()
def profile_ops(model, cache, cfg):
    """Self time by op kind of one eager step: matmuls vs all the rest, and the op count."""
    from torch.profiler import profile, ProfilerActivity
    tok = torch.tensor([[42]], device=cfg.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            model.decode(tok, cache)
    mm = ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::_int_mm", "aten::bmm", "aten::linear")
    ev = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in ev)
    matmul = sum(e.self_cpu_time_total for e in ev if e.key in mm)
    ops = sum(e.count for e in ev) / 5
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:6]
    return matmul / total, ops, ", ".join(f"{e.key[6:]} {e.self_cpu_time_total / total:.0%}" for e in top)

def read_bandwidth(dev):
    x = torch.ones(2**27, device=dev)  # 512 MB
    x.sum()
    sync(dev)
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    sync(dev)
    return 5 * x.numel() * 4 / (time.perf_counter() - t) / 1e9

def main():
    cfg = D.parse_config(Config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bw = read_bandwidth(cfg.device)
    print(f"{cfg.device}, {torch.get_num_threads()} threads: read bandwidth {bw:.1f} GB/s (sum over 512 MB)")
    logits = torch.randn(1, 49152, device=cfg.device) * 3
    g = torch.Generator(cfg.device).manual_seed(0)
    M.sample_next(logits, 0.7, 0.9, 0, g)
    sync(cfg.device)
    t = time.perf_counter()
    for _ in range(50):
        M.sample_next(logits, 0.7, 0.9, 0, g)
    sync(cfg.device)
    print(f"sampling one token (T 0.7, top-p 0.9, 49152 logits): {(time.perf_counter() - t) / 50 * 1e3:.2f} ms; "
          f"greedy: argmax")
    dtypes = [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for int8 in (False, True):
            for compiled in (False, True) if cfg.compile else (False,):
                model = build(cfg, dtype)
                if int8:
                    M.quantize_int8(model)
                if compiled:
                    torch._dynamo.reset()
                    t = time.perf_counter()
                    M.compile_decode(model)
                step, cache = step_times(model, cfg, cfg.steps)
                wb = weight_bytes(model)
                name = f"{str(dtype)[6:]}{' int8' if int8 else ''}{' compiled' if compiled else ''}"
                line = (f"{name:24s} step {step * 1e3:6.1f} ms ({1 / step:5.1f} tok/s)  weights {wb / 1e6:5.0f} MB"
                        f" -> {wb / step / 1e9:5.1f} GB/s ({wb / step / 1e9 / bw:.0%} of read bandwidth)")
                if compiled:
                    line += f"  compile+warm-up {time.perf_counter() - t - step * cfg.steps:.0f} s"
                else:
                    share, ops, top = profile_ops(model, cache, cfg)
                    line += f"  matmuls {share:.0%} of op time, {ops:.0f} ops/step ({top})"
                print(line, flush=True)

if __name__ == "__main__":
    main()
