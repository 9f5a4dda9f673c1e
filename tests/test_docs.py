"""The documentation site: every page is in the navigation, and the strict build passes.

The site is ``mkdocs.yml`` plus ``docs/``; the API pages are generated from the docstrings by
mkdocstrings. ``mkdocs build --strict`` turns every warning into a failure: a broken link or
anchor, a cross-reference to an object that does not exist, a docstring parameter that is not
in the signature, a page left out of the navigation.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MKDOCS_YML = ROOT / "mkdocs.yml"
DOCS = ROOT / "docs"


def _nav_pages(node) -> list[str]:
    """The page paths of a ``nav`` tree: strings, lists and one-key mappings."""
    if isinstance(node, str):
        return [] if re.match(r"^[a-z]+://", node) else [node]
    if isinstance(node, list):
        return [page for item in node for page in _nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in _nav_pages(value)]
    raise AssertionError(f"unexpected nav entry {node!r}")


def _config() -> dict:
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        """Safe loading that tolerates mkdocs' ``!!python/name:`` and ``!ENV`` tags."""

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return yaml.load(MKDOCS_YML.read_text(), Loader=Loader)


def test_nav_parsing():
    nav = [{"Home": "index.md"}, {"API": ["api/index.md", {"Losses": "api/losses.md"}]},
           {"Link": "https://example.org"}]
    assert _nav_pages(nav) == ["index.md", "api/index.md", "api/losses.md"]


def test_every_nav_entry_exists_and_every_page_is_in_the_nav():
    cfg = _config()
    assert cfg.get("strict") is True, "mkdocs.yml must build in strict mode"
    nav = _nav_pages(cfg["nav"])
    assert len(nav) == len(set(nav)), f"pages listed twice: {sorted(p for p in nav if nav.count(p) > 1)}"
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"nav entries without a file under docs/: {missing}"
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    orphans = [page for page in pages if page not in nav]
    assert not orphans, f"pages under docs/ missing from the nav in mkdocs.yml: {orphans}"


def test_the_theme_requests_nothing_at_build_or_view_time():
    cfg = _config()
    assert cfg["theme"].get("font") is False, "font: false (no Google Fonts requests)"
    plugin_names = [p if isinstance(p, str) else next(iter(p)) for p in cfg.get("plugins", [])]
    for plugin in ("social", "privacy", "optimize"):  # they download or fetch at build time
        assert plugin not in plugin_names and f"material/{plugin}" not in plugin_names


def test_api_pages_name_modules_that_exist():
    """Each ``::: eqlosses.x`` directive names a module or an object in one (cheap, static)."""
    directives = []
    for page in sorted((DOCS / "api").glob("*.md")):
        directives += [(page.name, m) for m in
                       re.findall(r"^::: (\S+)", page.read_text(), flags=re.MULTILINE)]
    assert directives, "no mkdocstrings directive under docs/api/"
    src = ROOT / "src"
    for page, ident in directives:
        parts = ident.split(".")
        found = False
        for cut in range(len(parts), 0, -1):  # the longest prefix that is a module or package
            base = src.joinpath(*parts[:cut])
            if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
                found = True
                break
        assert found and parts[0] == "eqlosses", f"{page}: ::: {ident} names no eqlosses module"


def _rst_to_markdown():
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("_griffe_roles", DOCS / "_griffe_roles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rst_to_markdown


def test_docstring_markup_is_rewritten_for_markdown():
    convert = _rst_to_markdown()
    assert convert("See :class:`~eqlosses.stats.GradientStatistics` and :func:`a.b`.") == \
        "See `GradientStatistics` and `a.b`."
    assert convert("Layout::\n\n    a/b") == "Layout:\n\n    a/b"
    assert convert("Example:\n    >>> 1\n    1") == "Examples:\n    >>> 1\n    1"
    # a doctest at the left margin is fenced (Markdown would read ">>>" as quotations)
    assert convert("Text.\n>>> 1 + 1\n2\n\nMore.") == \
        "Text.\n\n```pycon\n>>> 1 + 1\n2\n```\n\nMore."
    assert convert(".. math:: x^2") == "```latex\nx^2\n```"
    table = "==  ==\na   b\n==  ==\n1   2\n==  =="
    assert convert(table) == "```text\n" + table + "\n```"


def _mkdocs_missing() -> str | None:
    for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ModuleNotFoundError:
            return name
    return None


#: host frameworks the API pages document but the build must not import (griffe reads the
#: integrations' source statically)
HOSTS = ("ultralytics", "lightning", "pytorch_lightning", "torchmetrics", "timm",
         "transformers", "accelerate", "torchvision", "torch")

_BLOCK_HOSTS = f"""
import sys
HOSTS = {HOSTS!r}
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HOSTS:
            raise ImportError(f"the documentation build imported {{name}}")
        return None
sys.meta_path.insert(0, _Blocker())
"""


@pytest.mark.slow
def test_strict_build(tmp_path):
    """``mkdocs build --strict`` succeeds without importing torch or any host framework; any
    warning (a broken link or cross-reference, a stale docstring parameter) fails it."""
    missing = _mkdocs_missing()
    if missing:
        pytest.skip(f"{missing} is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_BLOCK_HOSTS)
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(blocker)] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(MKDOCS_YML), "-d", str(site)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr  # (no --quiet: it hides the warnings --strict counts)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    assert (site / "index.html").is_file()
    api = (site / "api" / "losses" / "index.html").read_text()
    assert 'id="eqlosses.losses.SoftmaxEQLLoss"' in api, "the API page lacks SoftmaxEQLLoss"
    # the docstring rewriting worked: no Sphinx role and no doctest rendered as a quotation
    for page in (site / "api").rglob("*.html"):
        html = page.read_text()
        assert ":class:<code>" not in html and ":func:<code>" not in html, page
        assert not re.search(r"<blockquote>\s*<blockquote>\s*<blockquote>", html), page
