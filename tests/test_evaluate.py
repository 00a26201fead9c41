"""evaluate.py: every metric of the synthetic world validated with the bundled judges.

Ground-truth clips of held-out identities score high; a reference of another identity gives
chance FaceSim; random prompts give chance prompt alignment; in-clip references leak more
pose and scene (copy-paste) than cross-clip ones; a still video has no dynamics; frames
without a face are skipped and counted. Plus the command line on a tiny random checkpoint.
"""
from world import face_nets
from world import judges as world_judges
import pipeline
import json

import numpy as np
import pytest
import torch
from PIL import Image

from infra import checkpoint
import data
import evaluate
from world.synth import ACTIONS, SCENES, TEST_ID_START, SynthWorld, make_prompt, render_backgrounds

N = 24


@pytest.fixture(scope="module")
def judges():
    return evaluate.load_judges()


@pytest.fixture(scope="module")
def clips():
    return SynthWorld().sample(N, "test", 9, 32, "cross", seed=3)


@pytest.fixture(scope="module")
def real(judges, clips):
    return evaluate.evaluate_videos(judges, clips["video"], clips["ref"], clips["prompt"], clips["identity"])


def mean(x):
    return torch.nanmean(x.float()).item()


def test_real_clips_score_high(real):
    assert mean(real["face_frames"]) > 0.95 and real["skipped_frames"].sum() <= 0.05 * N * 9
    assert mean(real["face_sim"]) > 0.6 and mean(real["temporal_id"]) > 0.8 and mean(real["id_top1"]) > 0.8
    assert mean(real["scene_acc"]) >= 0.9 and mean(real["action_acc"]) >= 0.75
    assert mean(real["smoothness"]) > 0.95 and mean(real["dynamic"]) > 0.002
    assert mean(real["copy_scene"]) < 0.1  # cross-clip references are from another scene


def test_reference_of_another_identity_gives_chance_face_sim(judges, clips, real):
    other = clips["ref"].roll(1, 0)
    assert (clips["identity"].roll(1, 0) != clips["identity"]).all()
    wrong = evaluate.evaluate_videos(judges, clips["video"], other, clips["prompt"], clips["identity"])
    chance = face_nets.verification(judges.embedder, range(TEST_ID_START, TEST_ID_START + 60), 2, 32, seed=5,
                                detector=judges.detector)["impostor_mean_cos"]
    assert abs(mean(wrong["face_sim"]) - chance) < 0.15
    assert mean(real["face_sim"]) > mean(wrong["face_sim"]) + 0.4
    torch.testing.assert_close(wrong["temporal_id"], real["temporal_id"])  # the reference plays no part
    # Reference j now shows identity j-1 but carries j's label: each video's nearest reference is
    # labelled with another identity, so identification falls from near 1 to near 0.
    assert mean(wrong["id_top1"]) < 0.2


def test_top1_identification_hand_values():
    e_ref = torch.eye(3)  # three references, orthogonal faces
    e_bar = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.0, 0.1, 0.9]])
    e_bar = e_bar / e_bar.norm(dim=1, keepdim=True)
    ids = torch.tensor([7, 8, 9])
    present = torch.ones(3, dtype=torch.bool)
    # video 0 -> ref 0 (right), video 1 -> ref 2 (wrong), video 2 -> ref 2 (right)
    assert evaluate.top1_identification(e_bar, e_ref, present, ids).tolist() == [1.0, 0.0, 1.0]
    # two references of one identity: either one counts; a missing reference is never chosen
    assert evaluate.top1_identification(e_bar, e_ref, present, torch.tensor([7, 8, 8])).tolist() == [1.0, 1.0, 1.0]
    absent = torch.tensor([True, True, False])
    assert evaluate.top1_identification(e_bar, e_ref, absent, ids).tolist() == [1.0, 1.0, 0.0]


def test_random_prompts_give_chance_prompt_alignment(judges, clips):
    g = torch.Generator().manual_seed(0)
    prompts = [make_prompt(int(a), int(s)) for a, s in zip(torch.randint(len(ACTIONS), (N,), generator=g),
                                                           torch.randint(len(SCENES), (N,), generator=g))]
    wrong = evaluate.evaluate_videos(judges, clips["video"], clips["ref"], prompts)
    assert mean(wrong["scene_acc"]) < 0.35 and mean(wrong["action_acc"]) < 0.35  # chance: 1/7, 1/8
    unparsable = evaluate.evaluate_videos(judges, clips["video"][:2], clips["ref"][:2], ["a person", "a person"])
    assert unparsable["scene_acc"].isnan().all() and unparsable["action_acc"].isnan().all()


def test_in_clip_references_copy_more_than_cross_clip_ones(judges, clips, real):
    in_clip = SynthWorld().sample(N, "test", 9, 32, "in_clip", seed=3)  # same seed: the same clips
    torch.testing.assert_close(in_clip["video"], clips["video"])
    leak = evaluate.evaluate_videos(judges, in_clip["video"], in_clip["ref"], in_clip["prompt"])
    assert mean(leak["copy_pose"]) > mean(real["copy_pose"]) + 0.2
    assert mean(leak["copy_scene"]) > 0.9 > 0.1 > mean(real["copy_scene"])
    assert mean(leak["copy_paste"]) > mean(real["copy_paste"]) + 0.4


def test_still_and_shuffled_videos(judges, clips, real):
    still = clips["video"][:, :, :1].expand_as(clips["video"]).contiguous()
    frozen = evaluate.evaluate_videos(judges, still, clips["ref"], clips["prompt"])
    assert frozen["dynamic"].abs().max() == 0 and frozen["smoothness"].min() == 1
    assert mean(frozen["motion"]) < 0.02 < mean(real["motion"])
    shuffled = clips["video"][:, :, torch.randperm(9, generator=torch.Generator().manual_seed(0))]
    assert mean(evaluate.smoothness(shuffled)) < mean(real["smoothness"])
    torch.testing.assert_close(evaluate.dynamic_degree(clips["video"][:, :, [0, 1]]),
                               (clips["video"][:, :, 1] - clips["video"][:, :, 0]).abs().flatten(1).mean(1) / 2)


def test_frames_without_a_face_are_skipped_and_counted(judges, clips, real):
    video = clips["video"][:4].clone()
    empty = render_backgrounds(torch.arange(4) % len(SCENES), 32, torch.Generator().manual_seed(0)) * 2 - 1
    video[:, :, 1::2] = empty[:, :, None]  # frames 1, 3, 5, 7: no face
    out = evaluate.evaluate_videos(judges, video, clips["ref"][:4], clips["prompt"][:4])
    assert out["face_frames"].tolist() == pytest.approx([5 / 9] * 4, abs=0.12)
    assert out["skipped_frames"].sum() == pytest.approx(16, abs=4)
    assert mean(out["face_sim"]) > mean(real["face_sim"][:4]) - 0.1  # the faces left still match
    nothing = evaluate.evaluate_videos(judges, empty[:, :, None].expand(4, 3, 9, 32, 32), clips["ref"][:4],
                                       clips["prompt"][:4])
    assert nothing["face_sim"].isnan().all() and nothing["face_frames"].max() < 0.2
    summary = evaluate.summarise(nothing)
    assert summary["videos_with_face_sim"] == 0 and summary["skipped_frames"] >= 30


def test_copy_pose_and_face_size_hand_values():
    ref = torch.tensor([[[0.4, 0.4], [0.6, 0.4], [0.5, 0.5], [0.45, 0.6], [0.55, 0.6]]])
    assert evaluate.face_size(ref).item() == pytest.approx(0.2)
    frames = torch.stack([ref[0], ref[0] + 0.05])[None]  # the reference itself, then shifted 1/4 face
    got = evaluate.copy_pose(frames, torch.ones(1, 2, dtype=torch.bool), ref, torch.ones(1, dtype=torch.bool))
    shift = 0.05 * 2**0.5 / 0.2
    assert got.item() == pytest.approx((1 + torch.exp(torch.tensor(-shift / evaluate.POSE_SCALE)).item()) / 2)


def test_markdown_table_marks_missing_values():
    table = evaluate.markdown_table({"a": {"face_sim": 0.5, "scene_acc": float("nan")}})
    header, rule, row = table.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == len(evaluate.TABLE) + 2
    assert "| a | 0.500 | n/a |" in row


def test_benchmark_command_on_a_tiny_random_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "ckpt", pipeline.build_pipeline("tiny"))
    out = tmp_path / "bench"
    args = ["--benchmark", "--ckpt", str(tmp_path / "ckpt"), "--n", "2", "--steps", "2", "--out", str(out),
            "--sheet", str(tmp_path / "sheet.png")]
    assert evaluate.main(args) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert list(rows) == ["real videos", "real videos through the VAE", "ST-DRC (ckpt)"] and rows["real videos"]["videos"] == 2
    assert rows["real videos"]["face_sim"] > 0.5
    assert rows["real videos through the VAE"]["face_frames"] < 1  # an untrained VAE's output holds no detectable face
    assert "| real videos |" in capsys.readouterr().out and out.with_suffix(".md").is_file()
    # The sheet: generated / real rows for both clips, each 14 px of caption + 2x-scaled 32 px frames;
    # the second row's cells are the test set's real clip, rendered here independently.
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))
    assert sheet.shape == (4 * (14 + 64), 10 * 64, 3)
    real = SynthWorld().sample(2, "test", 9, 32, "cross", seed=0)["video"][0]
    cell = sheet[78 + 14: 78 + 14 + 64, 64 * 5: 64 * 6: 2][::2]  # frame 4 of the real clip, 1x
    assert np.abs(cell.astype(int) - data.to_uint8(real[:, 4]).astype(int)).max() <= 1
    # --ref-source in_clip: the reference column is the clip's own frame ref_frame (rendered here independently)
    assert evaluate.main(args + ["--ref-source", "in_clip"]) == 0
    clips = SynthWorld().sample(2, "test", 9, 32, "in_clip", seed=0)
    ref_cell = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))[14: 14 + 64: 2, 0: 64: 2]
    own_frame = clips["video"][0][:, clips["ref_frame"][0]]
    assert np.abs(ref_cell.astype(int) - data.to_uint8(own_frame).astype(int)).max() <= 1


def test_videos_command(tmp_path, clips, capsys):
    data.save_video(tmp_path / "a.webp", clips["video"][0], fps=8)  # lossless
    Image.fromarray(data.to_uint8(clips["ref"][0])).save(tmp_path / "ref.png")
    args = ["--videos", str(tmp_path / "a.webp"), "--refs", str(tmp_path / "ref.png"), "--prompts", clips["prompt"][0],
            "--out", str(tmp_path / "eval")]
    assert evaluate.main(args) == 0
    row = json.loads((tmp_path / "eval.json").read_text())["videos"]
    assert row["videos"] == 1 and row["face_sim"] > 0.5 and row["scene_acc"] == 1.0
    assert evaluate.main(["--videos", str(tmp_path / "a.webp"), "--refs", "x.png", "y.png", "--prompts", "p"]) == 2
    assert "one reference" in capsys.readouterr().err


def test_world_classifier_training_end_to_end(tmp_path):
    cfg = world_judges.WorldTrainConfig(out=str(tmp_path / "wm"), steps=2, clips=2, test_clips=2)
    metrics = world_judges.train_world_models(cfg)
    assert {"scene_acc_9f", "action_acc_17f"} <= set(metrics)
    scenes, actions = world_judges.load_world_models(cfg.out)
    assert scenes(torch.zeros(1, 3, 32, 32)).shape == (1, len(SCENES))
    with pytest.raises(FileNotFoundError, match="python -m world.judges --out"):
        world_judges.load_world_models(tmp_path / "none")


def test_reconstruction_psnr_hand_value(tmp_path):
    class Shifted:  # decode(encode(x)) = x + 0.1 everywhere: MSE 0.01, L1 0.1
        def encode(self, x):
            return x

        def decode(self, z):
            return z + 0.1

    r = evaluate.reconstruction(Shifted(), n=5, batch=2, sheet=str(tmp_path / "recon.png"), sheet_rows=2)
    assert set(r) == {"psnr_video", "l1_video", "psnr_image", "l1_image"}
    for kind in ("video", "image"):
        assert r[f"psnr_{kind}"] == pytest.approx(10 * np.log10(4 / 0.01), abs=1e-4)  # 26.02 dB
        assert r[f"l1_{kind}"] == pytest.approx(0.1, abs=1e-6)
    # the sheet: clip / reconstruction for the first 2 clips; row 2 is clip 0 shifted by 0.1 (12.75 levels of 255)
    sheet = np.asarray(Image.open(tmp_path / "recon.png").convert("RGB")).astype(int)
    assert sheet.shape == (4 * (14 + 64), 10 * 64, 3)
    clip = SynthWorld().sample(2, "test", 9, 32, "cross", seed=0)["video"][0]
    cell = sheet[78 + 14: 78 + 14 + 64, 64 * 5: 64 * 6: 2][::2]  # frame 4 of the reconstruction, 1x
    assert np.abs(cell - data.to_uint8((clip[:, 4] + 0.1).clamp(-1, 1)).astype(int)).max() <= 1


def test_bootstrap_ci_hand_checkable_cases():
    # constant values: every resample has the same mean
    assert evaluate.bootstrap_ci(torch.full((10,), 0.25)) == pytest.approx((0.25, 0.25))
    # {0, 1}: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles are 0 and 1 (NaNs are left out first)
    assert evaluate.bootstrap_ci(torch.tensor([0.0, float("nan"), 1.0])) == pytest.approx((0.0, 1.0))
    assert evaluate.bootstrap_ci(torch.tensor([float("nan")])) is None
    # 400 Bernoulli outcomes, 120 ones: the normal approximation 0.3 +- 1.96 sqrt(0.3 0.7 / 400)
    v = torch.zeros(400)
    v[:120] = 1
    lo, hi = evaluate.bootstrap_ci(v)
    half = 1.96 * (0.3 * 0.7 / 400) ** 0.5
    assert lo == pytest.approx(0.3 - half, abs=0.006) and hi == pytest.approx(0.3 + half, abs=0.006)


def test_summarise_and_table_carry_the_interval():
    per_video = {"face_sim": torch.tensor([0.5, 0.5, 0.5]), "id_top1": torch.tensor([0.0, 1.0, float("nan")]),
                 "skipped_frames": torch.zeros(3)}
    summary = evaluate.summarise(per_video)
    assert summary["face_sim_ci"] == pytest.approx([0.5, 0.5]) and summary["id_top1_ci"] == pytest.approx([0.0, 1.0])
    row = evaluate.markdown_table({"m": summary}).splitlines()[2]
    assert "| m | 0.500 [0.500, 0.500] | 0.500 [0.000, 1.000] |" in row
