"""MMLU-style CSV loader: rows to ChoiceItems, optional header, errors naming file:line."""

import pytest

from moei_lightning.eval.mmlu import load_mmlu_csv

ROWS = (
    "What is 2 + 2?,3,4,5,6,B\n"
    '"A question, with a comma\nand a second line?",yes,no,maybe,"""quoted""",D\n'
    "Which is a prime?,4,6,7,9,C\n"
)


def test_rows_become_items(tmp_path):
    path = tmp_path / "elementary_mathematics_test.csv"
    path.write_text(ROWS, encoding="utf-8")
    items = load_mmlu_csv(path, "reasoning")
    assert [item.answer_index for item in items] == [1, 3, 2]
    first, second, _ = items
    assert first.suite == "mmlu"
    assert first.task == "elementary_mathematics"
    assert first.category == "reasoning"
    assert first.language == "en"
    assert "elementary mathematics" in first.prompt_instruction
    assert first.prompt_input == "What is 2 + 2?"
    assert first.choices == ["3", "4", "5", "6"]
    assert second.prompt_input == "A question, with a comma\nand a second line?"
    assert second.choices[second.answer_index] == '"quoted"'
    # Ids carry the line each row starts on, so a result can be traced back to the file.
    assert [item.id for item in items] == [
        "mmlu/elementary_mathematics/1",
        "mmlu/elementary_mathematics/2",
        "mmlu/elementary_mathematics/4",
    ]


def test_header_row_is_accepted(tmp_path):
    path = tmp_path / "geo.csv"
    path.write_text("question,A,B,C,D,answer\n" + ROWS, encoding="utf-8")
    items = load_mmlu_csv(path, "knowledge")
    assert len(items) == 3
    assert items[0].task == "geo"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Q?,1,2,3,4,A\nQ2?,1,2,3,4,E\n", r"x.csv:2: answer 'E' is not one of A, B, C, D"),
        ("Q?,1,2,3,4,A\nQ2?,1,2,3,A\n", r"x.csv:2: expected 6 columns"),
        ("Q?,1,2,3,4,A\nQ2?,1,2,3,4,answer\n", r"x.csv:2: answer 'answer'"),
        ('"Q?\nstill Q?",1,2,3,4,A\n,1,2,3,4,B\n', r"x.csv:3: the question \(first column\) is empty"),
        ("\n", r"x.csv: no questions found"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "x.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_mmlu_csv(path, "knowledge")


def test_unknown_dimension(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text(ROWS, encoding="utf-8")
    with pytest.raises(ValueError, match="dimension 'math'"):
        load_mmlu_csv(path, "math")
