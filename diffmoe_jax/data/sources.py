"""Text sources of a domain.

A source is a sorted tuple of files under a root, a reader of one file's text, and what of that text is the
domain's document: the running interpreter's standard library (`stdlib:code`: the .py files;
`stdlib:docs`: their docstrings) or plain UTF-8 text files (`files:<glob>[,<glob>...]`). A source's
`views` are the texts of a file that the train/validation split (split.py) compares; both stdlib domains
have the same two (the code and its docstrings), so they split alike.
"""
from __future__ import annotations

import ast
import codecs
import dataclasses
import functools
import glob
import os
import re
import sysconfig
import tokenize
import warnings
from typing import Callable, Iterator

from diffmoe_jax.data.errors import DataError

SOURCE_FORMS = "'stdlib:code', 'stdlib:docs' or 'files:<glob>[,<glob>...]'"
_THIRD_PARTY_DIRS = ("site-packages", "dist-packages")
_COMMA = re.compile(r",(?![^\[\]]*\])")  # a comma that separates globs: not one inside a [...] character class
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


class Skipped(Exception):
  """A built-in corpus file that cannot be used; its reason is counted and logged, never fatal."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A domain's files (absolute paths, sorted) under `root`, and how one file becomes a document."""
  spec: str
  field: str  # the config field naming this source, for messages
  root: str
  files: tuple[str, ...]
  read: Callable[[str], str]  # path -> the file's text; raises Skipped (built-in corpus) or DataError
  views: tuple[Callable[[str, str], str], ...]  # (text, path) -> a text of the file; may raise Skipped
  document_view: int  # index in views of the domain's document; a file whose document is "" is skipped
  builtin: bool  # the built-in corpus skips and counts unusable files; `files:` sources raise instead

  def relpath(self, path: str) -> str:
    return os.path.relpath(path, self.root).replace(os.sep, "/")


def parse_source(name: str, spec: str) -> Source:
  """The source `config.data.domains.<name>` names."""
  field = f"config.data.domains.{name}"
  kind, _, arg = spec.partition(":") if isinstance(spec, str) else ("", "", "")
  if kind == "stdlib" and arg in ("code", "docs"):
    root, files = _stdlib_files(field)
    return Source(spec, field, root, files, read_python, (whole_text, docstrings), ("code", "docs").index(arg),
                  builtin=True)
  if kind == "files" and arg:
    root, files = _glob_files(field, spec, arg)
    return Source(spec, field, root, files, functools.partial(read_utf8, field=field), (whole_text,), 0,
                  builtin=False)
  raise DataError(f"{field} = {spec!r} is not a source spec; use {SOURCE_FORMS}.")


def read_python(path: str) -> str:
  """A .py file's text, decoded with its PEP 263 encoding."""
  try:
    with tokenize.open(path) as f:
      return f.read()
  except (SyntaxError, UnicodeDecodeError) as e:  # tokenize reports a bad coding cookie as SyntaxError
    raise Skipped("could not be decoded") from e
  except OSError as e:
    raise Skipped("could not be read") from e


def docstrings(text: str, path: str) -> str:
  """The module, class and function docstrings of a .py file's text, in source order, joined by blank lines."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # old-style escapes in string literals warn at parse time
      tree = ast.parse(text, filename=path)
  except (SyntaxError, ValueError, RecursionError) as e:
    raise Skipped("did not parse") from e
  return "\n\n".join(filter(None, map(ast.get_docstring, [tree, *_definitions(tree.body)])))


def read_utf8(path: str, *, field: str, omit: str = "leave it out of the source") -> str:
  """A text file's contents, less a leading byte-order mark; not valid UTF-8 is a DataError naming the path
  and the byte offset, and saying how to fix it or (`omit`) do without it."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:  # no permission, removed since it was listed, an I/O error
    raise DataError(f"{field}: {path} cannot be read ({e.strerror or e}); fix its permissions or {omit}.") from e
  bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # Windows editors write one; no text
  try:
    return data[bom:].decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{field}: {path} is not valid UTF-8 (byte offset {bom + e.start}: {e.reason}); convert it to "
                    f"UTF-8 or {omit}.") from e


def whole_text(text: str, path: str) -> str:
  return text


def _definitions(body: list) -> Iterator[ast.AST]:
  """The class and function definitions in a list of statements, at any depth, in source order."""
  # Only statements can hold definitions, so expressions (most of a tree) are never visited.
  for node in body:
    if isinstance(node, _DEFINITIONS):
      yield node
    for field in ("body", "handlers", "orelse", "finalbody", "cases"):  # the order they appear in source
      yield from _definitions(getattr(node, field, ()))


def _stdlib_files(field: str) -> tuple[str, tuple[str, ...]]:
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _THIRD_PARTY_DIRS]
    files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
  if not files:
    raise DataError(f"{field}: the standard library at {root} has no .py files (a zipped or stripped "
                    "install?); use 'files:<glob>' sources instead.")
  return root, tuple(sorted(files))


def _glob_files(field: str, spec: str, arg: str) -> tuple[str, tuple[str, ...]]:
  """The root and the files a `files:` spec names.

  The root is the common directory of the patterns' fixed parts (before their first wildcard), not of the
  files matched: files are named relative to it and a file's name decides its split, so adding a file must
  not move the root and rename (and so re-split) the others. Paths to one file (through symlinks) count once.
  """
  files, fixed_parts = [], []
  patterns = _COMMA.split(arg)
  # A path holding a comma is cut at it; a glob's character class can hold one.
  comma_hint = " (a ',' separates globs: write one in a name as '[,]')" if len(patterns) > 1 else ""
  for pattern in patterns:
    if not pattern.strip():
      raise DataError(f"{field} = {spec!r} has an empty pattern; remove the stray comma or space.")
    pattern = os.path.abspath(os.path.expanduser(pattern.strip()))
    if _has_wildcard(pattern):
      parts = pattern.split(os.sep)
      first_wildcard = next(i for i, part in enumerate(parts) if _has_wildcard(part))
      fixed_parts.append(os.sep.join(parts[:first_wildcard]) or os.sep)
      try:
        expanded = _expand(pattern)
      except OSError as e:  # a directory that cannot be listed: its files would be left out unseen
        raise DataError(f"{field} = {spec!r}: the directory {e.filename} cannot be listed "
                        f"({e.strerror or e}); fix its permissions or narrow the glob.") from None
      broken = next((p for p in expanded if os.path.islink(p) and not os.path.exists(p)), None)
      if broken:  # a link to an unmounted volume or a moved file, or a link loop: its text would be left out unseen
        raise DataError(f"{field} = {spec!r}: {broken} is a symbolic link to {os.readlink(broken)!r}, which does "
                        "not exist (or is a loop of links); fix the link or narrow the glob.")
      matched = [p for p in expanded if os.path.isfile(p)]  # not directories, FIFOs or devices
      if not matched:
        # A name with brackets, such as 'run [1]', is a character class to glob, even where it exists.
        hint = " (a '[' starts a character class; write a literal one as '[[]')" if "[" in pattern else ""
        raise DataError(f"{field} = {spec!r}: the glob {pattern!r} matches no file{hint}{comma_hint}; fix or remove "
                        "it.")
    elif os.path.isfile(pattern):
      fixed_parts.append(os.path.dirname(pattern))
      matched = [pattern]
    elif os.path.isdir(pattern):
      raise DataError(f"{field} = {spec!r}: {pattern!r} is a directory; name its files with a glob, such as "
                      f"'files:{os.path.join(pattern, '**', '*.txt')}'.")
    else:
      raise DataError(f"{field} = {spec!r}: {pattern!r} does not exist or is not a file{comma_hint}; fix or remove "
                      "it.")
    files += matched
  by_target = {}
  for path in sorted(set(files), key=lambda p: (os.path.islink(p), p)):  # a file's own path before a link's
    by_target.setdefault(os.path.realpath(path), path)
  return os.path.commonpath(fixed_parts), tuple(sorted(by_target.values()))


def _has_wildcard(pattern: str) -> bool:
  return any(c in pattern for c in "*?[")


def _expand(pattern: str) -> list[str]:
  """glob.glob(pattern, recursive=True), except that `**` enters each directory once (by its real path):
  glob follows symlinks without end, so a link to a parent directory listed each file 41 times and two such
  links hung it. A directory the pattern lists that cannot be listed raises OSError (glob skips it, and with
  it its files)."""
  parts = pattern.split(os.sep)
  walked = parts.index("**") if "**" in parts else len(parts)  # os.walk raises for the directories under `**`
  for i, part in enumerate(parts[:walked]):
    if _has_wildcard(part):  # glob lists the directories that the parts before this one match
      head = os.sep.join(parts[:i]) or os.sep
      for directory in glob.glob(head) if _has_wildcard(head) else [head]:
        try:
          os.scandir(directory).close()
        except OSError as e:
          _raise_if_exists(e)
  if walked == len(parts):
    return glob.glob(pattern)
  i = walked
  head, tail = os.sep.join(parts[:i]) or os.sep, os.sep.join(parts[i + 1:]) or "*"
  tops = [d for d in glob.glob(head) if os.path.isdir(d)] if _has_wildcard(head) else [head]
  seen, matched = set(), []
  for top in sorted(tops):
    for dirpath, dirnames, _ in os.walk(top, onerror=_raise_if_exists, followlinks=True):
      real = os.path.realpath(dirpath)
      if real in seen:
        dirnames.clear()
        continue
      seen.add(real)
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # glob's `**` skips hidden directories
      matched += _expand(os.path.join(glob.escape(dirpath), tail))
  return matched


def _raise_if_exists(e: OSError) -> None:
  """os.walk's onerror: a directory that exists but cannot be listed is an error (os.walk skips it)."""
  if os.path.isdir(e.filename):
    raise e
