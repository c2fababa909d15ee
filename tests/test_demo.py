import json

from lowbit.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "W8A8" in printed and "x smaller" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {(r[0], r[1], r[2]): r for r in report["rows"]}
    fp = rows[("fp32", 32, 32)][3]
    assert fp > 95.0                                          # the float CNN really learned digits
    assert abs(rows[("min-max", 8, 8)][3] - fp) <= 1.0        # W8A8 is nearly lossless
    assert rows[("lowbit-best", 2, 8)][3] > rows[("min-max", 2, 8)][3]   # the recipes matter at W2
    assert rows[("min-max", 4, 4)][5] < rows[("fp32", 32, 32)][5] / 5     # and the model shrank
    assert (tmp_path / "report.md").is_file()
