"""MkDocs hooks (mkdocs.yml `hooks:`): generated pages, so the docs cannot drift from the code.

- reference/config.md is generated from pipeline/schema.py and conf/ (scripts/docs_reference.py).
- `<!-- cli-help -->` in a page is replaced by every console script's `--help` text.
"""

from __future__ import annotations

import importlib.util
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


def on_page_markdown(markdown, page, config, files):
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, reference.render_cli())
    return markdown
