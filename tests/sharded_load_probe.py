"""Run under torchrun by test_training.py: load a checkpoint for training (training.prepare_model) and
report this rank's peak host memory during the load, then check the shards against the full weights."""
import json, os, resource, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import transformers  # noqa: E402, F401  (imported before the measurement: its import is not the load)
import model as M, training as T  # noqa: E402

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

path, report = sys.argv[1], sys.argv[2]
cfg = T.TrainConfig(model=path, device="cpu", dtype="float32")
d = T.setup_dist(cfg)
before = rss_mb()
model, *_ = T.prepare_model(cfg)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
full = T.full_state_dict(model)  # gathered after the measurement
same = d.rank != 0 or all(torch.equal(full[k], v.float()) for k, v in M.load_state_dict(path).items()
                          if k in full)
with open(f"{report}.{d.rank}", "w") as f:
    json.dump({"peak_mb": peak, "same": same}, f)
T.barrier_and_destroy()
