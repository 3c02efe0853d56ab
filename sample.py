"""
Sample n responses per prompt, optionally scored by a reward model.
Xwin-Set is --n 64 --reward-model RM; the response pairs that annotate.py judges are --n 2.

    python sample.py --model runs/sft --data prompts.jsonl --out xwin_set.jsonl --n 64 \\
        --reward-model runs/rm
    torchrun --nproc_per_node 8 -- sample.py --model runs/sft --data prompts.jsonl \\
        --out pairs.jsonl --n 2

(The `--` keeps torchrun from reading --n as an ambiguous abbreviation of its own flags.)

Our engine (model.generate) prefills each prompt once and its n samples share the prompt's keys
and values (cascade attention: each prompt's keys are read once per step, not n times); finished
samples leave the batch; a batch holds as many prompts as --batch-tokens allows. Under torchrun,
rank r samples prompts r::world into OUT.rank{r} and rank 0 merges the shards into OUT at the end.
The output is appended a batch at a time: a killed run, restarted, skips the ids already written
and loses only the batch in flight.

MT-bench: a question in FastChat's format ({"question_id", "category", "turns": [...]}) is answered
turn by turn, each turn from the conversation so far, the model's own earlier answers included, at
its category's temperature; the record is in FastChat's answer format too (question_id, model_id,
choices: [{index, turns}]), so FastChat's llm_judge reads it; annotate.py --mode single grades it.

Reproducibility: each prompt samples from its own generator, seeded from (--seed, its id). Its
responses therefore do not depend on which other prompts share its batch, on the number of ranks,
or on resumes, except through the floating-point rounding of batched matmuls, which can flip a
near-tie token now and then; for the same batch composition, dtype and machine they are exactly the
same.

dtype: bfloat16 by default on CUDA and on CPUs with native bf16 (avx512_bf16), where it samples
~1.6x faster than float32; its next-token distributions differ from float32's by a mean KL of
0.002 nats (SmolLM2-135M, temperature 0.7), as usual for bf16 inference. --dtype float32 for exact
parity.
"""
import dataclasses, datetime, glob, hashlib, json, os, time
from dataclasses import dataclass, field
import torch
import data as D
import model as M
import mtbench as MT

@dataclass
class Config:
    model: str = ""  # policy: HF folder, Hub id, or .gguf file (default: the bundled SmolLM2)
    data: list = field(default_factory=list)  # prompts: JSONL {id, messages}, or a dataset
    split: str = "train"  # dataset split, when --data is a dataset
    out: str = "samples.jsonl"  # output JSONL, appended; a rerun skips the ids already in it
    template: str = ""  # chat template override (vicuna, chatml), policy and reward model
    n: int = 64  # responses per prompt
    temperature: float = 0.7  # sampling temperature (0: greedy)
    top_p: float = 1.0  # nucleus sampling: keep the most likely tokens up to this mass (1: off)
    top_k: int = 0  # keep only the k most likely tokens (0: off)
    max_new_tokens: int = 512  # max tokens of a response
    stop: list = field(default_factory=list)  # stop strings: a response ends at the first
    unique: bool = False  # re-sample duplicate responses (Xwin-Set has 64 unique ones)
    unique_tries: int = 4  # rounds of re-sampling duplicates; records keep the count that remained
    reward_model: str = ""  # reward model folder: score every response (the full conversation)
    rm_batch_tokens: int = 16384  # tokens per reward-model forward (packed)
    rm_dtype: str = "float32"  # reward model: float32 (exact: transformers' fp32 scores) or
        # bfloat16 (3.5x faster scoring on an avx512_bf16 CPU core, more on GPUs; rewards within
        # ~1% of their std of fp32's; its head reads them in fp32 either way)
    batch_tokens: int = 65536  # KV-cache tokens per batch (see batches: padding counted)
    limit: int = 0  # only the first N prompts (0: all)
    seed: int = 1337  # base of the per-prompt seeds
    device: str = "auto"  # cpu, cuda, or auto
    dtype: str = "auto"  # float32 or bfloat16 (auto: bfloat16 on CUDA and on native-bf16 CPUs)
    engine: str = "ours"  # ours, or vllm (when installed: a GPU engine, one process; same records)
    quantize: str = ""  # int8: int8-weight policy and reward model (inference only); at batch
        # 1-16 rows faster; at n = 64 as fast as bf16 on CPU, holding the float weights while it
        # samples (compute-bound there: generate dequantizes once a call; not with --compile)
    compile: bool = False  # torch.compile the decode step (ours; needs a C++ compiler): samples
        # then hold their prompt's keys (no cascade); compiles once (minutes on a small CPU)
    category_temperature: str = ""  # MT-bench questions: CATEGORY=T,... over MT-bench's own
        # temperatures (writing, roleplay 0.7; stem, humanities 0.1; extraction, math, coding,
        # reasoning 0); other categories take --temperature; "off": --temperature for all
    model_id: str = ""  # the model's name in MT-bench and AlpacaEval outputs (default: folder's)
    alpaca_eval: str = ""  # also write each prompt's first response as AlpacaEval's model outputs
        # to this file: a JSON array of {instruction, output, generator, dataset}

# -------------------------------------------------------------------------------------------------
# Data: prompts checked up front, so a bad line stops the run before any model is loaded

def prompt_id(rec):
    """A prompt record (ours, a hub set's, an MT-bench question or AlpacaEval's) -> (it, its id)."""
    rec = D.alpaca_record(rec)  # AlpacaEval's evaluation set: messages and an id
    return rec, rec.get("id", rec.get("prompt_id", rec.get("question_id")))

def load_prompts(cfg):
    """-> (prompts [(where, id, messages)], {id: MT-bench question}); a question's messages are
    its first turn."""
    prompts, seen, questions = [], set(), {}
    for where, rec in D.read_records(cfg.data, cfg.split):
        rec, rid = prompt_id(rec)
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise D.DataError(f"{where}: a prompt needs an 'id' (string)")
        if str(rid) in seen:
            raise D.DataError(f"{where}: duplicate id {rid!r}")
        seen.add(str(rid))
        bare = "messages" not in rec and "conversations" not in rec  # hub sets with a bare prompt
        if bare and isinstance(rec.get("prompt"), str):
            rec = {"messages": [{"role": "user", "content": rec["prompt"]}]}
        if bare and "turns" in rec:
            questions[str(rid)] = check_question(rec, where)
            rec = {"messages": [{"role": "user", "content": rec["turns"][0]}]}
        prompts.append((where, str(rid), D.get_messages(rec, where, prompt=True)))
    if questions and len(questions) < len(prompts):
        raise D.DataError(f"{prompts[0][0]}: MT-bench questions mixed with other prompts")
    return (prompts[:cfg.limit] if cfg.limit else prompts), questions

def check_question(rec, where):
    turns = rec["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise D.DataError(f"{where}: 'turns' must list the question's turns (strings)")
    return rec

def seed_of(seed, rid):  # stable across runs and machines (Python's hash() is salted per process)
    digest = hashlib.sha256(f"{seed}:{rid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)

def rng_of(cfg, device, rid, round=0):
    """A prompt's randomness (round > 0: a round of re-sampling duplicates): a seed for vLLM, else
    a generator."""
    s = seed_of(cfg.seed, rid if round == 0 else f"{rid}/{round}")
    return s if cfg.engine == "vllm" else torch.Generator(device).manual_seed(s)

def batches(items, cfg, max_rows=1024):
    """Consecutive prompts while their KV cache fits --batch-tokens (one always), as generate
    allocates it: rows padded to the batch's longest prompt; a prompt's n samples share its keys
    (cascade attention: a prompt's row + n x max new tokens), or hold them each (n = 1, --compile:
    n x (prompt + max new)). At most max_rows samples (n at least): each step holds [rows, vocab]
    logits, which the budget does not count."""
    holders = 1 if M.shares_prompt(cfg.n, cfg.compile) else cfg.n  # rows holding a prompt
    cur, longest = [], 0
    for it in items:
        m = max(longest, len(it["ids"]))
        size = (len(cur) + 1) * (holders * m + cfg.n * cfg.max_new_tokens)
        if cur and (size > cfg.batch_tokens or (len(cur) + 1) * cfg.n > max_rows):
            yield cur
            cur, m = [], len(it["ids"])
        cur.append(it)
        longest = m
    if cur:
        yield cur

def merge(out):
    """Append the records of the shards OUT.rank* whose ids OUT lacks, then delete the shards
    (safe to redo after a kill; shards of any number of ranks)."""
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

# -------------------------------------------------------------------------------------------------
# Engines: prompts (token ids) -> per prompt, n responses {content, finish_reason, num_tokens}

def response(tok, ids, reason, stop):
    text = tok.decode(ids, skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0] if reason == "stop" else []
    content = text[:min(cuts)] if cuts else text
    return {"content": content, "finish_reason": reason, "num_tokens": len(ids)}

def sample_ours(model, tok, eos, cfg, prompts, n, gens, on_token=None):
    outs = M.generate(model, prompts, n=n, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, eos_ids=eos,
                      stop=cfg.stop, tokenizer=tok, generator=gens, on_token=on_token)
    return [[response(tok, o["ids"], o["finish_reason"], cfg.stop) for o in out] for out in outs]

def sample_vllm(llm, eos, cfg, prompts, n, seeds):
    from vllm import SamplingParams
    params = [SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                             top_k=cfg.top_k or -1, seed=s, max_tokens=cfg.max_new_tokens,
                             stop=cfg.stop or None, stop_token_ids=sorted(eos)) for s in seeds]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    def vllm_response(c):
        # vLLM says "stop" for EOS and stop strings alike; stop_reason holds the string (None or a
        # token id for EOS). Our engine does not count the EOS token, so neither do we here.
        reason = "length" if c.finish_reason == "length" else \
            "stop" if isinstance(c.stop_reason, str) else "eos"
        ends_in_eos = reason == "eos" and bool(c.token_ids) and c.token_ids[-1] in eos
        return {"content": c.text, "finish_reason": reason,
                "num_tokens": len(c.token_ids) - ends_in_eos}
    return [[vllm_response(c) for c in o.outputs] for o in outs]

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

@torch.no_grad()
def reward_scores(model, tok, template, conversations, batch_tokens=16384, max_len=None):
    """Reward-model scores of full conversations (each ending with the assistant response being
    judged), packed by token budget; the reward is read at each conversation's closing EOS, so a
    long one keeps its end (and its BOS). A reply cut at --max-new-tokens is closed too: train_rm.py
    learnt its rewards at closing EOS tokens (the judge saw a cut reply's text as the reply), and
    read at a cut reply's last token instead they were near chance (experiments/FINDINGS.md 9)."""
    model.eval()
    max_len = max_len or model.cfg.max_position_embeddings
    seqs = [D.keep_end(D.render(tok, c, template)[0], max_len) for c in conversations]
    out = torch.empty(len(seqs))
    budget = max(batch_tokens, max(map(len, seqs)))
    for b in D.make_batches([len(s) for s in seqs], budget, shuffle=False):
        ids, cu = D.pack([seqs[i] for i in b], model.device)
        out[b] = model(ids, cu_seqlens=cu).float().cpu()
    return out.tolist()

# -------------------------------------------------------------------------------------------------
# MT-bench (mtbench.py answers its two-turn questions) and AlpacaEval: names and output files

def model_name(cfg):
    return cfg.model_id or os.path.basename(os.path.normpath(cfg.model or M.default_model()))

def write_alpaca_eval(cfg):
    """--alpaca-eval FILE: OUT's first responses in AlpacaEval's shape, instructions and datasets
    from the input prompts (whole, so it lists a resumed run's earlier records too)."""
    answers = {r["id"]: r["responses"][0]["content"] for _, r in D.read_jsonl(cfg.out)}
    out = []
    for where, rec in D.read_records(cfg.data, cfg.split):
        rec, rid = prompt_id(rec)
        rid = str(rid)
        if rid in answers:
            text = rec.get("instruction") or D.get_messages(rec, where, prompt=True)[-1]["content"]
            extra = {"input": rec["input"]} if rec.get("input") else {}  # keeps the ids equal
            out.append({"instruction": text} | extra | {"output": answers[rid],
                       "generator": model_name(cfg), "dataset": rec.get("dataset", "")})
    with open(cfg.alpaca_eval + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=2)
    os.replace(cfg.alpaca_eval + ".tmp", cfg.alpaca_eval)
    print(f"{len(out)} outputs in AlpacaEval's format -> {cfg.alpaca_eval}")

# -------------------------------------------------------------------------------------------------

def load_engine(cfg, device, dtype):
    """-> (sample_fn(prompts, n, rngs), tokenizer, template, model config)."""
    path = cfg.model or M.default_model()
    if cfg.engine == "ours":
        model, tok, saved = M.load_model(path, device=device, dtype=dtype)
        mcfg = model.cfg
        if cfg.quantize:
            M.quantize_int8(model)
        if cfg.compile:
            M.compile_decode(model)
    else:
        from vllm import LLM
        from transformers import AutoTokenizer
        hf_path = M.resolve(path)
        tok = AutoTokenizer.from_pretrained(hf_path)
        hf_cfg = M.read_json(os.path.join(hf_path, "config.json"))
        saved = M.checkpoint_template(hf_path, tok)
        mcfg = M.LlamaConfig.from_hf(hf_cfg)
        llm = LLM(model=hf_path, dtype=str(dtype).removeprefix("torch."), seed=cfg.seed)
    template = D.get_template(saved, cfg.template)
    eos = D.stop_ids(tok, template, mcfg.eos_token_id)
    def sample_fn(prompts, n, rngs, temperature=None, on_token=None):
        c = cfg if temperature is None else dataclasses.replace(cfg, temperature=temperature)
        if cfg.engine == "ours":
            return sample_ours(model, tok, eos, c, prompts, n, rngs, on_token)
        return sample_vllm(llm, eos, c, prompts, n, rngs)
    return sample_fn, tok, template, mcfg

def run(argv=None):
    import torch.distributed as dist
    from tqdm import tqdm
    cfg = D.parse_config(Config, argv)
    if not cfg.data:
        raise SystemExit("error: --data is required "
                         "(prompts JSONL: {id, messages} ending with a user turn)")
    try:  # before any model is loaded
        M.check_sampling(cfg.n, cfg.temperature, cfg.top_p, cfg.top_k)
        MT.category_temperatures(cfg.category_temperature, cfg.temperature)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if cfg.rm_dtype not in M.DTYPES:
        raise SystemExit(f"error: --rm-dtype {cfg.rm_dtype!r}: float32 or bfloat16")
    if cfg.engine not in ("ours", "vllm"):
        raise SystemExit(f"error: --engine {cfg.engine!r}: ours or vllm")
    vllm_fast = cfg.engine == "vllm" and (cfg.quantize or cfg.compile)
    if cfg.quantize not in ("", "int8") or vllm_fast:
        raise SystemExit(f"error: --quantize {cfg.quantize!r} / --compile: int8 and --compile "
                         "with --engine ours")
    if cfg.compile and cfg.device != "cuda" and not M.compiler_available():
        raise SystemExit("error: --compile needs a C++ compiler (g++) for torch's CPU inductor")
    prompts, questions = load_prompts(cfg)
    if questions and (cfg.reward_model or cfg.unique):
        raise SystemExit("error: MT-bench questions take no --reward-model or --unique")
    # gloo just for barriers and the final sum, with room for ranks that finish hours apart
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device, dtype = M.pick_device(cfg.device, cfg.dtype, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
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

    if cfg.engine == "vllm" and world > 1:
        raise SystemExit("error: --engine vllm runs as one process (vLLM parallelizes itself)")
    sample_fn, tok, template, mcfg = load_engine(cfg, device, dtype)
    if cfg.reward_model:
        # fp32 by default whatever the policy's dtype: bf16 moves rewards (by 0.016 on average
        # for a std of 1.6 on the recipe's RM), enough to reorder close candidates among 64
        rm, rm_tok, rm_template = M.load_model(cfg.reward_model, device, M.DTYPES[cfg.rm_dtype],
                                               reward=True)
        if cfg.quantize:  # int8 weights, float score head
            M.quantize_int8(rm)
        rm_template = D.get_template(rm_template, cfg.template)
    items = []
    for where, rid, messages in todo:
        ids = D.render(tok, messages, template, prompt=True)[0]
        if len(ids) >= mcfg.max_position_embeddings:
            raise D.DataError(f"{where}: prompt of {len(ids)} tokens leaves no room to answer "
                              f"(max {mcfg.max_position_embeddings} positions)")
        items.append({"id": rid, "messages": messages, "ids": ids})
    keys = "n temperature top_p top_k max_new_tokens stop seed unique engine".split()
    sampling = {k: getattr(cfg, k) for k in keys} | {"dtype": str(dtype).replace("torch.", "")} | (
        {"reward_model": cfg.reward_model, "rm_dtype": cfg.rm_dtype,
         "reward_at": "closing EOS"} if cfg.reward_model else {})  # also for replies cut short

    # The bar counts tokens as they are generated (a batch can hold every prompt): its total is
    # the budget, n x --max-new-tokens a prompt, and a batch's unused budget is added as it ends.
    bar = tqdm(total=len(todo) * cfg.n * cfg.max_new_tokens, disable=rank != 0, unit="tok",
               dynamic_ncols=True, desc=f"sample (rank 0 of {world})" if world > 1 else "sample")
    t0, ntok, nprompts, live = time.time(), 0, 0, [0]

    def on_token(row, t):
        live[0] += 1
        bar.update(1)
        if bar.n % 256 == 0:
            bar.set_postfix_str(f"{live[0] / (time.time() - t0):.1f} tokens/s", refresh=False)
    for batch in batches(items, cfg):
        start = live[0]
        if questions:  # MT-bench: every turn of each question, in its own loop (bar: per batch)
            recs = MT.answer_questions(sample_fn, tok, template, mcfg, cfg, batch, questions,
                                       lambda key: rng_of(cfg, device, key),
                                       cfg.model or M.default_model(), model_name(cfg))
            recs = [r | {"sampling": sampling | r["sampling"]} for r in recs]
            results = []
        else:
            rngs = [rng_of(cfg, device, it["id"]) for it in batch]
            results, recs = sample_fn([it["ids"] for it in batch], cfg.n, rngs, None, on_token), []
        bar.update(len(batch) * cfg.n * cfg.max_new_tokens - (live[0] - start))
        for it, res in zip(batch, results):
            recs.append({"id": it["id"], "messages": it["messages"], "responses": res,
                         "model": cfg.model or M.default_model(), "sampling": sampling})
            if cfg.unique:
                def resample(k, round, it=it):
                    return sample_fn([it["ids"]], k, [rng_of(cfg, device, it["id"], round)])[0]
                tries = cfg.unique_tries if cfg.temperature > 0 else 0
                recs[-1]["duplicates"] = dedupe(res, resample, tries)
        flat = [x for r in recs for x in r["responses"]]
        flat += [t for r in recs for x in r["responses"] for t in x.get("turns", [])[:-1]]
        for x in flat:  # cut at --max-new-tokens (RS never picks it, DPO never as chosen)
            x["truncated"] = x["finish_reason"] == "length"
        if cfg.reward_model:  # every response of the batch in packed RM forwards
            convs = [r["messages"] + [{"role": "assistant", "content": x["content"]}]
                     for r in recs for x in r["responses"]]
            scores = reward_scores(rm, rm_tok, rm_template, convs, cfg.rm_batch_tokens)
            for x, score in zip(flat, scores, strict=True):
                x["reward"] = score
        D.append_jsonl(path, recs)
        ntok, nprompts = ntok + sum(x["num_tokens"] for x in flat), nprompts + len(batch)
        bar.set_postfix_str(f"{ntok / (time.time() - t0):.1f} tokens/s, "
                            f"{nprompts}/{len(todo)} prompts")
    bar.close()
    dt = time.time() - t0
    counts = torch.tensor([ntok, len(todo)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)  # also the barrier before the merge
    tokens, sampled = counts.tolist()
    if rank == 0:
        merge(cfg.out)
        if cfg.alpaca_eval:
            write_alpaca_eval(cfg)
        print(f"sampled {int(sampled)} prompts ({len(prompts) - int(sampled)} were done already), "
              f"{int(tokens)} tokens in {dt:.1f}s: {tokens / max(dt, 1e-9):.1f} tokens/s over "
              f"{world} rank(s); peak memory {M.peak_memory_gb(device):.2f} GB (rank 0) "
              f"-> {cfg.out}")
    if dist.is_initialized():  # a rank tearing gloo down while rank 0 still merges can abort it
        dist.barrier()
        dist.destroy_process_group()

if __name__ == "__main__":
    D.run_main(run)
