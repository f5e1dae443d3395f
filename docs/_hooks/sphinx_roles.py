"""MkDocs hook: docstrings name code with Sphinx roles (:class:`fxprune.Budget`, :func:`prune`); the API pages
show the name as code, without the role."""
from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):(?=<code)")


def on_page_content(html: str, **_: object) -> str:
    return ROLE.sub("", html)
