"""Write docs/config_reference.md from the configs themselves.

    python tools/gen_config_reference.py            # rewrites docs/config_reference.md
    python tools/gen_config_reference.py --check    # exit 1 if the checked-in file is stale

Every ``configs/*.py`` is imported and its ``get_config()`` (no variant argument) is
flattened to dotted keys. For each key the reference gives its type, its default in every
config that has it, and a one-line description taken from the comment on the line that
sets it in a config file (``x.key = value  # comment`` or ``key=value,  # comment`` inside
``ConfigDict(dict(...))``; a comment line ``# key: ...`` just above a ``ConfigDict(dict(...))``
that sets ``key`` counts too). Keys whose configs carry no such comment have no description.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import io
import os
import re
import sys
import tokenize
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
OUT = os.path.join(ROOT, "docs", "config_reference.md")


# configs/common.py holds the shared defaults (no get_config of its own): its builders'
# keyword arguments and the dicts inside them set these key prefixes.
SHARED = "common"
BUILDERS = {"data": "data", "data_split": "data", "n4": "data.n4", "model": "model",
            "optimizer": "optimizer", "augment": "augment", "tumour": "data.phantom"}


def config_names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith("_") and f[:-3] != SHARED)


def flatten(cfg, prefix: str = "") -> "OrderedDict[str, object]":
  out = OrderedDict()
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if hasattr(value, "items") and hasattr(value, "to_dict"):  # a nested ConfigDict
      sub = flatten(value, path + ".")
      if sub:
        out.update(sub)
      else:
        out[path] = value
    else:
      out[path] = value
  return out


def load_configs() -> "OrderedDict[str, OrderedDict[str, object]]":
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  out = OrderedDict()
  for name in config_names():
    module = importlib.import_module(f"configs.{name}")
    out[name] = flatten(module.get_config())
  return out


# ---------------------------------------------------------------------------
# Comments
# ---------------------------------------------------------------------------

def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
  """(inline comments by line, full-line comments by line), '#' stripped."""
  inline, full = {}, {}
  code_lines = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      text = tok.string.lstrip("#").strip()
      (inline if tok.start[0] in code_lines else full)[tok.start[0]] = text
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENCODING, tokenize.ENDMARKER):
      for line in range(tok.start[0], tok.end[0] + 1):
        code_lines.add(line)
  return inline, full


def _chain(node) -> list[str] | None:
  """``a.b.c`` -> ['a', 'b', 'c'] (root variable first); None for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name):
    return [node.id] + parts[::-1]
  return None


def _dict_keywords(value) -> list[ast.keyword] | None:
  """Keywords of ``ConfigDict(dict(k=v, ...))`` or ``dict(k=v, ...)``; None otherwise."""
  if not isinstance(value, ast.Call):
    return None
  func = _chain(value.func)
  if func and func[-1] == "ConfigDict" and value.args:
    return _dict_keywords(value.args[0])
  if func == ["dict"]:
    return list(value.keywords)
  return None


def comment_targets(path: str) -> list[tuple[list[str], str]]:
  """[(chain with root variable first, description)] for one config file."""
  with open(path) as f:
    source = f.read()
  inline, full = _comments(source)
  found = []

  def visit_dict(chain, keywords, assign_line):
    for kw in keywords:
      if kw.arg is None:
        continue
      nested = _dict_keywords(kw.value)
      if nested is not None:
        visit_dict(chain + [kw.arg], nested, None)
        continue
      for line in range(kw.value.lineno, kw.value.end_lineno + 1):
        if line in inline:
          found.append((chain + [kw.arg], inline[line]))
          break
    if assign_line is not None:  # '# key: ...' comment block just above the assignment
      line = assign_line - 1
      block = []
      while line in full:
        block.insert(0, full[line])
        line -= 1
      if block:
        text = " ".join(block)
        head, sep, rest = text.partition(":")
        if sep and head.strip() in {kw.arg for kw in keywords}:
          found.append((chain + [head.strip()], rest.strip()))

  tree = ast.parse(source)
  for node in ast.walk(tree):
    # common.data(..., key=value  # comment) in a config file; inside configs/common.py,
    # every dict(...) of a builder function sets that builder's keys
    if isinstance(node, ast.Call):
      func = _chain(node.func)
      if func and len(func) == 2 and func[0] == SHARED and func[1] in BUILDERS:
        visit_dict(["config"] + BUILDERS[func[1]].split("."), node.keywords, None)
    if (isinstance(node, ast.FunctionDef) and node.name in BUILDERS
            and os.path.basename(path) == SHARED + ".py"):
      prefix = ["config"] + BUILDERS[node.name].split(".")
      for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and _chain(sub.func) == ["dict"]:
          visit_dict(prefix, sub.keywords, None)
        if isinstance(sub, ast.Assign) and len(sub.targets) == 1:  # d.key = value  # comment
          chain = _chain(sub.targets[0])
          if chain and len(chain) == 2 and sub.lineno in inline:
            found.append((prefix + chain[1:], inline[sub.lineno]))
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
      continue
    chain = _chain(node.targets[0])
    if chain is None or len(chain) < 2:
      continue
    keywords = _dict_keywords(node.value)
    if keywords is not None:
      visit_dict(chain, keywords, node.lineno)
      continue
    for line in range(node.lineno, node.end_lineno + 1):
      if line in inline:
        found.append((chain, inline[line]))
        break
  return found


def descriptions(all_keys) -> dict[str, list[str]]:
  """key -> distinct comment texts (in config-file order)."""
  out: dict[str, list[str]] = {}
  for name in config_names() + [SHARED]:
    for chain, text in comment_targets(os.path.join(CONFIG_DIR, name + ".py")):
      root, attrs = chain[0], chain[1:]
      candidates = [".".join(attrs)] if root == "config" else [".".join(chain), ".".join(attrs)]
      for key in candidates:
        if key in all_keys:
          texts = out.setdefault(key, [])
          if text not in texts:
            texts.append(text)
          break
  return out


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------

def _clean(text: str) -> str:
  """Drop tracker references ("issue 7") from text copied out of the configs."""
  text = re.sub(r"\s*\(issue \d+\)", "", text)
  text = re.sub(r"\bissue \d+[;,]\s*", "", text)
  return re.sub(r"[;,]?\s*\bissue \d+", "", text)


def _cell(text: str) -> str:
  return _clean(text).replace("|", "\\|").replace("\n", " ")


def _code(value) -> str:
  return "`" + _cell(repr(value)) + "`"


def _type_name(values) -> str:
  names = []
  for v in values:
    n = "None" if v is None else type(v).__name__
    if n not in names:
      names.append(n)
  return " / ".join(names)


def _defaults(per_config: "OrderedDict[str, object]") -> str:
  groups: "OrderedDict[str, list[str]]" = OrderedDict()
  for name, value in per_config.items():
    groups.setdefault(repr(value), []).append(name)
  if len(groups) == 1:
    return _code(next(iter(per_config.values())))
  ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
  parts = []
  for i, (rep, names) in enumerate(ordered):
    value = per_config[names[0]]
    if i == 0 and len(names) > 3:
      parts.append(f"{_code(value)} (others)")
    else:
      parts.append(f"{_code(value)} ({', '.join(names)})")
  return "; ".join(parts)


def _where(has: list[str], every: list[str]) -> str:
  if len(has) == len(every):
    return "all"
  missing = [n for n in every if n not in has]
  if len(has) <= len(missing):
    return ", ".join(has)
  return "all but " + ", ".join(missing)


def _first_doc_line(name: str) -> str:
  with open(os.path.join(CONFIG_DIR, name + ".py")) as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  paragraph = doc.strip().split("\n\n")[0]
  return " ".join(line.strip() for line in paragraph.splitlines())


def render() -> str:
  configs = load_configs()
  names = list(configs)
  keys: "OrderedDict[str, OrderedDict[str, object]]" = OrderedDict()
  for name, flat in configs.items():
    for key, value in flat.items():
      keys.setdefault(key, OrderedDict())[name] = value
  desc = descriptions(set(keys))

  groups: "OrderedDict[str, list[str]]" = OrderedDict()
  for key in keys:
    group = key.split(".")[0] if "." in key else "(top level)"
    groups.setdefault(group, []).append(key)

  lines = [
      "# Configuration reference",
      "",
      "<!-- Generated by tools/gen_config_reference.py from configs/*.py; do not edit by hand.",
      "     Regenerate with `python tools/gen_config_reference.py` (or `make config-reference`). -->",
      "",
      "Every key of every `configs/*.py` `get_config()` (called without a variant argument).",
      "Override any of them on the command line: `--config.<key>=<value>`. Columns: the key's",
      "Python type, its default (`value (config, ...)` when configs differ; `(others)` = every",
      "other config that has the key), the configs that have it, and the comment that sets it",
      "in a config file, where there is one. Variants such as `configs/demo.py:geometric` or",
      "`configs/brats_3d_centralized.py:smoke` are described in each config's docstring.",
      "",
      "## Configs",
      "",
      "| config | what |",
      "|---|---|",
  ]
  for name in names:
    lines.append(f"| `configs/{name}.py` | {_cell(_first_doc_line(name))} |")
  for group, group_keys in groups.items():
    lines += ["", f"## `{group}`" if group != "(top level)" else "## Top-level keys", "",
              "| key | type | default | in | description |", "|---|---|---|---|---|"]
    for key in group_keys:
      per_config = keys[key]
      lines.append(f"| `{key}` | {_type_name(per_config.values())} | {_defaults(per_config)} | "
                   f"{_where(list(per_config), names)} | {_cell('; '.join(desc.get(key, [])))} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--check", action="store_true", help="compare with the checked-in file instead")
  ap.add_argument("--out", default=OUT)
  args = ap.parse_args(argv)
  text = render()
  if args.check:
    with open(args.out) as f:
      if f.read() != text:
        print(f"{args.out} is stale: run python tools/gen_config_reference.py", file=sys.stderr)
        return 1
    return 0
  with open(args.out, "w") as f:
    f.write(text)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
