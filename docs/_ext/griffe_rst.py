r"""Griffe extension for the documentation site: renders the reStructuredText markup of the
package's docstrings as the Markdown that mkdocstrings and pymdownx.arithmatex understand.

Formatting only, applied to the docstrings griffe reads; the package is not touched:

* ``:math:`x``` becomes ``\(x\)`` and a ``.. math::`` directive a ``$$ ... $$`` block (several
  equations separated by blank lines become several blocks; ``&`` and ``\\`` put an equation in an
  ``aligned`` environment, as Sphinx does);
* ``:class:`~pkg.Name``` and the other cross-reference roles become optional cross-references
  (a link where the target is rendered on the site, plain code otherwise, never a warning);
* doctest blocks (``>>>``) become fenced ``pycon`` code blocks;
* a two-column RST simple table (``====  ====``) becomes a list of ``label: text`` items.
"""

from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(math|class|func|meth|attr|data|mod|obj|exc):`([^`]+)`")
MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::(.*)$")
TABLE_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")
DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)( |$)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        pad, first = match.group(1), match.group(2).strip()
        body = [first] if first else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(pad)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            i -= 1  # give trailing blank lines back to the text
            body.pop()
        equations = "\n".join(body).strip().split("\n\n")
        for equation in equations:
            equation = equation.strip()
            if ("&" in equation or "\\\\" in equation) and "\\begin" not in equation:
                equation = "\\begin{aligned}\n" + equation + "\n\\end{aligned}"
            out += ["", pad + "$$"]
            out += [pad + line for line in equation.splitlines()]
            out += [pad + "$$", ""]
    return out


def _doctests(lines: list[str]) -> list[str]:
    out: list[str] = []
    fenced = False
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not lines[i].lstrip().startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        pad = " " * _indent(lines[i])
        block = []
        while i < len(lines) and DOCTEST.match(lines[i]):
            block.append(lines[i][len(pad) :])
            i += 1
        out += ["", pad + "```pycon", *(pad + line for line in block), pad + "```", ""]
    return out


def _simple_tables(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not TABLE_BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        border = lines[i]
        columns = [m.start() for m in re.finditer(r"=+", border)]
        end = next((j for j in range(i + 1, len(lines)) if lines[j] == border), None)
        if end is None or len(columns) != 2:
            out.append(lines[i])
            i += 1
            continue
        rows: list[list[str]] = []
        for line in lines[i + 1 : end]:
            if not line.strip():
                continue
            label, text = line[: columns[1]].strip(), line[columns[1] :].strip()
            # a blank first column continues the row; so does a parenthesis (the label's tail)
            if rows and (not label or label.startswith("(")):
                rows[-1][0] += f" {label}" if label else ""
                rows[-1][1] += f" {text}"
            else:
                rows.append([label, text])
        out.append("")
        out += [f"- **{label}**: {text}" for label, text in rows]
        out.append("")
        i = end + 1
    return out


def _autoref(obj: griffe.Object, role: str, target: str) -> str:
    short = target.startswith("~")
    target = target.lstrip("~")
    title = target.rsplit(".", 1)[-1] if short else target
    if role in ("func", "meth"):
        title += "()"
    head, _, tail = target.partition(".")
    try:
        identifier = obj.resolve(head) + (f".{tail}" if tail else "")
    except (griffe.NameResolutionError, griffe.AliasResolutionError):
        identifier = target
    return (
        f'<autoref identifier="{html.escape(identifier)}" optional>'
        f"<code>{html.escape(title)}</code></autoref>"
    )


def markdown_of(obj: griffe.Object, text: str) -> str:
    """The Markdown form of the RST docstring ``text`` of ``obj``."""
    lines = _simple_tables(_doctests(_math_blocks(text.splitlines())))
    text = "\n".join(lines)

    def role(match: re.Match) -> str:
        kind, content = match.groups()
        if kind == "math":
            return "\\(" + " ".join(content.split()) + "\\)"
        return _autoref(obj, kind, " ".join(content.split()))

    return ROLE.sub(role, text)


class RstToMarkdown(griffe.Extension):
    """Rewrite the docstrings of the loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            docstring = obj.docstring
            # mark what is rewritten: the rewrite is not idempotent (doctests, tables)
            if docstring is not None and not getattr(docstring, "rst_to_markdown", False):
                docstring.value = markdown_of(obj, docstring.value)
                docstring.rst_to_markdown = True
            stack += [member for member in obj.members.values() if not member.is_alias]
