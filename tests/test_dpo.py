import json, math, os
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import D, M, T, make_checkpoint, write_jsonl, run_script
import dpo

@pytest.fixture(autouse=True)
def one_thread():  # tiny models: threads only fight over the shared cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def user(text, system="be brief"):
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]

WORDS = "red green blue cat dog fox mat paris france math one two three four five".split()

def style_pair(i):
    """Synthetic preference: chosen answers say 'yes good', rejected ones 'no bad'."""
    w, v = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
    return {"id": f"s{i}", "messages": user(f"tell me about {w} {v}"), "chosen": f"yes good answer about {w}",
            "rejected": f"no bad {v} question"}

def make_cfg(model, data, out, **kw):
    return dpo.Config(**(dict(model=model, data=[data], out=str(out), lr=1e-3, batch_tokens=512, seed=0, schedule="constant") | kw))

def log_of(out):
    return [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]

def test_pair_strategies(tmp_path):
    mu_rewards = [0.59, -1.69, 0.77, 1.44, -0.47, 1.21, 0.75, -1.05, 1.49, -0.56, -0.27, 0.74, 0.64, -0.83, 1.0, 0.61,
                  0.78, -2.31, 0.89, -0.35, 0.36, 0.65, 0.18, -1.83, 0.11, -0.4, 0.86, 0.39, -0.11, 0.28, 0.52, -0.0]
    sets = [  # rewards per response; response k's text is "a{k}" / "b{k}"
        {"id": "a", "messages": user("q a"), "responses": [{"content": f"a{k}", "reward": r} for k, r in
                                                             enumerate([0.5, 2.0, -1.0, 1.0, -1.0, 1.5, 2.0])]},
        {"id": "b", "messages": user("q b"), "responses": [{"content": f"b{k}", "reward": r} for k, r in enumerate(mu_rewards)]},
    ]
    sets[0]["responses"][6]["content"] = "a1"  # a duplicate of the best: never its own rejected
    data = write_jsonl(tmp_path / "set.jsonl", sets)

    def picks(**kw):
        pairs, counts = dpo.load_pairs([data], dpo.Config(**kw))
        return [(p["id"], p["chosen"], p["rejected"]) for p in pairs], counts

    assert picks(pairs="worst")[0] == [("a:0", "a1", "a2"), ("b:0", "b8", "b17")]  # ties: the earlier response
    assert picks(pairs="rank:2")[0] == [("a:0", "a1", "a5"), ("b:0", "b8", "b3")]
    assert picks(pairs="rank:3")[0] == [("a:0", "a1", "a3"), ("b:0", "b8", "b5")]
    target = np.mean(mu_rewards) - 2 * np.std(mu_rewards)
    nearest = min(range(32), key=lambda k: abs(mu_rewards[k] - target))
    assert mu_rewards[nearest] == -1.69 > min(mu_rewards)  # the mu-2sigma pick is not simply the worst
    assert picks(pairs="mu-2sigma")[0][1] == ("b:0", "b8", f"b{nearest}")
    assert picks(pairs="worst", pairs_per_prompt=2)[0][:2] == [("a:0", "a1", "a2"), ("a:1", "a1", "a4")]
    # random: seeded, deterministic, never the chosen or its duplicate; all candidates reachable
    r1, r2 = picks(pairs="random", pairs_per_prompt=10)[0], picks(pairs="random", pairs_per_prompt=10)[0]
    assert r1 == r2 and {p[2] for p in r1 if p[0].startswith("a")} == {"a0", "a2", "a3", "a4", "a5"}
    assert len({tuple(picks(pairs="random", seed=s)[0]) for s in range(5)}) > 1
    # --min-gap: pairs below it are dropped and counted; a rank past the end leaves the prompt without a pair
    pairs, counts = picks(pairs="worst", min_gap=3.5)
    assert pairs == [("b:0", "b8", "b17")] and sum(counts.values()) == 1
    pairs, counts = picks(pairs="rank:9")
    assert [p[0] for p in pairs] == ["b:0"] and sum(counts.values()) == 1
    # preference pairs, in each form: strings, whole conversations (hub binarized), a final assistant message
    conv = lambda reply: user("hi") + [{"role": "assistant", "content": reply}]
    given = write_jsonl(tmp_path / "given.jsonl", [
        {"id": "p", "messages": user("hi"), "chosen": "good", "rejected": "bad"},
        {"id": "q", "prompt": "hi", "messages": conv("good"), "chosen": conv("good"), "rejected": conv("bad")},
        {"id": "r", "messages": user("hi"), "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad"}])
    pairs, _ = dpo.load_pairs([given], dpo.Config())
    assert [(p["messages"], p["chosen"], p["rejected"]) for p in pairs] == [(user("hi"), "good", "bad")] * 3

def test_bad_input(tmp_path):
    ok = {"id": "ok", "messages": user("q"), "chosen": "x", "rejected": "y"}
    cases = [({"id": "i", "messages": user("q"), "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
             ({"id": "o", "messages": user("q"), "responses": [{"content": "x", "reward": 1}]}, "needs at least two responses"),
             ({"id": "m", "messages": user("q"), "responses": [{"content": "x", "reward": 1}, {"content": "y"}]},
              "response 1 has no numeric reward")]
    for k, (rec, reason) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{k}.jsonl", [ok, rec])
        with pytest.raises(D.DataError, match=f"bad{k}.jsonl:2: {reason}"):
            dpo.load_pairs([path], dpo.Config())
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [ok] + [c[0] for c in cases])
    pairs, counts = dpo.load_pairs([mixed], dpo.Config(skip_bad=True))
    assert [p["id"] for p in pairs] == ["ok"] and counts["bad records (--skip-bad)"] == 3
    p = run_script("dpo.py", "--data", mixed, "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == f"error: {mixed}:2: chosen and rejected are identical"

def hf_logps(hf, tok, template, prompt, reply):
    """Independent: transformers' model on one unpadded sequence; the response is what follows the
    rendered prompt, so no loss mask is involved."""
    full = D.render(tok, prompt + [{"role": "assistant", "content": reply}], template)[0]
    head = D.render(tok, prompt, template, prompt=True)[0]
    assert full[:len(head)] == head
    logits = hf(torch.tensor([full])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
    return lp[len(head) - 1:].sum(), len(full) - len(head)

def test_loss_and_gradient_equal_the_formula(tmp_path, tiny_vicuna):
    model, tok, template = M.load_model(tiny_vicuna)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_vicuna, dtype=torch.float32)
    pairs = [style_pair(i) for i in range(3)]
    pairs[1]["messages"] = pairs[1]["messages"] + [{"role": "assistant", "content": "an earlier reply"}, {"role": "user", "content": "more"}]
    ex, _, _ = dpo.tokenize(pairs, tok, template, 512)
    torch.manual_seed(0)
    ref = torch.stack([dpo.seq_logps(model, ex, [0, 1, 2])[k].detach() for k in (0, 1)]) + torch.randn(2, 3) * 5
    for loss, beta, eps in [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0)]:
        cfg = dpo.Config(loss=loss, beta=beta, label_smoothing=eps)
        model.zero_grad(), hf.zero_grad()
        ours, stats = dpo.pair_terms(cfg, model, ex, [0, 1, 2], ref)
        ours.backward()
        theirs = 0
        for i, p in enumerate(pairs):
            (c, nc), (r, nr) = (hf_logps(hf, tok, template, p["messages"], p[k]) for k in ("chosen", "rejected"))
            h = (c - ref[0, i]) - (r - ref[1, i])
            if loss == "ipo":
                theirs = theirs + ((c - ref[0, i]) / nc - (r - ref[1, i]) / nr - 1 / (2 * beta)) ** 2
            else:
                theirs = theirs - (1 - eps) * torch.log(torch.sigmoid(beta * h)) - eps * torch.log(torch.sigmoid(-beta * h))
        theirs.backward()
        assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
        grads = dict(hf.named_parameters())
        for name, p in model.named_parameters():
            g = grads[name].grad
            assert (p.grad - g).norm() <= 1e-5 * g.norm(), name
    assert set(stats) >= {"reward_acc", "reward_chosen", "reward_rejected", "margin", "logp_chosen", "logp_rejected"}

def test_loss_equals_trl(tmp_path, tiny_vicuna):
    try:
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        pytest.skip("trl is not installed (not a requirement): pip install trl==1.16.0 to compare with its DPOTrainer")
    from datasets import Dataset
    model, tok, template = M.load_model(tiny_vicuna)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_vicuna, dtype=torch.float32)
    ex, _, _ = dpo.tokenize([style_pair(i) for i in range(4)], tok, template, 512)
    torch.manual_seed(0)
    ref = -torch.rand(2, 4) * 20 - 20
    feats = []  # the same tokens for TRL: prompt, then each completion (the response and its EOS)
    for i, e in enumerate(ex):
        start = next(j for j, t in enumerate(e[1]) if t >= 0) + 1
        feats.append({"prompt_ids": e[0][:start], "chosen_ids": e[0][start:], "rejected_ids": e[2][start:],
                      "ref_chosen_logps": float(ref[0, i]), "ref_rejected_logps": float(ref[1, i])})
    for loss in ("sigmoid", "ipo"):
        args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=[loss], report_to="none", bf16=False,
                         gradient_checkpointing=False, use_cpu=True, max_length=None)
        trainer = DPOTrainer(model=hf, args=args, processing_class=tok,
                             train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
        trainer.precompute_ref_logps = True  # read our reference log-probs from the batch
        theirs = trainer.compute_loss(trainer.model, trainer.data_collator(feats))
        ours, _ = dpo.pair_terms(dpo.Config(loss=loss), model, ex, [0, 1, 2, 3], ref)
        assert abs(float(ours) / 4 - float(theirs)) <= 1e-5 * abs(float(theirs))

def test_step0_ln2_cache_equals_online(tmp_path, tiny_vicuna, sp_tokenizer, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [style_pair(i) for i in range(8)])
    # policy = reference: the loss is exactly ln 2, implicit rewards exactly 0
    dpo.train(make_cfg(tiny_vicuna, data, tmp_path / "same", max_steps=1, batch_tokens=300))
    first = log_of(tmp_path / "same")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-7 and first["reward_chosen"] == first["reward_rejected"] == first["margin"] == 0
    # a different reference: cached log-probs equal the reference's own, and the losses equal online ones
    ref = make_checkpoint(tmp_path / "ref", sp_tokenizer, "vicuna", seed=1)
    kw = dict(ref_model=ref, max_steps=3, batch_tokens=300)
    dpo.train(make_cfg(tiny_vicuna, data, tmp_path / "cached", **kw))
    dpo.train(make_cfg(tiny_vicuna, data, tmp_path / "online", ref_cache=False, **kw))
    a, b = log_of(tmp_path / "cached"), log_of(tmp_path / "online")
    assert abs(a[0]["loss"] - math.log(2)) > 1e-3 and len(a) == 3
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6) and x["margin"] == pytest.approx(y["margin"], abs=1e-6)
    from safetensors.torch import load_file
    cached = load_file(str(tmp_path / "cached" / "ref_logps.safetensors"))
    ref_model, tok, template = M.load_model(ref)
    ex, _, _ = dpo.tokenize(dpo.load_pairs([data], dpo.Config())[0], tok, template, 2048)
    with torch.no_grad():
        c, r = dpo.seq_logps(ref_model, ex, list(range(8)))
    assert torch.allclose(cached["chosen"], c, atol=1e-4) and torch.allclose(cached["rejected"], r, atol=1e-4)
    # reused when data and reference match, recomputed when the data changes
    capsys.readouterr()
    dpo.train(make_cfg(tiny_vicuna, data, tmp_path / "cached", **kw))
    assert "reference log-probs: reusing" in capsys.readouterr().out
    assert [x["loss"] for x in log_of(tmp_path / "cached")] == [x["loss"] for x in a]
    data2 = write_jsonl(tmp_path / "d2.jsonl", [style_pair(i) for i in range(1, 9)])
    dpo.train(make_cfg(tiny_vicuna, data2, tmp_path / "cached", **kw))
    assert "reference log-probs: computed" in capsys.readouterr().out

def test_synthetic_preference_is_learned(tmp_path, tiny_vicuna):
    data = write_jsonl(tmp_path / "d.jsonl", [style_pair(i) for i in range(16)])
    policy = dpo.train(make_cfg(tiny_vicuna, data, tmp_path / "out", lr=2e-3))
    log = log_of(tmp_path / "out")
    assert log[0]["reward_acc"] == 0 and log[-1]["reward_acc"] == 1 and log[-1]["loss"] < 0.1 < log[0]["loss"]
    assert log[-1]["reward_chosen"] > 0 > log[-1]["reward_rejected"]
    # on held-out prompts, the policy prefers chosen-style answers more than the reference did
    base, tok, template = M.load_model(tiny_vicuna)
    ex, _, _ = dpo.tokenize([style_pair(i) for i in range(100, 108)], tok, template, 512)
    with torch.no_grad():
        (c0, r0), (c1, r1) = (dpo.seq_logps(m.eval(), ex, list(range(8))) for m in (base, policy))
    assert torch.sigmoid(c1 - r1).mean() > 0.9 > 0.1 > torch.sigmoid(c0 - r0).mean()
    assert c1.mean() > c0.mean()

@pytest.mark.parametrize("optim", ["adamw", "adamw-lowmem"])
def test_resume_equals_uninterrupted(tmp_path, tiny_vicuna, optim):
    data = write_jsonl(tmp_path / "d.jsonl", [style_pair(i) for i in range(12)])
    kw = dict(epochs=2, batch_tokens=300, save_every=1, warmup_steps=2, lr=3e-4, optim=optim)
    kw |= dict(grad_clip=0.0) if optim == "adamw-lowmem" else {}
    dpo.train(make_cfg(tiny_vicuna, data, tmp_path / "full", **kw))
    dpo.train(make_cfg(tiny_vicuna, data, tmp_path / "cut", max_steps=3, **kw))  # stops as a kill would after step 3
    cut = log_of(tmp_path / "cut")
    write_jsonl(tmp_path / "cut" / "log.jsonl", [cut[0] | {"loss": 123.0}] + cut[1:])  # marks the steps not redone
    dpo.train(make_cfg(tiny_vicuna, data, tmp_path / "cut", resume=True, **kw))
    full, cut = log_of(tmp_path / "full"), log_of(tmp_path / "cut")
    assert len(full) == len(cut) > 3 and cut[0]["loss"] == 123.0
    assert [r["loss"] for r in cut[1:]] == pytest.approx([r["loss"] for r in full[1:]], abs=1e-6)
    wa, wb = M.load_state_dict(str(tmp_path / "full")), M.load_state_dict(str(tmp_path / "cut"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

def test_torchrun_equals_single_process(tmp_path, tiny_vicuna):
    data = write_jsonl(tmp_path / "d.jsonl", [style_pair(i) for i in range(16)])
    dpo.train(make_cfg(tiny_vicuna, data, tmp_path / "one", lr=1e-3, batch_tokens=300, max_steps=3, grad_accum=2, schedule="cosine"))
    run_script("dpo.py", "--model", tiny_vicuna, "--data", data, "--lr", "1e-3", "--batch-tokens", "300", "--max-steps", "3",
               "--seed", "0", "--out", str(tmp_path / "two"), nproc=2)
    a, b = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert len(a) == 3 and a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-5 and a[-1]["loss"] < 0.6
    # the gradients too: Adam hides a wrong loss scale from the losses and weights
    assert [x["grad_norm"] for x in b] == pytest.approx([x["grad_norm"] for x in a], rel=1e-5)
    wa, wb = M.load_state_dict(str(tmp_path / "one")), M.load_state_dict(str(tmp_path / "two"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4

def test_lowmem_optimizer_torchrun(tmp_path, tiny_vicuna):
    """--optim adamw-lowmem (stepped in backward on FSDP2 shards, bf16 moments) under torchrun follows
    exact AdamW in one process closely; it refuses settings it cannot honour."""
    data = write_jsonl(tmp_path / "d.jsonl", [style_pair(i) for i in range(16)])
    dpo.train(make_cfg(tiny_vicuna, data, tmp_path / "one", lr=1e-3, batch_tokens=300, max_steps=4, grad_accum=2, grad_clip=0.0))
    p = run_script("dpo.py", "--model", tiny_vicuna, "--data", data, "--lr", "1e-3", "--batch-tokens", "300", "--max-steps", "4",
               "--seed", "0", "--schedule", "constant", "--optim", "adamw-lowmem", "--grad-clip", "0", "--out", str(tmp_path / "two"), nproc=2)
    assert "stepped late" not in p.stdout + p.stderr  # the hooks ran on FSDP2's sharded parameters
    a, b = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert len(a) == len(b) == 4 and b[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and b[-1]["loss"] < 0.5
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], abs=2e-3)
    assert [x["grad_norm"] for x in b] == pytest.approx([x["grad_norm"] for x in a], rel=1e-2)
    wa, wb = M.load_state_dict(str(tmp_path / "one")), M.load_state_dict(str(tmp_path / "two"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4 * 4 * 2  # a few lr-sized steps apart at most
    p = run_script("dpo.py", "--model", tiny_vicuna, "--data", data, "--optim", "adamw-lowmem", "--out", str(tmp_path / "x"), check=False)
    assert p.returncode != 0 and "needs --grad-accum 1 and --grad-clip 0" in p.stderr + p.stdout

def test_truncated_response_is_never_chosen_by_default(tmp_path):
    def xset(rid, rewards, cut, key="finish_reason", value="length"):  # `cut`: hit the limit
        resp = [{"content": f"{rid}{k}", "reward": r, "finish_reason": "eos"}
                for k, r in enumerate(rewards)]
        for k in cut:
            resp[k][key] = value
        return {"id": rid, "messages": user(f"q {rid}"), "responses": resp}
    data = write_jsonl(tmp_path / "set.jsonl", [
        xset("a", [3.0, 2.0, 1.0, -1.0], cut=[0, 3]),  # the best was cut; so was the worst
        xset("b", [1.0, 2.0], cut=[0, 1], key="truncated", value=True),  # all cut: no pair
        xset("c", [0.5, 2.0, 1.0], cut=[])])

    def picks(**kw):
        pairs, counts = dpo.load_pairs([data], dpo.Config(**kw))
        return [(p["id"], p["chosen"], p["rejected"]) for p in pairs], counts
    pairs, counts = picks(pairs="worst")
    assert pairs == [("a:0", "a1", "a3"), ("c:0", "c1", "c0")]  # a cut reply may be the rejected
    assert counts == {"prompts with every response truncated": 1}
    # rejected candidates rank below the chosen: the cut a0 (above a1) is never one of them
    assert picks(pairs="rank:2", pairs_per_prompt=5)[0][:2] == \
        [("a:0", "a1", "a2"), ("a:1", "a1", "a3")]
    assert picks(pairs="random", pairs_per_prompt=5)[0][0][1] == "a1"
    pairs, counts = picks(pairs="worst", allow_truncated=True)  # the old behaviour
    assert pairs == [("a:0", "a0", "a3"), ("b:0", "b1", "b0"), ("c:0", "c1", "c0")] and not counts

def test_truncated_rejected_is_scored_without_eos(tiny_vicuna):
    """A truncated response that becomes a rejected is compared as it was sampled: no closing EOS
    (its targets end at its last token), while a finished chosen keeps its EOS."""
    _, tok, template = M.load_model(tiny_vicuna)
    msgs = [{"role": "user", "content": "hi"}]
    pair = {"id": "p", "messages": msgs, "chosen": "good answer", "rejected": "bad answer cut",
            "chosen_truncated": False, "rejected_truncated": True}
    (ex,), _, _ = dpo.tokenize([pair], tok, template, 512)
    eos = D.eos_id(tok, template)
    assert ex.chosen_ids[-1] == eos and ex.rejected_ids[-1] != eos
    assert [t for t in ex.rejected_targets if t >= 0][-1] == ex.rejected_ids[-1]

def test_pairs_file_keeps_truncation(tmp_path):
    """OUT/pairs.jsonl fed back as --data keeps the truncation flags: the truncated rejected is still
    scored without EOS, and a truncated chosen is still refused without --allow-truncated."""
    cfg = dpo.Config(data=["x"])
    msgs = [{"role": "user", "content": "hi"}]
    rec = {"id": "p", "messages": msgs, "chosen": "a", "rejected": "b", "chosen_truncated": False,
           "rejected_truncated": True}
    counts = __import__("collections").Counter()
    (pair,) = dpo.record_pairs(rec, "f:1", cfg, counts)
    assert pair["rejected_truncated"] and not pair["chosen_truncated"]
    assert dpo.record_pairs(dict(rec, chosen_truncated=True), "f:2", cfg, counts) == [] and counts
    cfg.allow_truncated = True
    assert len(dpo.record_pairs(dict(rec, chosen_truncated=True), "f:3", cfg, counts)) == 1
