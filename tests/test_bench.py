"""bench.py's quick mode: the benchmark itself runs and prints its table (its figures are not checked)."""
import os

from biounet.model import backend
from conftest import run_script


def test_the_quick_benchmark_prints_a_row_per_mode_the_limit_and_the_figures_per_row(tmp_path):
    out = run_script("benchmarks/bench.py", "--quick", "--backends", backend.NAME, cwd=tmp_path).stdout
    assert out.startswith("limit: float32 matrix product on ")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 64 |")]
    cores = len(os.sched_getaffinity(0))
    expected = [1, cores] if backend.NAME == "oneflow" and cores > 1 else [1]
    assert [row[2] for row in rows] == ["eager"] * len(expected)
    assert [int(row[3]) for row in rows] == expected
    for row in rows:
        train, predict, memory, gflop = (float(cell) for cell in row[4:8])
        assert train > 0 and predict > 0 and memory > 50
        assert gflop == float(f"{forward_gflop_of_base_4_at_64px():.3g}")


def forward_gflop_of_base_4_at_64px():
    """The convolutions of the base-4 U-Net on 64x64, counted by hand: 2 x k x k x in x out x output pixels."""
    c, total, side = [4, 8, 16, 32, 64], 0, 64
    down = [(1, c[0])] + [(c[i], c[i + 1]) for i in range(4)]
    for level, (cin, cout) in enumerate(down):  # two 3x3 convs per level
        pixels = (side >> level) ** 2
        total += 2 * 9 * (cin * cout + cout * cout) * pixels
    for level in range(4, 0, -1):  # transposed 2x2 conv (halving channels), then two 3x3 convs
        pixels_in, pixels_out = (side >> level) ** 2, (side >> (level - 1)) ** 2
        total += 2 * 4 * c[level] * (c[level] // 2) * pixels_in
        total += 2 * 9 * (c[level] * c[level - 1] + c[level - 1] * c[level - 1]) * pixels_out
    total += 2 * c[0] * 1 * side * side  # the 1x1 output conv
    return total / 1e9
