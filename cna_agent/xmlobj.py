"""A small "XML as typed objects" layer, after virt-manager's virtinst XMLBuilder.

Why: building libvirt XML with string templates and reading it back with ad-hoc XPath leads
to two descriptions of the same document that drift apart. Here each element kind is a class
whose fields declare where they live in the XML (an attribute, a text node, a child object or
a list of child objects). The same field table drives :meth:`XmlObject.to_element` and
:meth:`XmlObject.from_element`, so ``build(parse(xml))`` round-trips the XML we generate.

Shared by every typed libvirt document the agent writes or reads: domains
(compute/domxml.py), domain snapshots (compute/snapshotxml.py) and secrets
(storage/secretxml.py).

Field paths are relative to the object's own element: ``"@type"``, ``"source/@file"``,
``"name"`` (text), ``"features/acpi"`` (presence flag). Elements along a path are created
in field declaration order, which therefore fixes the element order libvirt's schema wants.
"""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Generic, Mapping, TypeVar
from xml.etree import ElementTree as ET

T = TypeVar("T", bound="XmlObject")

_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024, "m": 1024, "mib": 1024,
        "mb": 1000 * 1000 / 1024, "g": 1024 ** 2, "gib": 1024 ** 2, "gb": 1000 ** 3 / 1024, "t": 1024 ** 3, "tib": 1024 ** 3}


def _split(path: str) -> tuple[list[str], str | None]:
    """"a/b/@c" -> (["a", "b"], "c");  "a/b" -> (["a", "b"], None)."""
    parts = [p for p in path.split("/") if p]
    if parts and parts[-1].startswith("@"):
        return parts[:-1], parts[-1][1:]
    return parts, None


def _find_or_make(root: ET.Element, parts: list[str]) -> ET.Element:
    node = root
    for tag in parts:
        child = node.find(tag)
        if child is None:
            child = ET.SubElement(node, tag)
        node = child
    return node


def _find(root: ET.Element, parts: list[str]) -> ET.Element | None:
    node: ET.Element | None = root
    for tag in parts:
        node = node.find(tag) if node is not None else None
    return node


class Field:
    """Base of all declared fields; remembers declaration order."""

    _counter = 0

    def __init__(self, path: str) -> None:
        self.path = path
        Field._counter += 1
        self.order = Field._counter
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def default(self) -> Any:
        return None

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get(self.name, self.default())

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value

    def build(self, obj: "XmlObject", root: ET.Element) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def parse(self, obj: "XmlObject", root: ET.Element) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Prop(Field):
    """A scalar: attribute (``.../@name``) or element text.

    kind: "str", "int", "yesno" ('yes'/'no'), "onoff" ('on'/'off'), "flag" (element present
    or not), "kib" (a memory size element with unit='KiB'; parsing converts other units).
    """

    def __init__(self, path: str, kind: str = "str") -> None:
        super().__init__(path)
        self.kind = kind
        self.parts, self.attr = _split(path)

    def default(self) -> Any:
        return False if self.kind == "flag" else None

    def _to_text(self, value: Any) -> str:
        if self.kind == "yesno":
            return "yes" if value else "no"
        if self.kind == "onoff":
            return "on" if value else "off"
        return str(value)

    def _from_text(self, text: str) -> Any:
        if self.kind in ("int", "kib"):
            return int(text.strip())
        if self.kind == "yesno":
            return text.strip() in ("yes", "on")
        if self.kind == "onoff":
            return text.strip() in ("on", "yes")
        return text

    def build(self, obj: "XmlObject", root: ET.Element) -> None:
        value = self.__get__(obj)
        if self.kind == "flag":
            if value:
                _find_or_make(root, self.parts)
            return
        if value is None:
            return
        node = _find_or_make(root, self.parts)
        if self.attr is not None:
            node.set(self.attr, self._to_text(value))
        else:
            node.text = self._to_text(value)
            if self.kind == "kib":
                node.set("unit", "KiB")

    def parse(self, obj: "XmlObject", root: ET.Element) -> None:
        node = _find(root, self.parts)
        if self.kind == "flag":
            self.__set__(obj, node is not None)
            return
        if node is None:
            return
        raw = node.get(self.attr) if self.attr is not None else node.text
        if raw is None:
            return
        value = self._from_text(raw)
        if self.kind == "kib":
            value = int(value * _KIB.get((node.get("unit") or "KiB").lower(), 1))
        self.__set__(obj, value)


class Child(Field, Generic[T]):
    """One nested object whose element is at ``path`` (e.g. "os", "cpu/numa")."""

    def __init__(self, cls: Callable[[], T] | type, path: str) -> None:
        super().__init__(path)
        self.cls = cls
        self.parts, _ = _split(path)

    def build(self, obj: "XmlObject", root: ET.Element) -> None:
        value = self.__get__(obj)
        if value is None:
            return
        parent = _find_or_make(root, self.parts[:-1])
        parent.append(value.to_element(self.parts[-1]))

    def parse(self, obj: "XmlObject", root: ET.Element) -> None:
        node = _find(root, self.parts)
        if node is not None:
            self.__set__(obj, self.cls.from_element(node))  # type: ignore[union-attr]


class Children(Field, Generic[T]):
    """A list of nested objects, each an element ``path``'s last tag (e.g. "devices/disk")."""

    def __init__(self, cls: type, path: str) -> None:
        super().__init__(path)
        self.cls = cls
        self.parts, _ = _split(path)

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.setdefault(self.name, [])

    def build(self, obj: "XmlObject", root: ET.Element) -> None:
        items = self.__get__(obj)
        if not items:
            return
        parent = _find_or_make(root, self.parts[:-1])
        for item in items:
            parent.append(item.to_element(self.parts[-1]))

    def parse(self, obj: "XmlObject", root: ET.Element) -> None:
        parent = _find(root, self.parts[:-1])
        if parent is None:
            return
        self.__set__(obj, [self.cls.from_element(e) for e in parent.findall(self.parts[-1])])


class Raw(Field):
    """An element kept as-is (e.g. the agent's own metadata document)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.parts, _ = _split(path)

    def build(self, obj: "XmlObject", root: ET.Element) -> None:
        value = self.__get__(obj)
        if value is None:
            return
        parent = _find_or_make(root, self.parts)
        for child in value:
            parent.append(child)

    def parse(self, obj: "XmlObject", root: ET.Element) -> None:
        node = _find(root, self.parts)
        if node is not None:
            self.__set__(obj, list(node))


class Opaque(Field):
    """One whole element kept as-is, attributes included (e.g. the full ``<domain>`` libvirt
    embeds in a snapshot document): carried through parse and build so the document
    round-trips, never interpreted here. Whoever needs its content parses it with that
    element's own typed model (for a domain, ``domxml.Domain.from_element``)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.parts, _ = _split(path)

    def build(self, obj: "XmlObject", root: ET.Element) -> None:
        value = self.__get__(obj)
        if value is None:
            return
        parent = _find_or_make(root, self.parts[:-1])
        # a copy: to_xml() re-indents the tree it builds, which must not change the stored element
        parent.append(copy.deepcopy(value))

    def parse(self, obj: "XmlObject", root: ET.Element) -> None:
        node = _find(root, self.parts)
        if node is not None:
            self.__set__(obj, node)


class XmlObject:
    """Base class: declare fields as class attributes; construct with keyword arguments."""

    TAG: ClassVar[str] = ""

    def __init__(self, **values: Any) -> None:
        fields = self.fields()
        for key, value in values.items():
            if key not in fields:
                raise TypeError(f"{type(self).__name__} has no field {key!r}")
            setattr(self, key, value)

    @classmethod
    def fields(cls) -> Mapping[str, Field]:
        """The class's fields in declaration order (its bases' first), read-only. Worked out
        once per class: every object built or parsed asks, and walking the MRO each time was
        most of a domain parse (1.4 of 1.6 ms, benchmarks.vm_create under cProfile)."""
        cached = cls.__dict__.get("_xmlobj_fields")
        if cached is None:
            found: dict[str, Field] = {}
            for klass in reversed(cls.__mro__):
                for key, value in vars(klass).items():
                    if isinstance(value, Field):
                        found[key] = value
            cached = MappingProxyType(dict(sorted(found.items(), key=lambda kv: kv[1].order)))
            cls._xmlobj_fields = cached  # on this class only: a subclass adds fields of its own
        return cached

    def to_element(self, tag: str | None = None) -> ET.Element:
        root = ET.Element(tag or self.TAG)
        for f in self.fields().values():
            f.build(self, root)
        return root

    @classmethod
    def from_element(cls: type[T], element: ET.Element) -> T:
        obj = cls()
        for f in cls.fields().values():
            f.parse(obj, element)
        return obj

    def to_xml(self, pretty: bool = True) -> str:
        element = self.to_element()
        if pretty:
            ET.indent(element, "  ")
        return ET.tostring(element, encoding="unicode")

    @classmethod
    def from_xml(cls: type[T], text: str) -> T:
        return cls.from_element(ET.fromstring(text))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_xml() == other.to_xml()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.fields() if getattr(self, k) not in (None, [], False))
        return f"{type(self).__name__}({vals})"
