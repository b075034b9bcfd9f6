"""Multiple choice by log-likelihood: against a brute-force sum, lm-eval's prompt/choice boundary, a known answer."""

import dataclasses

import pytest
import torch

from moei_lightning.backbone import BackboneConfig, load_backbone, load_tokenizer
from moei_lightning.data import EiRecord, Encoder, PromptFormatter
from moei_lightning.eval.choices import (
    ChoiceScores,
    choice_examples,
    choice_loglikelihoods,
    split_boundary,
)

PRESETS = {"tiny-llama": "causal", "tiny-t5": "seq2seq"}

RECORDS = [
    EiRecord(
        id="mood",
        task="t",
        domain="ei",
        aspect="perception",
        instruction="Classify the feeling in the text.",
        input="I finally passed the exam after three tries!",
        output="relieved and proud of myself",
        choices=["angry", "relieved and proud of myself", "bored", "a little bit sad about the weather"],
    ),
    EiRecord(
        id="sum",
        task="t",
        domain="gi",
        aspect="reasoning",
        instruction="Pick the right answer.",
        input="What is two plus three?",
        output="5",
        choices=["5", "six", "twenty-three minus eighteen plus one"],
    ),
]


def setup_model(preset: str) -> tuple[torch.nn.Module, Encoder]:
    config = BackboneConfig(name_or_path=preset)
    tokenizer = load_tokenizer(config)
    formatter = PromptFormatter(tokenizer=tokenizer)
    return load_backbone(config), Encoder(tokenizer, formatter, PRESETS[preset], max_length=256)


def lm_eval_pair(encoder: Encoder, prompt: str, choice: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-evaluation-harness v0.4's HFLM ``_encode_pair`` makes them:
    trailing whitespace of the context moves to the continuation; causal continuation tokens are those of the
    whole text past the context's length; seq2seq ones are the continuation's own."""
    tokenizer = encoder.tokenizer
    choice = " " + choice  # lm-eval's default target_delimiter for multiple choice
    n_spaces = len(prompt) - len(prompt.rstrip())
    context, continuation = (prompt[:-n_spaces], prompt[-n_spaces:] + choice) if n_spaces else (prompt, choice)
    starts_with_bos = tokenizer.bos_token is not None and context.startswith(tokenizer.bos_token)
    context_ids = tokenizer(context, add_special_tokens=not starts_with_bos)["input_ids"]
    if encoder.kind == "causal":
        whole = tokenizer(context + continuation, add_special_tokens=not starts_with_bos)["input_ids"]
        return context_ids, whole[len(context_ids) :]
    return context_ids, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def brute_force_logprob(model: torch.nn.Module, encoder: Encoder, prompt: str, choice: str) -> float:
    """log p(choice | prompt) for one unpadded sequence, written out token by token."""
    prompt_ids, choice_ids = lm_eval_pair(encoder, prompt, choice)
    if encoder.kind == "causal":
        ids = prompt_ids + choice_ids
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        return sum(float(logp[j - 1, ids[j]]) for j in range(len(prompt_ids), len(ids)))
    decoder_ids = [model.config.decoder_start_token_id, *choice_ids[:-1]]
    logits = model(input_ids=torch.tensor([prompt_ids]), decoder_input_ids=torch.tensor([decoder_ids])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return sum(float(logp[j, token]) for j, token in enumerate(choice_ids))


@pytest.mark.parametrize("preset", PRESETS)
def test_matches_brute_force_sum_over_choices_of_different_lengths(preset: str) -> None:
    model, encoder = setup_model(preset)
    scores = choice_loglikelihoods(model, encoder, RECORDS, batch_size=3)  # batches cut across records
    for record, score in zip(RECORDS, scores):
        prompt = encoder.formatter.format(record)
        token_counts = [len(lm_eval_pair(encoder, prompt, c)[1]) for c in record.choices]
        assert len(set(token_counts)) > 1
        assert score.tokens == token_counts
        assert score.chars == [len(c) for c in record.choices]
        expected = [brute_force_logprob(model, encoder, prompt, choice) for choice in record.choices]
        assert score.logprobs == pytest.approx(expected, abs=1e-4)
        per_char = [lp / len(c) for lp, c in zip(expected, record.choices)]
        assert score.predicted == per_char.index(max(per_char))
        assert score.predicted_unnormalised == expected.index(max(expected))


def test_acc_norm_divides_by_characters_not_tokens() -> None:
    scores = ChoiceScores(logprobs=[-10.0, -6.0], tokens=[2, 2], chars=[10, 3])
    assert scores.predicted == 0  # -1.0 per character beats -2.0
    assert scores.predicted_unnormalised == 1


@pytest.mark.parametrize("preset", PRESETS)
def test_preferred_choice_wins(preset: str) -> None:
    """Make the model prefer a choice it did not pick (a bias on its output layer towards that choice's
    tokens, as a fine-tune on it would); scoring must then pick it, per character and in total."""
    model, encoder = setup_model(preset)
    record = RECORDS[0]
    before = choice_loglikelihoods(model, encoder, [record])[0].predicted
    answer = (before + 1) % len(record.choices)
    tokens = [set(encoder.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in record.choices]
    assert all(t - tokens[answer] for i, t in enumerate(tokens) if i != answer)  # every rival has another token
    bias = torch.zeros(model.get_output_embeddings().out_features)
    bias[sorted(tokens[answer])] = 100.0
    model.get_output_embeddings().register_forward_hook(lambda _module, _args, logits: logits + bias)
    after = choice_loglikelihoods(model, encoder, [record])[0]
    assert after.predicted == answer
    assert after.predicted_unnormalised == answer


def test_boundary_is_split_as_lm_eval_does() -> None:
    assert split_boundary("Answer: ", "Paris") == ("Answer:", " Paris")
    assert split_boundary("Answer:\n\n", "Paris") == ("Answer:", "\n\nParis")
    assert split_boundary("Answer:", " Paris") == ("Answer:", " Paris")


@pytest.mark.parametrize("preset", PRESETS)
def test_a_space_scores_the_same_on_either_side_of_the_boundary(preset: str) -> None:
    """A template ending in a space and a choice starting with one are one text, so one score (lm-eval)."""
    model, encoder = setup_model(preset)
    tokenizer = encoder.tokenizer
    spaced, plain = (
        Encoder(tokenizer, PromptFormatter(template, use_chat_template=False, tokenizer=tokenizer), encoder.kind, 256)
        for template in ("{instruction}\n\n{input}\nAnswer: ", "{instruction}\n\n{input}\nAnswer:")
    )
    record = RECORDS[0]
    leading = dataclasses.replace(record, choices=[f" {c}" for c in record.choices], output=f" {record.output}")
    a, b = choice_loglikelihoods(model, spaced, [record])[0], choice_loglikelihoods(model, plain, [leading])[0]
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert a.tokens == b.tokens
    examples, _ = choice_examples(spaced, [record])
    prompt = spaced.formatter.format(record)
    for example, choice in zip(examples, record.choices):
        context_ids, choice_ids = lm_eval_pair(spaced, prompt, choice)
        if encoder.kind == "causal":
            assert example.input_ids == context_ids + choice_ids
        else:
            assert (example.input_ids, example.labels) == (context_ids, choice_ids)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_choice_is_scored_on_the_tokens_training_teaches(preset: str) -> None:
    """The chat prompt + `` choice`` reads exactly the prompt and target tokens a training example has."""
    _, encoder = setup_model(preset)
    record = RECORDS[0]
    trained, _ = encoder.encode([dataclasses.replace(record, output=c) for c in record.choices], "train")
    scored, _ = choice_examples(encoder, [record])
    for train, score in zip(trained, scored):
        assert score.input_ids == (train.input_ids[:-1] if encoder.kind == "causal" else train.input_ids)
        assert [t for t in score.labels if t != -100] == [t for t in train.labels if t != -100][:-1]  # no EOS
