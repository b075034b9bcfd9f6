"""lm-evaluation-harness on an export: ``python -m moei_lightning lm-eval --adapter DIR --tasks mmlu,arc_challenge``.

:class:`MoEILM` is lm-eval's ``HFLM`` over ``moei_lightning.from_pretrained(DIR)`` (any export format),
registered as lm-eval model ``moei``, so tasks run with lm-eval's own prompts, metrics and aggregation;
``adapters=False`` (``--backbone_only``) evaluates the backbone the adapters were trained on;
``MoEILM(runner=...)`` wraps a model already in memory (the ``lm_eval`` suite of ``test``).
Only the log-likelihood forward is its own: with prompt routing (MoLoRA) each request is routed from
its context tokens alone, never its continuation, through the project's scorer
(:func:`~moei_lightning.runner.routed_logits`), as choice scoring does in training and
evaluation. ``loglikelihood_rolling`` goes through the same forward; generation is HFLM's, passing the
prompt's attention mask, from which the adapters route as in ``generate``.

Under DDP or FSDP every rank runs lm-eval over every request, as the runner's callers do: the
log-likelihood requests are shared out (:func:`~moei_lightning.ranks.sharded_map`, the same number of
forwards on every rank) and every rank gets every result, and generation steps the ranks together
(``synced_gpus``), so every rank ends with lm-eval's same results.

The command passes every option it does not know to lm-eval's ``run`` (``--include_path``,
``--num_fewshot``, ``--limit``, ``--batch_size``, ``--output_path``, ...): lm-eval prints its table
and writes its results JSON under ``--output_path``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist

from moei_lightning.data import IGNORE_INDEX
from moei_lightning.pretrained import export_parser, from_pretrained, read_export_info
from moei_lightning.ranks import sharded_map
from moei_lightning.runner import ModelRunner, label_logprobs, routed_logits

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # an optional extra
    raise ImportError("lm-evaluation-harness is not installed; run `pip install 'moei_lightning[lm-eval]'`") from err

MODEL_NAME = "moei"
Request = tuple[tuple[str, str] | None, list[int], list[int]]
"""lm-eval's tokenised request: ``((context, continuation) or None, context tokens, continuation tokens)``."""


@register_model(MODEL_NAME)
class MoEILM(HFLM):
    """An export directory (or a runner's model in memory) as an lm-eval model; log-likelihoods route each request
    from its context."""

    def __init__(
        self,
        adapter: str | None = None,
        backbone: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        adapters: bool = True,
        runner: ModelRunner | None = None,
        **kwargs: Any,
    ) -> None:
        """``adapter``: an export directory to load; or ``runner``: a model in memory (its batch size, rank and
        world size; the other loading options then do not apply)."""
        if (adapter is None) == (runner is None):
            raise ValueError("the moei model needs exactly one of adapter (an export directory) and runner")
        if runner is None:
            if not str(batch_size).isdigit() or int(batch_size) < 1:
                raise ValueError(f"batch_size must be a positive integer for the moei model, got {batch_size!r}")
            if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
                device = "cuda" if torch.cuda.is_available() else "cpu"  # as HFLM does: lm-eval's default is cuda:0
            loaded = from_pretrained(
                adapter, backbone=backbone, device=device, trust_remote_code=trust_remote_code, adapters=adapters
            )
            runner = ModelRunner(loaded.model, loaded.tokenizer, loaded.kind, int(batch_size))
        self.runner = runner
        super().__init__(
            pretrained=runner.model,
            backend=runner.kind,
            tokenizer=runner.tokenizer,
            batch_size=runner.batch_size,
            max_length=max_length,
            **kwargs,
        )

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        """``(log-likelihood, greedy)`` per request, in order; each rank takes its share, longest first in batches
        of ``batch_size``, and every rank gets every result."""
        size = override_bs or self.batch_size
        runner = self.runner
        results = sharded_map(
            lambda shard: self._score(shard, size), requests, runner.rank, runner.world_size, runner.gather
        )
        for request, result in zip(requests, results):
            if request[0] is not None:  # rolling windows are cached per document by lm-eval itself
                self.cache_hook.add_partial("loglikelihood", request[0], result)
        return results

    def _score(self, requests: list[Request], size: int) -> list[tuple[float, bool]]:
        """``(log-likelihood, greedy)`` of this rank's requests, in order."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            batch = self._batch([requests[i] for i in chunk])
            with torch.no_grad():
                logits, labels = routed_logits(self.model, batch, self.backend)
            logprobs, mask = label_logprobs(logits, labels)
            greedy = ((logits.argmax(-1) == labels) | ~mask).all(-1)
            for i, logprob, is_greedy in zip(chunk, logprobs.sum(-1).tolist(), greedy.tolist()):
                results[i] = (logprob, is_greedy)
        return results

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> torch.Tensor:
        """HFLM's generation; with several ranks they step together (``synced_gpus``), as a sharded model needs."""
        if self.runner.world_size > 1 and dist.is_initialized():
            kwargs["synced_gpus"] = True
        return super()._model_generate(context, max_length, stop, **kwargs)

    def _batch(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        """Right-padded inputs and labels: causal, context + continuation cut from the left to ``max_length``
        with only the continuation labelled; seq2seq, the context as input and the continuation as labels."""
        inputs, labels = [], []
        for _, context, continuation in requests:
            if self.backend == "causal":
                if len(continuation) >= self.max_length:
                    raise ValueError(
                        f"a continuation of {len(continuation)} tokens leaves no context within max_length="
                        f"{self.max_length}; raise it with --model_args max_length=N"
                    )
                window = (context + continuation)[-self.max_length :]
                inputs.append(window)
                labels.append([IGNORE_INDEX] * (len(window) - len(continuation)) + continuation)
            else:
                inputs.append(context[-self.max_length :])
                labels.append(continuation[-self.max_length :])
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": _pad(inputs, pad).to(self.device),
            "attention_mask": _pad([[1] * len(ids) for ids in inputs], 0).to(self.device),
            "labels": _pad(labels, IGNORE_INDEX).to(self.device),
        }


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def main(argv: list[str] | None = None) -> None:
    """Parse this command's own options, then run lm-eval's ``run`` with ``--model moei`` and the rest."""
    parser = export_parser(
        "python -m moei_lightning lm-eval",
        __doc__.splitlines()[0],
        "Every other option goes to lm-eval's `run` (`lm-eval run --help`), --trust_remote_code included.",
    )
    parser.add_argument(
        "--backbone_only",
        action="store_true",
        help="evaluate the export's backbone without its adapters (moei and peft exports, hf exports of MoEI runs)",
    )
    args, rest = parser.parse_known_args(argv)
    model_args = {"adapter": args.adapter, "backbone": args.backbone, "adapters": not args.backbone_only}
    model_args = {key: value for key, value in model_args.items() if value is not None}
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    cli = HarnessCLI()
    saved, sys.argv = sys.argv, ["lm-eval", "run", "--model", MODEL_NAME, "--model_args", json.dumps(model_args), *rest]
    try:
        read_export_info(args.adapter)  # before lm-eval reads any task data
        cli.execute(cli.parse_args())
    except (FileNotFoundError, ValueError) as err:  # a bad export directory or option: one line, exit 2
        parser.exit(2, f"error: {err}\n")
    finally:
        sys.argv = saved
