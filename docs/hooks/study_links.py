"""MkDocs hook: the study's page lives beside its code, in poissonflow/experiments/README.md
(so that it reads well on GitHub); docs/study.md holds one include line for it, which this hook
replaces with the page. Its relative links are written from poissonflow/experiments/, so they
are resolved from there: a target inside docs/ that the site builds becomes a link relative to
the site's root; any other target (source files, the study's JSON and tables, which stay out of
the site) becomes its repository path in code, so that nothing in the site points nowhere.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

_INCLUDE = re.compile(r'^--8<-- "([^"]+)"\s*$', re.M)
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def on_page_markdown(markdown, page, config, files, **kwargs):
    if page.file.src_uri != "study.md":
        return markdown
    root = Path(config["config_file_path"]).parent
    built = {f.src_uri for f in files if f.inclusion.is_included()}

    def include(match):
        rel = match.group(1)
        path = root / rel
        if not path.is_file():
            raise PluginError(f"study.md includes {rel}, which does not exist")
        return _resolve_links(path.read_text("utf-8"), posixpath.dirname(rel), built)

    return _INCLUDE.sub(include, markdown)


def _resolve_links(text: str, folder: str, built: set[str]) -> str:
    def fix(match):
        bang, label, target = match.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return match.group(0)
        path, _, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(folder, path))
        if repo_path.startswith("docs/") and repo_path[len("docs/") :] in built:
            site_path = repo_path[len("docs/") :] + (f"#{anchor}" if anchor else "")
            return f"{bang}[{label}]({site_path})"
        if bang:
            return f"*{label}* (`{repo_path}` in the repository)"
        return f"{label} (`{repo_path}`)"

    return _LINK.sub(fix, text)
