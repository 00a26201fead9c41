"""Bad input and faults (issue 19), run in-process through each entry point's main(argv): one table of bad
inputs, each ending in a non-zero exit and one line on stderr that says what is wrong, no traceback, and no
file of a run folder lost or rewound; then the faults that must be survived: a checkpoint that does not
load (resume falls back past it), an interrupted save's leftovers, a pickled object in state.pt."""
import hashlib
import json
import os
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import sample
import train
from infra import checkpoint

TRAIN = ["--config", "tiny", "--batch", "2", "--no-progress", "--log-every", "1", "--warmup", "1", "--workers", "0"]


def cli(main, argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder`, hidden ones too -> its content's hash."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny VAE run, a dit run with checkpoints at steps 1 and 2, damaged copies, manifests, a photo."""
    root = tmp_path_factory.mktemp("errors")
    assert train.main(TRAIN + ["--stage", "vae", "--steps", "1", "--out", str(root / "vae")]) == 0
    assert train.main(TRAIN + ["--stage", "dit", "--init", str(root / "vae"), "--steps", "2", "--save-every", "1",
                               "--out", str(root / "run")]) == 0
    latest = checkpoint.resolve(root / "run")
    weights = (latest / "model.safetensors").read_bytes()
    for name, content in (("random", os.urandom(len(weights))), ("truncated", weights[: len(weights) // 2])):
        shutil.copytree(latest, root / name)
        (root / name / "model.safetensors").write_bytes(content)
    (root / "notjson.jsonl").write_text(json.dumps({"video": "a.gif", "caption": "x"}) + "\n{video: b.gif}\n")
    (root / "empty.jsonl").write_text("\n")
    (root / "missing_clips.jsonl").write_text("".join(json.dumps({"video": f"gone_{k}.mp4", "caption": "a person nods"})
                                                      + "\n" for k in range(3)))
    Image.fromarray(np.full((150, 200, 3), 120, np.uint8)).save(root / "photo.jpg")
    (root / "broken.mp4").write_bytes(os.urandom(3000))
    (root / "no_videos").mkdir()
    return root


def case(main, argv, expected, folder=None):
    return pytest.param(main, argv, expected, folder, id=" ".join(argv)[:60])


# argv entries with "{root}" are formatted with the module's world folder; `folder`: a run folder that must not change
CASES = [
    case(sample.main, ["--s-text", "nan"], "--s-text nan: must be a finite number"),
    case(sample.main, ["--s-ref", "inf"], "--s-ref inf: must be a finite number"),
    case(sample.main, ["--steps", "0"], "--steps 0: must be from 1 to 10000"),
    case(sample.main, ["--steps", "-5"], "--steps -5: must be from 1 to 10000"),
    case(sample.main, ["--steps", "100000000000"], "--steps 100000000000: must be from 1 to 10000"),
    case(sample.main, ["--steps", "many"], "argument --steps: invalid int value"),
    case(sample.main, ["--seed", "-1"], "--seed -1: must be from 0"),
    case(sample.main, ["--out", "{root}/x.xyz"], "--out {root}/x.xyz: the file type must be one of"),
    case(sample.main, ["--sheet", "{root}/sheet.txt"], "--sheet {root}/sheet.txt: the file type must be one of"),
    case(sample.main, ["--ckpt", "{root}/random"], "model.safetensors is not a readable safetensors file"),
    case(sample.main, ["--ckpt", "{root}/truncated"], "model.safetensors is not a readable safetensors file"),
    case(sample.main, ["--ckpt", "{root}/nothing"], "no checkpoint at"),
    case(sample.main, ["--ref", "{root}/none.png"], "reference image not found"),
    case(sample.main, ["--ref", "{root}/empty.jsonl"], "cannot read"),
    case(sample.main, ["--device", "cuda"], "--device cuda: this torch build or machine has no CUDA GPU"),
    case(sample.main, ["--device", "gpu0"], "--device gpu0: not a device name"),
    case(sample.main, ["--attn", "triton"], "--attn triton runs the fused kernel on a CUDA GPU"),
    case(sample.main, ["--attn", "flash"], "argument --attn: invalid choice"),
    case(sample.main, ["--out", "{root}/empty.jsonl/x.gif"], "--out {root}/empty.jsonl/x.gif: cannot make its folder"),
    case(sample.main, ["--prompt-embeds", "{root}/random/model.safetensors"], "is not a readable safetensors file"),
    case(sample.main, ["--frames", "8"], "needs 1 + 4k frames (1, 5, 9, 13, 17, ...); got 8 frames"),
    case(evaluate.main, ["--benchmark", "--n", "0"], "--n 0: must be at least 1"),
    case(evaluate.main, ["--benchmark", "--steps", "0"], "--steps 0: must be from 1 to 10000"),
    case(evaluate.main, ["--benchmark", "--s-ref", "nan"], "--s-ref nan: must be a finite number"),
    case(evaluate.main, ["--recon", "--ckpt", "{root}/random"], "model.safetensors is not a readable safetensors file"),
    case(evaluate.main, ["--benchmark", "--ckpt", "{root}/truncated"], "is not a readable safetensors file"),
    case(evaluate.main, ["--benchmark", "--device", "cuda"], "--device cuda: this torch build or machine has no CUDA GPU"),
    case(evaluate.main, ["--benchmark", "--sheet", "{root}/s.gif"], "--sheet {root}/s.gif: the file type must be"),
    case(evaluate.main, [], "pass --benchmark --ckpt PATH"),
    case(evaluate.main, ["--videos", "{root}/no_videos", "--refs", "{root}/photo.jpg", "--prompts", "a person nods"],
         "no video files in {root}/no_videos"),
    case(evaluate.main, ["--videos", "{root}/broken.mp4", "--refs", "{root}/photo.jpg", "--prompts", "a person nods"],
         "Invalid data found when processing input"),
    case(evaluate.main, ["--benchmark", "--out", "{root}/empty.jsonl/e"], "--out {root}/empty.jsonl/e: cannot make"),
    case(train.main, ["--steps", "0"], "--steps 0: must be at least 1"),
    case(train.main, ["--steps", "-2"], "--steps -2: must be at least 1"),
    case(train.main, ["--batch", "0"], "--batch 0: must be at least 1"),
    case(train.main, ["--lr", "nan"], "--lr nan: must be a finite number"),
    case(train.main, ["--p-r", "1.5"], "--p-r 1.5: must be from 0.0 to 1.0"),
    case(train.main, ["--keep", "0"], "--keep 0: must be at least 1"),
    case(train.main, ["--t-dist", "normal"], "argument --t-dist: invalid choice"),
    case(train.main, ["--attn", "triton", "--init", "{root}/vae"], "--attn triton runs the fused kernel on a CUDA GPU"),
    case(train.main, ["--out", "{root}/new"], "--stage dit trains on a frozen VAE and a fresh one is random"),
    case(train.main, ["--init", "{root}/random", "--out", "{root}/new"], "is not a readable safetensors file"),
    case(train.main, ["--init", "{root}/truncated", "--out", "{root}/new"], "is not a readable safetensors file"),
    case(train.main, ["--stage", "vae", "--data", "{root}/notjson.jsonl", "--out", "{root}/new"],
         "notjson.jsonl:2: not a JSON object"),
    case(train.main, ["--stage", "vae", "--data", "{root}/empty.jsonl", "--out", "{root}/new"], "lists no clips"),
    case(train.main, ["--stage", "vae", "--data", "{root}/none.jsonl", "--out", "{root}/new"], "manifest not found"),
    case(train.main, ["--stage", "vae", "--data", "{root}/missing_clips.jsonl", "--batch", "8", "--out", "{root}/new"],
         "3 of them cannot be read (first: {root}/gone_0.mp4"),
    case(train.main, ["--resume", "--out", "{root}/new"], "no checkpoint in {root}/new to --resume"),
    case(train.main, ["--init", "{root}/vae", "--out", "{root}/run"], "holds an earlier run", "run"),
    case(train.main, ["--stage", "vae", "--out", "{root}/run"], "pass --resume to continue it, --overwrite", "run"),
    case(train.main, ["--resume", "--steps", "2", "--out", "{root}/run"], "is at step 2, so --steps 2 leaves nothing",
         "run"),
    case(train.main, ["--resume", "--overwrite", "--out", "{root}/run"], "pass one of them", "run"),
]


@pytest.mark.parametrize("main, argv, expected, folder", CASES)
def test_bad_input_is_one_line_and_a_non_zero_exit(world, capsys, main, argv, expected, folder):
    if {"cuda", "triton"} & set(argv) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = [a.format(root=world) for a in argv]
    base = {sample.main: ["--ckpt", str(world / "run"), "--out", str(world / "out.gif"), "--steps", "1"],
            evaluate.main: ["--ckpt", str(world / "run"), "--out", str(world / "eval")],
            train.main: TRAIN + ["--steps", "3"]}[main]
    before = snapshot(world / folder) if folder else None
    code, out, err = cli(main, base + argv, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err + out, err
    assert expected.format(root=world) in err
    assert not (world / "out.gif").exists() and not (world / "new").exists()  # no work done, nothing written
    if folder:
        assert snapshot(world / folder) == before


def resumable_copy(world, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    return run


def test_resume_falls_back_past_a_checkpoint_that_does_not_load(world, tmp_path, capsys):
    run = resumable_copy(world, tmp_path)
    state = run / "step_000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    code, out, err = cli(train.main, TRAIN + ["--resume", "--steps", "3", "--out", str(run)], capsys)
    assert code == 0, err
    assert len(err.splitlines()) == 1
    assert err.startswith(f"train.py: skipped step_000002, which does not load: {state} is damaged")
    assert err.endswith("; renamed step_000002.damaged\n")
    assert f"train.py: resuming {run / 'step_000001'} at step 1" in out.splitlines()
    assert [line for line in out.splitlines() if "saved" in line] == [f"train.py: saved {run / 'step_000003'} (step 3)"]
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert checkpoint.read_state(checkpoint.resolve(run) / "state.pt")["step"] == 3
    # --keep 2 counts loadable checkpoints only: the damaged one is set aside, not counted, not pruned
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000001", "step_000002.damaged", "step_000003"]


def test_resume_with_no_checkpoint_that_loads_changes_nothing(world, tmp_path, capsys):
    run = resumable_copy(world, tmp_path)
    for step in (1, 2):
        (run / f"step_00000{step}" / "state.pt").write_bytes(b"junk")
    before = snapshot(run)
    code, _, err = cli(train.main, TRAIN + ["--resume", "--steps", "3", "--out", str(run)], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"train.py: no checkpoint in {run} to --resume (2 do not load: skipped step_000002")
    assert snapshot(run) == before


def test_an_interrupted_saves_leftovers_are_cleaned_on_the_next_start(world, tmp_path, capsys):
    run = resumable_copy(world, tmp_path)
    (run / ".step_000003.tmp4242").mkdir()  # a checkpoint half written
    (run / ".step_000003.tmp4242" / "model.safetensors").write_bytes(b"half")
    (run / ".latest.tmp4242").write_text("step_000003\n")
    (run / ".metrics.jsonl.tmp77").write_text("")
    (run / "step_000001").rename(run / ".step_000001.old4243")  # killed while replacing step_000001
    (run / "step_000002").rename(run / ".step_000002.old4244")  # the checkpoint `latest` names
    code, out, err = cli(train.main, TRAIN + ["--resume", "--steps", "3", "--keep", "3", "--out", str(run)], capsys)
    assert code == 0, err
    assert err.splitlines() == [f"train.py: {what} (left by an interrupted save)" for what in (
        "removed .latest.tmp4242", "removed .metrics.jsonl.tmp77", "restored step_000001 from .step_000001.old4243",
        "restored step_000002 from .step_000002.old4244", "removed .step_000003.tmp4242")]
    assert f"train.py: resuming {run / 'step_000002'} at step 2" in out
    assert sorted(p.name for p in run.iterdir()) == ["latest", "metrics.jsonl", "step_000001", "step_000002",
                                                     "step_000003", "train_config.json"]


def test_a_pickled_object_in_state_pt_is_refused_and_never_run(world, tmp_path, capsys):
    run = resumable_copy(world, tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for step in (1, 2):
        state = checkpoint.read_state(run / f"step_00000{step}" / "state.pt")
        torch.save({**state, "payload": Payload()}, run / f"step_00000{step}" / "state.pt")
    before = snapshot(run)
    code, _, err = cli(train.main, TRAIN + ["--resume", "--steps", "3", "--out", str(run)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and not marker.exists()
    assert (f"skipped step_000002, which does not load: {run / 'step_000002' / 'state.pt'} holds a pickled object "
            f"(io.open) that loading would run as code: refused") in err
    assert snapshot(run) == before


def test_overwrite_starts_afresh(world, tmp_path, capsys):
    run = resumable_copy(world, tmp_path)
    code, out, err = cli(train.main, TRAIN + ["--init", str(world / "vae"), "--steps", "1", "--overwrite",
                                              "--out", str(run)], capsys)
    assert code == 0, err
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in run.iterdir()) == ["latest", "metrics.jsonl", "step_000001", "train_config.json"]
    assert checkpoint.read_state(run / "step_000001" / "state.pt")["step"] == 1


def test_a_photo_as_reference_warns_in_one_line(world, tmp_path, capsys):
    args = ["--ckpt", str(world / "run"), "--steps", "1", "--out", str(tmp_path / "v.gif")]
    code, out, err = cli(sample.main, args + ["--ref", str(world / "photo.jpg")], capsys)
    assert code == 0 and (tmp_path / "v.gif").is_file()
    assert [line for line in err.splitlines() if "sample.py" in line] == [  # the rest: the progress bar
        "sample.py: warning: the reference is 200x150, not a square synthetic-world face: this model knows only the "
        "synthetic world's faces, so the video will not keep this identity"]
    code, out, err = cli(sample.main, args, capsys)  # the bundled reference: a 128 px render of the world
    assert code == 0 and "sample.py" not in err and (tmp_path / "v.gif").is_file()


@pytest.mark.parametrize("script", [sample, evaluate, train])
def test_help_shows_every_default(script, capsys):
    config = {sample: sample.SampleConfig, evaluate: evaluate.EvalConfig, train: train.TrainConfig}[script]
    assert script.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("(default: ") == len(fields(config))
    assert "(default: 0; from 0 to 2147483647)" in text  # --seed's default and bounds
