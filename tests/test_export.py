"""Export formats: PEFT round trips, merged models and one-call loading, each compared by logits."""

import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import moei_lightning
from moei_lightning.backbone import BackboneConfig, load_backbone
from moei_lightning.cli import main
from moei_lightning.export import export_checkpoint
from moei_lightning.module import MoEIModule
from moei_lightning.molora import MoLoRAConfig
from moei_lightning.runner import generate_texts

PROMPTS = ["How do you feel today?", "Name the emotion: I lost my keys again!"]


def make_checkpoint(tmp_path: Path, adapter: str, preset: str = "tiny-llama") -> tuple[Path, MoEIModule]:
    """A checkpoint as `fit` writes it (trainable tensors, hyperparameters), with non-zero random adapters; the same
    adapters whichever tests ran before."""
    torch.manual_seed(0)
    module = MoEIModule(
        backbone=BackboneConfig(name_or_path=preset),
        adapter=adapter,
        molora=MoLoRAConfig(num_experts=3, rank=4, dropout=0.0),
    )
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    module.eval()
    checkpoint = {
        "state_dict": {k: v.clone() for k, v in module.state_dict().items() if k in module._trainable_names()},
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": {"prompt_template": "{instruction}", "use_chat_template": True},
    }
    path = tmp_path / f"{adapter}.ckpt"
    torch.save(checkpoint, path)
    return path, module


def logits(model: torch.nn.Module, tokenizer, seq2seq: bool = False) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    if seq2seq:
        batch["decoder_input_ids"] = batch["input_ids"][:, :4]
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-t5"])
def test_peft_round_trip_has_equal_logits(preset: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    path, module = make_checkpoint(tmp_path, "lora", preset)
    out = export_checkpoint(path, tmp_path / "peft", "peft")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    seq2seq = preset == "tiny-t5"
    expected = logits(module.model, module.tokenizer, seq2seq)
    loaded = peft.PeftModel.from_pretrained(load_backbone(BackboneConfig(name_or_path=preset)), str(out)).eval()
    torch.testing.assert_close(logits(loaded, module.tokenizer, seq2seq), expected)
    # merging rounds W + BA once in fp32: logits move by ~1e-5, past assert_close's default 1e-5 on some runs
    merged = logits(loaded.merge_and_unload(), module.tokenizer, seq2seq)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    # PEFT knows no presets: the recorded base is a local directory its AutoPeftModel loads by itself
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and (Path(base) / "config.json").is_file()
    auto = peft.AutoPeftModelForSeq2SeqLM if seq2seq else peft.AutoPeftModelForCausalLM
    from_base = auto.from_pretrained(str(out)).eval()  # its own attention kernel: equal up to float rounding
    torch.testing.assert_close(logits(from_base, module.tokenizer, seq2seq), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("preset", "adapter"), [("tiny-llama", "lora"), ("tiny-llama", "full"), ("tiny-t5", "full")])
def test_merged_model_equals_the_adapted_one(preset: str, adapter: str, tmp_path: Path) -> None:
    path, module = make_checkpoint(tmp_path, adapter, preset)
    out = export_checkpoint(path, tmp_path / "merged", "merged")
    seq2seq = preset == "tiny-t5"
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    merged = auto.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    expected = logits(module.model, module.tokenizer, seq2seq)
    torch.testing.assert_close(logits(merged, module.tokenizer, seq2seq), expected)
    loaded = moei_lightning.from_pretrained(out)  # the tokenizer comes along
    assert loaded.tokenizer("hello").input_ids == module.tokenizer("hello").input_ids
    assert loaded.prompt == {"prompt_template": "{instruction}", "use_chat_template": True}


def test_molora_exports_load_in_one_call(tmp_path: Path) -> None:
    path, module = make_checkpoint(tmp_path, "molora")
    expected = logits(module.model, module.tokenizer)
    for fmt in ("moei", "hf"):
        out = export_checkpoint(path, tmp_path / fmt, fmt)
        assert not (out / "adapter_config.json").exists()  # never mistaken for a PEFT adapter
        assert (out / "molora_config.json").is_file() and (out / "molora_model.safetensors").is_file()
        assert (out / "config.json").is_file() == (fmt == "hf")
        loaded = moei_lightning.from_pretrained(out)
        torch.testing.assert_close(logits(loaded.model, loaded.tokenizer), expected)
    # transformers alone would load the bare backbone without its adapters: it refuses the directory instead
    with pytest.raises(ValueError, match="model type `moei_molora`"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for fmt, message in (("merged", "no fixed delta"), ("peft", "only a LoRA adapter")):
        with pytest.raises(ValueError, match=message):
            export_checkpoint(path, tmp_path / fmt, fmt)


def test_overwrite_replaces_another_formats_files_and_stale_files_are_never_read(tmp_path: Path) -> None:
    path, module = make_checkpoint(tmp_path, "molora")
    expected = logits(module.model, module.tokenizer)
    out = tmp_path / "out"
    export_checkpoint(path, out, "hf")
    (out / "notes.txt").write_text("mine")  # a file no export wrote
    export_checkpoint(path, out, "moei", overwrite=True)
    moei_files = {"molora_config.json", "molora_model.safetensors", "moei_export.json"}
    assert {p.name for p in out.iterdir()} == moei_files | {"notes.txt"}
    export_checkpoint(path, out, "hf", overwrite=True)
    assert (out / "config.json").is_file() and (out / "notes.txt").read_text() == "mine"
    export_checkpoint(path, out, "moei", overwrite=True)
    (out / "config.json").write_text('{"model_type": "llama", "vocab_size": 7}')  # left by some older tool
    loaded = moei_lightning.from_pretrained(out)  # the moei export it records, not a model from config.json
    torch.testing.assert_close(logits(loaded.model, loaded.tokenizer), expected)


def test_full_fine_tune_has_no_adapter_format(tmp_path: Path) -> None:
    path, _ = make_checkpoint(tmp_path, "full")
    with pytest.raises(ValueError, match="--format merged"):
        export_checkpoint(path, tmp_path / "out", "moei")
    with pytest.raises(FileNotFoundError, match=r"moei_export\.json"):
        moei_lightning.from_pretrained(tmp_path)


def test_generate_applies_the_chat_template_and_writes_jsonl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    path, module = make_checkpoint(tmp_path, "molora")
    out = export_checkpoint(path, tmp_path / "adapters")
    lines = ['{"id": "a", "instruction": "Name the emotion.", "input": "I lost my keys!"}', "", "How are you?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    main(["generate", "--adapter", str(out), "--prompts", "-", "--max_new_tokens", "5", "--batch_size", "1"])
    replies = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    chat = module.tokenizer.apply_chat_template
    prompts = [
        chat([{"role": "user", "content": "Name the emotion."}], tokenize=False, add_generation_prompt=True),
        chat([{"role": "user", "content": "How are you?"}], tokenize=False, add_generation_prompt=True),
    ]
    expected = generate_texts(module.model, module.tokenizer, "causal", prompts, 5)
    assert replies == [
        {"id": "a", "instruction": "Name the emotion.", "input": "I lost my keys!", "reply": expected[0]},
        {"prompt": "How are you?", "reply": expected[1]},
    ]


def test_generate_names_a_bad_prompt_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"input": "no instruction"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--adapter", str(tmp_path), "--prompts", str(prompts)])
    assert exit_info.value.code == 2
    assert f"{prompts}:2: a JSON prompt needs" in capsys.readouterr().err


def test_generate_reads_prompt_files_as_the_data_readers_do(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = make_checkpoint(tmp_path, "molora")
    out = export_checkpoint(path, tmp_path / "adapters")
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": "one\u2028two"}, ensure_ascii=False), "plain text"]
    prompts.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    main(["generate", "--adapter", str(out), "--prompts", str(prompts), "--max_new_tokens", "2"])
    replies = [json.loads(line) for line in capsys.readouterr().out.split("\n") if line]
    assert [reply["prompt"] for reply in replies] == ["one\u2028two", "plain text"]

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9\n".encode("latin-1"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "moei_export.json").write_text('{"format": "moei",')
    for args, message in (
        (["--adapter", str(out), "--prompts", str(latin1)], f"{latin1}: not valid UTF-8"),
        (["--adapter", str(out), "--prompts", str(prompts), "--batch_size", "0"], "--batch_size must be a positive"),
        (["--adapter", str(broken), "--prompts", str(prompts)], f"{broken / 'moei_export.json'}: not valid JSON"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err

