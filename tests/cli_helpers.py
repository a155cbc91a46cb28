"""Run the `dgemma-ft` command in-process and collect its exit code and output (shared by CLI tests)."""

from dgemma_ft.cli import main


def run_cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
