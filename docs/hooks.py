"""mkdocs hooks: a stale configuration reference fails the build; links to repository files work.

Pages link to files outside ``docs/`` (benchmark results, deploy files, the proto) as
``../benchmarks/results/x.md``, which is right when the page is read in the repository. The site
gets a copy of each such file at the same path from the repository root, and the link is
rewritten to it, so ``mkdocs build --strict`` checks these links like any other.
"""

import importlib.util
import os
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

_REPOSITORY_LINK = re.compile(r"(\]\()(\.\./[^)\s#]+)")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", Path(__file__).with_name("gen_config_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_pre_build(config) -> None:
    generator = _generator()
    current = generator.PAGE.read_text()
    if generator.with_fresh_reference(current, generator.render(generator.experiment_schema())) != current:
        raise PluginError(f"{generator.PAGE} differs from the config schema: run python docs/gen_config_reference.py")


def _repository_file(page_source: Path, link: str, docs_dir: Path) -> Path | None:
    """The repository file a page's ``../`` link names, when it lies outside docs/ and exists."""
    target = Path(os.path.normpath(page_source.parent / link))
    repository = docs_dir.parent
    if target.is_file() and target.is_relative_to(repository) and not target.is_relative_to(docs_dir):
        return target.relative_to(repository)
    return None


def on_files(files, config):
    docs_dir = Path(config["docs_dir"])
    linked: set[Path] = set()
    for page in files.documentation_pages():
        source = Path(page.abs_src_path)
        for _, link in _REPOSITORY_LINK.findall(source.read_text()):
            found = _repository_file(source, link, docs_dir)
            if found is not None:
                linked.add(found)
    for path in sorted(linked):
        files.append(File(path.as_posix(), str(docs_dir.parent), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs_dir = Path(config["docs_dir"])
    source = Path(page.file.abs_src_path)
    if source.is_relative_to(docs_dir):
        page_dir = source.parent.relative_to(docs_dir)

        def to_site_copy(match: re.Match) -> str:
            found = _repository_file(source, match.group(2), docs_dir)
            if found is None:
                return match.group(0)
            return match.group(1) + os.path.relpath(found, page_dir).replace(os.sep, "/")

        return _REPOSITORY_LINK.sub(to_site_copy, markdown)
    return markdown
