import torch

from model import DiT, key_mask
from pipeline import PRESETS
from tests.helpers import tiny_dit, tiny_inputs


def test_output_shape_equals_video_latent_shape():
    model = tiny_dit()
    z_t, t, y, y_mask, z_ref = tiny_inputs(T=2, H=3, W=4)
    assert model(z_t, t, y, y_mask).shape == z_t.shape
    assert model(z_t, t, y, y_mask, z_ref=z_ref).shape == z_t.shape
    assert model(z_t, t, y, y_mask, z_ref=z_ref[:, :, None]).shape == z_t.shape


def test_dropping_reference_via_kv_len_equals_no_reference():
    model = tiny_dit()
    z_t, t, y, y_mask, z_ref = tiny_inputs()
    with torch.no_grad():
        dropped = model(z_t, t, y, y_mask, z_ref=z_ref, ref_keep=torch.tensor([False, True]))
        alone = model(z_t, t, y, y_mask)
        kept = model(z_t, t, y, y_mask, z_ref=z_ref)
    torch.testing.assert_close(dropped[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dropped[1], kept[1], rtol=1e-5, atol=1e-5)
    assert (kept[0] - alone[0]).abs().max() > 1e-3  # the reference does matter when kept


def test_reference_is_seen_at_timestep_zero():
    """The reference segment's modulation is computed at t = 0 for every sample, so a sample's
    reference branch cannot depend on its own t; check via a hand-built alternative forward:
    video at t, reference at 0 equals what the model gives."""
    model = tiny_dit()
    z_t, t, y, y_mask, z_ref = tiny_inputs(B=1)
    emb0, mod0 = model.timestep_modulation(torch.zeros(1))
    emb_t, mod_t = model.timestep_modulation(t)
    assert not torch.allclose(mod0, mod_t)
    calls = []
    orig = model.timestep_modulation
    model.timestep_modulation = lambda tt: calls.append(tt.clone()) or orig(tt)
    with torch.no_grad():
        model(z_t, t, y, y_mask, z_ref=z_ref)
    assert torch.equal(calls[0], t) and torch.equal(calls[1], torch.zeros(1))


def test_key_mask():
    m = key_mask(torch.tensor([2, 4]), 4)
    assert m.shape == (2, 1, 1, 4)
    assert m[0, 0, 0].tolist() == [True, True, False, False] and m[1].all()


def test_one_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = DiT(PRESETS["tiny"].dit).train()  # real init: zero gates and zero output layer
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    z_t, t, y, y_mask, z_ref = tiny_inputs()
    touched = {n: False for n, _ in model.named_parameters()}
    for step in range(3):
        opt.zero_grad()
        v = model(z_t, t, y, y_mask, z_ref=z_ref)
        v.pow(2).mean().add(-(v * z_t).mean()).backward()
        for n, p in model.named_parameters():
            assert p.grad is not None, n
            touched[n] |= bool(p.grad.abs().max() > 0)
        if step == 0:  # adaLN-Zero: the output layer and gates get a gradient on step one
            assert model.proj_out.weight.grad.abs().max() > 0
        opt.step()
    assert all(touched.values()), [n for n, v in touched.items() if not v]


def test_gradient_checkpointing_matches():
    model = tiny_dit(grad_checkpoint=True).train()
    z_t, t, y, y_mask, z_ref = tiny_inputs()
    model(z_t, t, y, y_mask, z_ref=z_ref).sum().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.cfg.grad_checkpoint = False
    model.zero_grad()
    model(z_t, t, y, y_mask, z_ref=z_ref).sum().backward()
    for a, p in zip(g1, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_ltx2_config_builds_on_meta():
    with torch.device("meta"):
        model = DiT(PRESETS["ltx2-video"].dit)
    n = sum(p.numel() for p in model.parameters())
    assert 12e9 < n < 15e9
    attn = model.blocks[0].attn1
    assert attn.heads == 32 and attn.to_q.weight.shape == (4096, 4096)
