"""Shared fixtures: tokenizers trained here (a Llama-style SentencePiece with byte fallback, and a
ChatML byte-level BPE) and tiny random Llama checkpoints saved in the HF layout. No network."""
import io, json, os, random, subprocess, sys
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data as D  # noqa: E402
import model as M  # noqa: E402
import training as T  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog paris is the capital of france what city hello world "
         "yes no good bad answer question user assistant chat tell me about math one two three four five "
         "plus minus equals red green blue cat sat on mat").split()

def corpus(n=1500, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n)]

@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A Llama-2-like tokenizer: SentencePiece BPE, byte fallback, <unk>=0 <s>=1 </s>=2."""
    import sentencepiece as spm
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("sptok")
    buf = io.BytesIO()
    sents = corpus() + [D.SYSTEM_VICUNA + " USER: ASSISTANT:"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sents), model_writer=buf, vocab_size=320, model_type="bpe",
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
                                   normalization_rule_name="identity", minloglevel=2)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(str(d))
    out = tmp_path_factory.mktemp("sptok_hf")
    tok.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out))

@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """A SmolLM2-like ChatML tokenizer: byte-level BPE with <|endoftext|> <|im_start|> <|im_end|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = D.JINJA["chatml"]
    d = tmp_path_factory.mktemp("bpetok")
    tok.save_pretrained(str(d))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(d))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)

def make_checkpoint(path, tok, template, seed=0, reward=False, std=0.1, **overrides):
    """Save a random tiny Llama for `tok` as an HF folder at path; returns path."""
    cfg = M.LlamaConfig(**(TINY | overrides), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                        eos_token_id=D.eos_id(tok, template), pad_token_id=None)
    torch.manual_seed(seed)
    model = M.Llama(cfg, reward=reward)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=std) if "norm" not in name else torch.nn.init.uniform_(p, 0.8, 1.2)
    tok.chat_template = D.JINJA[template]
    M.save_checkpoint(str(path), model.state_dict(), cfg, tok, {"chat_template_name": template})
    return str(path)

@pytest.fixture
def tiny_vicuna(tmp_path, sp_tokenizer):
    return make_checkpoint(tmp_path / "tiny_vicuna", sp_tokenizer, "vicuna")

@pytest.fixture
def tiny_chatml(tmp_path, bpe_tokenizer):
    return make_checkpoint(tmp_path / "tiny_chatml", bpe_tokenizer, "chatml", tie_word_embeddings=True)

def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)

def torchrun(nproc):
    """torchrun on a free port: --standalone lets the rendezvous bind port 0, so concurrent tests (or a
    port left in TIME_WAIT) never collide, as a random --master_port could. "--": torchrun would take
    --n as its own flag."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--"]

def run_script(*args, nproc=1, timeout=600, check=True, env=None):
    """Run a stage script as a user would (python X.py or torchrun), from the repo root."""
    cmd = [sys.executable, *args] if nproc == 1 else torchrun(nproc) + list(args)
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p
