import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data


def moving_square(F_=12, H=40, W=60):
    """uint8 frames whose square sits at x = 4 * f: the frame index is readable from pixels."""
    frames = np.zeros((F_, H, W, 3), np.uint8)
    for f in range(F_):
        frames[f, 10:20, 4 * f:4 * f + 6] = 255
    return frames


def test_frame_indices_hand_values():
    # 30 fps source, 5 frames at 10 fps from t = 0: every third source frame
    assert data.frame_indices(30, 30.0, 5, 10.0) == [0, 3, 6, 9, 12]
    assert data.frame_indices(30, 30.0, 3, 10.0, start=0.5) == [15, 18, 21]
    with pytest.raises(ValueError, match="too short"):
        data.frame_indices(10, 30.0, 5, 10.0)


def test_resize_center_crop_takes_centre():
    x = torch.zeros(1, 3, 40, 80)
    x[..., 16:64] = 1.0  # covers the centre 40 columns (20..60) and their resampling neighbours
    out = data.resize_center_crop(x, 20)
    assert out.shape == (1, 3, 20, 20) and out.min() > 0.99


def test_video_roundtrip_formats(tmp_path):
    video = torch.from_numpy(moving_square()).permute(3, 0, 1, 2).float() / 127.5 - 1  # [3, F, H, W]
    for suffix in (".gif", ".webp", ".mp4"):
        path = tmp_path / f"clip{suffix}"
        data.save_video(path, video, fps=10)
        frames, fps = data.read_frames(path)
        assert frames.shape[0] == 12 and abs(fps - 10) < 0.5, suffix
        # the square's x position survives the codec in every frame
        xs = [np.argmax(frames[f, 15, :, 0] > 128) for f in range(12)]
        assert all(abs(x - 4 * f) <= 1 for f, x in enumerate(xs)), (suffix, xs)


def test_manifest_dataset_reads_skips_and_maps_landmarks(tmp_path):
    frames = moving_square(F_=20)
    folder = tmp_path / "frames"
    folder.mkdir()
    for f, fr in enumerate(frames):
        Image.fromarray(fr).save(folder / f"{f:03d}.png")  # a folder of frames is read at 24 fps
    lm = np.zeros((20, 5, 2), np.float32)
    lm[:, :, 0] = np.arange(20)[:, None] * 4 + 3  # x in source pixels follows the square
    lm[:, :, 1] = 15
    np.savez(tmp_path / "faces.npz", landmarks=lm, present=np.ones(20, bool))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    lines = [{"video": "frames", "caption": "a square moves", "faces": "faces.npz"},
             {"video": "broken.mp4", "caption": "x"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    ds = data.ManifestDataset(tmp_path / "m.jsonl", frames=5, size=20, fps=12.0, train=False)
    batch = data.collate([ds[0], ds[1]])
    assert batch["skipped"] == 1 and "broken.mp4" in batch["errors"][0]
    assert batch["video"].shape == (1, 3, 5, 20, 20) and batch["prompt"] == ["a square moves"]
    # 12 fps from a 24 fps folder: source frames 0, 2, 4, 6, 8; resize 40 -> 20 is x / 2, crop offset (30 - 20) / 2 = 5
    expected_x = (np.array([0, 2, 4, 6, 8]) * 4 + 3) / 2 - 5
    torch.testing.assert_close(batch["landmarks"][0, :, 0, 0], torch.tensor(expected_x, dtype=torch.float32))


def test_in_clip_reference_is_a_frame_outside_the_sampled_ones(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for f in range(10):  # frame f is one flat grey 20 f: its index is readable from any pixel
        Image.fromarray(np.full((8, 8, 3), 20 * f, np.uint8)).save(folder / f"{f:03d}.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "frames", "caption": "x"}))
    for seed in range(20):  # 12 fps from 24: frames 0, 2, 4, 6, 8 sampled; the reference is one of 1, 3, 5, 7, 9
        ds = data.ManifestDataset(tmp_path / "m.jsonl", frames=5, size=8, fps=12.0, train=False, seed=seed)
        ref = round((ds[0]["ref"][0, 0, 0].item() + 1) * 127.5 / 20)
        assert ref in (1, 3, 5, 7, 9), (seed, ref)
    whole = data.ManifestDataset(tmp_path / "m.jsonl", frames=10, size=8, fps=24.0, train=False)
    assert "error" not in whole[0]  # every frame sampled: the reference is one of them


def test_manifest_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        data.ManifestDataset(tmp_path / "missing.jsonl", 5, 32)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"caption": "no video"}))
    with pytest.raises(ValueError, match="need"):
        data.ManifestDataset(tmp_path / "bad.jsonl", 5, 32)
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="list.jsonl:1: each line needs"):
        data.ManifestDataset(tmp_path / "list.jsonl", 5, 32)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--ref"):
        data.load_image(tmp_path / "nope.png", 32)
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        data.load_image(tmp_path / "junk.png", 32)


def test_augment_reference_transforms():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    y = data.augment_reference(x, g)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert (y - x).abs().mean() > 0.05  # it changes the image
    # with every augmentation off it is the identity (up to resampling at the same grid)
    z = data.augment_reference(x, g, flip_p=0.0, max_rot_deg=0.0, min_crop=1.0, jitter=0.0)
    torch.testing.assert_close(z, x, atol=1e-5, rtol=0)
    # flip only: exactly the mirrored image
    f = data.augment_reference(x, g, flip_p=1.0, max_rot_deg=0.0, min_crop=1.0, jitter=0.0)
    torch.testing.assert_close(f, x.flip(-1), atol=1e-5, rtol=0)
    # a rotation of at most 10 degrees moves a corner pixel by at most ~ 16 * sqrt(2) * sin(10 deg) + crop shift
    dot = torch.full((1, 3, 33, 33), -1.0)
    dot[..., 16, 28] = 1.0
    rot = data.augment_reference(dot.repeat(200, 1, 1, 1), g, flip_p=0.0, min_crop=1.0, jitter=0.0)
    ys, xs = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    w = (rot[:, 0] + 1).clamp_min(0)
    cx = (w * xs).sum((1, 2)) / w.sum((1, 2))
    cy = (w * ys).sum((1, 2)) / w.sum((1, 2))
    angle = torch.atan2(cy - 16, cx - 16).abs()
    assert angle.max() <= math.radians(10) + 0.02 and angle.max() > math.radians(5)


def _two_level_grey(n: int) -> torch.Tensor:
    """n grey images (all channels equal), left half 0.2, right half 0.6 in [0, 1] pixels, as [-1, 1]."""
    img = torch.full((n, 3, 4, 4), 0.2)
    img[..., 2:] = 0.6
    return img * 2 - 1


def test_augment_reference_contrast_jitter_hand_computed():
    """Geometry off, jitter 0.1, one grey image: saturation does nothing, brightness b multiplies,
    contrast c stretches about the mean grey level. Uniforms as documented: rand(1, 8), b from
    column 5, c from column 7. Left pixel: m + c (b 0.2 - m), m = b 0.4."""
    x = _two_level_grey(1)
    u = torch.rand(1, 8, generator=torch.Generator().manual_seed(11)).double()
    b, c = 1 + 0.1 * (2 * u[0, 5].item() - 1), 1 + 0.1 * (2 * u[0, 7].item() - 1)
    m = b * 0.4
    left, right = m + c * (b * 0.2 - m), m + c * (b * 0.6 - m)
    y = data.augment_reference(x, torch.Generator().manual_seed(11), flip_p=0.0, max_rot_deg=0.0, min_crop=1.0,
                               jitter=0.1)
    y01 = (y.double() + 1) / 2
    torch.testing.assert_close(y01[0, :, :, :2], torch.full((3, 4, 2), left, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(y01[0, :, :, 2:], torch.full((3, 4, 2), right, dtype=torch.float64), atol=1e-6, rtol=0)


def test_augment_reference_jitters_contrast_independently_of_brightness():
    """On a two-level grey image the spread (right - left) scales by b c and the mean by b, so
    c = (spread ratio) / (mean ratio) is read off the output: it must vary within [0.9, 1.1]."""
    x = _two_level_grey(400)
    y = (data.augment_reference(x, torch.Generator().manual_seed(0), flip_p=0.0, max_rot_deg=0.0, min_crop=1.0,
                                jitter=0.1).double() + 1) / 2
    spread = (y[..., 2:].mean((1, 2, 3)) - y[..., :2].mean((1, 2, 3))) / 0.4
    gain = y.mean((1, 2, 3)) / 0.4
    c = spread / gain
    assert c.min() >= 0.9 - 1e-5 and c.max() <= 1.1 + 1e-5
    assert c.min() < 0.93 and c.max() > 1.07  # spread over the range, not the old constant 1
    assert abs(torch.corrcoef(torch.stack([c, gain]))[0, 1].item()) < 0.2  # drawn independently
