"""MoLoRA configuration: one dataclass, round-tripped through ``molora_config.json``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from moei_lightning.molora.errors import MoLoRAError

Routing = Literal["token", "prompt"]
InterMode = Literal["gate", "slot", "none"]


@dataclass
class MoLoRAConfig:
    """How many experts, of what rank, on which layers, and how they are weighted.

    Args:
        num_experts: K, the number of LoRA experts per adapted linear layer.
        rank: r, the rank of each expert.
        alpha: LoRA scaling numerator; the delta is scaled by ``alpha / rank``.
        dropout: dropout on the adapter input (the router and gate see the clean input).
        target_modules: linear layers to adapt: a list of module-name suffixes
            (``["q_proj", "v_proj"]``) or one regex matched against the full name. ``None`` picks
            the family default (LLaMA ``q_proj,v_proj``; T5 ``q,v``).
        routing: ``prompt`` routes each sequence once, from the mean of its prompt tokens only
            (instruction + input; never the target), identically in training, choice scoring and
            cached or uncached generation; the decoder of an encoder-decoder model routes from the
            pooled encoder output. ``token`` routes every token on its own: the first layers then see
            bare token embeddings, which look alike in EI and GI inputs, so the gate cannot shut on
            GI prompts there (docs/molora.md). ``sequence`` is read as ``prompt``.
        top_k: keep only the k largest router weights (renormalised); ``None`` is dense routing.
        router_temperature: tau in ``softmax(W_r x / tau)``.
        inter: the inter gate between backbone and adapters: ``gate`` is a sigmoid gate,
            ``slot`` gives the router an extra "backbone expert" whose weight is ``1 - g``,
            ``none`` always uses the adapters (g = 1).
        gate_bias_init: initial bias of the sigmoid gate (``inter: gate``); 0 starts at g = 0.5.
        router_init_std: standard deviation of the router's normal initialisation.
    """

    num_experts: int = 8
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    routing: Routing = "prompt"
    top_k: int | None = None
    router_temperature: float = 1.0
    inter: InterMode = "gate"
    gate_bias_init: float = 0.0
    router_init_std: float = 0.02

    def __post_init__(self) -> None:
        problems = []
        if self.num_experts < 1:
            problems.append(f"num_experts must be >= 1, got {self.num_experts}")
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.routing == "sequence":  # the earlier name; pooling now stops at the prompt
            self.routing = "prompt"
        if self.routing not in ("token", "prompt"):
            problems.append(f"routing must be 'prompt' or 'token', got {self.routing!r}")
        if self.inter not in ("gate", "slot", "none"):
            problems.append(f"inter must be 'gate', 'slot' or 'none', got {self.inter!r}")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_slots:
            problems.append(f"top_k must be in [1, {self.num_slots}] or null, got {self.top_k}")
        if not (math.isfinite(self.router_temperature) and self.router_temperature > 0):
            problems.append(f"router_temperature must be a finite number > 0, got {self.router_temperature}")
        if not math.isfinite(self.alpha):
            problems.append(f"alpha must be a finite number, got {self.alpha}")
        if not math.isfinite(self.gate_bias_init):
            problems.append(f"gate_bias_init must be a finite number, got {self.gate_bias_init}")
        if not (math.isfinite(self.router_init_std) and self.router_init_std >= 0):
            problems.append(f"router_init_std must be a finite number >= 0, got {self.router_init_std}")
        if self.target_modules is not None and not self.target_modules:
            problems.append(
                f"target_modules is empty ({self.target_modules!r}); list layer names, give a regex, "
                "or use null for the model family's default"
            )
        if problems:
            raise MoLoRAError("invalid MoLoRAConfig: " + "; ".join(problems))

    @property
    def scaling(self) -> float:
        """The LoRA scale ``alpha / r``, folded into the routing weights."""
        return self.alpha / self.rank

    @property
    def num_slots(self) -> int:
        """Router outputs: K, plus the backbone slot when ``inter == 'slot'``."""
        return self.num_experts + (1 if self.inter == "slot" else 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoLoRAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoLoRAError(f"unknown MoLoRAConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MoLoRAConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise MoLoRAError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
        return cls.from_dict(data)
