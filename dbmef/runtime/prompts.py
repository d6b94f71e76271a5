"""Text conditions from class names (DESIGN.md §1.6)."""

from __future__ import annotations

from collections.abc import Sequence

from dbmef.runtime.config import PromptTemplates


def positive_prompt(name: str, templates: PromptTemplates | None = None) -> str:
    """``"a photo of a {name}."`` by default."""
    t = templates or PromptTemplates()
    return t.positive.format(name=name)


def negative_prompts(candidate_names: Sequence[str], templates: PromptTemplates | None = None) -> list[str]:
    """One negative prompt per candidate, in candidate order.

    The negative of candidate ``c`` names the other k-1 candidates in rank order, joined by the
    template's separator (``","``): ``"the features of {names}."``.
    """
    t = templates or PromptTemplates()
    out = []
    for c in range(len(candidate_names)):
        others = [n for j, n in enumerate(candidate_names) if j != c]
        out.append(t.negative.format(names=t.separator.join(others)))
    return out
