"""The frozen backbone: load a Hugging Face model and tokenizer, or a tiny offline preset.

The built presets (`tiny-llama`, `tiny-t5`) mirror the real families (LLaMA-2-Chat, T5) in miniature so
that tests and demos exercise the same code paths without any download. Their tokenizers are SentencePiece
models trained on the bundled sample data and cached on disk; their weights come from a fixed seed, so
every process that builds a preset gets identical weights.

The shipped preset `tiny-llama-gi` is a tiny LLaMA pretrained on the synthetic GI world
(docs/synthetic.md), stored inside the package as a `save_pretrained` directory and loaded through the
ordinary `from_pretrained` path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, get_args

import sentencepiece as spm
import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.utils import LocalEntryNotFoundError, validate_repo_id
from packaging.version import Version
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5Tokenizer,
)

from moei_lightning.errors import CheckpointError

Kind = Literal["causal", "seq2seq"]
KindOption = Literal["causal", "seq2seq", "auto"]
DtypeOption = Literal["float32", "bfloat16", "float16", "auto"]
_T = TypeVar("_T")

_BUILT_PRESETS: dict[str, Kind] = {"tiny-llama": "causal", "tiny-t5": "seq2seq"}
SHIPPED_PRESETS: dict[str, Path] = {"tiny-llama-gi": Path(__file__).parent / "presets" / "tiny_llama_gi"}
"""Presets stored in the package as `save_pretrained` directories (rebuilt by `moei_lightning.presets`)."""
PRESETS: dict[str, Kind] = {**_BUILT_PRESETS, "tiny-llama-gi": "causal"}
SAMPLES_DIR = Path(__file__).parent / "data" / "samples"

# transformers 4.56 renamed `torch_dtype` to `dtype` and warns on the old name.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
_PRESET_SEED = 0

# The LLaMA-2-Chat prompt format: `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>`.
# The rendered text already starts with BOS, so tokenize it with `add_special_tokens=False`.
LLAMA2_CHAT_TEMPLATE = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system_message = none -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('LLaMA-2-Chat turns must alternate user/assistant, starting with user') -}}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {%- if loop.first and system_message is not none -%}
            {%- set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] -%}
        {%- else -%}
            {%- set content = message['content'] -%}
        {%- endif -%}
        {{- bos_token + '[INST] ' + content | trim + ' [/INST]' -}}
    {%- else -%}
        {{- ' ' + message['content'] | trim + ' ' + eos_token -}}
    {%- endif -%}
{%- endfor -%}
"""

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
# Per preset: SentencePiece options in the style of the real family, and the file name its tokenizer loads.
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


@dataclass
class BackboneConfig:
    """Which pretrained transformer to adapt and how to load it.

    Args:
        name_or_path: A Hugging Face hub id, a local directory written by `save_pretrained`, or a preset
            (`tiny-llama`, `tiny-t5`: tiny random models for tests, built offline; `tiny-llama-gi`: a tiny
            LLaMA pretrained on the synthetic GI tasks, shipped in the package).
        kind: `causal` (decoder-only LM), `seq2seq` (encoder-decoder) or `auto` to read it from the model
            config (`is_encoder_decoder`).
        dtype: Parameter dtype of the frozen backbone; `auto` keeps the checkpoint's own dtype.
        attn_implementation: Attention kernel, e.g. `eager`, `sdpa` or `flash_attention_2`; None lets
            transformers choose.
        trust_remote_code: Allow model code shipped with the checkpoint to run (needed by some hub models).
        tokenizer_name_or_path: Where the tokenizer comes from, if not from `name_or_path`.
        gradient_checkpointing: Recompute activations in the backward pass (non-reentrant) to save memory.
    """

    name_or_path: str = "tiny-llama"
    kind: KindOption = "auto"
    dtype: DtypeOption = "float32"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    tokenizer_name_or_path: str | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for field, allowed in (("kind", get_args(KindOption)), ("dtype", get_args(DtypeOption))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"backbone.{field}={getattr(self, field)!r} is not one of {allowed}")


def resolve_kind(config: BackboneConfig | PretrainedConfig) -> Kind:
    """`causal` or `seq2seq`; `kind="auto"` reads `is_encoder_decoder` from the model's HF config."""
    if isinstance(config, BackboneConfig):
        if config.kind != "auto":
            return config.kind
        if config.name_or_path in PRESETS:
            return PRESETS[config.name_or_path]
        config = _from_pretrained(
            AutoConfig.from_pretrained, config.name_or_path, "config", trust_remote_code=config.trust_remote_code
        )
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def load_tokenizer(cfg: BackboneConfig) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer, with a pad token; causal tokenizers pad on the right.

    LLaMA ships without a pad token: the unknown token is used (else EOS), because a collator that masks
    labels by pad id would otherwise also hide the real EOS the model must learn to emit. Right padding
    keeps prompt+target sequences aligned for training; generation code switches to left padding itself.
    """
    source = cfg.tokenizer_name_or_path or cfg.name_or_path
    if source in _BUILT_PRESETS:
        tokenizer = _preset_tokenizer(source)
    else:
        tokenizer = _from_pretrained(
            AutoTokenizer.from_pretrained, _location(source), "tokenizer", trust_remote_code=cfg.trust_remote_code
        )
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise ValueError(
                f"The tokenizer from '{source}' has no pad, unk or eos token to pad with; "
                "add one to its tokenizer_config.json or use backbone.tokenizer_name_or_path"
            )
        tokenizer.pad_token = fallback
    if resolve_kind(cfg) == "causal":
        tokenizer.padding_side = "right"
    return tokenizer


def load_backbone(cfg: BackboneConfig, device: str | torch.device | None = None) -> PreTrainedModel:
    """The frozen backbone (every parameter has `requires_grad=False`), in eval mode, on `device`.

    Hub and local checkpoints are read straight onto `device`, so a GPU rank never holds a CPU copy.
    """
    kind = resolve_kind(cfg)
    if cfg.name_or_path in _BUILT_PRESETS:
        model = _preset_model(cfg.name_or_path, cfg.attn_implementation)
        if cfg.dtype != "auto":  # a preset's own dtype is float32
            model.to(getattr(torch, cfg.dtype))
    else:
        auto_class = AutoModelForCausalLM if kind == "causal" else AutoModelForSeq2SeqLM
        model = _from_pretrained(
            auto_class.from_pretrained,
            _location(cfg.name_or_path),
            "model",
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            # Always explicit: transformers 5 defaults to "auto" and 4.x to float32.
            **{_DTYPE_KWARG: cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)},
            **({"device_map": {"": str(device)}} if device is not None else {}),
        )
    return _frozen(model, cfg, device)


def backbone_skeleton(cfg: BackboneConfig) -> PreTrainedModel:
    """The backbone as `load_backbone` returns it, but on the meta device: modules and shapes, no weights read.

    Sharded strategies build this on every rank and fill it from rank 0's `load_backbone`, so no other
    rank ever holds the pretrained weights in full.
    """
    with torch.device("meta"):
        if cfg.name_or_path in _BUILT_PRESETS:
            model = _preset_model(cfg.name_or_path, cfg.attn_implementation)
            dtype = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        else:
            config = _from_pretrained(
                AutoConfig.from_pretrained,
                _location(cfg.name_or_path),
                "config",
                trust_remote_code=cfg.trust_remote_code,
            )
            dtype = _checkpoint_dtype(config) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
            auto_class = AutoModelForCausalLM if resolve_kind(config) == "causal" else AutoModelForSeq2SeqLM
            model = auto_class.from_config(
                config,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                **{_DTYPE_KWARG: dtype},
            )
        model.to(dtype)
    return _frozen(model, cfg, None)


def _checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in, as `dtype="auto"` would load them."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _frozen(model: PreTrainedModel, cfg: BackboneConfig, device: str | torch.device | None) -> PreTrainedModel:
    """Freeze, switch to eval mode, enable activation checkpointing if asked, move to `device`."""
    model.requires_grad_(False)
    model.eval()
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing backpropagates into adapters even when no input requires grad.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 deprecates the old name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if device is not None:
        model.to(device)
    return model


def disable_activation_checkpointing(model: PreTrainedModel) -> bool:
    """Turn the model's own activation checkpointing off; True if it was on."""
    if hasattr(model, "is_activation_checkpointing"):  # transformers >= 5.23 deprecates the old names
        enabled = model.is_activation_checkpointing
        if enabled:
            model.activation_checkpointing_disable()
        return enabled
    enabled = model.is_gradient_checkpointing
    if enabled:
        model.gradient_checkpointing_disable()
    return enabled


def local_path(name: str) -> str:
    """A name that any library's ``from_pretrained`` can read for the backbone ``name``.

    Other tools (PEFT's ``AutoPeftModel``) know no presets: a shipped preset is its package directory,
    a built preset is written once under the cache (``$MOEI_CACHE/backbones/<name>``), a local directory
    is its absolute path, and a hub id stays as it is.
    """
    if name in _BUILT_PRESETS:
        directory = _cache_root() / "backbones" / name
        if not (directory / "config.json").is_file():
            staging = directory.with_name(f".{name}.partial-{os.getpid()}")
            config = BackboneConfig(name_or_path=name)
            load_backbone(config).save_pretrained(staging)
            load_tokenizer(config).save_pretrained(staging)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(staging, directory)
        return str(directory)
    if Path(name).is_dir():
        return str(Path(name).resolve())
    return _location(name)


def _location(name: str) -> str:
    """Where `from_pretrained` reads `name`: a shipped preset's package directory, else `name` itself."""
    if name not in SHIPPED_PRESETS:
        return name
    directory = SHIPPED_PRESETS[name]
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"The preset '{name}' should be shipped in the package at {directory}, but its files are missing; "
            f"reinstall moei_lightning, or rebuild them with `python -m moei_lightning.presets.build_tiny_gi`"
        )
    return str(directory)


MOLORA_MODEL_TYPE = "moei_molora"
"""``model_type`` of a ``--format hf`` export that needs its MoLoRA adapters: transformers refuses it by itself."""
BACKBONE_MODEL_TYPE_KEY = "moei_backbone_model_type"
"""The ``config.json`` field of such an export that keeps the backbone's own ``model_type``."""


def _molora_export_config(directory: Path) -> PretrainedConfig | None:
    """The backbone's config of a MoLoRA ``--format hf`` export, whose ``config.json`` hides it from transformers."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # transformers reports the broken file itself
    if not isinstance(data, dict) or data.get("model_type") != MOLORA_MODEL_TYPE:
        return None
    data.pop("model_type")
    return AutoConfig.for_model(data.pop(BACKBONE_MODEL_TYPE_KEY), **data)


def _from_pretrained(loader: Callable[..., _T], name: str, what: str, **kwargs: object) -> _T:
    """Call a `from_pretrained` on a local directory or hub id, turning load failures into clear errors."""
    source = Path(name).expanduser()
    if not source.is_dir():
        offline = _hub_offline()
        hint = (
            f"Backbone {what} '{name}' is not a preset ({', '.join(PRESETS)}), not an existing local directory, "
            f"and not available from the Hugging Face hub{' cache (offline mode)' if offline else ''}. Download "
            f"it with `hf download {name} --local-dir <dir>` (`huggingface-cli download` in older huggingface_hub) "
            "and set backbone.name_or_path to <dir>, or choose a preset."
        )
        try:
            validate_repo_id(name)
        except ValueError as err:  # path-like, so not a hub id: asking the hub would only fail slowly
            raise FileNotFoundError(f"{hint} ('{name}' is not a valid hub id either: {err})") from err
        if not offline:
            try:
                return loader(name, **kwargs)
            except OSError as err:
                raise FileNotFoundError(f"{hint} Cause: {err}") from err
        # transformers 5 still asks the hub for a PEFT adapter when given `local_files_only=True`, so offline
        # loads resolve the cached snapshot here and read it as a local directory.
        try:
            source = Path(snapshot_download(name, local_files_only=True))
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(hint) from err
    hidden = _molora_export_config(source)
    if hidden is not None and what == "config":
        return hidden  # type: ignore[return-value]
    if hidden is not None:
        kwargs["config"] = hidden
    try:
        return loader(str(source), **kwargs)
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) met something that is not a tensor
        raise CheckpointError(
            f"Could not load the backbone {what} from '{source}': refused to load a pickled weights file that holds "
            "Python objects beyond tensors (loading it could run code); use a .safetensors copy of the model"
        ) from err
    except OSError as err:
        raise FileNotFoundError(
            f"Could not load the backbone {what} from the directory '{source}': {err}. It should hold a "
            "checkpoint written by `save_pretrained` or `hf download` (config.json, weights, tokenizer files)."
        ) from err


def _hub_offline() -> bool:
    """Offline mode, also when HF_HUB_OFFLINE was set after huggingface_hub read it at import time."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return hub_constants.HF_HUB_OFFLINE or flag.upper() in {"1", "ON", "YES", "TRUE"}


def _cache_root() -> Path:
    """Where trained preset tokenizers live: `$MOEI_CACHE`, else `~/.cache/moei_lightning`."""
    return Path(os.environ.get("MOEI_CACHE") or Path.home() / ".cache" / "moei_lightning")


def _tokenizer_corpus() -> list[str]:
    """The preset tokenizers' training text: the built-in lines plus every text field of the bundled samples."""
    lines = list(_BUILTIN_TEXT)
    # {ei,gi}/*.jsonl only: the synthetic data (samples/synthetic) has its own backbone and tokenizer.
    for path in sorted(SAMPLES_DIR.glob("*/*.jsonl"), key=lambda p: p.relative_to(SAMPLES_DIR).as_posix()):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err}); fix or remove the line") from err
            lines += [str(record[key]) for key in ("instruction", "input", "output") if record.get(key)]
            lines += [str(choice) for choice in record.get("choices") or ()]
    return lines


def train_sentencepiece(lines: list[str], preset: str, **overrides: object) -> bytes:
    """A SentencePiece model file trained on ``lines`` with a preset family's options (same input, same bytes)."""
    options = {**_SPM_COMMON, **_SPM_PRESETS[preset][0], **overrides}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
    return model.getvalue()


def _trained_spm_dir(preset: str) -> Path:
    """A directory holding the preset's SentencePiece model, trained once per corpus and then reused.

    The model file is written under a temporary name and moved into place with `os.replace`, so processes
    that start together (DDP ranks) never read a half-written file; both write the same bytes anyway.
    """
    options, filename = _SPM_PRESETS[preset]
    options = {**_SPM_COMMON, **options}
    lines = _tokenizer_corpus()
    key_source = json.dumps([preset, options, spm.__version__, lines], sort_keys=True)
    directory = _cache_root() / "tokenizers" / f"{preset}-{hashlib.sha256(key_source.encode()).hexdigest()[:16]}"
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


def _preset_tokenizer(preset: str) -> PreTrainedTokenizerBase:
    """The preset's tokenizer as the real family ships it (LLaMA: BOS added, chat template, no pad)."""
    directory = _trained_spm_dir(preset)
    if preset == "tiny-llama":
        tokenizer = LlamaTokenizer.from_pretrained(directory, add_bos_token=True, add_eos_token=False)
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
        return tokenizer
    return T5Tokenizer.from_pretrained(directory)


def _preset_model(preset: str, attn_implementation: str | None) -> PreTrainedModel:
    """A tiny random-init model; a fixed seed on a forked RNG gives identical weights in every process."""
    tokenizer = _preset_tokenizer(preset)
    if preset == "tiny-llama":
        config: PretrainedConfig = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            initializer_range=0.2,  # wide enough logits that adapters on a frozen random model visibly learn
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.unk_token_id,  # the pad load_tokenizer chooses
        )
        auto_class = AutoModelForCausalLM
    else:
        config = T5Config(
            d_model=64,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            d_kv=16,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            dropout_rate=0.0,  # like LLaMA: train-mode forwards stay deterministic across processes
        )
        auto_class = AutoModelForSeq2SeqLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_PRESET_SEED)
        return auto_class.from_config(config, attn_implementation=attn_implementation, **{_DTYPE_KWARG: torch.float32})
