"""Where a split's rows come from: the `SourceSpec` of a recipe, and `read_rows`, which turns a local file or a
Hub dataset into numbered rows, each a dict or the `RowError` saying why it cannot be used.

Tabular files (.csv, .parquet) and Hub datasets are read by `datasets.load_dataset`. Line files (.jsonl, .txt)
and .json lists are read here, line by line, because the json builder is not faithful to the rows: it unifies
them into one Arrow table, so a row gains the other rows' keys (filled with None), and a column mixing types is
re-typed ("0100" next to a 5 becomes 100, an int next to a float becomes a float, and an int past 2**63 always
does, losing digits); and one broken line fails the whole file, where here it is one counted, numbered unusable
row.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
from pydantic import ConfigDict, Field

from dgemma_ft.errors import DataError
from dgemma_ft.strict_models import NumbersNotBooleans

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the shipped data folder (installed as dgemma_ft/data)
# rows with references rarely pass 100 KB, so a 10 MiB line is a broken or foreign file; reading it whole would
# hold it (and its parse) in memory, so it is skipped and counted as an unusable row instead.
MAX_LINE_BYTES = 10 * 2**20
MAX_REASON_CHARS = 200  # longest reason shown per unusable row in a report line

MAX_SOURCE_ROWS = 10_000_000


class SourceSpec(NumbersNotBooleans):
    """Where a split's rows come from.

    source: ``generate`` (synthetic, seeded), a local ``.jsonl``/``.json``/``.csv``/``.parquet``/``.txt`` file
    (a path under the shipped ``data/`` folder works too), or a Hub dataset ``hf:owner/name[:config][@split]``.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = "generate"
    size: int | None = Field(default=None, gt=0, le=MAX_SOURCE_ROWS,
                             description="rows to generate, or the most rows to take; at most 10,000,000 "
                                         "(generating that many takes hours and its dataset tens of GB: use a "
                                         "file, or train for more steps)")
    seed: int = 0
    strict: bool = Field(default=False, description="reject the whole source when any row is unusable")
    columns: dict[str, str] = Field(default_factory=dict, description="task field -> column name in the source")


class RowError(ValueError):
    """Raised by `Task.from_row` for a row that cannot be used; the message is the one-line reason."""


FILE_TYPES = ".jsonl, .json, .csv, .parquet or .txt"


def resolve_data_path(path: str) -> Path:
    """A local path as given, else relative to the shipped data folder (so `sudoku4/dream_4x4.jsonl` works
    from anywhere)."""
    for candidate in (Path(path).expanduser(), DATA_DIR / path):
        if _exists(candidate):
            if candidate.is_dir():
                raise DataError(f"data source '{path}' is a folder; give a data file ({FILE_TYPES}) inside it, "
                                f"or 'generate'")
            return candidate
    raise DataError(f"data file not found: '{path}' (looked in the current folder and in {DATA_DIR}); "
                    f"give an existing {FILE_TYPES} path or 'generate'")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name with a NUL byte, or one too long for the file system
        return False


def parse_hf_source(source: str) -> tuple[str, str | None, str | None]:
    """``hf:owner/name[:config][@split]`` -> (repo id, config, split)."""
    spec = source[len("hf:"):]
    split = None
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    config = None
    if ":" in spec:
        spec, config = spec.split(":", 1)
    if spec.count("/") != 1 or not all(spec.split("/")):
        raise DataError(f"bad Hub dataset source '{source}': write it as hf:owner/name[:config][@split]")
    return spec, config or None, split or None


def row_unit(source: str) -> str:
    """What a source's row numbers count: lines of a .jsonl or .txt, items of a .json list, data rows otherwise."""
    suffix = Path(source).suffix.lower() if not source.startswith("hf:") else ""
    return {".jsonl": "line", ".txt": "line", ".json": "item"}.get(suffix, "row")


def read_rows(source: str, split: str = "train") -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """Yield (row number, row dict) from a file or Hub dataset; an unusable row yields a `RowError` with the
    reason instead of stopping the whole source. Row numbers are 1-based lines for .jsonl and .txt, items for
    .json, data rows for .csv and .parquet. A file that cannot be read as a whole (not UTF-8, not CSV) raises
    `DataError`."""
    if source.startswith("hf:"):
        yield from _read_hf(source, split)
        return
    path = resolve_data_path(source)
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".txt": _text_rows, ".csv": _csv_rows,
               ".parquet": _parquet_rows}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use {FILE_TYPES}")
    yield from readers[suffix](path)


def _open(path: Path, **kwargs):
    try:
        return path.open(**kwargs)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None


def _not_utf8(path: Path, line: int, byte: int) -> DataError:
    return DataError(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x}); save the file as UTF-8")


def _check_utf8(path: Path) -> None:
    """Raise the `DataError` naming the line and byte of the first bytes that are not UTF-8, if any; one pass in
    1 MiB pieces, before a library reader that would only say "position 3 of some chunk"."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with _open(path, mode="rb") as handle:
        while True:
            piece = handle.read(2**20)
            try:
                decoder.decode(piece, final=not piece)
            except UnicodeDecodeError as exc:  # exc.object: the undecoded tail of the last piece, then this one
                raise _not_utf8(path, line + exc.object.count(b"\n", 0, exc.start), exc.object[exc.start]) \
                    from None
            if not piece:
                return
            line += piece.count(b"\n")


def _line_rows(path: Path, row: Callable[[str], dict[str, Any] | RowError]) -> \
        Iterator[tuple[int, dict[str, Any] | Exception]]:
    """(line number, `row(text)`) for each line that is not blank. Lines are read in bytes, at most
    `MAX_LINE_BYTES` each, so one huge line costs no more than that."""
    with _open(path, mode="rb") as handle:
        number = 0
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := handle.readline(2**20)) and not rest.endswith(b"\n"):
                    pass
                yield number, RowError(f"longer than {MAX_LINE_BYTES // 2**20} MiB (a row is one example)")
                continue
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, number, raw[exc.start]) from None
            if text.strip():
                yield number, row(text)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    yield from _line_rows(path, parse_json_row)


def _text_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """Each line that is not blank is the row ``{"text": line}`` (its line break removed), e.g. one puzzle a
    line. Read here rather than by the datasets text builder, which holds a huge line whole and also breaks
    lines at a lone carriage return, so its numbers would not be the file's line numbers."""
    yield from _line_rows(path, lambda text: {"text": text.rstrip("\r\n")})


def parse_json_row(text: str) -> dict[str, Any] | RowError:
    """One JSON object, or the `RowError` saying why the text is not one."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return RowError(f"not valid JSON ({exc.msg} at column {exc.colno})")
    except RecursionError:
        return RowError("JSON nested too deeply to read")
    return row if isinstance(row, dict) else RowError(f"not a JSON object (a {type(row).__name__})")


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    with _open(path, mode="rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data.count(b"\n", 0, exc.start) + 1, data[exc.start]) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read; a .json source is a list of flat objects") \
            from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    for number, row in enumerate(rows, 1):
        yield number, row if isinstance(row, dict) else RowError(f"item {number} is not an object")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """Rows of `datasets`' csv builder with every column read as text, as written: left to infer types, pandas
    would turn the puzzle "0100..." into the number 100... and an empty cell or "NA" into NaN."""
    _check_utf8(path)
    header = _csv_header(path)
    if header is None:
        return
    features = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        dataset = _load_file(path, "csv", features=features, column_names=header, header=0, na_filter=False)
    except Exception as exc:  # pandas raises ParserError, ValueError and more for a broken file
        raise DataError(f"{path}: not readable as CSV ({_root_reason(exc)}); fix the file or convert it to "
                        f".jsonl") from None
    yield from enumerate(dataset, 1)


def _csv_header(path: Path) -> list[str] | None:
    """The column names of a UTF-8 .csv file, or None when no data row follows them."""
    with _open(path, encoding="utf-8-sig", newline="") as handle:
        try:
            header = next((record for record in csv.reader(handle) if record), None)
        except csv.Error as exc:
            raise DataError(f"{path}:1: header not readable as CSV ({exc}); fix the file or convert it to "
                            f".jsonl") from None
        if header is None or not any(line.strip() for line in handle):
            return None
    twice = next((name for number, name in enumerate(header) if name in header[:number]), None)
    if twice is not None:
        raise DataError(f"{path}:1: column '{twice}' is named twice in the header; rename one")
    return header


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    try:
        if pq.read_metadata(path).num_rows == 0:  # datasets refuses a split without rows
            return
        dataset = _load_file(path, "parquet")
    except Exception as exc:  # pyarrow raises many types for a broken file
        raise DataError(f"{path}: cannot read parquet ({_root_reason(exc)})") from None
    yield from enumerate(dataset, 1)


def _load_file(path: Path, builder: str, **options: Any) -> datasets.Dataset:
    """`datasets.load_dataset(builder)` on one local file, built in memory through a throw-away cache folder, so
    nothing is written next to the file or under ~/.cache (and a packaged builder makes no Hub lookup). The
    builder is shown a link named plainly: it reads `data_files` as a glob, so `rows[1].csv` would load
    `rows1.csv`. Its log is silenced meanwhile: it would log a broken file under the link's temporary name,
    a second line beside the caller's `DataError`."""
    verbosity = datasets.logging.get_verbosity()
    with tempfile.TemporaryDirectory(prefix="dgemma-ft-rows-") as cache:
        plain = Path(cache) / f"rows{path.suffix.lower()}"
        try:
            os.symlink(path.resolve(), plain)
        except OSError:  # no symbolic links here (some Windows setups): escape the glob characters instead
            plain = Path(glob.escape(str(path.resolve())))
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        try:
            return datasets.load_dataset(builder, data_files=str(plain), split="train", cache_dir=cache,
                                         keep_in_memory=True, **options)
        finally:
            datasets.logging.set_verbosity(verbosity)


def _root_reason(exc: BaseException) -> str:
    """The first line of the innermost cause (datasets wraps a reader's error in DatasetGenerationError)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return reason.removeprefix("Error tokenizing data. C error: ")


def _read_hf(source: str, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    repo, config, hf_split = parse_hf_source(source)
    try:
        dataset = datasets.load_dataset(repo, config, split=hf_split or split)
    except Exception as exc:  # offline, unknown id, unknown split: datasets raises many types
        raise DataError(f"cannot load Hub dataset '{repo}' (config {config!r}, split {hf_split or split!r}): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Check the id and "
                        f"your connection, or download it and point the source at a local file") from None
    for number, row in enumerate(dataset, 1):
        yield number, row
