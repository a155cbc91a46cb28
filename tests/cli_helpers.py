"""Run the `dgemma-ft` command in-process and collect its exit code and output (shared by CLI tests)."""

from dgemma_ft.cli import main

# The smallest tiny DiffusionGemma the tests train (seconds per run on a CPU): prepend to a test's own overrides.
SMALL_MODEL = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=2",
               "model.tiny.head_dim=16", "model.tiny.global_head_dim=16", "model.tiny.moe_intermediate_size=16"]


def run_cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
