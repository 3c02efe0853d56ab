import json, math, os
import pytest
import torch
import transformers
from conftest import D, M, make_checkpoint, write_jsonl, run_script
import sft

def convs(n=6, turns=2):
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "be brief"}] if i % 2 else []
        for t in range(turns):
            msgs += [{"role": "user", "content": f"what is {i} plus {t}"},
                     {"role": "assistant", "content": f"the answer is {i + t} yes"}]
        out.append({"id": f"c{i}", "messages": msgs})
    return out

def make_cfg(model, data, out, **kw):
    c = sft.Config(model=model, data=[data], out=str(out), lr=3e-3, epochs=1, batch_tokens=256,
                   log_every=1, warmup_steps=0, seed=0)
    for k, v in kw.items():
        setattr(c, k, v)
    return c

def test_initial_loss_is_ln_vocab_and_overfits(tmp_path, sp_tokenizer):
    path = make_checkpoint(tmp_path / "m", sp_tokenizer, "vicuna", std=0.02)
    data = write_jsonl(tmp_path / "d.jsonl", convs(4))
    c = make_cfg(path, data, tmp_path / "out", epochs=30, batch_tokens=2048, schedule="constant")
    sft.train(c, sft.load_conversations(c.data))
    log = [json.loads(l) for l in open(tmp_path / "out" / "log.jsonl")]
    assert abs(log[0]["loss"] - math.log(len(sp_tokenizer))) < 0.1
    assert log[-1]["loss"] < 0.3 * log[0]["loss"]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb"} <= set(log[0])
    # the export loads in transformers with the same logits as ours
    ours, _, _ = M.load_model(str(tmp_path / "out"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                           dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (hf(ids).logits[0] - ours(ids)).abs().max() <= 1e-5

def test_packing_is_exact_and_masks(tmp_path, sp_tokenizer, tiny_vicuna):
    model, tok, template = M.load_model(tiny_vicuna)
    conversations = [(r["id"], r["messages"]) for r in convs(3)]
    examples, _, _ = sft.tokenize(conversations, tok, template, 512)
    with torch.no_grad():
        packed = sft.sft_loss(sft.target_logps(model, examples, [0, 1, 2]))
        one_by_one = sum(sft.sft_loss(sft.target_logps(model, examples, [i])) for i in range(3))
    assert abs(packed - one_by_one) <= 1e-5 * abs(one_by_one)
    # system and user tokens never get loss; both assistant turns do
    ids, mask = examples[1]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "answer is 1" in trained and "answer is 2" in trained
    assert "plus" not in trained and "brief" not in trained and "USER" not in trained

def test_truncation_at_turn_boundary(sp_tokenizer):
    conv = [(0, convs(1, turns=3)[0]["messages"])]
    full, _, _ = sft.tokenize(conv, sp_tokenizer, "vicuna", 10_000)
    two, _, _ = sft.tokenize([(0, conv[0][1][:4])], sp_tokenizer, "vicuna", 10_000)
    cut, truncated, dropped = sft.tokenize(conv, sp_tokenizer, "vicuna", len(full[0][0]) - 1)
    assert (truncated, dropped) == (1, 0) and cut[0] == two[0]

def losses(out, key="loss"):
    return [r[key] for r in map(json.loads, open(os.path.join(out, "log.jsonl")))]

def test_torchrun_equals_single_process(tmp_path, tiny_vicuna):
    data = write_jsonl(tmp_path / "d.jsonl", convs(16))
    common = ["sft.py", "--model", tiny_vicuna, "--data", data, "--lr", "1e-3",
              "--batch-tokens", "300", "--epochs", "1", "--max-steps", "3"]
    run_script(*common, "--out", str(tmp_path / "one"), "--grad-accum", "2")
    run_script(*common, "--out", str(tmp_path / "two"), "--grad-accum", "1", nproc=2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
    # Adam is nearly scale-invariant and losses do not depend on backward: the gradients must
    # match too (a wrong loss scale, or a clip norm taken on one shard, shows here)
    gn = [losses(tmp_path / d, "grad_norm") for d in ("one", "two")]
    assert gn[1] == pytest.approx(gn[0], rel=1e-5)  # measured: 1e-7
    wa, wb = M.load_state_dict(str(tmp_path / "one")), M.load_state_dict(str(tmp_path / "two"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4

def test_bad_input(tmp_path, tiny_vicuna):
    good = {"id": "a", "messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "yo"}]}
    ends_user = write_jsonl(tmp_path / "u.jsonl",
                            [good, {"id": "b", "messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(D.DataError,
                       match=r"u.jsonl:2: conversation must end with an assistant turn"):
        sft.load_conversations([ends_user])
    empty = write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(D.DataError, match=r"e.jsonl:1: empty file"):
        sft.load_conversations([empty])
    bad = write_jsonl(tmp_path / "b.jsonl", [good, good, "{oops"])
    p = run_script("sft.py", "--model", tiny_vicuna, "--data", bad, "--out", str(tmp_path / "o"),
                   check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith(f"error: {bad}:3: malformed JSON")

def test_json_array_and_parquet_folder(tmp_path, tiny_vicuna):
    """The files people have: ShareGPT's JSON array, and a cloned dataset repository of parquet files."""
    import datasets
    recs = convs(6)
    sharegpt = [{"id": r["id"], "conversations": [{"from": {"user": "human", "assistant": "gpt", "system": "system"}[m["role"]],
                                                   "value": m["content"]} for m in r["messages"]]} for r in recs]
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt))
    got = sft.load_conversations([str(tmp_path / "sharegpt.json")])
    assert [m for _, m in got] == [r["messages"] for r in recs] and got[5][0] == f"{tmp_path / 'sharegpt.json'}[5]"
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    for k in range(2):
        datasets.Dataset.from_list(recs[3 * k:3 * k + 3]).to_parquet(str(repo / f"train-0000{k}-of-00002.parquet"))
    assert [m for _, m in sft.load_conversations([str(tmp_path / "repo")])] == [r["messages"] for r in recs]
    sharegpt[4]["conversations"][1]["from"] = "robot"
    (tmp_path / "bad.json").write_text(json.dumps(sharegpt))
    p = run_script("sft.py", "--model", tiny_vicuna, "--data", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o"),
                   check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'bad.json'}[4]: message 1: unknown role")
