"""The whole pipeline through the scripts' command lines, on a tiny random model and the demo data:
sft -> sample --n 2 -> annotate -> train_rm -> sample --n 4 --reward-model -> rejection_sft -> dpo -> chat.
The judge is a scripted OpenAI-compatible server (a tiny random model cannot follow the verdict
format); it prefers the longer reply, so its verdicts are consistent when the replies swap seats."""
import json, os, re, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import torch
import transformers
from conftest import D, M, T, ROOT, make_checkpoint, run_script

class Judge(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        a = re.search(r"<reply A>\n(.*?)\n</reply A>", text, re.S).group(1)
        b = re.search(r"<reply B>\n(.*?)\n</reply B>", text, re.S).group(1)
        verdict = "tie" if len(a) == len(b) else "A better" if len(a) > len(b) else "B better"
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": f"Longer is better here.\nVerdict: [[{verdict}]]"}}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass

def records(path):
    return [json.loads(l) for l in open(path)]

def test_pipeline_end_to_end(tmp_path, sp_tokenizer):
    base = make_checkpoint(tmp_path / "base", sp_tokenizer, "vicuna")
    data = os.path.join(ROOT, "data")
    t = lambda name: str(tmp_path / name)
    train = ["--max-len", "384", "--batch-tokens", "1024", "--max-steps", "2", "--lr", "1e-3"]

    run_script("sft.py", "--model", base, "--data", f"{data}/sft.jsonl", "--out", t("sft"), *train)
    assert os.path.exists(t("sft/model.safetensors"))

    run_script("sample.py", "--model", t("sft"), "--data", f"{data}/prompts.jsonl", "--n", "2", "--limit", "8",
               "--max-new-tokens", "12", "--out", t("pairs.jsonl"))
    pairs = records(t("pairs.jsonl"))
    assert len(pairs) == 8 and all(len(r["responses"]) == 2 for r in pairs)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run_script("annotate.py", "--data", t("pairs.jsonl"), "--out", t("judged.jsonl"), "--judge-model", "scripted",
                   "--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--workers", "2",
                   env={"OPENAI_API_KEY": "sk-test"})
    finally:
        server.shutdown()
    judged = records(t("judged.jsonl"))
    assert len(judged) >= 4 and all(len(r["chosen"]) > len(r["rejected"]) for r in judged)

    run_script("train_rm.py", "--model", t("sft"), "--data", t("judged.jsonl"), "--out", t("rm"), "--margin", *train)
    run_script("sample.py", "--model", t("sft"), "--data", f"{data}/prompts.jsonl", "--n", "4", "--limit", "8",
               "--max-new-tokens", "12", "--reward-model", t("rm"), "--out", t("xwin_set.jsonl"))
    xwin = records(t("xwin_set.jsonl"))
    assert len(xwin) == 8 and all(len(r["responses"]) == 4 and all(isinstance(x["reward"], float) for x in r["responses"]) for r in xwin)

    # a random tiny model seldom ends within 12 tokens (1 of these 32 replies did, then 0 after
    # a change of float rounding): --allow-truncated here and for DPO, so it needs no such luck
    run_script("rejection_sft.py", "--model", t("sft"), "--data", t("xwin_set.jsonl"), "--n", "4", "--out", t("rs"),
               "--allow-truncated", *train)
    run_script("dpo.py", "--model", t("rs"), "--data", t("xwin_set.jsonl"), "--pairs", "mu-2sigma", "--out", t("dpo"),
               "--allow-truncated", *train)

    # the final policy loads in transformers with our logits, and answers through chat.py --prompt
    ours, tok, template = M.load_model(t("dpo"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(t("dpo"), dtype=torch.float32)
    ids = torch.tensor([D.render(tok, [{"role": "user", "content": "what is two plus two"}], template, prompt=True)[0]])
    with torch.no_grad():
        assert (hf(ids).logits[0] - ours(ids)).abs().max() <= 1e-4
    p = run_script("chat.py", "--model", t("dpo"), "--prompt", "what is two plus two", "--temperature", "0",
                   "--max-new-tokens", "8", "--dtype", "float32")
    out = M.generate(ours, [ids[0].tolist()], max_new_tokens=8, temperature=0, eos_ids=[D.eos_id(tok, template)])[0][0]["ids"]
    text = lambda s: "".join(c for c in s if c.isprintable() and c != "\ufffd").strip()  # random bytes decode loosely
    assert text(p.stdout) == text(tok.decode(out, skip_special_tokens=True))
