import json, os
import pytest
import torch
import transformers
from conftest import D, M, T, make_checkpoint, run_script, write_jsonl
import sample

TURNS = ["tell me about the quick brown fox", "yes the fox", "what city is the capital of france",
         "paris is the capital of france", "one two three four five"]

@pytest.fixture(autouse=True)
def one_thread():  # tiny matmuls: a second OpenMP thread only adds sync costs (large ones on a busy machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def prompts(k=3):  # prompts of different lengths, some multi-turn, the last with its own system message
    recs = []
    for i in range(k):
        msgs = [{"role": ("user", "assistant")[j % 2], "content": TURNS[(i + j) % len(TURNS)]} for j in range(1 + 2 * (i % 3))]
        if i % 4 == 3:
            msgs = [{"role": "system", "content": "be brief"}] + msgs
        recs.append({"id": f"p{i}", "messages": msgs})
    return recs

def read(path):
    return [json.loads(line) for line in open(path)]

def sample_run(model, data, out, *flags):
    sample.run(["--model", model, "--data", data, "--out", str(out), "--device", "cpu", "--dtype", "float32", *map(str, flags)])
    return read(out)

def test_greedy_matches_transformers(tmp_path, tiny_vicuna):
    data = write_jsonl(tmp_path / "p.jsonl", prompts(4))
    recs = sample_run(tiny_vicuna, data, tmp_path / "o.jsonl", "--n", 2, "--temperature", 0, "--max-new-tokens", 12)
    _, tok, template = M.load_model(tiny_vicuna)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_vicuna, dtype=torch.float32).eval()
    assert [r["id"] for r in recs] == ["p0", "p1", "p2", "p3"]
    lengths = set()
    for rec in recs:
        ids = D.render(tok, rec["messages"], template, prompt=True)[0]
        lengths.add(len(ids))
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=0)[0, len(ids):].tolist()
        if tok.eos_token_id in ref:
            ref = ref[:ref.index(tok.eos_token_id)]
        for r in rec["responses"]:
            assert r["content"] == tok.decode(ref, skip_special_tokens=True) and r["num_tokens"] == len(ref)
        assert rec["sampling"]["n"] == 2 and len(rec["responses"]) == 2
    assert len(lengths) == 4  # one batch of prompts of different lengths

def reference_sample(model, prompt, u, temperature, top_k, top_p, eos):
    """One sample on its own: a full forward per token (no cache), sort-based top-k/top-p in float64 and
    inverse-CDF sampling with the given uniform draws (x = 1 - u of the mass, as sample_next)."""
    ids = list(prompt)
    for x in u:
        logits = model(torch.tensor([ids]))[-1].double() / temperature
        top, idx = logits.sort(descending=True)
        probs = top.softmax(-1)
        probs[top_k:] = 0
        probs /= probs.sum()
        probs[(probs.cumsum(-1) - probs) >= top_p] = 0
        probs = torch.zeros_like(probs).scatter(0, idx, probs)  # back to vocabulary order, as generate samples
        t = int(torch.searchsorted(probs.cumsum(-1), (1 - float(x)) * probs.sum(), right=True))
        if t in eos:
            break
        ids.append(t)
    return ids[len(prompt):]

def test_prefix_shared_sampling_equals_independent(tiny_vicuna):
    model, _, _ = M.load_model(tiny_vicuna)
    prompts_ = [[1, 50, 60, 70], [1, 90, 100, 110, 120, 130, 140]]
    n, steps, temperature, top_k, top_p = 8, 6, 1.0, 6, 0.8
    with torch.no_grad():
        eos = list(range(3, model.cfg.vocab_size, 6))  # many, so samples end at different steps (compaction runs)
        outs = M.generate(model, prompts_, n=n, max_new_tokens=steps, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_ids=eos, generator=[torch.Generator().manual_seed(s) for s in (11, 12)])
        reasons = set()
        for p, seed, out in zip(prompts_, (11, 12), outs):
            g = torch.Generator().manual_seed(seed)  # generate draws n uniforms per prompt per step
            u = torch.stack([torch.rand(n, generator=g) for _ in range(steps)])
            for s in range(n):
                assert out[s]["ids"] == reference_sample(model, p, u[:, s], temperature, top_k, top_p, eos)
                reasons.add(out[s]["finish_reason"])
        assert reasons == {"eos", "length"}
        # and the first token's frequencies match the softmax (chi-square, loose bound)
        N, T = 4000, 0.5
        first = M.generate(model, [prompts_[1]], n=N, max_new_tokens=1, temperature=T, generator=torch.Generator().manual_seed(0))[0]
        probs = (model(torch.tensor([prompts_[1]]))[-1].double() / T).softmax(-1)
    counts = torch.bincount(torch.tensor([o["ids"][0] for o in first]), minlength=len(probs)).double()
    expected = probs * N
    big = expected >= 5
    assert big.sum() >= 10 and counts[~big].sum() <= 3 * expected[~big].sum() + 10
    chi2 = float(((counts[big] - expected[big]) ** 2 / expected[big]).sum())
    df = int(big.sum()) - 1
    assert chi2 < df + 6 * (2 * df) ** 0.5, (chi2, df)

def test_rewards_equal_one_by_one(tmp_path, tiny_vicuna, sp_tokenizer):
    rm_path = make_checkpoint(tmp_path / "rm", sp_tokenizer, "vicuna", seed=3, reward=True)
    data = write_jsonl(tmp_path / "p.jsonl", prompts(3))
    recs = sample_run(tiny_vicuna, data, tmp_path / "o.jsonl", "--n", 3, "--max-new-tokens", 6, "--reward-model", rm_path,
                      "--temperature", 1.0)
    rm, tok, template = M.load_model(rm_path)
    rewards = []
    for rec in recs:
        for r in rec["responses"]:
            conv = rec["messages"] + [{"role": "assistant", "content": r["content"]}]
            one = sample.reward_scores(rm, tok, template, [conv])[0]
            assert abs(r["reward"] - one) <= 1e-5
            rewards.append(r["reward"])
    assert len(rewards) == 9 and len(set(rewards)) > 1
    # --rm-dtype bfloat16: the same responses (policy in fp32), rewards close to fp32's, not tied
    bf = sample_run(tiny_vicuna, data, tmp_path / "b.jsonl", "--n", 3, "--max-new-tokens", 6, "--reward-model", rm_path,
                    "--temperature", 1.0, "--rm-dtype", "bfloat16")
    pairs = [(a["reward"], b["reward"]) for x, y in zip(recs, bf) for a, b in zip(x["responses"], y["responses"])
             if a["content"] == b["content"]]
    spread = max(rewards) - min(rewards)
    assert len(pairs) == 9 and all(abs(a - b) <= 0.05 * spread + 1e-3 for a, b in pairs)
    assert any(a != b for a, b in pairs)  # scored in bf16 indeed, the head's output not bf16-rounded:
    assert any(float(torch.tensor(b).bfloat16()) != b for _, b in pairs)
    assert all(r["sampling"]["rm_dtype"] == "bfloat16" for r in bf)
    assert len({b for _, b in pairs}) == len({a for a, _ in pairs})
    p = run_script("sample.py", "--model", tiny_vicuna, "--data", data, "--reward-model", rm_path, "--rm-dtype", "fp16",
                   "--out", str(tmp_path / "x.jsonl"), check=False)
    assert p.returncode != 0 and "--rm-dtype 'fp16'" in p.stderr

def test_torchrun_covers_every_prompt_once(tmp_path, tiny_vicuna):
    data = write_jsonl(tmp_path / "p.jsonl", prompts(5))
    args = ["--model", tiny_vicuna, "--data", data, "--n", "2", "--max-new-tokens", "5", "--dtype", "float32"]
    # `--` ends torchrun's own flags: its argparse would otherwise read our --n as an ambiguous prefix of --nnodes
    run_script("--", "sample.py", *args, "--out", str(tmp_path / "o2.jsonl"), nproc=2)
    two = read(tmp_path / "o2.jsonl")
    assert sorted(r["id"] for r in two) == ["p0", "p1", "p2", "p3", "p4"]
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]  # shards merged and removed
    # per-prompt seeds: the same responses as one process that batched the prompts differently
    one = {r["id"]: r["responses"] for r in sample_run(tiny_vicuna, data, tmp_path / "o1.jsonl", "--n", 2, "--max-new-tokens", 5)}
    assert all(r["responses"] == one[r["id"]] for r in two)

def test_kill_and_resume(tmp_path, tiny_vicuna):
    data = write_jsonl(tmp_path / "p.jsonl", prompts(5))
    flags = ["--n", 2, "--max-new-tokens", 5, "--batch-tokens", 1]  # one prompt per batch
    ref = sample_run(tiny_vicuna, data, tmp_path / "ref.jsonl", *flags)
    out = tmp_path / "o.jsonl"
    kept = dict(ref[1], responses=[{"content": "KEPT", "finish_reason": "length", "num_tokens": 1}])
    lines = [json.dumps(r) + "\n" for r in (ref[0], kept, ref[2])]
    out.write_text(lines[0] + lines[1] + lines[2][:40])  # a kill tore the third record
    (tmp_path / "o.jsonl.rank1").write_text(json.dumps(ref[3]) + "\n" + json.dumps(ref[4])[:30])  # and a torchrun shard
    recs = sample_run(tiny_vicuna, data, out, *flags)
    assert sorted(r["id"] for r in recs) == ["p0", "p1", "p2", "p3", "p4"]  # each once
    by_id = {r["id"]: r for r in recs}
    assert by_id["p1"]["responses"][0]["content"] == "KEPT"  # done records are not redone
    assert all(by_id[r["id"]] == r for r in ref if r["id"] != "p1")
    assert not os.path.exists(tmp_path / "o.jsonl.rank1")

def test_finish_reasons(tmp_path, sp_tokenizer):
    path = make_checkpoint(tmp_path / "m", sp_tokenizer, "vicuna")
    data = write_jsonl(tmp_path / "p.jsonl", prompts(1))
    greedy = ["--n", 1, "--temperature", 0, "--max-new-tokens", 8]
    r = sample_run(path, data, tmp_path / "a.jsonl", *greedy)[0]["responses"][0]
    assert r["finish_reason"] == "length" and r["num_tokens"] == 8
    model, tok, template = M.load_model(path)
    ids = D.render(tok, prompts(1)[0]["messages"], template, prompt=True)[0]
    out = M.generate(model, [ids], max_new_tokens=8, temperature=0)[0][0]["ids"]
    assert tok.decode(out, skip_special_tokens=True) == r["content"]
    j = next((j for j in range(1, 8) if out[j] not in out[:j]), 0)
    cfg = json.load(open(tmp_path / "m" / "config.json"))  # a second EOS id, as Llama-3 style configs list
    json.dump(cfg | {"eos_token_id": [cfg["eos_token_id"], out[j]]}, open(tmp_path / "m" / "config.json", "w"))
    r = sample_run(path, data, tmp_path / "b.jsonl", *greedy)[0]["responses"][0]
    assert r["finish_reason"] == "eos" and r["num_tokens"] == j and r["content"] == tok.decode(out[:j], skip_special_tokens=True)
    json.dump(cfg, open(tmp_path / "m" / "config.json", "w"))
    text = tok.decode(out, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    r = sample_run(path, data, tmp_path / "c.jsonl", *greedy, "--stop", stop)[0]["responses"][0]
    assert r["finish_reason"] == "stop" and r["content"] == text[:text.index(stop)] and r["num_tokens"] < 8

def test_unique_resamples_duplicates(tmp_path, tiny_vicuna):
    data = write_jsonl(tmp_path / "p.jsonl", prompts(2))
    for rec in sample_run(tiny_vicuna, data, tmp_path / "g.jsonl", "--n", 3, "--temperature", 0, "--max-new-tokens", 3, "--unique"):
        assert rec["duplicates"] == 2  # greedy: nothing to re-sample
    recs = sample_run(tiny_vicuna, data, tmp_path / "s.jsonl", "--n", 6, "--temperature", 1.0, "--top-k", 4,
                      "--max-new-tokens", 1, "--unique", "--unique-tries", 8)
    for rec in recs:
        contents = [r["content"] for r in rec["responses"]]
        assert len(contents) == 6 and rec["duplicates"] == 6 - len(set(contents)) and len(set(contents)) >= 3

def test_bad_input(tmp_path, tiny_vicuna):
    ok = {"id": "a", "messages": [{"role": "user", "content": "hi"}]}
    answered = {"id": "b", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = write_jsonl(tmp_path / "bad.jsonl", [ok, answered])
    p = run_script("sample.py", "--model", tiny_vicuna, "--data", bad, "--out", str(tmp_path / "o.jsonl"), check=False)
    assert p.returncode == 2 and "bad.jsonl:2: conversation must end with a user turn" in p.stderr, p.stderr[-2000:]
    torn = write_jsonl(tmp_path / "torn.jsonl", [ok, dict(ok, id="c"), '{"id": "d", "messages": ['])
    with pytest.raises(D.DataError, match=r"torn.jsonl:3: malformed JSON"):
        sample_run(tiny_vicuna, torn, tmp_path / "o.jsonl")
    dup = write_jsonl(tmp_path / "dup.jsonl", [ok, ok])
    with pytest.raises(D.DataError, match=r"dup.jsonl:2: duplicate id"):
        sample_run(tiny_vicuna, dup, tmp_path / "o.jsonl")
    assert not os.path.exists(tmp_path / "o.jsonl")

def test_truncated_response_is_scored_closed_and_marked(tmp_path, sp_tokenizer):
    """A reply cut at --max-new-tokens is marked, and scored as train_rm.py renders every reply:
    closed by an EOS, its reward read there (read at its last token, held-out accuracy was near
    chance on pairs of cut replies)."""
    path = make_checkpoint(tmp_path / "m", sp_tokenizer, "vicuna")
    cfg = json.load(open(tmp_path / "m" / "config.json"))  # many EOS ids: some samples end early
    eos = [cfg["eos_token_id"]] + list(range(5, cfg["vocab_size"], 6))
    json.dump(cfg | {"eos_token_id": eos}, open(tmp_path / "m" / "config.json", "w"))
    rm_path = make_checkpoint(tmp_path / "rm", sp_tokenizer, "vicuna", seed=3, reward=True)
    data = write_jsonl(tmp_path / "p.jsonl", prompts(3))
    recs = sample_run(path, data, tmp_path / "o.jsonl", "--n", 4, "--max-new-tokens", 4,
                      "--temperature", 1.0, "--reward-model", rm_path)
    rm, tok, template = M.load_model(rm_path, reward=True)
    cut_seen = set()
    for rec in recs:
        for r in rec["responses"]:
            conv = rec["messages"] + [{"role": "assistant", "content": r["content"]}]
            cut = r["finish_reason"] == "length"
            assert r["truncated"] is cut
            cut_seen.add(cut)
            with torch.no_grad():  # the RM on its own, at the EOS or at the last reply token
                closed, open_ = (float(rm(torch.tensor([D.render(tok, conv, template,
                                                                 closed=c)[0]])))
                                 for c in (True, False))
            assert r["reward"] == pytest.approx(closed, abs=1e-5)
            assert abs(closed - open_) > 1e-4  # the two differ: the test tells them apart
    assert cut_seen == {True, False}

@pytest.mark.parametrize("flag,value,what", [("--top-p", 0, "top_p"), ("--top-p", 1.5, "top_p"),
                                             ("--top-k", -1, "top_k"), ("--n", 0, "n must"),
                                             ("--temperature", -0.5, "temperature")])
def test_bad_sampling_parameters_stop_before_loading(tmp_path, flag, value, what):
    data = write_jsonl(tmp_path / "p.jsonl", prompts(1))
    args = ["--model", str(tmp_path / "missing"), "--data", data,
            "--out", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit, match=rf"^error: {what}"):  # the model is never looked for
        sample.run(args + [flag, str(value)])
    assert not os.path.exists(tmp_path / "o.jsonl")

def test_bad_sampling_parameter_cli_is_one_line(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", prompts(1))
    p = run_script("sample.py", "--model", str(tmp_path / "missing"), "--data", data,
                   "--top-p", "0", check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("error: top_p must be in (0, 1]"), p.stderr

QUESTIONS = [{"question_id": 81, "category": "writing", "turns": ["tell me about the fox", "and the dog"]},
             {"question_id": 111, "category": "math", "turns": ["one plus two", "two plus three"]},
             {"question_id": 131, "category": "extraction", "turns": ["what city is the capital of france"]}]

def test_mtbench_two_turns(tmp_path, tiny_chatml, monkeypatch):
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    calls = []  # every prompt the engine is given, with its temperature
    real = sample.sample_ours
    monkeypatch.setattr(sample, "sample_ours", lambda model, tok, eos, cfg, prompts, n, gens, on_token=None:
                        calls.append((cfg.temperature, n, prompts)) or real(model, tok, eos, cfg, prompts, n, gens))
    flags = ["--n", 2, "--max-new-tokens", 6, "--model-id", "tiny", "--category-temperature", "writing=1.0"]
    recs = {r["id"]: r for r in sample_run(tiny_chatml, data, tmp_path / "a.jsonl", *flags)}
    _, tok, template = M.load_model(tiny_chatml)
    assert sorted(recs) == ["111", "131", "81"]
    for q in QUESTIONS:
        r = recs[str(q["question_id"])]
        assert r["question_id"] == q["question_id"] and r["model_id"] == "tiny" and r["category"] == q["category"]
        assert [c["index"] for c in r["choices"]] == [0, 1] and all(len(c["turns"]) == len(q["turns"]) for c in r["choices"])
        assert r["sampling"]["temperature"] == {"writing": 1.0, "math": 0.0, "extraction": 0.0}[q["category"]]
        for j, c in enumerate(r["choices"]):
            assert [t["content"] for t in r["responses"][j]["turns"]] == c["turns"]
            if len(q["turns"]) == 2:  # turn 2's prompt: q1, this sample's own answer 1, q2, rendered
                conv = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": c["turns"][0]},
                        {"role": "user", "content": q["turns"][1]}]
                ids = D.render(tok, conv, template, prompt=True)[0]
                assert any(ids in p for t, n, p in calls if n == 1 and t == r["sampling"]["temperature"])
                assert r["responses"][j]["content"] == c["turns"][1]
        if q["category"] != "writing":  # greedy: both samples alike
            assert r["choices"][0]["turns"] == r["choices"][1]["turns"]
    assert recs["81"]["messages"] == [{"role": "user", "content": "tell me about the fox"},
                                      {"role": "assistant", "content": recs["81"]["choices"][0]["turns"][0]},
                                      {"role": "user", "content": "and the dog"}]
    assert {t for t, _, _ in calls} == {1.0, 0.0}
    # deterministic: a rerun elsewhere gives the same answers; and a rerun on the same file does nothing
    again = {r["id"]: r for r in sample_run(tiny_chatml, data, tmp_path / "b.jsonl", *flags)}
    assert all(again[i]["choices"] == recs[i]["choices"] for i in recs)
    n_calls = len(calls)
    assert len(sample_run(tiny_chatml, data, tmp_path / "a.jsonl", *flags)) == 3 and len(calls) == n_calls
    # under torchrun: each rank answers its share of the questions, merged into one file
    run_script("--", "sample.py", "--model", tiny_chatml, "--data", data, "--out", str(tmp_path / "t.jsonl"), "--dtype", "float32",
               *map(str, flags), nproc=2)
    two = {r["id"]: r for r in read(tmp_path / "t.jsonl")}
    assert sorted(two) == sorted(recs) and all(two[i]["choices"] == recs[i]["choices"] for i in recs)

def test_alpaca_eval_files(tmp_path, tiny_chatml):
    """AlpacaEval's evaluation set in (a JSON array), ours out in the same shape: annotate.py matches the two."""
    import annotate
    evalset = [{"instruction": "tell me about the fox", "output": "ref one", "generator": "gpt4", "dataset": "koala"},
               {"instruction": "what city", "input": "paris or rome", "output": "ref two", "generator": "gpt4", "dataset": "oasst"}]
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(evalset))
    data, ours = str(tmp_path / "alpaca_eval.json"), str(tmp_path / "ours.json")
    recs = sample_run(tiny_chatml, data, tmp_path / "o.jsonl", "--n", 1, "--max-new-tokens", 4, "--alpaca-eval", ours,
                      "--model-id", "tiny")
    assert recs[1]["messages"] == [{"role": "user", "content": "what city\n\nparis or rome"}]
    out = json.load(open(ours))
    assert [(o["instruction"], o["generator"], o["dataset"]) for o in out] == [
        ("tell me about the fox", "tiny", "koala"), ("what city", "tiny", "oasst")]
    assert [o["output"] for o in out] == [r["responses"][0]["content"] for r in recs]
    cfg = annotate.AnnotateConfig()
    a, b = annotate.read_pairs(cfg, [data], 1), annotate.read_pairs(cfg, [ours], 1)
    assert sorted(a) == sorted(b) and len(a) == 2

def test_batches_count_the_kv_cache_they_hold():
    """A prompt's n samples share its keys (prompt + n x max new), unless each holds it (n = 1,
    --compile: n x (prompt + max new)); a prompt bigger than the budget still gets a batch."""
    items = [{"id": str(i), "ids": [0] * 100} for i in range(5)]
    sizes = lambda **kw: [len(b) for b in sample.batches(items, sample.Config(**kw))]
    assert sizes(n=4, max_new_tokens=50, batch_tokens=600) == [2, 2, 1]  # 300 each
    assert sizes(n=4, max_new_tokens=50, batch_tokens=600, compile=True) == [1] * 5  # 600 each
    assert sizes(n=1, max_new_tokens=50, batch_tokens=300) == [2, 2, 1]  # 150 each
    assert sizes(n=4, max_new_tokens=50, batch_tokens=10) == [1] * 5
    assert sizes(n=400, max_new_tokens=1, batch_tokens=10 ** 6) == [2, 2, 1]  # <= 1024 rows
    items[1]["ids"] = [0] * 1000  # generate pads every prompt's row to the longest
    assert sizes(n=4, max_new_tokens=50, batch_tokens=2399) == [1, 1, 3]  # 1200 each beside it
