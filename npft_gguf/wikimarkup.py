"""MediaWiki dump -> plain prose: the articles of a pages-articles XML dump, markup removed.

Enough of the wiki syntax to leave running text that reads like WikiText-2's: templates, tables,
references, files, categories, interlanguage links, comments and tags go; links keep their shown
text; headings go, and so does everything from the first back-matter section (See also,
References, ...), which is lists, not prose. Nested constructs are removed innermost first, so an
unbalanced brace leaves literal text behind instead of eating the rest of an article.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

BACK_MATTER = {"see also", "references", "notes", "external links", "further reading", "bibliography", "sources",
               "footnotes", "citations", "notes and references", "references and notes", "works cited"}
DROP_LINK_PREFIXES = ("file", "image", "media", "category")
# elements whose content is not prose
DROP_ELEMENTS = ("ref", "pre", "math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight", "source", "chem", "hiero")

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_DROP_ELEMENT = re.compile(r"<(%s)\b[^>]*?(?:/>|>.*?</\1\s*>)" % "|".join(DROP_ELEMENTS), re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*?/?>")
_TEMPLATE = re.compile(r"\{\{(?:[^{}]|\{(?!\{)|\}(?!\}))*\}\}")  # innermost only; single braces may sit inside
_TABLE = re.compile(r"^[ \t]*\{\|(?:(?!^[ \t]*\{\|).)*?^[ \t]*\|\}", re.S | re.M)  # innermost only
_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")  # innermost only; single brackets may sit inside
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_BARE_URL = re.compile(r"https?://\S+")
_INTERWIKI = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*:")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_EMPHASIS = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+\s*")
_SPACES = re.compile(r"[ \t\u00a0]+")
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;]?\s*\)")
_DANGLING = re.compile(r"\(\s*(?:[,;]\s*)+")  # "( ; , Phoibos" once a pronunciation template is gone
_SPACE_BEFORE_PUNCT = re.compile(r" +(?=[,;.:)])")
_WORD = re.compile(r"[^\W\d_]{2}")


@dataclass(frozen=True)
class Article:
    title: str
    text: str  # plain prose, paragraphs one per line


def _innermost(pattern: re.Pattern, repl, s: str) -> str:
    while True:
        s, n = pattern.subn(repl, s)
        if not n:
            return s


def _link_text(m: re.Match) -> str:
    """Shown text of a link; '' for files, categories and interlanguage links (a leading ':'
    makes any of them an ordinary visible link)."""
    target, _, shown = m.group(1).partition("|")
    if not target.startswith(":"):
        prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
        if prefix in DROP_LINK_PREFIXES or _INTERWIKI.match(target):
            return ""
    if shown:
        return shown.rsplit("|", 1)[-1]
    return target.lstrip(":")


def strip_markup(wikitext: str) -> str:
    """Plain prose of one article's wikitext: paragraphs one per line, no headings, no back matter."""
    s = html.unescape(wikitext) if "&lt;" in wikitext else wikitext  # some dumps double-escape tags
    s = _COMMENT.sub("", s)
    s = _DROP_ELEMENT.sub("", s)
    s = _innermost(_TEMPLATE, "", s)
    s = _innermost(_TABLE, "", s)
    s = _innermost(_LINK, _link_text, s)
    s = _EXT_LINK.sub(r"\1", s)
    s = _TAG.sub("", s)
    s = _MAGIC.sub("", s)
    s = _EMPHASIS.sub("", s)
    s = html.unescape(s)
    lines = []
    for raw in s.splitlines():
        line = raw.strip()
        head = _HEADING.match(line)
        if head:
            if head.group(2).strip().lower() in BACK_MATTER:
                break
            continue
        if line.startswith(("{|", "|", "!", "{{", "}}", "[[")):  # leftovers of unbalanced tables/templates
            continue
        line = _LIST_MARK.sub("", line)
        line = _BARE_URL.sub("", line)
        line = _EMPTY_BRACKETS.sub("", line)  # "(; born 1950)" once templates inside are gone
        line = _DANGLING.sub("(", line)
        line = _SPACE_BEFORE_PUNCT.sub("", _SPACES.sub(" ", line)).strip()
        if _WORD.search(line):  # not a lone "," or "+ +" left by removed formulas
            lines.append(line)
    return "\n".join(lines)


def read_articles(dump: Path, min_chars: int = 500) -> list[Article]:
    """The main-namespace, non-redirect pages of a (bz2-compressed) pages-articles XML dump, in
    dump order, as plain prose; pages with less than `min_chars` of it (stubs, disambiguation
    lists emptied by the cleaning) are left out."""
    opener = bz2.open if str(dump).endswith(".bz2") else open
    out = []
    with opener(dump, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if _local(el.tag) != "page":
                continue
            fields = {_local(c.tag): c for c in el}
            ns = fields.get("ns")
            revision = fields.get("revision")
            body = None
            if revision is not None:
                body = next((c.text for c in revision if _local(c.tag) == "text"), None)
            if (ns is None or ns.text == "0") and "redirect" not in fields and body:
                title = (fields["title"].text or "").strip()
                text = strip_markup(body)
                if len(text) >= min_chars and not title.endswith("(disambiguation)"):
                    out.append(Article(title, text))
            el.clear()
    return out


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
