"""Templates render real rows exactly as the MeZO harness does; the registry and task table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from chainlora.errors import ConfigError
from chainlora.tasks import TASKS, Example, get_task, list_tasks, print_tasks_table
from chainlora.tasks.data import read_rows
from chainlora.tasks.templates import COPA, format_number, tatqa_answers


def first_row(shared_data: Path, task: str, split: str = "train") -> dict:
    with open(shared_data / task / f"{split}.jsonl", encoding="utf-8") as handle:
        return json.loads(handle.readline())


# The first train row of each short task, rendered by hand from REFERENCE.md's templates.
EXPECTED_FIRST_ROWS = {
    "sst2": (
        "hide new secretions from the parental units It was",
        (" terrible", " great"),
        0,
    ),
    "rte": (
        'No Weapons of Mass Destruction Found in Iraq Yet.\nDoes this mean that "Weapons of Mass Destruction '
        'Found in Iraq." is true? Yes or No?\n',
        ("Yes", "No"),
        1,
    ),
    "cb": (
        "Suppose It was a complex language. Not written down but handed down. One might say it was peeled down. "
        'Can we infer that "the language was peeled down"? Yes, No, or Maybe?\n',
        ("Yes", "No", "Maybe"),
        0,
    ),
    "wic": (
        'Does the word "place" have the same meaning in these two sentences? Yes, No?\n'
        "Do you want to come over to my place later?\n"
        "A political system with no place for the less prominent groups.\n",
        ("No", "Yes"),
        0,
    ),
    "wsc": (
        "Mark told Pete many lies about himself, which Pete included in his book. He should have been more "
        'skeptical.\nIn the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n',
        ("No", "Yes"),
        0,
    ),
    "copa": (
        "My body cast a shadow over the grass because",
        (" the sun was rising.", " the grass was cut."),
        0,
    ),
    "gsm8k": (
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?\nAnswer:",
        (" 72\n",),
        0,
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FIRST_ROWS))
def test_template_renders_first_real_row_exactly(shared_data, name):
    prompt, continuations, gold = EXPECTED_FIRST_ROWS[name]
    example = get_task(name).example(first_row(shared_data, name))
    assert example.prompt == prompt
    assert example.candidates == tuple(prompt + c for c in continuations)
    assert example.gold == gold


def test_sst2_verbalizer_follows_after_a_space(shared_data):
    example = get_task("sst2").example(first_row(shared_data, "sst2"))
    assert example.candidates[1] == "hide new secretions from the parental units It was great"


def test_boolq_strips_the_title_and_fixes_the_question(shared_data):
    row = first_row(shared_data, "boolq")
    example = get_task("boolq").example(row)
    passage = row["passage"].removeprefix("Persian language -- ")
    assert passage.startswith("Persian (/ˈpɜːrʒən")
    assert example.prompt == passage + " Do iran and afghanistan speak the same language?\n"
    assert example.candidates == (example.prompt + "Yes", example.prompt + "No")  # the harness's order
    assert example.gold == 0  # label 1 (True) -> "Yes", the first candidate


def test_boolq_in_hf_boolq_layout_keeps_the_passage_whole():
    row = {"question": "is it true?", "passage": "A -- B", "answer": False}
    example = get_task("boolq").example(row)
    assert example.prompt == "A -- B Is it true?\n"
    assert example.gold == 1  # False -> "No", the second candidate


def test_boolq_tie_goes_to_yes_as_in_the_harness(monkeypatch):
    """The harness takes argmax over (Yes, No): equal scores predict "Yes" (True), and so does chainlora."""
    import torch

    from chainlora.tasks import scoring

    task = get_task("boolq")
    examples = [task.example({"question": "q", "passage": "p", "answer": a}) for a in (True, False)]
    monkeypatch.setattr(scoring, "score_candidates", lambda *a, **k: [[-1.0, -1.0], [-1.0, -1.0]])
    result = scoring.evaluate(torch.nn.Linear(1, 1), None, task, examples)
    assert result["predictions"] == [0, 0]  # "Yes" both times
    assert result["accuracy"] == 0.5  # right for the True question only


def test_multirc_renders_one_answer_row(shared_data):
    row = first_row(shared_data, "multirc")
    example = get_task("multirc").example(row)
    assert example.prompt == (
        row["paragraph"] + "\nQuestion: What did the high-level effort to persuade Pakistan include?\n"
        'I found this answer "Children, Gerd, or Dorian Popa". Is that correct? Yes or No?\n'
    )
    assert [c.removeprefix(example.prompt) for c in example.candidates] == ["No", "Yes"]


def test_record_fills_the_placeholder_with_every_entity(shared_data):
    row = first_row(shared_data, "record")
    example = get_task("record").example(row)
    passage = row["passage"].replace("@highlight\n", "- ")
    assert passage.endswith("missed a clear cut chance to make it 3-1")
    assert "- Chelsea come from behind" in passage and "@highlight" not in passage
    assert example.prompt == passage + "\n-"
    assert len(example.candidates) == 19
    gold = example.candidates[example.gold]
    assert gold == (
        passage
        + "\n- Speaking after the game, Mourinho said: 'The important thing is to give competition to "
        "the players, the best thing was that Olimpija Ljubljana made it difficult."
    )
    assert example.gold_indices == (row["entities"].index("Olimpija Ljubljana"),)


def test_squad_prompt_and_training_string(shared_data):
    row = first_row(shared_data, "squad", "validation")
    example = get_task("squad").example(row)
    assert example.prompt == (
        f"Title: Super_Bowl_50\nContext: {row['context']}\n"
        "Question: Which NFL team represented the AFC at Super Bowl 50?\nAnswer:"
    )
    assert example.candidates == (example.prompt + " Denver Broncos\n",)
    assert example.answers == ("Denver Broncos",) * 3


def test_drop_uses_every_span_as_a_gold_answer():
    row = {
        "passage": "P.",
        "question": " How many? ",
        "answers_spans": {"spans": ["3", "three"], "types": ["n"]},
    }
    example = get_task("drop").example(row)
    assert example.prompt == "Passage: P.\nQuestion: How many?\nAnswer:"
    assert example.candidates == ("Passage: P.\nQuestion: How many?\nAnswer: 3\n",)
    assert example.answers == ("3", "three")


def test_mcscript_continues_the_answer_line(shared_data):
    row = first_row(shared_data, "mcscript")
    example = get_task("mcscript").example(row)
    assert example.prompt == row["passage"] + "\nQuestion: Which room did the light go out in?\nAnswer:"
    assert [c.removeprefix(example.prompt) for c in example.candidates] == [" Kitchen.", " Bedroom."]
    assert example.gold == 1


def test_tatqa_flattens_table_paragraphs_and_questions(shared_data):
    task = get_task("tatqa")
    rows = read_rows(task, shared_data / "tatqa" / "tatqa_dataset_dev.json")
    assert len(rows) == 1668
    location, row = rows[4]
    assert location == "context 1 question 5"
    example = task.example(row)
    assert example.prompt.startswith(
        "Passage:  |  | Years Ended September 30, | \n | 2019 | 2018 | 2017\nFixed Price | $ 1,452.4 | $ 1,146.2 | "
        "$ 1,036.9\nOther | 44.1 | 56.7 | 70.8\nTotal sales | $1,496.5 | $1,202.9 | $1,107.7\n"
        "Sales by Contract Type: Substantially all of our contracts are fixed-price type contracts."
    )
    assert example.prompt.endswith(
        "(in millions):\nQuestion: What is the change in Other in 2019 from 2018?\nAnswer:"
    )
    assert example.answers == ("-12.6 million",)
    assert example.candidates == (example.prompt + " -12.6 million\n",)


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ({"answer_type": "arithmetic", "answer": -22.22, "scale": "percent"}, ["-22.22%"]),
        ({"answer_type": "arithmetic", "answer": 94.0, "scale": "thousand"}, ["94 thousand"]),
        ({"answer_type": "arithmetic", "answer": 2.987654, "scale": ""}, ["2.9877"]),
        ({"answer_type": "count", "answer": "3", "scale": ""}, ["3"]),
        ({"answer_type": "span", "answer": ["12.5%"], "scale": "percent"}, ["12.5%"]),
        (
            {"answer_type": "multi-span", "answer": ["$1.2", "$3.4"], "scale": "million"},
            ["$1.2 million", "$3.4 million"],
        ),
    ],
)
def test_tatqa_answer_strings(question, expected):
    assert tatqa_answers(question) == expected


def test_format_number():
    assert format_number(-12.6) == "-12.6"
    assert format_number(995684.5) == "995684.5"
    assert format_number(3680) == "3680"


@pytest.mark.parametrize(
    ("premise", "question", "choice", "expected"),
    [
        (
            "The man broke his toe.",
            "cause",
            "He dropped a hammer.",
            "The man broke his toe because he dropped a hammer.",
        ),
        ("It rained..  ", "effect", "I stayed in.", "It rained. so I stayed in."),
        ("A sign", "effect", "NASA Launched.", "A sign so nasa Launched."),
    ],
)
def test_copa_lowercases_the_whole_first_word_unless_it_is_i(premise, question, choice, expected):
    row = {"premise": premise, "choice1": choice, "choice2": "X.", "question": question, "label": 0}
    assert COPA().example(row).candidates[0] == expected


@pytest.mark.parametrize("name", [n for n in TASKS if n not in ("drop", "tatqa")])
def test_every_candidate_extends_its_prompt(shared_data, name):
    task = get_task(name)
    pool = "test" if name in ("mcscript", "gsm8k") else "validation"
    with open(shared_data / name / f"{pool}.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(next(handle)) for _ in range(5)]
    for row in rows:
        example = task.example(row)
        assert isinstance(example, Example)
        assert all(c.startswith(example.prompt) and len(c) > len(example.prompt) for c in example.candidates)
        assert example.prompt == example.prompt.lstrip().rstrip(" ")


def test_registry_rejects_unknown_names():
    assert get_task("RTE") is TASKS["rte"]
    with pytest.raises(ConfigError, match=r"unknown task 'glue'.*sst2"):
        get_task("glue")


def test_task_kinds_and_objectives_follow_the_harness():
    as_classification = {n for n, t in TASKS.items() if t.objective == "classification"}
    assert as_classification == {"sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "mcscript"}
    assert {n for n, t in TASKS.items() if t.kind == "generation"} == {"squad", "drop", "tatqa", "gsm8k"}
    assert {n: t.status for n, t in TASKS.items() if t.status != "real"} == {
        "record": "partial",
        "drop": "user data only",
        "mcscript": "substitute",
        "tatqa": "substitute",
        "gsm8k": "substitute",
    }


def test_list_tasks_reports_source_sizes_and_status(shared_data, monkeypatch):
    monkeypatch.delenv("CHAINLORA_DATA", raising=False)
    infos = {info.name: info for info in list_tasks(data_dir=shared_data)}
    assert infos["cb"].sizes == {"train": 250, "test": 56}
    assert infos["cb"].source == f"{shared_data / 'cb'} (data_dir)"
    assert infos["tatqa"].sizes == {"train": 1668, "test": 1663}
    assert infos["record"].status == "partial"
    assert infos["drop"].sizes is None and infos["drop"].source.startswith("not found")
    assert "CC BY-NC" in infos["wic"].licence


def test_print_tasks_table(shared_data, monkeypatch):
    monkeypatch.delenv("CHAINLORA_DATA", raising=False)
    out = io.StringIO()
    print_tasks_table(out, data_dir=shared_data)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:4] == ["task", "kind", "metric", "status"]
    assert any(line.startswith("copa ") and " 400 " in line and " 100 " in line for line in lines)
    assert any(line.startswith("  drop: ") for line in lines)
