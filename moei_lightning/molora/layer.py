"""The MoLoRA block: a frozen linear layer plus K stacked LoRA experts, an intra router and an inter gate.

    y = W0 x + g(x) * (alpha / r) * sum_k p_k(x) * B_k A_k dropout(x)

The experts are stored stacked (``lora_A``: (K*r, d_in), ``lora_B``: (d_out, K*r)), so the delta
costs two matmuls whatever K is: ``h = x A^T``, scale each expert's r columns of ``h`` by its
weight ``g * p_k * alpha / r``, then accumulate ``h B^T`` into the frozen output with ``addmm_``. No loop
over experts, no (tokens, K, d_out) tensor. Router and gate math runs in fp32, also under autocast.
One expert without an inter gate is plain LoRA: it has no router and does no routing work at all.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moei_lightning.molora.config import MoLoRAConfig
from moei_lightning.molora.recorder import Decision, RoutingRecorder, Stream

ParameterRole = Literal["experts", "router", "gate"]
"""What a MoLoRA parameter does: expert weights (A, B), the intra router, or the inter gate."""


class MoLoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` (kept as ``base_layer``) with a MoLoRA expert bank.

    Args:
        base_layer: the linear layer to adapt; it is used as is, never copied.
        config: the expert count, rank, routing and gate settings.
        name: the layer's name in the model, used as its key in the routing recorder.
        stream: which token stream the layer sees (``encoder`` or ``decoder``), so the recorder
            applies the matching attention mask.
        recorder: where routing is recorded; ``None`` records nothing.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        config: MoLoRAConfig,
        name: str = "",
        stream: Stream = "decoder",
        recorder: RoutingRecorder | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.name = name
        self.stream: Stream = stream
        self.recorder = recorder
        d_in, d_out = base_layer.in_features, base_layer.out_features
        stacked_rank = config.num_experts * config.rank
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(stacked_rank, d_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(d_out, stacked_rank, **factory))
        # One expert and no gate: the router's softmax would always be 1, so there is none (plain LoRA).
        plain_lora = config.num_experts == 1 and config.inter == "none"
        self.router = None if plain_lora else nn.Linear(d_in, config.num_slots, bias=False, **factory)
        self.gate = nn.Linear(d_in, 1, **factory) if config.inter == "gate" else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A: Kaiming-uniform, B: zeros, so a fresh block returns exactly ``W0 x``."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.router is not None:
            nn.init.normal_(self.router.weight, std=self.config.router_init_std)
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=self.config.router_init_std)
            nn.init.constant_(self.gate.bias, self.config.gate_bias_init)

    def parameter_roles(self) -> dict[str, ParameterRole]:
        """Each own parameter's role, so optimizers and monitors group them without matching names."""
        roles: dict[str, ParameterRole] = {"lora_A": "experts", "lora_B": "experts"}
        if self.router is not None:
            roles["router.weight"] = "router"
        if self.gate is not None:
            roles |= {"gate.weight": "gate", "gate.bias": "gate"}
        return roles

    def extra_repr(self) -> str:
        c = self.config
        return f"experts={c.num_experts}, rank={c.rank}, routing={c.routing}, inter={c.inter}, top_k={c.top_k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[-2] if x.dim() >= 3 else 1  # a 2-D input is a batch of single tokens
        flat_x = x.reshape(-1, x.shape[-1])
        y = self.base_layer(flat_x)  # 2-D and not a view, so the delta can be accumulated into it in place
        if self.router is None:  # plain LoRA: no router, no softmax, a record only its readers pay for
            if self.recorder is not None:
                per_sequence = self.config.routing == "prompt"
                sequences = flat_x.shape[0] // seq_len
                self.recorder.record_uniform(self.name, self.stream, sequences, seq_len, x.device, per_sequence)
            h = F.linear(self._adapter_input(flat_x), self.lora_A)
            return self._accumulate(y, h, self.config.scaling).view(*x.shape[:-1], y.shape[-1])
        weights = self._cached_decision(flat_x.shape[0] // seq_len, seq_len)
        if weights is None:
            h, logits = self._project(flat_x, seq_len)
            # (sequences, seq_len or 1, K) fp32, gate and alpha/r folded in; broadcast over each expert's r columns
            weights = self._expert_weights(logits, seq_len)
        else:
            h = F.linear(self._adapter_input(flat_x), self.lora_A)
        experts, rank = self.config.num_experts, self.config.rank
        h = (h.view(weights.shape[0], -1, experts, rank) * weights.unsqueeze(-1).to(h.dtype)).view(h.shape)
        return self._accumulate(y, h, 1.0).view(*x.shape[:-1], y.shape[-1])

    def _cached_decision(self, sequences: int, seq_len: int) -> torch.Tensor | None:
        """Under prompt routing, during cached decoding: the expert weights the prompt got, recorded again.

        A decoding step adds tokens to sequences whose prompt has been routed, so it reuses that
        decision (kept by :meth:`_expert_weights`) instead of running the router and the gate again.
        """
        recorder = self.recorder
        if self.config.routing != "prompt" or recorder is None or not recorder.is_incremental(self.stream, seq_len):
            return None
        decision = recorder.decision(self.name)
        if decision is None or decision.weights.shape[0] != sequences:
            return None
        recorder.record(self.name, self.stream, decision.gate_logit, decision.probs, per_sequence=True)
        return decision.weights

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout, then the adapters' dtype; under autocast the matmul casts by itself, so no fp32 copy is made."""
        x = self.dropout(x)
        return x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)

    def _accumulate(self, y: torch.Tensor, h: torch.Tensor, scale: float) -> torch.Tensor:
        """``y + scale * h B^T``: in place into the frozen output when the dtypes agree."""
        if y.dtype == h.dtype == self.lora_B.dtype:
            return y.addmm_(h, self.lora_B.t(), alpha=scale)
        # autocast or a half-precision backbone: the delta is cast to the output's dtype
        return y + F.linear(h if scale == 1.0 else h * scale, self.lora_B).to(y.dtype)

    def _project(self, x: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = A dropout(x)`` (tokens, K*r) and the fp32 router (+ gate) logits (sequences, seq_len or 1, .).

        When the adapters see the same fp32 tokens as the router (token routing, no dropout, no
        autocast), one matmul over the stacked ``[A; W_router; w_gate]`` reads ``x`` once and sends
        one gradient back to it instead of three.
        """
        routing_weight, routing_bias = self._routing_params()
        fused = (
            self.config.routing == "token"
            and isinstance(self.dropout, nn.Identity)
            and x.dtype == self.lora_A.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)
        )
        if fused:
            bias = None if routing_bias is None else F.pad(routing_bias, (self.lora_A.shape[0], 0))
            h, logits = F.linear(x, torch.cat([self.lora_A, routing_weight]), bias).split(
                [self.lora_A.shape[0], routing_weight.shape[0]], dim=-1
            )
            return h, logits.view(-1, seq_len, logits.shape[-1])
        h = F.linear(self._adapter_input(x), self.lora_A)
        with torch.autocast(device_type=x.device.type, enabled=False):
            source = self._routing_input(x.float().view(-1, seq_len, x.shape[-1]))
            bias = None if routing_bias is None else routing_bias.float()
            return h, F.linear(source, routing_weight.float(), bias)

    def _routing_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Router rows, then the gate row when ``inter: gate``; the bias is zero but for the gate."""
        if self.gate is None:
            return self.router.weight, None
        weight = torch.cat([self.router.weight, self.gate.weight])
        return weight, F.pad(self.gate.bias, (self.router.weight.shape[0], 0))

    def _expert_weights(self, logits: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Expert weights ``g * p_k * alpha / r`` (sequences, seq_len or 1, K) in fp32; records g and p."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            slots = self.config.num_slots
            scaled = logits[..., :slots] / self.config.router_temperature
            if self.config.top_k is not None and self.config.top_k < slots:  # softmax over the k largest only
                kept = torch.zeros_like(scaled, dtype=torch.bool).scatter_(
                    -1, scaled.topk(self.config.top_k).indices, True
                )
                scaled = scaled.masked_fill(~kept, -math.inf)
            probs = torch.softmax(scaled, dim=-1)
            if self.config.inter == "gate":
                gate_logit = logits[..., slots:]
                expert_probs, weights = probs, probs * torch.sigmoid(gate_logit)
            elif self.config.inter == "slot":  # g = 1 - p_backbone, whose logit is logsumexp(experts) - backbone
                # +-100: a slot that top_k dropped makes the logit infinite; sigmoid(100) is already 1 in fp32
                gate_logit = (scaled[..., 1:].logsumexp(-1, keepdim=True) - scaled[..., :1]).clamp(-100.0, 100.0)
                weights = probs[..., 1:]
                expert_probs = weights / (1.0 - probs[..., :1]).clamp_min(torch.finfo(probs.dtype).tiny)
            else:
                gate_logit, expert_probs, weights = None, probs, probs
            weights = weights * self.config.scaling  # prompt routing: one decision, broadcast over its tokens
            if self.recorder is not None:
                prompt = self.config.routing == "prompt"
                self.recorder.record(self.name, self.stream, gate_logit, expert_probs, per_sequence=prompt)
                if prompt:
                    self.recorder.keep_decision(self.name, Decision.of(weights, gate_logit, expert_probs))
            return weights

    def _routing_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token routing sees each token; prompt routing sees the mean of each sequence's prompt tokens.

        ``tokens`` is (sequences, seq_len, d_in). The recorder says which tokens are the prompt; the
        decoder of an encoder-decoder model routes from the pooled encoder output instead. Cached
        decoding never gets here: a sequence keeps the decision its prompt got (:meth:`_cached_decision`).
        """
        if self.config.routing == "token":
            return tokens
        batch, length = tokens.shape[:2]
        recorder = self.recorder
        if recorder is None:
            return tokens.mean(dim=1, keepdim=True)
        if self.stream == "decoder" and recorder.encoder_summary is not None:
            return self._encoder_prompt(recorder.encoder_summary, batch)
        mask = recorder.prompt_token_mask(self.stream, batch, length)
        if mask is None:
            return tokens.mean(dim=1, keepdim=True)
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        return (tokens * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1.0)

    def _encoder_prompt(self, summary: torch.Tensor, batch: int) -> torch.Tensor:
        """The pooled encoder output (sequences, 1, d_model), checked against this layer's input width."""
        if summary.shape[-1] != self.base_layer.in_features or summary.shape[0] != batch:
            raise ValueError(
                f"{self.name}: prompt routing in the decoder reads the pooled encoder output "
                f"({summary.shape[0]} x {summary.shape[-1]}), but this layer takes {batch} sequences x "
                f"{self.base_layer.in_features} features; adapt decoder layers whose input width is "
                "d_model (attention q/k/v/o), or use routing: token"
            )
        return summary
