import json, os
import pytest
from conftest import D, M, write_jsonl, run_script
import rejection_sft
import sft

def xwin(i, rewards, prompt=None):
    msgs = prompt or [{"role": "user", "content": f"question {i}"}]
    return {"id": f"p{i}", "messages": msgs,
            "responses": [{"content": f"answer {i}.{j}", "reward": r}
                          for j, r in enumerate(rewards)]}

@pytest.fixture
def captured(monkeypatch):
    """Run rejection_sft in-process with sft.train replaced: returns what it would train on."""
    calls = []
    monkeypatch.setattr(sft, "train",
                        lambda cfg, convs, evals=None: calls.append((cfg, convs, evals)))

    def run(*args):
        calls.clear()
        rejection_sft.run([*args])
        return calls[0]
    return run

def read(path):
    return [json.loads(l) for l in open(path)]

def test_picks_argmax_with_deterministic_ties_and_respects_n(tmp_path, captured):
    multi = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]
    data = write_jsonl(tmp_path / "set.jsonl", [
        xwin(0, [0.1, 0.9, -2.0, 0.5]),
        # a tie inside the first four; the best overall is index 5
        xwin(1, [1.0, 3.0, 3.0, 2.0, 0.0, 9.0]),
        xwin(2, [-1, -3], prompt=multi)])
    out = tmp_path / "out"
    cfg, convs, _ = captured("--data", data, "--out", str(out))
    assert isinstance(cfg, sft.Config) and cfg.n == 0
    assert [c[1][-1]["content"] for c in convs] == ["answer 0.1", "answer 1.5", "answer 2.0"]
    assert convs[2][1] == multi + [{"role": "assistant", "content": "answer 2.0"}]
    assert convs[0][0].endswith("set.jsonl:1")
    sel = read(out / "selected.jsonl")
    assert [(s["id"], s["reward"], s["index"]) for s in sel] == \
        [("p0", 0.9, 1), ("p1", 9.0, 5), ("p2", -1.0, 0)]
    assert sel[1]["messages"] == [{"role": "user", "content": "question 1"},
                                  {"role": "assistant", "content": "answer 1.5"}]
    # --n 4: the best of the first four only, the first of the tied ones
    _, convs, _ = captured("--data", data, "--out", str(out), "--n", "4")
    assert [c[1][-1]["content"] for c in convs] == ["answer 0.1", "answer 1.1", "answer 2.0"]
    assert [s["reward"] for s in read(out / "selected.jsonl")] == [0.9, 3.0, -1.0]
    _, convs, _ = captured("--data", data, "--out", str(out), "--n", "1")
    assert [c[1][-1]["content"] for c in convs] == ["answer 0.0", "answer 1.0", "answer 2.0"]

def test_min_reward_and_eval_selection(tmp_path, captured, capsys):
    data = write_jsonl(tmp_path / "set.jsonl", [xwin(i, [i - 2.0, i - 1.5]) for i in range(5)])
    ev = write_jsonl(tmp_path / "ev.jsonl", [xwin(9, [0.0, 1.0])])
    _, convs, evals = captured("--data", data, "--out", str(tmp_path / "o"), "--min-reward", "0.5",
                               "--eval-data", ev)
    assert [c[1][-1]["content"] for c in convs] == ["answer 2.1", "answer 3.1", "answer 4.1"]
    assert [e[1][-1]["content"] for e in evals] == ["answer 9.1"]
    log = capsys.readouterr().out
    assert "kept 3 of 5 prompts" in log and "2 below --min-reward" in log
    assert "mean selected reward 1.5000" in log
    with pytest.raises(D.DataError, match="no prompt left"):
        captured("--data", data, "--out", str(tmp_path / "o"), "--min-reward", "100")

def test_bad_records_error_with_file_line_or_are_skipped(tmp_path, captured, capsys):
    good = xwin(0, [1.0, 2.0])
    no_reward = {**good, "responses": [{"content": "a", "reward": 1.0}, {"content": "b"}]}
    cases = {"no reward": (no_reward, r"response 1 has no numeric reward"),
             "empty": ({**good, "responses": []}, r"no responses"),
             "missing": ({"id": "x", "messages": good["messages"]}, r"no responses"),
             "nan": ({**good, "responses": [{"content": "a", "reward": float("nan")}]},
                     r"response 0 has no numeric reward"),
             "ends with assistant": ({**good, "messages": good["messages"]
                                      + [{"role": "assistant", "content": "a"}]},
                                     r"conversation must end with a user turn")}
    for name, (bad, msg) in cases.items():
        data = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
        with pytest.raises(D.DataError, match=rf"bad.jsonl:3: {msg}"):
            captured("--data", data, "--out", str(tmp_path / "o"))
    # a missing reward past --n is never looked at
    late = write_jsonl(tmp_path / "late.jsonl",
                       [{**good, "responses": good["responses"] + [{"content": "c"}]}])
    _, convs, _ = captured("--data", late, "--out", str(tmp_path / "o"), "--n", "2")
    assert convs[0][1][-1]["content"] == "answer 0.1"
    data = write_jsonl(tmp_path / "mixed.jsonl",
                       [good, cases["no reward"][0], cases["empty"][0], xwin(3, [5.0])])
    capsys.readouterr()
    _, convs, _ = captured("--data", data, "--out", str(tmp_path / "o"), "--skip-bad")
    assert [c[1][-1]["content"] for c in convs] == ["answer 0.1", "answer 3.0"]
    log = capsys.readouterr().out
    assert "kept 2 of 4 prompts" in log
    assert f"skipped 2 bad (first: {data}:2: response 1 has no numeric reward" in log

def test_cli_trains_through_sft_and_exports(tmp_path, tiny_vicuna):
    scored = [xwin(i, [0.0, float(i % 3), 1.0]) for i in range(8)]
    data = write_jsonl(tmp_path / "set.jsonl", scored + ["{oops"])
    out = tmp_path / "rs"
    p = run_script("rejection_sft.py", "--model", tiny_vicuna, "--data", data, "--out", str(out),
                   check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith(f"error: {data}:9: malformed JSON")
    data = write_jsonl(tmp_path / "set.jsonl", scored + [xwin(8, [])])
    p = run_script("rejection_sft.py", "--model", tiny_vicuna, "--data", data, "--out", str(out),
                   "--n", "2", "--skip-bad", "--batch-tokens", "256", "--epochs", "1",
                   "--lr", "1e-3")
    assert "kept 8 of 9 prompts" in p.stdout and "skipped 1 bad" in p.stdout
    sel = read(out / "selected.jsonl")
    assert [s["index"] for s in sel] == [0, 1, 1, 0, 1, 1, 0, 1]
    log = read(out / "log.jsonl")
    assert len(log) >= 1 and all(r["loss"] > 0 for r in log)
    # the export is a trained full checkpoint that our loader (and so chat.py) reads back
    _, _, template = M.load_model(str(out))
    assert template == "vicuna" and not os.path.exists(out / "state")  # finished: no --keep-state
    before, after = M.load_state_dict(tiny_vicuna), M.load_state_dict(str(out))
    assert before.keys() == after.keys() and any(not (before[k] == after[k]).all() for k in before)

def test_truncated_responses_are_never_the_best_by_default(tmp_path, captured, capsys):
    def cut(rec, *idx, key=("finish_reason", "length")):  # responses idx stopped at the limit
        for i in idx:
            rec["responses"][i][key[0]] = key[1]
        return rec
    data = write_jsonl(tmp_path / "set.jsonl", [
        cut(xwin(0, [0.1, 0.9, 0.5]), 1),  # the best was cut: the next best wins
        cut(xwin(1, [2.0, 3.0]), 0, 1, key=("truncated", True)),  # every one cut: dropped
        cut(xwin(2, [1.0, 4.0]), 0)])  # only a worse one cut
    capsys.readouterr()
    _, convs, _ = captured("--data", data, "--out", str(tmp_path / "o"))
    assert [c[1][-1]["content"] for c in convs] == ["answer 0.2", "answer 2.1"]
    assert [s["index"] for s in read(tmp_path / "o" / "selected.jsonl")] == [2, 1]
    log = capsys.readouterr().out
    assert "kept 2 of 3 prompts" in log and "1 with every candidate truncated" in log
    _, convs, _ = captured("--data", data, "--out", str(tmp_path / "o"), "--allow-truncated")
    assert [c[1][-1]["content"] for c in convs] == ["answer 0.1", "answer 1.1", "answer 2.1"]
    only_cut = write_jsonl(tmp_path / "cut.jsonl", [cut(xwin(0, [1.0]), 0)])
    with pytest.raises(D.DataError, match="no prompt left.*1 with every candidate truncated"):
        captured("--data", only_cut, "--out", str(tmp_path / "o"))
