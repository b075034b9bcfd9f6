"""Backbone loading: presets, freezing, tokenizers, local checkpoints, and the errors users see."""

import os
import subprocess
import sys
import time

import huggingface_hub
import pytest
import torch
from transformers import LlamaConfig, T5Config

from moei_lightning.backbone import (
    BackboneConfig,
    load_backbone,
    load_tokenizer,
    resolve_kind,
)
from moei_lightning.backbone.tokenizer_training import trained_spm_dir
from tests.conftest import REPO, preset_digest, state_digest

PRESET_KINDS = {"tiny-llama": "causal", "tiny-t5": "seq2seq"}


@pytest.fixture(scope="module", autouse=True)
def tokenizer_cache(tmp_path_factory):
    """Trained preset tokenizers go to a throwaway cache, not the user's home."""
    cache = tmp_path_factory.mktemp("moei_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOEI_CACHE", str(cache))
        yield cache


def logits(model, tokenizer, kind: str) -> torch.Tensor:
    batch = tokenizer(["I feel so happy today!", "What is two plus two?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        if kind == "seq2seq":
            return model(**batch, decoder_input_ids=batch["input_ids"][:, :4]).logits
        return model(**batch).logits


@pytest.mark.parametrize("preset", PRESET_KINDS)
def test_preset_is_deterministic_frozen_and_keeps_global_rng(preset):
    rng_state = torch.get_rng_state()
    first = load_backbone(BackboneConfig(name_or_path=preset))
    assert torch.equal(torch.get_rng_state(), rng_state)
    torch.rand(10)  # another global RNG state must not change the preset's weights
    second = load_backbone(BackboneConfig(name_or_path=preset))
    assert state_digest(first) == state_digest(second)
    assert not any(p.requires_grad for p in first.parameters())
    assert not first.training


@pytest.mark.slow
def test_preset_weights_identical_across_concurrent_processes(tmp_path):
    """Two processes starting together on an empty cache (like DDP ranks) get the same tokenizer and weights."""
    script = (
        "import sys\n"
        "from moei_lightning.backbone import BackboneConfig, load_backbone, load_tokenizer\n"
        "from tests.conftest import preset_digest\n"
        "cfg = BackboneConfig(name_or_path=sys.argv[1])\n"
        "print(preset_digest(load_backbone(cfg), load_tokenizer(cfg)))\n"
    )
    env = {**os.environ, "MOEI_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    runs = [
        subprocess.Popen([sys.executable, "-c", script, "tiny-llama"], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    digests = {run.communicate(timeout=120)[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs)
    cfg = BackboneConfig(name_or_path="tiny-llama")  # this process, with its own tokenizer cache
    assert digests == {preset_digest(load_backbone(cfg), load_tokenizer(cfg))}
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_loading_a_saved_backbone_imports_neither_lightning_nor_the_data_package():
    """The data package (and Lightning with it) is imported only to train a built preset's tokenizer."""
    script = (
        "import sys\n"
        "import moei_lightning.backbone, moei_lightning.pretrained\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning' or m == 'moei_lightning.data'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_resolve_kind():
    assert resolve_kind(BackboneConfig(name_or_path="tiny-llama")) == "causal"
    assert resolve_kind(BackboneConfig(name_or_path="tiny-t5")) == "seq2seq"
    assert resolve_kind(BackboneConfig(name_or_path="tiny-llama", kind="seq2seq")) == "seq2seq"
    assert resolve_kind(LlamaConfig()) == "causal"
    assert resolve_kind(T5Config()) == "seq2seq"


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match=r"backbone\.dtype='fp32'"):
        BackboneConfig(dtype="fp32")


def test_llama_tokenizer_round_trip_and_special_tokens():
    tokenizer = load_tokenizer(BackboneConfig(name_or_path="tiny-llama"))
    text = "I feel so happy today! naïve café 😀 {x: 42}\n  indented"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.unk_token_id not in ids  # byte fallback: nothing is unknown
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.unk_token_id, tokenizer.eos_token_id) == (0, 2)
    assert tokenizer.pad_token == tokenizer.unk_token
    assert tokenizer.padding_side == "right"
    assert 500 <= len(tokenizer) <= 2000


def test_t5_tokenizer_round_trip_and_special_tokens():
    tokenizer = load_tokenizer(BackboneConfig(name_or_path="tiny-t5"))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    text = "Which emotion does the speaker feel? Joy, anger (or fear): 42%."
    ids = tokenizer(text).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.chat_template is None


def test_llama_chat_template_matches_llama2_chat_format():
    tokenizer = load_tokenizer(BackboneConfig(name_or_path="tiny-llama"))
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "How do you feel?"},
        {"role": "assistant", "content": "Happy."},
        {"role": "user", "content": "Why?"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHow do you feel? [/INST] Happy. </s><s>[INST] Why? [/INST]"
    )
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False) == "<s>[INST] How do you feel? [/INST]"
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "Hi"}], tokenize=False)


def test_tokenizer_training_is_cached_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEI_CACHE", str(tmp_path / "a"))
    start = time.perf_counter()
    first = trained_spm_dir("tiny-llama") / "tokenizer.model"
    assert time.perf_counter() - start < 2.0
    mtime = first.stat().st_mtime_ns
    assert trained_spm_dir("tiny-llama") / "tokenizer.model" == first
    assert first.stat().st_mtime_ns == mtime  # reused, not retrained
    monkeypatch.setenv("MOEI_CACHE", str(tmp_path / "b"))
    second = trained_spm_dir("tiny-llama") / "tokenizer.model"
    assert second != first
    assert second.read_bytes() == first.read_bytes()


@pytest.mark.parametrize("preset", PRESET_KINDS)
def test_checkpoint_saved_to_directory_loads_by_path(preset, tmp_path):
    cfg = BackboneConfig(name_or_path=preset)
    model, tokenizer = load_backbone(cfg), load_tokenizer(cfg)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    by_path = BackboneConfig(name_or_path=str(tmp_path))
    loaded, loaded_tokenizer = load_backbone(by_path), load_tokenizer(by_path)
    kind = PRESET_KINDS[preset]
    assert resolve_kind(by_path) == kind
    assert not any(p.requires_grad for p in loaded.parameters())
    text = "I feel so happy today! What is two plus two?"
    assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert torch.equal(logits(loaded, loaded_tokenizer, kind), logits(model, tokenizer, kind))


def test_hub_id_loads_from_the_offline_hub_cache(tmp_path, monkeypatch):
    cfg = BackboneConfig(name_or_path="tiny-t5")
    model, tokenizer = load_backbone(cfg), load_tokenizer(cfg)
    repo = tmp_path / "models--someone--tiny-t5"
    commit = "0123456789abcdef0123456789abcdef01234567"
    model.save_pretrained(repo / "snapshots" / commit)
    tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    by_id = BackboneConfig(name_or_path="someone/tiny-t5")
    assert resolve_kind(by_id) == "seq2seq"
    loaded, loaded_tokenizer = load_backbone(by_id), load_tokenizer(by_id)
    assert torch.equal(logits(loaded, loaded_tokenizer, "seq2seq"), logits(model, tokenizer, "seq2seq"))


def test_dtype_option():
    model = load_backbone(BackboneConfig(name_or_path="tiny-llama", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("name", ["/no/such/backbone", "./missing-checkpoint", "no-such-org/no-such-model-xyz"])
def test_missing_backbone_fails_fast_with_a_hint(name):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        load_backbone(BackboneConfig(name_or_path=name, kind="causal"))
    assert time.perf_counter() - start < 5.0
    message = str(error.value)
    assert name in message
    assert "hf download" in message
    assert "backbone.name_or_path" in message
    assert "tiny-llama" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_option_places_the_model():
    cfg = BackboneConfig(name_or_path="tiny-llama", dtype="bfloat16", attn_implementation="sdpa")
    model, tokenizer = load_backbone(cfg, device="cuda"), load_tokenizer(cfg)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    batch = tokenizer(["I feel so happy today!"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_gradient_checkpointing_reaches_adapters_without_input_grads():
    """Non-reentrant checkpointing backpropagates into a trainable weight inside a frozen layer."""
    cfg = BackboneConfig(name_or_path="tiny-llama")
    tokenizer = load_tokenizer(cfg)
    batch = tokenizer(["I feel so happy today!"], return_tensors="pt")
    grads = []
    for checkpointing in (False, True):
        model = load_backbone(BackboneConfig(name_or_path="tiny-llama", gradient_checkpointing=checkpointing))
        if checkpointing:
            assert model.model.layers[0].gradient_checkpointing
            model.disable_input_require_grads()  # show the hook transformers adds is not what makes it work
        model.train()
        weight = model.model.layers[0].self_attn.q_proj.weight
        weight.requires_grad_(True)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        assert weight.grad is not None
        grads.append(weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
