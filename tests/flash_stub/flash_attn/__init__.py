"""A stand-in for flash-attn on CPU, for tests: flash_attn_varlen_func checks the real kernel's contract
(what it would reject with a RuntimeError on a GPU) and computes the result with SDPA. model.py calls it
on CPU tensors because it says runs_on_cpu. With FLASH_STUB_LOG set, each call appends its dtype there,
so a test can tell the path was taken (or, in float32, that it was not)."""
import os
import torch
import torch.nn.functional as F

def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, **kw):
    dtypes = {q.dtype, k.dtype, v.dtype}
    if len(dtypes) != 1 or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"FlashAttention only support fp16 and bf16 data type, and q, k, v "
                           f"must have one dtype: got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3 or t.stride(-1) != 1:
            raise RuntimeError(f"{name} must be [total, heads, head_dim] with a contiguous last dim")
    if q.shape[-1] > 256 or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise RuntimeError(f"bad head dims: q {tuple(q.shape)}, k {tuple(k.shape)}")
    for cu, n, longest in ((cu_seqlens_q, q.shape[0], max_seqlen_q),
                           (cu_seqlens_k, k.shape[0], max_seqlen_k)):
        if cu.dtype != torch.int32 or cu.device != q.device:
            raise RuntimeError(f"cu_seqlens must be int32 on {q.device}, got {cu.dtype} on {cu.device}")
        if int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
            raise RuntimeError(f"cu_seqlens must run from 0 to {n}, ascending: {cu.tolist()}")
        if int((cu[1:] - cu[:-1]).max()) > longest:
            raise RuntimeError(f"max_seqlen {longest} is shorter than a segment")
    if os.environ.get("FLASH_STUB_LOG"):
        with open(os.environ["FLASH_STUB_LOG"], "a") as f:
            f.write(f"{q.dtype}\n")
    out, bounds = [], cu_seqlens_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=softmax_scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)

flash_attn_varlen_func.runs_on_cpu = True
