"""mkdocs hook: the site's home and contributing pages are README.md and CONTRIBUTING.md.

Each is read from the repository root when its stub page (docs/index.md, docs/contributing.md) is
rendered, so the two files stay the single source. Links are rewritten for the site: ``docs/x.md``
becomes ``x.md``, README.md and CONTRIBUTING.md their pages, and a link to any other file of the
repository (an example, a notebook) keeps its text, since the site does not hold those files.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"index.md": "README.md", "contributing.md": "CONTRIBUTING.md"}
PAGES = {source: page for page, source in SOURCES.items()}
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _link(match: re.Match) -> str:
    text, target = match.groups()
    if re.match(r"[a-z]+:|#", target):          # a URL or an anchor
        return match.group(0)
    path, _, anchor = target.partition("#")
    if path.startswith("docs/") and path.endswith(".md"):
        return f"[{text}]({path[len('docs/'):]}{'#' + anchor if anchor else ''})"
    if path in PAGES:
        return f"[{text}]({PAGES[path]}{'#' + anchor if anchor else ''})"
    return text


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    source = SOURCES.get(page.file.src_uri)
    if source is None:
        return markdown
    return LINK.sub(_link, (ROOT / source).read_text(encoding="utf-8"))
