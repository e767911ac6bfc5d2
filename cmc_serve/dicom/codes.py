"""What each class is, in SNOMED CT: the codes SEG, RTSTRUCT and SR describe a structure with.

A PACS, a viewer or a registry (MHub.ai, IDC) reads a segment by its codes, not by its
label text, so a class is coded as the SegDB convention (MHub.ai) has it: category
"Anatomical Structure", the organ as the type and laterality as a modifier (`kidney_l` is
Kidney with the modifier Left, not a separate "Left kidney" concept). A class with no known
code is written as the generic Tissue / Tissue pair, which the standard allows.

The table is a CSV (`codes.csv` beside this module, the same format a user gives to
`cmc export --codes FILE`): columns `name,category,type,modifier,color`; a code is written
`SCHEME:VALUE:MEANING` (e.g. `SCT:64033007:Kidney`), `modifier` and `color` ("R G B",
0-255) may be empty. Names are matched after normalisation (lower case, spaces and hyphens
as "_") and laterality spelt as a prefix or suffix (`l`, `left`, `r`, `right`) is read as
the `_left` / `_right` suffix, so `kidney_r`, `Right kidney` and `r-kidney` all find the
row `kidney_right`. `cmc export --codes` records the codes of every class in cmc.json
(`codes`), so the model directory alone decides how its segments are described.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydicom.sr.coding import Code

from cmc_common.errors import CmcError

COLUMNS = ("name", "category", "type", "modifier", "color")
TISSUE = Code("85756007", "SCT", "Tissue")
_SIDES = {"l": "left", "left": "left", "r": "right", "right": "right"}


class CodesError(CmcError, ValueError):
    """A codes table that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class ClassCode:
    """How one class is described: segmented property category and type, laterality
    modifier (None: none) and the recommended display colour (RGB, None: the viewer's)."""

    category: Code
    type: Code
    modifier: Code | None = None
    color: tuple[int, int, int] | None = None

    @property
    def meaning(self) -> str:
        """The structure in words, laterality included (e.g. "Kidney, Right")."""
        return self.type.meaning + (f", {self.modifier.meaning}" if self.modifier else "")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"category": _code_json(self.category),
                               "type": _code_json(self.type)}
        if self.modifier is not None:
            out["modifier"] = _code_json(self.modifier)
        if self.color is not None:
            out["color"] = list(self.color)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> ClassCode:
        """Inverse of `to_json`; CodesError naming `where` on anything else."""
        try:
            modifier = data.get("modifier")
            color = data.get("color")
            return cls(_code_from_json(data["category"]), _code_from_json(data["type"]),
                       _code_from_json(modifier) if modifier is not None else None,
                       _check_color(color) if color is not None else None)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CodesError(f"{where}: not a class code ({exc})") from None


GENERIC = ClassCode(TISSUE, TISSUE)


@dataclass(frozen=True)
class TableRow:
    """One row of a codes table: the class name as written, its CSV row number, its codes."""

    name: str
    row: int
    code: ClassCode


def _code_json(code: Code) -> list[str]:
    return [code.scheme_designator, code.value, code.meaning]


def _code_from_json(item: Any) -> Code:
    scheme, value, meaning = item
    return _make_code(str(scheme), str(value), str(meaning))


def _make_code(scheme: str, value: str, meaning: str) -> Code:
    if not (scheme and value and meaning):
        raise ValueError("scheme, value and meaning must all be given")
    if len(value) > 64 or len(meaning) > 64 or len(scheme) > 16:
        raise ValueError("value and meaning hold at most 64 characters, the scheme 16")
    return Code(value, scheme, meaning)


def normalise(name: str) -> str:
    """The key a class name is looked up by: lower case, words joined by "_", laterality
    (l/left/r/right as first or last word) moved to a `_left` / `_right` suffix."""
    words = [w for w in name.strip().lower().replace("-", " ").replace("_", " ").split() if w]
    if len(words) > 1 and words[-1] in _SIDES:
        return "_".join(words[:-1] + [_SIDES[words[-1]]])
    if len(words) > 1 and words[0] in _SIDES:
        return "_".join(words[1:] + [_SIDES[words[0]]])
    return "_".join(words)


def _parse_code(text: str, column: str) -> Code:
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise ValueError(f"{column} {text!r} is not SCHEME:VALUE:MEANING "
                         "(e.g. SCT:64033007:Kidney)")
    try:
        return _make_code(*(p.strip() for p in parts))
    except ValueError as exc:
        raise ValueError(f"{column} {text!r}: {exc}") from None


def _check_color(value: Any) -> tuple[int, int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and 0 <= v <= 255 for v in value)):
        raise ValueError(f"color {value!r} is not three integers 0-255")
    return (value[0], value[1], value[2])


def _parse_color(text: str) -> tuple[int, int, int]:
    try:
        return _check_color([int(v) for v in text.replace(",", " ").split()])
    except ValueError:
        raise ValueError(f"color {text!r} is not three integers 0-255 (e.g. 212 126 151)") \
            from None


def parse_table(text: str, where: str) -> dict[str, TableRow]:
    """A codes CSV -> {normalised name: TableRow}; CodesError "WHERE row N: problem"."""
    reader = csv.DictReader(io.StringIO(text))
    header = tuple(reader.fieldnames or ())
    if header[:3] != COLUMNS[:3] or not set(header) <= set(COLUMNS):
        raise CodesError(f"{where} row 1: header {','.join(header) or '(empty)'} is not "
                         f"{','.join(COLUMNS)} (modifier and color optional)")
    table: dict[str, TableRow] = {}
    for row in reader:
        line = reader.line_num
        try:
            if None in row:
                raise ValueError(f"more than the {len(header)} columns of the header")
            if any(row[c] is None for c in COLUMNS[:3]):
                raise ValueError("name, category and type are required")
            name = normalise(row["name"])
            if not name:
                raise ValueError("empty name")
            if name in table:
                raise ValueError(f"class {row['name']!r} is listed twice")
            modifier, color = (row.get("modifier") or "").strip(), (row.get("color") or "")
            table[name] = TableRow(row["name"], line, ClassCode(
                _parse_code(row["category"], "category"), _parse_code(row["type"], "type"),
                _parse_code(modifier, "modifier") if modifier else None,
                _parse_color(color) if color.strip() else None))
        except ValueError as exc:
            raise CodesError(f"{where} row {line}: {exc}") from None
    if not table:
        raise CodesError(f"{where}: no rows below the header")
    return table


def default_table() -> dict[str, TableRow]:
    """The table shipped with cmc (`codes.csv`)."""
    text = resources.files("cmc_serve.dicom").joinpath("codes.csv").read_text("utf-8")
    return parse_table(text, "cmc_serve/dicom/codes.csv")


def read_table(path: str | Path) -> dict[str, TableRow]:
    """A user's codes CSV (`cmc export --codes FILE`); CodesError naming the file."""
    path = Path(path)
    try:
        text = path.read_text("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CodesError(f"{path}: cannot read the codes table ({exc})") from None
    return parse_table(text, str(path))


def resolve(class_names: Sequence[str], overrides: Mapping[str, TableRow] | None = None,
            where: str = "codes") -> dict[str, ClassCode]:
    """{class name: ClassCode} for every foreground class (the first name is the
    background): the user's rows first, then the default table, else the generic Tissue.

    A user row that names no class of the model is refused (a misspelt name would
    otherwise be ignored without a word).
    """
    foreground = list(class_names[1:])
    overrides = overrides or {}
    known = {normalise(n) for n in foreground}
    for key, entry in overrides.items():
        if key not in known:
            raise CodesError(f"{where} row {entry.row}: {entry.name} is not a class of the "
                             f"model (classes: {', '.join(foreground)})")
    table = default_table()
    out = {}
    for name in foreground:
        found = overrides.get(normalise(name)) or table.get(normalise(name))
        out[name] = found.code if found else GENERIC
    return out


def codes_to_json(codes: Mapping[str, ClassCode]) -> dict[str, Any]:
    return {name: code.to_json() for name, code in codes.items()}


def codes_from_json(data: Any, class_names: Sequence[str], where: str) -> dict[str, ClassCode]:
    """cmc.json's `codes` -> {class name: ClassCode}; every foreground class must be there."""
    if not isinstance(data, dict):
        raise CodesError(f"{where}: codes must be an object of class name -> codes")
    missing = [n for n in class_names[1:] if n not in data]
    if missing:
        raise CodesError(f"{where}: codes lack the classes {', '.join(missing)}")
    return {n: ClassCode.from_json(data[n], f"{where}: codes[{n!r}]") for n in class_names[1:]}
