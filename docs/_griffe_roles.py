"""A griffe extension for the documentation build: reStructuredText inline markup -> Markdown.

The docstrings of eqlosses use Google-style sections (``Args:``, ``Returns:``, ``Example:``)
with a few reStructuredText habits that Markdown does not know: Sphinx roles
(:class:`GradientStatistics`, :func:`~eqlosses.data.lvis_groups`) and ``::`` before a literal
block. This extension rewrites them in the docstring text that mkdocstrings renders:

- ``:role:`target``` becomes the code span ``target`` (``~a.b.c`` becomes ``c``, as in Sphinx);
- a line ending in ``::`` ends in ``:`` (a line that is only ``::`` is dropped); the indented
  block after it is a Markdown code block already;
- ``Example:`` (a Google-style admonition for griffe) becomes ``Examples:``, the section
  whose ``>>>`` lines are rendered as code;
- a doctest that starts a line outside any section (``>>>`` at the left margin) is fenced as
  a ``pycon`` code block (Markdown would render it as a quotation);
- a ``.. math::`` directive becomes a ``latex`` code block (the formula as written);
- a reStructuredText simple table (rows framed by lines of ``=====  ====``) becomes a
  preformatted block, shown as written (Markdown would read its rules as headings).

An attribute without a docstring gets the ``#:`` comment lines right above it as its docstring
(the Sphinx convention the configuration dataclasses and module constants use).

It changes nothing in the source files and is loaded by ``mkdocs.yml`` (``extensions:``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|math):`([^`]+)`")
_LITERAL = re.compile(r"::[ \t]*$", re.MULTILINE)
_EXAMPLE = re.compile(r"^([ \t]*)Example:[ \t]*$")
_MATH = re.compile(r"^([ \t]*)\.\. math::[ \t]*(.*)$")
_TABLE_RULE = re.compile(r"^[ \t]*=+(?:[ \t]+=+)+[ \t]*$")


def _role_to_code(match: re.Match[str]) -> str:
    target = match.group(1).strip()
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def rst_to_markdown(text: str) -> str:
    """Rewrite Sphinx roles and ``::`` literal-block markers of a docstring as Markdown.

    >>> rst_to_markdown("See :class:`~eqlosses.stats.GradientStatistics`::")
    'See `GradientStatistics`:'
    >>> rst_to_markdown("Text.\\n>>> 1 + 1\\n2\\n\\nExample:\\n    >>> x = 1").split("\\n")
    ['Text.', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'Examples:', '    >>> x = 1']
    >>> rst_to_markdown(".. math:: r_c = \\\\max(1, t)").split("\\n")
    ['```latex', 'r_c = \\\\max(1, t)', '```']
    """
    text = _ROLE.sub(_role_to_code, text)
    lines: list[str] = []
    rules = 0  # rules seen in the current simple table (a table has three)
    doctest = False  # inside a fenced doctest
    for line in text.split("\n"):
        if doctest:
            if line.strip():
                lines.append(line)
                continue
            lines.append("```")
            doctest = False
        if line.startswith(">>>") and not rules:
            if lines and lines[-1].strip():
                lines.append("")
            lines.extend(["```pycon", line])
            doctest = True
            continue
        line = _EXAMPLE.sub(r"\1Examples:", line)
        math = _MATH.match(line)
        if math and not rules:
            lines.extend([f"{math.group(1)}```latex", f"{math.group(1)}{math.group(2)}",
                          f"{math.group(1)}```"])
            continue
        if _TABLE_RULE.match(line):
            if rules == 0:
                indent = line[: len(line) - len(line.lstrip())]
                lines.append(f"{indent}```text")
            rules += 1
            lines.append(line)
            if rules == 3:
                lines.append(f"{indent}```")
                rules = 0
            continue
        if rules:
            lines.append(line)
            continue
        if line.strip() == "::":
            continue
        lines.append(_LITERAL.sub(":", line))
    if rules:  # not a complete table: close the fence
        lines.append(f"{indent}```")
    if doctest:
        lines.append("```")
    return "\n".join(lines)


def _comment_above(obj: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above an attribute's first line, or None."""
    try:
        lines = obj.lines_collection[obj.filepath]
    except (KeyError, AttributeError, TypeError):
        return None
    index = (obj.lineno or 0) - 2  # the line above, 0-based
    found: list[str] = []
    while index >= 0 and lines[index].strip().startswith("#:"):
        found.append(lines[index].strip()[2:].strip())
        index -= 1
    return "\n".join(reversed(found)) or None


class RstRoles(griffe.Extension):
    """Rewrites every docstring once it has been read (before it is parsed into sections)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: D102
        if obj.docstring is None and obj.is_attribute:
            comment = _comment_above(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
