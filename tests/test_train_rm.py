import json, math, os, random
import pytest
import torch
import transformers
from conftest import D, M, WORDS, make_checkpoint, write_jsonl, run_script
import sample
import train_rm

FILLER = [w for w in WORDS if w not in ("good", "bad")]

@pytest.fixture(autouse=True)
def one_thread():
    # tiny matmuls: on a shared 2-core machine intra-op threads cost far more than they give (10x)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def marker_pairs(n, seed=0, strength=None):
    """A task a tiny model learns: the chosen reply contains the word 'good', the rejected not."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = lambda: [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
        chosen = words()
        chosen.insert(rng.randint(0, len(chosen)), "good")
        rec = {"id": f"p{i}", "messages": [{"role": "system", "content": "hi"},
                                           {"role": "user", "content": " ".join(words())}],
               "chosen": " ".join(chosen), "rejected": " ".join(words())}
        out.append(rec | ({"strength": strength} if strength else {}))
    return out

def make_cfg(model, data, out, **kw):
    c = train_rm.Config(model=model, data=[data], out=str(out), lr=3e-3, epochs=1,
                        batch_tokens=512, log_every=1, warmup_steps=0, seed=0)
    for k, v in kw.items():
        setattr(c, k, v)
    return c

def log_of(out):
    return [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]

def padded(seqs, pad):
    T = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    return ids, torch.tensor([len(s) for s in seqs])

def test_ln2_learns_and_matches_transformers(tmp_path, sp_tokenizer):
    path = make_checkpoint(tmp_path / "m", sp_tokenizer, "vicuna", std=0.02)
    data = write_jsonl(tmp_path / "d.jsonl", marker_pairs(160))
    c = make_cfg(path, data, tmp_path / "out", epochs=2, eval_frac=0.2, lr=2e-3, batch_tokens=1024,
                 schedule="constant")
    _, final = train_rm.train(c, train_rm.load_pairs(c.data)[0])
    log = log_of(tmp_path / "out")
    # the zero-init head: r_chosen = r_rejected = 0
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"accuracy", "reward_chosen", "reward_rejected", "margin", "tokens_per_s", "mfu",
            "eval_accuracy"} <= set(log[-1])
    assert final["accuracy"] > 0.9 and log[-1]["eval_accuracy"] > 0.9, final
    assert final["loss"] < 0.5 * math.log(2)
    # the export: our loader sees a reward model; transformers reads the same
    out = str(tmp_path / "out")
    ours, tok, template = M.load_model(out)
    assert ours.reward
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, dtype=torch.float32).eval()
    pad = hf.config.pad_token_id
    assert pad != D.eos_id(tok, template)
    pairs = train_rm.parse_pairs([("x", r) for r in marker_pairs(4, seed=1)])[0]
    toks, _ = train_rm.tokenize(pairs, tok, template, 512)
    seqs = [x for p in toks for x in p]
    ids, lens = padded(seqs, pad)
    with torch.no_grad():
        r_chosen, r_rejected = train_rm.pair_rewards(ours, toks, range(len(toks)))
        packed = torch.stack([r_chosen, r_rejected], 1).reshape(-1)
        from_padded = ours(ids, last=torch.arange(len(seqs)) * ids.shape[1] + lens - 1)
        mask = (torch.arange(ids.shape[1]) < lens[:, None]).long()
        theirs = hf(ids, attention_mask=mask).logits[:, 0]
    assert packed.abs().max() > 0.1  # trained rewards, not the zero head
    assert (packed - from_padded).abs().max() <= 1e-4
    assert (packed - theirs).abs().max() <= 1e-4
    convs = [p[k] for p in pairs for k in ("chosen", "rejected")]
    scores = sample.reward_scores(ours, tok, template, convs)
    assert torch.tensor(scores) == pytest.approx(packed, abs=1e-4)

def test_chatml_reward_head_reads_the_closing_eos(tmp_path, bpe_tokenizer):
    # a random score head on a ChatML model (tied embeddings, pad token == EOS in its tokenizer)
    path = make_checkpoint(tmp_path / "rm", bpe_tokenizer, "chatml", reward=True,
                           tie_word_embeddings=True)
    ours, tok, template = M.load_model(path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32).eval()
    assert hf.config.pad_token_id != D.eos_id(tok, template) == tok.pad_token_id
    pairs = train_rm.parse_pairs([("x", r) for r in marker_pairs(3)])[0]
    toks, _ = train_rm.tokenize(pairs, tok, template, 512)
    seqs = [x for p in toks for x in p]
    assert all(s[-1] == D.eos_id(tok, template) for s in seqs)
    ids, lens = padded(seqs, hf.config.pad_token_id)
    with torch.no_grad():
        packed = torch.stack(train_rm.pair_rewards(ours, toks, range(3)), 1).reshape(-1)
        from_padded = ours(ids, last=torch.arange(len(seqs)) * ids.shape[1] + lens - 1)
        mask = (torch.arange(ids.shape[1]) < lens[:, None]).long()
        theirs = hf(ids, attention_mask=mask).logits[:, 0]
        one_by_one = torch.cat([ours(torch.tensor([s])) for s in seqs])
    assert packed.std() > 0.01
    for other in (from_padded, theirs, one_by_one):
        assert (packed - other).abs().max() <= 1e-4

def test_margin_and_centering_follow_the_formula(tmp_path, tiny_vicuna):
    r_chosen, r_rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.25])
    got = train_rm.rm_loss(r_chosen, r_rejected, torch.tensor([3.0, 0.0]), center_coef=0.1)
    want = [math.log(1 + math.exp(2.5)) + 0.1 * 1.5 ** 2,
            math.log(1 + math.exp(0.75)) + 0.1 * 0.25 ** 2]
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    words = ("A much better", "better", "slightly_better", 2, "1.5")
    assert [train_rm.strength_of(s, "x")[1] for s in words] == [3, 2, 1, 2, 1.5]
    # end to end: at the zero-init head each pair's loss is log(1 + e^margin), 3 for "much better"
    data = write_jsonl(tmp_path / "d.jsonl", marker_pairs(8, strength="much better"))
    for margin, want in ((True, math.log(1 + math.e ** 3)), (False, math.log(2))):
        c = make_cfg(tiny_vicuna, data, tmp_path / f"o{margin}", max_steps=1, margin=margin)
        train_rm.train(c, train_rm.load_pairs(c.data)[0])
        assert log_of(c.out)[0]["loss"] == pytest.approx(want, abs=1e-6)

def test_torchrun_equals_single_process(tmp_path, tiny_vicuna):
    data = write_jsonl(tmp_path / "d.jsonl", marker_pairs(24))
    common = ["train_rm.py", "--model", tiny_vicuna, "--data", data, "--lr", "1e-3",
              "--batch-tokens", "300", "--max-steps", "3", "--margin", "--center-coef", "0.01",
              "--eval-frac", "0.25"]
    run_script(*common, "--out", str(tmp_path / "one"), "--grad-accum", "2")
    run_script(*common, "--out", str(tmp_path / "two"), "--grad-accum", "1", nproc=2)
    a, b = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert len(a) == 3 and all(a[i][k] == pytest.approx(b[i][k], abs=1e-4)
                               for i in range(3) for k in ("loss", "accuracy", "margin"))
    # the gradients too: Adam hides a wrong loss scale from the losses and weights
    assert [x["grad_norm"] for x in b] == pytest.approx([x["grad_norm"] for x in a], rel=1e-5)
    assert all(a[-1][k] == pytest.approx(b[-1][k], abs=1e-4)
               for k in ("eval_loss", "eval_accuracy", "eval_reward_std"))
    wa, wb = M.load_state_dict(str(tmp_path / "one")), M.load_state_dict(str(tmp_path / "two"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4

def test_formats_skips_and_bad_pairs(tmp_path, tiny_vicuna):
    user = lambda t: {"role": "user", "content": t}
    asst = lambda t: {"role": "assistant", "content": t}
    answered = {"messages": [user("hi")], "chosen": "yo", "rejected": "no"}
    recs = [{"id": "s", **answered, "strength": "slightly better"},
            {"id": "hub", "chosen": [user("hi"), asst("yo")], "rejected": [user("hi"), asst("no")],
             "score_chosen": 8, "score_rejected": 3},
            {"id": "trl", "prompt": [user("hi")], "chosen": [asst("yo")], "rejected": [asst("no")],
             "strength": 2},
            {"id": "tie", **answered, "strength": "tie"},
            {"id": "zero", **answered, "strength": 0},
            {"id": "f", "messages": [user("hi")], "judge": {"failed": True, "raw": "??"}},
            {"id": "a1", "messages": [user("hi")], "responses": ["yo", "no"], "status": "failed",
             "error": "429"},
            {"id": "a2", "messages": [user("hi")], "responses": ["yo", "no"], "status": "tie",
             "judge": {}}]
    pairs, skipped = train_rm.parse_pairs([(f"f:{i}", r) for i, r in enumerate(recs, 1)])
    assert [p["chosen"] for p in pairs] == [[user("hi"), asst("yo")]] * 3
    assert [(p["strength"], p["margin"]) for p in pairs] == \
        [("slightly better", 1.0), ("none", 0.0), ("2", 2.0)]
    assert skipped == {"tie": 3, "judge failed": 2}
    good = recs[0]
    bad = [{**good, "rejected": "yo"}, {k: v for k, v in good.items() if k != "chosen"},
           {**good, "messages": [user("hi"), asst("x")]}, {**good, "strength": "way better"}]
    reasons = ["chosen and rejected are identical", "missing 'chosen'",
               "conversation must end with a user turn", "unknown strength 'way better'"]
    # an empty reply is a reply (a policy that answered EOS at once; annotate.py judges it)
    assert train_rm.parse_pairs([("f:1", {**good, "rejected": ""})])[0][0]["rejected"][-1] == \
        asst("")
    path = write_jsonl(tmp_path / "bad.jsonl", [good] + bad)
    for i, reason in enumerate(reasons):
        with pytest.raises(D.DataError, match=rf"bad.jsonl:{i + 2}: {reason}"):
            train_rm.parse_pairs([(f"{path}:{i + 2}", bad[i])])
    # a binarized hub set (message lists, scores), saved to disk as `datasets` would fetch it
    import datasets
    datasets.Dataset.from_list(recs[1:2] * 3).save_to_disk(str(tmp_path / "hub"))
    assert len(train_rm.load_pairs([str(tmp_path / "hub")])[0]) == 3
    pairs, skipped = train_rm.load_pairs([path], skip_bad=True)
    assert len(pairs) == 1 and sum(skipped.values()) == len(bad)
    p = run_script("train_rm.py", "--model", tiny_vicuna, "--data", path,
                   "--out", str(tmp_path / "o"), check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last == f"error: {path}:2: chosen and rejected are identical"
