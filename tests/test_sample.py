"""sample.py on a tiny checkpoint: writes a video and a sheet; clear errors."""
import numpy as np
import pytest
from PIL import Image

import data
import sample
import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    common = ["--config", "tiny", "--batch", "2", "--steps", "1", "--no-progress"]
    train.train(train.parse_args(common + ["--stage", "vae", "--out", str(root / "vae")]))
    train.train(train.parse_args(common + ["--stage", "dit", "--init", str(root / "vae"), "--out", str(root / "dit")]))
    return root / "dit"


def test_sample_writes_video_and_sheet(ckpt, tmp_path):
    ref = tmp_path / "face.png"
    Image.fromarray(np.full((48, 40, 3), 200, np.uint8)).save(ref)
    out = tmp_path / "v.gif"
    assert sample.main(["--ckpt", str(ckpt), "--ref", str(ref), "--steps", "2", "--out", str(out)]) == 0
    frames, _ = data.read_frames(out)
    assert frames.shape == (9, 32, 32, 3)
    sheet = Image.open(tmp_path / "v_sheet.png")
    assert sheet.width >= 32 * 10  # reference + 9 frames


def test_sample_errors(ckpt, tmp_path, capsys):
    assert sample.main(["--ckpt", str(ckpt), "--ref", str(tmp_path / "missing.png"), "--out", str(tmp_path / "a.gif")]) == 2
    assert "reference image not found" in capsys.readouterr().err
    assert sample.main(["--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "a.gif")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_checkpoint_of_mismatched_weights_is_a_clear_error(ckpt, tmp_path):
    from infra import checkpoint
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint.resolve(ckpt), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["dit"]["dim"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not fit the dit module"):
        checkpoint.load(bad)
