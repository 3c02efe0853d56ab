"""Inference-only speedups (model.py): int8 weights (the head: int8 activations too) and the
compiled decode step."""
import contextlib, json, os, subprocess, sys
import pytest
import torch
import torch.nn.functional as F
from conftest import M, T, TINY, make_checkpoint, run_script, write_jsonl

def tiny_model(seed=0, **over):
    cfg = M.LlamaConfig(**(TINY | over), vocab_size=300)
    torch.manual_seed(seed)
    model = M.Llama(cfg)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.1) if "norm" not in name else torch.nn.init.uniform_(p, 0.8, 1.2)
    return model.eval()

@pytest.mark.parametrize("rows,k", [(1, 64), (7, 64), (16, 64), (40, 64), (1, 72), (16, 50)])
def test_int8_linear_equals_dequantized_linear(rows, k):
    """Up to 16 rows run torch's int8 kernel with bf16 activations (within bf16 rounding of the
    dequantized fp32 product); more rows, or in_features not a multiple of 16 (the kernel's
    blocks: it returns garbage there), dequantize and multiply in fp32 (float rounding only).
    The weights themselves are within half a quantization step of the originals."""
    torch.manual_seed(0)
    w = torch.randn(96, k) * torch.rand(96, 1)  # rows of different scales
    lin = M.Int8Linear(w)
    assert lin.weight.dtype == torch.int8 and lin.weight.abs().max() == 127
    deq = lin.weight.float() * lin.scale.float()[:, None]
    assert ((deq - w).abs() <= 0.51 * lin.scale.float()[:, None]).all()
    x = torch.randn(rows, k)
    y, ref = lin(x), F.linear(x, deq)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    tol = 1e-2 if rows <= 16 and k % 16 == 0 else 1e-5  # relative to the largest output
    assert (y - ref).abs().max() <= tol * ref.abs().max()
    assert torch.equal(lin(x[None])[0], y)  # [B, T, in] as [B * T, in]

@pytest.mark.parametrize("rows,k", [(1, 64), (5, 64), (40, 72), (3, 50)])
def test_int8_activations_linear_equals_reference(rows, k):
    """acts=True (the LM head: int8 activations, per row, up to 16 rows): the int8 x int8 product
    equals the same arithmetic done in fp32 (x rounded to max |x| / 127 steps, then the dequantized
    weights) up to float rounding, with a row holding an outlier (its step 30 / 127). More rows
    take the dequantized weights with float activations."""
    torch.manual_seed(0)
    w = torch.randn(96, k) * torch.rand(96, 1)
    lin = M.Int8Linear(w, acts=True)
    deq = lin.weight.float() * lin.scale.float()[:, None]
    x = torch.randn(rows, k)
    x[0, 0] = 30.0  # an outlier: row 0's step is 30 / 127
    sx = x.abs().amax(-1, keepdim=True) / 127
    xq = (x / sx).round() * sx
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    ref = F.linear(xq if rows <= 16 else x, deq)  # many rows: the dequantized weights alone
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * y.abs().max())
    assert not torch.allclose(y, F.linear(x if rows <= 16 else xq, deq), rtol=1e-3, atol=1e-3 * y.abs().max())
    assert torch.equal(lin(x[None])[0], y)

def test_int8_model_logits_close_to_fp32():
    """An int8 tiny model (tied head: its own int8 copy, int8 activations; embedding float)
    against fp32: prefill (many rows: the dequantize path) and decode logits (one row: the int8
    kernel; the head int8 x int8 in decode, the float embedding in prefill's 60 rows) within 5% of the logit range, mean KL(fp32 || int8)
    < 2e-3 nats, and greedy decoding starts the same."""
    ref = tiny_model(tie_word_embeddings=True)
    q = M.quantize_int8(tiny_model(tie_word_embeddings=True))
    assert [n for n, m in q.named_modules() if getattr(m, "acts", False)] == ["lm_head"]
    assert isinstance(q.lm_head, M.Int8Linear) and q.model.embed_tokens.weight.dtype == torch.float32
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    ids = torch.randint(3, 300, (2, 30))
    with torch.no_grad():
        a, b = ref(ids), q(ids)
        kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
        print(f"prefill: max |diff| {(a - b).abs().max():.4f} of range {a.abs().max():.2f}, KL {kl:.2e}")
        assert (a - b).abs().max() <= 0.05 * a.abs().max() and kl < 2e-3
        caches = [M.KVCache(m.cfg, 1, 40, "cpu", torch.float32) for m in (ref, q)]
        for m, c in zip((ref, q), caches):
            m(ids[:1], cache=c)
        a, b = (m(torch.tensor([[5]]), cache=c) for m, c in zip((ref, q), caches))
        assert (a - b).abs().max() <= 0.05 * a.abs().max()
    prompt = ids[0, :10].tolist()
    greedy = [M.generate(m, [prompt], max_new_tokens=4, temperature=0)[0][0]["ids"] for m in (ref, q)]
    assert greedy[0][:2] == greedy[1][:2]

def test_quantized_model_refuses_training(tmp_path, sp_tokenizer):
    """Int8 is for inference: model.train() (what training.fit calls) refuses a quantized model,
    it is not saved, and a checkpoint holding int8 weights is refused by the training stages'
    loader (cast to float it would load as garbage) and by load_model."""
    q = M.quantize_int8(tiny_model())
    with pytest.raises(RuntimeError, match="int8-quantized"):
        q.train()
    q.eval()  # eval mode stays allowed
    with pytest.raises(ValueError, match="int8-quantized model is not saved"):
        M.save_checkpoint(str(tmp_path / "q"), q.state_dict(), q.cfg, sp_tokenizer)
    path = make_checkpoint(tmp_path / "ckpt", sp_tokenizer, "vicuna")
    from safetensors.torch import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(SystemExit, match="up_proj.weight is stored as 8-bit integers"):
        T.prepare_model(T.TrainConfig(model=path, device="cpu", dtype="float32"))
    with pytest.raises(SystemExit, match="8-bit integers"):
        M.load_model(path)

def test_joined_projections_are_the_separate_ones():
    """quantize_int8 joins q/k/v and gate/up into one matmul each: per-row scales, so the weights,
    scales and outputs are those of separately quantized projections."""
    model = tiny_model(num_key_value_heads=1)
    a, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    parts = [M.Int8Linear(getattr(m, n).weight) for m, n in ((a, "q_proj"), (a, "k_proj"),
                                                             (a, "v_proj"), (mlp, "gate_proj"))]
    M.quantize_int8(model)
    assert not hasattr(a, "q_proj") and not hasattr(mlp, "up_proj")
    assert torch.equal(a.qkv_proj.weight, torch.cat([p.weight for p in parts[:3]]))
    assert torch.equal(a.qkv_proj.scale, torch.cat([p.scale for p in parts[:3]]))
    x = torch.randn(3, 5, model.cfg.hidden_size)
    assert torch.equal(mlp.gate_up_proj(x).chunk(2, -1)[0], parts[3](x))

@pytest.mark.parametrize("tied", [False, True])
def test_float_weights_while_decoding_many_rows(monkeypatch, tied):
    """generate on CPU with more than 16 rows gives the int8 layers their float weights (q * scale)
    for the call, and drops them when it returns or raises: many rows then take a plain float
    matmul (the same product up to float rounding), an untied head too, few rows the int8 kernels
    still. Greedy tokens are those of the per-step dequantization; a tied head keeps no copy (it
    has the float embedding)."""
    q = M.quantize_int8(tiny_model(tie_word_embeddings=tied))
    lin = q.model.layers[0].mlp.down_proj
    x = torch.randn(40, lin.weight.shape[1])
    few, many = lin(x[:3]), lin(x)
    with M.float_weights(q):
        assert torch.equal(lin.dense, lin.weight.float() * lin.scale.float()[:, None])
        assert (q.lm_head.dense is None) == tied
        assert torch.equal(lin(x[:3]), few) and not torch.equal(lin(x), many)
        assert (lin(x) - many).abs().max() <= 1e-5 * many.abs().max()
        h = torch.randn(20, q.cfg.hidden_size)
        head = q.model.embed_tokens.weight if tied else q.lm_head.dense
        assert torch.equal(q.logits(h), F.linear(h, head))
    assert all(m.dense is None for m in q.modules() if isinstance(m, M.Int8Linear))
    prompts = [[5, 6, 7], [9, 10]]
    seen = []
    spy = lambda rows, logits: seen.append(lin.dense is not None)
    outs = {}
    for on in (True, False):
        if not on:
            monkeypatch.setattr(M, "float_weights", lambda model, on: contextlib.nullcontext())
        outs[on] = M.generate(q, prompts, n=9, max_new_tokens=6, temperature=0, on_logits=spy)
    assert outs[True] == outs[False] and seen == [True] * 6 + [False] * 6  # a call: 6 steps
    monkeypatch.undo()
    seen.clear()
    M.generate(q, prompts, n=8, max_new_tokens=2, temperature=0, on_logits=spy)  # 16 rows
    assert seen and not any(seen)

    def boom(rows, logits):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        M.generate(q, prompts, n=9, max_new_tokens=6, temperature=0, on_logits=boom)
    assert lin.dense is None  # dropped by a call that raised too

@pytest.mark.skipif(not M.compiler_available(), reason="torch.compile on CPU needs a C++ compiler (g++)")
@pytest.mark.parametrize("quantize", ["", "int8"])
def test_compiled_decode_equals_eager(monkeypatch, tmp_path, quantize):
    """One compile (rows and cache length symbolic): greedy tokens of two prompts of different
    lengths in one batch, then two samples of one prompt (the same batch size: no recompile; eager
    shares the prompt through cascade attention, compiled rows hold it each) equal eager's. int8:
    compiled, the head keeps its activations in float (inductor's weight-only kernel is faster
    there than int8 x int8), so eager runs with that head too."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = tiny_model()
    if quantize:
        M.quantize_int8(model).lm_head.acts = False
    prompts = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14]]

    def run():
        greedy = M.generate(model, prompts, max_new_tokens=12, temperature=0)
        gens, steps = [torch.Generator().manual_seed(7)], []
        sampled = M.generate(model, prompts[:1], n=2, max_new_tokens=12, generator=gens,
                             on_logits=lambda rows, logits: steps.append(logits.clone()))
        return greedy, [o["ids"] for o in sampled[0]], steps
    eager = run()
    torch._dynamo.reset()
    try:
        M.compile_decode(model)
        greedy, sampled, steps = run()
        assert greedy == eager[0]
        if not quantize:
            assert sampled == eager[1]
        else:  # compiled int8 computes in bf16: a draw near a token boundary may go the other way
            # (it did once in 24), so up to the first such token each step's logits must agree
            first = min([i for a, b in zip(sampled, eager[1]) for i in range(12) if a[i] != b[i]]
                        + [11])
            for a, b in zip(steps[:first + 1], eager[2]):
                assert (a - b).abs().max() <= 0.05 * b.abs().max()  # broken: 0.12 and up
    finally:
        del model.compiled_step
        torch._dynamo.reset()

@pytest.mark.skipif(not M.compiler_available(), reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_step_keeps_its_own_weights(monkeypatch, tmp_path):
    """The compiled step has its model's weights frozen in, and dynamo keeps compiled code per
    function: a second model compiled in the process (same shapes) gets its own weights, not the
    first's, and the first returns to eager; a new process with the same shapes and other weights
    (the on-disk cache) gets its own too."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    @torch.no_grad()
    def decode(model, compiled):
        cache = M.KVCache(model.cfg, 1, 16, "cpu", torch.float32)
        model(torch.tensor([[1, 5, 6]]), cache=cache)
        tok = torch.tensor([[7]])
        return model.decode(tok, cache) if compiled else model(tok, cache=cache)
    try:
        # int8 (head weight-only, as compiled): inductor's int8 kernels repack the weights
        a, b = (M.quantize_int8(tiny_model(seed=s)) for s in (0, 1))
        for m in (a, b):
            m.lm_head.acts = False
            M.compile_decode(m)
            assert torch.allclose(decode(m, True), decode(m, False), atol=0.05)
        assert not hasattr(a, "compiled_step")
        assert not torch.allclose(decode(a, False), decode(b, False), atol=0.5)
        # a new process, the same cache dir (inherited), same shapes, other weights
        script = tmp_path / "other.py"
        script.write_text(
            "import sys, torch\n"
            f"sys.path[:0] = [{os.path.dirname(__file__)!r}]\n"
            "from test_quant import M, tiny_model\n"
            "m = M.quantize_int8(tiny_model(seed=2))\n"
            "m.lm_head.acts = False\n"
            "with torch.no_grad():\n"
            "    out = []\n"
            "    for compiled in (False, True):\n"
            "        if compiled:\n"
            "            M.compile_decode(m)\n"
            "        c = M.KVCache(m.cfg, 1, 16, 'cpu', torch.float32)\n"
            "        m(torch.tensor([[1, 5, 6]]), cache=c)\n"
            "        t = torch.tensor([[7]])\n"
            "        out.append(m.decode(t, c) if compiled else m(t, cache=c))\n"
            "print((out[0] - out[1]).abs().max().item())\n")
        p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(__file__)))
        assert p.returncode == 0, p.stderr[-2000:]
        assert float(p.stdout.split()[-1]) < 0.05
    finally:
        torch._dynamo.reset()

def test_command_lines_quantize_and_progress(tmp_path, tiny_chatml, tiny_vicuna, sp_tokenizer):
    """chat.py --quantize int8 --verbose answers and prints its start-up time; sample.py --quantize
    int8 (policy and reward model) writes scored records, and its bar counts tokens (2 prompts x
    n 2 x 8 tokens = 32), not prompts; a wrong --quantize stops before any model is loaded."""
    p = run_script("chat.py", "--model", tiny_chatml, "--prompt", "hello", "--quantize", "int8",
                   "--verbose", "--temperature", "0", "--max-new-tokens", "6")
    assert "start-up" in p.stderr and "quantize" in p.stderr and p.stdout.strip()
    rm = make_checkpoint(tmp_path / "rm", sp_tokenizer, "vicuna", reward=True)
    data = write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "messages": [{"role": "user", "content": f"count to {i}"}]}
                                              for i in range(2)])
    out = tmp_path / "s.jsonl"
    p = run_script("sample.py", "--model", tiny_vicuna, "--data", data, "--n", "2", "--max-new-tokens", "8",
                   "--reward-model", rm, "--quantize", "int8", "--out", str(out))
    assert "32/32" in p.stderr and "tokens/s" in p.stderr
    recs = [json.loads(line) for line in open(out)]
    assert len(recs) == 2 and all(isinstance(r["reward"], float) for x in recs for r in x["responses"])
    p = run_script("chat.py", "--model", tiny_chatml, "--prompt", "hi", "--quantize", "int4", check=False)
    assert p.returncode != 0 and "--quantize int4" in p.stderr
