"""The GPU path, for whoever has one: `python -m pytest -q tests/test_gpu.py` (skipped without CUDA).
flash-attn = SDPA within bf16 tolerance; two-GPU torchrun SFT and DPO smoke runs; sample.py on CUDA;
peak memory printed. On CPU the same paths run through tests/flash_stub (test_training.py)."""
import json, os
import pytest
import torch
from conftest import D, M, make_checkpoint, run_script, write_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

def test_flash_equals_sdpa():
    if M.flash_attn_varlen_func is None:
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(0)
    q = torch.randn(300, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 300, 2, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 100, 170, 300], dtype=torch.int32, device="cuda")
    flash = M.attention(q, k, v, cu, 130)
    M.flash_attn_varlen_func, saved = None, M.flash_attn_varlen_func
    try:
        sdpa = M.attention(q, k, v, cu, 130)
    finally:
        M.flash_attn_varlen_func = saved
    assert (flash.float() - sdpa.float()).abs().max() <= 2e-2

def pairs_file(tmp_path):
    convs = [json.loads(l) for l in open(os.path.join(os.path.dirname(__file__), "..", "data", "sft.jsonl"))]
    pairs = [{"id": c["id"], "messages": c["messages"][:-1], "chosen": c["messages"][-1]["content"],
              "rejected": "no"} for c in convs]
    return write_jsonl(tmp_path / "pairs.jsonl", pairs)

@pytest.mark.parametrize("stage", ["sft.py", "dpo.py"])
def test_torchrun_two_gpus(tmp_path, tiny_vicuna, stage):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    data = os.path.join(os.path.dirname(__file__), "..", "data", "sft.jsonl") if stage == "sft.py" \
        else pairs_file(tmp_path)
    p = run_script(stage, "--model", tiny_vicuna, "--data", data, "--out", str(tmp_path / "o"),
                   "--max-steps", "3", "--batch-tokens", "1024", nproc=2)
    log = [json.loads(l) for l in open(tmp_path / "o" / "log.jsonl")]
    print(stage, log[-1])
    assert len(log) == 3 and all(r["loss"] == r["loss"] for r in log)

def test_single_gpu_training_and_sampling(tmp_path, tiny_vicuna):
    pairs = pairs_file(tmp_path)
    for dtype in ("bfloat16", "float32"):
        run_script("train_rm.py", "--model", tiny_vicuna, "--data", pairs, "--out", str(tmp_path / dtype),
                   "--max-steps", "2", "--batch-tokens", "1024", "--dtype", dtype, "--eval-frac", "0.2")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "messages": [{"role": "user",
                          "content": f"count to {i}"}]} for i in range(4)])
    p = run_script("sample.py", "--model", tiny_vicuna, "--data", prompts, "--n", "4",
                   "--max-new-tokens", "16", "--reward-model", str(tmp_path / "bfloat16"),
                   "--out", str(tmp_path / "s.jsonl"))
    print(p.stdout[-500:])
    recs = [json.loads(l) for l in open(tmp_path / "s.jsonl")]
    assert len(recs) == 4 and all(isinstance(r["reward"], float) for x in recs for r in x["responses"])

def test_int8_and_compiled_decode_on_cuda(monkeypatch, tmp_path):
    """On CUDA int8 dequantizes into the matmul (no int8 kernel there) and the compiled step runs as
    CUDA graphs: its greedy tokens equal eager's, float and int8; int8 logits stay near fp32's."""
    from test_quant import tiny_model
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    prompts = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14]]
    ids = torch.randint(3, 300, (2, 30), device="cuda")
    ref = tiny_model().cuda()
    with torch.no_grad():
        a, b = ref(ids), M.quantize_int8(tiny_model().cuda())(ids)
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    for int8 in (False, True):
        model = tiny_model().cuda()
        if int8:
            M.quantize_int8(model)
        run = lambda: (M.generate(model, prompts, max_new_tokens=12, temperature=0),  # noqa: E731
                       M.generate(model, prompts[:1], max_new_tokens=20, temperature=0))  # 1 row
        eager = run()
        torch._dynamo.reset()
        M.compile_decode(model)
        assert run() == eager
    torch._dynamo.reset()
