"""The whole-MLP RMSprop step that keeps each mask as bits (mlp_ste_rmsprop_bits_step_): its
forward and input-gradient GEMMs unpack the bits while packing their operand, and its fused step
writes the next mask as bits. Checked on every ISA against the reference composition (unpack,
the float step, pack) computed in float64, on odd sizes, float and signed-constant weights."""
import textwrap

import pytest

from tests.ops.isa_runner import ISAS, SCRIPT_HEAD, needs_compiler, run_on_isa

pytestmark = needs_compiler


@pytest.mark.parametrize("isa", ISAS)
def test_bits_step_matches_the_float_step(isa):
    script = SCRIPT_HEAD + textwrap.dedent("""
    # (batch, layer sizes): tails of every tile (16/32-bit pieces, 24- and 32-column GEMM tiles,
    # 48-column weight-gradient tiles), one-row and one-feature layers
    cases = [(13, (50, 37, 29, 5)), (128, (97, 48, 33, 3)), (1, (33, 1, 7, 2)), (40, (784, 300, 100, 10)),
             (9, (20, 30, 2100, 5))]  # the input gradient through 2,100 outputs: K past one 2,048-wide chunk
    for B, dims in cases:
        for signed in (True, False):
            weights, signs, scales, params, sqs = [], [], [], [], []
            for i, o in zip(dims[:-1], dims[1:]):
                scale = (2.0 / i) ** 0.5
                w = torch.where(torch.rand(o, i) < 0.5, scale, -scale) if signed else torch.randn(o, i) * scale
                weights.append(w)
                signs.append(ss.pack_bits(w > 0) if signed else None)
                scales.append(scale if signed else 1.0)
                params.append(torch.randn(o, i) * 0.01)
                sqs.append(torch.rand(o, i) * 1e-3)
            x, y = torch.randn(B, dims[0]), torch.randint(0, dims[-1], (B,))
            words = [ss.pack_bits(p >= 0) for p in params]
            p64, sq64, w64 = [p.double() for p in params], [s.double() for s in sqs], [w.double() for w in weights]
            words64 = [m.clone() for m in words]
            # eps = 0.1: the step is near linear in the gradient, so float rounding stays rounding-sized
            hyper = (1e-2, 0.9, 0.1, 1e-3)
            loss = C.mlp_ste_rmsprop_bits_step_(x, y, weights, signs, scales, words, params, sqs, *hyper)
            loss64 = ref.mlp_ste_rmsprop_bits_step_(x.double(), y, w64, signs, scales, words64, p64, sq64, *hyper)
            assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item()) + 1e-6, (B, dims, signed)
            for l in range(len(params)):
                torch.testing.assert_close(params[l].double(), p64[l], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(sqs[l].double(), sq64[l], rtol=1e-4, atol=1e-9)
                assert torch.equal(words[l], ss.pack_bits(params[l] >= 0)), (B, dims, signed, l)  # pad bits stay 0
            # a second step runs on the masks the first one wrote
            loss2 = C.mlp_ste_rmsprop_bits_step_(x, y, weights, signs, scales, words, params, sqs, *hyper)
            loss64 = ref.mlp_ste_rmsprop_bits_step_(x.double(), y, w64, signs, scales, words64, p64, sq64, *hyper)
            assert abs(loss2.item() - loss64.item()) <= 1e-5 * abs(loss64.item()) + 1e-6, (B, dims, signed)
            for l in range(len(params)):
                torch.testing.assert_close(params[l].double(), p64[l], rtol=1e-5, atol=1e-6)
    # bad input is refused with the argument named
    w = torch.randn(4, 6)
    for bad, message in (([ss.pack_bits(torch.rand(4, 40) > 0.5)], "mask_words[0]"),):
        try:
            C.mlp_ste_rmsprop_bits_step_(torch.randn(2, 6), torch.zeros(2, dtype=torch.long), [w], [None], [1.0], bad,
                                         [torch.zeros(4, 6)], [torch.zeros(4, 6)], 1e-2, 0.9, 1e-8, 0.0)
        except RuntimeError as e:
            assert message in str(e), str(e)
        else:
            raise AssertionError("accepted " + message)
    try:
        C.mlp_ste_rmsprop_bits_step_(torch.randn(2, 6), torch.zeros(2, dtype=torch.long), [w], [ss.pack_bits(w > 0)],
                                     [0.0], [ss.pack_bits(w > 0)], [torch.zeros(4, 6)], [torch.zeros(4, 6)], 1e-2, 0.9, 1e-8, 0.0)
    except RuntimeError as e:
        assert "scales[0]" in str(e), str(e)
    else:
        raise AssertionError("accepted a zero scale")
    print("ok")
    """)
    run_on_isa(script, isa)


@pytest.mark.parametrize("isa", ISAS)
def test_float_mlp_step_matches_the_reference(isa):
    # mlp_ste_rmsprop_step_ (float masked weights): off AVX-512 each layer's weight gradient is formed in
    # its masked weight's memory after that layer's input gradient has read it, so the input gradients,
    # the loss of the next step and the masked weights written are all checked against float64
    script = SCRIPT_HEAD + textwrap.dedent("""
    for B, dims in [(13, (50, 37, 29, 5)), (1, (33, 1, 7, 2)), (40, (784, 300, 100, 10))]:
        weights, params, sqs = [], [], []
        for i, o in zip(dims[:-1], dims[1:]):
            weights.append(torch.randn(o, i) * (2.0 / i) ** 0.5)
            params.append(torch.randn(o, i) * 0.01)
            sqs.append(torch.rand(o, i) * 1e-3)
        masked = [w * (p >= 0) for w, p in zip(weights, params)]
        x, y = torch.randn(B, dims[0]), torch.randint(0, dims[-1], (B,))
        w64, p64, sq64, m64 = ([t.double() for t in ts] for ts in (weights, params, sqs, masked))
        hyper = (1e-2, 0.9, 0.1, 1e-3)
        for step in range(2):  # the second step runs on the masked weights the first one wrote
            loss = C.mlp_ste_rmsprop_step_(x, y, masked, weights, params, sqs, *hyper)
            loss64 = ref.mlp_ste_rmsprop_step_(x.double(), y, m64, w64, p64, sq64, *hyper)
            assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item()) + 1e-6, (B, dims, step)
            for l in range(len(params)):
                torch.testing.assert_close(params[l].double(), p64[l], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(sqs[l].double(), sq64[l], rtol=1e-4, atol=1e-9)
                assert torch.equal(masked[l], weights[l] * (params[l] >= 0)), (B, dims, step, l)
    print("ok")
    """)
    run_on_isa(script, isa)
