"""data.py: templates and loss masks, JSONL errors, ShareGPT, resume helpers."""
import json, re
import pytest
from conftest import D, write_jsonl

VICUNA_2TURN = ("{sys} USER: Hi there ASSISTANT: Hello! How can I help?</s>USER: Tell me a joke ASSISTANT: No.</s>")
CONV = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}]

@pytest.mark.parametrize("system", [None, "You are terse."])
def test_vicuna_text_and_mask(sp_tokenizer, system):
    tok = sp_tokenizer
    conv = ([{"role": "system", "content": system}] if system else []) + CONV
    ids, mask = D.render(tok, conv, "vicuna")
    expected = VICUNA_2TURN.format(sys=system or D.SYSTEM_VICUNA)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=False).replace("<s>", "", 1).lstrip() == expected
    # the masked tokens are exactly the two replies, each with its EOS id (never "</s>" as text)
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur); cur = []
    spans += [cur] if cur else []
    assert [tok.decode(s[:-1]).strip() for s in spans] == ["Hello! How can I help?", "No."]
    assert all(s[-1] == tok.eos_token_id for s in spans) and ids.count(tok.eos_token_id) == 2
    # the prompt for the second reply is a prefix of the training ids, mask starting right after
    prompt, pmask = D.render(tok, conv[:-1], "vicuna", prompt=True)
    assert ids[:len(prompt)] == prompt and mask[len(prompt)] == 1 and pmask == mask[:len(prompt)]
    assert tok.decode(prompt).endswith("ASSISTANT:")
    # and transformers' apply_chat_template with the saved jinja gives the same text
    tok.chat_template = D.JINJA["vicuna"]
    assert tok.apply_chat_template(conv, tokenize=False).replace("<s>", "", 1) == expected

def test_chatml_matches_jinja(bpe_tokenizer):
    tok = bpe_tokenizer
    ids, mask = D.render(tok, CONV, "chatml")
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert tok.decode(ids) + "\n" == text
    prompt, _ = D.render(tok, CONV[:-1], "chatml", prompt=True)
    assert tok.decode(prompt) == tok.apply_chat_template(CONV[:-1], tokenize=False, add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt and sum(mask) == len(tok.encode("Hello! How can I help?")) + len(tok.encode("No.")) + 2


def test_bad_input_errors(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}', "{not json"])
    with pytest.raises(D.DataError, match=r"bad.jsonl:2: malformed JSON"):
        list(D.read_jsonl(bad))
    role = write_jsonl(tmp_path / "role.jsonl", [{"id": "a", "messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(D.DataError, match=r"role.jsonl:1: .*unknown role 'robot'"):
        [D.get_messages(r, w) for w, r in D.read_jsonl(role)]
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"id": "a", "messages": []}])
    with pytest.raises(D.DataError, match=r"empty.jsonl:1: empty conversation"):
        [D.get_messages(r, w) for w, r in D.read_jsonl(empty)]
    nothing = write_jsonl(tmp_path / "nothing.jsonl", [])
    with pytest.raises(D.DataError, match=r"nothing.jsonl:1: empty file"):
        list(D.read_jsonl(nothing))

def test_sharegpt_is_normalized(tmp_path):
    p = write_jsonl(tmp_path / "s.jsonl", [{"id": "s", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    (w, r), = D.read_jsonl(p)
    assert D.get_messages(r, w) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]

def test_done_ids_drops_torn_line(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "x":')
    assert D.truncate_torn(str(p)) == {"a", "b"} and p.read_text() == '{"id": "a"}\n{"id": "b"}\n'


@pytest.mark.parametrize("fixture,template", [("sp_tokenizer", "vicuna"), ("bpe_tokenizer", "chatml")])
def test_render_is_linear_and_exact(request, fixture, template):
    """A long conversation is encoded a turn at a time (the text encoded grows linearly with the
    turns), and its ids are those of the whole rendered text tokenized at once."""
    tok = request.getfixturevalue(fixture)
    encoded = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, s, **kw):
            encoded.append(len(s))
            return tok.encode(s, **kw)

    def conv(turns):
        return [{"role": r, "content": f"turn {i} says {'hello there ' * (i % 3 + 1)}".strip()}
                for i in range(turns) for r in ("user", "assistant")]
    sizes = []
    for turns in (20, 40):
        encoded.clear()
        ids, _ = D.render(Counting(), conv(turns), template)
        sizes.append(sum(encoded))
    assert sizes[1] < 2.3 * sizes[0]  # quadratic would be ~4x
    tok.chat_template = D.JINJA[template]
    text = tok.apply_chat_template(conv(40), tokenize=False)
    bos = []
    if template == "chatml":
        text = text[:-1]  # the template's "\n" after the last <|im_end|> is not trained on
    else:
        text, bos = text.replace("<s>", "", 1), [tok.bos_token_id]  # BOS is added as an id
    assert ids == bos + tok.encode(text, add_special_tokens=False)

def test_not_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"id": "a"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(D.DataError, match=r"latin1.jsonl:2: not UTF-8"):
        list(D.read_jsonl(str(p)))

@pytest.mark.parametrize("fixture,template,literal", [("sp_tokenizer", "vicuna", "</s>"),
                                                      ("bpe_tokenizer", "chatml", "<|im_end|>")])
def test_special_token_text_in_content_is_text(request, fixture, template, literal):
    """A user (or a reply) that writes "</s>" or "<|im_end|>" writes text: the EOS id appears only where
    a turn closes, the decoded text keeps the literal, and the prompt stays a prefix of the whole."""
    tok = request.getfixturevalue(fixture)
    conv = [{"role": "user", "content": f"what does {literal} mean?"},
            {"role": "assistant", "content": f"{literal} ends a turn"},
            {"role": "user", "content": f"and {literal}{literal} twice"}, {"role": "assistant", "content": "ok"}]
    ids, mask = D.render(tok, conv, template)
    plain = [dict(m, content=m["content"].replace(literal, "x")) for m in conv]
    eos, clean = D.eos_id(tok, template), D.render(tok, plain, template)[0]
    assert ids.count(eos) == clean.count(eos) and ids[-1] == eos
    assert tok.decode(ids).count(literal) == tok.decode(clean).count(literal) + 4
    prompt, _ = D.render(tok, conv[:-1], template, prompt=True)
    assert ids[:len(prompt)] == prompt and mask[len(prompt)] == 1
    replies = [i for i, m in zip(ids, mask) if m]  # the reply's literal, and the two closing EOS
    assert tok.decode(replies).count(literal) == 3

def test_unfinished_reply_has_no_eos(sp_tokenizer):
    conv = [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two three"}]
    done, mask = D.render(sp_tokenizer, conv, "vicuna")
    cut, cmask = D.render(sp_tokenizer, conv, "vicuna", closed=False)
    assert done[-1] == sp_tokenizer.eos_token_id and cut == done[:-1] and cmask == mask[:-1]

@pytest.mark.parametrize("content", ["a{}b", "say {} now", "{}", "x {}{} y"])
@pytest.mark.parametrize("fixture,template,literal", [("sp_tokenizer", "vicuna", "</s>"),
                                                      ("bpe_tokenizer", "chatml", "<|im_end|>")])
def test_special_token_text_decodes_exactly(request, fixture, template, literal, content):
    """The spelled-out literal adds nothing: the ids decode to the template's text, character for
    character (SentencePiece would put a space before a literal encoded on its own)."""
    tok = request.getfixturevalue(fixture)
    text = content.format(*[literal] * content.count("{}"))
    conv = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    ids, _ = D.render(tok, conv, template)
    tok.chat_template = D.JINJA[template]
    expected = tok.apply_chat_template(conv, tokenize=False)
    got = tok.decode(ids, skip_special_tokens=False)
    if template == "vicuna":  # BOS is an id of its own; SentencePiece decodes the text after it
        expected, got = expected.replace("<s>", "", 1), got.replace("<s>", "", 1).lstrip()
    else:
        expected = expected[:-1]  # the "\n" after the last <|im_end|> is not trained on
    assert got == expected

def test_truncate_torn_needs_the_newline(tmp_path):
    """A last record that parses but lacks its newline is torn too: the next append would be glued
    onto it (and the resume after that would lose both)."""
    p = tmp_path / "o.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}')
    assert D.truncate_torn(str(p)) == {"a"} and p.read_text() == '{"id": "a"}\n'
    D.append_jsonl(str(p), [{"id": "b"}, {"id": "c"}])
    assert D.truncate_torn(str(p)) == {"a", "b", "c"}
    p.write_bytes(b'{"id": "a"}\r\n{"id": "b"}\r\n{"id"')  # CRLF: byte offsets, not text ones
    assert D.truncate_torn(str(p)) == {"a", "b"} and p.read_bytes() == b'{"id": "a"}\r\n{"id": "b"}\r\n'

def test_special_token_added_later_is_text(bpe_tokenizer):
    """The split pattern is cached by the tokenizer's token names, not by the tokenizer: a special
    token added after a first render is still spelled as text when a user writes it."""
    from transformers import AutoTokenizer
    import tempfile
    d = tempfile.mkdtemp()
    bpe_tokenizer.save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "hi <|tool|> there"}]
    D.render(tok, msgs, "chatml", prompt=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tool = tok.convert_tokens_to_ids("<|tool|>")
    assert tool not in D.render(tok, msgs, "chatml", prompt=True)[0]


def test_json_array_files_stream_with_element_errors(tmp_path):
    recs = [{"id": f"s{i}", "conversations": [{"from": "human", "value": "a ], [ \"b\" {" * i}, {"from": "gpt", "value": "ok, }"}]}
            for i in range(50)]
    p = tmp_path / "sharegpt.json"
    p.write_text(json.dumps(recs, indent=2))
    for chunk in (1, 5, 1 << 20):  # elements cut anywhere by the read buffer, strings holding brackets and commas
        assert [r for _, r in D.read_json_array(str(p), chunk=chunk)] == recs
    assert [w for w, _ in D.read_records([str(p)])][:2] == [f"{p}[0]", f"{p}[1]"]
    for text, err in [('[{"id": "a"}, {"id": "b",}, {"id": "c"}]', "[1]: malformed JSON"),
                      ('[{"id": "a"}, "b"]', "[1]: expected a JSON object, got str"),
                      ('[{"id": "a"} {"id": "b"}]', "[1]: expected ',' or ']'"),
                      ('[{"id": "a"}, {"id": "b"', "[1]: malformed JSON"), ("[]", "[0]: empty array")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(D.DataError, match=re.escape(f"bad.json{err}")):
            D.read_records([str(tmp_path / "bad.json")])
    inf = '[{"abcdefgh": -Infinity, "x": 1e5}, {"id": "b"}]'  # a value cut by the buffer's end
    (tmp_path / "inf.json").write_text(inf)
    for chunk in range(1, 40):
        assert len(list(D.read_json_array(str(tmp_path / "inf.json"), chunk=chunk))) == 2
    bad = json.dumps([{"id": str(i), "text": "caf\u00e9 " * 20} for i in range(50)]).encode()
    (tmp_path / "bytes.json").write_bytes(bad.replace(b'"id": "40"', b'"id": "4\xff"'))
    for chunk in (7, 1 << 20):  # a byte that is not UTF-8 names its element, wherever it is read
        with pytest.raises(D.DataError, match=re.escape("bytes.json[40]: not UTF-8")):
            list(D.read_json_array(str(tmp_path / "bytes.json"), chunk=chunk))
    (tmp_path / "lines.json").write_text('{"id": "a"}\n{"id": "b"}\n')  # JSONL named .json: still JSONL
    assert [w for w, _ in D.read_records([str(tmp_path / "lines.json")])] == [f"{tmp_path / 'lines.json'}:1", f"{tmp_path / 'lines.json'}:2"]
