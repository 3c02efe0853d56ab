"""
The training loop that sft.py, train_rm.py and dpo.py share: distributed setup (the same code for
`python x.py` and `torchrun`), FSDP2 wrapping, the lr schedule, `fit`, `evaluate`, resumable state
(torch.distributed.checkpoint), export as an HF folder, and AdamWLowMem. A stage gives `fit` its
micro-batches and a function that returns a micro-batch's summed loss; everything else is here.
"""
import contextlib, dataclasses, json, math, os, random, re, time, warnings
from collections import namedtuple
from dataclasses import dataclass, field
# With this set, PyTorch's CPU allocator backs every tensor of 2 MB or more with transparent huge
# pages (read at the first such allocation: this must come before any). Without it each step's
# activations come back from the kernel 4 KB at a time: a DPO step of SmolLM2-135M took ~1M page
# faults, 15% of its time in the kernel. No effect on CUDA tensors, nor where THP is off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch
import torch.distributed as dist
import data as D
import model as M

@dataclass
class TrainConfig:
    model: str = ""  # input checkpoint: HF folder, Hub id, or .gguf file
                     # (default: the bundled SmolLM2)
    data: list = field(default_factory=list)  # input JSONL file(s), or a dataset name/folder
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
    save_every: int = 0  # save resumable training state every N steps (and at the end)
    resume: bool = False  # continue from out/state
    log_every: int = 1  # log every N steps
    eval_every: int = 0  # eval every N steps (0: only at the end)
    seed: int = 1337  # data order and init
    device: str = "auto"  # cpu, cuda, or auto
    dtype: str = "auto"  # float32 or bfloat16 (auto: bfloat16 on CUDA, float32 on CPU)
    act_ckpt: bool = False  # activation checkpointing (recompute each block in backward)
    optim: str = "adamw"  # adamw (torch, fused), or adamw-lowmem (stepped in backward,
                          # bf16 moments: half the memory)
    peak_tflops: float = 0.0  # peak for MFU (0: the GPU's data sheet, or this CPU's measured
                              # matmul peak)
    keep_state: bool = False  # keep the resumable state of a finished run (it is also kept
                              # with --save-every)
    export_dtype: str = "float32"  # the exported weights' dtype: the fp32 masters, or bfloat16
                                   # (half the size; rounds away updates below bf16's precision)

# -------------------------------------------------------------------------------------------------
# Distributed: one launch path for `python x.py` and torchrun; only rank 0 prints and writes

Dist = namedtuple("Dist", "rank world device dtype")

def setup_dist(cfg):
    """Rank, world size, device and compute dtype, alike for `python x.py` and `torchrun x.py`."""
    device, dtype = M.pick_device(cfg.device, cfg.dtype, int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Dist(*rank_world(), device, dtype)

def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def print0(*args, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kw, flush=True)

def barrier_and_destroy():
    """The end of a distributed run: a barrier first, since a rank tearing the process group down
    while another still writes can abort it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

def all_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()

# -------------------------------------------------------------------------------------------------
# The model for training: fp32 master weights, FSDP2 under torchrun, bf16 compute by autocast

def prepare_model(cfg, reward=False):
    """Load cfg.model for training -> (model, tok, template, Dist): fp32 master weights; under
    torchrun FSDP2 (each block, then the root; bf16 compute with fp32 gradient reduction on CUDA),
    each rank reading only its shard of the checkpoint; a plain module otherwise."""
    d = setup_dist(cfg)
    if cfg.export_dtype not in M.DTYPES:  # checked now, not after the training
        raise SystemExit(f"error: --export-dtype {cfg.export_dtype}: float32 or bfloat16")
    torch.manual_seed(cfg.seed)
    model, tok, template, path = M.load_model(cfg.model or M.default_model(), reward=reward,
                                              meta=True, new_head=reward)
    template = D.get_template(template, cfg.template)
    if d.world > 1:
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
        cuda = d.device.type == "cuda"
        mp = MixedPrecisionPolicy(d.dtype, torch.float32) if cuda else MixedPrecisionPolicy()
        for block in model.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        model.to_empty(device=d.device)
        load_shards(model, path, d)
    else:
        sd = {k: v.float() for k, v in M.read_weights(model, path, lambda n, shape: slice(None))}
        model.load_state_dict(sd, assign=True)
        model.to(d.device)
    model.grad_ckpt = cfg.act_ckpt
    # autocast gives bf16 matmuls with fp32 master weights wherever FSDP's policy does not already
    fsdp_mp = d.world > 1 and d.device.type == "cuda"
    bf16 = d.dtype == torch.bfloat16 and not fsdp_mp
    model.autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16)
    return model, tok, template, d

@torch.no_grad()
def load_shards(model, path, d):
    """Fill an FSDP2 model's shards from the checkpoint: FSDP2 gives rank r rows [r*c, (r+1)*c)
    of dim 0 (c = ceil(rows / world)); each rank reads and upcasts those rows alone, a tensor at
    a time: host memory per rank is its fp32 shard plus one tensor, whatever the world size."""
    def rows(name, shape):
        c = -(-shape[0] // d.world)
        return slice(min(shape[0], d.rank * c), min(shape[0], (d.rank + 1) * c))
    params = dict(model.named_parameters())
    for name, shard in M.read_weights(model, path, rows):
        local = params[name].to_local()
        if local.shape != shard.shape:
            raise RuntimeError(f"{name}: FSDP shard {tuple(local.shape)} != rows read "
                               f"{tuple(shard.shape)}")
        local.copy_(shard)

def lr_at(cfg, step, total):
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

# -------------------------------------------------------------------------------------------------
# Saving: the exported HF folder, and the resumable state (sharded, each rank its own files)

def full_state_dict(model):
    """The whole model's weights on CPU (gathered from FSDP shards); every rank must call it."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)

def export(cfg, model, tok, template, extra=None, hint="chat with: python chat.py --model"):
    """The trained model as an HF folder at cfg.out, with its chat template, gathered from all
    ranks, written by rank 0; in fp32 by default: a short DPO run at lr 5e-7 moves a weight by
    less than half a bf16 step, and a bf16 export gave back the starting model bit for bit."""
    sd = full_state_dict(model)
    d = setup_dist(cfg)
    if d.rank == 0:
        eos = D.stop_ids(tok, template, model.cfg.eos_token_id)
        mcfg = dataclasses.replace(model.cfg, eos_token_id=eos[0] if len(eos) == 1 else eos)
        tok.chat_template = D.JINJA[template]
        sd = {k: v.to(M.DTYPES[cfg.export_dtype]) for k, v in sd.items()}
        M.save_checkpoint(cfg.out, sd, mcfg, tok, {"chat_template_name": template} | (extra or {}))
        print(f"saved {cfg.out} ({hint} {cfg.out})")
        state = os.path.join(cfg.out, "state")  # 2x the model's size in optimizer moments, which
        if os.path.exists(state) and not (cfg.keep_state or cfg.save_every):  # nobody resumes
            import shutil  # from a finished run: dropped once the export is on disk
            shutil.rmtree(state)

def save_state(path, model, opt, step):
    """Resumable state (model, optimizer, step, RNG) with torch.distributed.checkpoint: each rank
    writes its own shards, so nothing is gathered on rank 0. Written aside, then renamed."""
    import shutil, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    rank, world = rank_world()
    tmp = path + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    msd, osd = get_state_dict(model, opt)
    with single_process_quiet():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    torch.save({"cpu": torch.get_rng_state(), "py": random.getstate(), "cuda": cuda_rng},
               os.path.join(tmp, f"rng{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        json.dump({"step": step, "world": world}, open(os.path.join(tmp, "step.json"), "w"))
        if os.path.exists(path):  # moved aside, not deleted, until the new state is in place:
            shutil.rmtree(path + ".old", ignore_errors=True)  # a kill in between still leaves
            os.replace(path, path + ".old")  # one to resume from
        os.rename(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()

def load_state(path, model, opt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    saved = M.read_json(os.path.join(path, "step.json"))
    rank, world = rank_world()
    if saved.get("world", world) != world:  # each rank's micro-batches and RNG depend on it
        raise SystemExit(f"error: {path} was saved by {saved['world']} processes, this run has "
                         f"{world}: --resume needs the same world size (or start afresh "
                         "without it)")
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    with single_process_quiet():
        dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = torch.load(os.path.join(path, f"rng{rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["cpu"])
    random.setstate(rng["py"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return saved["step"]

@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every save and load without a process group that it assumes one process: true,
    and nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield

# -------------------------------------------------------------------------------------------------
# Optimizers: torch's fused AdamW, or AdamWLowMem (stepped inside backward, bf16 moments)

def bf16_stochastic(x, noise):
    """fp32 -> bf16 rounded up or down at random, in proportion to the distance: unbiased on
    average. noise: int32 uniform in [0, 2^16), shaped like x. Nearest rounding would lose Adam's
    v decay (x0.999 is below bf16's 2^-8 resolution) and every update smaller than that."""
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)

class AdamWLowMem(torch.optim.Optimizer):
    """AdamW in 8 bytes a parameter, not 16 (--optim adamw-lowmem), for memory-bound runs:
    - each parameter steps inside backward as soon as its gradient is complete, and the gradient
      is freed at once, so the whole set of gradients never exists (torchtune's optimizer in
      backward; FSDP2 runs the hook on the sharded parameter after its reduce-scatter);
    - the moments are stored in bf16 with stochastic rounding; the math is fp32, the weights
      stay fp32 (a 5e-7 DPO update is far below a bf16 weight's resolution).
    The price: no grad-norm clipping (the global norm, still logged, is known only once every
    parameter has stepped) and one micro-batch per step (a used gradient cannot accumulate)."""
    def __init__(self, params, lr, betas, eps, weight_decay, seed=0, chunk=1 << 20):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(list(params), defaults)
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
        for key in ("exp_avg", "exp_avg_sq"):  # Optimizer.load_state_dict casts state to the param
            st[key] = st[key].to(torch.bfloat16)  # dtype: undo (exact: the values are bf16)
        st["step"] += 1
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # FSDP2 shards: all alike
        w, m, v = (local(t).view(-1) for t in (p, st["exp_avg"], st["exp_avg_sq"]))
        g = local(p.grad).reshape(-1)
        (b1, b2), lr, k = group["betas"], group["lr"], int(st["step"])
        # Rounding noise: drawn per element it cost 20x the update itself; instead one buffer per
        # step, seeded by step (resume-exact), read by each chunk at a pseudo-random offset.
        if self.noise_step != k or self.noise.device != w.device:
            gen = torch.Generator(w.device).manual_seed(hash((self.seed, k)) % 2**62)
            self.noise = torch.randint(0, 1 << 16, (2, 2 * self.chunk), dtype=torch.int32,
                                       device=w.device, generator=gen)
            self.noise_step = k
        self.sq = self.sq + g.float().square().sum()  # a tensor: no device sync per parameter
        for a in range(0, w.numel(), self.chunk):  # fp32 temporaries a chunk at a time
            sl, n = slice(a, a + self.chunk), min(self.chunk, w.numel() - a)
            o = hash((i, a)) % self.chunk  # this chunk's offset into the noise buffer
            m32 = m[sl].float().lerp_(g[sl], 1 - b1)
            v32 = v[sl].float().mul_(b2).addcmul_(g[sl], g[sl], value=1 - b2)
            w[sl].mul_(1 - lr * group["weight_decay"])
            denom = (v32 / (1 - b2 ** k)).sqrt_().add_(group["eps"])
            w[sl].addcdiv_(m32, denom, value=-lr / (1 - b1 ** k))
            m[sl] = bf16_stochastic(m32, self.noise[0, o:o + n])
            v[sl] = bf16_stochastic(v32, self.noise[1, o:o + n])
        p.grad = None

    def step(self, closure=None):
        # Backward uses the gradients up; any left (a checkpoint's zero-grad state init) step here.
        late = [p for p in self.index if p.grad is not None]
        for p in late:
            self.step_param(p)
        return len(late)

    def clip_grad_norm(self, max_norm):
        """The global norm of the step's gradients (all ranks), then reset; no clipping is possible
        (every parameter has stepped already), so fit() refuses --grad-clip with this optimizer."""
        sq, self.sq = float(self.sq), 0.0
        return math.sqrt(all_sum([sq], self.param_groups[0]["params"][0].device)[0])

class AdamW(torch.optim.AdamW):
    """torch's AdamW (fused: on CPU too, ~6x faster than foreach) with FSDP2's clip_grad_norm."""
    def clip_grad_norm(self, max_norm):
        params = [p for g in self.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: DTensor

def make_optimizer(cfg, model, rank):
    kw = dict(lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    if cfg.optim == "adamw":
        return AdamW(model.parameters(), fused=True, **kw)
    if cfg.optim != "adamw-lowmem":
        raise SystemExit(f"error: --optim {cfg.optim}: expected adamw or adamw-lowmem")
    if cfg.grad_accum != 1 or cfg.grad_clip:
        raise SystemExit("error: --optim adamw-lowmem steps inside backward: "
                         "it needs --grad-accum 1 and --grad-clip 0")
    return AdamWLowMem(model.parameters(), seed=cfg.seed + 7919 * rank, **kw)

# -------------------------------------------------------------------------------------------------
# The loop

GPU_PEAK_TFLOPS = {  # dense bf16 tensor-core peaks from the vendor's data sheets; a name matches
    "H100 PCIe": 756, "H100 NVL": 835, "H200 NVL": 835, "H800 PCIe": 756,  # as whole words,
    "H100": 989, "H200": 989, "H800": 989,
    "GH200": 989, "B200": 2250, "A100": 312, "A800": 312, "L40S": 362, "L40": 181,  # the first
    "L4": 121, "RTX 4090": 165,  # wins: "H100 PCIe" before "H100", "L40" is not "L4" or "L40S"
}

def peak_tflops(cfg, device, dtype):
    """The peak MFU is taken against: --peak-tflops, else the GPU's data-sheet figure (None for a
    GPU not in the table: MFU is then logged as unknown, not as a wrong number), else on CPU the
    measured matmul throughput of this machine in the run's dtype (a 1 s probe, cached per CPU)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_TFLOPS.items()
                     if re.search(rf"(?<!\w){re.escape(k)}(?!\w)", name)), None)
    return cpu_matmul_tflops(dtype)

def cpu_matmul_tflops(dtype, n=1024, seconds=0.5):
    """The best rate of n x n matmuls in `dtype` with this process's threads over half a second:
    what a training step's matmuls could reach here. Each run measures; a cache per CPU model,
    thread count and dtype keeps the best ever seen, since a busy machine measures low."""
    lines = open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else []
    cpu = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), "cpu")
    key = f"{cpu}|{torch.get_num_threads()} threads|{dtype}"
    path = os.path.join(os.path.expanduser(os.environ.get("XWIN_CACHE", "~/.cache/xwin")),
                        "peaks.json")
    a, b = torch.ones(n, n, dtype=dtype), torch.ones(n, n, dtype=dtype)  # no RNG draw
    best, t_end = 0.0, time.time() + seconds
    while time.time() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e12)
    try:
        cache = M.read_json(path) if os.path.exists(path) else {}
        cache[key] = max(best, cache.get(key, 0.0))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        json.dump(cache, open(path + f".tmp{os.getpid()}", "w"), indent=1)
        os.replace(path + f".tmp{os.getpid()}", path)
    except (OSError, ValueError):  # a read-only home, a torn file: this run's figure will do
        cache = {key: best}
    return cache[key]

def release_heap():
    """Hand the step's freed activations back to the OS. glibc keeps freed blocks in its heap
    (and raises its mmap threshold as big blocks come and go): on CPU the RSS grew by ~1 GB over
    the first DPO steps of a 135M model while live tensors did not. No-op without malloc_trim."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass

@torch.no_grad()
def evaluate(model, batches, fn, d):
    """Sum fn(model, batch) -> {stat: sum} over batches split across ranks. Every rank runs the
    same number of forwards (FSDP's collectives need it): one short of batches repeats one,
    uncounted."""
    model.eval()
    acc = {}
    for j in range(math.ceil(len(batches) / d.world)):
        i = j * d.world + d.rank
        with model.autocast:
            stats = fn(model, batches[i % len(batches)])
        for k, v in stats.items():
            acc[k] = acc.get(k, 0.0) + (float(v) if i < len(batches) else 0.0)
    keys = sorted(acc)
    return dict(zip(keys, all_sum([acc[k] for k in keys], d.device)))

def log_record(acc, step, lr, gnorm, dt, flops_tok, peak, d):
    """One log line from the sums of a logging window, summed over ranks: losses and stats are per
    unit of the loss normalizer (target tokens, or pairs)."""
    keys = sorted(acc)
    sums = dict(zip(keys, all_sum([acc[k] for k in keys], d.device)))
    tok_s = sums["tokens"] / dt
    mfu = tok_s * flops_tok / (peak * 1e12 * d.world) if peak else None
    rec = {"step": step, "loss": sums.pop("loss") / sums["count"], "lr": lr, "grad_norm": gnorm,
           "tokens_per_s": tok_s, "mfu": mfu, "peak_mem_gb": M.peak_memory_gb(d.device)}
    return rec | {k: v / sums["count"] for k, v in sums.items() if k not in ("tokens", "count")}

def resume_log(cfg, log_path, start, rank):
    """Log records up to the resumed step (later ones are redone), rewritten with the config."""
    records = [json.loads(l) for l in open(log_path)] if start and os.path.exists(log_path) else []
    records = [r for r in records if r.get("step", 0) <= start]
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        json.dump(dataclasses.asdict(cfg), open(os.path.join(cfg.out, "train_config.json"), "w"),
                  indent=2)
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return records

def fit(cfg, model, plan, step_fn, eval_fn, d):
    """The training loop. plan: every micro-batch of the run in order (all epochs), each a dict
    with 'count' (its share of the loss normalizer: target tokens, or pairs) and 'tokens'. A step
    takes the next grad_accum * world micro-batches, rank r the r-th of each group, and divides
    the summed loss by the step's total count on all ranks: the same gradients for any split
    across ranks. step_fn(model, mb) -> (loss_sum, {stat: sum}). Returns the run's log records."""
    from tqdm import tqdm
    per_step = cfg.grad_accum * d.world
    total = len(plan) // per_step
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    if total == 0:
        raise D.DataError(f"{cfg.data}:0: {len(plan)} micro-batches is not enough for one step "
                          f"of {per_step}")
    opt = make_optimizer(cfg, model, d.rank)
    state_dir, log_path = os.path.join(cfg.out, "state"), os.path.join(cfg.out, "log.jsonl")
    start = 0
    saved = [s for s in (state_dir, state_dir + ".old")  # .old: killed mid-swap in save_state
             if os.path.exists(os.path.join(s, "step.json"))]
    if cfg.resume and saved:
        start = load_state(saved[0], model, opt)
    elif cfg.resume:
        print0(f"--resume: no state in {state_dir}, starting fresh")
    records = resume_log(cfg, log_path, start, d.rank)
    docs = sum(mb.get("docs", 1) for mb in plan[:per_step])
    seq = sum(mb["tokens"] for mb in plan[:per_step]) / max(1, docs)
    flops_tok, peak = model.cfg.flops_per_token(seq), peak_tflops(cfg, d.device, d.dtype)
    against = f"{peak:.3g} TFLOP/s" if peak else "an unknown peak (--peak-tflops)"
    where = f"measured matmul peak, {d.dtype}" if d.device.type == "cpu" else d.device
    print0(f"MFU against {against} per rank ({where})")
    bar = tqdm(range(start, total), initial=start, total=total, disable=d.rank != 0, desc="train",
               dynamic_ncols=True)
    t0, acc = time.time(), {}
    for step in bar:
        model.train()
        group = plan[step * per_step:(step + 1) * per_step]
        denom = sum(mb["count"] for mb in group)  # the step's target tokens (or pairs), all ranks
        lr = lr_at(cfg, step, total)  # set before backward: adamw-lowmem steps inside it
        for g in opt.param_groups:
            g["lr"] = lr
        for mb in group[d.rank::d.world]:  # this rank's micro-batches: forward, backward
            with model.autocast:
                loss_sum, stats = step_fn(model, mb)
            (loss_sum * d.world / denom).backward()  # FSDP averages over ranks: undo it
            for k, v in ({"loss": loss_sum.detach(), "tokens": mb["tokens"]} | stats).items():
                acc[k] = acc.get(k, 0.0) + float(v)
        acc["count"] = acc.get("count", 0.0) + denom / d.world
        gnorm = opt.clip_grad_norm(cfg.grad_clip)
        if opt.step() and step == start:  # adamw-lowmem: its hooks did not run (some wrapper?)
            print0("warning: --optim adamw-lowmem: gradients were left after backward "
                   "(stepped late, no memory saved)")
        opt.zero_grad(set_to_none=True)
        if d.device.type == "cpu":
            release_heap()
        last = step + 1 == total
        if (step + 1) % cfg.log_every == 0 or last:  # log: sums over the window and all ranks
            rec = log_record(acc, step + 1, lr, gnorm, time.time() - t0, flops_tok, peak, d)
            if eval_fn and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
                rec |= {f"eval_{k}": v for k, v in eval_fn(model).items()}
            records.append(rec)
            write_log(bar, log_path, rec, d.rank)
            t0, acc = time.time(), {}
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last:  # resumable state
            save_state(state_dir, model, opt, step + 1)  # (the last is dropped after the export)
    return records

def write_log(bar, log_path, rec, rank):
    if rank == 0:
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
        bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v or 'unknown'}"
                           for k, v in rec.items()))
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
