"""MMLU CSV files asked as lm-eval's mmlu: rows to items, the exact prompt with and without dev examples, the
continuations, errors naming file and line, and the size-weighted group score."""

from pathlib import Path

import pytest

from moei_lightning.backbone import BackboneConfig, load_tokenizer
from moei_lightning.data import EiRecord, Encoder, PromptFormatter
from moei_lightning.eval.choices import ChoiceScores, choice_examples
from moei_lightning.eval.mmlu import group_accuracy, load_mmlu_csv, prompt_encoder, subject_accuracies
from moei_lightning.eval.suite import ChoiceOutcome, Item, from_choice_item

ROWS = (
    "What is 2 + 2?,3,4,5,6,B\n"
    '"A question, with a comma\nand a second line?",yes,no,maybe,"""quoted""",D\n'
    "Which is a prime?,4,6,7,9,C\n"
)
DEV = "  What is 1 + 1?  ,1,2,3,4,B\nWhat is 3 - 3?,0,1,2,3,A\nWhat is 2 * 3?,5,6,7,8,B\n"


def write_subject(directory: Path, subject: str = "elementary_mathematics", dev: str | None = DEV) -> Path:
    """An MMLU release in miniature: ``test/<subject>_test.csv`` and ``dev/<subject>_dev.csv``."""
    (directory / "test").mkdir(parents=True, exist_ok=True)
    path = directory / "test" / f"{subject}_test.csv"
    path.write_text(ROWS, encoding="utf-8")
    if dev is not None:
        (directory / "dev").mkdir(exist_ok=True)
        (directory / "dev" / f"{subject}_dev.csv").write_text(dev, encoding="utf-8")
    return path


def tiny_encoder() -> Encoder:
    """The training encoder of a chat model with a system prompt: MMLU must use neither."""
    tokenizer = load_tokenizer(BackboneConfig(name_or_path="tiny-llama"))
    formatter = PromptFormatter("Instruction: {instruction}\n\n{input}", "Be brief.", True, tokenizer)
    return Encoder(tokenizer, formatter, "causal", 512)


def test_rows_become_items(tmp_path):
    items = load_mmlu_csv(write_subject(tmp_path), "reasoning")
    assert [item.answer_index for item in items] == [1, 3, 2]
    first, second, _ = items
    assert (first.suite, first.task, first.category, first.language) == (
        "mmlu",
        "elementary_mathematics",
        "reasoning",
        "en",
    )
    assert first.choices == ["A", "B", "C", "D"]  # lm-eval's doc_to_choice: the letters are scored
    question = 'A question, with a comma\nand a second line?\nA. yes\nB. no\nC. maybe\nD. "quoted"\nAnswer:'
    assert second.prompt_input == question
    # Ids carry the line each row starts on, so a result can be traced back to the file.
    assert [item.id for item in items] == [
        "mmlu/elementary_mathematics/1",
        "mmlu/elementary_mathematics/2",
        "mmlu/elementary_mathematics/4",
    ]


@pytest.mark.parametrize(
    ("shots", "expected"),
    [
        (
            0,
            "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
            "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",
        ),
        (
            2,
            "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
            "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
            "What is 3 - 3?\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: A\n\n"
            "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",
        ),
    ],
)
def test_prompt_is_lm_evals_mmlu_prompt(tmp_path, shots, expected):
    encoder = tiny_encoder()
    item = from_choice_item(load_mmlu_csv(write_subject(tmp_path), "reasoning", shots)[0], "gi")
    assert prompt_encoder(encoder).formatter.format(item.record) == expected
    # Scored as lm-eval scores it: each letter as the continuation " A" of that context, BOS first, no EOS.
    examples, _ = choice_examples(prompt_encoder(encoder), [item.record])
    tokenizer = encoder.tokenizer
    for example, letter in zip(examples, "ABCD"):
        whole = tokenizer(expected + " " + letter)["input_ids"]
        assert example.input_ids == whole
        assert [t for t in example.labels if t != -100] == whole[len(tokenizer(expected)["input_ids"]) :]


def test_dev_split_beside_the_file_is_found_first(tmp_path):
    path = write_subject(tmp_path)
    (path.parent / "elementary_mathematics_dev.csv").write_text("Beside?,a,b,c,d,C\n", encoding="utf-8")
    (item,) = load_mmlu_csv(path, "reasoning", 1)[:1]
    assert item.prompt_input.startswith("Beside?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\nWhat is 2 + 2?")


@pytest.mark.parametrize(
    ("dev", "shots", "message"),
    [
        (None, 1, r"elementary_mathematics_test.csv: 1-shot needs the subject's dev split, looked for .*test/"
         r"elementary_mathematics_dev.csv and .*dev/elementary_mathematics_dev.csv"),
        (DEV, 4, r"elementary_mathematics_dev.csv: 4-shot needs 4 dev questions, the file has 3"),
        (DEV, -1, r"num_fewshot must be 0 or more, got -1"),
    ],
)  # fmt: skip
def test_fewshot_errors_name_the_files(tmp_path, dev, shots, message):
    with pytest.raises(ValueError, match=message):
        load_mmlu_csv(write_subject(tmp_path, dev=dev), "reasoning", shots)


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


def outcome(subject: str, right: bool, source: str = "mmlu") -> ChoiceOutcome:
    """An answered question: the summed log-likelihood is highest on B, and B is right or not."""
    record = EiRecord(f"{subject}/{id(object())}", subject, "gi", "knowledge", "i", "q", "A", ["A", "B", "C", "D"])
    item = Item(source, subject, "knowledge", "en", record, answer=1 if right else 0)
    # Per character (acc_norm) the same ranking: every choice is one letter.
    return ChoiceOutcome(item, ChoiceScores([-3.0, -1.0, -2.0, -4.0], [1] * 4, [1] * 4))


def test_group_is_the_size_weighted_mean_in_lm_evals_subject_order():
    outcomes = [outcome("my_subject", False)] * 2 + [outcome("formal_logic", True)] * 7
    outcomes += [outcome("astronomy", True), outcome("astronomy", False), outcome("trivia", True, source="gi")]
    subjects = subject_accuracies(outcomes)
    # lm-eval's group order (stem, other, social sciences, humanities), then subjects it does not know
    assert subjects == {"astronomy": (0.5, 2), "formal_logic": (1.0, 7), "my_subject": (0.0, 2)}
    assert group_accuracy(subjects) == 8 / 11  # 72.7 %; the unweighted mean of subjects reads 50.0 %
    assert sum(acc for acc, _ in subjects.values()) / 3 == 0.5
    with pytest.raises(ValueError, match="no MMLU subjects"):
        group_accuracy({})
