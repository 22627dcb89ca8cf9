"""MkDocs hooks (mkdocs.yml `hooks:`): generated pages, so the docs cannot drift from the code.

- reference/config.md is generated from pipeline/schema.py and conf/ (scripts/docs_reference.py).
- `<!-- cli-help -->` in a page is replaced by every console script's `--help` text.
- A link from a page to a repository file outside docs/ (e.g. `[conf/sweep/optuna.yaml](../../conf/sweep/optuna.yaml)`,
  which works when browsing the repository) is checked to exist and rendered as the file's path in code
  style: the site does not carry the source tree. A link to a missing file is left alone, so the strict
  build still fails on it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from mkdocs.structure.files import File

_spec = importlib.util.spec_from_file_location("docs_reference", Path(__file__).with_name("docs_reference.py"))
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

CONFIG_PAGE = "reference/config.md"
CLI_MARKER = "<!-- cli-help -->"


def on_files(files, config):
    if files.get_file_from_path(CONFIG_PAGE) is not None:
        raise RuntimeError(f"docs/{CONFIG_PAGE} is generated at build time; delete the file in docs/")
    files.append(File.generated(config, CONFIG_PAGE, content=reference.render_config()))
    return files


LINK = re.compile(r"\[([^\]]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files):
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, reference.render_cli())
    docs = Path(config.docs_dir).resolve()
    root = docs.parent
    here = (docs / page.file.src_uri).parent

    def repo_link(m: re.Match) -> str:
        text, target = m.group(1), m.group(2)
        if "://" in target or target.startswith(("mailto:", "/")):
            return m.group(0)
        path = (here / target).resolve()
        if path == docs or docs in path.parents or root not in path.parents or not path.exists():
            return m.group(0)  # a docs page (mkdocs validates it) or a missing file (strict mode reports it)
        rel = path.relative_to(root).as_posix()
        return f"`{rel}`" if text.strip("`") == rel else f"{text} (`{rel}`)"

    # Outside fenced code blocks only.
    parts = re.split(r"(^```.*?^```)", markdown, flags=re.M | re.S)
    return "".join(p if p.startswith("```") else LINK.sub(repo_link, p) for p in parts)
