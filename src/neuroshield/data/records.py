"""The one record type every loader produces and every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Label = Literal["harmful", "benign"]
Modality = Literal["text", "image"]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt. Records with the same `id` in different languages are parallel translations.

    `image` is a path to an image file (modality "image"): the request is rendered into the image and
    `text` is then the neutral instruction in `language`.
    """

    id: str
    text: str
    language: str  # ISO 639-1, lower case
    label: Label
    modality: Modality = "text"
    category: str = ""
    source: str = ""
    image: str | None = None
    reference: str | None = None  # reference response (safe response, Alpaca output, MGSM answer ...)
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def group(self) -> tuple[str, str, str]:
        """The (language, modality, label) group this prompt counts toward."""
        return (self.language, self.modality, self.label)


def group_name(language: str, modality: str, label: str) -> str:
    """Canonical string name of a group, used in files and plots: e.g. `en/text/harmful`."""
    return f"{language}/{modality}/{label}"
