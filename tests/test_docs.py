"""The documentation: it builds in strict mode, and the reference covers the API.

The build is the one CI runs (``sphinx -W``: any warning, such as a docstring
that does not parse or a page outside the table of contents, fails it). The
built site is then read as a reader's browser would: it must load nothing from
the network (its math included), and every link inside it must land.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import mats_jax
from mats_jax.recipe import RecipeError, parse_recipe

DOCS = Path(__file__).resolve().parent.parent / "docs"

sphinx = pytest.importorskip("sphinx")
from sphinx.util.inventory import InventoryFile  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html")
    run = subprocess.run(
        [
            *(sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q"),
            *("-b", "html", str(DOCS), str(out)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return out.resolve()


def documented_names(html: Path) -> set[str]:
    with open(html / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    return {name for entries in inventory.values() for name in entries}


def test_docs_build_strictly_and_reference_every_public_name(built: Path) -> None:
    names = documented_names(built)
    missing = [n for n in mats_jax.__all__ if f"mats_jax.{n}" not in names]
    assert not missing, f"not in docs/api.md: {missing}"


def needs_example(obj: object) -> bool:
    # Errors and warnings are documented by the functions that raise them.
    if inspect.isclass(obj):
        return not issubclass(obj, (Exception, Warning))
    return inspect.isfunction(obj)


def public_callables() -> list[str]:
    return [n for n in mats_jax.__all__ if needs_example(getattr(mats_jax, n))]


@pytest.mark.parametrize("name", public_callables())
def test_every_public_function_and_class_has_a_runnable_example(name: str) -> None:
    doc = inspect.getdoc(getattr(mats_jax, name)) or ""
    assert "Examples:" in doc and ">>> " in doc, f"mats_jax.{name} has no example"


class Page(HTMLParser):
    """A built page as a browser reads it: its elements' ids, the URL of every
    ``href``/``src`` with its tag, and the TeX of its math elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.urls: list[tuple[str, str]] = []
        self.math: list[str] = []
        self._math_depth = 0  # elements open inside a math element

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v for k, v in attrs if v is not None}
        if "id" in values:
            self.ids.add(values["id"])
        if tag == "a" and "name" in values:
            self.ids.add(values["name"])
        self.urls += [(tag, values[a]) for a in ("href", "src") if a in values]
        if self._math_depth:
            self._math_depth += 1
        elif "math" in values.get("class", "").split():
            self._math_depth = 1
            self.math.append("")

    def handle_endtag(self, tag: str) -> None:
        if self._math_depth:
            self._math_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._math_depth:
            self.math[-1] += data


@pytest.fixture(scope="module")
def pages(built: Path) -> dict[Path, Page]:
    out = {}
    for path in sorted(built.rglob("*.html")):
        out[path] = page = Page()
        page.feed(path.read_text(encoding="utf-8"))
    return out


def is_remote(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https") or url.startswith("//")


# Tags whose URLs the browser loads by itself; an <a> is the reader's choice.
LOADING_TAGS = ("script", "link", "img", "iframe", "source", "audio", "video")


def test_pages_load_nothing_from_the_network(
    built: Path, pages: dict[Path, Page]
) -> None:
    remote = [
        f"{path.relative_to(built)}: <{tag}> {url}"
        for path, page in pages.items()
        for tag, url in page.urls
        if tag in LOADING_TAGS and is_remote(url)
    ]
    remote += [
        f"{css.relative_to(built)} imports a remote file"
        for css in built.rglob("*.css")
        if re.search(r"""(@import|url\()\s*['"]?(https?:)?//""", css.read_text("utf-8"))
    ]
    assert not remote, "\n".join(remote)


def math_scripts(page: Page) -> list[str]:
    return [
        url for tag, url in page.urls if tag == "script" and "mathjax" in url.lower()
    ]


def test_every_page_with_math_loads_mathjax_from_the_build(
    built: Path, pages: dict[Path, Page]
) -> None:
    with_math = {path: page for path, page in pages.items() if page.math}
    assert len(with_math) > 10, "the math pages are not recognised any more"
    for path, page in with_math.items():
        where = path.relative_to(built)
        assert math_scripts(page), f"{where} has math but loads no MathJax"
        for url in math_scripts(page):
            script = (path.parent / unquote(urlsplit(url).path)).resolve()
            assert not is_remote(url), f"{where} loads MathJax from {url}"
            assert script.is_relative_to(built) and script.is_file(), (
                f"{where} loads {url}, which is not in the build"
            )


def test_internal_links_land_on_a_file_and_an_id(
    built: Path, pages: dict[Path, Page]
) -> None:
    broken = []
    for path, page in pages.items():
        for tag, url in page.urls:
            parts = urlsplit(url)
            if parts.scheme or parts.netloc:  # http(s), mailto, data: not ours
                continue
            where = f"{path.relative_to(built)}: <{tag}> {url}"
            target = (
                (path.parent / unquote(parts.path)).resolve() if parts.path else path
            )
            if target.is_dir():
                target = target / "index.html"
            if not (target.is_relative_to(built) and target.is_file()):
                broken.append(f"{where}: no such file in the build")
            elif parts.fragment and target in pages:
                if unquote(parts.fragment) not in pages[target].ids:
                    broken.append(f"{where}: no element with that id")
    assert not broken, "\n".join(broken)


# MathJax's own TeX input, run by node on the build's copy of MathJax, without
# its "noundefined" package: a macro the browser would show in red is an
# error here. Reads TeX strings as JSON on stdin, prints the failures.
TYPESET = r"""
const dir = process.argv[1];
const input = require("fs").readFileSync(0, "utf8");
require(dir + "/node-main.js").init({
  loader: {load: ["input/tex"]},
  tex: {packages: {"[-]": ["noundefined"]}},
}).then((MathJax) => {
  const failed = [];
  for (const tex of JSON.parse(input)) {
    const match = MathJax.tex2mml(tex).match(/data-mjx-error="([^"]*)"/);
    if (match) failed.push(match[1] + ": " + tex);
  }
  console.log(JSON.stringify(failed));
}).catch((error) => {
  console.error(error);
  process.exit(1);
});
"""


def tex_of(math: str) -> str:
    """The TeX inside Sphinx's delimiters, leaving out an equation's number
    beside them (amsmath blocks come without delimiters)."""
    found = re.search(r"\\\((.*)\\\)|\\\[(.*)\\\]", math, re.DOTALL)
    return next(t for t in found.groups() if t is not None) if found else math


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run MathJax")
def test_every_formula_typesets_with_the_bundled_mathjax(
    built: Path, pages: dict[Path, Page]
) -> None:
    scripts = {
        (path.parent / unquote(urlsplit(url).path)).resolve()
        for path, page in pages.items()
        for url in math_scripts(page)
    }
    (script,) = scripts  # one MathJax for the whole site
    if not (script.parent / "node-main.js").is_file():
        pytest.skip("the build's MathJax has no node entry point")
    formulas = sorted({tex_of(m) for page in pages.values() for m in page.math})
    run = subprocess.run(
        ["node", "-e", TYPESET, str(script.parent)],
        input=json.dumps(formulas),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    failed = json.loads(run.stdout)
    assert not failed, "\n".join(failed)


# For each mapping in a recipe (named as the table names it), a recipe with an
# unknown key there: the parser's error lists the keys that mapping accepts.
UNKNOWN = "zz_no_such_key"
PROBES = {
    "": f"models: [a]\nmethod: average\n{UNKNOWN}: 1",
    "base": f"base: {{path: b, {UNKNOWN}: 1}}\nmodels: [a]\nmethod: average",
    "models[i]": f"models: [{{path: a, {UNKNOWN}: 1}}]\nmethod: average",
    "overrides[i]": f"models: [a]\nmethod: average\noverrides: [{{pattern: x, {UNKNOWN}: 1}}]",
    "output": f"models: [a]\nmethod: average\noutput: {{path: o, {UNKNOWN}: 1}}",
    "output.lora": (
        f"base: b\nmodels: [a]\nmethod: average\noutput: {{lora: {{rank: 1, {UNKNOWN}: 1}}}}"
    ),
}


def accepted_keys() -> set[str]:
    """Every key the recipe parser accepts, as ``mapping.key``."""
    keys = set()
    for mapping, text in PROBES.items():
        with pytest.raises(RecipeError, match=f"unknown key '{UNKNOWN}'") as error:
            parse_recipe(text, source="r.yaml")
        allowed = str(error.value).rsplit("Allowed: ", 1)[1].split(", ")
        keys |= {f"{mapping}.{k}" if mapping else k for k in allowed}
    return keys


class KeyTable(HTMLParser):
    """The rows of the tables inside ``div.recipe-keys``, as lists of cell texts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self._divs = 0  # divs open inside div.recipe-keys
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "div" and (self._divs or "recipe-keys" in classes):
            self._divs += 1
        elif self._divs and tag == "tr":
            self.rows.append([])
        elif self._divs and tag == "td":
            self.rows[-1].append("")
            self._in_cell = True

    def handle_endtag(self, tag: str) -> None:
        if self._divs and tag == "div":
            self._divs -= 1
        elif tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.rows[-1][-1] += data


def test_cli_page_tables_every_recipe_key_the_parser_accepts(built: Path) -> None:
    table = KeyTable()
    table.feed((built / "cli.html").read_text(encoding="utf-8"))
    rows = [[cell.strip() for cell in row] for row in table.rows if row]
    assert rows and all(len(row) == 4 and all(row) for row in rows), rows
    documented = [row[0] for row in rows]
    accepted = accepted_keys()
    missing, refused = accepted - set(documented), set(documented) - accepted
    assert not missing, f"accepted by the parser, not in docs/cli.md's table: {missing}"
    assert not refused, f"in docs/cli.md's table, refused by the parser: {refused}"
    assert len(documented) == len(set(documented)), "a key appears twice"


def test_docs_name_only_benchmark_scripts_that_exist() -> None:
    # The benchmarks' own result files, included into the results pages, may
    # name a script as it was called then; the pages written here may not.
    named = {
        name
        for page in DOCS.rglob("*.md")
        for name in re.findall(r"benchmarks/[\w/]+\.py", page.read_text("utf-8"))
    }
    assert named, "no benchmark script named in docs/ any more"
    missing = sorted(n for n in named if not (DOCS.parent / n).is_file())
    assert not missing, f"docs/ names benchmark scripts that do not exist: {missing}"
