"""The harness: sharding keeps ranks in step and gives the one-process answer; gates, chat prompts, EQ-Bench."""

import threading
from pathlib import Path

import pytest
import torch

from moei_lightning.backbone import BackboneConfig
from moei_lightning.callbacks import PaperEvaluation
from moei_lightning.data import SAMPLES_DIR, Encoder, PromptFormatter
from moei_lightning.eval.eibench import eibench_items
from moei_lightning.eval.emobench import answer, emobench_items, system_prompt, user_prompt
from moei_lightning.eval.eqbench import ask, eqbench_questions, question_prompt
from moei_lightning.eval.gi import gi_items
from moei_lightning.eval.harness import Harness, Results, chat_prompt
from moei_lightning.eval.suite import Source, Suite
from moei_lightning.module import MoEIModule
from moei_lightning.ranks import merge, shard, sharded_map
from moei_lightning.runner import ModelRunner
from tests.conftest import ThreadWorld

STIMULI = {"EP02": "This is very important to my career.", "EP04": "Are you sure?"}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 9])
def test_shards_are_equal_and_merge_back_in_order(n: int, world_size: int) -> None:
    units = list(range(n))
    shards = [shard(units, rank, world_size) for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # the same number of calls on every rank
    assert sorted(set().union(*shards)) == units
    assert merge([[u * 10 for u in s] for s in shards], n) == [u * 10 for u in units]


def test_sharded_map_checks_one_result_per_unit() -> None:
    with pytest.raises(ValueError, match="2 results for 1 units"):
        sharded_map(lambda s: s + s, [1], 0, 1)


def tiny_harness(preset: str, adapter: str = "molora", **kwargs: object) -> Harness:
    torch.manual_seed(0)  # the same adapter initialisation in every simulated rank
    module = MoEIModule(backbone=BackboneConfig(name_or_path=preset), adapter=adapter)
    module.configure_model()
    module.eval()
    encoder = Encoder(module.tokenizer, PromptFormatter(tokenizer=module.tokenizer), module.kind, 256)
    return Harness(ModelRunner(module.model, module.tokenizer, module.kind, batch_size=3, **kwargs), encoder)


def small_inputs() -> tuple[list[Suite], dict]:
    """The eibench, gi and emotion_prompt suites over a few items of the sample test files."""
    suites = PaperEvaluation(
        suites=["eibench", "gi", "emotion_prompt"], max_new_tokens=4, emotion_prompt_stimuli=STIMULI
    )
    eibench = eibench_items([str(SAMPLES_DIR / "ei" / "test.jsonl")], "data.ei_test")
    open_items = [i for i in eibench if i.answer is None][:3]
    choice_items = [i for i in eibench if i.answer is not None][:4]
    gi = gi_items([str(SAMPLES_DIR / "gi" / "test.jsonl")], "data.gi_test", {})[:5]
    probe = suites.suites[2].load(Source(), {"gi": gi})
    return suites.suites, {"eibench": choice_items + open_items, "gi": gi, "emotion_prompt": probe}


def choice_outcomes(results: Results) -> dict:
    outcomes = results.outcomes
    probe = outcomes["emotion_prompt"]
    return {"eibench": outcomes["eibench"].choice, "gi": outcomes["gi"], "plain": probe.plain, "probe": probe.variants}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-t5"])
def test_two_ranks_make_the_same_calls_and_get_the_one_process_results(preset: str) -> None:
    suites, inputs = small_inputs()
    single = tiny_harness(preset).run(suites, inputs)

    world = ThreadWorld(2)
    harnesses = [tiny_harness(preset, rank=r, world_size=2, gather=world.gather_for(r)) for r in range(2)]
    calls = [0, 0]
    for rank, harness in enumerate(harnesses):
        harness.runner.model.register_forward_hook(lambda *_, rank=rank: calls.__setitem__(rank, calls[rank] + 1))
    outputs, errors = [None, None], []

    def run(rank: int) -> None:
        try:
            outputs[rank] = harnesses[rank].run(suites, inputs)
        except BaseException as err:  # a failing rank must not leave the other waiting silently
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert calls[0] == calls[1] > 0  # 5 GI items over 2 ranks: padded, never one forward more on one rank

    for result in outputs:
        for name, theirs in choice_outcomes(single).items():
            ours = choice_outcomes(result)[name]
            assert [o.item.record.id for o in ours] == [o.item.record.id for o in theirs]
            assert [o.scores.predicted for o in ours] == [o.scores.predicted for o in theirs]
            for a, b in zip(ours, theirs):
                assert a.scores.logprobs == pytest.approx(b.scores.logprobs, abs=1e-4)
                assert (a.gate is None) == (b.gate is None)
                assert a.gate is None or a.gate == pytest.approx(b.gate, abs=1e-5)
        opened = [o.prediction for o in result.outcomes["eibench"].open]
        assert opened == [o.prediction for o in single.outcomes["eibench"].open]
        assert result.truncated == single.truncated


def test_gates_are_read_per_prompt_one_without_an_inter_gate_and_absent_without_adapters() -> None:
    items = small_inputs()[1]["gi"]
    gates = tiny_harness("tiny-llama").gates(items)
    assert all(0 < g < 1 for g in gates)
    assert len(set(gates)) > 1  # each prompt has its own mean, padding excluded
    alone = tiny_harness("tiny-llama").gates(items[:1])  # no padding at all
    assert alone[0] == pytest.approx(gates[0], abs=1e-5)
    assert tiny_harness("tiny-llama", adapter="lora").gates(items) == [1.0] * len(items)  # adapters always on
    assert tiny_harness("tiny-llama", adapter="full").gates(items) == [None] * len(items)


def test_eqbench_prompts_go_through_the_chat_template(shared_data: Path) -> None:
    harness = tiny_harness("tiny-llama")
    questions = eqbench_questions(str(shared_data / "eq-bench" / "eq_bench_v2_questions_171.json"), 2)
    prompt = chat_prompt(harness.tokenizer, questions.questions["1"].prompt)
    assert prompt.startswith(f"{harness.tokenizer.bos_token}[INST]") and prompt.rstrip().endswith("[/INST]")
    assert questions.questions["1"].prompt.strip() in prompt
    assert chat_prompt(tiny_harness("tiny-t5").tokenizer, "plain text") == "plain text"
    outcome = ask(harness, questions, max_new_tokens=4)
    assert set(outcome.replies) == {"1", "2"}
    assert outcome.result.parseable == 0 and outcome.result.n_questions == 2  # counted, not dropped


def test_eqbench_asks_again_as_the_reference_harness_does(shared_data: Path, monkeypatch) -> None:
    """Attempts at 0.01, 0.16, 0.31; a parsing reply ends a question's attempts; revise keeps a partial reply."""
    harness = tiny_harness("tiny-llama")
    questions = eqbench_questions(str(shared_data / "eq-bench" / "eq_bench_v2_questions_171.json"), 3)
    ref = {qid: q.reference for qid, q in questions.questions.items()}

    def scores(qid: str) -> str:
        return "\n".join(f"{name}: {value + 1}" for name, value in ref[qid].items())

    # Question 1 parses at once, question 2 at the second attempt, question 3 never (one pass at the first).
    script = {
        "1": [f"First pass scores:\n{scores('1')}\nRevised scores:\n{scores('1')}"],
        "2": ["no idea", f"First pass scores:\n{scores('2')}\nRevised scores:\n{scores('2')}"],
        "3": [f"First pass scores:\n{scores('3')}\nRevised scores:\nnone", "nothing", "nothing again"],
    }
    system = "Answer the questions."
    prompts = {chat_prompt(harness.tokenizer, q.prompt, system): qid for qid, q in questions.questions.items()}
    calls: list[tuple[float | None, list[str]]] = []

    def generate(
        batch: list[str], max_new_tokens: int, temperature: float | None = None, unfiltered: bool = True
    ) -> list[str]:
        assert (max_new_tokens, unfiltered) == (8, False)
        ids = [prompts[p] for p in batch]
        calls.append((temperature, ids))
        return [script[qid][len(calls) - 1] for qid in ids]

    monkeypatch.setattr(harness.runner, "generate", generate)
    outcome = ask(harness, questions, max_new_tokens=8, mode="revise")
    assert calls == [(0.01, ["1", "2", "3"]), (0.16, ["2", "3"]), (0.31, ["3"])]
    assert outcome.attempts == {"1": 1, "2": 2, "3": 3}
    assert outcome.replies["3"] == script["3"][0]  # the partial reply, not the last one
    assert outcome.result.first_pass_parseable == 3 and outcome.result.revised_parseable == 2


def test_eqbench_no_revise_prompt_is_sent(shared_data: Path, monkeypatch) -> None:
    harness = tiny_harness("tiny-llama")
    questions = eqbench_questions(str(shared_data / "eq-bench" / "eq_bench_v2_questions_171.json"), 1)
    sent: list[tuple[str, int, float | None, bool]] = []

    def generate(batch: list[str], n: int, t: float | None = None, unfiltered: bool = True) -> list[str]:
        sent.extend((p, n, t, unfiltered) for p in batch)
        return ["x"] * len(batch)

    monkeypatch.setattr(harness.runner, "generate", generate)
    outcome = ask(harness, questions)
    assert len(sent) == 3  # never parses: three attempts
    # As the harness's Llama-2 instruction template sends it: its system message, then the question.
    question = question_prompt(questions.questions["1"], "no_revise")
    prompt = "<s>[INST] <<SYS>>\nAnswer the questions.\n<</SYS>>\n\n" + question.rstrip() + " [/INST]"
    assert sent[0] == (prompt, 60, 0.01, False)  # 60 new tokens without the revise step, top-k/p left as they are
    assert outcome.result.mode == "no_revise" and outcome.result.failed


@pytest.mark.parametrize(
    ("settings", "tokens", "system", "unfiltered"),
    [
        ({"mode": "revise"}, 600, "Answer the questions.", False),
        ({"max_new_tokens": 1024, "system": "none", "sampling": "plain"}, 1024, None, True),
    ],
)
def test_eqbench_generation_settings(shared_data: Path, monkeypatch, settings, tokens, system, unfiltered) -> None:
    """The harness's token limits per mode and its system message by default; the earlier settings
    (1024 tokens, no system message, no top-k or top-p cut) by name."""
    harness = tiny_harness("tiny-llama")
    questions = eqbench_questions(str(shared_data / "eq-bench" / "eq_bench_v2_questions_171.json"), 1)
    sent: list[tuple[str, int, bool]] = []

    def generate(batch: list[str], n: int, t: float | None = None, unfiltered: bool = True) -> list[str]:
        sent.extend((p, n, unfiltered) for p in batch)
        return ["x"] * len(batch)

    monkeypatch.setattr(harness.runner, "generate", generate)
    ask(harness, questions, **settings)
    mode = settings.get("mode", "no_revise")
    expected = chat_prompt(harness.tokenizer, question_prompt(questions.questions["1"], mode), system)
    assert sent[0] == (expected, tokens, unfiltered)


@pytest.mark.parametrize(("unfiltered", "cut"), [(False, {}), (True, {"top_k": 0, "top_p": 1.0})])
def test_sampling_cut_reaches_generate(monkeypatch, unfiltered: bool, cut: dict) -> None:
    """``harness`` sampling sets only the temperature (the model's top-k/top-p stay); ``plain`` turns them off."""
    harness = tiny_harness("tiny-llama")
    seen: dict = {}
    original = harness.runner.model.generate

    def spy(**kwargs: object) -> torch.Tensor:
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(harness.runner.model, "generate", spy)
    harness.runner.generate(["hello"], 2, 0.01, unfiltered)
    assert (seen["do_sample"], seen["temperature"], seen["max_new_tokens"]) == (True, 0.01, 2)
    assert {key: seen[key] for key in ("top_k", "top_p") if key in seen} == cut


def test_eqbench_system_message_without_a_llama2_template(shared_data: Path, monkeypatch) -> None:
    harness = tiny_harness("tiny-t5")  # no chat template: the system message leads the prompt
    questions = eqbench_questions(str(shared_data / "eq-bench" / "eq_bench_v2_questions_171.json"), 1)
    sent: list[str] = []
    monkeypatch.setattr(harness.runner, "generate", lambda batch, *args: sent.extend(batch) or ["x"] * len(batch))
    ask(harness, questions)
    question = question_prompt(questions.questions["1"], "no_revise")
    assert sent[0] == "You are an expert in emotional analysis.\n" + question


def test_emobench_both_protocols_on_a_tiny_model(shared_data: Path, monkeypatch) -> None:
    items = [i for i in emobench_items(str(shared_data / "emobench"), ["en"]) if i.qid in {"1", "2"}]
    assert [i.task for i in items] == ["EU", "EU", "EA", "EA"]
    harness = tiny_harness("tiny-llama")
    # loglikelihood: one forward per choice of every question; EU needs both questions right.
    outcomes = answer(harness, items, "loglikelihood", max_new_tokens=4)
    assert [len(o.answers) for o in outcomes] == [2, 2, 1, 1]
    assert all(set(o.answers) <= set("ABCDEF") for o in outcomes)
    # generate: the reference's system and user prompts through the chat template, the reply parsed.
    sent: list[str] = []

    def generate(batch: list[str], max_new_tokens: int, temperature: float | None = None) -> list[str]:
        sent.extend(batch)
        return ['```json\n{"answer_q1": "A", "answer_q2": "B"}\n```', "no json", '{"answer": "D"}', '{"answer": "A"}']

    monkeypatch.setattr(harness.runner, "generate", generate)
    outcomes = answer(harness, items, "generate", max_new_tokens=50)
    assert sent[0] == chat_prompt(harness.tokenizer, user_prompt(items[0]), system_prompt("EU", "en"))
    assert "Instructions" in sent[0] and items[0].scenario in sent[0]
    assert [o.answers for o in outcomes] == [["A", "B"], ["", ""], ["D"], ["A"]]
    expected = [o.answers == [q.letter for q in o.item.questions] for o in outcomes]
    assert [o.correct for o in outcomes] == expected
