"""The built presets' tokenizers: SentencePiece models trained on the bundled samples, cached on disk.

Same corpus and options give the same model file, so every process (and every DDP rank) that builds
a preset tokenizer gets an identical one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import sentencepiece as spm

from moei_lightning.backbone.presets import cache_root

# Extra tokenizer-corpus text, so the presets cover plain English, every printable ASCII character and common
# accented letters even when the bundled samples are few.
_BUILTIN_TEXT = (
    "the of and to a in is you that it he was for on are as with his they I at be this have from or one had",
    "by word but not what all were we when your can said there use an each which she do how their if will up",
    "other about out many then them these so some her would make like him into time has look two more write",
    "go see number no way could people my than first water been call who its now find long down day did get",
    "come made may part question answer choose option text label because feel felt think know help friend",
    "happy sad angry afraid surprised disgusted calm proud ashamed guilty lonely excited anxious grateful",
    "joy sadness anger fear surprise disgust love trust anticipation neutral emotion empathy kindness",
    "What is the capital of France? Paris. How many legs does a spider have? Eight. Why did she cry?",
    "[INST] <<SYS>> <</SYS>> [/INST] Instruction: Input: Output: Options: A. B. C. D. yes no true false",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 50% $5 #1 @user e-mail (a) [b] {c} <d> x=y a+b a*b a/b a|b a~b a^b",
    "".join(chr(code) for code in range(33, 127)),
    "àáâäãåæçèéêëìíîïñòóôöõøœùúûüýÿß ÀÁÂÄÇÈÉÊÌÍÎÑÒÓÔÖÙÚÛÜ café naïve résumé über señor",
)
_SPM_COMMON = {
    "vocab_size": 1000,
    "hard_vocab_limit": False,  # a small corpus yields fewer pieces instead of an error
    "character_coverage": 1.0,
    "num_threads": 1,  # with the settings below, same corpus -> same model file
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "minloglevel": 2,
}
_SPM_PRESETS: dict[str, tuple[dict[str, object], str]] = {
    # LLaMA: byte fallback (no character is ever <unk>), digits split, whitespace kept; unk=0, bos=1, eos=2.
    "tiny-llama": (
        dict(
            model_type="bpe",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
        ),
        "tokenizer.model",
    ),
    # T5: pad=0, eos=1, unk=2, no BOS; transformers' T5Tokenizer has no byte fallback.
    "tiny-t5": (
        dict(model_type="unigram", normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1, unk_id=2, bos_id=-1),
        "spiece.model",
    ),
}
"""Per preset: SentencePiece options in the style of the real family, and the file name its tokenizer loads."""


def tokenizer_corpus() -> list[str]:
    """The preset tokenizers' training text: the built-in lines plus every text field of the bundled samples."""
    # Imported here: the data package brings Lightning with it, which loading a saved backbone never needs.
    from moei_lightning.data import SAMPLES_DIR
    from moei_lightning.data.jsonl import read_jsonl

    lines = list(_BUILTIN_TEXT)
    # {ei,gi}/*.jsonl only: the synthetic data (samples/synthetic) has its own backbone and tokenizer.
    for path in sorted(SAMPLES_DIR.glob("*/*.jsonl"), key=lambda p: p.relative_to(SAMPLES_DIR).as_posix()):
        for _, record in read_jsonl(path):
            lines += [str(record[key]) for key in ("instruction", "input", "output") if record.get(key)]
            lines += [str(choice) for choice in record.get("choices") or ()]
    return lines


def train_sentencepiece(lines: list[str], preset: str, **overrides: object) -> bytes:
    """A SentencePiece model file trained on ``lines`` with a preset family's options (same input, same bytes)."""
    options = {**_SPM_COMMON, **_SPM_PRESETS[preset][0], **overrides}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
    return model.getvalue()


def trained_spm_dir(preset: str) -> Path:
    """A directory holding the preset's SentencePiece model, trained once per corpus and then reused.

    The model file is written under a temporary name and moved into place with `os.replace`, so processes
    that start together (DDP ranks) never read a half-written file; both write the same bytes anyway.
    """
    options, filename = _SPM_PRESETS[preset]
    options = {**_SPM_COMMON, **options}
    lines = tokenizer_corpus()
    key_source = json.dumps([preset, options, spm.__version__, lines], sort_keys=True)
    directory = cache_root() / "tokenizers" / f"{preset}-{hashlib.sha256(key_source.encode()).hexdigest()[:16]}"
    target = directory / filename
    if not target.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        model = train_sentencepiece(lines, preset)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(model)
            os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide a shared $MOEI_CACHE from other users
            os.replace(temporary, target)
        finally:
            Path(temporary).unlink(missing_ok=True)
    return directory
