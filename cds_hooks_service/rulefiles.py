"""Reading rule files safely: they are edited by hand, copied and mounted, and loaded into every worker.

* Only regular files are read (a FIFO, a device or a socket named ``*.yaml`` is refused, without
  blocking: checked with ``stat`` before opening, opened with ``O_NONBLOCK`` and checked again on the
  open file), at most ``RULE_FILE_MAX_BYTES`` each.
* YAML is read with PyYAML's safe loader minus anchors and aliases (a 1 KB "billion laughs" alias bomb
  would otherwise expand to gigabytes) and with a nesting limit.
* A parse is kept by the exact text (:func:`load_yaml_text`): a reload, ``validate`` or a copy of the rules
  folder reads mostly unchanged files, and each caller gets its own copy of the document. Bounded to
  ``YAML_CACHE_MAX_CHARS`` of text; a text that does not parse is parsed (and refused) again every time.
* :func:`call_with_deadline` bounds a whole load in the main thread (the gunicorn master) with a timer
  signal, so a load that hangs for any other reason cannot stop the master forking workers.
"""
from __future__ import annotations

import copy
import datetime
import os
import signal
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import yaml
from yaml.composer import ComposerError
from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, ScalarEvent

RULE_FILE_MAX_BYTES = 4 * 1024 * 1024  # per file; the largest shipped rule file is ~15 KB, value sets ~100s of KB
YAML_MAX_DEPTH = 64
_C_SAFE_LOADER = getattr(yaml, "CSafeLoader", None)  # libyaml, when PyYAML was built with it (~10x faster)


class RuleFileError(yaml.YAMLError):
    """A rule file that is not read at all (not a regular file, too large, not UTF-8)."""

    def __init__(self, path, message: str):
        self.path = path
        self.problem = message  # what rulebook's problems show (they name the file themselves)
        super().__init__(message)


def read_rule_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a regular file of at most RULE_FILE_MAX_BYTES; RuleFileError otherwise."""
    path = os.fspath(path)
    st = os.stat(path)  # follows symlinks (a Kubernetes ConfigMap mount is symlinks to regular files)
    if not stat.S_ISREG(st.st_mode):
        raise RuleFileError(path, f"not a regular file ({_kind(st.st_mode)}); rule files must be regular files")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # never blocks, even if swapped for a FIFO
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RuleFileError(path, f"not a regular file ({_kind(st.st_mode)}); rule files must be regular files")
        if st.st_size > RULE_FILE_MAX_BYTES:
            raise RuleFileError(path, f"{st.st_size} bytes, over the limit of {RULE_FILE_MAX_BYTES} per rule file")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > RULE_FILE_MAX_BYTES:  # grew while we read
                raise RuleFileError(path, f"over the limit of {RULE_FILE_MAX_BYTES} bytes per rule file")
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RuleFileError(path, f"not UTF-8 text (byte {exc.start})") from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing anchors (&a) and aliases (*a), and nesting deeper than YAML_MAX_DEPTH."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise ComposerError(None, None, "aliases (*name) are not allowed in rule files", event.start_mark)
        if isinstance(event, (ScalarEvent, CollectionStartEvent)) and event.anchor is not None:
            raise ComposerError(None, None, "anchors (&name) are not allowed in rule files", event.start_mark)
        self._depth += 1
        try:
            if self._depth > YAML_MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {YAML_MAX_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_events(text: str) -> None:
    """With libyaml: refuse anchors, aliases and deep nesting from the parser's events, before composing."""
    depth = 0
    for event in yaml.parse(text, Loader=_C_SAFE_LOADER):
        if isinstance(event, AliasEvent):
            raise ComposerError(None, None, "aliases (*name) are not allowed in rule files", event.start_mark)
        if isinstance(event, (ScalarEvent, CollectionStartEvent)) and event.anchor is not None:
            raise ComposerError(None, None, "anchors (&name) are not allowed in rule files", event.start_mark)
        if isinstance(event, CollectionStartEvent):
            depth += 1
            if depth > YAML_MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {YAML_MAX_DEPTH} levels", event.start_mark)
        elif isinstance(event, CollectionEndEvent):
            depth -= 1


# Parsed documents by their exact text, least recently used first. The shipped YAML is ~260 KB of text
# (a few MB as Python objects); a reload re-reads every file, most of them unchanged.
YAML_CACHE_MAX_CHARS = 2 * 1024 * 1024  # text of the documents kept, all together
YAML_CACHE_MAX_ENTRIES = 512
_parsed: OrderedDict[str, tuple[tuple, object]] = OrderedDict()  # text -> ((depth limit, loader), document)
_parsed_chars = 0
_parsed_lock = threading.Lock()
_IMMUTABLE = (str, int, float, bool, type(None), bytes, datetime.date, datetime.datetime)


def copy_document(node):
    """A copy of a parsed document sharing only immutable values (much faster than copy.deepcopy)."""
    kind = type(node)
    if kind is dict:
        return {key: copy_document(value) for key, value in node.items()}  # keys are hashable, i.e. immutable here
    if kind is list:
        return [copy_document(value) for value in node]
    if kind in _IMMUTABLE:
        return node
    return copy.deepcopy(node)  # the rarer safe-loader types (!!set, !!omap pairs)


def load_yaml_text(text: str):
    """Parse rule-file YAML (safe types only, no anchors or aliases, at most YAML_MAX_DEPTH levels). A text
    parsed before (a kept one) is not parsed again: the caller gets a fresh copy of its document."""
    global _parsed_chars
    how = (YAML_MAX_DEPTH, _C_SAFE_LOADER)  # what the parse depended on besides the text
    with _parsed_lock:
        kept = _parsed.get(text)
        if kept is not None and kept[0] == how:
            _parsed.move_to_end(text)
    if kept is not None and kept[0] == how:
        return copy_document(kept[1])  # the kept document is read-only: copied outside the lock
    doc = _parse_yaml_text(text)  # a YAMLError propagates, nothing is kept
    if len(text) <= YAML_CACHE_MAX_CHARS // 4:
        with _parsed_lock:
            if _parsed.pop(text, None) is not None:  # kept under another depth limit or loader
                _parsed_chars -= len(text)
            _parsed[text] = (how, doc)
            _parsed_chars += len(text)
            while _parsed_chars > YAML_CACHE_MAX_CHARS or len(_parsed) > YAML_CACHE_MAX_ENTRIES:
                _parsed_chars -= len(_parsed.popitem(last=False)[0])
        doc = copy_document(doc)  # the kept document is never handed out
    return doc


def _parse_yaml_text(text: str):
    if _C_SAFE_LOADER is not None:
        _check_events(text)
        return yaml.load(text, Loader=_C_SAFE_LOADER)  # noqa: S506 - the safe loader
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml_file(path: Path) -> tuple[object, str]:
    text = read_rule_text(path)
    return load_yaml_text(text), text


class LoadTimeout(Exception):
    pass


def call_with_deadline(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, interrupted with LoadTimeout after ``seconds`` when called on the main
    thread (a SIGALRM timer; the gunicorn master). Elsewhere (no signals off the main thread) it just calls:
    the per-file and per-template limits bound the work there."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    if signal.getitimer(signal.ITIMER_REAL)[0]:  # someone else's timer is running: do not disturb it
        return fn(*args, **kwargs)

    def expired(signum, frame):
        raise LoadTimeout(f"loading took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
