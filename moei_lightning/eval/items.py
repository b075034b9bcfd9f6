"""One multiple-choice evaluation item, shared by the EmoBench and MMLU loaders so one harness scores both."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChoiceItem:
    """A question with its choices; `answer_index` points at the correct one in `choices`.

    `prompt_instruction` says what to do, `prompt_input` holds the material and the question;
    the choices are kept apart so a harness can letter them or score each by likelihood.
    """

    id: str
    suite: str
    task: str
    category: str
    language: str
    prompt_instruction: str
    prompt_input: str
    choices: list[str]
    answer_index: int

    def __post_init__(self) -> None:
        if not 0 <= self.answer_index < len(self.choices):
            raise ValueError(
                f"item {self.id}: answer_index {self.answer_index} is outside its "
                f"{len(self.choices)} choices; fix the loader or the source row"
            )
