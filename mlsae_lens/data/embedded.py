"""The embedded corpus: English text that ships with every CPython 3.11.

The help topics of ``pydoc_data.topics`` and the docstrings of a fixed list of pure,
cross-platform standard-library modules, walked in a fixed order. It needs no network and no
files, so tests, demos and CI always have a real corpus; its sha256 goes into the provenance
because the text varies with the Python patch version.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import sys
import warnings
from collections.abc import Iterator
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)

EMBEDDED_CORPUS = "embedded"


# Modules whose docstrings form the embedded corpus. Pure, side-effect-free, and defined the
# same way on every platform and build of CPython 3.11 (no OS-specific modules such as os,
# socket or subprocess, no optional system libraries such as tkinter, curses or sqlite3, no
# modules with a pure-Python fallback of different text such as hashlib or zoneinfo, and no
# modules that warn on import). Kept sorted so the corpus order is fixed.
EMBEDDED_MODULES: tuple[str, ...] = tuple(
    sorted(
        """
        abc argparse array ast asyncio.base_events asyncio.events asyncio.futures
        asyncio.locks asyncio.protocols asyncio.queues asyncio.runners asyncio.streams
        asyncio.subprocess asyncio.taskgroups asyncio.tasks asyncio.timeouts
        asyncio.transports atexit base64 bdb bisect builtins calendar cmath cmd code
        codecs codeop collections collections.abc colorsys compileall concurrent.futures
        configparser contextlib contextvars copy copyreg csv dataclasses datetime
        decimal difflib dis doctest email email.charset email.contentmanager
        email.feedparser email.generator email.header email.headerregistry email.message
        email.mime.multipart email.mime.text email.parser email.policy email.utils enum
        filecmp fileinput fnmatch fractions ftplib functools gc getopt gettext glob
        graphlib gzip heapq hmac html html.parser http http.client http.cookiejar
        http.cookies http.server imaplib importlib importlib.abc importlib.machinery
        importlib.metadata importlib.resources importlib.util inspect io ipaddress
        itertools json json.decoder json.encoder keyword linecache logging
        logging.config logging.handlers mailbox marshal math mimetypes modulefinder
        netrc numbers operator optparse pathlib pdb pickle pickletools pkgutil plistlib
        poplib pprint profile pstats py_compile pyclbr pydoc queue quopri random re
        reprlib runpy sched secrets shelve shlex smtplib socketserver statistics string
        stringprep struct symtable sysconfig tabnanny tarfile textwrap threading timeit
        token tokenize tomllib trace traceback tracemalloc types typing unicodedata
        unittest unittest.case unittest.loader unittest.mock unittest.result
        unittest.runner unittest.suite urllib.error urllib.parse urllib.request
        urllib.response urllib.robotparser uuid warnings wave weakref wsgiref.handlers
        wsgiref.headers wsgiref.simple_server wsgiref.util wsgiref.validate xml.dom
        xml.dom.minidom xml.dom.pulldom xml.etree.ElementPath xml.etree.ElementTree
        xml.sax xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client
        xmlrpc.server zipapp zipfile zipimport
        """.split()  # noqa: SIM905 - a word list reads better than 190 lines
    )
)

_TOKENIZE_BATCH = 256  # documents per fast-tokenizer call


def _is_documented_member(obj: Any) -> bool:
    return inspect.isroutine(obj) or isinstance(obj, property | classmethod | staticmethod)


def _module_docstrings(name: str) -> Iterator[str | None]:
    """Docstrings of a module, its public classes and functions, and their members."""
    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - a missing module only shrinks the corpus
        logger.info("Embedded corpus: skipping %s (%s)", name, error)
        return
    yield inspect.getdoc(module)
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        yield inspect.getdoc(obj)
        if not inspect.isclass(obj):
            continue
        for member, raw in sorted(vars(obj).items()):
            if (member.startswith("_") and member != "__init__") or not _is_documented_member(raw):
                continue
            try:
                yield inspect.getdoc(getattr(obj, member))
            except Exception as error:  # noqa: BLE001 - odd descriptors: skip, never fail
                logger.debug(
                    "Embedded corpus: skipping %s.%s (%s)", obj.__qualname__, member, error
                )


@cache
def embedded_documents() -> tuple[str, ...]:
    """The documents of the embedded corpus, in a fixed order.

    First every ``pydoc_data.topics`` help text (sorted by topic), then, for each module of
    :data:`EMBEDDED_MODULES`, the module docstring and the docstrings of its public classes
    and functions defined in that module (sorted by name), each class followed by its
    methods' and properties' docstrings. Exact duplicates keep their first occurrence.
    Modules that fail to import are skipped (logged), so a stripped-down build gives a
    smaller corpus rather than an error.
    """
    from pydoc_data.topics import topics

    if sys.flags.optimize >= 2:
        logger.warning(
            "Python runs with -OO, so docstrings are stripped: the embedded corpus "
            "holds only the pydoc help topics."
        )
    documents: list[str] = []
    seen: set[str] = set()

    def add(doc: str | None) -> None:
        if doc and doc.strip() and doc not in seen:
            seen.add(doc)
            documents.append(doc)

    for key in sorted(topics):
        add(topics[key])
    with warnings.catch_warnings():  # deprecated modules and aliases (typing.io) warn on access
        warnings.simplefilter("ignore")
        for name in EMBEDDED_MODULES:
            for doc in _module_docstrings(name):
                add(doc)
    return tuple(documents)


@cache
def embedded_sha256() -> str:
    """Fingerprint of the embedded text, which varies with the Python patch version."""
    digest = hashlib.sha256()
    for document in embedded_documents():
        digest.update(document.encode("utf-8") + b"\0")
    return digest.hexdigest()
