"""The XML of S3's replies and of the request bodies it reads (DeleteObjects,
CompleteMultipartUpload), with the standard library's ElementTree."""

import functools
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

from .errors import S3Error

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
MAX_BODY = 4 * 1024 * 1024  # bytes of an XML request body (DeleteObjects of 1000 long keys)

# (tag, value): a value is text (str() of it), None (left out), or Children (nested)
Children: TypeAlias = Sequence[tuple[str, Any]]


def iso(ts: float) -> str:
    """A time as S3 lists it: 2026-12-03T14:10:42.000Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{int(ts * 1000) % 1000:03d}Z"
    )


def http_date(ts: float) -> str:
    return _http_date(int(ts))


@functools.lru_cache(maxsize=4096)
def _http_date(seconds: int) -> str:
    """Kept per second: objects written in the same second share theirs, and a GET's
    Last-Modified is formatted on every request."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def document(root: str, children: Children) -> bytes:
    """``<root xmlns=S3>children</root>``; ``children`` a list of (tag, value) where a value
    is text, None (left out), or a list of (tag, value) for a nested element."""
    el = ET.Element(root, xmlns=NS)
    _fill(el, children)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(el)


def _fill(el: ET.Element, children: Children) -> None:
    for tag, value in children:
        if value is None:
            continue
        sub = ET.SubElement(el, tag)
        if isinstance(value, list):
            _fill(sub, value)
        elif isinstance(value, bool):
            sub.text = "true" if value else "false"
        else:
            sub.text = str(value)


def parse(body: bytes, root: str) -> ET.Element:
    """The request body's root element (namespace stripped from every tag), or MalformedXML."""
    try:
        el = ET.fromstring(body)
    except ET.ParseError:
        raise S3Error("MalformedXML", "the XML you provided was not well-formed") from None
    for node in el.iter():
        if isinstance(node.tag, str) and "}" in node.tag:
            node.tag = node.tag.split("}", 1)[1]
    if el.tag != root:
        raise S3Error("MalformedXML", f"the XML's root element must be {root}")
    return el
