"""The synthetic world: bundled files equal their generator, the backbone build is deterministic, the preset works."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch
from safetensors.torch import load_file

from moei_lightning import backbone
from moei_lightning.backbone import BackboneConfig, load_backbone, load_tokenizer, resolve_kind
from moei_lightning.backbone.tokenizer_training import tokenizer_corpus
from moei_lightning.data import EI_ASPECTS, GI_ASPECTS, Encoder, PromptFormatter, load_records
from moei_lightning.data.synthetic import EI_TASKS, SYNTHETIC_DIR, gi_corpus, write_splits
from moei_lightning.eval.choices import choice_loglikelihoods
from moei_lightning.presets.build_tiny_gi import build

SPLITS = [(domain, split) for domain in ("ei", "gi") for split in ("train", "val", "test")]


def test_bundled_files_equal_regenerated(tmp_path):
    written = write_splits(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == sorted(f"{d}/{s}.jsonl" for d, s in SPLITS)
    for domain, split in SPLITS:
        bundled = (SYNTHETIC_DIR / domain / f"{split}.jsonl").read_bytes()
        assert (tmp_path / domain / f"{split}.jsonl").read_bytes() == bundled, f"{domain}/{split} differs"


def test_files_validate_and_cover_every_aspect_with_balanced_answers():
    everything = load_records([SYNTHETIC_DIR / d / f"{s}.jsonl" for d, s in SPLITS])  # ids unique over all files
    keys = [(r.instruction, r.input, r.output, tuple(r.choices)) for r in everything]
    assert len(set(keys)) == len(keys), "a record appears twice, or in two splits"
    for domain, split in SPLITS:
        records = load_records([SYNTHETIC_DIR / domain / f"{split}.jsonl"])
        assert {r.domain for r in records} == {domain}
        assert set(r.aspect for r in records) == set(EI_ASPECTS if domain == "ei" else GI_ASPECTS)
        assert all(r.choices and r.output in r.choices for r in records)
        if domain == "ei":  # answers spread evenly over positions: always picking one position scores chance
            positions = Counter(r.choices.index(r.output) for r in records)
            assert max(positions.values()) - min(positions.values()) < 0.1 * len(records), positions


def test_pretraining_corpus_holds_no_eval_item_and_no_ei_task():
    corpus = gi_corpus(1000)
    assert {r["domain"] for r in corpus} == {"gi"} and not {r["task"] for r in corpus} & set(EI_TASKS)
    held_out = {
        (r.instruction, r.input, r.output, tuple(r.choices))
        for split in ("val", "test")
        for r in load_records([SYNTHETIC_DIR / "gi" / f"{split}.jsonl"])
    }
    assert not held_out & {(r["instruction"], r["input"], r["output"], tuple(r["choices"])) for r in corpus}


def test_build_is_deterministic(tmp_path):
    for name in "ab":
        build(tmp_path / name, steps=3, corpus_size=160, batch_size=4, evaluate=False)
    first, second = (load_file(tmp_path / name / "model.safetensors") for name in "ab")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


@pytest.fixture(scope="module")
def preset():
    config = BackboneConfig(name_or_path="tiny-llama-gi")
    tokenizer = load_tokenizer(config)
    return load_backbone(config), Encoder(tokenizer, PromptFormatter(tokenizer=tokenizer), "causal", 256)


def _accuracy(model, encoder, domain):
    records = load_records([SYNTHETIC_DIR / domain / "test.jsonl"])
    scores = choice_loglikelihoods(model, encoder, records, batch_size=64)
    hits = defaultdict(list)
    for record, score in zip(records, scores):
        hits[record.aspect].append(record.choices[score.predicted] == record.output)
    return {aspect: sum(h) / len(h) for aspect, h in hits.items()}, sum(map(sum, hits.values())) / len(records)


@pytest.mark.slow  # scores 600 records x 4 choices
def test_shipped_preset_loads_offline_and_knows_gi_but_not_ei(preset, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, encoder = preset
    assert resolve_kind(BackboneConfig(name_or_path="tiny-llama-gi")) == "causal"
    assert encoder.tokenizer.chat_template and encoder.tokenizer.pad_token == encoder.tokenizer.unk_token
    assert not any(p.requires_grad for p in model.parameters())
    gi_aspects, gi = _accuracy(model, encoder, "gi")
    assert gi >= 0.90 and min(gi_aspects.values()) >= 0.85, gi_aspects
    _, ei = _accuracy(model, encoder, "ei")
    assert abs(ei - 0.25) <= 0.05, ei


def test_missing_shipped_files_say_how_to_rebuild(tmp_path, monkeypatch):
    monkeypatch.setitem(backbone.SHIPPED_PRESETS, "tiny-llama-gi", tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="build_tiny_gi"):
        load_tokenizer(BackboneConfig(name_or_path="tiny-llama-gi"))


def test_random_presets_tokenizer_corpus_ignores_the_synthetic_data():
    corpus = set(tokenizer_corpus())
    synthetic = load_records([SYNTHETIC_DIR / "ei" / "val.jsonl"])
    assert not any(record.input in corpus for record in synthetic)
