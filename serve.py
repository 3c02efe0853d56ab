"""
`python chat.py --serve`: OpenAI's POST /v1/chat/completions (streamed or not; n, stop, seed,
logprobs, top_logprobs, and vLLM's top_k) and GET /v1/models, on the standard library's HTTP
server. chat.py's REPL streams its replies through Stream too.

Batching: concurrent requests decode together. One scheduler thread owns the model: it takes the
oldest queued request and those queued with the same n (up to --max-batch sequences), waiting for
more while they keep coming (--batch-window-ms apart at most; ten windows in all), and runs them
through one model.generate() call, each with its own temperature, top_p, top_k, max_tokens, stop
strings and seed (its own generator), so a greedy or seeded answer is the one the request gets
alone (up to the rounding of batched matmuls: see the README). Requests arriving meanwhile wait for
the next batch; a request's answer goes out as soon as its own rows end. Handler threads parse,
stream and reply; the scheduler only decodes, handing tokens to each request's queue.

Limits, for a server reachable beyond 127.0.0.1: a body over --max-body-mb is refused with a 413
from its Content-Length before a byte of it is read; a request (line, headers, body) must arrive
within --timeout seconds, and a connection idle or stalled that long (a client not reading its
stream too) is closed; beyond --max-queue requests queued or decoding, a 503 with Retry-After;
beyond 4 x --max-queue connections, new ones are closed at once; with --api-key, every route
wants `Authorization: Bearer KEY` (a 401 otherwise, as vLLM). A client that goes away (a broken
stream, or a closed connection while it waits) has its rows stopped at the next step."""
import collections, hmac, json, queue, random, re, select, socket, sys, threading, time
import traceback, uuid
import torch
import data as D
import model as M

class Stream:
    """Incremental detokenization: hand out the new suffix of the text of all ids so far. A
    trailing U+FFFD (a UTF-8 character split across tokens) is held back until complete; so is a
    tail that may start a stop string. Text ends at the first stop string.
    Only the ids since the last complete text are decoded a step (from one window back, as vLLM:
    SentencePiece drops a leading space at the start of what it decodes, and both drop the same),
    so a long stream costs linear time, not quadratic."""
    def __init__(self, tok, stop=()):
        self.tok, self.stop, self.ids, self.sent, self.text = tok, list(stop), [], 0, ""
        self.done, self.start, self.read = "", 0, 0  # text of ids[:read]; the window's start

    def push(self, token):
        self.ids.append(token)
        return self._emit(final=False)

    def finish(self):
        return self._emit(final=True)

    def _decoded(self):
        decode = lambda ids: self.tok.decode(ids, skip_special_tokens=True)
        known = decode(self.ids[self.start:self.read])
        new = decode(self.ids[self.start:])[len(known):]
        if new.endswith("\ufffd"):  # a character still incomplete: decode it again next time
            return self.done + new
        self.done += new
        self.start, self.read = self.read, len(self.ids)
        return self.done

    def _emit(self, final):
        text = self._decoded()
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            text = text[:min(hits)]
        elif not final:
            text = text.rstrip("\ufffd")
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                       default=0)
            text = text[:len(text) - hold]
        self.text = text
        new, self.sent = text[self.sent:], max(self.sent, len(text))
        return new

# -------------------------------------------------------------------------------------------------
# Requests: checked up front; anything malformed is a 400 with OpenAI's error shape

class BadRequest(ValueError):  # a 400 for the client
    pass

def number(req, key, default, lo, hi, kind=float):
    v = req.get(key)
    if v is None:
        return default
    wrong_type = isinstance(v, bool) or not isinstance(v, (int, float))
    if wrong_type or (kind is int and v != int(v)) or not lo <= v <= hi:
        what = "an integer" if kind is int else "a number"
        raise BadRequest(f"'{key}' must be {what} in [{lo}, {hi}], got {v!r}")
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
            texts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None
                     for p in content]
            if not all(isinstance(t, str) for t in texts):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            content = "".join(texts)
        role = "system" if m.get("role") == "developer" else m.get("role")
        messages.append({"role": role, "content": content})
    try:
        D.check_messages(messages, prompt=True)
    except ValueError as e:
        raise BadRequest(f"messages: {e}") from None
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    strings = isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
    if not strings or len(stop) > 4:
        raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings")
    stream, options = req.get("stream") or False, req.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise BadRequest("'stream' must be a boolean and 'stream_options' an object")
    top_logprobs = number(req, "top_logprobs", 0, 0, 20, int)
    logprobs = req.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise BadRequest("'logprobs' must be a boolean")
    if req.get("top_logprobs") is not None and not logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true")
    if logprobs and stream:
        raise BadRequest("'logprobs' is supported without 'stream' only")
    top_p = number(req, "top_p", cfg.top_p, 0, 1)  # top_p 0 means greedy
    max_tokens = {"max_tokens": req.get("max_completion_tokens", req.get("max_tokens"))}
    return dict(messages=messages, stop=stop, stream=stream, top_p=top_p or 1.0,
                temperature=number(req, "temperature", cfg.temperature, 0, 2) if top_p else 0.0,
                max_tokens=number(max_tokens, "max_tokens", cfg.max_new_tokens, 1, 10**9, int),
                top_k=max(0, number(req, "top_k", cfg.top_k, -1, 10**9, int)),  # vLLM's; -1: off
                n=number(req, "n", 1, 1, cfg.max_n, int),
                seed=number(req, "seed", None, -2**63, 2**64 - 1, int),
                include_usage=bool(options.get("include_usage")), logprobs=logprobs,
                top_logprobs=top_logprobs)

# -------------------------------------------------------------------------------------------------
# Logprobs in OpenAI's shape: each token's text, bytes and log-probability, with the top k

def token_bytes(tok):
    """-> a function: token id -> its bytes, as OpenAI's logprobs report them. Byte-level BPE
    (GPT-2, SmolLM2, Llama-3) spells bytes as printable characters; SentencePiece has <0xNN>
    pieces. Decoding one id alone would lose SentencePiece's leading space and split UTF-8."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(rest))]
    byte_of = {chr(c): b for b, c in zip(printable + rest, chars)}
    byte_level = "\u0120" in tok.get_vocab()  # Ġ, byte-level BPE's space
    memo = {}

    def get(i):
        if i not in memo:
            piece = tok.convert_ids_to_tokens(i) or ""
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                memo[i] = bytes([int(piece[3:5], 16)])
            elif byte_level and all(c in byte_of for c in piece):
                memo[i] = bytes(byte_of[c] for c in piece)
            else:  # SentencePiece (▁ is a space), or a special token outside the byte alphabet
                text = tok.decode([i]) if byte_level else piece.replace("\u2581", " ")
                memo[i] = text.encode()
        return memo[i]
    return get

class Logprobs:
    """OpenAI's choice.logprobs of n completions, collected while generate() shows each step's
    logits (on_logits) before it samples the token (on_token): the model's own log-softmax, before
    temperature, top-p and top-k, as OpenAI's. A completion that ended at an EOS gets an entry for
    it too (the likeliest EOS id: generate() does not say which one it drew)."""
    def __init__(self, n, k, tbytes):
        self.k, self.tbytes, self.last, self.seen = k, tbytes, [None] * n, [0] * n
        self.content = [[] for _ in range(n)]

    def on_logits(self, rows, logits):  # keeps the last distribution of rows not ended at an EOS
        live = [(j, r) for j, r in enumerate(rows) if self.seen[r] == len(self.content[r])]
        if live:
            lp = torch.log_softmax(logits.float(), -1)
            for j, r in live:
                self.last[r], self.seen[r] = lp[j], self.seen[r] + 1

    def on_token(self, row, t):
        self.content[row].append(self.entry(self.last[row], t))

    def result(self, row, end=()):
        if end:  # it ended at an EOS: one of `end` was drawn from its last distribution
            lp = self.last[row]
            self.content[row].append(self.entry(lp, max(end, key=lambda e: float(lp[e]))))
        return {"content": self.content[row], "refusal": None}

    def entry(self, lp, t):
        v, i = lp.topk(self.k)
        top = [self.item(a, b) for a, b in zip(i.tolist(), v.tolist())]
        return self.item(t, float(lp[t])) | {"top_logprobs": top}

    def item(self, t, logprob):
        b = self.tbytes(t)
        try:
            text = b.decode()
        except UnicodeDecodeError:  # part of a UTF-8 character: OpenAI's spelling
            text = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
        return {"token": text, "logprob": logprob, "bytes": list(b)}


# -------------------------------------------------------------------------------------------------
# Batching: one scheduler thread decodes the queued requests together

def log(line):  # one write: lines of the scheduler and the handler threads do not interleave
    sys.stderr.write(line + "\n")
    sys.stderr.flush()

class Job:
    """One request on its way through the scheduler. The scheduler puts its events on `events`:
    ("token", row, id), ("done", row, (finish_reason, logprobs)), or ("error", None, message); the
    handler thread that owns the connection reads them: a slow client never holds up the batch."""
    def __init__(self, req, ids, max_tokens, tbytes):
        self.req, self.ids, self.max_tokens = req, ids, max_tokens
        self.n, self.arrived, self.events = req["n"], time.monotonic(), queue.SimpleQueue()
        self.left, self.released = self.n, False  # rows not yet ended; out of the queue's count
        self.gone = False  # its client went away: its rows end at the next step ("abort")
        self.lps = Logprobs(self.n, req["top_logprobs"], tbytes) if req["logprobs"] else None

class Batcher:
    """The queue of requests and the thread that decodes them, a batch per generate() call."""
    def __init__(self, cfg, model, tok, eos):
        self.cfg, self.model, self.tok, self.eos = cfg, model, tok, eos
        self.seeds = random.Random(cfg.seed)  # for requests without a seed
        self.pending, self.busy = collections.deque(), 0  # busy: queued or decoding
        self.cond = threading.Condition()
        threading.Thread(target=self.run, daemon=True, name="batcher").start()

    def submit(self, job):
        """Queue a job; False (the caller answers 503) when --max-queue are queued or decoding."""
        with self.cond:
            if self.busy >= self.cfg.max_queue:
                return False
            self.busy += 1
            self.pending.append(job)
            self.cond.notify()
        return True

    def release(self, job):  # once a job's rows have all ended (or its batch failed): a free slot
        with self.cond:
            self.busy -= not job.released
            job.released = True

    def run(self):
        while True:
            batch = self.take()
            try:
                self.decode(batch)
            finally:
                for job in batch:
                    self.release(job)

    def take(self):
        """The oldest job and those queued with the same n (one generate() call has one n), up to
        --max-batch rows and a KV cache of --max-batch x 2 x --max-new-tokens row-tokens (generate
        gives every row the longest prompt + reply: one request's max_tokens of 8000 would
        otherwise size every row of its batch; such a request runs alone). Before it starts, the
        batch waits while requests keep coming: until none has arrived for --batch-window-ms
        (clients answered together come back a few ms apart), and at most 10 windows from the
        oldest one's arrival."""
        window = self.cfg.batch_window_ms / 1e3
        with self.cond:
            while not self.pending:
                self.cond.wait()
            first = self.pending[0]
            rows = lambda: sum(j.n for j in self.pending if j.n == first.n)
            while rows() < self.cfg.max_batch:
                deadline = min(first.arrived + 10 * window, self.pending[-1].arrived + window)
                if time.monotonic() >= deadline:
                    break
                self.cond.wait(deadline - time.monotonic())
            batch, rows, longest = [], 0, 0
            budget = 2 * self.cfg.max_batch * self.cfg.max_new_tokens
            for j in list(self.pending):
                length = max(longest, len(j.ids) + j.max_tokens)
                if j.n == first.n and (not batch or (rows + j.n <= self.cfg.max_batch
                                                     and (rows + j.n) * length <= budget)):
                    batch.append(j)
                    rows, longest = rows + j.n, length
                    self.pending.remove(j)
            return batch

    def decode(self, batch):
        n, dev = batch[0].n, self.model.device
        seeds = [j.req["seed"] if j.req["seed"] is not None else self.seeds.getrandbits(63)
                 for j in batch]
        if len(batch) > 1:
            log(f"decoding {len(batch)} requests together ({n * len(batch)} sequences)")

        def on_token(row, t):  # generate's row = batch index * n + the job's own row
            job = batch[row // n]
            if job.lps:
                job.lps.on_token(row % n, t)
            job.events.put(("token", row % n, t))

        def on_done(row, reason):  # logprobs end here, while no other step can touch them
            job = batch[row // n]
            lps = job.lps and job.lps.result(row % n, self.eos if reason == "eos" else ())
            job.left -= 1
            if not job.left:  # its last row: its slot frees before its client hears of it
                self.release(job)
            job.events.put(("done", row % n, (reason, lps)))

        def on_logits(rows, logits):  # each job with logprobs sees its own rows
            mine = collections.defaultdict(list)
            for j, r in enumerate(rows):
                mine[r // n].append(j)
            for i, js in mine.items():
                if batch[i].lps:
                    batch[i].lps.on_logits([rows[j] % n for j in js], logits[js])
        try:
            M.generate(self.model, [j.ids for j in batch], n=n,
                       max_new_tokens=[j.max_tokens for j in batch],
                       temperature=[j.req["temperature"] for j in batch],
                       top_p=[j.req["top_p"] for j in batch],
                       top_k=[j.req["top_k"] for j in batch],
                       stop=[j.req["stop"] for j in batch], eos_ids=self.eos, tokenizer=self.tok,
                       on_token=on_token, on_done=on_done, aborted=lambda r: batch[r // n].gone,
                       on_logits=on_logits if any(j.lps for j in batch) else None,
                       generator=[torch.Generator(dev).manual_seed(s) for s in seeds])
        except Exception as e:  # a bug must cost this batch, not the server
            traceback.print_exc()
            for j in batch:
                j.events.put(("error", None, f"{type(e).__name__}: {e}"))

# -------------------------------------------------------------------------------------------------
# HTTP: handler threads check, queue and answer; limits on body size, time and queue length

class Refused(Exception):  # an HTTP error answered before the body is read: (code, message, kind)
    pass

def serve(cfg, model, tok, template, eos, name):
    from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
    batcher, tbytes = Batcher(cfg, model, tok, eos), token_bytes(tok)
    context, max_body = model.cfg.max_position_embeddings, int(cfg.max_body_mb * 2**20)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for clients sending many requests (annotate.py)
        timeout = cfg.timeout  # on every read and write of the socket: a stalled client is dropped

        def handle_one_request(self):
            """--timeout also bounds the whole arrival of a request (line, headers, body), not only
            each read: a client trickling a byte every few seconds is cut off too."""
            self.deadline = threading.Timer(cfg.timeout, self.cut)
            self.deadline.daemon = True
            self.deadline.start()
            try:
                super().handle_one_request()
            finally:
                self.deadline.cancel()

        def cut(self):  # the pending read ends at once (end of file): the request is dropped
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def send_json(self, code, obj, headers=()):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def error(self, code, message, kind="invalid_request_error", headers=()):
            err = {"message": message, "type": kind, "param": None, "code": None}
            self.send_json(code, {"error": err}, headers)

        def check_key(self):
            """With --api-key: the bearer token, compared in constant time (as vLLM)."""
            if not cfg.api_key:
                return
            auth = self.headers.get("Authorization", "")
            given = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else ""
            if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
                raise Refused(401, "missing or wrong API key (Authorization: Bearer KEY)",
                              "authentication_error")

        def read_body(self):
            """The body, its size checked from Content-Length before anything is read."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise Refused(411, "a chunked body is not supported: send Content-Length")
            size = self.headers.get("Content-Length") or "0"
            if not size.isdigit():
                raise Refused(400, f"bad Content-Length {size!r}")
            size = int(size)
            if size > max_body:
                raise Refused(413, f"the body has {size} bytes; the limit is {max_body} "
                                   "(--max-body-mb)")
            body = self.rfile.read(size)  # a client stalling here meets the socket timeout
            if len(body) < size:
                raise ConnectionResetError("the client closed the connection mid-body (or was "
                                           "cut off at --timeout)")
            self.deadline.cancel()  # the request is in: decoding and streaming may take long
            return body

        def do_GET(self):
            try:
                self.check_key()
            except Refused as e:
                return self.refuse(*e.args)
            if self.path.rstrip("/") != "/v1/models":
                return self.error(404, f"no route GET {self.path}", "not_found_error")
            self.send_json(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "local"}]})

        def refuse(self, code, message, kind="invalid_request_error"):
            self.close_connection = True  # the body, if any, was not read: the stream is spent
            auth = [("WWW-Authenticate", "Bearer")] if code == 401 else []
            self.error(code, message, kind, auth)

        def do_POST(self):
            self.started = False
            try:
                self.check_key()
                body = self.read_body()
            except Refused as e:
                return self.refuse(*e.args)
            except (TimeoutError, ConnectionResetError) as e:
                self.close_connection = True  # stalled or gone mid-body: nobody to answer
                return self.log_message("dropped: %s", e)
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self.error(404, f"no route POST {self.path}", "not_found_error")
            try:
                req = parse_request(body, cfg)
                ids, _ = D.render(tok, req["messages"], template, prompt=True)
                if len(ids) >= context:
                    raise BadRequest(f"the prompt has {len(ids)} tokens; the context is {context}")
                self.complete(req, ids, min(req["max_tokens"], context - len(ids)))
            except BadRequest as e:
                self.error(400, str(e))
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True  # the client went away (or stopped reading)
            except Exception as e:  # a bug must cost one request, not the server
                traceback.print_exc()
                if not self.started:
                    self.error(500, f"{type(e).__name__}: {e}", "server_error")
                self.close_connection = True

        def chunk(self, choices, **extra):  # one server-sent event
            data = self.head | {"object": "chat.completion.chunk", "choices": choices} | extra
            self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        def delta(self, i, delta, finish_reason=None):
            self.chunk([{"index": i, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}])

        def complete(self, req, ids, max_tokens):
            job = Job(req, ids, max_tokens, tbytes)
            if not batcher.submit(job):
                return self.error(503, f"the server is busy ({cfg.max_queue} requests queued or "
                                       "decoding, --max-queue); retry later", "server_error",
                                  [("Retry-After", "1")])
            rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            self.head = {"id": rid, "created": created, "model": name}
            try:
                self.answer(job, ids)
            except BaseException:  # the client went away, or answering it failed: either way its
                job.gone = True  # rows stop decoding at the next step, and free their slot
                raise

        def client_gone(self):  # a closed connection reads as end-of-file at once
            readable = select.select([self.connection], [], [], 0)[0]
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)

        def answer(self, job, ids):
            req, n, stream = job.req, job.n, job.req["stream"]
            streams = [Stream(tok, req["stop"]) for _ in range(n)]
            if stream:  # server-sent events; the end of the body is the closed connection
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.started = self.close_connection = True
                for i in range(n):
                    self.delta(i, {"role": "assistant", "content": ""})
            ended, check = [None] * n, time.monotonic() + 1
            while None in ended:  # until each of its rows has ended
                if time.monotonic() >= check:  # once a second: is anyone still waiting for it?
                    if self.client_gone():  # (a plain request writes nothing until it ends)
                        raise ConnectionResetError("the client went away")
                    check = time.monotonic() + 1
                try:
                    kind, row, x = job.events.get(timeout=1.0)
                except queue.Empty:
                    continue
                if kind == "error":  # the scheduler printed the traceback
                    if not self.started:
                        self.error(500, x, "server_error")
                    self.close_connection = True
                    return
                if kind == "done":
                    ended[row] = x
                elif not stream:
                    streams[row].ids.append(x)  # decoded once at the end
                elif text := streams[row].push(x):
                    self.delta(row, {"content": text})
            # OpenAI has no "eos": an EOS and a stop string are both "stop"
            reasons = ["length" if r == "length" else "stop" for r, _ in ended]
            new_tokens = sum(len(s.ids) for s in streams)
            usage = {"prompt_tokens": len(ids), "completion_tokens": new_tokens}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if stream:
                for i, s in enumerate(streams):
                    text = s.finish()
                    self.delta(i, {"content": text} if text else {}, reasons[i])
                if req["include_usage"]:
                    self.chunk([], usage=usage)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                return
            choices = []
            for i, (s, (_, logprobs)) in enumerate(zip(streams, ended)):
                s.finish()
                choices.append({"index": i, "message": {"role": "assistant", "content": s.text},
                                "logprobs": logprobs, "finish_reason": reasons[i]})
            reply = {"object": "chat.completion", "choices": choices, "usage": usage}
            self.send_json(200, self.head | reply)

        def log_message(self, fmt, *args):
            log(f"{self.address_string()} {fmt % args}")

    slots = threading.BoundedSemaphore(4 * cfg.max_queue)  # connection threads at once

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # the listen backlog (5 by default): bursts of clients

        def process_request(self, request, client_address):
            if not slots.acquire(blocking=False):  # refused at once rather than a thread more
                return self.shutdown_request(request)
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                slots.release()

    server = Server((cfg.host, cfg.port), Handler)
    host, port = server.server_address[:2]
    if not cfg.api_key and host not in ("127.0.0.1", "::1", "localhost"):
        log(f"warning: serving on {host} without --api-key: anyone who reaches it can use it")
    log(f"serving {name} at http://{host}:{port}/v1 (POST /v1/chat/completions, "
        "GET /v1/models); Ctrl-C stops")
    try:
        server.serve_forever()
    finally:
        server.server_close()
