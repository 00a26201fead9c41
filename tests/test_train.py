"""End-to-end training on the tiny config, CPU: resume exactness, torchrun DDP, clear errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--config", "tiny", "--batch", "2", "--no-progress", "--log-every", "1", "--warmup", "2", "--lr", "1e-3"]


def run(args):
    return train.train(train.parse_args(COMMON + args))


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    run(["--stage", "vae", "--steps", "2", "--out", str(out)])
    return out


def weights(run_dir):
    latest = (run_dir / "latest").read_text().strip()
    return load_file(str(run_dir / latest / "model.safetensors")), torch.load(run_dir / latest / "state.pt", weights_only=False)


def test_resume_continues_exactly(vae_ckpt, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    run(["--stage", "dit", "--init", str(vae_ckpt), "--steps", "4", "--save-every", "4", "--out", str(full)])
    run(["--stage", "dit", "--init", str(vae_ckpt), "--steps", "2", "--save-every", "2", "--out", str(half)])
    run(["--stage", "dit", "--steps", "4", "--save-every", "2", "--out", str(half), "--resume"])
    (wa, sa), (wb, sb) = weights(full), weights(half)
    assert sa["step"] == sb["step"] == 4
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for k in sa["raw"]:
        assert torch.equal(sa["raw"][k], sb["raw"][k]), k
    # and training did move the weights away from the VAE-only start
    start = load_file(str(vae_ckpt / (vae_ckpt / "latest").read_text().strip() / "model.safetensors"))
    assert not torch.equal(wa["dit.proj_out.weight"], torch.zeros_like(wa["dit.proj_out.weight"]))
    assert all(torch.equal(wa[k], start[k]) for k in start if k.startswith("vae."))  # frozen VAE


def test_vae_stage_writes_latent_statistics(vae_ckpt):
    w, _ = weights(vae_ckpt)
    assert not torch.equal(w["vae.latent_std"], torch.ones_like(w["vae.latent_std"]))


def test_init_from_another_config_is_a_clear_error(vae_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="--config tiny"):
        train.train(train.parse_args(["--config", "demo", "--stage", "dit", "--init", str(vae_ckpt), "--out", str(tmp_path), "--steps", "1"]))


def test_fsdp_without_gpu_and_missing_manifest_are_clear_errors(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--fsdp needs GPUs"):
            run(["--fsdp", "--steps", "1", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        run(["--stage", "vae", "--data", str(tmp_path / "none.jsonl"), "--steps", "1", "--out", str(tmp_path)])


def test_torchrun_two_processes(vae_ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", str(ROOT / "train.py"),
           *COMMON, "--stage", "dit", "--init", str(vae_ckpt), "--steps", "2", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w, state = weights(tmp_path / "ddp")
    assert state["step"] == 2
    assert (tmp_path / "ddp" / "metrics.jsonl").read_text().count("\n") == 2  # rank 0 logs alone


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_identity_loss_trains_with_the_bundled_face_model(vae_ckpt, tmp_path, grad_checkpoint):
    """L_id and L_tic are computed on the decoded clean estimate, logged, and reach the DiT."""
    import json

    out = tmp_path / "id"
    flags = ["--grad-checkpoint"] if grad_checkpoint else []
    run(["--stage", "dit", "--init", str(vae_ckpt), "--steps", "2", "--out", str(out), "--p-r", "0",
         "--face-model", str(ROOT / "assets" / "face_model"), *flags])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert 0 < row["l_id"] <= 2 and 0 <= row["l_tic"] <= 2
    assert any(abs(r["loss"] - r["l_flow"]) > 1e-6 for r in rows)  # the total is not L_flow alone


def test_face_terms_gradient_reaches_the_velocity(vae_ckpt):
    """The identity loss is differentiable through decode, alignment and the frozen embedder."""
    import checkpoint
    import data
    from faces import load_embedder

    cfg = train.parse_args(COMMON + ["--face-model", str(ROOT / "assets" / "face_model")])
    pipe, _ = checkpoint.load(vae_ckpt)
    embedder = load_embedder(cfg.face_model)
    g = torch.Generator().manual_seed(0)
    batch = data.synth_batch(2, pipe.size, pipe.frames, g)
    z_0 = pipe.vae.encode(batch["video"]).detach()
    t = torch.tensor([0.2, 0.6])
    eps = torch.randn(z_0.shape, generator=g)
    z_t = (1 - t.view(-1, 1, 1, 1, 1)) * z_0 + t.view(-1, 1, 1, 1, 1) * eps
    v = (eps - z_0 + 0.3 * torch.randn(z_0.shape, generator=g)).requires_grad_(True)
    l_id, l_tic = train.face_terms(cfg, pipe, embedder, z_t, t, v, batch, torch.tensor([True, False]))
    assert l_id[1] == 0 and l_tic[1] == 0  # a dropped reference has no identity to keep
    (l_id.sum() + l_tic.sum()).backward()
    assert v.grad[0].abs().sum() > 0 and v.grad[1].abs().sum() == 0
    assert v.grad[0, :, cfg.id_frames:].abs().sum() == 0  # only the decoded latent frames
