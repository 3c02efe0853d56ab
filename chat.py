"""
Chat with a checkpoint: an interactive REPL that streams tokens as they are generated, a one-shot
`--prompt` whose answer alone goes to stdout, or `--serve`, an OpenAI-compatible HTTP server
(serve.py: POST /v1/chat/completions, GET /v1/models) built on the standard library, which decodes
concurrent requests together and caps body size, stalls and queue length (see serve.py).
Non-streaming requests may ask for `logprobs` / `top_logprobs` (OpenAI's shape), which
annotate.py --verdict logprobs reads.

    python chat.py                                   # the bundled SmolLM2-135M-Instruct
    python chat.py --model out/sft --prompt "Hi"     # scriptable: only the answer on stdout
    python chat.py --model out/dpo --serve --port 8000
"""
import os, sys, time
T0 = time.perf_counter()  # start-up is timed from here (--verbose)
from dataclasses import dataclass
import torch
import data as D
import model as M
import serve

@dataclass
class ChatConfig:
    model: str = ""  # HF folder, Hub id, or .gguf file (default: bundled SmolLM2-135M-Instruct)
    template: str = ""  # chat template override (vicuna, chatml); default: the checkpoint's
    system: str = ""  # system message (default: the template's own)
    temperature: float = 0.7  # sampling temperature (0: greedy)
    top_p: float = 0.9  # nucleus sampling: keep the fewest tokens with this much probability
    top_k: int = 0  # keep only the k most likely tokens (0: off)
    max_new_tokens: int = 512  # max tokens of one reply (the server's default for max_tokens)
    seed: int = 1337  # sampling seed (the server's, for requests without a seed)
    prompt: str = ""  # one-shot: answer this, print only the answer on stdout, and exit
    device: str = "auto"  # cpu, cuda, or auto
    dtype: str = "auto"  # float32 or bfloat16 (auto: bfloat16 on CUDA; on CPU float32, as fast)
    threads: int = 0  # torch CPU threads (0: torch's default, one per core)
    serve: bool = False  # serve the OpenAI chat completions API instead of chatting
    host: str = "127.0.0.1"  # --serve: address to listen on
    port: int = 8000  # --serve: port (0: any free port, printed at start)
    max_n: int = 16  # --serve: largest n (completions per request) accepted
    max_batch: int = 16  # --serve: most sequences decoded together (a request of n counts n)
    batch_window_ms: float = 5.0  # --serve: a batch waits for more requests while they come
    # this close together (10 windows at most)
    max_queue: int = 64  # --serve: requests queued or decoding at once; beyond, a 503
    max_body_mb: float = 8.0  # --serve: largest request body (MiB); beyond, a 413 unread
    timeout: float = 30.0  # --serve: seconds a connection may idle or stall before it is closed
    api_key: str = ""  # --serve: require "Authorization: Bearer KEY" (401 otherwise), as vLLM
    quantize: str = ""  # int8: int8 weights (per-channel scales) for every matmul, the head's
        # activations int8 too; inference only; on CPU ~1.8x the decode speed of bf16 at batch 1,
        # greedy output close to fp32's
    compile: bool = False  # torch.compile the decode step (C++ compiler needed): with int8 on a
        # 2-core CPU ~2.2x eager's tokens/s, but start-up 64-76 s (44 s with its kernels cached),
        # so off by default: it pays after ~3,000 tokens; for --serve and long sessions
    verbose: bool = False  # print the start-up time (command to first prompt) and its parts

def load(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = M.pick_device(cfg.device, cfg.dtype)
    if cfg.quantize not in ("", "int8"):  # checked before the model is loaded
        raise ValueError(f"--quantize {cfg.quantize}: int8 (or nothing)")
    if cfg.compile and device.type == "cpu" and not M.compiler_available():
        raise ValueError("--compile needs a C++ compiler (g++) for torch's CPU inductor")
    path = cfg.model or M.default_model()
    t = time.perf_counter()
    model, tok, template = M.load_model(path, device=device, dtype=dtype)
    times = {"imports": t - T0, "load": time.perf_counter() - t}
    template = D.get_template(template, cfg.template)
    eos = D.stop_ids(tok, template, model.cfg.eos_token_id)
    name = os.path.basename(os.path.normpath(path)).removesuffix(".gguf")
    if cfg.quantize:
        t = time.perf_counter()
        M.quantize_int8(model)
        times["quantize"] = time.perf_counter() - t
    if cfg.compile:
        t = time.perf_counter()
        M.compile_decode(model)  # compiled here, by a 2-token reply, not in the user's first one
        M.generate(model, [[0]], max_new_tokens=2, temperature=0)
        times["compile"] = time.perf_counter() - t
    if cfg.verbose:
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in times.items())
        serve.log(f"start-up {time.perf_counter() - T0:.2f}s ({parts})")
    return model, tok, template, eos, name

def conversation(system, history):
    return ([{"role": "system", "content": system}] if system else []) + history

def dim(line, stream):  # ANSI faint, where the stream is a terminal (not a pipe or a file)
    return f"\033[2m{line}\033[0m" if stream.isatty() else line

def reply(cfg, model, tok, template, eos, messages, write, generator):
    """Generate one answer to `messages`, streaming its text through write() and ending it with a
    newline; the stats follow on stderr, on their own line. Returns the text."""
    ids, _ = D.render(tok, messages, template, prompt=True)
    stream, times = serve.Stream(tok), [time.perf_counter()]

    def on_token(row, t):
        times.append(time.perf_counter())
        write(stream.push(t))
    out = M.generate(model, [ids], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                     top_p=cfg.top_p, top_k=cfg.top_k, eos_ids=eos, generator=generator,
                     on_token=on_token)[0][0]
    write(stream.finish() + "\n")
    n, nan = len(out["ids"]), float("nan")
    first = (times[1] - times[0]) * 1e3 if n else nan
    decoding = times[-1] - times[1] if n > 1 else 0  # without the prefill
    rate = (n - 1) / decoding if decoding > 0 else nan
    serve.log(dim(f"[{len(ids)} prompt tokens, first token {first:.0f} ms, {n} new at {rate:.1f} "
                  f"tokens/s, {out['finish_reason']}]", sys.stderr))
    return stream.text

def repl(cfg, model, tok, template, eos, generator):
    def write(s):
        sys.stdout.write(s)
        sys.stdout.flush()
    system, history = cfg.system, []
    print("Commands: /system TEXT (new system message, clears history), /reset, /exit. "
          "Ctrl-D exits.")
    while True:
        try:
            line = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave quietly
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if line.startswith("/system"):
            system, history = line[len("/system"):].strip(), []
            state = "set" if system else "back to the default"
            print(f"(system message {state}; history cleared)")
            continue
        if line.startswith("/"):
            print("unknown command: /system TEXT, /reset, /exit")
            continue
        history.append({"role": "user", "content": line})
        limit = model.cfg.max_position_embeddings - cfg.max_new_tokens
        prompt_len = lambda: len(D.render(tok, conversation(system, history), template, True)[0])
        while len(history) > 1 and prompt_len() > limit:
            history = history[2:]  # the context is full: forget the oldest exchange
        try:
            messages = conversation(system, history)
            text = reply(cfg, model, tok, template, eos, messages, write, generator)
            history.append({"role": "assistant", "content": text})
        except KeyboardInterrupt:  # Ctrl-C while generating: drop this turn, keep chatting
            history.pop()
            print("\n(interrupted)")
        except ValueError as e:  # e.g. one message longer than the context
            history.pop()
            print(f"error: {e}")

def run():
    cfg = D.parse_config(ChatConfig)
    try:  # sampling values out of range stop here, before any model is loaded
        M.check_sampling(1, cfg.temperature, cfg.top_p, cfg.top_k)
        model, tok, template, eos, name = load(cfg)
    except ValueError as e:  # an unknown template, a vocabulary without the template's EOS, ...
        raise SystemExit(f"error: {e}")
    if cfg.serve:
        if min(cfg.max_batch, cfg.max_queue) < 1 or min(cfg.timeout, cfg.max_body_mb) <= 0:
            raise SystemExit("error: --max-batch, --max-queue, --timeout and --max-body-mb "
                             "must be > 0")
        return serve.serve(cfg, model, tok, template, eos, name)  # serve.py
    params = model.cfg.num_params() / 1e6  # not parameters(): int8 weights are buffers
    serve.log(f"{name}: {params:.0f}M parameters, template {template}, {model.dtype} on "
              f"{model.device}")
    generator = torch.Generator(model.device).manual_seed(cfg.seed)
    if cfg.prompt:  # scriptable: the answer alone on stdout, everything else on stderr
        try:
            messages = conversation(cfg.system, [{"role": "user", "content": cfg.prompt}])
            write = lambda s: (sys.stdout.write(s), sys.stdout.flush())
            reply(cfg, model, tok, template, eos, messages, write, generator)
        except ValueError as e:  # a prompt longer than the context
            raise SystemExit(f"error: {e}")
        return
    repl(cfg, model, tok, template, eos, generator)

if __name__ == "__main__":
    D.run_main(run)
