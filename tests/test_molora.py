"""MoLoRA block and injection: exact equivalences on tiny LLaMA and T5 models built from configs."""

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, T5ForConditionalGeneration

from moei_lightning.architectures import PUBLISHED
from moei_lightning.backbone.built_presets import tiny_config
from moei_lightning.data import IGNORE_INDEX
from moei_lightning.module import balance_loss
from moei_lightning.molora import (
    MoLoRAConfig,
    MoLoRALinear,
    RoutingRecorder,
    adapter_state_dict,
    inject_molora,
    load_adapter,
    molora_layers,
    parameter_roles,
    routing,
    save_adapter,
)
from moei_lightning.runner import sequence_logprobs


def tiny_llama(layers: int = 2, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(tiny_config("seq2seq", vocab_size=128, pad=0, eos=1)).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as in batched generation
    return ids, mask


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_state_dict(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def test_fresh_injection_is_exactly_the_backbone_llama() -> None:
    model = tiny_llama().requires_grad_(False)
    ids, mask = batch()
    reference = model(input_ids=ids, attention_mask=mask).logits
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    inject_molora(model, MoLoRAConfig())
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, reference)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), tokens)


def test_fresh_injection_is_exactly_the_backbone_t5() -> None:
    model = tiny_t5().requires_grad_(False)  # frozen, as the backbone always is (frozen T5 takes other kernels)
    ids, mask = batch()
    labels = torch.randint(3, 128, (3, 5))
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    inject_molora(model, MoLoRAConfig(inter="slot", routing="prompt"))
    assert torch.equal(model(input_ids=ids, attention_mask=mask, labels=labels).logits, reference)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), tokens)


def test_default_targets_and_freezing() -> None:
    llama, t5 = inject_molora(tiny_llama(), MoLoRAConfig()), inject_molora(tiny_t5(), MoLoRAConfig())
    assert sorted(molora_layers(llama)) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")
    ]
    assert all(name.rsplit(".", 1)[-1] in ("q", "v") for name in molora_layers(t5))
    assert len(molora_layers(t5)) == 2 * 2 + 2 * 2 * 2  # encoder self-attn; decoder self- and cross-attn
    for model in (llama, t5):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".base_layer." not in n for n in trainable)
        assert all(n.rsplit(".", 2)[-2] in ("router", "gate") or "lora_" in n for n in trainable)


def test_no_default_targets_for_unknown_family() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = type("Config", (), {"model_type": "gpt2"})()
    with pytest.raises(ValueError, match=r"no default target_modules for model_type 'gpt2'.*0"):
        inject_molora(model, MoLoRAConfig())


def test_unknown_target_lists_the_linear_layers() -> None:
    with pytest.raises(ValueError, match=r"\['qkv'\].*model\.layers\.\*\.self_attn\.q_proj"):
        inject_molora(tiny_llama(), MoLoRAConfig(target_modules=["q_proj", "qkv"]))
    model = inject_molora(tiny_llama(), MoLoRAConfig(target_modules=r".*mlp\.(gate|up)_proj"))
    assert len(molora_layers(model)) == 4


def test_single_expert_without_inter_is_plain_lora() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    config = MoLoRAConfig(num_experts=1, rank=4, alpha=8.0, dropout=0.0, inter="none")
    block = MoLoRALinear(base, config)
    nn.init.normal_(block.lora_B)
    x = torch.randn(2, 5, 16)
    expected = base(x) + (8.0 / 4) * x @ block.lora_A.T @ block.lora_B.T
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def naive_block(block: MoLoRALinear, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference: the MoLoRA formula written with a loop over experts, one expert at a time."""
    c = block.config
    if c.routing == "prompt":
        m = mask.unsqueeze(-1).float()
        source = ((x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)).expand_as(x)
    else:
        source = x
    probs = torch.softmax(source @ block.router.weight.T / c.router_temperature, dim=-1)
    if c.top_k is not None:
        threshold = probs.topk(c.top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= threshold, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    if c.inter == "gate":
        gate = torch.sigmoid(source @ block.gate.weight.T + block.gate.bias)
    elif c.inter == "slot":
        gate, probs = 1 - probs[..., :1], probs[..., 1:] / (1 - probs[..., :1])
    else:
        gate = torch.ones_like(probs[..., :1])
    delta = torch.zeros_like(block.base_layer(x))
    for k in range(c.num_experts):
        rows = slice(k * c.rank, (k + 1) * c.rank)
        delta += probs[..., k : k + 1] * (x @ block.lora_A[rows].T @ block.lora_B[:, rows].T)
    return block.base_layer(x) + gate * (c.alpha / c.rank) * delta


class Masked(nn.Module):
    """One block as a model whose forward takes an attention mask, as the recorder's hook reads it."""

    def __init__(self, block: MoLoRALinear) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.block(x)


@pytest.mark.parametrize("inter", ["gate", "slot", "none"])
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("routing", ["token", "prompt"])
def test_batched_block_equals_naive_expert_loop(inter: str, top_k: int | None, routing: str) -> None:
    torch.manual_seed(0)
    config = MoLoRAConfig(num_experts=4, rank=3, alpha=6.0, dropout=0.0, inter=inter, top_k=top_k, routing=routing)
    recorder = RoutingRecorder()
    block = MoLoRALinear(nn.Linear(20, 24), config, name="layer", recorder=recorder)
    with torch.no_grad():
        for param in (block.lora_B, block.router.weight, *(block.gate.parameters() if block.gate else ())):
            param.normal_(std=0.5)
    x = torch.randn(3, 7, 20)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    model = Masked(block)
    recorder.attach(model, None)
    with recorder.call() as capture:
        out = model(x, attention_mask=mask)
    torch.testing.assert_close(out, naive_block(block, x, mask.bool()), rtol=1e-5, atol=1e-5)
    record = capture.records["layer"]
    decisions = int(mask.sum()) if routing == "token" else 3  # prompt routing decides once per sequence
    assert record.probs.shape == (decisions, 4)
    torch.testing.assert_close(record.probs.sum(-1), torch.ones(decisions))


def test_only_adapters_change_under_training() -> None:
    model = inject_molora(tiny_llama(), MoLoRAConfig())
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = batch()
    for _ in range(3):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
            assert param.grad is None, name
        else:
            assert not torch.equal(param, adapters[name]), name


def test_save_load_round_trip_and_wrong_architecture(tmp_path) -> None:
    model = inject_molora(tiny_llama(), MoLoRAConfig(num_experts=3, rank=2))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "molora_config.json",
        "molora_model.safetensors",
    ]
    ids, mask = batch()
    fresh = load_adapter(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(
        fresh(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
    )
    with pytest.raises(ValueError, match=r"unexpected keys \[model\.layers\.1\.self_attn\.q_proj\.gate\.bias"):
        load_adapter(tiny_llama(layers=1), tmp_path / "adapter")
    mismatch = r"shape mismatches \[model\.layers\.0\.self_attn\.q_proj\.gate\.weight: saved \(1, 64\) vs model \(1, 32"
    with pytest.raises(ValueError, match=mismatch):
        load_adapter(tiny_llama(hidden=32), tmp_path / "adapter")


def test_recorder_one_entry_per_layer_without_padding_and_under_checkpointing() -> None:
    model = inject_molora(tiny_llama(), MoLoRAConfig(routing="token"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask = batch()
    with routing(model) as capture:
        model(input_ids=ids, attention_mask=mask, labels=ids)
    records = capture.records
    assert len(capture.forwards) == 1 and len(records) == 4
    for record in records.values():
        assert record.gate.shape == (int(mask.sum()),)
        assert torch.equal(torch.bincount(record.example_index), mask.sum(1))
    gate_loss = torch.stack([r.gate.mean() for r in records.values()]).sum()
    gate_loss.backward()  # recomputes the checkpointed blocks, outside the block: same entries, same tokens
    assert len(records) == 4
    assert all(layer.gate.weight.grad is not None for layer in molora_layers(model).values())


def test_a_capture_holds_its_own_calls_forwards_whatever_runs_after() -> None:
    model = inject_molora(tiny_llama(), MoLoRAConfig(routing="token"))
    ids, mask = batch()
    with routing(model) as outer:
        model(input_ids=ids, attention_mask=mask)
        with routing(model) as inner:
            model(input_ids=ids[:1, :3])
    held = {name: record.gate.clone() for name, record in outer.forwards[0].items()}
    model(input_ids=ids[:1, :2])  # an evaluation forward outside any block: seen by no capture
    assert len(outer.forwards) == 2 and len(inner.forwards) == 1  # an enclosing block sees nested forwards
    assert outer.records is inner.records and all(r.gate.shape == (3,) for r in inner.records.values())
    assert outer.forwards[0].keys() == held.keys()
    assert all(torch.equal(outer.forwards[0][name].gate, gate) for name, gate in held.items())
    assert routing_of_plain_model_is_empty()


def routing_of_plain_model_is_empty() -> bool:
    plain = tiny_llama()
    with routing(plain) as capture:
        plain(input_ids=torch.tensor([[5, 6]]))
    return capture.forwards == [] and capture.records == {}


@pytest.mark.parametrize("routing", ["token", "prompt"])
def test_cached_generation_equals_uncached_with_trained_adapters(routing: str) -> None:
    for model in (tiny_llama(), tiny_t5()):
        inject_molora(model, MoLoRAConfig(top_k=2, routing=routing))
        randomize_adapters(model)
        ids, mask = batch()
        kwargs = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False}
        cached = model.generate(ids, use_cache=True, **kwargs)
        assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))


def test_cached_decoding_reuses_the_prompts_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under prompt routing only the prompt's forward runs the router and gate; cached steps replay its decision."""
    routed: list[int] = []
    project = MoLoRALinear._project
    monkeypatch.setattr(MoLoRALinear, "_project", lambda self, x, n: routed.append(n) or project(self, x, n))
    for model in (tiny_llama(), tiny_t5()):
        inject_molora(model, MoLoRAConfig(routing="prompt"))
        randomize_adapters(model)
        ids, mask = batch()
        layers = len(molora_layers(model))
        for use_cache, forwards in ((True, 1), (False, 6)):
            routed.clear()
            model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, use_cache=use_cache)
            encoder = layers - len([n for n in molora_layers(model) if not n.startswith("encoder.")])
            assert len(routed) == encoder + (layers - encoder) * forwards  # an encoder runs once per call


def teacher_forced_gates(model: nn.Module, prompt: torch.Tensor, target: torch.Tensor, kind: str) -> dict:
    """Gates of one prompt scored with ``target`` appended, as training and choice scoring run it."""
    if kind == "causal":
        ids = torch.cat([prompt, target], dim=1)
        labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), target], dim=1)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    else:
        batch = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "labels": target}
    with routing(model) as capture:
        sequence_logprobs(model, batch, kind)
    return {name: r.gate.clone() for name, r in capture.records.items()}


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_prompt_routing_is_the_same_in_training_scoring_and_generation(kind: str) -> None:
    """One decision per sequence from its prompt: no target token, candidate or generated token moves it."""
    model = inject_molora(tiny_llama() if kind == "causal" else tiny_t5(), MoLoRAConfig(num_experts=3))
    randomize_adapters(model)
    prompt = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    first = teacher_forced_gates(model, prompt, torch.tensor([[5, 6, 7]]), kind)
    second = teacher_forced_gates(model, prompt, torch.tensor([[90, 91, 92, 93, 94]]), kind)
    assert all(gate.shape == (1,) for gate in first.values())
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=1e-6)
    assert len({round(g.item(), 4) for g in first.values()}) > 1  # layers decide on their own inputs
    for use_cache in (True, False):
        with routing(model) as capture:
            model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, use_cache=use_cache
            )
        seen = [{name: record.gate for name, record in step.items()} for step in capture.forwards]
        decoder_steps = [step for step in seen if any(not name.startswith("encoder.") for name in step)]
        assert len(decoder_steps) >= 4
        assert len(seen) == len(decoder_steps) + (kind == "seq2seq")  # an encoder-decoder's encoder runs once
        for step in seen:  # every decoding step, cached or not, routes as the prompt did
            for name in step:
                torch.testing.assert_close(step[name], first[name], rtol=0, atol=1e-5)


def test_sequence_is_read_as_prompt_routing() -> None:
    assert MoLoRAConfig(routing="sequence").routing == "prompt"
    with pytest.raises(ValueError, match="routing must be 'prompt' or 'token'"):
        MoLoRAConfig(routing="tokens")


def test_router_math_runs_in_fp32_under_bf16_autocast() -> None:
    model = inject_molora(tiny_llama(), MoLoRAConfig())
    randomize_adapters(model)
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16), routing(model) as capture:
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16
    for record in capture.records.values():
        assert record.gate.dtype == record.probs.dtype == torch.float32


def test_config_json_round_trip(tmp_path) -> None:
    config = MoLoRAConfig(num_experts=4, target_modules=["q", "k"], top_k=2, inter="slot")
    config.save(tmp_path / "c.json")
    assert MoLoRAConfig.load(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match="top_k must be in"):
        MoLoRAConfig(num_experts=2, top_k=3)


def molora_parameters(d_in: int, d_out: int, k: int, r: int, inter: str) -> int:
    """Closed form per adapted layer: A (K r d_in) + B (d_out K r) + router (d_in K') + gate (d_in + 1)."""
    slots = k + (inter == "slot")
    return k * r * d_in + d_out * k * r + d_in * slots + (d_in + 1 if inter == "gate" else 0)


def test_full_size_parameter_counts_on_meta_device() -> None:
    llama_config = PUBLISHED["meta-llama/Llama-2-13b-chat-hf"]
    t5_config = PUBLISHED["google/flan-t5-xl"]
    with torch.device("meta"):
        llama = inject_molora(LlamaForCausalLM(llama_config), MoLoRAConfig(num_experts=8, rank=8))
        t5 = inject_molora(T5ForConditionalGeneration(t5_config), MoLoRAConfig(num_experts=8, rank=8))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    per_llama_layer = molora_parameters(5120, 5120, 8, 8, "gate")
    assert count(llama) == 80 * per_llama_layer == 56_115_280
    per_t5_layer = molora_parameters(2048, 2048, 8, 8, "gate")  # q, v: 32 heads x d_kv 64 = 2048
    assert count(t5) == (24 * 2 + 24 * 4) * per_t5_layer == 40_403_088
    assert math.isclose(count(llama) / sum(p.numel() for p in llama.parameters()), 0.00431, rel_tol=0.01)


def test_plain_lora_does_no_routing_work_and_records_weight_one_when_read() -> None:
    config = MoLoRAConfig(num_experts=1, rank=4, dropout=0.0, inter="none", routing="token")
    model = inject_molora(tiny_llama(), config)
    assert all(block.router is None and block.gate is None for block in molora_layers(model).values())
    assert set(parameter_roles(model).values()) == {"experts"}
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with routing(model) as capture:
        model(input_ids=ids, attention_mask=mask)
    records = capture.records
    assert len(records) == 4
    record = next(iter(records.values()))
    assert "probs" not in vars(record) and record.num_experts == 1  # nothing was built in the forward
    assert record.gate is None
    torch.testing.assert_close(record.probs, torch.ones(10, 1))
    assert record.example_index.tolist() == [0] * 6 + [1] * 4
    assert float(balance_loss(list(records.values()))) == 1.0
