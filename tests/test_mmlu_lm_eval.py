"""The project's MMLU against lm-evaluation-harness's own ``mmlu`` task files, run by lm-eval's ``HFLM`` on the same
tiny LLaMA: the same contexts, log-likelihoods, per-subject acc and size-weighted group score, 0-shot and 2-shot."""

from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'moei_lightning[lm-eval]')")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from moei_lightning.backbone import BackboneConfig, load_backbone, load_tokenizer  # noqa: E402
from moei_lightning.callbacks import PaperEvaluation  # noqa: E402
from moei_lightning.data import Encoder, PromptFormatter  # noqa: E402
from moei_lightning.eval import mmlu  # noqa: E402
from moei_lightning.eval.gi import gi_items  # noqa: E402
from moei_lightning.eval.harness import Harness  # noqa: E402
from moei_lightning.eval.registry import build_report, suite_rows  # noqa: E402
from moei_lightning.runner import ModelRunner  # noqa: E402
from tests.test_lm_eval import max_difference  # noqa: E402

LM_EVAL_MMLU = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
GROUP = "local_mmlu"
# Unequal sizes, listed in lm-eval's group order (stem, then humanities), each with three dev questions.
SUBJECTS = {
    "astronomy": [
        ("Which body is a planet?", "the Moon", "Mars", "the Sun", "a comet", "B"),
        ("What does a telescope collect?", "light", "sound", "heat only", "dust", "A"),
        ("  Which star is closest to Earth?  ", "Sirius", "Vega", "the Sun", "Polaris", "C"),
        ("How many moons does Earth have?", "none", "one", "two", "three", "B"),
        ("What is a light year?", "a time", "a speed", "a mass", "a distance", "D"),
        ("Saturn is known for its", "rings, mostly of ice", "oceans", "forests", "cities", "A"),
    ],
    "high_school_biology": [
        ("Which organelle makes energy?", "nucleus", "mitochondrion", "ribosome", "wall", "B"),
        ("What carries oxygen in blood?", "plasma", "platelets", "red cells", "nerves", "C"),
        ("Plants make sugar by", "respiration", "digestion", "osmosis", "photosynthesis", "D"),
    ],
    "formal_logic": [
        ("If p then q; p. Therefore", "q", "not q", "not p", "nothing", "A"),
        ("Which is a tautology?", "p and not p", "p or not p", "p", "q", "B"),
        ("A valid argument with true premises has a", "false end", "true conclusion", "doubt", "loop", "B"),
        ("Not (p and q) equals", "not p and not q", "p or q", "not p or not q", "p", "C"),
    ],
}
DEV = [
    ("What colour is the sky?", "green", "blue", "red", "black", "B"),
    ("How many legs does a cat have?", "two", "three", "four", "six", "C"),
    ("Which one is a fruit?", "an apple", "a stone", "a chair", "a cloud", "A"),
]
PROCESS_DOCS = '''
def process_docs(dataset):
    """An MMLU CSV row as the cais/mmlu record lm-eval's template reads: question, choices, answer index."""
    def record(row):
        return {"choices": [row[c] for c in "ABCD"], "answer": "ABCD".index(row["letter"])}
    return dataset.rename_column("answer", "letter").map(record, remove_columns=["A", "B", "C", "D", "letter"])
'''


def write_csv(path: Path, rows: list[tuple[str, ...]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(",".join(f'"{cell}"' for cell in row) + "\n" for row in rows), encoding="utf-8")


def write_release_and_tasks(root: Path) -> tuple[dict[str, str], Path]:
    """MMLU CSVs in the release's layout (``test/``, ``dev/``), and lm-eval tasks over them: each includes
    lm-eval's own ``mmlu_<subject>.yaml`` (description, template, few-shot sampler, metric) and changes only
    where the data comes from; the group aggregates acc weighted by size, as lm-eval's ``mmlu`` does."""
    tasks, files = root / "tasks", {}
    tasks.mkdir()
    (tasks / "utils.py").write_text(PROCESS_DOCS, encoding="utf-8")
    for subject, rows in SUBJECTS.items():
        test, dev = root / "data" / "test" / f"{subject}_test.csv", root / "data" / "dev" / f"{subject}_dev.csv"
        write_csv(test, rows)
        write_csv(dev, DEV)
        files[subject] = str(test)
        (tasks / f"{GROUP}_{subject}.yaml").write_text(
            f"include: {LM_EVAL_MMLU / f'mmlu_{subject}.yaml'}\n"
            f"task: {GROUP}_{subject}\n"
            f"tag: {GROUP}_tasks\n"
            "dataset_path: csv\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {test}\n    dev: {dev}\n"
            "  column_names: [question, A, B, C, D, answer]\n"
            "process_docs: !function utils.process_docs\n",
            encoding="utf-8",
        )
    (tasks / f"{GROUP}.yaml").write_text(
        f"group: {GROUP}\n"
        f"task: [{', '.join(f'{GROUP}_{subject}' for subject in SUBJECTS)}]\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n",
        encoding="utf-8",
    )
    return files, tasks


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path, Path]:
    """The data, the task folder and the tiny LLaMA saved with save_pretrained (model and tokenizer)."""
    root = tmp_path_factory.mktemp("mmlu")
    files, tasks = write_release_and_tasks(root)
    config = BackboneConfig(name_or_path="tiny-llama")
    load_backbone(config).save_pretrained(root / "model")
    load_tokenizer(config).save_pretrained(root / "model")
    return files, tasks, root / "model"


@pytest.mark.parametrize("shots", [0, 2])
def test_project_mmlu_is_lm_evals_mmlu(release: tuple[dict[str, str], Path, Path], shots: int) -> None:
    files, tasks, model_dir = release
    theirs = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(model_dir), device="cpu", batch_size=4),
        tasks=[GROUP],
        num_fewshot=shots,
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )

    # The project: the gi suite with the CSVs under a dimension, asked by the evaluation harness on the same
    # model; the training prompt (chat template, system prompt) must play no part.
    model = load_backbone(BackboneConfig(name_or_path="tiny-llama")).eval()
    tokenizer = load_tokenizer(BackboneConfig(name_or_path="tiny-llama"))
    formatter = PromptFormatter("Instruction: {instruction}\n\n{input}", "Be brief.", True, tokenizer)
    encoder = Encoder(tokenizer, formatter, "causal", 512)
    harness = Harness(ModelRunner(model, tokenizer, "causal", batch_size=4), encoder)
    items = gi_items([], "eval.gi", {"knowledge": list(files.values())}, mmlu_num_fewshot=shots)
    suites = PaperEvaluation(suites=["gi"]).suites
    results = harness.run(suites, {"gi": items})
    assert results.truncated["gi"] == 0

    for subject in SUBJECTS:
        task = f"{GROUP}_{subject}"
        samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        ours = [o for o in results.outcomes["gi"] if o.item.task == subject]
        # lm-eval's requests: (context, continuation) per choice of each question
        prompts = [harness.encoder_for(o.item).formatter.format(o.item.record) for o in ours]
        assert [s["arguments"] for s in samples] == [[(p, f" {letter}") for letter in "ABCD"] for p in prompts]
        their_logprobs = [[r[0][0] for r in s["resps"]] for s in samples]
        assert max_difference([o.scores.logprobs for o in ours], their_logprobs) < 1e-5  # measured: 0 and 5.7e-6
        best = [max(range(4), key=logprobs.__getitem__) for logprobs in their_logprobs]
        assert [o.scores.predicted_unnormalised for o in ours] == [o.scores.predicted for o in ours] == best
    accuracies = mmlu.subject_accuracies(results.outcomes["gi"])
    their_accuracies = {s: theirs["results"][f"{GROUP}_{s}"]["acc,none"] for s in SUBJECTS}
    assert {s: acc for s, (acc, _) in accuracies.items()} == their_accuracies  # exactly
    assert mmlu.group_accuracy(accuracies) == theirs["results"][GROUP]["acc,none"]  # exactly
    # The size weighting matters on these subjects: the plain mean of the subjects reads otherwise.
    assert mmlu.group_accuracy(accuracies) != sum(their_accuracies.values()) / len(SUBJECTS)

    report = build_report(suites, results, suite_rows(suites, results), {})
    assert report.scores["GI/MMLU"] == 100 * theirs["results"][GROUP]["acc,none"]
    table = {row[0]: row[4] for row in report.tables["gi"].rows}
    assert table == pytest.approx({s: 100 * acc for s, acc in their_accuracies.items()}, abs=1e-12)
