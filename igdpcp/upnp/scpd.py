"""The served SCPD files, loaded into the model that control validates and formats with.

The files in ``scpd/`` are served byte for byte, and the same bytes are parsed
here; so what a strict control point (async-upnp-client, clients.md R11) reads
from the SCPD is exactly what ``control.py`` checks requests against and
formats answers with.  SCPD format: igd.md section 8.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from lxml import etree

import igdpcp

from .device import URN_SERVICE

NS_SERVICE = "urn:schemas-upnp-org:service-1-0"

#: Where the SCPD files live: ``scpd/`` at the top of the repository.
DEFAULT_SCPD_DIR = Path(igdpcp.__file__).resolve().parent.parent / "scpd"

#: (service name, version) -> file in the SCPD directory.  The one list of served SCPDs.
SCPD_FILES: Mapping[tuple[str, int], str] = MappingProxyType({
    ("WANIPConnection", 1): "WANIPConnection1.xml",
    ("WANIPConnection", 2): "WANIPConnection2.xml",
    ("WANCommonInterfaceConfig", 1): "WANCommonInterfaceConfig1.xml",
})

# UDA 1.0 section 2.5 data types we accept in an SCPD; integer bounds.
_INT_BOUNDS = {
    "ui1": (0, 2**8 - 1), "ui2": (0, 2**16 - 1), "ui4": (0, 2**32 - 1),
    "i1": (-(2**7), 2**7 - 1), "i2": (-(2**15), 2**15 - 1), "i4": (-(2**31), 2**31 - 1),
}
_DATA_TYPES = frozenset(_INT_BOUNDS) | {"boolean", "string"}
_INTEGER = re.compile(r"\s*([+-]?[0-9]+)\s*\Z")
_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})


class ScpdError(Exception):
    """An SCPD file is missing or not what this module understands (a start-up error)."""


class ArgumentError(Exception):
    """A request's arguments do not fit the SCPD.

    ``kind`` is 'missing', 'extra', 'type' (ill-typed) or 'range' (outside the
    allowedValueList/allowedValueRange); control turns it into 402 or 601.
    """

    def __init__(self, kind: str, argument: str):
        super().__init__(f"{kind} argument {argument}")
        self.kind = kind
        self.argument = argument


@dataclass(frozen=True, slots=True)
class StateVariable:
    name: str
    data_type: str
    send_events: bool = False
    allowed_values: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None

    def parse(self, text: str, *, bounded: bool = True) -> Any:
        """The Python value of a request argument; raises ArgumentError.

        Lenient where clients differ: whitespace around numbers, boolean
        spellings of UDA (1/0, true/false, yes/no), allowed values matched
        without case and returned in the SCPD's spelling.  ``bounded=False``
        accepts any non-negative integer for a clamped variable (clients.md R8).
        """
        if self.data_type == "string":
            if not self.allowed_values:
                return text
            for allowed in self.allowed_values:
                if text.strip().casefold() == allowed.casefold():
                    return allowed
            raise ArgumentError("range", self.name)
        if self.data_type == "boolean":
            word = text.strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise ArgumentError("type", self.name)
        match = _INTEGER.match(text)
        if match is None:
            raise ArgumentError("type", self.name)
        value = int(match.group(1))
        low, high = _INT_BOUNDS[self.data_type]
        if not bounded:
            if value < 0:
                raise ArgumentError("type", self.name)
            return value
        if not low <= value <= high:
            raise ArgumentError("type", self.name)
        if not self._in_range(value):
            raise ArgumentError("range", self.name)
        return value

    def format(self, value: Any) -> str:
        """The wire text of an answer value; ValueError if the SCPD does not allow it."""
        if self.data_type == "boolean":
            if not isinstance(value, bool):
                raise ValueError(f"{self.name}: boolean expected, got {value!r}")
            return "1" if value else "0"
        if self.data_type == "string":
            if not isinstance(value, str):
                raise ValueError(f"{self.name}: string expected, got {value!r}")
            if self.allowed_values and value not in self.allowed_values:
                raise ValueError(f"{self.name}: {value!r} not an allowed value")
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.name}: integer expected, got {value!r}")
        low, high = _INT_BOUNDS[self.data_type]
        if not (low <= value <= high and self._in_range(value)):
            raise ValueError(f"{self.name}: {value} out of range")
        return str(value)

    def _in_range(self, value: int) -> bool:
        return ((self.minimum is None or value >= self.minimum)
                and (self.maximum is None or value <= self.maximum))


@dataclass(frozen=True, slots=True)
class Argument:
    name: str
    direction: str  # "in" or "out"
    variable: StateVariable


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    inputs: tuple[Argument, ...]
    outputs: tuple[Argument, ...]

    def parse_args(self, args: Mapping[str, str], *, unbounded: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Check and convert request arguments (any order; all of them, no others).

        ``unbounded`` names state variables whose values are clamped by the
        caller rather than refused.  Raises ArgumentError.
        """
        expected = {arg.name for arg in self.inputs}
        for name in args:
            if name not in expected:
                raise ArgumentError("extra", name)
        values = {}
        for arg in self.inputs:
            if arg.name not in args:
                raise ArgumentError("missing", arg.name)
            values[arg.name] = arg.variable.parse(
                args[arg.name], bounded=arg.variable.name not in unbounded)
        return values

    def format_outputs(self, values: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Out-arguments in SCPD order (igd.md section 3); ValueError on a missing,
        extra or disallowed value, which is a bug on our side, never the client's."""
        if set(values) != {arg.name for arg in self.outputs}:
            raise ValueError(f"{self.name}: outputs {sorted(values)} do not match the SCPD")
        return [(arg.name, arg.variable.format(values[arg.name])) for arg in self.outputs]


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One SCPD: its actions and state variables, and the document as served."""

    name: str
    version: int
    actions: Mapping[str, Action]
    variables: Mapping[str, StateVariable]
    document: bytes

    @property
    def service_type(self) -> str:
        return URN_SERVICE.format(self.name, self.version)

    @property
    def evented(self) -> tuple[str, ...]:
        """Names of the sendEvents="yes" variables, in SCPD order (for GENA)."""
        return tuple(v.name for v in self.variables.values() if v.send_events)


def parse_spec(document: bytes, name: str, version: int) -> ServiceSpec:
    """Build the model of one SCPD document; raises ScpdError."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        root = etree.fromstring(document, parser)
    except etree.XMLSyntaxError as exc:
        raise ScpdError(f"{name}:{version}: {exc}") from None
    if root.tag != _q("scpd"):
        raise ScpdError(f"{name}:{version}: root element is not scpd")
    variables = {}
    for el in root.iterfind(f"{_q('serviceStateTable')}/{_q('stateVariable')}"):
        var = _parse_variable(el, name, version)
        variables[var.name] = var
    actions = {}
    for el in root.iterfind(f"{_q('actionList')}/{_q('action')}"):
        action = _parse_action(el, variables, name, version)
        actions[action.name] = action
    return ServiceSpec(name, version, MappingProxyType(actions), MappingProxyType(variables), document)


def load_specs(directory: Path | str | None = None) -> Mapping[tuple[str, int], ServiceSpec]:
    """Every SCPD of ``SCPD_FILES`` from ``directory`` (default ``scpd/`` of the repository)."""
    base = Path(directory) if directory is not None else DEFAULT_SCPD_DIR
    specs = {}
    for (name, version), filename in SCPD_FILES.items():
        try:
            document = (base / filename).read_bytes()
        except OSError as exc:
            raise ScpdError(f"cannot read SCPD {base / filename}: {exc.strerror}") from None
        specs[name, version] = parse_spec(document, name, version)
    return MappingProxyType(specs)


@functools.lru_cache(maxsize=1)
def default_specs() -> Mapping[tuple[str, int], ServiceSpec]:
    """The SCPDs of the default directory, read once per process (tunnels share them)."""
    return load_specs()


def _q(tag: str) -> str:
    return f"{{{NS_SERVICE}}}{tag}"


def _text(el, tag: str) -> str | None:
    found = el.find(_q(tag))
    return None if found is None else (found.text or "").strip()


def _parse_variable(el, name: str, version: int) -> StateVariable:
    var_name = _text(el, "name")
    data_type = _text(el, "dataType")
    if not var_name or data_type not in _DATA_TYPES:
        raise ScpdError(f"{name}:{version}: bad stateVariable {var_name!r} ({data_type!r})")
    allowed = tuple((v.text or "").strip() for v in el.iterfind(f"{_q('allowedValueList')}/{_q('allowedValue')}"))
    minimum = maximum = None
    rng = el.find(_q("allowedValueRange"))
    if rng is not None:
        try:
            minimum = int(_text(rng, "minimum")) if _text(rng, "minimum") is not None else None
            maximum = int(_text(rng, "maximum")) if _text(rng, "maximum") is not None else None
        except ValueError:
            raise ScpdError(f"{name}:{version}: bad allowedValueRange of {var_name}") from None
    return StateVariable(var_name, data_type, el.get("sendEvents", "yes") == "yes", allowed, minimum, maximum)


def _parse_action(el, variables, name: str, version: int) -> Action:
    action_name = _text(el, "name")
    if not action_name:
        raise ScpdError(f"{name}:{version}: action without a name")
    inputs, outputs = [], []
    for arg in el.iterfind(f"{_q('argumentList')}/{_q('argument')}"):
        arg_name, direction, related = _text(arg, "name"), _text(arg, "direction"), _text(arg, "relatedStateVariable")
        if not arg_name or direction not in ("in", "out") or related not in variables:
            raise ScpdError(f"{name}:{version}: {action_name}: bad argument {arg_name!r}")
        (inputs if direction == "in" else outputs).append(Argument(arg_name, direction, variables[related]))
    return Action(action_name, tuple(inputs), tuple(outputs))
