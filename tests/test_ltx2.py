"""Parity with diffusers' LTX2VideoTransformer3DModel (LTX-2.3 switches on, random weights, fp32):
ltx2.py converts it, model.py must give the same video velocity, with and without a TASS reference."""
import pytest
import torch

from safetensors.torch import save_file

from ltx2 import convert_state_dict, dit_config_from_diffusers, load_dit, load_ltx2, map_key, official_to_diffusers

diffusers = pytest.importorskip("diffusers", reason="diffusers (the `test` extra) is needed for LTX-2 parity")

B, T, H, W, L = 2, 3, 2, 3, 5


def diffusers_ltx2(rope_type: str, captions: bool):
    torch.manual_seed(0)
    return diffusers.LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        caption_channels=24 if captions else 32, use_prompt_embeddings=captions, num_layers=2,
        gated_attn=True, cross_attn_mod=True, rope_type=rope_type,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
    ).eval()


def reference_coords(ref, fps):
    """The reference's boxes in diffusers' own coordinates: latent frame T of a (T+1) x 2H x 2W grid,
    rows H.., columns W.. — TASS's (T, H+i, W+j), computed without model.py or rope.py."""
    grid = ref.rope.prepare_video_coords(B, T + 1, 2 * H, 2 * W, torch.device("cpu"), fps=fps)
    grid = grid.unflatten(2, (T + 1, 2 * H, 2 * W))
    return grid[:, :, T, H:, W:].flatten(2, 3)


@pytest.mark.parametrize("rope_type,captions", [("split", False), ("interleaved", True)])
def test_video_velocity_matches_diffusers(rope_type, captions):
    ref = diffusers_ltx2(rope_type, captions)
    cfg, layout = dit_config_from_diffusers(ref.config)
    model = load_dit(ref.state_dict(), cfg, layout).eval()
    g = torch.Generator().manual_seed(1)
    z_t = torch.randn(B, 8, T, H, W, generator=g)
    z_ref = torch.randn(B, 8, H, W, generator=g)
    t = torch.tensor([0.3, 0.8])
    y = torch.randn(B, L, cfg.text_dim, generator=g)
    y_mask = torch.ones(B, L, dtype=torch.bool)
    y_mask[1, 3:] = False
    audio = dict(audio_hidden_states=torch.randn(B, 4, 4, generator=g), audio_num_frames=4, audio_timestep=1000 * t,
                 audio_encoder_hidden_states=torch.randn(B, L, 24 if captions else 16, generator=g))
    video = z_t.flatten(2).transpose(1, 2)
    n = video.shape[1]
    with torch.no_grad():
        for with_ref in (False, True):
            tokens, ts, coords = video, (1000 * t)[:, None].expand(B, n), None
            if with_ref:
                own = ref.rope.prepare_video_coords(B, T, H, W, torch.device("cpu"), fps=cfg.fps)
                tokens = torch.cat([video, z_ref.flatten(2).transpose(1, 2)], dim=1)
                ts = torch.cat([ts, torch.zeros(B, H * W)], dim=1)  # the reference is clean
                coords = torch.cat([own, reference_coords(ref, cfg.fps)], dim=2)
            expected = ref(hidden_states=tokens, encoder_hidden_states=y, timestep=ts, sigma=1000 * t,
                           encoder_attention_mask=y_mask.float(), num_frames=T, height=H, width=W, fps=cfg.fps,
                           video_coords=coords, isolate_modalities=True, return_dict=False, **audio)[0][:, :n]
            got = model(z_t, t, y, y_mask, z_ref=z_ref if with_ref else None).flatten(2).transpose(1, 2)
            err = (got - expected).abs().max() / expected.abs().max()
            assert err <= 1e-4, f"with_ref={with_ref}: relative error {err:.2e}"


def test_official_names_and_dropped_audio():
    assert map_key(official_to_diffusers("model.diffusion_model.patchify_proj.weight")) == "patchify.weight"
    assert map_key(official_to_diffusers("model.diffusion_model.adaln_single.linear.bias")) == "adaln_single.1.bias"
    assert map_key(official_to_diffusers("prompt_adaln_single.emb.timestep_embedder.linear_2.weight")) == \
        "prompt_t_embedder.2.weight"
    assert map_key(official_to_diffusers("transformer_blocks.3.attn1.q_norm.weight")) == "blocks.3.attn1.q_norm.weight"
    assert map_key("transformer_blocks.0.ff.net.0.proj.weight") == "blocks.0.ff.0.weight"
    for dropped in ("audio_proj_in.weight", "av_ca_a2v_gate_adaln_single.linear.weight",
                    "transformer_blocks.0.audio_to_video_attn.to_q.weight", "transformer_blocks.0.video_to_audio_norm.x",
                    "transformer_blocks.0.video_a2v_cross_attn_scale_shift_table"):
        assert map_key(official_to_diffusers(dropped)) is None


def test_missing_and_unexpected_keys_are_listed():
    ref = diffusers_ltx2("split", False)
    cfg, _ = dit_config_from_diffusers(ref.config)
    sd = dict(ref.state_dict())
    del sd["transformer_blocks.1.attn2.to_gate_logits.weight"]
    sd["transformer_blocks.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing 1 keys \['blocks.1.attn2.to_gate_logits.weight'\].*mystery"):
        convert_state_dict(sd, cfg)


def test_official_single_file_loads_lazily(tmp_path):
    """An official-layout file (prefix, old names, VAE keys beside the transformer) -> the same model."""
    ref = diffusers_ltx2("split", False)
    cfg, _ = dit_config_from_diffusers(ref.config)
    official = {}
    for key, w in ref.state_dict().items():
        for old, new in (("proj_in.", "patchify_proj."), ("time_embed.", "adaln_single."),
                         ("prompt_adaln.", "prompt_adaln_single.")):
            if key.startswith(old):
                key = new + key[len(old):]
        key = key.replace(".norm_q.", ".q_norm.").replace(".norm_k.", ".k_norm.")
        official["model.diffusion_model." + key] = w.contiguous()
    official["vae.per_channel_statistics.mean-of-means"] = torch.zeros(8)
    save_file(official, tmp_path / "ltx.safetensors")
    loaded = load_ltx2(str(tmp_path / "ltx.safetensors"), cfg)
    expected = load_dit(ref.state_dict(), cfg)
    for (name, a), (_, b) in zip(sorted(loaded.state_dict().items()), sorted(expected.state_dict().items())):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.freqs, expected.freqs)
