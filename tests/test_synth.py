"""The synthetic world: determinism, splits, shapes, references, action semantics, prompts, scenes."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from world import synth
from world.synth import ACTIONS, SCENES, TEMPLATES, SynthWorld, make_prompt, parse_prompt

SIZE, FRAMES = 32, 9
LEFT_EYE, RIGHT_EYE, NOSE, MOUTH_LEFT, MOUTH_RIGHT = (synth.LANDMARK_NAMES.index(k) for k in
                                                 ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right"))


def small_batch(seed=0, ref="cross", split="train", batch=4):
    return SynthWorld().sample(batch, split, frames=FRAMES, size=SIZE, ref=ref, seed=seed)


def act(name, n=4, frames=17, size=SIZE, seed=0, render=False):
    """Clips of ids 0..n-1 all acting out ACTIONS-entry `name` in random scenes."""
    scenes = torch.arange(n) % len(SCENES)
    actions = torch.full((n,), ACTIONS.index(name))
    if render:
        return synth.render_clips(torch.arange(n), actions, scenes, frames, size, seed=seed)
    g = torch.Generator().manual_seed(seed)  # landmarks only: no pixels needed
    state = synth._act(synth._static_state(n, g, wide=False), actions, frames, g)
    marks, boxes = synth.landmarks_and_boxes(synth.identity_params(torch.arange(n)), state, size)
    return {"landmarks": marks, "boxes": boxes, "state": state}


# ----------------------------------------------------------------------------- determinism, splits, shapes

def test_same_seed_same_batch_and_other_seed_differs():
    a, b, c = small_batch(seed=5), small_batch(seed=5), small_batch(seed=6)
    for k, v in a.items():
        if torch.is_tensor(v):
            assert torch.equal(v, b[k]), k
        else:
            assert v == b[k], k
    assert not torch.equal(a["video"], c["video"])


def test_generator_argument_advances_the_stream():
    g = torch.Generator().manual_seed(1)
    first = SynthWorld().sample(2, frames=3, size=16, generator=g)["video"]
    second = SynthWorld().sample(2, frames=3, size=16, generator=g)["video"]
    assert torch.equal(first, SynthWorld().sample(2, frames=3, size=16, seed=1)["video"])
    assert not torch.equal(first, second)


def test_train_and_test_identities_are_disjoint():
    world = SynthWorld(n_train_ids=500, n_test_ids=50)
    assert not set(world.ids("train")) & set(world.ids("test"))
    assert (small_batch(split="train", batch=16)["identity"] < synth.TEST_ID_START).all()
    test_ids = small_batch(split="test", batch=16)["identity"]
    assert ((test_ids >= synth.TEST_ID_START) & (test_ids < synth.TEST_ID_START + 1000)).all()
    with pytest.raises(ValueError):
        SynthWorld(n_train_ids=synth.TEST_ID_START + 1)


def test_shapes_dtypes_and_ranges():
    b = small_batch(batch=3)
    assert b["video"].shape == (3, 3, FRAMES, SIZE, SIZE) and b["video"].dtype == torch.float32
    assert b["ref"].shape == (3, 3, SIZE, SIZE)
    assert b["landmarks"].shape == (3, FRAMES, 5, 2) and b["boxes"].shape == (3, FRAMES, 4)
    assert b["ref_landmarks"].shape == (3, 5, 2)
    for k in ("identity", "action", "scene", "ref_scene", "ref_frame"):
        assert b[k].shape == (3,) and b[k].dtype == torch.long, k
    for k in ("video", "ref"):
        assert b[k].min() >= -1 and b[k].max() <= 1 and b[k].std() > 0.1, k
    assert [parse_prompt(p) for p in b["prompt"]] == list(zip(b["action"].tolist(), b["scene"].tolist()))
    boxes = b["boxes"]
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    start = b["landmarks"][:, 0]  # clips start near-frontal: ArcFace's left/right order holds
    assert (start[:, LEFT_EYE, 0] < start[:, RIGHT_EYE, 0]).all()
    assert (start[:, MOUTH_LEFT, 0] < start[:, MOUTH_RIGHT, 0]).all()
    assert (start[:, [LEFT_EYE, RIGHT_EYE], 1].amax(1) < start[:, NOSE, 1]).all()
    assert (start[:, NOSE, 1] < start[:, [MOUTH_LEFT, MOUTH_RIGHT], 1].amin(1)).all()


# ----------------------------------------------------------------------------- identities

GEOMETRY = ("face_w", "jaw", "chin", "eye_dx", "eye_y", "eye_w", "eye_h", "brow_angle", "nose_len", "mouth_w")


def test_identity_params_depend_only_on_the_id():
    a = synth.identity_params(torch.tensor([5, 7]))
    b = synth.identity_params(torch.tensor([9, 5]))
    for k in a:
        assert torch.equal(a[k][0], b[k][1]), k
    assert not torch.equal(a["face_w"][0], a["face_w"][1])


def test_identities_differ_in_geometry_and_in_pixels():
    p = synth.identity_params(torch.arange(40))
    geo = torch.stack([p[k] for k in GEOMETRY], 1)
    geo = (geo - geo.mean(0)) / geo.std(0)
    dist = torch.cdist(geo, geo) + torch.eye(40) * 1e9
    assert dist.min() > 0.5  # no two ids share a face shape
    assert len(set(p["hair_style"].tolist())) == len(synth.HAIR_STYLES)
    # same pose, light and background, two identities: the face pixels differ a lot
    g = torch.Generator().manual_seed(0)
    state = synth._still(synth._static_state(1, g, wide=False))
    state = {k: v.expand(2, *v.shape[1:]) for k, v in state.items()}
    bg = synth.render_backgrounds(torch.tensor([0, 0]), SIZE, torch.Generator().manual_seed(1)).expand(2, -1, -1, -1)
    video = synth.render(synth.identity_params(torch.tensor([3, 4])), state, bg.contiguous())
    assert (video[0] - video[1]).abs().mean() > 0.03


# ----------------------------------------------------------------------------- references

def test_in_clip_reference_is_exactly_a_frame_of_the_clip():
    b = small_batch(ref="in_clip")
    for i, f in enumerate(b["ref_frame"].tolist()):
        assert 0 <= f < FRAMES
        assert torch.equal(b["ref"][i], b["video"][i, :, f])
        assert torch.equal(b["ref_landmarks"][i], b["landmarks"][i, f])
    assert torch.equal(b["ref_scene"], b["scene"])


def test_moved_reference_is_the_in_clip_reference_shifted_by_its_recorded_offsets():
    """moved: the same clip and in-clip frame as in_clip (same seed), the image moved by ref_shift =
    (dx, dy) whole pixels, uncovered border filled by edge replication, landmarks + ref_shift; the
    offsets lie in [-MOVE_PX, MOVE_PX] and vary across the batch."""
    k, n = synth.MOVE_PX, 16
    a, m = small_batch(ref="in_clip", batch=n, seed=3), small_batch(ref="moved", batch=n, seed=3)
    assert torch.equal(m["video"], a["video"]) and torch.equal(m["ref_frame"], a["ref_frame"])
    shift = m["ref_shift"]
    assert shift.shape == (n, 2) and shift.dtype == torch.long
    assert shift.abs().max() <= k and (shift < 0).any() and (shift > 0).any()
    assert len({tuple(s) for s in shift.tolist()}) > n // 2 and shift.float().std(0).min() > 1
    torch.testing.assert_close(m["ref_landmarks"], a["ref_landmarks"] + shift[:, None].float(), atol=1e-4, rtol=0)
    ys, xs = torch.arange(SIZE)[:, None], torch.arange(SIZE)[None]
    for i, (dx, dy) in enumerate(shift.tolist()):
        src_y, src_x = (ys - dy).clamp(0, SIZE - 1), (xs - dx).clamp(0, SIZE - 1)
        assert torch.equal(m["ref"][i], a["ref"][i][:, src_y, src_x]), i
        if (dx, dy) != (0, 0):
            assert not torch.equal(m["ref"][i], a["ref"][i]), i


def test_cross_reference_is_another_shot_of_the_same_identity():
    b = small_batch(ref="cross", batch=16)
    assert (b["ref_frame"] == -1).all()
    assert (b["ref_scene"] != b["scene"]).all()
    frame_gap = (b["video"] - b["ref"][:, :, None]).abs().mean((1, 3, 4))  # [B, F]
    assert frame_gap.min() > 0.05
    pose_gap = (b["landmarks"] - b["ref_landmarks"][:, None]).norm(dim=-1).mean(-1)  # [B, F] pixels
    assert pose_gap.min() > 0.1


def test_portrait_reference_is_a_centred_shot_of_the_same_clip():
    """portrait: the clip is the one cross draws (same seed), the reference another scene; its face is
    centred: the eyes' midpoint within 2 px of the centre column (a mild yaw of at most 0.15 rad moves it
    less; cross references range up to 0.15 of the frame, 2.4 px, plus their wide yaw), and its spread in
    x and y over 64 portraits under half the cross ones'."""
    p, c = small_batch(ref="portrait", batch=64), small_batch(ref="cross", batch=64)
    assert torch.equal(p["video"], c["video"]) and torch.equal(p["identity"], c["identity"])
    assert (p["ref_scene"] != p["scene"]).all() and (p["ref_frame"] == -1).all()
    mid = lambda b: b["ref_landmarks"][:, [LEFT_EYE, RIGHT_EYE]].mean(1)  # [B, 2] pixels
    assert (mid(p)[:, 0] - SIZE / 2).abs().max() < 2
    assert (mid(p).std(0) < 0.5 * mid(c).std(0)).all()


# ----------------------------------------------------------------------------- actions

def test_moves_across_the_frame_goes_left_to_right():
    nose_x = act("moves across the frame")["landmarks"][:, :, NOSE, 0]
    assert (nose_x.diff(dim=1) > 0).all()
    assert (nose_x[:, -1] - nose_x[:, 0] > 0.4 * SIZE).all()


@pytest.mark.parametrize("name, sign", [("turns to the left", -1), ("turns to the right", 1)])
def test_turns_move_the_nose_past_the_eyes(name, sign):
    m = act(name)["landmarks"]
    offset = m[:, :, NOSE, 0] - m[:, :, [LEFT_EYE, RIGHT_EYE], 0].mean(-1)  # nose right of the eyes' midpoint
    assert (sign * offset.diff(dim=1) >= -1e-4).all()
    assert (sign * offset[:, -1] > 0.05 * SIZE).all()
    assert (sign * (offset[:, -1] - offset[:, 0]) > 0.05 * SIZE).all()
    far_eye = m[:, :, RIGHT_EYE if sign < 0 else LEFT_EYE, 0]
    near_eye = m[:, :, LEFT_EYE if sign < 0 else RIGHT_EYE, 0]
    spread = (far_eye - near_eye).abs()
    assert (spread[:, -1] < spread[:, 0]).all()  # the eyes crowd together as the head turns


def test_nods_make_the_nose_bob():
    nose_y = act("nods")["landmarks"][:, :, NOSE, 1]
    direction_changes = (nose_y.diff(dim=1).sign().diff(dim=1) != 0).sum(1)
    assert (direction_changes >= 3).all()  # two nods: down-up-down-up
    assert (nose_y.amax(1) - nose_y.amin(1) > 0.06 * SIZE).all()
    for name in ("talks", "blinks", "moves across the frame"):
        still_y = act(name)["landmarks"][:, :, NOSE, 1]
        assert (still_y.amax(1) - still_y.amin(1) < 1e-3).all(), name


def test_approaches_the_camera_grows_the_face():
    boxes = act("approaches the camera")["boxes"]
    width = boxes[..., 2] - boxes[..., 0]
    assert (width.diff(dim=1) > 0).all() and (width[:, -1] / width[:, 0] > 1.6).all()


def test_smiles_lift_the_mouth_corners():
    m = act("smiles")["landmarks"]
    lift = m[:, :, NOSE, 1] - m[:, :, [MOUTH_LEFT, MOUTH_RIGHT], 1].mean(-1)  # corners up -> lift grows
    assert (lift[:, -1] - lift[:, 0] > 0.01 * SIZE).all()


def test_eye_landmarks_sit_on_the_rendered_eyes():
    """Closing the eyes changes pixels centred on the eye landmarks (face off-centre and rolled)."""
    n, size = 3, 48
    g = torch.Generator().manual_seed(0)
    state = synth._still(synth._static_state(n, g, wide=False))
    state.update(cx=torch.full((n, 1), 0.25), roll=torch.full((n, 1), 0.2), blink=torch.zeros(n, 1))
    p = synth.identity_params(torch.arange(1, n + 1))
    bg = synth.render_backgrounds(torch.zeros(n, dtype=torch.long), size, g)
    change = (synth.render(p, state, bg) - synth.render(p, {**state, "blink": torch.ones(n, 1)}, bg)).abs().sum(1)[:, 0]
    eyes = synth.landmarks_and_boxes(p, state, size)[0][:, 0, :2]  # [B, 2 eyes, xy]
    assert (eyes[:, LEFT_EYE, 0] < eyes[:, RIGHT_EYE, 0]).all()
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    for b in range(n):
        mid_x = eyes[b, :, 0].mean()
        for k, half in ((LEFT_EYE, xs < mid_x), (RIGHT_EYE, xs >= mid_x)):
            w = change[b] * half
            centroid = torch.stack([(w * xs).sum(), (w * ys).sum()]) / w.sum()
            assert (centroid - eyes[b, k]).norm() < 1.0, (b, k, centroid, eyes[b, k])


@pytest.mark.parametrize("name, near, far", [("talks", (MOUTH_LEFT, MOUTH_RIGHT), (LEFT_EYE, RIGHT_EYE)),
                                             ("blinks", (LEFT_EYE, RIGHT_EYE), (MOUTH_LEFT, MOUTH_RIGHT))])
def test_expression_changes_pixels_at_the_right_landmarks(name, near, far):
    """The pixels that change over a talking (blinking) clip sit at the mouth (eyes): checks both
    the action and that the landmarks lie on the rendered features."""
    clip = act(name, size=48, render=True)
    change = (clip["video"] - clip["video"][:, :, :1]).abs().sum((1, 2))  # [B, S, S]
    ys = torch.arange(48).float()
    centroid_y = (change.sum(2) * ys).sum(1) / change.sum((1, 2))
    first = clip["landmarks"][:, 0]
    near_y, far_y = first[:, list(near), 1].mean(1), first[:, list(far), 1].mean(1)
    assert ((centroid_y - near_y).abs() < 2.5).all()
    assert ((centroid_y - near_y).abs() < (centroid_y - far_y).abs()).all()


# ----------------------------------------------------------------------------- prompts

@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(ACTIONS) - 1), st.integers(0, len(SCENES) - 1), st.integers(0, len(TEMPLATES) - 1))
def test_parse_inverts_make_prompt(action, scene, template):
    assert parse_prompt(make_prompt(action, scene, template)) == (action, scene)


def test_parse_unknown_or_ambiguous_is_minus_one():
    assert parse_prompt("a cat sleeps on a sofa") == (-1, -1)
    assert parse_prompt("a person nods and smiles on the beach") == (-1, SCENES.index("beach"))
    assert parse_prompt("A Person Nods In The Forest") == (ACTIONS.index("nods"), SCENES.index("forest"))
    assert parse_prompt("someone talks in the snow at night") == (ACTIONS.index("talks"), -1)


# ----------------------------------------------------------------------------- scenes, devices, faces

def test_scenes_have_distinct_colours_and_varied_layouts():
    n = 6
    scenes = torch.arange(len(SCENES)).repeat_interleave(n)
    bg = synth.render_backgrounds(scenes, SIZE, torch.Generator().manual_seed(0))
    means = bg.mean((2, 3)).view(len(SCENES), n, 3).mean(1)
    dist = torch.cdist(means, means) + torch.eye(len(SCENES))
    assert dist.min() > 0.08
    per_scene = bg.view(len(SCENES), n, 3, SIZE, SIZE)
    assert ((per_scene[:, 0] - per_scene[:, 1]).abs().mean((1, 2, 3)) > 0.01).all()  # layouts vary


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_renders_on_the_requested_device(device):
    b = SynthWorld().sample(2, frames=3, size=16, seed=0, device=device)
    for k, v in b.items():
        if torch.is_tensor(v):
            assert v.device.type == device, k
    cpu = SynthWorld().sample(2, frames=3, size=16, seed=0)
    assert (b["video"].cpu() - cpu["video"]).abs().max() < 1e-3  # the seed fixes the world on any device


def test_sample_faces_orders_rows_by_id_and_varies_nuisance():
    faces = synth.sample_faces([11, 12], n_per_id=3, size=SIZE, seed=0)
    assert faces["image"].shape == (6, 3, SIZE, SIZE) and faces["landmarks"].shape == (6, 5, 2)
    assert faces["identity"].tolist() == [11, 11, 11, 12, 12, 12]
    assert (faces["image"][0] - faces["image"][1]).abs().mean() > 0.05
    inside = (faces["landmarks"] >= -2) & (faces["landmarks"] <= SIZE + 1)
    assert inside.all()


# ----------------------------------------------------------------------------- framing

def _eye_distance(marks):
    return (marks[..., 0, :] - marks[..., 1, :]).norm(dim=-1)


def test_closeup_is_the_same_clip_zoomed_and_pulled_to_the_centre():
    """Same seed, same draws: a close-up clip is the wide clip with every face length times 1.35
    and the face centre moved to (0.6 cx, -0.06 + 0.6 (cy + 0.035)) (normalised coordinates);
    for a clip whose scale is constant (nods) that is exact in pixels."""
    size, ids = 32, [3, 4, 5]
    nods = [ACTIONS.index("nods")] * 3
    wide = synth.render_clips(ids, nods, [0, 1, 2], frames=5, size=size, seed=7)
    close = synth.render_clips(ids, nods, [0, 1, 2], frames=5, size=size, seed=7, framing="closeup")
    ratio = _eye_distance(close["landmarks"]) / _eye_distance(wide["landmarks"])
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.35), rtol=1e-4, atol=0)
    # landmark -> normalised coordinate -> offset from the face centre scales by 1.35 about the new centre
    norm = lambda m: (m + 0.5) / size * 2 - 1  # noqa: E731
    cx, cy = wide["state"]["cx"][..., None], wide["state"]["cy"][..., None]
    pred_x = 0.6 * cx + 1.35 * (norm(wide["landmarks"][..., 0]) - cx)
    pred_y = -0.06 + 0.6 * (cy + 0.035) + 1.35 * (norm(wide["landmarks"][..., 1]) - cy)
    torch.testing.assert_close(norm(close["landmarks"][..., 0]), pred_x, rtol=0, atol=1e-4)
    torch.testing.assert_close(norm(close["landmarks"][..., 1]), pred_y, rtol=0, atol=1e-4)


def test_closeup_approach_grows_by_the_wide_growth_to_the_power_0_7():
    a = [ACTIONS.index("approaches the camera")] * 4
    wide = synth.render_clips([1, 2, 3, 4], a, [0, 1, 2, 3], frames=9, size=64, seed=3)
    close = synth.render_clips([1, 2, 3, 4], a, [0, 1, 2, 3], frames=9, size=64, seed=3, framing="closeup")
    g_wide = _eye_distance(wide["landmarks"][:, -1]) / _eye_distance(wide["landmarks"][:, 0])
    g_close = _eye_distance(close["landmarks"][:, -1]) / _eye_distance(close["landmarks"][:, 0])
    torch.testing.assert_close(g_close, g_wide ** 0.7, rtol=1e-4, atol=0)
    assert (g_close > 1.3).all()  # still a clear approach: 0.7 -> 1.35 of the start size becomes 0.78 -> 1.23


def test_closeup_keeps_every_action_in_view_and_faces_large():
    b = SynthWorld(framing="closeup").sample(64, "test", frames=9, size=32, seed=1)
    for marks in (b["landmarks"].flatten(1, 2), b["ref_landmarks"]):
        assert ((marks > -0.5) & (marks < 31.5)).all()
    wide = SynthWorld().sample(64, "test", frames=9, size=32, seed=1)
    assert _eye_distance(b["landmarks"]).mean() > 1.3 * _eye_distance(wide["landmarks"]).mean()


def test_wide_framing_is_the_default_world_and_unknown_framing_is_refused():
    a = SynthWorld().sample(3, "train", frames=5, size=32, seed=2)
    b = SynthWorld(framing="wide").sample(3, "train", frames=5, size=32, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in ("video", "ref", "landmarks"))
    with pytest.raises(ValueError):
        SynthWorld(framing="far")
