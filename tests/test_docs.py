"""The documentation stays true: the generated configuration reference is current, the
README stays short, every relative link resolves and no text points outside the repository."""
import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
PAGES = [README] + DOCS

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FORBIDDEN = [re.compile(r"issue \d+", re.I), re.compile(re.escape("../shared"))]


def _gen():
  spec = importlib.util.spec_from_file_location(
      "gen_config_reference", os.path.join(ROOT, "tools", "gen_config_reference.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _rel(path):
  return os.path.relpath(path, ROOT)


def test_config_reference_is_current():
  gen = _gen()
  assert _read(gen.OUT) == gen.render(), (
      "docs/config_reference.md is stale: run `python tools/gen_config_reference.py`")


def test_config_reference_covers_every_config():
  gen = _gen()
  text = _read(gen.OUT)
  for name in gen.config_names():
    assert f"`configs/{name}.py`" in text


def test_readme_is_short():
  n = len(_read(README).splitlines())
  assert n <= 300, f"README.md has {n} lines (at most 300): move detail into docs/"


def test_readme_keeps_the_ci_test_command():
  # .ci/run calls `make test`; the README must show that same command.
  assert "make test" in _read(os.path.join(ROOT, ".ci", "run"))
  assert "make test" in _read(README)


def links(text):
  text = FENCE.sub("", text)
  text = INLINE_CODE.sub("", text)
  return LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
  missing = []
  for target in links(_read(page)):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
      continue  # http(s)://, mailto:, in-page anchors
    path = target.split("#")[0]
    full = os.path.normpath(os.path.join(os.path.dirname(page), path))
    if not os.path.exists(full):
      missing.append(target)
    elif not full.startswith(ROOT + os.sep):
      missing.append(target + " (outside the repository)")
  assert not missing, f"{_rel(page)}: broken links {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_tracker_or_outside_references(page):
  text = _read(page)
  hits = [m.group(0) for rx in FORBIDDEN for m in rx.finditer(text)]
  assert not hits, f"{_rel(page)}: {hits}"


def test_link_parser():
  text = "see [a](docs/a.md#x), ![img](img/b.png) and `[c](nope.md)`\n```\n[d](nope2.md)\n```\n"
  assert links(text) == ["docs/a.md#x", "img/b.png"]
