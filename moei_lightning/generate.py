"""``python -m moei_lightning generate --adapter DIR --prompts FILE|-``: replies from an exported model, as JSONL.

Each input line is one prompt:

- a JSON object with ``instruction`` (and optionally ``input``, ``choices``): filled into the prompt
  template the run trained with, like a training record;
- a JSON object with ``prompt``: that text is the user's message;
- any other line: the line itself is the user's message.

The tokenizer's chat template (when the run used one) and the run's system prompt wrap every
prompt. Each output line is the input object (``{"prompt": LINE}`` for a plain line) plus
``"reply"``, in input order. Greedy decoding, batched.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from moei_lightning.data import DEFAULT_TEMPLATE, DataError, PromptFormatter
from moei_lightning.data.jsonl import read_lines
from moei_lightning.pretrained import Pretrained, export_parser, from_pretrained
from moei_lightning.runner import generate_texts


def read_prompts(lines: Iterable[str], source: str) -> list[dict[str, Any]]:
    """The input lines as objects; blank lines are skipped, a malformed object names its line."""
    items = []
    for number, line in enumerate(lines, start=1):
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.lstrip().startswith("{"):
            try:
                item = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{source}:{number}: malformed JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(item.get("instruction", item.get("prompt")), str):
                raise DataError(f"{source}:{number}: a JSON prompt needs a string 'instruction' or 'prompt' field")
        else:
            item = {"prompt": text}
        item["_where"] = f"{source}:{number}"
        items.append(item)
    return items


def build_prompt(item: dict[str, Any], formatter: PromptFormatter) -> str:
    """The text the model sees: a record through the run's template, a bare prompt as is, then the chat wrap."""
    if "instruction" in item:
        user = formatter.render_fields(item["instruction"], item.get("input") or "", item.get("choices"))
    else:
        user = item["prompt"]
    return formatter.wrap(user, item["_where"])


def generate(loaded: Pretrained, items: list[dict[str, Any]], max_new_tokens: int, batch_size: int, out: TextIO) -> int:
    """Write one JSON line per item (the item plus ``reply``); returns how many were written."""
    settings = loaded.prompt
    formatter = PromptFormatter(
        settings.get("prompt_template") or DEFAULT_TEMPLATE,
        settings.get("system_prompt"),
        settings.get("use_chat_template", True),
        loaded.tokenizer,
    )
    prompts = [build_prompt(item, formatter) for item in items]
    for start in range(0, len(items), batch_size):
        replies = generate_texts(
            loaded.model, loaded.tokenizer, loaded.kind, prompts[start : start + batch_size], max_new_tokens, batch_size
        )
        for item, reply in zip(items[start : start + batch_size], replies):
            record = {k: v for k, v in item.items() if k != "_where"}
            out.write(json.dumps({**record, "reply": reply}, ensure_ascii=False) + "\n")
        out.flush()  # a script reading the pipe sees each batch as it is done
    return len(items)


DESCRIPTION = (
    "Replies from an exported model (`python -m moei_lightning export`) to prompts, one per line of a file or "
    "of standard input, as JSONL: a JSON object with instruction (and input, choices) fills the run's prompt "
    "template, one with prompt or any other line is the user's message."
)


def main(argv: list[str] | None = None) -> None:
    parser = export_parser("python -m moei_lightning generate", DESCRIPTION)
    parser.add_argument("--prompts", required=True, help="a file of prompts, one per line, or - for standard input")
    parser.add_argument("--output", default="-", help="where the JSONL goes (default: standard output)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="reply length in tokens (default: 64)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="let the model's own Python files run (some hub models need it); never taken from the export directory",
    )
    args = parser.parse_args(argv)
    for flag in ("batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            parser.exit(2, f"error: --{flag} must be a positive integer, got {getattr(args, flag)}\n")
    output = Path(args.output)
    if args.output != "-" and (output.is_dir() or not output.parent.is_dir()):
        problem = "is a directory" if output.is_dir() else f"is in a folder that does not exist ({output.parent})"
        parser.exit(2, f"error: --output {output} {problem}; give the path of a file to write\n")
    try:
        if args.prompts == "-":
            items = read_prompts(sys.stdin, "<stdin>")
        else:
            path = Path(args.prompts)
            if not path.is_file():
                raise FileNotFoundError(f"prompts file {path} does not exist")
            items = read_prompts(read_lines(path), str(path))  # U+2028 inside a JSON string is not a line end
        loaded = from_pretrained(
            args.adapter, backbone=args.backbone, device=args.device, trust_remote_code=args.trust_remote_code
        )
        if args.output == "-":
            count = generate(loaded, items, args.max_new_tokens, args.batch_size, sys.stdout)
        else:
            with open(args.output, "w", encoding="utf-8") as out:
                count = generate(loaded, items, args.max_new_tokens, args.batch_size, out)
    except (FileNotFoundError, ValueError) as err:  # DataError is a ValueError
        parser.exit(2, f"error: {err}\n")
    print(f"{count} replies written to {'standard output' if args.output == '-' else args.output}", file=sys.stderr)
