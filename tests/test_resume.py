"""A training run killed mid-way and resumed with --resume ends exactly where an uninterrupted one
does (same log, bit-identical weights), for each stage that trains through training.fit."""
import json, os, signal, subprocess, sys, time
import pytest
import torch
from conftest import M, ROOT, write_jsonl, run_script
from test_sft import convs
from test_train_rm import marker_pairs

STAGES = {  # script, its data, --batch-tokens: a dozen steps or more over two epochs
    "sft": ("sft.py", lambda: convs(24), "300"),
    "train_rm": ("train_rm.py", lambda: marker_pairs(12), "200"),
}

def losses(out):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl")))]

@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_and_resume_equals_uninterrupted(tmp_path, tiny_vicuna, stage):
    script, records, batch_tokens = STAGES[stage]
    data = write_jsonl(tmp_path / "d.jsonl", records())
    common = [script, "--model", tiny_vicuna, "--data", data, "--lr", "1e-3",
              "--batch-tokens", batch_tokens, "--epochs", "2", "--save-every", "1",
              "--warmup-steps", "2"]
    run_script(*common, "--out", str(tmp_path / "full"))
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, *common, "--out", str(out)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill it as soon as its first training state is on disk (the deadline only guards a hang)
    state = out / "state" / "step.json"
    deadline = time.time() + 120
    while not state.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = json.load(open(state))["step"]
    full = losses(tmp_path / "full")
    assert killed_at < len(full), "the run finished before it could be killed"
    run_script(*common, "--out", str(out), "--resume")
    assert losses(out) == pytest.approx(full, abs=1e-6)
    wa, wb = M.load_state_dict(str(tmp_path / "full")), M.load_state_dict(str(out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
