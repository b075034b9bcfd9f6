"""EiBench records, prompt formatting, tokenisation and the EI/GI mixing DataModule."""

from moei_lightning.data.collate import Collator
from moei_lightning.data.datamodule import SAMPLES_DIR, MoEIDataModule
from moei_lightning.data.encode import IGNORE_INDEX, DataReport, Encoder, Example, Kind, strip_affixes
from moei_lightning.data.errors import DataError
from moei_lightning.data.prompts import DEFAULT_TEMPLATE, PromptFormatter, render_choices
from moei_lightning.data.records import ASPECTS, EI_ASPECTS, GI_ASPECTS, EiRecord, load_prompts, load_records
from moei_lightning.data.sampling import EpochPermutation, EvalBatchSampler, MixedBatchSampler, gi_per_batch
from moei_lightning.data.sources import DataSource

__all__ = [
    "ASPECTS",
    "DEFAULT_TEMPLATE",
    "EI_ASPECTS",
    "GI_ASPECTS",
    "IGNORE_INDEX",
    "SAMPLES_DIR",
    "Collator",
    "DataError",
    "DataReport",
    "DataSource",
    "EiRecord",
    "Encoder",
    "EpochPermutation",
    "EvalBatchSampler",
    "Example",
    "Kind",
    "MixedBatchSampler",
    "MoEIDataModule",
    "PromptFormatter",
    "gi_per_batch",
    "load_prompts",
    "load_records",
    "render_choices",
    "strip_affixes",
]
