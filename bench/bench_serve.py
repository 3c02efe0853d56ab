"""
Server throughput: the same --requests greedy chat completions sent to `chat.py --serve` one at a
time, then from --clients concurrent clients (the server decodes them together), against a server
started here in its own process. Prints each side's wall time, requests/s and completion
tokens/s, the ratio, and whether every concurrent answer is identical to its one-at-a-time answer.

    python bench/bench_serve.py                                     # bundled SmolLM2-135M-Instruct
    python bench/bench_serve.py --requests 32 --clients 8 --max-tokens 64 --threads 2
"""
import json, os, platform, re, subprocess, sys, threading, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data as D  # noqa: E402

@dataclass
class Config:
    model: str = ""  # HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)
    requests: int = 32  # chat completions per side
    clients: int = 8  # concurrent clients on the batched side
    max_tokens: int = 8  # max_tokens of each request (greedy; EOS may end one earlier)
    threads: int = 0  # the server's torch threads (0: torch's default, one per core)
    dtype: str = "auto"  # the server's --dtype
    batch_window_ms: float = 5.0  # the server's --batch-window-ms

TOPICS = ("the sea, a red bicycle, why the sky is blue, bread, the moon landing, a lighthouse, "
          "chess, rain in the city, volcanoes, the first computer, honey bees, a quiet library, "
          "paper planes, winter mornings, the number zero, a jazz trio, deserts, old maps, "
          "coffee, an octopus, the printing press, a kite, glaciers, a train at night, owls, "
          "tea, lightning, a clock tower, mushrooms, the Roman roads, snow, a garden").split(", ")

def prompts(k):  # different topics and lengths, so rows of one batch differ
    asks = ["Write one sentence about {}.", "In a few words: what is special about {}?",
            "Tell me a short, surprising fact about {}, and explain it to a child in few words."]
    return [asks[i % 3].format(TOPICS[i % len(TOPICS)]) for i in range(k)]

def start(cfg):
    cmd = [sys.executable, "chat.py", "--serve", "--port", "0", "--temperature", "0",
           "--threads", str(cfg.threads), "--dtype", cfg.dtype, "--max-batch", str(cfg.clients),
           "--batch-window-ms", str(cfg.batch_window_ms)]
    cmd += ["--model", cfg.model] if cfg.model else []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "serving" in line:
            url = line.split(" at ")[1].split()[0]
            # keep reading its log, so that the pipe never fills and blocks the server
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return proc, url, lines
    sys.exit("the server did not start:\n" + "".join(lines[-30:]))

def ask(url, prompt, max_tokens):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        reply = json.loads(r.read())
    return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]

def side(url, asks, max_tokens, clients):
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outs = list(pool.map(lambda p: ask(url, p, max_tokens), asks))
    return time.perf_counter() - t, outs

def cpu_flags():
    try:
        flags = re.search(r"^flags\s*:(.*)$", open("/proc/cpuinfo").read(), re.M).group(1).split()
    except (OSError, AttributeError):
        return platform.processor()
    return " ".join(f for f in flags if re.match(r"avx512_bf16|avx512f$|amx|avx2$", f))

def main():
    cfg = D.parse_config(Config)
    proc, url, lines = start(cfg)
    try:
        asks = prompts(cfg.requests)
        ask(url, asks[0], 2)  # warm-up: allocator, lazy init
        rows = [(name, *side(url, asks, cfg.max_tokens, clients)) for name, clients in
                (("one at a time", 1), (f"{cfg.clients} concurrent clients", cfg.clients))]
    finally:
        proc.terminate()
        proc.wait()
    print(f"{cfg.requests} requests, max_tokens {cfg.max_tokens}, greedy; {os.cpu_count()} CPUs "
          f"({cpu_flags()}), server threads {cfg.threads or 'default'}")
    for name, wall, outs in rows:
        tokens = sum(n for _, n in outs)
        print(f"{name:24s} {wall:7.2f} s  {len(outs) / wall:6.2f} requests/s  "
              f"{tokens / wall:7.1f} completion tokens/s  ({tokens} tokens)")
    batches = [int(m) for m in re.findall(r"decoding (\d+) requests together", "".join(lines))]
    print(f"throughput, concurrent / one at a time: {rows[0][1] / rows[1][1]:.2f}x "
          f"(batches of {min(batches, default=1)}-{max(batches, default=1)} requests)")
    same = [a == b for (a, _), (b, _) in zip(rows[0][2], rows[1][2])]
    print(f"greedy answers identical to one at a time: {sum(same)}/{len(same)}")
    for i in [i for i, s in enumerate(same) if not s][:3]:
        print(f"  differs: {asks[i]!r}\n    alone:    {rows[0][2][i][0]!r}\n"
              f"    together: {rows[1][2][i][0]!r}")

if __name__ == "__main__":
    main()
