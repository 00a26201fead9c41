"""experiments/ablation.py --quick: the whole ablation pipeline end to end on the tiny preset (CI)."""
import json

from experiments import ablation


def test_slug():
    assert ablation.slug("2 + concat, shared (T,i,j)") == "2-concat-shared-t-i-j"


def test_quick_ablation_trains_every_row_and_writes_the_table(tmp_path):
    assert ablation.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "ablation.md").read_text()
    for name in ["real videos", *ablation.ROWS, "shared", "tass", "far"]:
        assert f"| {name} |" in table
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert set(result["rows"]) == {"real videos", *ablation.ROWS} and set(result["probe"]) == set(ablation.PROBE)
    assert result["rows"]["real videos"]["face_sim_ci"] is not None  # intervals are carried
    configs = {d: json.loads((tmp_path / d / "step_000002" / "config.json").read_text())
               for d in ("2-concat-shared-t-i-j", "3-tass-rope", "probe-far")}
    placements = [json.dumps(c) for c in configs.values()]
    for text, mode in zip(placements, ("shared", "tass", "far")):
        assert f'"ref_mode": "{mode}"' in text  # each row trained with its own reference placement
    # a rerun trains nothing again (every final checkpoint exists) and rewrites the same rows
    assert ablation.main(["--quick", "--out", str(tmp_path)]) == 0
