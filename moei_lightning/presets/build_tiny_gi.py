"""Build the `tiny-llama-gi` backbone: a tiny LLaMA pretrained from scratch on the synthetic GI world.

``python -m moei_lightning.presets.build_tiny_gi --out DIR`` draws the GI pretraining corpus
(:func:`moei_lightning.data.synthetic.gi_corpus`: the four GI dimensions, none of the bundled GI
validation/test items and no EI task), trains a SentencePiece BPE tokenizer on GI and EI text (so EI
words are short token sequences that the backbone has simply never been trained on), pretrains a
4-layer LLaMA on the corpus formatted exactly as fine-tuning formats prompts (the project's
``PromptFormatter`` and ``Encoder`` with the LLaMA-2 chat template), prints GI and EI multiple-choice
accuracy on the bundled synthetic test splits and writes a ``save_pretrained`` directory.

The build is deterministic: same arguments, same torch version and thread count -> identical weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM, LlamaTokenizer, PreTrainedTokenizerBase

from moei_lightning.backbone import LLAMA2_CHAT_TEMPLATE, train_sentencepiece
from moei_lightning.backbone.built_presets import tiny_config
from moei_lightning.data import Collator, EiRecord, Encoder, PromptFormatter, load_records
from moei_lightning.data.synthetic import SYNTHETIC_DIR, gi_corpus
from moei_lightning.eval.choices import choice_loglikelihoods

SHIPPED_DIR = Path(__file__).parent / "tiny_llama_gi"
"""Where the shipped build lives (the `tiny-llama-gi` preset)."""

MAX_LENGTH = 256
VOCAB_SIZE = 1500
# The shipped build's settings (the command-line defaults).
STEPS, CORPUS_SIZE, BATCH_SIZE, LR, SEED = 1500, 24000, 32, 3e-3, 0


def tokenizer_lines(corpus: list[EiRecord], ei: list[EiRecord]) -> list[str]:
    """The tokenizer's training text: GI corpus and EI training prompts and answers, as the chat renders them."""
    formatter = PromptFormatter(use_chat_template=False)
    lines = []
    for record in [*corpus, *ei]:
        lines.append(f"[INST] {formatter.render(record)} [/INST] {record.output}")
    return lines


def build_tokenizer(out: Path, lines: list[str]) -> PreTrainedTokenizerBase:
    """A LLaMA-style tokenizer (BPE, byte fallback, BOS, LLaMA-2 chat template), written to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(train_sentencepiece(lines, "tiny-llama", vocab_size=VOCAB_SIZE))
    tokenizer = LlamaTokenizer.from_pretrained(out, add_bos_token=True, add_eos_token=False)
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """The tiny LLaMA, from a seeded random init."""
    ids = (len(tokenizer), tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)  # pad: unk, as
    sizes = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4}  # load_tokenizer picks for LLaMA
    config = tiny_config(
        "causal", *ids, **sizes, max_position_embeddings=MAX_LENGTH, initializer_range=0.02, tie_word_embeddings=False
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pretrain(
    model: LlamaForCausalLM, encoder: Encoder, corpus: list[EiRecord], steps: int, batch_size: int, lr: float, seed: int
) -> None:
    """Next-token loss on the answers (and EOS) of the corpus, as fine-tuning computes it; AdamW, cosine decay."""
    examples, _ = encoder.encode(corpus, "pretrain")
    collate = Collator(encoder.tokenizer.pad_token_id, "causal", "right")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))),
    )
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch = collate([examples[i] for i in order[:batch_size]])
        del order[:batch_size]
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()


def accuracy(model: LlamaForCausalLM, encoder: Encoder, records: list[EiRecord]) -> dict[str, float]:
    """Multiple-choice accuracy (acc_norm) in percent, per aspect and over all records (key ``all``)."""
    scores = choice_loglikelihoods(model, encoder, records, batch_size=64)
    hits: dict[str, list[bool]] = defaultdict(list)
    for record, score in zip(records, scores):
        correct = record.choices[score.predicted] == record.output
        hits[record.aspect].append(correct)
        hits["all"].append(correct)
    return {aspect: 100.0 * sum(h) / len(h) for aspect, h in hits.items()}


def build(
    out: Path,
    steps: int = STEPS,
    corpus_size: int = CORPUS_SIZE,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = SEED,
    evaluate: bool = True,
) -> dict[str, dict[str, float]]:
    """Build and save the backbone in ``out``; returns the GI and EI test accuracies (if ``evaluate``)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    # One thread: the same weights on any machine, whatever its core count (and no spinning on a busy one).
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        return _build(out, steps, corpus_size, batch_size, lr, seed, evaluate)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build(
    out: Path, steps: int, corpus_size: int, batch_size: int, lr: float, seed: int, evaluate: bool
) -> dict[str, dict[str, float]]:
    with torch.random.fork_rng(devices=[]):
        corpus = [EiRecord(**record) for record in gi_corpus(corpus_size, seed)]
        ei_train = load_records([SYNTHETIC_DIR / "ei" / "train.jsonl"])
        tokenizer = build_tokenizer(out, tokenizer_lines(corpus, ei_train))
        tokenizer.pad_token = tokenizer.unk_token
        encoder = Encoder(tokenizer, PromptFormatter(tokenizer=tokenizer), "causal", MAX_LENGTH)
        model = build_model(tokenizer, seed)
        print(
            f"{sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer)}, "
            f"{len(corpus)} GI pretraining records"
        )
        pretrain(model, encoder, corpus, steps, batch_size, lr, seed)
        results = {
            domain: accuracy(model, encoder, load_records([SYNTHETIC_DIR / domain / "test.jsonl"]))
            for domain in (("gi", "ei") if evaluate else ())
        }
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.unk_token_id,
        do_sample=False,
    )
    tokenizer.pad_token = None  # shipped like LLaMA: load_tokenizer chooses the pad
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Loading from `out` above recorded how it was loaded; a shipped config should not carry that.
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return results


def main(argv: list[str] | None = None) -> None:
    """Command line: build into ``--out`` and print the accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help=f"output directory (default {SHIPPED_DIR})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"pretraining steps (default {STEPS})")
    parser.add_argument("--corpus-size", type=int, default=CORPUS_SIZE, help=f"GI records (default {CORPUS_SIZE})")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"default {BATCH_SIZE}")
    parser.add_argument("--lr", type=float, default=LR, help=f"peak AdamW learning rate (default {LR})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"init, corpus and order seed (default {SEED})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = build(args.out, args.steps, args.corpus_size, args.batch_size, args.lr, args.seed)
    print(f"built in {time.perf_counter() - start:.0f} s -> {args.out}")
    chance = 100.0 / 4
    for domain, accs in results.items():
        per = ", ".join(f"{aspect} {acc:.1f}" for aspect, acc in accs.items() if aspect != "all")
        print(f"{domain.upper()} test accuracy {accs['all']:.1f} % ({per}); chance {chance:.0f} %")


if __name__ == "__main__":
    main()
