import pytest
import torch

from text import BOS, EMPTY_PROMPT, EOS, PAD, TextConfig, TextEncoder, tokenize


def test_ids():
    assert (BOS, EOS, PAD) == (256, 257, 258)


def test_tokenize_is_byte_exact():
    tokens, mask = tokenize(["hi", "é!"], max_len=6)
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    assert tokens.tolist() == [[256, 104, 105, 257, 258, 258],
                               [256, 0xC3, 0xA9, 33, 257, 258]]  # "é" is two UTF-8 bytes
    assert mask.tolist() == [[True, True, True, True, False, False],
                             [True, True, True, True, True, False]]


def test_truncation_keeps_bos_and_eos():
    tokens, mask = tokenize(["abcdef"], max_len=5)
    assert tokens.tolist() == [[256, 97, 98, 99, 257]]
    assert mask.all()
    tokens, _ = tokenize(["abc"], max_len=5)  # fits exactly
    assert tokens.tolist() == [[256, 97, 98, 99, 257]]
    with pytest.raises(ValueError):
        tokenize(["a"], max_len=1)


def test_empty_prompt():
    assert EMPTY_PROMPT == ""
    tokens, mask = tokenize([EMPTY_PROMPT], max_len=4)
    assert tokens.tolist() == [[256, 257, 258, 258]]
    assert mask.tolist() == [[True, True, False, False]]


def tiny_encoder(seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(TextConfig(dim=32, depth=2, heads=4, max_len=24))


def test_encoder_shapes_and_zero_padding():
    enc = tiny_encoder()
    tokens, mask = tokenize(["a cartoon face", EMPTY_PROMPT], max_len=20)
    with torch.no_grad():
        out = enc(tokens, mask)
    assert out.shape == (2, 20, 32)
    assert torch.equal(out[~mask], torch.zeros(int((~mask).sum()), 32))
    assert out[mask].abs().sum(-1).gt(0).all()


def test_padding_invariance():
    """Real-token outputs do not depend on how much padding follows, nor on what the pad ids are."""
    enc = tiny_encoder()
    prompts = ["hi", "a face that smiles", EMPTY_PROMPT]
    with torch.no_grad():
        short_tokens, short_mask = tokenize(prompts, max_len=21)
        long_tokens, long_mask = tokenize(prompts, max_len=24)
        short, long = enc(short_tokens, short_mask), enc(long_tokens, long_mask)
        junk = long_tokens.masked_fill(~long_mask, ord("x"))  # pad slots hold real bytes, mask says pad
        with_junk = enc(junk, long_mask)
    for row, prompt in enumerate(prompts):
        n = len(prompt.encode()) + 2
        torch.testing.assert_close(long[row, :n], short[row, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(with_junk[row, :n], long[row, :n], atol=1e-5, rtol=1e-5)
        alone_tokens, alone_mask = tokenize([prompt], max_len=n)  # no padding at all
        with torch.no_grad():
            torch.testing.assert_close(enc(alone_tokens, alone_mask)[0], long[row, :n], atol=1e-5, rtol=1e-5)


def test_attention_is_bidirectional():
    enc = tiny_encoder()
    with torch.no_grad():
        a = enc(*tokenize(["cat"], max_len=8))
        b = enc(*tokenize(["car"], max_len=8))
    assert not torch.allclose(a[0, 0], b[0, 0])  # BOS sees the last byte


def test_block_matches_hand_written_attention():
    """One block against a per-head loop with an explicit masked softmax."""
    enc = tiny_encoder()
    block = enc.blocks[0]
    tokens, mask = tokenize(["hey", "a"], max_len=6)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        out = block(x, mask)
        q, k, v = block.qkv(block.norm1(x)).split(32, dim=-1)
        heads = []
        for h in range(4):
            sl = slice(8 * h, 8 * h + 8)
            scores = q[..., sl] @ k[..., sl].transpose(1, 2) / 8 ** 0.5
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
            heads.append(scores.softmax(-1) @ v[..., sl])
        expected = x + block.proj(torch.cat(heads, dim=-1))
        expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_encode_matches_forward_and_backprop():
    enc = tiny_encoder()
    emb, mask = enc.encode(["hello", EMPTY_PROMPT])
    assert emb.shape == (2, 24, 32) and mask.dtype == torch.bool
    torch.testing.assert_close(emb, enc(*tokenize(["hello", EMPTY_PROMPT], max_len=24)))
    emb.sum().backward()
    assert enc.token_emb.weight.grad is not None and enc.pos_emb.grad is not None


def test_too_long_sequence_raises():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="max_len"):
        enc(*tokenize(["hi"], max_len=25))
