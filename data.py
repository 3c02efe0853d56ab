"""
The data that flows between the stages: JSONL records with errors that name file and line (and
JSON arrays, streamed, with errors that name file and element), dataset folders, conversations
(ours, ShareGPT's, AlpacaEval's), the chat templates that render a conversation to token ids and
a loss mask, packing and token-budget batches, resume helpers, and the dataclass -> command-line
config. No torch at import time: annotate.py, an HTTP client, loads it without torch.
"""
import argparse, dataclasses, functools, hashlib, inspect, json, math, os, random, re, sys

class DataError(ValueError):
    """Bad input: the message starts with 'file:line:'; run_main prints it without a traceback."""

# -------------------------------------------------------------------------------------------------
# JSONL (and JSON arrays): read with file:line (file.json[i]) errors, append, write
# atomically, resume

def read_jsonl(path):
    """Yield ('file:line', record); a malformed line raises DataError('file:line: ...')."""
    if not os.path.exists(path):
        raise DataError(f"{path}:0: no such file")
    n = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            n += 1
            yield where, rec
    if n == 0:
        raise DataError(f"{path}:1: empty file, no records")

def is_json_array(path):
    """A .json file holding one JSON array (AlpacaEval's, ShareGPT's), not JSONL."""
    if not path.endswith(".json"):
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096).lstrip()
    return head.startswith("[")

NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a bad byte

def read_json_array(path, chunk=1 << 20):
    """Yield ('file.json[i]', element) from a file holding one JSON array, streaming: elements are
    decoded one at a time from a text buffer read on as needed (ShareGPT's file is 650 MB), never
    the whole array at once. A bad element raises DataError('file.json[i]: reason')."""
    dec, buf, pos, i, need, dirty = json.JSONDecoder(), "", 0, 0, chunk, False
    # A byte that is not UTF-8 reads as a lone surrogate, so the error names its element
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        def read(n):
            nonlocal dirty
            got = f.read(n)
            dirty = dirty or NOT_UTF8.search(got) is not None
            return got

        def peek():  # the next character that is not a space, reading on ('' at the end)
            nonlocal buf, pos
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf) or not (got := read(chunk)):
                    return buf[pos:pos + 1]
                buf, pos = got, 0

        def expect(chars):
            nonlocal pos
            if (c := peek()) == "" or c not in chars:
                got = repr(c) if c else "the end of the file"
                want = " or ".join(map(repr, chars))
                raise DataError(f"{path}[{i}]: expected {want}, got {got}")
            pos += 1
            return c

        expect("[")
        if peek() == "]":
            raise DataError(f"{path}[0]: empty array, no records")
        while True:
            peek()  # raw_decode takes no leading spaces
            try:
                rec, end, err = *dec.raw_decode(buf, pos), None
            except json.JSONDecodeError as e:  # an element the buffer's end cut fails near it
                cut = e.pos >= len(buf) - 10 or e.msg.startswith("Unterminated string")
                rec, end, err = None, len(buf) if cut else e.pos, e
            if end == len(buf) and (got := read(need)):  # (or a number that goes on): read on
                buf, pos, need = buf[pos:] + got, 0, 2 * need  # doubling: re-parsed O(log) times
                continue
            if dirty and NOT_UTF8.search(buf, pos, end):
                raise DataError(f"{path}[{i}]: not UTF-8")
            if err:
                raise DataError(f"{path}[{i}]: malformed JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}[{i}]: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}[{i}]", rec
            pos, need, i = end, chunk, i + 1
            if expect(",]") == "]":
                break
        if peek():
            raise DataError(f"{path}[{i}]: text after the closing ']'")

def dumps(rec):
    return json.dumps(rec, ensure_ascii=False) + "\n"

def append_jsonl(path, records):
    """One write per call: a kill loses at most a torn last line, which truncate_torn drops."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(dumps(r) for r in records))

def write_jsonl_atomic(path, records):
    """Written aside, then renamed: a killed run never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(dumps(r) for r in records)
    os.replace(path + ".tmp", path)

def truncate_torn(path):
    """Resume an append-only output: cut a torn last line (a kill mid-write) off the file, in
    place, and return the ids of the complete records before it. A record is complete with its
    newline only: one that parses without it would have the next append glued onto it."""
    ids = set()
    if os.path.exists(path):
        with open(path, "rb+") as f:  # bytes: the offsets are the file's, whatever its line ends
            good = 0
            for line in f:
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("no newline")
                    ids.add(json.loads(line)["id"])
                    good += len(line)
                except (ValueError, KeyError, TypeError):  # JSONDecodeError, bad UTF-8 too
                    break
            f.truncate(good)
    return ids

# -------------------------------------------------------------------------------------------------
# Records: conversations in our format or ShareGPT's, datasets, Xwin-Set responses

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}

def check_messages(messages, prompt=False):
    if not isinstance(messages, list) or not messages:
        raise ValueError("empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} needs a string 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: unknown role {m.get('role')!r} "
                             "(system, user or assistant)")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"message {i}: a system message may only come first")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(turns)):
        raise ValueError("turns must alternate user, assistant, ... starting with user")
    if turns[-1] != ("user" if prompt else "assistant"):
        raise ValueError("conversation must end with "
                         f"{'a user' if prompt else 'an assistant'} turn")

def get_messages(rec, where, prompt=False):
    """The record's conversation, normalized (ShareGPT too) and checked; errors name file:line."""
    msgs = rec.get("messages")
    if msgs is None and isinstance(rec.get("conversations"), list):
        msgs = [{"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")),
                 "content": m.get("value")} if isinstance(m, dict) else m
                for m in rec["conversations"]]
    try:
        check_messages(msgs, prompt)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    return [{"role": m["role"], "content": m["content"]} for m in msgs]

def alpaca_record(rec):
    """AlpacaEval's {"instruction", "input"?, "output"?, "generator", "dataset"} as ours: messages,
    and an id made from the instruction (its files have none), the same on both sides of a
    comparison, so --a alpaca_eval.json --b ours.json match by instruction. Other records: as
    they are."""
    if "messages" in rec or not isinstance(rec.get("instruction"), str):
        return rec
    text = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    rid = rec.get("id") or "alpaca-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return rec | {"id": rid, "messages": [{"role": "user", "content": text}]}

def load_dataset_records(name, split="train"):
    """A Hub dataset, a folder written by save_to_disk, or a folder of .json/.jsonl/.parquet files
    (a cloned dataset repository), through `datasets`: records, where='name[i]'."""
    import datasets
    saved = any(os.path.exists(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json"))
    kind = "parquet" if name.endswith(".parquet") and os.path.isfile(name) else None
    try:
        ds = (datasets.load_from_disk(name) if saved else
              datasets.load_dataset(kind, data_files=name, split=split) if kind else
              datasets.load_dataset(name, split=split))
    except Exception as e:
        raise DataError(f"{name}:0: cannot load dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    return [(f"{name}[{i}]", dict(r)) for i, r in enumerate(ds)]

def read_records(paths, split="train"):
    """--data values: JSONL files, .json files holding one array, .parquet files, or a dataset
    (a Hub name, or a folder: save_to_disk's, or of .json/.jsonl/.parquet files).
    -> list of (where, record)."""
    out = []
    for p in paths:
        if p.endswith(".parquet") or not (p.endswith((".jsonl", ".json")) or os.path.isfile(p)):
            out += load_dataset_records(p, split)
        elif os.path.isfile(p) and is_json_array(p):
            out += read_json_array(p)
        else:
            out += read_jsonl(p)
    return out

def scored_responses(rec, where, n=0):
    """The first n (0: all) responses of an Xwin-Set record, each checked for a string 'content'
    and a finite numeric 'reward' (what sample.py --reward-model writes)."""
    responses = rec.get("responses")
    if not isinstance(responses, list) or not responses:
        raise DataError(f"{where}: no responses "
                        "(an Xwin-Set record needs 'responses': [{content, reward}, ...])")
    cands = responses[:n] if n > 0 else responses
    for i, r in enumerate(cands):
        if not isinstance(r, dict) or not isinstance(r.get("content"), str):
            raise DataError(f"{where}: response {i} needs a string 'content'")
        reward = r.get("reward")
        numeric = isinstance(reward, (int, float)) and not isinstance(reward, bool)
        if not numeric or not math.isfinite(reward):
            raise DataError(f"{where}: response {i} has no numeric reward ({reward!r}); "
                            "score the responses with sample.py --reward-model")
    return cands

def truncated(response):
    """A response stopped by sample.py's --max-new-tokens: it never ended (no EOS to train on)."""
    return bool(response.get("truncated")) or response.get("finish_reason") == "length"

def split_eval(items, frac, seed):
    """-> (train, held out): a seeded random fraction of the items held out (at least one)."""
    items = items[:]
    random.Random(seed).shuffle(items)
    k = max(1, int(len(items) * frac))
    return items[k:], items[:k]

# -------------------------------------------------------------------------------------------------
# Chat templates: one function renders a conversation to token ids and an assistant-only loss mask

SYSTEM_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_SMOL = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEMPLATES = {  # system part, user turn (ends with the assistant prefix), reply, text after the EOS
    "vicuna": dict(bos=True, eos=None, system=SYSTEM_VICUNA, sys="{} ",
                   user="USER: {} ASSISTANT:", reply=" {}", after_eos=""),
    "chatml": dict(bos=False, eos="<|im_end|>", system=SYSTEM_SMOL,
                   sys="<|im_start|>system\n{}<|im_end|>\n",
                   user="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                   reply="{}", after_eos="\n"),
}
JINJA = {  # the same, for transformers' apply_chat_template and vLLM; saved with checkpoints
    "vicuna": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
              "{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}"
              "{% else %}{% set sys = '" + SYSTEM_VICUNA.replace("'", "\\'") + "' %}"
              "{% set msgs = messages %}{% endif %}{{ sys + ' ' }}"
              "{% for m in msgs %}{% if m['role'] == 'user' %}"
              "{{ 'USER: ' + m['content'] + ' ASSISTANT:' }}{% else %}"
              "{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}",
    "chatml": "{% if messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\\n" + SYSTEM_SMOL + "<|im_end|>\\n' }}{% endif %}"
              "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
              "+ '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
}

def get_template(saved, override=""):
    """The run's template: --template when given, else the checkpoint's own (model.load_model)."""
    name = override or saved
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}: {', '.join(TEMPLATES)}")
    return name

def eos_id(tok, template):
    name = TEMPLATES[template]["eos"]
    if name is None:
        return tok.eos_token_id
    i = tok.convert_tokens_to_ids(name)
    if i is None or i == tok.unk_token_id:
        raise ValueError(f"template {template} needs the token {name} in the vocabulary")
    return i

def stop_ids(tok, template, config_eos):
    """Every id that ends a reply: the template's EOS and the checkpoint's eos_token_id(s)."""
    extra = config_eos if isinstance(config_eos, list) else [config_eos]
    return sorted({eos_id(tok, template)} | set(extra) - {None})

def render(tok, messages, template, prompt=False, closed=True):
    """-> (ids, mask). mask[i] = 1 on every assistant token and its closing EOS, 0 elsewhere.
    prompt=True renders a conversation ending with a user turn, open for the assistant to answer.
    The ids are those of the whole rendered text (EOS written as its token, which the tokenizer
    maps to the EOS id, so SentencePiece adds no leading space after it), cut at each turn
    boundary: the ids of a prompt are a prefix of the ids of the same conversation with its answer.
    A special token's text inside a message ("</s>" pasted by a user) is spelled in ordinary
    tokens, never that token. closed=False leaves the last reply without its EOS: a reply cut at
    --max-new-tokens never ended, and scoring or training it as if it had would teach the model
    to stop there."""
    check_messages(messages, prompt)
    t = TEMPLATES[template]
    enc = lambda s, **kw: tok.encode(s, add_special_tokens=False, **kw)
    eos = eos_id(tok, template)
    eos_text = tok.convert_ids_to_tokens(eos)
    literal = special_pattern(tok)
    system = messages[0]["content"] if messages[0]["role"] == "system" else t["system"]
    ids = [tok.bos_token_id] if t["bos"] and tok.bos_token_id is not None else []
    mask = [0] * len(ids)
    # Encoded a window at a time: text and done (its ids, cut at boundaries) restart at each EOS.
    # Tokenizers split at special tokens before anything else, so what follows an EOS tokenizes the
    # same in the window (which starts with the EOS) as in the whole text, and the cost is linear.
    text, done = "", []

    def literal_ids(s):  # s in plain tokens as they follow other text: after "\n", whose ids are
        nl = enc("\n", split_special_tokens=True)  # dropped (SentencePiece would otherwise
        after = enc("\n" + s, split_special_tokens=True)  # prefix a lone s with a space)
        return after[len(nl):] if after[:len(nl)] == nl else enc(s, split_special_tokens=True)

    def cut(flag):  # extend ids with the tokens of `text` beyond what is already done
        nonlocal done
        full = enc(text)
        new = full[len(done):] if full[:len(done)] == done else enc(text[len(tok.decode(done)):])
        done = done + new
        ids.extend(new)
        mask.extend([flag] * len(new))

    def add(form, content, flag):  # template text around a message's content
        nonlocal text, done
        before, after = form.split("{}")
        text += before
        for i, piece in enumerate(literal.split(content) if literal else [content]):
            if i % 2 == 0:
                text += piece
                continue
            cut(flag)  # a literal special token: its text in plain tokens, then on as after an EOS
            plain = literal_ids(piece)
            ids.extend(plain)
            mask.extend([flag] * len(plain))
            text, done = eos_text, [eos]
        text += after

    add(t["sys"], system, 0)
    for i, m in enumerate(messages):
        if m["role"] == "user":
            add(t["user"], m["content"], 0)
        elif m["role"] == "assistant" and not closed and i == len(messages) - 1:
            cut(0)  # an unfinished reply: no EOS, nothing after
            add(t["reply"], m["content"], 1)
            cut(1)
        elif m["role"] == "assistant":
            cut(0)
            add(t["reply"] + eos_text, m["content"], 1)
            cut(1)
            if ids[-1] != eos:
                raise ValueError(f"the tokenizer does not map {eos_text!r} to its EOS id {eos}")
            text, done = eos_text + t["after_eos"], [eos]
    if prompt:
        cut(0)
    return ids, mask

def special_pattern(tok):
    """A regex splitting text at the tokenizer's special and added tokens' strings (kept as
    groups), or None when it has none. Cached by the names: a token added later is seen."""
    names = set(tok.all_special_tokens) | {a.content for a in tok.added_tokens_decoder.values()}
    return compile_split(tuple(sorted((n for n in names if n), key=len, reverse=True)))

@functools.lru_cache(maxsize=16)  # compiled once per vocabulary, not once per conversation
def compile_split(names):
    return re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

def show_mask(tok, ids, mask):
    """The tokens, with loss-masked ones in green: a glance tells whether the template is right."""
    piece = lambda i: tok.decode([i]).replace("\n", "\\n\n")
    return "".join(f"\033[42m{piece(i)}\033[0m" if m else piece(i) for i, m in zip(ids, mask))

# -------------------------------------------------------------------------------------------------
# Batching: varlen packing, token-budget micro-batches, the plan of a whole run

def keep_end(ids, max_len):
    """Cut a sequence to max_len keeping its first token (BOS) and its end: a reward is read at the
    closing EOS, so the end must survive."""
    return ids if len(ids) <= max_len else ids[:1] + ids[len(ids) - max_len + 1:]

def pack(docs, device="cpu"):
    """A list of token lists -> one packed row: input_ids [T] and cu_seqlens [n+1] int32."""
    import torch
    lens = [len(d) for d in docs]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return torch.tensor([t for d in docs for t in d], dtype=torch.long, device=device), cu

def make_batches(lengths, batch_tokens, seed=0, shuffle=True):
    """Group items (by their token lengths) into micro-batches of at most batch_tokens tokens
    each, in a seeded random order. Packing is varlen: a micro-batch wastes nothing on padding."""
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(seed).shuffle(order)
    batches, cur, size = [], [], 0
    for i in order:
        if lengths[i] > batch_tokens:
            raise DataError(f"--batch-tokens {batch_tokens} is smaller than an item of "
                            f"{lengths[i]} tokens: raise it or lower --max-len")
        if cur and size + lengths[i] > batch_tokens:
            batches.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += lengths[i]
    return batches + ([cur] if cur else [])

def plan_batches(lengths, batch_tokens, epochs, seed, counts=None, docs=1, shuffle=True):
    """Every micro-batch of a run, epoch after epoch, each epoch in its own seeded order:
    deterministic, so a resumed run and any number of ranks see the same batches. Each is {idx,
    tokens, docs (packed sequences: `docs` per item), count (its share of the loss normalizer:
    counts[i] summed, else the number of items)}."""
    plan = []
    for epoch in range(epochs):
        for idx in make_batches(lengths, batch_tokens, seed + epoch, shuffle):
            count = sum(counts[i] for i in idx) if counts else len(idx)
            plan.append({"idx": idx, "tokens": sum(lengths[i] for i in idx),
                         "docs": docs * len(idx), "count": count})
    return plan

# -------------------------------------------------------------------------------------------------
# Config: a dataclass -> argparse, help text from the field's trailing comment; the entry point

def parse_config(cls, argv=None):
    helps = {}
    for c in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):  # base fields too
        # a field's help: its trailing comment, continued on deeper-indented comment lines below it
        src = inspect.getsource(c)
        found = re.findall(r"^( +)(\w+)\s*:[^#\n]*#\s*(.*(?:\n\1 +#.*)*)", src, re.M)
        helps |= {name: re.sub(r"\s*\n\s*#\s*", " ", text) for _, name, text in found}
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(default=default, help=helps.get(f.name, " "))
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            p.add_argument(flag, nargs="+", action="extend", **kw)
        else:
            p.add_argument(flag, type=type(default) if default is not None else str, **kw)
    args = p.parse_args(argv)
    for f in dataclasses.fields(cls):  # `--data x` replaces a list default, not extends it
        v = getattr(args, f.name)
        if isinstance(v, list) and f.default_factory is not dataclasses.MISSING:
            d = f.default_factory()
            if d and v[:len(d)] == d and len(v) > len(d):
                setattr(args, f.name, v[len(d):])
    return cls(**vars(args))

def run_main(fn):
    """Call a stage's main: a data error prints one line (file:line: reason) and exits 2."""
    try:
        fn()
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
