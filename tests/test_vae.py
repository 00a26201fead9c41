import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

from pipeline import PRESETS
from vae import ResBlock, VAEConfig, VideoVAE, compute_latent_stats, face_weight, latent_weight

S = 16  # test frames are 16x16 -> 4x4 latents


def make_vae(tau: int = 4, dtype=torch.float32, seed: int = 0) -> VideoVAE:
    torch.manual_seed(seed)
    config = VAEConfig(latent_channels=4, spatial=4, tau=tau, width=8, channel_mult=(1, 2, 2))
    vae = VideoVAE(config)
    for module in vae.modules():  # residual branches start at zero; open them so the tests see them
        if isinstance(module, ResBlock):
            module.conv2.conv.reset_parameters()
    return vae.to(dtype)


def clip(frames: int, batch: int = 2, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, S, S, generator=g, dtype=dtype) * 2 - 1


def test_image_gives_one_latent_frame():
    vae = make_vae()
    image = clip(1)[:, :, 0]  # [B, 3, H, W]
    with torch.no_grad():
        z = vae.encode(image)
        assert z.shape == (2, 4, 1, 4, 4)
        assert torch.equal(z, vae.encode(image[:, :, None]))  # same as a 1-frame clip
        assert vae.decode(z).shape == (2, 3, 1, S, S)


def test_image_path_matches_first_frame_of_a_clip():
    """A lone frame takes the folded-kernel shortcut; it must agree with frame 0 of a clip."""
    vae = make_vae(dtype=torch.float64)
    x = clip(5, dtype=torch.float64)
    with torch.no_grad():
        z_clip, z_image = vae.encode(x), vae.encode(x[:, :, 0])
        torch.testing.assert_close(z_image[:, :, 0], z_clip[:, :, 0])
        torch.testing.assert_close(vae.decode(z_image)[:, :, 0], vae.decode(z_clip)[:, :, 0])


# (tau, pixel frames, latent frames), counted by hand from "first frame alone, then groups of tau"
@pytest.mark.parametrize("tau, frames, latents", [(2, 3, 2), (2, 5, 3), (4, 5, 2), (4, 9, 3)])
def test_frame_counts_encode_and_decode(tau, frames, latents):
    vae = make_vae(tau)
    assert vae.latent_frames(frames) == latents
    assert vae.pixel_frames(latents) == frames
    with torch.no_grad():
        z = vae.encode(clip(frames))
        assert z.shape == (2, 4, latents, 4, 4)
        assert vae.decode(z).shape == (2, 3, frames, S, S)


@pytest.mark.parametrize("tau", [2, 4])
def test_encoder_is_causal(tau):
    """Latent m covers pixel frames tau*(m-1)+1 .. tau*m: it sees frame tau*m but nothing later."""
    vae = make_vae(tau, torch.float64)  # float64: the plain conv path, so "unchanged" is bitwise
    k = 2
    x = clip(1 + tau * k, dtype=torch.float64)
    with torch.no_grad():
        z = vae.encode(x)
        for f in range(1, 1 + tau * k):  # any later frame: latent frame 0 bitwise unchanged
            y = x.clone()
            y[:, :, f] += 0.5
            assert torch.equal(vae.encode(y)[:, :, 0], z[:, :, 0]), f
        for m in range(k):
            y = x.clone()
            y[:, :, tau * m + 1:] = -x[:, :, tau * m + 1:]  # perturb every frame > tau*m
            zy = vae.encode(y)
            assert torch.equal(zy[:, :, : m + 1], z[:, :, : m + 1]), m
            assert not torch.allclose(zy[:, :, m + 1], z[:, :, m + 1]), m
            y = x.clone()
            y[:, :, tau * m] += 0.5  # frame tau*m belongs to latent m
            assert not torch.allclose(vae.encode(y)[:, :, m], z[:, :, m]), m


@pytest.mark.parametrize("tau", [2, 4])
def test_decoder_is_causal(tau):
    """Pixel frame f is decoded from latent frames <= ceil(f / tau) only."""
    vae = make_vae(tau, torch.float64)
    k = 2
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 1 + k, 4, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        x = vae.decode(z)
        for m in range(1, k + 1):
            w = z.clone()
            w[:, :, m:] += 1.0  # latents >= m cover pixel frames >= tau*(m-1)+1
            xw = vae.decode(w)
            first = tau * (m - 1) + 1
            assert torch.equal(xw[:, :, :first], x[:, :, :first]), m
            assert not torch.allclose(xw[:, :, first], x[:, :, first]), m


@pytest.mark.parametrize("tau, frames, valid", [(4, 16, "1, 5, 9, 13, 17"), (4, 2, "1, 5, 9"), (2, 4, "1, 3, 5, 7")])
def test_bad_frame_count_names_valid_counts(tau, frames, valid):
    vae = make_vae(tau)
    with pytest.raises(ValueError, match=f"{valid}.*got {frames} frames"):
        vae.latent_frames(frames)
    with pytest.raises(ValueError, match=valid):
        vae.encode(clip(frames))


def test_bad_spatial_size_and_config():
    vae = make_vae()
    with pytest.raises(ValueError, match="divisible by 4"):
        vae.encode(torch.zeros(1, 3, 1, 18, 16))
    with pytest.raises(ValueError, match="power of 2"):
        VAEConfig(spatial=3)
    with pytest.raises(ValueError, match="power of 2"):
        VAEConfig(tau=3)
    with pytest.raises(ValueError, match="channel_mult"):
        VAEConfig(spatial=8, tau=4, channel_mult=(1, 2, 4))


@settings(max_examples=30, deadline=None)
@given(tau=st.sampled_from([1, 2, 4, 8]), frames=st.integers(1, 40))
def test_latent_frames_rule(tau, frames):
    levels = max(1, tau.bit_length() - 1)  # max(log2 spatial, log2 tau) with spatial = 2
    vae = VideoVAE(VAEConfig(latent_channels=2, spatial=2, tau=tau, width=4, channel_mult=(1,) * (levels + 1)))
    if (frames - 1) % tau == 0:
        assert vae.latent_frames(frames) == (frames - 1) // tau + 1
        assert vae.pixel_frames(vae.latent_frames(frames)) == frames
    else:
        with pytest.raises(ValueError):
            vae.latent_frames(frames)


def test_latent_stats_normalise_encode_and_cancel_in_decode():
    vae = make_vae()
    x = clip(5)
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0])
    std = torch.tensor([2.0, 0.5, 1.0, 4.0])
    with torch.no_grad():
        mu, _ = vae.encode_dist(x)
        vae.set_latent_stats(mean, std)
        z = vae.encode(x)
        for c in range(4):
            torch.testing.assert_close(z[:, c], (mu[:, c] - mean[c]) / std[c])
        torch.testing.assert_close(vae.decode(z), vae.decoder(mu), atol=1e-5, rtol=1e-5)


def test_compute_latent_stats_matches_hand_computation():
    vae = make_vae()
    batches = [clip(5, seed=1), clip(1, batch=3, seed=2)]  # a clip batch and an image batch
    with torch.no_grad():
        mean, std = compute_latent_stats(vae, batches)
        mus = [vae.encode_dist(x)[0] for x in batches]
    for c in range(4):
        values = torch.cat([mu[:, c].flatten() for mu in mus]).double()
        torch.testing.assert_close(mean[c].double(), values.mean(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(std[c].double(), values.std(correction=0), atol=1e-6, rtol=1e-5)
    vae.set_latent_stats(mean, std)
    with torch.no_grad():
        z = torch.cat([vae.encode(x).transpose(0, 1).flatten(1) for x in batches], dim=1)
    torch.testing.assert_close(z.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(1, correction=0), torch.ones(4), atol=1e-5, rtol=0)


def test_sampled_encode_is_reproducible_and_noisy():
    vae = make_vae()
    x = clip(5)
    with torch.no_grad():
        a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a, b)
        assert not torch.allclose(a, vae.encode(x))


def test_loss_backward_reaches_every_parameter():
    vae = make_vae()
    losses = vae.loss(clip(5))
    assert set(losses) == {"recon", "kl", "total"}
    assert losses["kl"] >= 0
    torch.testing.assert_close(losses["total"], losses["recon"] + vae.config.kl_weight * losses["kl"])
    losses["total"].backward()
    torch.optim.SGD(vae.parameters(), lr=0.1).step()  # residual branches start at zero; one step opens them
    vae.zero_grad()
    vae.loss(clip(5))["total"].backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_face_weight_hand_square_and_weighted_recon():
    # landmarks spanning 4 px around (12, 12): half-side 1.75 * 4 = 7, so pixel centres 5.5 .. 18.5
    marks = torch.tensor([[10.0, 10], [14, 10], [12, 12], [10, 14], [14, 14]])
    landmarks = torch.stack([marks, marks + torch.tensor([8.0, 4.0])])[None]  # [1, F=2, 5, 2], the second moved
    w = face_weight(landmarks, 32, 4.0, present=torch.tensor([[True, False]]))
    expected = torch.ones(1, 1, 2, 32, 32)
    expected[0, 0, 0, 5:19, 5:19] = 5.0  # rows (y), then columns (x); the absent second frame stays at 1
    assert torch.equal(w, expected)
    assert torch.equal(face_weight(landmarks, 32, 4.0)[0, 0, 1] > 1, torch.nn.functional.pad(torch.ones(14, 14, dtype=torch.bool), (13, 5, 9, 9)))
    # the weighted recon is sum(w |x^ - x|) / sum(w), w broadcast over the batch and the channels: with the decoder's output fixed by a seed
    vae, x = make_vae(), clip(5)
    w = 1 + torch.rand(1, 1, 5, *x.shape[-2:])
    torch.manual_seed(0)
    recon = vae.loss(x, w)["recon"]
    torch.manual_seed(0)
    mu, logvar = vae.encode_dist(x)
    err = (vae.decoder(mu + (0.5 * logvar).exp() * torch.randn_like(mu)) - x).abs().double()
    torch.testing.assert_close(recon.double(), (err * w).sum() / (w.double().sum() * x.shape[0] * x.shape[1]), rtol=1e-5, atol=0)


def test_state_dict_round_trip_keeps_latent_stats(tmp_path):
    vae = make_vae(seed=0)
    vae.set_latent_stats(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 0.25, 2.0, 1.5]))
    state = vae.state_dict()
    assert "latent_mean" in state and "latent_std" in state
    save_file(state, tmp_path / "vae.safetensors")
    other = make_vae(seed=1)
    other.load_state_dict(load_file(tmp_path / "vae.safetensors"))
    assert torch.equal(other.latent_mean, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(other.latent_std, torch.tensor([0.5, 0.25, 2.0, 1.5]))
    x = clip(5)
    with torch.no_grad():
        assert torch.equal(other.encode(x), vae.encode(x))


def test_presets():
    tiny, small = PRESETS["tiny"].vae, PRESETS["small"].vae
    assert (tiny.latent_channels, tiny.spatial, tiny.tau, tiny.width) == (8, 4, 4, 16)
    assert (small.latent_channels, small.spatial, small.tau, small.width) == (16, 4, 4, 32)
    vae = VideoVAE(tiny)
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 5, 32, 32)).shape == (1, 8, 2, 8, 8)


def test_latent_weight_takes_each_tokens_largest_pixel_weight():
    """tau = 4, s = 4, 9 frames of 8x8: latent frame 0 <- frame 0, 1 <- frames 1-4, 2 <- frames 5-8."""
    w = torch.ones(2, 1, 9, 8, 8)
    w[0, 0, 5, 6, 1] = 5.0  # -> token (2, 1, 0)
    w[0, 0, 0, 0, 7] = 3.0  # frame 0 -> token (0, 0, 1) only
    w[1, 0, 4, 3, 3] = 2.0  # frame 4 -> token (1, 0, 0)
    want = torch.ones(2, 1, 3, 2, 2)
    want[0, 0, 2, 1, 0], want[0, 0, 0, 0, 1], want[1, 0, 1, 0, 0] = 5.0, 3.0, 2.0
    assert torch.equal(latent_weight(w, 4, 4), want)
