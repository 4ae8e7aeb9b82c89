"""Reading MIMIC-IV's CSV files so that no row goes missing without a trace.

`CsvRows(path, columns, multiline=())` yields one `Row` per record, with the physical lines it
spans. A record is malformed (a `Row` with a `reason` and no `fields`) when the csv module cannot
parse it, when it has another number of fields than the header, or when a column outside
`multiline` holds a line break. Where a malformed record begins is certain; where it ends is not:
an unclosed quote runs on into the records after it (one in drgcodes.csv once swallowed the 60
rows after it into one field). So the reader starts again at the line after its first line:

- a file whose records never span lines (`multiline=()`, drgcodes.csv): each line is parsed on
  its own, so a bad line costs that line only;
- a file whose `multiline` columns hold line breaks (discharge.csv `text`): a malformed record
  that spans lines opens a damaged stretch, and the lines after its first belong to it until one
  begins a well-formed record. The stretch is one dropped row ("lines 7-19"); the records after
  it are read as usual.

Every line is accounted for: `lines` = 1 (the header) + the lines of every row + `blank_lines`.
A file that cannot be read as a whole (missing, named .gz but not gzip, gzip but not named .gz, a
damaged or truncated gzip stream, bytes that are not UTF-8, a missing column) is a DataError
naming the file, and the line where there is one.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minigrpo.io import DataError

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
# Bounds what one unclosed quote can take into a field before it is reported; MIMIC-IV-Note's longest
# discharge note is far shorter.
FIELD_LIMIT = 16 * 2**20
BAD_QUOTING = "bad_quoting"
MALFORMED_ROW = "malformed_row"


@dataclass(slots=True)
class Row:
    line: int  # its first physical line (line 1 is the header)
    last_line: int
    fields: dict[str, str] | None  # the requested columns; None for a malformed record
    reason: str = ""  # why it is malformed: BAD_QUOTING or MALFORMED_ROW
    detail: str = ""


def _quote_problem(message: str) -> str:
    if message == "unexpected end of data":
        return "a quote opened here is never closed"
    if message.startswith("',' expected after '\"'"):
        return 'a quote inside a quoted field is not doubled ("")'
    if message.startswith("field larger than field limit"):
        return f"a field runs past {FIELD_LIMIT} characters (a quote left open?)"
    return message


class _Lines:
    """The decoded lines of a file, numbered from 1; lines pushed back are handed out again first."""

    def __init__(self, path: Path, binary):
        self.path, self._binary = path, binary
        self.count = 0  # lines read from the file
        self.taken: list[tuple[int, str]] = []  # lines handed out since the caller last cleared it
        self._pending: deque[tuple[int, str]] = deque()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        item = self._pending.popleft() if self._pending else self._read()
        self.taken.append(item)
        return item[1]

    def push_back(self, items: list[tuple[int, str]]) -> None:
        self._pending.extendleft(reversed(items))

    def _read(self) -> tuple[int, str]:
        number = self.count + 1
        try:
            raw = self._binary.readline()
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataError(f"{self.path}:{number}: the gzip data is damaged or cut short ({e})") from None
        if not raw:
            raise StopIteration
        self.count = number
        if number == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]
        try:
            return number, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1}); MIMIC-IV files are UTF-8: was this one saved in another "
                            "encoding?") from None


def _open(path: Path):
    if not path.is_file():
        raise DataError(f"missing input file: {path}")
    with path.open("rb") as f:
        head = f.read(2)
    if path.suffix == ".gz":
        if head != GZIP_MAGIC:
            raise DataError(f"{path}: named .gz but not gzip data (it begins {head!r})")
        return io.BufferedReader(gzip.open(path, "rb"), 1 << 20)  # GzipFile.readline is slow Python
    if head == GZIP_MAGIC:
        raise DataError(f"{path}: gzip data in a file not named .gz (name it {path.name}.gz)")
    return path.open("rb")


class CsvRows:
    """The records of one CSV file as `Row`s; see the module docstring. Counts fill in as it is read."""

    def __init__(self, path: Path, columns: tuple[str, ...], multiline: tuple[str, ...] = ()):
        self.path, self.columns, self.multiline = Path(path), columns, multiline
        self.rows = 0  # records yielded, malformed ones included
        self.lines = 0  # physical lines read, the header included
        self.blank_lines = 0
        self._index: dict[str, int] = {}  # column -> its place in the header

    def __iter__(self) -> Iterator[Row]:
        csv.field_size_limit(FIELD_LIMIT)
        self.rows = self.lines = self.blank_lines = 0
        with _open(self.path) as binary:
            lines = _Lines(self.path, binary)
            header = self._header(lines)
            records = self._multiline(lines, header) if self.multiline else self._single_lines(lines, header)
            spans = 0
            for row in records:
                self.rows += 1
                self.lines = lines.count
                spans += row.last_line - row.line + 1
                yield row
            self.lines = lines.count
        if 1 + spans + self.blank_lines != self.lines:
            accounted = 1 + spans + self.blank_lines
            raise RuntimeError(f"{self.path}: {self.lines} lines read but {accounted} accounted for")

    def check(self) -> None:
        """Open the file and read its header now: a bad file fails before a long read of another."""
        with _open(self.path) as binary:
            self._header(_Lines(self.path, binary))

    def _header(self, lines: _Lines) -> list[str]:
        text = next(lines, None)
        if text is None:
            raise DataError(f"{self.path}: empty file (no header line)")
        try:
            header = next(csv.reader([text], strict=True), [])
        except csv.Error as e:
            raise DataError(f"{self.path}:1: the header line is not valid CSV ({e})") from None
        missing = [c for c in self.columns if c not in header]
        if missing:
            raise DataError(f"{self.path}: missing column(s) {', '.join(missing)}; header is {header}")
        repeated = [c for c in self.columns if header.count(c) > 1]
        if repeated:
            raise DataError(f"{self.path}: column(s) {', '.join(repeated)} appear more than once in the header")
        self._index = {c: header.index(c) for c in self.columns}
        return header

    def _row(self, first: int, last: int, fields: list[str], header: list[str]) -> Row:
        """A Row for a parsed record: well-formed, or MALFORMED_ROW / BAD_QUOTING with the reason."""
        if len(fields) != len(header):
            return Row(first, last, None, MALFORMED_ROW, f"{len(fields)} fields, header has {len(header)}")
        for name, value in zip(header, fields):
            if name not in self.multiline and ("\n" in value or "\r" in value):
                return Row(first, last, None, BAD_QUOTING,
                           f"column {name!r} runs over lines {first}-{last} (a quote left open?)")
        return Row(first, last, {c: fields[i] for c, i in self._index.items()})

    def _single_lines(self, lines: _Lines, header: list[str]) -> Iterator[Row]:
        for text in lines:
            lines.taken.clear()  # no line is read twice here
            number = lines.count
            try:
                fields = next(csv.reader([text], strict=True), [])
            except csv.Error as e:
                yield Row(number, number, None, BAD_QUOTING, _quote_problem(str(e)))
                continue
            if not fields:
                self.blank_lines += 1
                continue
            yield self._row(number, number, fields, header)

    def _multiline(self, lines: _Lines, header: list[str]) -> Iterator[Row]:
        reader = csv.reader(lines, strict=True)
        damaged: Row | None = None  # the stretch of lines after a malformed record that spans lines
        while True:
            lines.taken = []
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                fields, problem = None, _quote_problem(str(e))
            first, last = lines.taken[0][0], lines.taken[-1][0]
            if fields is None:
                row = Row(first, last, None, BAD_QUOTING, problem)
            elif not fields:
                row = None  # a blank line
            else:
                row = self._row(first, last, fields, header)
            if row is not None and row.fields is not None:  # well-formed: a damaged stretch ends here
                if damaged is not None:
                    yield _closed(damaged)
                    damaged = None
                yield row
                continue
            if damaged is not None:
                damaged.last_line = first
            elif row is None:
                self.blank_lines += 1
                continue
            elif last == first:  # a bad line on its own: where it ends is certain
                yield row
                continue
            else:
                damaged = Row(first, first, None, row.reason, row.detail)
            lines.push_back(lines.taken[1:])  # read again: they may hold the records a quote took
        if damaged is not None:
            yield _closed(damaged)


def _closed(damaged: Row) -> Row:
    if damaged.last_line > damaged.line:
        damaged.detail += f"; lines {damaged.line}-{damaged.last_line} dropped as one row"
    return damaged
