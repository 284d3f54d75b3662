"""The tile sweep (benchmarks/tune_kernels.py) in quick mode: every section runs and restores the
launchers' constants. Nothing here asserts anything about time."""
from benchmarks import tune_kernels


def test_quick_sweep_runs_and_restores_the_tiles(capsys):
    modules = (tune_kernels.DEPTHWISE, tune_kernels.CFC, tune_kernels.POINTWISE, tune_kernels.HEADS)
    before = {m: dict(vars(m)) for m in modules}
    assert tune_kernels.main(["--quick"]) == 0
    text = capsys.readouterr().out
    for title in ("depthwise 7x7 forward", "depthwise 3x3 weight + bias gradient", "CfC backward kernel",
                  "SiLU -> 1x1 conv 8 -> 4 forward + residual", "SiLU -> 1x1 conv 8 -> 4 backward",
                  "CfC heads + gate forward", "CfC heads + gate backward"):
        assert title in text
    for module, names in before.items():
        for name in ("_FWD_TILE_H", "_WGRAD_ELEMENTS", "_BWD_TILE_CHANNELS_LAST", "_BLOCK_P", "_MAX_WGRAD_BLOCK",
                     "_MAX_BLOCK_N", "_WARPS", "_BWD_BLOCK_P", "_BWD_MAX_TILES", "_BWD_WARPS"):
            if name in names:
                assert getattr(module, name) == names[name]


def test_a_sweep_past_its_time_prints_every_table_and_what_it_left_out(capsys):
    assert tune_kernels.main(["--quick", "--max-seconds", "0"]) == 0
    text = capsys.readouterr().out
    assert text.count("### ") == 9 and "(baseline)" in text
    assert "{'" not in text  # no setting was timed
    assert "Stopped at --max-seconds 0: 9 settings not timed." in text
