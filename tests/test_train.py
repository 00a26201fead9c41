"""End-to-end training on the tiny config, CPU: resume exactness, torchrun DDP and FSDP2 (gloo), clear errors."""
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from infra import checkpoint
import train
from infra.errors import UsageError

EXPECTED = (SystemExit, UsageError)  # the errors main() turns into one line and exit 2

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--config", "tiny", "--batch", "2", "--no-progress", "--log-every", "1", "--warmup", "2", "--lr", "1e-3"]


def run(args):
    return train.train(train.parse_args(COMMON + args))


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    run(["--stage", "vae", "--steps", "2", "--out", str(out)])
    return out


def free_port() -> int:
    """A TCP port nothing listens on now (a fixed one can still be held by the previous run's sockets)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args) -> subprocess.CompletedProcess:
    """train.py in two gloo processes on the CPU (one thread each), on a free port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "train.py"), *COMMON, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(run_dir):
    latest = (run_dir / "latest").read_text().strip()
    return load_file(str(run_dir / latest / "model.safetensors")), checkpoint.read_state(run_dir / latest / "state.pt")


def test_resume_continues_exactly(vae_ckpt, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    run(["--stage", "dit", "--init", str(vae_ckpt), "--steps", "4", "--save-every", "4", "--out", str(full)])
    run(["--stage", "dit", "--init", str(vae_ckpt), "--steps", "2", "--save-every", "2", "--out", str(half)])
    with open(half / "metrics.jsonl", "a") as f:  # a stopped run logged step 3 after its checkpoint, then a cut line
        f.write(json.dumps({"step": 3, "loss": 9.0}) + '\n{"step": 4, "lo')
    run(["--stage", "dit", "--steps", "4", "--save-every", "2", "--out", str(half), "--resume"])
    logged = [json.loads(line) for line in (half / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3, 4]  # each step once: the stopped run's step 3 is gone
    assert [row["loss"] for row in logged] == [row["loss"] for row in reference]
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


def test_vae_flag_swaps_in_another_checkpoints_vae(vae_ckpt, tmp_path):
    """--init gives text encoder + DiT, --vae the VAE (e.g. one trained further); the VAE stays frozen."""
    dit_run, vae2, out = tmp_path / "dit", tmp_path / "vae2", tmp_path / "out"
    run(["--stage", "dit", "--init", str(vae_ckpt), "--steps", "1", "--out", str(dit_run)])
    run(["--stage", "vae", "--init", str(vae_ckpt), "--steps", "1", "--lr", "1e-2", "--out", str(vae2)])
    run(["--stage", "dit", "--init", str(dit_run), "--vae", str(vae2), "--steps", "1", "--lr", "0", "--out", str(out)])
    (w_dit, _), (w_vae, _), (w_out, _) = weights(dit_run), weights(vae2), weights(out)
    assert not torch.equal(w_dit["vae.latent_std"], w_vae["vae.latent_std"])  # two different VAEs
    for k in w_out:
        assert torch.equal(w_out[k], (w_vae if k.startswith("vae.") else w_dit)[k]), k
    with pytest.raises(EXPECTED, match="--config tiny, not demo"):
        train.train(train.parse_args(["--config", "demo", "--vae", str(vae2), "--out", str(tmp_path), "--steps", "1"]))


def test_learning_rate_warm_up_and_cooldown_hand_values():
    cfg = train.parse_args(["--lr", "2", "--warmup", "4", "--steps", "10", "--cooldown", "5"])
    assert [train.lr_at(s, cfg) for s in range(10)] == pytest.approx([0.5, 1, 1.5, 2, 2, 2, 1.6, 1.2, 0.8, 0.4])
    cfg.cooldown = 0  # constant after the warm-up
    assert [train.lr_at(s, cfg) for s in range(3, 10)] == [2.0] * 7


def test_training_time_distributions_match_their_closed_form_cdfs(capsys):
    g = torch.Generator().manual_seed(0)
    mu, n = 0.65, 200_000
    for c in (0.05, 0.2, 0.5, 0.9):
        # logit-normal u, warped: t < c  <=>  u < c / (e^mu - (e^mu - 1) c)  <=>  z < logit(u_c), P = Phi(logit(u_c))
        u_c = c / (math.exp(mu) - (math.exp(mu) - 1) * c)
        phi = 0.5 * (1 + math.erf(math.log(u_c / (1 - u_c)) / math.sqrt(2)))
        assert (train.sample_t(n, mu, g) < c).double().mean().item() == pytest.approx(phi, abs=0.004)
        assert (train.sample_t(n, mu, g, "uniform") < c).double().mean().item() == pytest.approx(c, abs=0.004)
    assert train.main(COMMON + ["--t-dist", "beta", "--steps", "1"]) == 2
    assert "train.py: argument --t-dist: invalid choice: 'beta' (choose from 'logit-normal', 'uniform')" in capsys.readouterr().err


def test_depth_grows_the_init_dit_as_the_same_function(vae_ckpt, tmp_path):
    """--depth 4 from a 2-block tiny DiT: the grown DiT equals the checkpoint's own (loaded independently) at
    step 0, and its new blocks train; a shallower --depth is a clear error."""
    shallow, grown = tmp_path / "shallow", tmp_path / "grown"
    run(["--stage", "dit", "--init", str(vae_ckpt), "--steps", "2", "--ema", "0", "--out", str(shallow)])
    pipe = train.build(train.parse_args(COMMON + ["--init", str(shallow), "--depth", "4"]), torch.device("cpu"))
    ref, _ = checkpoint.load(shallow)
    assert (len(pipe.dit.blocks), len(ref.dit.blocks)) == (4, 2)
    g = torch.Generator().manual_seed(0)
    z, z_ref, y = torch.randn(2, 8, 3, 8, 8, generator=g), torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g)
    t, y_mask = torch.tensor([0.3, 0.9]), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        a = pipe.dit(z, t, y, y_mask, z_ref=z_ref, ref_keep=torch.tensor([True, False]))
        b = ref.dit(z, t, y, y_mask, z_ref=z_ref, ref_keep=torch.tensor([True, False]))
    assert b.abs().max() > 1e-3  # the trained DiT's velocity is not the zero-initialised output
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    run(["--stage", "dit", "--init", str(shallow), "--depth", "4", "--steps", "1", "--out", str(grown)])
    w, _ = weights(grown)
    assert w["dit.blocks.3.ff.2.weight"].abs().max() > 0  # the new blocks leave the identity
    with pytest.raises(EXPECTED, match="shallower than --init's DiT"):
        run(["--stage", "dit", "--init", str(grown), "--depth", "2", "--steps", "1", "--out", str(tmp_path / "x")])


def test_rope_theta_flag_sets_the_frequencies_and_travels_with_the_checkpoint(vae_ckpt, tmp_path):
    """--rope-theta 10: the tiny DiT (heads of 32: t, h, w get 6, 5, 5 pairs) turns its h pair m at 10^(-m/5) and
    its t pair m at 10^(-m/6) (hand values), config.json keeps theta, the checkpoint loads with it and --init of it
    without the flag keeps it."""
    run(["--stage", "dit", "--init", str(vae_ckpt), "--rope-theta", "10", "--steps", "1", "--out", str(tmp_path / "r")])
    pipe, _ = checkpoint.load(tmp_path / "r")
    f = pipe.dit.freqs
    assert f.shape == (16, 3) and pipe.dit.cfg.rope_theta == 10
    for m in range(5):
        assert math.isclose(f[6 + m, 1].item(), 10 ** (-m / 5), rel_tol=1e-6)
        assert math.isclose(f[11 + m, 2].item(), 10 ** (-m / 5), rel_tol=1e-6)
    assert all(math.isclose(f[m, 0].item(), 10 ** (-m / 6), rel_tol=1e-6) for m in range(6))
    default = train.build(train.parse_args(COMMON + ["--init", str(vae_ckpt)]), torch.device("cpu"))
    assert math.isclose(default.dit.freqs[7, 1].item(), 10000 ** (-1 / 5), rel_tol=1e-6)
    kept = train.build(train.parse_args(COMMON + ["--init", str(tmp_path / "r")]), torch.device("cpu"))
    torch.testing.assert_close(kept.dit.freqs, f, rtol=0, atol=0)  # --init (and --resume) keep the checkpoint's theta


def test_vae_of_another_latent_width_keeps_the_init_dits_body(vae_ckpt, tmp_path):
    """--latent-channels 4 trains a VAE and a DiT of 4 latent channels; then --init that DiT with --vae of 8 (the
    tiny preset's): every block, the text encoder and the timestep path are --init's; patchify is fresh and
    proj_out zero, of the new width; without --vae the narrow VAE does not fit, a clear error."""
    narrow = tmp_path / "narrow"
    run(["--stage", "vae", "--latent-channels", "4", "--steps", "1", "--out", str(tmp_path / "vae4")])
    run(["--stage", "dit", "--latent-channels", "4", "--init", str(tmp_path / "vae4"), "--steps", "2", "--ema", "0",
         "--out", str(narrow)])
    saved = json.loads((narrow / (narrow / "latest").read_text().strip() / "config.json").read_text())
    assert (saved["vae"]["latent_channels"], saved["dit"]["in_channels"]) == (4, 4)
    pipe = train.build(train.parse_args(COMMON + ["--init", str(narrow), "--vae", str(vae_ckpt)]), torch.device("cpu"))
    got = checkpoint.state_dict(pipe.modules())
    (w_init, _), (w_vae, _) = weights(narrow), weights(vae_ckpt)
    assert w_init["dit.patchify.weight"].shape == (64, 4) and got["dit.patchify.weight"].shape == (64, 8)
    assert torch.count_nonzero(got["dit.proj_out.weight"]) == 0 and got["dit.proj_out.weight"].shape == (8, 64)
    fresh = {"dit.patchify.weight", "dit.patchify.bias", "dit.proj_out.weight", "dit.proj_out.bias"}
    for k, v in got.items():
        if k not in fresh:
            assert torch.equal(v, (w_vae if k.startswith("vae.") else w_init)[k]), k
    with pytest.raises(EXPECTED, match="does not fit the vae module"):
        train.build(train.parse_args(COMMON + ["--init", str(narrow)]), torch.device("cpu"))


def test_vae_stage_writes_latent_statistics(vae_ckpt):
    w, _ = weights(vae_ckpt)
    assert not torch.equal(w["vae.latent_std"], torch.ones_like(w["vae.latent_std"]))


def test_init_from_another_config_is_a_clear_error(vae_ckpt, tmp_path):
    with pytest.raises(EXPECTED, match="--config tiny"):
        train.train(train.parse_args(["--config", "demo", "--stage", "dit", "--init", str(vae_ckpt), "--out", str(tmp_path), "--steps", "1"]))


def test_fsdp_without_torchrun_and_missing_manifest_are_clear_errors(tmp_path):
    with pytest.raises(EXPECTED, match="--fsdp shards over the processes torchrun starts"):
        run(["--fsdp", "--steps", "1", "--out", str(tmp_path)])
    with pytest.raises(EXPECTED, match=r"--fsdp shards the DiT \(--stage dit\)"):
        run(["--fsdp", "--stage", "vae", "--steps", "1", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        run(["--stage", "vae", "--data", str(tmp_path / "none.jsonl"), "--steps", "1", "--out", str(tmp_path)])
    (tmp_path / "one.jsonl").write_text(json.dumps({"video": "a.gif", "caption": "a person nods"}))
    with pytest.raises(EXPECTED, match="has 1 clips, fewer than one step needs"):  # not an endless loop
        run(["--stage", "vae", "--data", str(tmp_path / "one.jsonl"), "--workers", "0", "--steps", "1", "--out", str(tmp_path)])


def test_face_weighted_vae_and_dit_stages_and_the_missing_landmarks_error(vae_ckpt, tmp_path):
    run(["--stage", "vae", "--face-weight", "4", "--steps", "1", "--out", str(tmp_path / "synth")])  # synthetic: landmarks
    rows = [json.loads(line) for line in (tmp_path / "synth" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["recon"] > 0
    flows = []  # the dit stage: the same first step (same batch, noise, t) with and without the face weight
    for alpha in ("0", "4"):
        run(["--stage", "dit", "--init", str(vae_ckpt), "--face-weight", alpha, "--steps", "1", "--out", str(tmp_path / alpha)])
        flows.append(json.loads((tmp_path / alpha / "metrics.jsonl").read_text().splitlines()[0])["l_flow"])
    assert flows[0] > 0 and flows[1] > 0 and flows[0] != flows[1]
    frames = [Image.new("RGB", (32, 32), (10 * i, 80, 160)) for i in range(12)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100)  # 1.2 s at 10 fps
    (tmp_path / "real.jsonl").write_text(json.dumps({"video": str(tmp_path / "a.gif"), "caption": "a person nods"}) + "\n")
    with pytest.raises(EXPECTED, match="--face-weight needs face landmarks"):  # a manifest line without "faces"
        run(["--stage", "vae", "--data", str(tmp_path / "real.jsonl"), "--batch", "1", "--workers", "0", "--face-weight", "4",
             "--steps", "1", "--out", str(tmp_path / "real")])
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:4], duration=100)  # 0.4 s: too short
    with pytest.raises(EXPECTED, match=r"no clip of .* could be read \(1 skipped; last: .*clip too short"):  # not an endless loop
        run(["--stage", "vae", "--data", str(tmp_path / "real.jsonl"), "--batch", "1", "--workers", "0", "--steps", "1",
             "--out", str(tmp_path / "real")])


def test_torchrun_two_processes(vae_ckpt, tmp_path):
    torchrun(["--stage", "dit", "--init", str(vae_ckpt), "--steps", "2", "--out", str(tmp_path / "ddp")])
    w, state = weights(tmp_path / "ddp")
    assert state["step"] == 2
    assert (tmp_path / "ddp" / "metrics.jsonl").read_text().count("\n") == 2  # rank 0 logs alone


def data_parallel_reference(args, steps):
    """What two data-parallel ranks compute, in one process without any distributed code: per step both ranks'
    batches, the mean of their losses backpropagated, clip, AdamW, EMA. -> (rank 0's losses, trained, opt, ema)."""
    cfg = train.parse_args(COMMON + args)
    torch.manual_seed(cfg.seed)
    pipe = train.build(cfg, torch.device("cpu"))
    pipe.vae.requires_grad_(False).eval()
    trained = train.Denoiser(pipe.text, pipe.dit).train()
    opt = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: v.detach().float().clone() for k, v in trained.state_dict().items()}
    feeds = [train.batches(cfg, pipe, rank, 2, torch.device("cpu")) for rank in (0, 1)]
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, cfg)
        parts = [train.dit_step(cfg, pipe, trained, None, b, g, contextlib.nullcontext())[0]
                 for g, b in (feed(step) for feed in feeds)]
        opt.zero_grad(set_to_none=True)
        ((parts[0] + parts[1]) / 2).backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
        opt.step()
        train.ema_update(ema, trained, cfg.ema)
        losses.append(parts[0].item())
    return losses, trained, opt, ema


def test_fsdp_two_processes_match_one_process(vae_ckpt, tmp_path):
    """FSDP2 over two gloo processes (fp32 on the CPU), meta-device build, sharded checkpoints and an FSDP
    --resume: the same losses and weights as the data-parallel steps computed in one process."""
    out, args = tmp_path / "fsdp", ["--stage", "dit", "--init", str(vae_ckpt), "--grad-checkpoint", "--ema", "0.9"]
    first = torchrun([*args, "--fsdp", "--steps", "2", "--sample-every", "2", "--out", str(out)])
    torchrun([*args, "--fsdp", "--steps", "3", "--resume", "--out", str(out)])
    losses, trained, opt, ema = data_parallel_reference(args, 3)

    total = sum(p.numel() for p in trained.parameters())
    held = [int(line.split(" holds ")[1].split(" of ")[0].replace(",", "")) for line in first.stdout.splitlines()
            if "FSDP rank" in line]
    assert len(held) == 2 and sum(held) == total and all(abs(n - total / 2) < 0.02 * total for n in held), held

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows]), torch.tensor(losses), rtol=1e-5, atol=1e-6)

    w, state = weights(out)  # the full state, gathered on rank 0
    assert state["step"] == 3 and state["fsdp"]
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(state["raw"][k], v, rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(w[k], ema[k], rtol=1e-4, atol=1e-6, msg=k)
    moments = {k: s["exp_avg_sq"] for k, s in state["optimizer"]["state"].items()}
    for name, p in trained.named_parameters():
        torch.testing.assert_close(moments[name], opt.state[p]["exp_avg_sq"], rtol=1e-3, atol=1e-12, msg=name)
    assert (out / "sample_000002.gif").is_file()

    from infra import checkpoint
    pipe, _ = checkpoint.load(out)  # the checkpoint in a plain process
    for k, v in checkpoint.state_dict(pipe.modules()).items():
        assert torch.equal(v, w[k]), k
    with pytest.raises(EXPECTED, match="written with --fsdp: resume it with --fsdp"):
        run(["--stage", "dit", "--steps", "4", "--resume", "--out", str(out)])


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


def synth_manifest(root: Path, faces: bool) -> Path:
    """Two synthetic clips as GIFs with their references as PNGs; with faces, .faces.npz files as python -m
    interop.scrfd writes them, holding the world's ground-truth landmarks."""
    import numpy as np

    import data
    batch = data.synth_batch(2, 32, 9, torch.Generator().manual_seed(5))
    lines = []
    for b in range(2):
        data.save_video(root / f"c{b}.gif", batch["video"][b], fps=10)
        Image.fromarray(data.to_uint8(batch["ref"][b])).save(root / f"r{b}.png")
        line = {"video": f"c{b}.gif", "caption": batch["prompt"][b], "reference": f"r{b}.png"}
        if faces:
            np.savez(root / f"c{b}.gif.faces.npz", landmarks=batch["landmarks"][b].numpy(), present=np.ones(9, bool),
                     ref_landmarks=batch["ref_landmarks"][b].numpy(), ref_present=True)
            line["faces"] = f"c{b}.gif.faces.npz"
        lines.append(json.dumps(line) + "\n")
    (root / f"m{int(faces)}.jsonl").write_text("".join(lines))
    return root / f"m{int(faces)}.jsonl"


def test_identity_loss_on_a_manifest(tmp_path, vae_ckpt, capsys):
    """Issue 16.3: real data brings the reference's landmarks (interop.scrfd); without them, one line says so."""
    face = ["--face-model", str(ROOT / "assets" / "face_model"), "--p-r", "0", "--workers", "0", "--size", "32",
            "--frames", "9", "--fps", "10", "--steps", "1", "--stage", "dit", "--init", str(vae_ckpt)]
    with pytest.raises(EXPECTED, match=r"needs face landmarks of the clips and of their references, this batch "
                                         r"has no landmarks or ref_landmarks: run `python -m interop.scrfd"):
        run(face + ["--data", str(synth_manifest(tmp_path, False)), "--out", str(tmp_path / "none")])
    run(face + ["--data", str(synth_manifest(tmp_path, True)), "--out", str(tmp_path / "faces")])
    row = json.loads((tmp_path / "faces" / "metrics.jsonl").read_text())
    assert 0 < row["l_id"] <= 2 and 0 <= row["l_tic"] <= 2


def test_face_terms_gradient_reaches_the_velocity(vae_ckpt):
    """The identity loss is differentiable through decode, alignment and the frozen embedder."""
    from infra import checkpoint
    import data
    from world.face_nets import load_embedder

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
