"""The data package: record validation, bundled samples, prompts, tokenisation, mixing and sharding."""

import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

import moei_lightning.data
from moei_lightning.backbone import BackboneConfig, load_tokenizer
from moei_lightning.backbone.tokenizer_training import tokenizer_corpus
from moei_lightning.data import (
    EI_ASPECTS,
    GI_ASPECTS,
    IGNORE_INDEX,
    SAMPLES_DIR,
    Collator,
    DataError,
    EiRecord,
    Encoder,
    EvalBatchSampler,
    MixedBatchSampler,
    MoEIDataModule,
    PromptFormatter,
    load_prompts,
    load_records,
)
from moei_lightning.data.sources import load_source_records

GOOD = {
    "id": "r1",
    "task": "goemotions",
    "domain": "ei",
    "aspect": "perception",
    "instruction": "Which emotion?",
    "input": "I won!",
    "output": "joy",
    "choices": ["joy", "anger"],
}


@pytest.fixture(scope="session")
def llama_tok():
    return load_tokenizer(BackboneConfig(name_or_path="tiny-llama"))


@pytest.fixture(scope="session")
def t5_tok():
    return load_tokenizer(BackboneConfig(name_or_path="tiny-t5"))


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def record(**fields) -> EiRecord:
    return EiRecord(**{**GOOD, **fields})


# --- records ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"task": "x", ', r"bad\.jsonl:2: malformed JSON"),
        (
            {k: v for k, v in GOOD.items() if k != "instruction"},
            r"bad\.jsonl:2: field 'instruction' is missing",
        ),
        ({**GOOD, "output": " "}, r"bad\.jsonl:2: field 'output' is empty"),
        (
            {**GOOD, "aspect": "memory"},
            r"bad\.jsonl:2: field 'aspect': unknown aspect 'memory'.*'perception', "
            r"'cognition', 'expression'",
        ),
        (
            {**GOOD, "domain": "iq"},
            r"bad\.jsonl:2: field 'domain': unknown domain 'iq'; allowed: \['ei', 'gi'\]",
        ),
        ({**GOOD, "input": 3}, r"bad\.jsonl:2: field 'input' must be a string, got int"),
        ({**GOOD, "output": "fear"}, r"bad\.jsonl:2: field 'output': 'fear' is not one of the choices"),
        ({**GOOD, "choices": "joy"}, r"bad\.jsonl:2: field 'choices' must be a list"),
        ({**GOOD, "choice": ["joy"]}, r"bad\.jsonl:2: unknown field\(s\) \['choice'\]"),
        (
            {**GOOD, "id": "first"},
            r"bad\.jsonl:2: field 'id': duplicate id 'first', first seen at .*bad\.jsonl:1",
        ),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, bad_line, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [{**GOOD, "id": "first"}, bad_line])
    with pytest.raises(DataError, match=expected):
        load_records([path])


def test_records_from_folder_defaults_and_missing_paths(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{**GOOD, "id": "b"}])
    no_id = {k: v for k, v in GOOD.items() if k not in ("id", "choices")}
    write_jsonl(tmp_path / "a.jsonl", ["", {**no_id, "input": ""}])  # blank lines are not records
    (tmp_path / "notes.txt").write_text("ignored: not *.jsonl")
    records = load_records([tmp_path])
    assert [r.id for r in records] == ["ei/a:2", "b"]  # files by name; default id is <domain>/<stem>:<line>
    assert records[0].input == "" and records[0].choices is None
    assert records[0].source.endswith("a.jsonl:2")
    with pytest.raises(DataError, match="no such file or folder"):
        load_records([tmp_path / "missing.jsonl"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"folder has no \*\.jsonl files"):
        load_records([empty])


def _corpus_of(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(moei_lightning.data, "SAMPLES_DIR", path.parents[1])  # the corpus reads <samples>/*/*.jsonl
    return tokenizer_corpus()


JSONL_READERS = {
    "records": lambda path, _: load_records([path]),
    "prompts": lambda path, _: load_prompts([path]),
    "mapped source": lambda path, _: load_source_records(
        [str(path)], key="ei_train", domain="ei", split="train", columns={"output": "label"}
    ),
    "preset tokenizer corpus": _corpus_of,
}


@pytest.mark.parametrize("reader", JSONL_READERS)
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"a": 1}\n\n{"a": \n', ":3: malformed JSON (Expecting value at column 7); each line must be one object"),
        (b'{"a": 1}\r\n[1, 2]\r\n', ":2: expected a JSON object, got list"),
        (b"\n  \n", ": the file is empty (no JSON object on any line); fill it or remove it from the list"),
        ('{"input": "café"}\n'.encode("latin-1"), ": not valid UTF-8 ("),
    ],
    ids=["malformed", "not an object", "empty", "latin-1"],
)
def test_every_jsonl_reader_names_the_file_and_line(tmp_path, monkeypatch, reader, content, expected):
    path = tmp_path / "samples" / "ei" / "data.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}{expected}")):
        JSONL_READERS[reader](path, monkeypatch)


# --- bundled samples -------------------------------------------------------------------------------


def test_bundled_samples_meet_the_counts():
    splits = {
        (d, s): load_records([SAMPLES_DIR / d / f"{s}.jsonl"]) for d in ("ei", "gi") for s in ("train", "val", "test")
    }
    ei = [r for (d, _), rs in splits.items() if d == "ei" for r in rs]
    gi = [r for (d, _), rs in splits.items() if d == "gi" for r in rs]
    assert len(ei) >= 300 and len(gi) >= 100
    assert all(r.domain == "ei" for r in ei) and all(r.domain == "gi" for r in gi)
    tasks = {aspect: {r.task for r in ei if r.aspect == aspect} for aspect in EI_ASPECTS}
    assert all(len(t) >= 3 for t in tasks.values()), tasks
    assert {r.aspect for r in gi} == set(GI_ASPECTS)
    assert all(r.choices for r in gi)
    assert all(r.choices is None for r in ei if r.aspect == "expression")
    assert all(r.choices for r in ei if r.aspect != "expression")
    ids = [r.id for rs in splits.values() for r in rs]
    assert len(ids) == len(set(ids)), "an example appears in two splits"
    for domain, n in (("ei", len(ei)), ("gi", len(gi))):
        assert 0.65 < len(splits[(domain, "train")]) / n < 0.75
    for r in ei + gi:
        assert len(f"{r.instruction} {r.input}".split()) < 75, r.id
    assert sum(p.stat().st_size for p in SAMPLES_DIR.glob("*/*.jsonl")) < 300_000


# --- prompts ---------------------------------------------------------------------------------------


def test_template_placeholders_and_empty_blocks():
    fmt = PromptFormatter("{instruction}\n\nInput: {input}\n\nOptions:\n{choices}\n\nAnswer:", use_chat_template=False)
    assert fmt.format(record()) == "Which emotion?\n\nInput: I won!\n\nOptions:\n1. joy\n2. anger\n\nAnswer:"
    assert fmt.format(record(input="", choices=None)) == "Which emotion?\n\nAnswer:"
    with_system = PromptFormatter("{instruction}", system_prompt="Be kind.", use_chat_template=False)
    assert with_system.format(record()) == "Be kind.\n\nWhich emotion?"


@pytest.mark.parametrize("template", ["{instruction} {output}", "{instruction} {input!r}", "{}", "{instruction"])
def test_bad_template_names_the_config_key(template):
    with pytest.raises(DataError, match=r"config key data\.prompt_template"):
        PromptFormatter(template)
    with pytest.raises(DataError, match=r"data\.prompt_template"):
        MoEIDataModule(prompt_template=template)


def test_chat_template_is_used_when_present(llama_tok):
    chat = PromptFormatter(system_prompt="Be kind.", tokenizer=llama_tok)
    prompt = chat.format(record())
    assert prompt.startswith("<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>") and prompt.endswith("[/INST]")
    plain = PromptFormatter(use_chat_template=False, tokenizer=llama_tok).format(record())
    assert not plain.startswith("<s>") and "[INST]" not in plain


# --- tokenisation and collation --------------------------------------------------------------------


def test_causal_labels_cover_exactly_the_target(llama_tok):
    records = [
        record(id="a"),
        record(id="b", input="A much longer input sentence than the first.", output="anger"),
    ]
    encoder = Encoder(llama_tok, PromptFormatter(tokenizer=llama_tok), "causal", 512)
    examples, report = encoder.encode(records, "train")
    assert report.total == 2 and report.truncated == 0 and not report.skipped
    for ex in examples:
        assert ex.input_ids.count(llama_tok.bos_token_id) == 1 and ex.input_ids[0] == llama_tok.bos_token_id
    batch = Collator(llama_tok.pad_token_id, "causal")(examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["domain"].dtype == torch.long
    for row, ex in enumerate(examples):
        n_prompt = len(llama_tok(ex.prompt, add_special_tokens=False)["input_ids"])
        length = len(ex.input_ids)
        labels = batch["labels"][row]
        assert (labels[:n_prompt] == IGNORE_INDEX).all() and (labels[length:] == IGNORE_INDEX).all()
        assert (labels[n_prompt:length] != IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
        assert torch.equal(labels[n_prompt:length], batch["input_ids"][row, n_prompt:length])
        target = labels[n_prompt:length].tolist()
        assert target[-1] == llama_tok.eos_token_id
        assert llama_tok.decode(target[:-1]) == ex.record.output
    assert batch["domain"].tolist() == [1, 1] and batch["id"] == ["a", "b"] and "prompt" not in batch


def test_seq2seq_maps_source_to_target(t5_tok):
    records = [record(id="a"), record(id="b", domain="gi", aspect="knowledge", output="anger")]
    examples, _ = Encoder(t5_tok, PromptFormatter(tokenizer=t5_tok), "seq2seq", 512).encode(records, "val")
    batch = Collator(t5_tok.pad_token_id, "seq2seq", "left", eval_fields=True)(examples)
    for row, ex in enumerate(examples):
        assert ex.input_ids == t5_tok(ex.prompt)["input_ids"]  # the source ends with T5's </s>
        assert ex.labels == t5_tok(ex.record.output)["input_ids"]
        assert t5_tok.decode(ex.labels, skip_special_tokens=True) == ex.record.output
        assert batch["labels"][row, : len(ex.labels)].tolist() == ex.labels  # labels always pad right
        assert (batch["labels"][row, len(ex.labels) :] == IGNORE_INDEX).all()
        assert batch["input_ids"][row, -len(ex.input_ids) :].tolist() == ex.input_ids  # source padded left
    assert batch["labels"].shape[1] == max(len(e.labels) for e in examples)
    assert batch["domain"].tolist() == [1, 0] and batch["aspect"] == ["perception", "knowledge"]
    assert batch["target"] == ["joy", "anger"] and batch["choices"] == [r.choices for r in records]
    assert batch["prompt"] == [e.prompt for e in examples]


def test_truncation_is_counted_and_nothing_is_dropped_silently(llama_tok):
    long_input = " ".join(["word"] * 80)
    records = [
        record(id="short", input=""),
        record(id="long", input=long_input),
        record(id="longtarget", input="", output=" ".join(["joy"] * 100), choices=None),
    ]
    fmt = PromptFormatter(use_chat_template=False, tokenizer=llama_tok)
    full, _ = Encoder(llama_tok, fmt, "causal", 10_000).encode(records, "train")
    limit = len(full[0].input_ids)  # the short example just fits
    examples, report = Encoder(llama_tok, fmt, "causal", limit).encode(records, "train")
    assert [e.record.id for e in examples] == ["short", "long", "longtarget"]
    assert report.truncated == 2 and report.target_truncated == 1 and not report.skipped
    assert all(len(e.input_ids) <= limit for e in examples)
    long, longtarget = examples[1], examples[2]
    # The long prompt loses its start but keeps its BOS, its end and the whole target.
    assert len(long.input_ids) == limit and long.input_ids[0] == llama_tok.bos_token_id
    assert long.input_ids[1:] == full[1].input_ids[-(limit - 1) :]
    assert [t for t in long.labels if t != IGNORE_INDEX] == [t for t in full[1].labels if t != IGNORE_INDEX]
    # A target longer than max_length leaves only the BOS of the prompt and is cut from the right.
    assert longtarget.labels[0] == IGNORE_INDEX and longtarget.labels[1:] == longtarget.input_ids[1:]
    assert longtarget.input_ids[1:] == [t for t in full[2].labels if t != IGNORE_INDEX][: limit - 1]
    assert "truncated: 2 (target cut in 1)" in report.summary()

    skipped_examples, skipped = Encoder(llama_tok, fmt, "causal", 1).encode(records, "train")
    assert skipped_examples == [] and len(skipped.skipped) == 3  # BOS alone fills max_length
    assert "skipped, no room within data.max_length: 3" in skipped.summary()


# --- mixing and sharding ---------------------------------------------------------------------------


def batches(sampler, epoch=0):
    sampler.sampler.set_epoch(epoch)  # the path Lightning uses
    return list(sampler)


def test_mixed_batches_have_the_configured_gi_share():
    sampler = MixedBatchSampler(n_ei=50, n_gi=7, batch_size=5, gi_ratio=0.2, seed=1)
    out = batches(sampler)
    assert len(out) == len(sampler) == 50 // 4
    for batch in out:
        assert len(batch) == 5 and sum(i >= 50 for i in batch) == 1
    ei_seen = [i for b in out for i in b if i < 50]
    assert len(set(ei_seen)) == len(ei_seen) == 48  # every full EI batch once; 2 wait for another epoch
    assert batches(MixedBatchSampler(50, 7, 5, 0.2, seed=1)) == out
    assert batches(sampler, epoch=1) != out
    assert batches(MixedBatchSampler(50, 7, 5, 0.2, seed=2)) != out


@pytest.mark.parametrize(("n_ei", "expect_equal"), [(48, True), (52, False)])
def test_two_ranks_cover_what_one_rank_with_double_batch_covers(n_ei, expect_equal):
    ranks = [batches(MixedBatchSampler(n_ei, 9, 4, 0.25, seed=3, rank=r, world_size=2), epoch=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    single = batches(MixedBatchSampler(n_ei, 9, 8, 0.25, seed=3), epoch=2)
    steps = [sorted(a + b) for a, b in zip(*ranks)]
    if expect_equal:  # 16 micro-batches of 3 EI: split evenly, same examples at every global step
        assert steps == [sorted(b) for b in single]
    else:  # 17 micro-batches: rank 1 wraps around to keep counts equal; one process stops a step earlier
        assert steps[: len(single)] == [sorted(b) for b in single] and len(steps) == len(single) + 1


def test_mixing_config_errors():
    with pytest.raises(DataError, match=r"rounds to none; raise data\.batch_size or data\.gi_ratio"):
        MixedBatchSampler(50, 7, batch_size=2, gi_ratio=0.2, seed=0)
    with pytest.raises(DataError, match="GI training set is empty"):
        MixedBatchSampler(50, 0, batch_size=8, gi_ratio=0.2, seed=0)
    with pytest.raises(DataError, match="fewer than the 6 EI examples of one batch"):
        MixedBatchSampler(5, 7, batch_size=8, gi_ratio=0.2, seed=0)
    with pytest.raises(DataError, match=r"config key data\.gi_ratio"):
        MoEIDataModule(gi_ratio=1.0)


@pytest.mark.parametrize(("n", "batch_size", "world_size"), [(23, 4, 1), (23, 4, 3), (10, 8, 4), (7, 1, 2), (2, 3, 4)])
def test_eval_sharding_covers_everything_with_equal_batch_counts(n, batch_size, world_size):
    per_rank = [list(EvalBatchSampler(n, batch_size, r, world_size)) for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1
    assert all(0 < len(b) <= batch_size for bs in per_rank for b in bs)
    seen = Counter(i for bs in per_rank for b in bs for i in b)
    assert set(seen) == set(range(n))
    if n >= world_size and (batch_size > 1 or n % world_size == 0):
        assert all(c == 1 for c in seen.values())  # repeats only where the docstring says


# --- the DataModule --------------------------------------------------------------------------------


def small_datamodule(tmp_path, **kwargs) -> MoEIDataModule:
    ei = [
        record(
            id=f"e{i}",
            aspect=("perception", "cognition", "expression")[i % 3],
            task=f"t{i % 3}",
            choices=None if i % 3 == 2 else GOOD["choices"],
        )
        for i in range(20)
    ]
    gi = [record(id=f"g{i}", domain="gi", aspect=GI_ASPECTS[i % 4], task="qa") for i in range(6)]
    for name, rows in (("ei", ei), ("gi", gi)):
        write_jsonl(tmp_path / f"{name}.jsonl", [{k: v for k, v in vars(r).items() if k != "source"} for r in rows])
    paths = {f"{d}_{s}": str(tmp_path / f"{d}.jsonl") for d in ("ei", "gi") for s in ("train", "val", "test")}
    return MoEIDataModule(**{**paths, **kwargs})


def test_val_and_test_batches_keep_their_tags(tmp_path, llama_tok):
    dm = small_datamodule(tmp_path, batch_size=4, eval_batch_size=5)
    dm.attach(llama_tok, "causal")
    dm.setup("validate")
    dm.setup("test")
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        rows = [(i, a, t, int(d)) for b in loader for i, a, t, d in zip(b["id"], b["aspect"], b["task"], b["domain"])]
        records = load_records([tmp_path / "ei.jsonl", tmp_path / "gi.jsonl"])
        assert rows == [(r.id, r.aspect, r.task, int(r.domain == "ei")) for r in records]  # file order, EI first
    batch = next(iter(dm.val_dataloader()))
    assert {"choices", "target", "prompt"} <= batch.keys()
    assert dm.reports["val"].examples == Counter(
        {
            "ei/perception": 7,
            "ei/cognition": 7,
            "ei/expression": 6,
            "gi/knowledge": 2,
            "gi/reasoning": 2,
            "gi/commonsense": 1,
            "gi/reading": 1,
        }
    )


def test_setup_reads_tokenizer_and_kind_from_the_module(tmp_path, llama_tok):
    dm = small_datamodule(tmp_path, batch_size=4, gi_ratio=0.25, max_train_examples=10)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(), global_rank=0, world_size=1)
    with pytest.raises(DataError, match=r"does not expose both `tokenizer` and `kind`.*attach\(tokenizer, kind\)"):
        dm.setup("fit")
    dm.trainer.lightning_module = SimpleNamespace(tokenizer=llama_tok, kind="causal")
    dm.setup("fit")
    assert dm.reports["train"].capped == 10  # 20 EI -> 10; the 6 GI are under the cap
    assert [e.record.domain for e in dm.examples("train")] == ["ei"] * 10 + ["gi"] * 6
    progress = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace())))
    progress.epoch_loop.batch_progress.current.completed = 0  # a fresh epoch
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, fit_loop=progress)
    loader = dm.train_dataloader()
    assert (loader.batch_sampler.rank, loader.batch_sampler.world_size, len(loader)) == (1, 2, 2)
    assert all(int((b["domain"] == 0).sum()) == 1 for b in loader)


class _Recorder(LightningModule):
    """Just enough of a module for the DataModule: tokenizer, kind, and a loss; remembers the batches."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.kind = tokenizer, "causal"
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []
        self.seen_val: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["id"]))
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.seen_val.append(list(batch["id"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_moves_the_sampler_epoch(tmp_path, llama_tok):
    dm = small_datamodule(tmp_path, batch_size=4, gi_ratio=0.25, ei_val=[], gi_val=[])  # no validation data
    module = _Recorder(llama_tok)
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=dm)
    per_epoch = len(module.seen) // 2
    assert per_epoch == 20 // 3
    expected = []
    sampler = MixedBatchSampler(20, 6, 4, 0.25, seed=42)
    ids = [e.record.id for e in dm.examples("train")]
    for epoch in (0, 1):
        expected += [[ids[i] for i in b] for b in batches(sampler, epoch)]
    assert module.seen == expected and module.seen[:per_epoch] != module.seen[per_epoch:]
    assert module.seen_val == [] and dm.reports["val"].total == 0
