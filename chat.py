"""
Chat with a checkpoint: an interactive REPL that streams tokens as they are generated, a one-shot
`--prompt` whose answer alone goes to stdout, or `--serve`, an OpenAI-compatible HTTP server
(POST /v1/chat/completions, GET /v1/models) built on the standard library. Non-streaming requests
may ask for `logprobs` / `top_logprobs` (OpenAI's shape), which annotate.py --verdict logprobs reads.

    python chat.py                                   # the bundled SmolLM2-135M-Instruct
    python chat.py --model out/sft --prompt "Hi"     # scriptable: only the answer on stdout
    python chat.py --model out/dpo --serve --port 8000
"""
import json, os, random, re, sys, threading, time, traceback, uuid
from dataclasses import dataclass
import torch
import data as D
import model as M

@dataclass
class ChatConfig:
    model: str = ""  # checkpoint: HF folder, Hub id, or .gguf file (default: the bundled SmolLM2-135M-Instruct)
    template: str = ""  # chat template override (vicuna, chatml); default: the checkpoint's
    system: str = ""  # system message (default: the template's own)
    temperature: float = 0.7  # sampling temperature (0: greedy)
    top_p: float = 0.9  # nucleus sampling: keep the smallest set of tokens with this much probability
    top_k: int = 0  # keep only the k most likely tokens (0: off)
    max_new_tokens: int = 512  # max tokens of one reply (the server's default for max_tokens)
    seed: int = 1337  # sampling seed (the server seeds each request from it unless the request has a seed)
    prompt: str = ""  # one-shot: answer this, print only the answer on stdout, and exit
    device: str = "auto"  # cpu, cuda, or auto
    dtype: str = "auto"  # float32 or bfloat16 (auto: bfloat16 on CUDA; float32 on CPU, as fast there for batch 1)
    threads: int = 0  # torch CPU threads (0: torch's default, one per core)
    serve: bool = False  # serve the OpenAI chat completions API instead of chatting
    host: str = "127.0.0.1"  # --serve: address to listen on
    port: int = 8000  # --serve: port (0: any free port, printed at start)
    max_n: int = 16  # --serve: largest n (completions per request) accepted

def log(*a):
    print(*a, file=sys.stderr, flush=True)

class Stream:
    """Incremental detokenization: decode all ids so far and hand out the new suffix. A trailing U+FFFD
    is a UTF-8 character split across tokens (byte fallback, byte-level BPE), held back until complete;
    so is a tail that may be the start of a stop string. Text is cut at the first stop string."""
    def __init__(self, tok, stop=()):
        self.tok, self.stop, self.ids, self.sent, self.text = tok, list(stop), [], 0, ""

    def push(self, token):
        self.ids.append(token)
        return self._emit(final=False)

    def finish(self):
        return self._emit(final=True)

    def _emit(self, final):
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            text = text[:min(hits)]
        elif not final:
            text = text.rstrip("\ufffd")
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        self.text = text
        new, self.sent = text[self.sent:], max(self.sent, len(text))
        return new

def load(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[cfg.dtype]
    path = cfg.model or M.default_model()
    model, tok, template = M.load_model(path, device=device, dtype=dtype)
    template = M.get_template(tok, "", cfg.template) if cfg.template else template
    cfg_eos = model.cfg.eos_token_id
    eos = {D.eos_id(tok, template)} | set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]) - {None}
    name = os.path.basename(os.path.normpath(path)).removesuffix(".gguf")
    return model, tok, template, eos, name

def conversation(system, history):
    return ([{"role": "system", "content": system}] if system else []) + history

def reply(cfg, model, tok, template, eos, messages, write, generator):
    """Generate one answer to `messages`, streaming its text through write(). Returns the text."""
    ids, _ = D.render(tok, messages, template, prompt=True)
    stream, times = Stream(tok), [time.perf_counter()]

    def on_token(row, t):
        times.append(time.perf_counter())
        write(stream.push(t))
    out = M.generate(model, [ids], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                     top_k=cfg.top_k, eos_ids=eos, generator=generator, on_token=on_token)[0][0]
    write(stream.finish())
    n, nan = len(out["ids"]), float("nan")
    first = (times[1] - times[0]) * 1e3 if n else nan
    rate = (n - 1) / (times[-1] - times[1]) if n > 1 and times[-1] > times[1] else nan  # decoding, without the prefill
    log(f"[{len(ids)} prompt tokens, first token {first:.0f} ms, {n} new at {rate:.1f} tokens/s, {out['finish_reason']}]")
    return stream.text

def repl(cfg, model, tok, template, eos, generator):
    def write(s):
        sys.stdout.write(s)
        sys.stdout.flush()
    system, history = cfg.system, []
    print("Commands: /system TEXT (new system message, clears history), /reset, /exit. Ctrl-D exits.")
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
            print(f"(system message {'set' if system else 'back to the default'}; history cleared)")
            continue
        if line.startswith("/"):
            print("unknown command: /system TEXT, /reset, /exit")
            continue
        history.append({"role": "user", "content": line})
        limit = model.cfg.max_position_embeddings - cfg.max_new_tokens
        while len(history) > 1 and len(D.render(tok, conversation(system, history), template, prompt=True)[0]) > limit:
            history = history[2:]  # the context is full: forget the oldest exchange
        try:
            text = reply(cfg, model, tok, template, eos, conversation(system, history), write, generator)
            history.append({"role": "assistant", "content": text})
            print()
        except KeyboardInterrupt:  # Ctrl-C while generating: drop this turn, keep chatting
            history.pop()
            print("\n(interrupted)")
        except ValueError as e:  # e.g. one message longer than the context
            history.pop()
            print(f"error: {e}")

# ----------------------------------------------------------------------------------------------------
# --serve: the OpenAI chat completions API. One request generates at a time (a lock around the model),
# so concurrent clients queue rather than corrupt each other's KV cache or RNG.

class BadRequest(ValueError):
    pass

def number(req, key, default, lo, hi, kind=float):
    v = req.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) or not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}], got {v!r}")
    return kind(v)

def parse_request(body, cfg):
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest("body must be a JSON object")
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        role = "system" if m.get("role") == "developer" else m.get("role")
        messages.append({"role": role, "content": content})
    try:
        D.check_messages(messages, prompt=True)
    except ValueError as e:
        raise BadRequest(f"messages: {e}") from None
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings")
    stream, options = req.get("stream") or False, req.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise BadRequest("'stream' must be a boolean and 'stream_options' an object")
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    logprobs, top_logprobs = req.get("logprobs") or False, number(req, "top_logprobs", 0, 0, 20, int)
    if not isinstance(logprobs, bool):
        raise BadRequest("'logprobs' must be a boolean")
    if "top_logprobs" in req and req["top_logprobs"] is not None and not logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true")
    if logprobs and stream:
        raise BadRequest("'logprobs' is supported without 'stream' only")
    top_p = number(req, "top_p", cfg.top_p, 0, 1)
    return dict(messages=messages, stop=stop, stream=stream, top_p=top_p or 1.0,  # top_p 0: greedy, below
                temperature=number(req, "temperature", cfg.temperature, 0, 2) if top_p else 0.0,
                max_tokens=number({"max_tokens": max_tokens}, "max_tokens", cfg.max_new_tokens, 1, 10**9, int),
                n=number(req, "n", 1, 1, cfg.max_n, int), seed=number(req, "seed", None, -2**63, 2**64 - 1, int),
                include_usage=bool(options.get("include_usage")), logprobs=logprobs, top_logprobs=top_logprobs)

def token_bytes(tok):
    """-> a function: token id -> its bytes, as OpenAI's logprobs report them. Byte-level BPE (GPT-2,
    SmolLM2, Llama-3) spells bytes as printable characters; SentencePiece has ▁ for a space and <0xNN>
    byte-fallback pieces. Decoding one id alone would lose SentencePiece's leading space and split UTF-8."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    byte_of = {chr(c): b for b, c in zip(printable + rest, printable + [256 + i for i in range(len(rest))])}
    byte_level = "\u0120" in tok.get_vocab()  # Ġ, byte-level BPE's space
    memo = {}

    def get(i):
        if i not in memo:
            piece = tok.convert_ids_to_tokens(i) or ""
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                memo[i] = bytes([int(piece[3:5], 16)])
            elif byte_level and all(c in byte_of for c in piece):
                memo[i] = bytes(byte_of[c] for c in piece)
            else:  # SentencePiece, or a special token outside the byte alphabet
                memo[i] = (tok.decode([i]) if byte_level else piece.replace("\u2581", " ")).encode()
        return memo[i]
    return get

class Logprobs:
    """OpenAI's choice.logprobs of n completions, collected while they are generated: generate() shows
    each step's logits (on_logits) before it samples the token (on_token). OpenAI reports the model's own
    log-softmax, before temperature, top-p and top-k; so do we. A completion that ended at an EOS gets an
    entry for it too (the likeliest of the EOS ids: generate() does not say which one it drew), so a
    one-token judge that answers EOS still shows its distribution."""
    def __init__(self, n, k, tbytes):
        self.k, self.tbytes, self.last, self.seen = k, tbytes, [None] * n, [0] * n
        self.content = [[] for _ in range(n)]

    def on_logits(self, rows, logits):
        live = [(j, r) for j, r in enumerate(rows) if self.seen[r] == len(self.content[r])]  # not ended at an EOS
        if live:
            lp = torch.log_softmax(logits.float(), -1)
            for j, r in live:
                self.last[r], self.seen[r] = lp[j], self.seen[r] + 1

    def on_token(self, row, t):
        self.content[row].append(self.entry(self.last[row], t))

    def result(self, row, end=()):
        if end:  # it ended at an EOS: one of `end` was drawn from its last distribution
            self.content[row].append(self.entry(self.last[row], max(end, key=lambda e: float(self.last[row][e]))))
        return {"content": self.content[row], "refusal": None}

    def entry(self, lp, t):
        v, i = lp.topk(self.k)
        return self.item(t, float(lp[t])) | {"top_logprobs": [self.item(a, b) for a, b in zip(i.tolist(), v.tolist())]}

    def item(self, t, logprob):
        b = self.tbytes(t)
        try:
            text = b.decode()
        except UnicodeDecodeError:  # part of a UTF-8 character: OpenAI's spelling
            text = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
        return {"token": text, "logprob": logprob, "bytes": list(b)}

def serve(cfg, model, tok, template, eos, name):
    from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
    lock, seeds = threading.Lock(), random.Random(cfg.seed)
    device = model.model.embed_tokens.weight.device
    tbytes = token_bytes(tok)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for clients sending many requests (annotate.py)

        def send_json(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def error(self, code, message, kind="invalid_request_error"):
            self.send_json(code, {"error": {"message": message, "type": kind, "param": None, "code": None}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "local"}]})
            else:
                self.error(404, f"no route GET {self.path}", "not_found_error")

        def do_POST(self):
            try:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            except ValueError:
                self.close_connection = True
                return self.error(400, "bad Content-Length")
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self.error(404, f"no route POST {self.path}", "not_found_error")
            self.started = False
            try:
                req = parse_request(body, cfg)
                ids, _ = D.render(tok, req["messages"], template, prompt=True)
                room = model.cfg.max_position_embeddings - len(ids)
                if room < 1:
                    raise BadRequest(f"the prompt has {len(ids)} tokens; the context is {model.cfg.max_position_embeddings}")
                self.complete(req, ids, min(req["max_tokens"], room))
            except BadRequest as e:
                self.error(400, str(e))
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away mid-stream
            except Exception as e:  # a bug must cost one request, not the server
                traceback.print_exc()
                if not self.started:
                    self.error(500, f"{type(e).__name__}: {e}", "server_error")
                self.close_connection = True

        def complete(self, req, ids, max_tokens):
            n, rid, created = req["n"], f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            streams = [Stream(tok, req["stop"]) for _ in range(n)]
            head = {"id": rid, "created": created, "model": name}

            def chunk(choices, **extra):
                data = head | {"object": "chat.completion.chunk", "choices": choices} | extra
                self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

            lps = Logprobs(n, req["top_logprobs"], tbytes) if req["logprobs"] else None

            def on_token(row, t):
                if not req["stream"]:
                    if lps:
                        lps.on_token(row, t)
                    return streams[row].ids.append(t)  # decoded once at the end
                text = streams[row].push(t)
                if text:
                    chunk([{"index": row, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])

            with lock:
                if req["stream"]:  # server-sent events; the end of the body is the closed connection
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.started = self.close_connection = True
                    for i in range(n):
                        chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
                gen = torch.Generator(device).manual_seed(req["seed"] if req["seed"] is not None else seeds.getrandbits(63))
                outs = M.generate(model, [ids], n=n, max_new_tokens=max_tokens, temperature=req["temperature"],
                                  top_p=req["top_p"], top_k=cfg.top_k, eos_ids=eos, stop=req["stop"], tokenizer=tok,
                                  on_token=on_token, generator=gen, on_logits=lps and lps.on_logits)[0]
            reasons = ["length" if o["finish_reason"] == "length" else "stop" for o in outs]  # eos and stop strings
            usage = {"prompt_tokens": len(ids), "completion_tokens": sum(len(o["ids"]) for o in outs)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if req["stream"]:
                for i, s in enumerate(streams):
                    text = s.finish()
                    chunk([{"index": i, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": reasons[i]}])
                if req["include_usage"]:
                    chunk([], usage=usage)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                return
            for s in streams:
                s.finish()
            choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                        "logprobs": lps and lps.result(i, eos if outs[i]["finish_reason"] == "eos" else ()),
                        "finish_reason": reasons[i]} for i, s in enumerate(streams)]
            self.send_json(200, head | {"object": "chat.completion", "choices": choices, "usage": usage})

        def log_message(self, fmt, *args):
            log(f"{self.address_string()} {fmt % args}")

    server = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    log(f"serving {name} at http://{host}:{port}/v1 (POST /v1/chat/completions, GET /v1/models); Ctrl-C stops")
    try:
        server.serve_forever()
    finally:
        server.server_close()

def run():
    cfg = D.parse_config(ChatConfig)
    try:
        model, tok, template, eos, name = load(cfg)
    except ValueError as e:  # an unknown template, a vocabulary without the template's EOS, ...
        raise SystemExit(f"error: {e}")
    if cfg.serve:
        return serve(cfg, model, tok, template, eos, name)
    log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, template {template}, "
        f"{model.model.embed_tokens.weight.dtype} on {model.model.embed_tokens.weight.device}")
    generator = torch.Generator(model.model.embed_tokens.weight.device).manual_seed(cfg.seed)
    if cfg.prompt:  # scriptable: the answer alone on stdout, everything else on stderr
        try:
            reply(cfg, model, tok, template, eos, conversation(cfg.system, [{"role": "user", "content": cfg.prompt}]),
                  lambda s: (sys.stdout.write(s), sys.stdout.flush()), generator)
        except ValueError as e:  # a prompt longer than the context
            raise SystemExit(f"error: {e}")
        return print()
    repl(cfg, model, tok, template, eos, generator)

if __name__ == "__main__":
    D.run_main(run)
