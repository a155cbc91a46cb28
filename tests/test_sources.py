"""`read_rows` gives each file's rows as written, numbered as the file counts them: .txt and .jsonl by line,
.csv and .parquet (read by `datasets.load_dataset`) by data row, without cache litter, log noise or network."""

import json
import socket

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dgemma_ft.errors import DataError
from dgemma_ft.tasks.sources import MAX_LINE_BYTES, RowError, read_rows, row_unit


def rows_of(path) -> list:
    return [(number, str(row) if isinstance(row, Exception) else row) for number, row in read_rows(str(path))]


# ------------------------------------------------------------------------------------------------- .txt
def test_text_lines_are_rows_numbered_by_line(tmp_path):
    path = tmp_path / "puzzles.txt"
    path.write_bytes(b"\xef\xbb\xbf1000000240030000\r\n\n   \n0000 0000 1234 4321\nlast line, no break")
    assert rows_of(path) == [(1, {"text": "1000000240030000"}), (4, {"text": "0000 0000 1234 4321"}),
                             (5, {"text": "last line, no break"})]
    assert row_unit(str(path)) == "line"


def test_huge_text_line_is_one_unusable_row(tmp_path):
    path = tmp_path / "puzzles.txt"
    path.write_bytes(b"1000000240030000\n" + b"1" * (MAX_LINE_BYTES + 10) + b"\n0000000000000001\n")
    (first, second, third) = read_rows(str(path))
    assert first == (1, {"text": "1000000240030000"}) and third == (3, {"text": "0000000000000001"})
    assert second[0] == 2 and isinstance(second[1], RowError) and "longer than 10 MiB" in str(second[1])


def test_text_not_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "puzzles.txt"
    path.write_bytes(b"ok\n\nstill ok\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"puzzles.txt:4: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        list(read_rows(str(path)))


# ------------------------------------------------------------------------------------------------ .jsonl
def test_jsonl_rows_keep_their_own_keys_and_types(tmp_path):
    """What the datasets json builder would change (see tasks/sources.py): keys of other rows, re-typed mixed
    columns, ints past float precision, nested objects that differ per row."""
    rows = [{"puzzle": "0100", "schema": {"type": "string"}}, {"puzzle": 5, "extra": None},
            {"puzzle": 2**60 + 1, "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert rows_of(path) == list(enumerate(rows, 1))
    assert [type(row["puzzle"]) for _, row in read_rows(str(path))] == [str, int, int]


# -------------------------------------------------------------------------------------------------- .csv
def test_csv_cells_stay_text_as_written(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b'\xef\xbb\xbfpuzzle,solution,note\r\n0100,1234,\r\n\r\n0200,4321,NA\r\n"01\n02",x,null\r\n')
    assert rows_of(path) == [(1, {"puzzle": "0100", "solution": "1234", "note": ""}),
                             (2, {"puzzle": "0200", "solution": "4321", "note": "NA"}),
                             (3, {"puzzle": "01\n02", "solution": "x", "note": "null"})]
    assert row_unit(str(path)) == "row"


@pytest.mark.parametrize("content", [b"", b"puzzle,solution\n", b"\npuzzle,solution\n\n  \n"],
                         ids=["empty", "header-only", "blank-lines"])
def test_csv_without_data_rows_has_no_rows(tmp_path, content):
    path = tmp_path / "rows.csv"
    path.write_bytes(content)
    assert rows_of(path) == []


def test_csv_with_a_huge_cell_is_read(tmp_path):
    """pandas has no cell size limit (Python's csv module refused cells over 128 KiB, failing the file): the
    row reaches the task, which judges it like any other."""
    path = tmp_path / "rows.csv"
    path.write_bytes(b"puzzle\n" + b"1" * 200_000 + b"\n0100\n")
    assert [(n, len(row["puzzle"])) for n, row in read_rows(str(path))] == [(1, 200_000), (2, 4)]


def test_glob_characters_in_a_file_name_read_that_file(tmp_path):
    """datasets reads `data_files` as a glob: `rows[1].csv` alone would match `rows1.csv`."""
    (tmp_path / "rows[1].csv").write_text("puzzle\nmine\n", encoding="utf-8")
    (tmp_path / "rows1.csv").write_text("puzzle\nthe other file\n", encoding="utf-8")
    assert rows_of(tmp_path / "rows[1].csv") == [(1, {"puzzle": "mine"})]


def test_broken_csv_gives_one_error_and_no_library_log(tmp_path, capfd):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"puzzle\n0100\n1,2\n")
    verbosity = datasets.logging.get_verbosity()
    with pytest.raises(DataError, match=r"rows.csv: not readable as CSV \(Expected 1 fields in line 3, saw 2\)"):
        list(read_rows(str(path)))
    assert datasets.logging.get_verbosity() == verbosity
    assert "Failed to read file" not in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------- .parquet
def test_parquet_rows_are_the_tables_rows(tmp_path):
    table = pa.Table.from_pylist([{"puzzle": "0100", "n": 1, "tags": ["a"], "meta": {"k": 1}},
                                  {"puzzle": None, "n": 2**60 + 1, "tags": [], "meta": None}])
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path)
    assert rows_of(path) == list(enumerate(table.to_pylist(), 1))


def test_parquet_without_rows_has_no_rows(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"puzzle": pa.array([], pa.string())}), path)
    assert rows_of(path) == []


# -------------------------------------------------------------------------------------------- side effects
def test_local_files_leave_no_cache_and_touch_no_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a local file must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    hf_cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.csv").write_text("puzzle\n0100\n", encoding="utf-8")
    pq.write_table(pa.table({"puzzle": ["0100"]}), data / "rows.parquet")
    for name in ("rows.csv", "rows.parquet"):
        assert rows_of(data / name) == [(1, {"puzzle": "0100"})]
    assert sorted(p.name for p in data.iterdir()) == ["rows.csv", "rows.parquet"]
    assert list(temp.iterdir()) == [] and not hf_cache.exists()
