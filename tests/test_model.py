import json, os
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import D, M, T, TINY, make_checkpoint, write_jsonl

CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "rope_theta": dict(rope_theta=100000.0, tie_word_embeddings=True),
}

def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(tmp_path, sp_tokenizer, name):
    path = make_checkpoint(tmp_path / name, sp_tokenizer, "vicuna", **CONFIGS[name])
    ours, _, _ = M.load_model(path)
    ids = torch.randint(0, len(sp_tokenizer), (2, 37))
    with torch.no_grad():
        ref = hf_model(path)(ids).logits
        got = ours(ids).view(2, 37, -1)
    diff = (ref - got).abs().max().item()
    print(f"{name}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-5

def test_hf_saved_folder_loads_in_ours(tmp_path, sp_tokenizer):
    cfg = transformers.LlamaConfig(vocab_size=len(sp_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    sp_tokenizer.save_pretrained(tmp_path / "hf")
    ours, _, _ = M.load_model(str(tmp_path / "hf"))
    ids = torch.randint(0, len(sp_tokenizer), (1, 20))
    with torch.no_grad():
        assert (hf(ids).logits[0] - ours(ids)).abs().max() <= 1e-5

def test_packed_equals_separate_and_kv_cache(tiny_vicuna):
    model, _, _ = M.load_model(tiny_vicuna)
    docs = [torch.randint(3, 300, (n,)).tolist() for n in (5, 17, 9)]
    with torch.no_grad():
        ids, cu = D.pack(docs)
        packed = model(ids, cu_seqlens=cu)
        sep = torch.cat([model(torch.tensor([d]))for d in docs])
        assert (packed - sep).abs().max() <= 1e-5
        # decode with the cache: prefill 10 tokens, then one at a time
        d = docs[1]
        cache = M.KVCache(model.cfg, 1, 32, "cpu", torch.float32)
        steps = [model(torch.tensor([d[:10]]), cache=cache)[0]]
        steps += [model(torch.tensor([[t]]), cache=cache)[0] for t in d[10:]]
        full = model(torch.tensor([d]))[9:]
        assert (torch.stack(steps) - full).abs().max() <= 1e-5

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_backward_against_fp64(monkeypatch, dtype):
    """CPU's packed attention (flash forward per document, our backward) against per-document SDPA
    in fp64: outputs and q/k/v gradients within 1.25x of SDPA's own error in `dtype`, with GQA,
    an empty and a one-token document, q with a non-unit last stride, and documents longer than a
    backward block (7 here), so the causal mask of later blocks is exercised."""
    monkeypatch.setattr(M.PackedAttention, "block", 7)
    torch.manual_seed(0)
    lens = [5, 1, 0, 23, 9, 16]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, 8, dtype=torch.float64) for h in (6, 2, 2))
    g = torch.randn(T, 6, 8, dtype=torch.float64)
    res = {}
    for name, dt in [("fp64", torch.float64), ("sdpa", dtype), ("ours", dtype)]:
        x = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        if name == "ours":
            qt = x[0].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
            o = M.attention(qt, x[1], x[2], cu, max(lens))  # q's last stride is 6
            x[0] = qt
        else:
            o = torch.cat([F.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1) for t in x), is_causal=True, enable_gqa=True
            ).transpose(0, 1) for a, b in zip(cu[:-1], cu[1:])])
        o.backward(g.to(dt))
        res[name] = [o.detach().double()] + [t.grad.double() for t in x]
    for ours, sdpa, ref in zip(res["ours"], res["sdpa"], res["fp64"]):
        assert (ours - ref).norm() <= max(1.25 * (sdpa - ref).norm(), 1e-6 * ref.norm())

def test_packed_attention_checks_its_input():
    q, k = torch.randn(12, 6, 8), torch.randn(12, 4, 8)
    with pytest.raises(ValueError, match="6 query heads over 4 kv heads"):
        M.attention(q, k, k, torch.tensor([0, 5, 12]), 7)
    with pytest.raises(ValueError, match="cu_seqlens 0..10 over 12 tokens"):
        M.attention(q, k[:, :2], k[:, :2], torch.tensor([0, 4, 10]), 6)
    with pytest.raises(ValueError, match="cu_seqlens"):  # decreasing: the kernel would SIGFPE
        M.attention(q, k[:, :2], k[:, :2], torch.tensor([0, 8, 4, 12]), 8)

@pytest.mark.parametrize("kernel", [True, False])  # CPU's fused kernel, and the plain ops (GPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_attention_equals_attention_over_prompt_and_own_keys(monkeypatch, kernel, dtype):
    """Prompts of different lengths, uneven rows per prompt (the grid has holes), own pasts of
    different lengths and t = 2 new tokens (causal within them): against SDPA over each row's
    prompt keys followed by its own, computed in fp64."""
    calls = []
    if kernel:  # count the fused kernel's calls: the prompt part must take it
        real = M.cpu_kernel
        monkeypatch.setattr(M, "cpu_kernel", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    else:
        monkeypatch.setattr(M, "cpu_kernel", None)
    cfg = M.LlamaConfig(**TINY, vocab_size=32)
    Hq, Hkv, D_, t = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 2
    torch.manual_seed(0)
    prompt = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2])  # 3 prompts: 5, 1 and 2 rows: a grid of width
    # 5, 20 queries a head on the prompt keys (CPU's kernel takes 16+), 4 on a row's own (matmuls)
    P, B = 3, len(prompt)
    pre = M.KVCache(cfg, P, 9, "cpu", dtype)
    pre.k.normal_(), pre.v.normal_()
    pre.lengths, pre.used = torch.tensor([9, 4, 6]), 9
    cache = M.KVCache(cfg, B, 8, "cpu", dtype, prefix=pre, prompt=prompt)
    cache.k.normal_(), cache.v.normal_()
    cache.lengths = torch.tensor([3, 1, 0, 5, 2, 4, 1, 2])  # own tokens before the t new ones
    cache.used = 5
    S = cache.used + t
    pos = cache.lengths[:, None] + torch.arange(t)
    mask = torch.arange(S) <= pos[:, :, None]
    q = torch.randn(B, t, Hq, D_).to(dtype)
    got = M.cascade_attention(q, cache, 1, S, mask)
    assert len(calls) == kernel
    for b in range(B):
        p, n = int(prompt[b]), int(cache.lengths[b]) + t
        k = torch.cat([pre.k[1, p, :, :int(pre.lengths[p])], cache.k[1, b, :, :n]], 1).double()
        v = torch.cat([pre.v[1, p, :, :int(pre.lengths[p])], cache.v[1, b, :, :n]], 1).double()
        seen = torch.cat([torch.ones(t, k.shape[1] - n, dtype=torch.bool), mask[b, :, :n]], 1)
        ref = F.scaled_dot_product_attention(q[b].transpose(0, 1).double(), k, v, attn_mask=seen,
                                             enable_gqa=True).transpose(0, 1)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert (got[b].double() - ref).abs().max() <= tol, (b, (got[b].double() - ref).abs().max())

def test_chunked_logprobs_equal_full_logits():
    """The chunked log-probs and their hand-written backward equal autograd through full logits, across
    several chunks, with ignored (-100) targets, with no target at all, and under bf16 autocast."""
    torch.manual_seed(0)
    w = (torch.randn(1000, 32) * 0.1).requires_grad_(True)
    h = torch.randn(300, 32, requires_grad=True)
    t = torch.randint(0, 1000, (300,))
    t[::4] = -100
    g = torch.randn(300)
    for autocast, tol in [(False, 1e-5), (True, 2e-2)]:
        outs = []
        for chunked in (True, False):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                lp = M.chunked_logprobs(h, w, t, chunk=64) if chunked else \
                    torch.where(t >= 0, -F.cross_entropy(F.linear(h, w).float(), t.clamp(min=0), reduction="none"), 0.0)
            (lp * g).sum().backward()
            outs.append((lp.detach(), h.grad, w.grad))
            h.grad = w.grad = None
        (a, ha, wa), (b, hb, wb) = outs
        assert a.dtype == torch.float32 and ha.dtype == wa.dtype == torch.float32 and (a[::4] == 0).all()
        for x, y in [(a, b), (ha, hb), (wa, wb)]:
            assert (x - y).abs().max() <= tol * y.abs().max()
    lp = M.chunked_logprobs(h, w, torch.full((300,), -100))  # nothing to score: zeros, and a graph all the same
    lp.sum().backward()
    assert (lp == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()

def test_rows_of_different_lengths_in_one_cache(tiny_vicuna):
    model, _, _ = M.load_model(tiny_vicuna)
    a, b = [5, 6, 7, 8, 9, 10], [11, 12, 13]
    with torch.no_grad():
        cache = M.KVCache(model.cfg, 2, 16, "cpu", torch.float32)
        for row, p in enumerate((a, b)):
            one = M.KVCache(model.cfg, 1, 16, "cpu", torch.float32)
            model(torch.tensor([p]), cache=one)
            cache.copy_from(slice(row, row + 1), one)
        out = model(torch.tensor([[20], [21]]), cache=cache)
        assert (out[0] - model(torch.tensor([a + [20]]))[-1]).abs().max() <= 1e-5
        assert (out[1] - model(torch.tensor([b + [21]]))[-1]).abs().max() <= 1e-5

def test_many_rows_logits_go_to_the_caches_buffer(tiny_vicuna):
    """Decoding more than 16 rows on CPU writes the logits into a buffer the cache keeps (fresh
    [rows, vocab] logits faulted their pages in every step): the same numbers as each row alone,
    the buffer reused by the next step, and fewer rows (compaction) take its first rows."""
    model, _, _ = M.load_model(tiny_vicuna)
    prompts = [[5 + i, 6, 7 + i % 5][: 1 + i % 3] for i in range(20)]
    with torch.no_grad():
        cache = M.KVCache(model.cfg, 20, 8, "cpu", torch.float32)
        for row, p in enumerate(prompts):
            one = M.KVCache(model.cfg, 1, 8, "cpu", torch.float32)
            model(torch.tensor([p]), cache=one)
            cache.copy_from(slice(row, row + 1), one)
        tok = torch.arange(20, 40)[:, None]
        out = model(tok, cache=cache)
        assert cache.logits is not None and out.data_ptr() == cache.logits.data_ptr()
        for row, p in enumerate(prompts):
            ref = model(torch.tensor([p + [20 + row]]))[-1]
            assert (out[row] - ref).abs().max() <= 1e-5
        first = out.clone()
        cache.keep(torch.arange(17))
        again = model(tok[:17], cache=cache)
        assert again.data_ptr() == out.data_ptr() and not torch.equal(again, first[:17])
        for row, p in enumerate(prompts[:17]):
            ref = model(torch.tensor([p + [20 + row] * 2]))[-1]
            assert (again[row] - ref).abs().max() <= 1e-5
    cache = M.KVCache(model.cfg, 20, 8, "cpu", torch.float32)  # with gradients: no buffer
    assert model(tok, cache=cache).requires_grad and cache.logits is None

def test_save_roundtrip_and_sharding(tmp_path, tiny_vicuna):
    model, tok, template = M.load_model(tiny_vicuna)
    out = tmp_path / "saved"
    tok.chat_template = D.JINJA[template]
    M.save_checkpoint(str(out), model.state_dict(), model.cfg, tok, {"chat_template_name": template},
                      max_shard_bytes=20_000)
    assert os.path.exists(out / "model.safetensors.index.json") and len(list(out.glob("model-*.safetensors"))) > 2
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert (hf_model(str(out))(ids).logits[0] - model(ids)).abs().max() <= 1e-5
        again, _, t2 = M.load_model(str(out))
        assert torch.equal(again(ids), model(ids)) and t2 == "vicuna"
    gen = json.load(open(out / "generation_config.json"))
    assert tok.eos_token_id in gen["eos_token_id"]


def test_generate_greedy_matches_transformers(tiny_vicuna):
    model, tok, _ = M.load_model(tiny_vicuna)
    hf = hf_model(tiny_vicuna)
    prompts = [[1, 50, 60, 70, 80], [1, 90, 100]]
    outs = M.generate(model, prompts, max_new_tokens=8, temperature=0, eos_ids=[])
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):]
        assert o[0]["ids"] == ref.tolist() and o[0]["finish_reason"] == "length"

def test_generate_stops_on_eos_and_stop_strings(tiny_vicuna):
    model, tok, _ = M.load_model(tiny_vicuna)
    greedy = M.generate(model, [[1, 50, 60]], max_new_tokens=10, temperature=0)[0][0]["ids"]
    out = M.generate(model, [[1, 50, 60]], max_new_tokens=10, temperature=0, eos_ids=[greedy[3]])[0][0]
    assert out == {"ids": greedy[:greedy.index(greedy[3])], "finish_reason": "eos"}
    stop = tok.decode(greedy[:5])[-2:]
    out = M.generate(model, [[1, 50, 60]], max_new_tokens=10, temperature=0, stop=[stop], tokenizer=tok)[0][0]
    assert out["finish_reason"] == "stop" and stop in tok.decode(out["ids"]) and len(out["ids"]) <= 5

def test_generate_per_prompt_settings_equal_each_prompt_alone(tiny_vicuna):
    """A server batch: each prompt its own temperature, top_p, top_k, max_new_tokens, stop strings
    and generator; each answer is the one it gets alone (greedy and seeded sampling alike), and
    on_done reports every row's end once, with the reason generate returns."""
    model, tok, _ = M.load_model(tiny_vicuna)
    prompts = [[1, 50, 60], [1, 90, 100, 110, 120, 130], [1, 70], [1, 40, 41, 42, 43]]
    greedy = M.generate(model, prompts[:1], max_new_tokens=10, temperature=0)[0][0]["ids"]
    settings = [dict(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=10,
                     stop=[tok.decode(greedy[:5])[-2:]]),
                dict(temperature=1.2, top_p=0.9, top_k=0, max_new_tokens=12, stop=[]),
                dict(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=4, stop=[]),
                dict(temperature=0.8, top_p=1.0, top_k=5, max_new_tokens=9, stop=["zz"])]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7, 8)]
    ended = []
    batch = M.generate(model, prompts, **{k: [s[k] for s in settings] for k in settings[0]},
                       tokenizer=tok, generator=gens(), on_done=lambda r, why: ended.append((r, why)))
    alone = [M.generate(model, [p], **s, tokenizer=tok, generator=g)[0][0]
             for p, s, g in zip(prompts, settings, gens())]
    assert [o[0] for o in batch] == alone
    assert sorted(ended) == [(i, o["finish_reason"]) for i, o in enumerate(alone)]
    assert [o["finish_reason"] for o in alone[:3]] == ["stop", "length", "length"]
    with pytest.raises(ValueError, match="2 per-prompt values for 4 prompts"):
        M.generate(model, prompts, temperature=[0.0, 1.0])

def test_prefill_groups_pad_and_match_one_prompt_at_a_time(tiny_vicuna):
    """Prompts prefilled together, right-padded: each one's last logits and keys are those of its
    prefill alone (padding never read); groups sorted by length, within the token budget."""
    assert M.prefill_groups([[1] * 5, [1] * 2, [1] * 4, [1] * 9], tokens=15) == [[1, 2, 0], [3]]
    model, _, _ = M.load_model(tiny_vicuna)
    prompts = [[1, 50, 60, 61, 62, 63, 64], [1, 70], [1, 40, 41, 42]]
    ids = torch.tensor([p + [5] * (7 - len(p)) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts])
    some = M.KVCache(model.cfg, 3, 7, model.device, model.dtype)
    batch = model(ids, cache=some, last=lens - 1)
    for j, p in enumerate(prompts):
        one = M.KVCache(model.cfg, 1, len(p), model.device, model.dtype)
        alone = model(torch.tensor([p]), cache=one)[0]
        torch.testing.assert_close(batch[j], alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(some.k[:, j, :, :len(p)], one.k[:, 0], rtol=1e-4, atol=1e-5)

def test_empty_prompt_is_an_error(tiny_vicuna):
    """The first token is read at a prompt's last one: an empty prompt has none (with n > 1 the
    cascade's softmax over no prompt keys would give NaN)."""
    model, _, _ = M.load_model(tiny_vicuna)
    for n in (1, 2):
        with pytest.raises(ValueError, match="empty prompt"):
            M.generate(model, [[], [1, 5, 6]], n=n, max_new_tokens=2)

def test_sample_next_in_blocks_equals_row_by_row():
    """Over 64 rows sample_next works in blocks on CPU: the same tokens as each row alone with
    its uniform, and the same draws from a generator."""
    torch.manual_seed(0)
    logits = torch.randn(150, 40) * 3
    u = torch.rand(150)
    for t, p, k in ((0.7, 1.0, 0), (1.0, 0.8, 0), (0.9, 0.9, 5)):
        whole = M.sample_next(logits, t, p, k, u=u)
        assert whole.tolist() == [int(M.sample_next(logits[i:i + 1], t, p, k, u=u[i:i + 1]))
                                  for i in range(150)]
        buf = torch.full((64, 40), float("nan"))  # generate's scratch: the same tokens
        assert torch.equal(M.sample_next(logits, t, p, k, u=u, buf=buf), whole)
        assert torch.equal(M.sample_next(logits[:9], t, p, k, u=u[:9], buf=buf), whole[:9])
    a = M.sample_next(logits, 0.7, 1.0, 0, torch.Generator().manual_seed(3))
    u = torch.rand(150, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, M.sample_next(logits, 0.7, 1.0, 0, u=u))

def test_sampling_never_draws_what_underflows():
    """At a low temperature nearly all of the vocabulary lies below exp's range: clamped at e^-80
    (x86's exp is 25x slower below -87), those tokens are still never drawn, nor what top-k cut,
    even at the extreme uniforms (u = 0 takes the last real token, u -> 1 the first)."""
    logits = torch.full((130, 1000), -50.0)
    logits[:, [3, 500, 700]] = torch.tensor([-0.05, 0.0, -0.1])
    u = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(128)])  # 1.0: CUDA's rand, at times
    for t in (0.1, 1.0):
        for k, real in ((0, {3, 500, 700}), (2, {3, 500})):
            tok = M.sample_next(logits, t, 1.0, k, u=u).tolist()
            assert set(tok) <= real and tok[:2] == [max(real), min(real)]
    tok = M.sample_next(logits, 1.0, 1.0, 0, u=u).tolist()  # all three drawn, by their mass
    assert set(tok) == {3, 500, 700}

def test_top_k_top_p_filter():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    g = torch.Generator().manual_seed(0)
    seen = {int(M.sample_next(logits, 1.0, 1.0, 2, g)) for _ in range(200)}
    assert seen == {0, 1}
    p = logits.softmax(-1)[0]  # top_p just above p0 keeps tokens 0 and 1 only
    seen = {int(M.sample_next(logits, 1.0, float(p[0]) + 0.01, 0, g)) for _ in range(200)}
    assert seen == {0, 1}


def test_generate_near_the_context_limit_n1():
    """Issue 16 bug 2: n == 1, eight short prompts and one whose budget is cut to the context limit.
    Finished rows kept decoding until compaction and the long row wrote past its cache row."""
    cfg = M.LlamaConfig(**(TINY | dict(max_position_embeddings=40)), vocab_size=100)
    torch.manual_seed(0)
    model = M.Llama(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    prompts = [[1, 2, 3, 4, 5]] * 8 + [list(range(1, 36))]
    out = M.generate(model, prompts, max_new_tokens=30, temperature=0)
    assert [len(o[0]["ids"]) for o in out] == [30] * 8 + [5]
    alone = M.generate(model, prompts[-1:], max_new_tokens=30, temperature=0)[0][0]
    assert out[-1][0] == alone

@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(temperature=-0.1), dict(n=0)])
def test_sampling_parameters_out_of_range(tiny_vicuna, bad):
    model, _, _ = M.load_model(tiny_vicuna)
    with pytest.raises(ValueError, match=list(bad)[0]):
        M.generate(model, [[1, 50, 60]], **({"max_new_tokens": 2} | bad))

def test_reward_head_in_fp32(tmp_path, sp_tokenizer):
    """A bf16 reward model still scores in fp32: rewards are not rounded to bf16's 1/64 steps."""
    path = make_checkpoint(tmp_path / "rm", sp_tokenizer, "vicuna", reward=True, std=0.3)
    rm, _, _ = M.load_model(path, dtype=torch.bfloat16)
    ids, cu = D.pack([list(range(3, 40)), list(range(50, 90))])
    r = rm(ids, cu_seqlens=cu)
    assert r.dtype == torch.float32 and not torch.equal(r, r.bfloat16().float())

def test_policy_given_as_reward_model_is_an_error(tiny_vicuna):
    """Issue 16 bug 4: a checkpoint without score.weight asked for as a reward model used to get a zero
    head (every reward 0.0); only RM training's start adds one, on purpose (new_head=True)."""
    with pytest.raises(SystemExit, match=f"{tiny_vicuna}: not a reward model"):
        M.load_model(tiny_vicuna, reward=True)
    rm, _, _ = M.load_model(tiny_vicuna, reward=True, new_head=True)
    assert rm.reward and (rm.score.weight == 0).all()

def test_gguf_conversion_runs_once_under_concurrency(tmp_path, monkeypatch):
    """Under torchrun every rank resolves the same .gguf: one converts, the others wait for it (a
    file lock), instead of each rewriting the same cache folder."""
    import threading, time
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setenv("XWIN_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(path, out):
        calls.append(out)
        time.sleep(0.3)  # long enough for the other callers to arrive while it converts
        os.makedirs(out)
        open(os.path.join(out, "config.json"), "w").write("{}")
    monkeypatch.setattr(M, "_convert", fake_convert)
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(M.resolve(str(gguf)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(outs)) == 1 and os.path.exists(os.path.join(outs[0], "config.json"))

def test_missing_weight_is_an_error(tmp_path, sp_tokenizer):
    """A reward model (no lm_head) where a policy goes, or a checkpoint missing a layer, stops with
    the folder named; only RM training's new score head starts at zero."""
    rm = make_checkpoint(tmp_path / "rm", sp_tokenizer, "vicuna", reward=True)
    with pytest.raises(SystemExit, match=r"rm: the checkpoint has no lm_head.weight"):
        M.load_model(rm, reward=False)
    from safetensors.torch import load_file, save_file
    pol = make_checkpoint(tmp_path / "pol", sp_tokenizer, "vicuna")
    sd = load_file(os.path.join(pol, "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, os.path.join(pol, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"has no model.layers.1.mlp.up_proj.weight"):
        M.load_model(pol)
