"""Your own data: formats, label masks token by token, chat rendering, truncation, packing, splits, bad rows.

Everything here runs on a tiny random model and a tokenizer trained in the test (no ``../shared`` needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chainlora.data import DataSpec, UserData, encode_records, lm_loss, packed_collator
from chainlora.data.batches import EncodedDataset, PaddedCollator
from chainlora.data.chat import render_conversation, resolve_chat_template
from chainlora.data.encode import IGNORE_INDEX
from chainlora.errors import DataError
from chainlora.testing.tiny import tiny_causal_lm, tiny_tokenizer

CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer(extra_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path: Path, **spec) -> UserData:
    return UserData.load(DataSpec(path=str(path), **spec))


CHAT = [
    {
        "messages": [
            {"role": "user", "content": "Who wrote the book?"},
            {"role": "assistant", "content": "the author"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Answer Yes or No."},
            {"role": "user", "content": "Does it hold?"},
            {"role": "assistant", "content": "Yes"},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": "No"},
        ]
    },
]


# ------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("rows", "spec", "expected"),
    [
        ([{"text": "The capital of France is Paris."}], {}, "text"),
        ([{"prompt": "Question: who?", "completion": " the author"}], {}, "prompt_completion"),
        (CHAT, {}, "messages"),
        ([{"prompt": "It was", "choices": ["great", "terrible"], "label": 0}], {}, "choices"),
        ([{"instruction": "Name it.", "input": "", "output": "Paris"}], {}, "prompt_completion"),
        ([{"question": "Where?", "answer": "France"}], {}, "prompt_completion"),
        (
            [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}],
            {},
            "messages",
        ),
        (
            [{"review": "great film", "sentiment": "positive"}],
            {"columns": {"prompt": "review", "label": "sentiment"}, "choices": ["negative", "positive"]},
            "choices",
        ),
        (
            [{"q": "Where?", "a": "France"}],
            {"columns": {"prompt": "q", "completion": "a"}},
            "prompt_completion",
        ),
        (
            [{"q": "Where?", "a": "France"}],
            {"columns": {"prompt": "q", "completion": "a"}, "format": "messages"},
            "messages",
        ),
    ],
)
def test_format_is_detected_from_the_columns(tmp_path, rows, spec, expected):
    assert load(write_jsonl(tmp_path / "d.jsonl", rows), **spec).format == expected


def test_alpaca_columns_join_instruction_and_input(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    data = load(write_jsonl(tmp_path / "a.jsonl", rows))
    assert [r.prompt for r in data.records["train"]] == ["Translate.\n\nbonjour", "Say hi."]
    assert [r.completion for r in data.records["train"]] == ["hello", "hi"]


def test_prompt_template_builds_the_prompt_from_columns(tmp_path):
    rows = [{"review": "a great film", "label": 1}]
    data = load(
        write_jsonl(tmp_path / "r.jsonl", rows),
        prompt_template="Review: {review}\nSentiment:",
        choices=["negative", "positive"],
    )
    (record,) = data.records["train"]
    assert record.prompt == "Review: a great film\nSentiment:" and record.label == 1
    (example,) = UserData.examples([record])
    assert example.candidates == (record.prompt + " negative", record.prompt + " positive")


# ------------------------------------------------------------------------------------------- labels


def test_prompt_completion_labels_token_by_token(tmp_path, tokenizer):
    data = load(
        write_jsonl(
            tmp_path / "pc.jsonl", [{"prompt": "Question: who wrote it?", "completion": " the author"}]
        )
    )
    (example,), stats = encode_records(data.records["train"], data.format, tokenizer, max_length=512)
    prompt_ids = tokenizer("Question: who wrote it?")["input_ids"]
    completion_ids = tokenizer(" the author", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    assert list(example.input_ids) == prompt_ids + completion_ids  # the prompt exactly as generation sees it
    assert list(example.labels) == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert stats.trained_tokens == len(completion_ids) and stats.cut == stats.dropped == 0


def test_text_trains_every_token_and_ends_with_eos(tmp_path, tokenizer):
    data = load(write_jsonl(tmp_path / "t.jsonl", [{"text": "The capital of France is Paris."}]))
    (example,), _ = encode_records(data.records["train"], data.format, tokenizer, max_length=512)
    assert example.input_ids[-1] == tokenizer.eos_token_id and example.labels == example.input_ids


def test_chat_tokens_equal_apply_chat_template_and_only_assistant_turns_train(tmp_path, tokenizer):
    data = load(write_jsonl(tmp_path / "c.jsonl", CHAT))
    template = resolve_chat_template(tokenizer, None, "tiny")
    encoded, _ = encode_records(
        data.records["train"], data.format, tokenizer, max_length=512, template=template
    )
    for row, example in zip(CHAT, encoded, strict=True):
        assert (
            list(example.input_ids)
            == tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
        )
        # decode the trained tokens: exactly each assistant turn's content and its end-of-turn marker
        trained, spans, current = [], [], []
        for token, label in zip(example.input_ids, example.labels, strict=True):
            if label != IGNORE_INDEX:
                assert label == token
                current.append(token)
            elif current:
                spans.append(tokenizer.decode(current))
                current = []
        spans += [tokenizer.decode(current)] if current else []
        expected = [m["content"] + "<|im_end|>\n" for m in row["messages"] if m["role"] == "assistant"]
        assert spans == expected
        # every system / user token is masked
        for _token, label in zip(example.input_ids, example.labels, strict=True):
            trained.append(label != IGNORE_INDEX)
        assert sum(trained) == sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in expected)


def test_conversational_prompt_completion_trains_only_the_completion(tmp_path, tokenizer):
    row = {
        "prompt": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "Yes or No?"},
        ],
        "completion": [{"role": "assistant", "content": "Yes"}],
    }
    data = load(write_jsonl(tmp_path / "cp.jsonl", [row]))
    assert data.format == "messages"
    ids, trained = render_conversation(
        tokenizer,
        data.records["train"][0].conversation.messages,
        data.records["train"][0].conversation.trained,
        CHATML,
    )
    assert tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if t]) == "Yes<|im_end|>\n"


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    rewriting = "{% for m in messages %}{{ m['role'] + ':' + m['content'] + '|' + (messages|length|string) }}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match="sum of its turns"):
        render_conversation(tokenizer, messages, [False, True], rewriting)


# ------------------------------------------------------------------------------------------- length


def test_too_long_prompts_are_cut_from_the_left_keeping_bos_and_the_completion(tmp_path, tokenizer):
    rows = [
        {"prompt": "word " * 60, "completion": " Paris"},
        {"prompt": "short", "completion": " word " * 80},
        {"prompt": "ok", "completion": " fine"},
    ]
    data = load(write_jsonl(tmp_path / "long.jsonl", rows))
    encoded, stats = encode_records(data.records["train"], data.format, tokenizer, max_length=32)
    assert (stats.examples, stats.cut, stats.dropped) == (2, 1, 1)
    cut = encoded[0]
    assert len(cut.input_ids) == 32 and cut.input_ids[0] == tokenizer.bos_token_id
    full_completion = tokenizer(" Paris", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for t in cut.labels if t != IGNORE_INDEX] == full_completion
    assert [e.row for e in encoded] == [1, 3]


def test_every_example_dropped_is_an_error(tmp_path, tokenizer):
    data = load(write_jsonl(tmp_path / "l.jsonl", [{"prompt": "a", "completion": " word" * 80}]))
    with pytest.raises(DataError, match="max_length"):
        encode_records(data.records["train"], data.format, tokenizer, max_length=16)


# ------------------------------------------------------------------------------------------- packing


def test_packed_batches_give_the_padded_loss_and_gradients(tmp_path, tokenizer):
    rows = [
        {"prompt": "Question: who wrote the book?", "completion": " the author wrote it"},
        {"prompt": "Does this mean that it is true?", "completion": " Yes"},
        {"prompt": "Title: Normans", "completion": " France is where the Normans were"},
        {"text": "unused"},
    ][:3]
    data = load(write_jsonl(tmp_path / "p.jsonl", rows))
    encoded, _ = encode_records(data.records["train"], data.format, tokenizer, max_length=64)
    dataset = EncodedDataset(encoded)
    items = [dataset[i] for i in range(len(dataset))]
    model = tiny_causal_lm(vocab_size=len(tokenizer))

    def loss_and_grads(batch):
        model.zero_grad()
        loss = lm_loss(model, batch)
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    padded = PaddedCollator(tokenizer.pad_token_id)(items)
    packed = packed_collator()(items)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    loss_padded, grads_padded = loss_and_grads(padded)
    loss_packed, grads_packed = loss_and_grads(packed)
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5, abs=1e-6)
    for a, b in zip(grads_padded, grads_packed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_packing_without_position_ids_would_leak_across_examples(tmp_path, tokenizer):
    """The check above can fail: the same concatenated row without restarting positions changes the loss."""
    rows = [
        {"prompt": "Question: who wrote the book?", "completion": " the author wrote it"},
        {"prompt": "Does this mean that it is true?", "completion": " Yes"},
    ]
    data = load(write_jsonl(tmp_path / "p.jsonl", rows))
    encoded, _ = encode_records(data.records["train"], data.format, tokenizer, max_length=64)
    items = [EncodedDataset(encoded)[i] for i in range(2)]
    model = tiny_causal_lm(vocab_size=len(tokenizer))
    packed = packed_collator()(items)
    leaky = {"input_ids": packed["input_ids"], "labels": packed["labels"]}
    padded = PaddedCollator(tokenizer.pad_token_id)(items)
    with torch.no_grad():
        assert abs(float(lm_loss(model, leaky)) - float(lm_loss(model, padded))) > 1e-4


# ------------------------------------------------------------------------------------------- files, splits


def test_every_file_kind_reads_the_same_rows(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(12)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows[:8])
    write_jsonl(folder / "validation.jsonl", rows[8:10])
    write_jsonl(folder / "test.jsonl", rows[10:])
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved"):
        data = load(tmp_path / name)
        assert [(r.prompt, r.completion) for r in data.records["train"]] == [
            (r["prompt"], r["completion"]) for r in rows
        ]
    data = load(folder)
    splits = data.split(seed=3)
    assert [len(splits.train), len(splits.dev), len(splits.test)] == [8, 2, 2]
    assert "validation.jsonl" in splits.origin["dev"] and "test.jsonl" in splits.origin["test"]


def test_one_file_is_split_by_seed_disjointly_and_reproducibly(tmp_path):
    rows = [{"text": f"example {i}"} for i in range(50)]
    data = load(write_jsonl(tmp_path / "d.jsonl", rows))
    a, b, c = data.split(0, num_eval=10), data.split(0, num_eval=10), data.split(1, num_eval=10)
    rows_of = lambda s: [r.row for r in s]  # noqa: E731
    assert (len(a.train), len(a.dev), len(a.test)) == (36, 4, 10)
    assert rows_of(a.train) == rows_of(b.train) and rows_of(a.test) == rows_of(b.test)
    assert set(rows_of(a.test)) != set(rows_of(c.test))
    assert not set(rows_of(a.train)) & (set(rows_of(a.dev)) | set(rows_of(a.test)))
    assert not set(rows_of(a.dev)) & set(rows_of(a.test))


# ------------------------------------------------------------------------------------------- bad input


BAD_ROWS = [
    ([{"messages": "hello"}], {}, r"row 1: messages: expected a non-empty list"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], {}, r"row 1: messages: no assistant turn"),
    (
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}],
        {},
        r"row 1: messages\[1\]\.role: unknown role 'robot'",
    ),
    (
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}],
        {},
        r"row 1: messages\[1\]\.content: empty assistant turn",
    ),
    (
        [CHAT[0], {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}],
        {},
        r"row 2: messages\[0\]\.content: expected text",
    ),
    (
        [{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}],
        {},
        r"messages\[0\]\.role: missing",
    ),
    (
        [{"prompt": "q", "completion": ""}],
        {},
        r"row 1: completion: empty \(an example needs at least one trained",
    ),
    ([{"prompt": "q", "completion": 5}], {}, r"row 1: completion: expected text, got a number"),
    ([{"prompt": "q", "choices": ["a", "b"], "label": 2}], {}, r"row 1: label: index 2 is out of range"),
    (
        [{"prompt": "q", "choices": ["a", "b"], "label": "c"}],
        {},
        r"row 1: label: 'c' is not one of the choices",
    ),
    ([{"prompt": "q", "choices": ["a"], "label": 0}], {}, r"row 1: choices: expected a list of at least 2"),
    ([{"foo": 1}], {}, r"cannot tell the data format from its columns \(foo\)"),
    ([{"text": "x"}], {"format": "messages"}, r"data.format messages needs a 'prompt' column"),
    ([{"q": "x"}], {"columns": {"prompt": "question"}}, r"data.columns.prompt: column 'question' is not in"),
    ([{"text": "a"}, {"text": None}], {}, r"row 2: text: missing"),
]


@pytest.mark.parametrize(("rows", "spec", "pattern"), BAD_ROWS)
def test_bad_rows_are_one_line_naming_file_row_and_field(tmp_path, rows, spec, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=pattern) as err:
        load(path, **spec)
    assert "\n" not in str(err.value)
    assert "bad.jsonl" in str(err.value) or "data." in str(err.value)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("bad.jsonl", b'{"text": "caf\xe9"}\n', r"line 1: bytes that are not UTF-8"),
        ("bad.csv", b"text\nok\ncaf\xff\n", r"line 3: bytes that are not UTF-8"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', r"line 2: not valid JSON"),
        ("bad.jsonl", b'["not", "an object"]\n', r"line 1: expected a JSON object"),
        ("bad.parquet", b"PAR1 garbage bytes", r"not readable as a parquet file"),
        ("empty.jsonl", b"", r"the file is empty"),
        ("data.txt", b"hello", r"unknown file type '.txt'"),
    ],
)
def test_bad_files_are_one_line(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern) as err:
        load(path)
    assert "\n" not in str(err.value) and name in str(err.value)


def test_a_chat_format_without_a_chat_template_names_the_fix():
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match=r"no chat template.*data.chat_template"):
        resolve_chat_template(tok, None, "tiny")
