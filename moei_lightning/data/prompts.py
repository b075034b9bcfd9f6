"""Turn a record into the prompt text the model sees (never the target).

The template has three placeholders: ``{instruction}``, ``{input}`` and ``{choices}`` (an enumerated
list of the options, empty for open questions). Blocks of the template are separated by blank lines;
a block whose placeholders all render empty is left out, so a label such as ``Options:`` disappears
together with an empty ``{choices}``. Literal braces are written ``{{`` and ``}}``.

With a tokenizer that has a chat template (LLaMA-2-Chat and most instruction-tuned models) and
``use_chat_template`` on, the rendered template becomes the user turn of a chat and the tokenizer's
own template wraps it (with the system prompt, if any) and opens the assistant turn. Otherwise the
rendered template is the prompt, preceded by the system prompt as its own block.
"""

from __future__ import annotations

import string
from typing import Any

from moei_lightning.data.errors import DataError
from moei_lightning.data.records import EiRecord

DEFAULT_TEMPLATE = "{instruction}\n\n{input}\n\nOptions:\n{choices}\n\nAnswer:"
PLACEHOLDERS: tuple[str, ...] = ("instruction", "input", "choices")
_TEMPLATE_KEY = "data.prompt_template"
_ALLOWED = ", ".join("{" + name + "}" for name in PLACEHOLDERS)


class PromptFormatter:
    """Formats records into prompts; the template is checked once, here, so a typo fails before training."""

    def __init__(
        self,
        template: str = DEFAULT_TEMPLATE,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
        tokenizer: Any = None,
    ) -> None:
        self.template = template
        self.system_prompt = system_prompt
        self.tokenizer = tokenizer
        self.uses_chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self._blocks = [(block, _placeholders(block)) for block in template.split("\n\n")]
        if not any(names for _, names in self._blocks):
            raise DataError(
                f"config key {_TEMPLATE_KEY}: template {template!r} has no placeholder, so every prompt "
                f"would be the same; use some of {_ALLOWED}"
            )

    def format(self, record: EiRecord) -> str:
        """The prompt for ``record``: with the chat template it ends where the assistant's answer starts."""
        return self.wrap(self.render(record), record.source or record.id)

    def wrap(self, user: str, where: str = "prompt") -> str:
        """``user`` as the user turn of a chat (or after the system paragraph); ``where`` names it in errors."""
        if not self.uses_chat:
            return f"{self.system_prompt}\n\n{user}" if self.system_prompt else user
        messages = [{"role": "user", "content": user}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja raises its own error types, e.g. for a template without a system role
            raise DataError(
                f"{where}: the tokenizer's chat template rejected the prompt ({err}); "
                "set data.system_prompt to null if the model has no system role, or data.use_chat_template "
                "to false to use data.prompt_template alone"
            ) from err

    def render(self, record: EiRecord) -> str:
        """The template filled in for ``record``, without any chat wrapping."""
        return self.render_fields(record.instruction, record.input, record.choices)

    def render_fields(self, instruction: str, input: str = "", choices: list[str] | None = None) -> str:
        """The template filled in with these values: records, and prompts given to ``generate``."""
        values = {"instruction": instruction, "input": input, "choices": render_choices(choices)}
        kept = [
            block.format(**values)
            for block, names in self._blocks
            if not names or any(values[name].strip() for name in names)
        ]
        return "\n\n".join(kept)


def render_choices(choices: list[str] | None) -> str:
    """Options as ``1. first`` lines; the target stays the option text, so numbering is only a reading aid."""
    return "\n".join(f"{i}. {choice}" for i, choice in enumerate(choices or [], start=1))


def _placeholders(block: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(block))
    except ValueError as err:
        raise DataError(
            f"config key {_TEMPLATE_KEY}: cannot parse template block {block!r} ({err}); "
            "write literal braces as '{{' and '}}'"
        ) from err
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conversion:
            raise DataError(
                f"config key {_TEMPLATE_KEY}: unknown placeholder {_field(name, conversion, spec)} in "
                f"template; allowed: {_ALLOWED} "
                "(write literal braces as '{{' and '}}')"
            )
        names.append(name)
    return names


def _field(name: str, conversion: str | None, spec: str) -> str:
    """A replacement field written back as it appeared in the template."""
    return "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
