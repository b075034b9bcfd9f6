"""The LightningDataModule: EiBench EI data mixed with GI data, tokenised once at setup.

The tokenizer and the model kind belong to the model, so the DataModule takes them from the
LightningModule at ``setup``: ``trainer.lightning_module.tokenizer`` (a Hugging Face tokenizer) and
``trainer.lightning_module.kind`` (``"causal"`` or ``"seq2seq"``). Lightning calls the DataModule's
``setup`` before ``configure_model``, so the module must load its tokenizer in ``__init__``.
Without a Trainer (tests, evaluation scripts) call :meth:`MoEIDataModule.attach` first.

Under DDP or FSDP the Trainer must run with ``use_distributed_sampler=False`` (the command line's
default, and it refuses ``true`` there): the samplers here shard by ``trainer.global_rank`` /
``trainer.world_size`` themselves (see
:mod:`moei_lightning.data.sampling` for how global batches map to ranks). The batch contract is in
:mod:`moei_lightning.data.collate`.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from moei_lightning.data.collate import Collator
from moei_lightning.data.encode import DataReport, Encoder, Example, Kind
from moei_lightning.data.errors import DataError
from moei_lightning.data.prompts import DEFAULT_TEMPLATE, PromptFormatter
from moei_lightning.data.records import EiRecord, check_unique_ids, load_prompts
from moei_lightning.data.sampling import EvalBatchSampler, MixedBatchSampler
from moei_lightning.data.sources import DataSource, load_source_records

SAMPLES_DIR = Path(__file__).parent / "samples"
"""The bundled sample data: ``{ei,gi}/{train,val,test}.jsonl``."""

# The training sampler resumes mid-epoch exactly (see sampling.py), which Lightning cannot tell.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


_SAMPLES = {
    f"{domain}_{split}": (str(SAMPLES_DIR / domain / f"{split}.jsonl"),)
    for domain in ("ei", "gi")
    for split in ("train", "val", "test")
}


class MoEIDataModule(LightningDataModule):
    """EI + GI data for MoEI: mixed training batches, per-aspect tagged evaluation batches.

    Args:
        ei_train: The EI training records: EiBench JSONL files or folders (all ``*.jsonl`` inside), or
            other files and datasets as :class:`~moei_lightning.data.sources.DataSource` entries (a
            path or ``load_dataset`` name with a column mapping). Defaults to the bundled samples.
        ei_val: EI validation files or folders.
        ei_test: EI test files or folders (also used for ``predict``).
        gi_train: GI training files or folders; GI examples teach the inter gate to keep the backbone.
        gi_val: GI validation files or folders.
        gi_test: GI test files or folders.
        gi_ratio: Fraction of GI examples in each training batch; ``round(batch_size * gi_ratio)``
            (halves up) per batch, the rest EI. 0 trains on EI only.
        batch_size: Training examples per batch on each rank.
        eval_batch_size: Examples per validation/test/predict batch on each rank; default ``batch_size``.
        max_length: Longest tokenised example (causal: prompt + target; seq2seq: source, and target
            separately). Longer ones are truncated, prompts from the left; the setup report counts them.
        num_workers: DataLoader worker processes (collation only; tokenisation happens once at setup).
        prompt_template: Prompt template with ``{instruction}``, ``{input}`` and ``{choices}`` placeholders.
            With a chat template it becomes the user turn.
        system_prompt: System message for chat templates, or a leading paragraph without one.
        use_chat_template: Wrap prompts with the tokenizer's chat template when it has one.
        seed: Seed of the training shuffle (epoch ``n`` uses ``seed + n``) and of ``max_train_examples``.
        max_train_examples: For quick runs: keep at most this many EI and this many GI training
            records, a seeded random subset in file order. None keeps all.
        predict: What ``predict`` generates for: ``.txt`` files (one instruction a line) or ``.jsonl``
            files (records; only ``instruction`` is required), or folders of them. None: the test split.
        columns: Record field -> column, for every source without its own ``columns``; a plain
            ``.jsonl`` path is then mapped too. None: our field names.
    """

    def __init__(
        self,
        ei_train: str | DataSource | Sequence[str | DataSource] = _SAMPLES["ei_train"],
        ei_val: str | DataSource | Sequence[str | DataSource] = _SAMPLES["ei_val"],
        ei_test: str | DataSource | Sequence[str | DataSource] = _SAMPLES["ei_test"],
        gi_train: str | DataSource | Sequence[str | DataSource] = _SAMPLES["gi_train"],
        gi_val: str | DataSource | Sequence[str | DataSource] = _SAMPLES["gi_val"],
        gi_test: str | DataSource | Sequence[str | DataSource] = _SAMPLES["gi_test"],
        gi_ratio: float = 0.2,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int = 512,
        num_workers: int = 0,
        prompt_template: str = DEFAULT_TEMPLATE,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
        seed: int = 42,
        max_train_examples: int | None = None,
        predict: str | Sequence[str] | None = None,
        columns: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check("gi_ratio", gi_ratio, 0 <= gi_ratio < 1, "a fraction in [0, 1)")
        _check("batch_size", batch_size, batch_size >= 1, "a positive integer")
        for key, optional in (("eval_batch_size", eval_batch_size), ("max_train_examples", max_train_examples)):
            _check(key, optional, optional is None or optional >= 1, "a positive integer or null")
        _check("max_length", max_length, max_length >= 1, "a positive number of tokens")
        _check("num_workers", num_workers, num_workers >= 0, "zero or more")
        given = {
            "ei_train": ei_train,
            "ei_val": ei_val,
            "ei_test": ei_test,
            "gi_train": gi_train,
            "gi_val": gi_val,
            "gi_test": gi_test,
        }
        self.paths = {
            key: [value] if isinstance(value, str | DataSource) else list(value) for key, value in given.items()
        }
        self.columns = columns
        self.predict_paths = None if predict is None else [predict] if isinstance(predict, str) else list(predict)
        self.gi_ratio = gi_ratio
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.use_chat_template = use_chat_template
        self.seed = seed
        self.max_train_examples = max_train_examples
        PromptFormatter(prompt_template)  # a bad template fails at construction, before any model loads
        self.tokenizer: Any = None
        self.kind: Kind | None = None
        self.formatter: PromptFormatter | None = None
        self._encoder: Encoder | None = None
        self.reports: dict[str, DataReport] = {}
        self._examples: dict[str, list[Example]] = {}

    def attach(self, tokenizer: Any, kind: Kind) -> None:
        """Use ``tokenizer`` and model ``kind`` (instead of the module's); earlier tokenisation is dropped."""
        self.tokenizer, self.kind = tokenizer, kind
        self.formatter = PromptFormatter(self.prompt_template, self.system_prompt, self.use_chat_template, tokenizer)
        self._encoder = Encoder(tokenizer, self.formatter, kind, self.max_length)
        self.reports, self._examples = {}, {}

    def setup(self, stage: str) -> None:
        """Load, validate and tokenise the splits ``stage`` needs; print what was kept, cut or skipped."""
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; expected one of {list(_STAGE_SPLITS)}")
        if self.tokenizer is None:
            self._attach_from_trainer()
        for split in self._splits(stage):
            if split not in self._examples:
                self._prepare(split)
                rank_zero_info(self.reports[split].summary())

    def train_dataloader(self) -> DataLoader:
        """Mixed EI/GI batches from :class:`MixedBatchSampler`, sharded by this process's rank."""
        examples = self.examples("train")
        n_ei = sum(e.record.domain == "ei" for e in examples)
        sampler = MixedBatchSampler(
            n_ei, len(examples) - n_ei, self.batch_size, self.gi_ratio, self.seed, *self._rank()
        )
        if self.trainer is not None:
            sampler.batches_done = self._batches_done
        return self._loader(examples, sampler, Collator(self._pad_id(), self.kind, "right"))

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """EI then GI validation examples in file order, sharded by rank; no loader when both are empty."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """EI then GI test examples in file order, sharded by rank."""
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        """The ``predict`` prompts when given, else the test set, as for :meth:`test_dataloader`."""
        return self._eval_loader(self._splits("predict")[0])

    def _splits(self, stage: str) -> tuple[str, ...]:
        return ("predict",) if stage == "predict" and self.predict_paths else _STAGE_SPLITS[stage]

    def examples(self, split: str) -> list[Example]:
        """The tokenised examples of a prepared split (``train``, ``val``, ``test``): EI first, then GI."""
        if split not in self._examples:
            calls = " or ".join(f"setup({stage!r})" for stage, splits in _STAGE_SPLITS.items() if split in splits)
            raise DataError(f"the {split} split is not prepared yet; call {calls} first")
        return self._examples[split]

    def records(self, split: str) -> list[EiRecord]:
        """The EI then GI records of a split, read and checked but not tokenised (any split, any stage)."""
        return self._load("ei", split) + self._load("gi", split)

    def _eval_loader(self, split: str) -> DataLoader | list[DataLoader]:
        examples = self.examples(split)
        if not examples:
            return []
        sampler = EvalBatchSampler(len(examples), self.eval_batch_size, *self._rank())
        side = getattr(self.tokenizer, "padding_side", "right")
        return self._loader(examples, sampler, Collator(self._pad_id(), self.kind, side, eval_fields=True))

    def _loader(
        self, examples: list[Example], sampler: MixedBatchSampler | EvalBatchSampler, collator: Collator
    ) -> DataLoader:
        # Its own generator: starting an iterator must not draw from the global RNG that adapter dropout
        # uses, or a run resumed from a checkpoint would see other dropout masks than an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            examples,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=self.num_workers,
            generator=generator,
        )

    def _batches_done(self) -> int:
        """Training batches finished in the current epoch, from the Trainer's progress (restored on resume)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.completed

    def _attach_from_trainer(self) -> None:
        module = getattr(self.trainer, "lightning_module", None)
        tokenizer, kind = getattr(module, "tokenizer", None), getattr(module, "kind", None)
        if tokenizer is None or kind is None:
            raise DataError(
                f"MoEIDataModule needs a tokenizer and a model kind at setup, but the LightningModule "
                f"{type(module).__name__} does not expose both `tokenizer` and `kind` yet; load the "
                "tokenizer in the module's __init__ (setup runs before configure_model), or call "
                "attach(tokenizer, kind) when there is no Trainer"
            )
        self.attach(tokenizer, kind)

    def _prepare(self, split: str) -> None:
        if split == "predict":
            self._examples[split], self.reports[split] = self._encoder.encode(load_prompts(self.predict_paths), split)
            return
        ei, gi = self._load("ei", split), self._load("gi", split)
        check_unique_ids(ei + gi)
        loaded = len(ei) + len(gi)
        if split == "train" and self.max_train_examples is not None:
            ei, gi = self._cap(ei), self._cap(gi)
        examples, report = self._encoder.encode(ei + gi, split)
        report.capped = loaded - len(ei) - len(gi)
        self._examples[split] = examples
        self.reports[split] = report

    def _load(self, domain: str, split: str) -> list[EiRecord]:
        key = f"{domain}_{split}"
        records = load_source_records(self.paths[key], key=key, domain=domain, split=split, columns=self.columns)
        for record in records:
            if record.domain != domain:
                raise DataError(
                    f"{record.source}: field 'domain': a {record.domain!r} record in data.{key}; "
                    f"move it to data.{record.domain}_{split}"
                )
        return records

    def _cap(self, records: list[EiRecord]) -> list[EiRecord]:
        if len(records) <= self.max_train_examples:
            return records
        keep = sorted(random.Random(f"cap:{self.seed}").sample(range(len(records)), self.max_train_examples))
        return [records[i] for i in keep]

    def _rank(self) -> tuple[int, int]:
        """This process's rank and the world size."""
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def _pad_id(self) -> int:
        """The pad token, else EOS: padded positions are masked and labelled -100, so any valid id works."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad


def _check(key: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise DataError(f"config key data.{key}: expected {expected}, got {value!r}")
