"""
Sample n responses per prompt, optionally scored by a reward model: Xwin-Set (--n 64 --reward-model RM),
or the response pairs that annotate.py judges (--n 2).

    python sample.py --model runs/sft --data prompts.jsonl --out xwin_set.jsonl --n 64 --reward-model runs/rm
    torchrun --nproc_per_node 8 -- sample.py --model runs/sft --data prompts.jsonl --out pairs.jsonl --n 2

(The `--` keeps torchrun from reading --n as an ambiguous abbreviation of its own flags.)

Our engine (model.generate) prefills each prompt once and its n samples share the prompt's keys and
values (cascade attention: each prompt's keys are read once per step, not n times); finished samples
leave the batch; a batch holds as many prompts as --batch-tokens allows. Under torchrun, rank r samples
prompts r::world into OUT.rank{r} and rank 0 merges the shards into OUT at the end. The output is
appended a batch at a time: a killed run, restarted, skips the ids already written and loses only the
batch in flight.

Reproducibility: each prompt samples from its own generator, seeded from (--seed, its id). Its responses
therefore do not depend on which other prompts share its batch, on the number of ranks, or on resumes,
except through the floating-point rounding of batched matmuls, which can flip a near-tie token now and
then; for the same batch composition, dtype and machine they are exactly the same.

dtype: bfloat16 by default on CUDA and on CPUs with native bf16 (avx512_bf16), where it samples ~1.6x
faster than float32; its next-token distributions differ from float32's by a mean KL of 0.002 nats
(SmolLM2-135M, temperature 0.7), as usual for bf16 inference. --dtype float32 for exact parity.
"""
import dataclasses, datetime, glob, hashlib, json, os, time
from dataclasses import dataclass
import torch
import data as D
import model as M

@dataclass
class Config:
    model: str = ""  # policy checkpoint: HF folder, Hub id, or .gguf file (default: the bundled SmolLM2)
    data: list = dataclasses.field(default_factory=list)  # prompts: JSONL ({id, messages} ending with a user turn), or a dataset name/folder
    split: str = "train"  # dataset split, when --data is a dataset
    out: str = "samples.jsonl"  # output JSONL, appended; a restarted run skips the ids already in it
    template: str = ""  # chat template override (vicuna, chatml), for the policy and the reward model
    n: int = 64  # responses per prompt
    temperature: float = 0.7  # sampling temperature (0: greedy)
    top_p: float = 1.0  # nucleus sampling: keep the most likely tokens up to this mass (1: off)
    top_k: int = 0  # keep only the k most likely tokens (0: off)
    max_new_tokens: int = 512  # max tokens of a response
    stop: list = dataclasses.field(default_factory=list)  # stop strings: a response ends at the first one (cut from its text)
    unique: bool = False  # re-sample exact duplicate responses (the paper's Xwin-Set has 64 unique ones)
    unique_tries: int = 4  # rounds of re-sampling duplicates; records keep the count that remained
    reward_model: str = ""  # reward model folder: score every response (the full conversation)
    rm_batch_tokens: int = 16384  # tokens per reward-model forward (packed)
    batch_tokens: int = 65536  # per generation batch: prompts x n x (prompt tokens + max new tokens) (bounds the KV cache)
    limit: int = 0  # only the first N prompts (0: all)
    seed: int = 1337  # base of the per-prompt seeds
    device: str = "auto"  # cpu, cuda, or auto
    dtype: str = "auto"  # float32 or bfloat16 (auto: bfloat16 on CUDA and on CPUs with native bf16, else float32)
    engine: str = "ours"  # ours, or vllm (when installed: a GPU engine, one process; same records)

# ----------------------------------------------------------------------------------------------------
# Data: prompts checked up front, so a bad line stops the run before any model is loaded

def load_prompts(cfg):
    prompts, seen = [], set()
    for where, rec in D.read_records(cfg.data, cfg.split):
        rid = rec.get("id", rec.get("prompt_id"))
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise D.DataError(f"{where}: a prompt needs an 'id' (string)")
        if str(rid) in seen:
            raise D.DataError(f"{where}: duplicate id {rid!r}")
        seen.add(str(rid))
        if "messages" not in rec and "conversations" not in rec and isinstance(rec.get("prompt"), str):
            rec = {"messages": [{"role": "user", "content": rec["prompt"]}]}  # hub sets with a bare prompt
        prompts.append((where, str(rid), D.get_messages(rec, where, prompt=True)))
    return prompts[:cfg.limit] if cfg.limit else prompts

def seed_of(seed, rid):  # stable across runs and machines (Python's hash() is salted per process)
    return int.from_bytes(hashlib.sha256(f"{seed}:{rid}".encode()).digest()[:8], "little") & (2**63 - 1)

def rng_of(cfg, device, rid, round=0):
    """A prompt's randomness (round > 0: a round of re-sampling duplicates): a seed for vLLM, else a generator."""
    s = seed_of(cfg.seed, rid if round == 0 else f"{rid}/{round}")
    return s if cfg.engine == "vllm" else torch.Generator(device).manual_seed(s)

def batches(items, cfg):
    """Consecutive prompts while n x (prompt + max new tokens) fits --batch-tokens (one always goes)."""
    cur, size = [], 0
    for it in items:
        cost = cfg.n * (len(it["ids"]) + cfg.max_new_tokens)
        if cur and size + cost > cfg.batch_tokens:
            yield cur
            cur, size = [], 0
        cur.append(it)
        size += cost
    if cur:
        yield cur

def merge(out):
    """Append the records of the shards OUT.rank* whose ids OUT lacks, then delete the shards (safe to
    redo after a kill; shards of any number of ranks)."""
    shards = sorted(glob.glob(glob.escape(out) + ".rank*"))
    done = D.truncate_torn(out)
    with open(out, "a", encoding="utf-8") as f:
        for s in shards:
            D.truncate_torn(s)  # drops a torn last line
            for line in open(s, encoding="utf-8"):
                rid = json.loads(line)["id"]
                if rid not in done:
                    f.write(line)
                    done.add(rid)
    for s in shards:
        os.remove(s)

# ----------------------------------------------------------------------------------------------------
# Engines: a list of prompts (token ids) -> per prompt, n responses {content, finish_reason, num_tokens}

def response(tok, ids, reason, stop):
    text = tok.decode(ids, skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0] if reason == "stop" else []
    return {"content": text[:min(cuts)] if cuts else text, "finish_reason": reason, "num_tokens": len(ids)}

def sample_ours(model, tok, eos, cfg, prompts, n, gens):
    outs = M.generate(model, prompts, n=n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      top_p=cfg.top_p, top_k=cfg.top_k, eos_ids=eos, stop=cfg.stop, tokenizer=tok, generator=gens)
    return [[response(tok, o["ids"], o["finish_reason"], cfg.stop) for o in out] for out in outs]

def sample_vllm(llm, eos, cfg, prompts, n, seeds):
    from vllm import SamplingParams
    params = [SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or -1, seed=s,
                             max_tokens=cfg.max_new_tokens, stop=cfg.stop or None, stop_token_ids=sorted(eos)) for s in seeds]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    # vLLM says "stop" for EOS and stop strings alike; stop_reason holds the string (None or a token id for EOS)
    reason = lambda c: "length" if c.finish_reason == "length" else "stop" if isinstance(c.stop_reason, str) else "eos"
    return [[{"content": c.text, "finish_reason": reason(c),
              "num_tokens": len(c.token_ids) - (reason(c) == "eos" and bool(c.token_ids) and c.token_ids[-1] in eos)}
             for c in o.outputs] for o in outs]

def dedupe(responses, resample, tries):
    """Re-sample exact duplicates in place, up to `tries` rounds. -> how many duplicates remain."""
    for round in range(1, tries + 1):
        seen, dups = set(), []
        for i, r in enumerate(responses):
            dups.append(i) if r["content"] in seen else seen.add(r["content"])
        if not dups:
            break
        for i, r in zip(dups, resample(len(dups), round)):
            responses[i] = r
    return len(responses) - len({r["content"] for r in responses})

# ----------------------------------------------------------------------------------------------------

def run(argv=None):
    import torch.distributed as dist
    from tqdm import tqdm
    cfg = D.parse_config(Config, argv)
    if not cfg.data:
        raise SystemExit("error: --data is required (prompts JSONL: {id, messages} ending with a user turn)")
    if cfg.engine not in ("ours", "vllm"):
        raise SystemExit(f"error: --engine {cfg.engine!r}: ours or vllm")
    prompts = load_prompts(cfg)
    if "RANK" in os.environ and not dist.is_initialized():  # gloo just for barriers, with room for ranks finishing hours apart
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    rank, world, device, dtype = T.setup_dist(cfg)
    if cfg.dtype == "auto" and device.type == "cpu" and M.native_bf16():
        dtype = torch.bfloat16  # native bf16 matmuls: about twice the fp32 speed for these shapes
    if rank == 0:
        print(json.dumps(dataclasses.asdict(cfg) | {"world": world, "dtype": str(dtype)}))
        merge(cfg.out)  # shards left by a killed torchrun: their records count as done
    if world > 1:
        dist.barrier()
    done = D.truncate_torn(cfg.out)
    todo = [p for i, p in enumerate(prompts) if i % world == rank and p[1] not in done]
    path = cfg.out if world == 1 else f"{cfg.out}.rank{rank}"

    model_path = cfg.model or M.default_model()
    if cfg.engine == "vllm":
        if world > 1:
            raise SystemExit("error: --engine vllm runs as one process (vLLM parallelizes itself)")
        from vllm import LLM
        from transformers import AutoTokenizer
        hf_path = M.resolve(model_path)
        tok = AutoTokenizer.from_pretrained(hf_path)
        template = M.get_template(tok, hf_path, cfg.template or None)
        llm = LLM(model=hf_path, dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype], seed=cfg.seed)
        mcfg = M.LlamaConfig.from_hf(json.load(open(os.path.join(hf_path, "config.json"))))
    else:
        model, tok, template = M.load_model(model_path, device=device, dtype=dtype)
        template = M.get_template(tok, "", cfg.template) if cfg.template else template
        mcfg = model.cfg
    eos_cfg, limit = mcfg.eos_token_id, mcfg.max_position_embeddings
    eos = {D.eos_id(tok, template)} | set(eos_cfg if isinstance(eos_cfg, list) else [eos_cfg]) - {None}
    if cfg.engine == "vllm":
        sample_fn = lambda ps, n, rngs: sample_vllm(llm, eos, cfg, ps, n, rngs)
    else:
        sample_fn = lambda ps, n, rngs: sample_ours(model, tok, eos, cfg, ps, n, rngs)
    if cfg.reward_model:
        rm, rm_tok, rm_template = M.load_model(cfg.reward_model, device=device, dtype=dtype, reward=True)
        rm_template = M.get_template(rm_tok, "", cfg.template) if cfg.template else rm_template
    items = []
    for where, rid, messages in todo:
        ids = D.render(tok, messages, template, prompt=True)[0]
        if len(ids) >= limit:
            raise D.DataError(f"{where}: prompt of {len(ids)} tokens leaves no room to answer (max {limit} positions)")
        items.append({"id": rid, "messages": messages, "ids": ids})
    sampling = {k: getattr(cfg, k) for k in ("n", "temperature", "top_p", "top_k", "max_new_tokens", "stop", "seed", "unique", "engine")}
    sampling["dtype"] = str(dtype).replace("torch.", "")

    bar = tqdm(total=len(todo), disable=rank != 0, desc=f"sample (rank 0 of {world})" if world > 1 else "sample",
               unit="prompt", dynamic_ncols=True)
    t0, ntok = time.time(), 0
    for batch in batches(items, cfg):
        results = sample_fn([it["ids"] for it in batch], cfg.n, [rng_of(cfg, device, it["id"]) for it in batch])
        recs = []
        for it, res in zip(batch, results):
            rec = {"id": it["id"], "messages": it["messages"], "responses": res, "model": cfg.model or model_path,
                   "sampling": sampling}
            if cfg.unique:
                resample = lambda k, round: sample_fn([it["ids"]], k, [rng_of(cfg, device, it["id"], round)])[0]
                rec["duplicates"] = dedupe(res, resample, cfg.unique_tries if cfg.temperature > 0 else 0)
            recs.append(rec)
        if cfg.reward_model:  # every response of the batch in packed RM forwards
            convs = [r["messages"] + [{"role": "assistant", "content": x["content"]}] for r in recs for x in r["responses"]]
            scores = iter(M.reward_scores(rm, rm_tok, rm_template, convs, batch_tokens=cfg.rm_batch_tokens))
            for r in recs:
                for x in r["responses"]:
                    x["reward"] = next(scores)
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        ntok += sum(x["num_tokens"] for r in recs for x in r["responses"])
        bar.update(len(batch))
        bar.set_postfix(tokens_per_s=f"{ntok / (time.time() - t0):.1f}")
    bar.close()
    dt = time.time() - t0
    tokens, sampled = T.all_sum([ntok, len(todo)], torch.device("cpu"))  # also the barrier before the merge
    if rank == 0:
        merge(cfg.out)
        print(f"sampled {int(sampled)} prompts ({len(prompts) - int(sampled)} were done already), {int(tokens)} tokens "
              f"in {dt:.1f}s: {tokens / max(dt, 1e-9):.1f} tokens/s over {world} rank(s); "
              f"peak memory {M.peak_memory_gb(device):.2f} GB (rank 0) -> {cfg.out}")
    T.barrier_and_destroy()  # a barrier, then destroy: a rank tearing gloo down while another still merges can abort

if __name__ == "__main__":
    D.run_main(run)
