"""The documentation: it builds in strict mode, and the reference covers the API.

The build is the one CI runs (``sphinx -W``: any warning, such as a docstring
that does not parse or a page outside the table of contents, fails it). The
built site is then read as a reader's browser would: it must load nothing from
the network (its math included), and every link inside it must land.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shutil
import subprocess
import sys
from html import unescape
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


def documented_objects(html: Path) -> dict[str, str]:
    """Every Python object the site describes (indexed), to the URI of its entry."""
    with open(html / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    return {
        name: item.uri
        for kind, entries in inventory.items()
        if kind.startswith("py:")
        for name, item in entries.items()
    }


def resolve(name: str) -> object:
    """The object a dotted name documents: the longest importable module
    prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(name)


def test_docs_build_strictly_and_reference_every_public_name(built: Path) -> None:
    documented = documented_objects(built)
    missing = [n for n in mats_jax.__all__ if f"mats_jax.{n}" not in documented]
    assert not missing, f"not in the API reference (docs/api/): {missing}"
    elsewhere = {
        n: documented[f"mats_jax.{n}"]
        for n in mats_jax.__all__
        if not documented[f"mats_jax.{n}"].startswith("api/")
    }
    assert not elsewhere, f"documented outside docs/api/: {elsewhere}"


def test_reference_documents_each_public_name_once(built: Path) -> None:
    # Sphinx -W already refuses one name described twice; this finds a public
    # object described again under the path of the module that defines it
    # (``mats_jax.mergekit.read_recipe`` beside ``mats_jax.read_recipe``).
    # Canonical names of classes point at the same entry and are no second
    # description.
    documented = documented_objects(built)
    twice = {}
    for name in mats_jax.__all__:
        public, entry = getattr(mats_jax, name), documented[f"mats_jax.{name}"]
        others = [
            f"{other} ({uri})"
            for other, uri in documented.items()
            if other.rsplit(".", 1)[-1] == name
            and uri != entry
            and resolve(other) is public
        ]
        if others:
            twice[f"mats_jax.{name} ({entry})"] = others
    assert not twice, f"described again elsewhere: {twice}"


class SummaryTables(HTMLParser):
    """Each row's name in a page's autosummary tables, in order: the object
    its first cell's link names (``title``) and the link's target."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[tuple[str, str]] = []
        self._in_table = False
        self._cell = 0  # the cell of the current row, from 1

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "table" and "autosummary" in (values.get("class") or "").split():
            self._in_table = True
        elif self._in_table and tag == "tr":
            self._cell = 0
        elif self._in_table and tag == "td":
            self._cell += 1
        elif self._in_table and tag == "a" and self._cell == 1:
            self.rows.append((values.get("title") or "", values.get("href") or ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False


def test_api_index_summarises_every_public_name_once(built: Path) -> None:
    tables = SummaryTables()
    tables.feed((built / "api.html").read_text(encoding="utf-8"))
    documented = documented_objects(built)
    # Each row's name links to the entry on the name's own area page.
    listed = [name for name, _ in tables.rows]
    assert all(name.startswith("mats_jax.") for name in listed), listed
    names = [name.removeprefix("mats_jax.") for name in listed]
    assert sorted(names) == sorted(mats_jax.__all__), (
        f"not in docs/api.md's tables: {set(mats_jax.__all__) - set(names)}; "
        f"not public: {set(names) - set(mats_jax.__all__)}"
    )
    assert len(names) == len(set(names)), "a name is listed twice"
    wrong = [(n, t) for n, t in tables.rows if t != documented[n]]
    assert not wrong, f"rows that do not link to their entry: {wrong}"


def entry_text(page: Path, name: str) -> str:
    """The text of the entry ``name`` on a built page, up to the next entry."""
    html = page.read_text(encoding="utf-8")
    start = html.index(f'id="{name}"')
    end = html.find('<dl class="py ', start)
    text = re.sub(r"<[^>]+>", "", html[start : end if end != -1 else None])
    return re.sub(r"\s+", " ", unescape(text))


def test_reference_shows_the_packages_type_aliases_by_name(built: Path) -> None:
    kfac = entry_text(built / "api" / "statistics.html", "mats_jax.kfac")
    assert "params (Params)" in kfac, kfac[:600]
    assert "logits_fn (Callable[[Params, Any], Array])" in kfac, kfac[:600]
    mats = entry_text(built / "api" / "data_dependent.html", "mats_jax.mats")
    assert "models (Sequence[Params])" in mats, mats[:600]
    assert "statistics (Sequence[StatTree])" in mats, mats[:600]
    assert "init (Params | None)" in mats, mats[:600]
    # Neither autodoc's placeholder for an alias (its repr inside a type) nor
    # the link marker of a name (shown as text after a ``Literal``) shows.
    leaked = [
        f"{p.relative_to(built)}: {marker}"
        for p in (built / "api").rglob("*.html")
        for marker in ("TypeAliasForwardRef", "~mats_jax")
        if marker in p.read_text(encoding="utf-8")
    ]
    assert not leaked, leaked


def test_reexported_data_shows_its_own_docstring(built: Path) -> None:
    # Not the docstring of its value's type (``int([x]) -> integer``).
    page = built / "api" / "statistics.html"
    assert "falls back" in entry_text(page, "mats_jax.MAX_FACTOR_SIZE")
    page = built / "api" / "data_dependent.html"
    assert "How a block" in entry_text(page, "mats_jax.STATUS_NAMES")
    page = built / "api" / "methods.html"
    assert "Every registered method" in entry_text(page, "mats_jax.METHODS")


def test_every_table_scrolls_sideways(built: Path, pages: dict[Path, Page]) -> None:
    # furo wraps each table in div.table-wrapper (overflow-x: auto);
    # docs/_static/tables.css makes that overflow visible.
    css = built / "_static" / "tables.css"
    assert ".table-wrapper" in css.read_text(encoding="utf-8")
    unwrapped = []
    for path in built.rglob("*.html"):
        html = path.read_text(encoding="utf-8")
        # The pages' own tables, not the theme's (the module index).
        content = r'<table class="[^"]*\bdocutils\b'
        tables = len(re.findall(content, html))
        wrapped = len(
            re.findall(rf'<div class="table-wrapper[^"]*">\s*{content}', html)
        )
        if tables != wrapped:
            unwrapped.append(
                f"{path.relative_to(built)}: {tables - wrapped} of {tables}"
            )
        if tables and not any(
            tag == "link" and urlsplit(url).path.endswith("_static/tables.css")
            for tag, url in pages[path].urls
        ):
            unwrapped.append(f"{path.relative_to(built)} does not load tables.css")
    assert not unwrapped, "\n".join(unwrapped)


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
