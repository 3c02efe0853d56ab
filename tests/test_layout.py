"""The layout of the repo: which top-level file may import which (README, "How the code is laid out")."""
import ast, glob, os, subprocess, sys
from conftest import ROOT

LOCAL = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
ALLOWED = {  # local modules each file may import; anything else local is a violation
    "model": set(),
    "data": set(),
    "training": {"model", "data"},
    "annotate": {"data", "scores", "mtbench"},
    "scores": set(),
    "mtbench": {"data"},
    "chat": {"model", "data", "serve"},
    "serve": {"model", "data"},
    "sample": {"model", "data", "mtbench"},
    "sft": {"model", "data", "training"},
    "train_rm": {"model", "data", "training"},
    "dpo": {"model", "data", "training"},
    "rejection_sft": {"model", "data", "training", "sft"},
}
NO_TORCH_AT_IMPORT = {"data", "annotate", "scores", "mtbench"}

def imports(path, top_level_only=False):
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names

def test_import_rules():
    assert set(ALLOWED) >= LOCAL, f"a new top-level file needs its rule here: {LOCAL - set(ALLOWED)}"
    for name in sorted(LOCAL):
        path = os.path.join(ROOT, f"{name}.py")
        local = imports(path) & LOCAL - {name}
        assert local <= ALLOWED[name], f"{name}.py imports {sorted(local - ALLOWED[name])}"
        if name in NO_TORCH_AT_IMPORT:
            assert "torch" not in imports(path, top_level_only=True), f"{name}.py imports torch"

def test_annotate_loads_no_torch():
    p = subprocess.run([sys.executable, "-X", "importtime", "annotate.py", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "torch" not in p.stderr
