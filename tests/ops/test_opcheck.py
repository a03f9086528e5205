"""torch.library.opcheck for every supsup op, once per backend on each device it supports (the
Triton ops too: under TRITON_INTERPRET=1 here, on the GPU there), signed_masked_linear included.
Replaces the two copies that ran on one backend only."""
import pytest
import torch

import supsup_fast as ss
from supsup_fast.ops import bank as bank_ops, bits as bits_ops, masked as masked_ops, signed as signed_ops, superposed as superposed_ops

from tests.devices import backend_devices, ids

PAIRS = backend_devices()


def opcheck_cases(device):
    g = torch.Generator().manual_seed(7)
    k, out, n = 3, 4, 37

    def r(*shape, grad=False):
        t = torch.randn(*shape, generator=g).to(device)
        return t.requires_grad_() if grad else t

    masks = (torch.rand(k, out, n, generator=g) < 0.5).to(device)
    bank = ss.pack_bits(masks.cpu()).to(device)
    cbank = ss.pack_bits(torch.rand(k, 3, 8, generator=g) < 0.5).to(device)
    x, w, b = r(2, n, grad=True), r(out, n, grad=True), r(out, grad=True)
    a = torch.rand(k, generator=g).to(device).requires_grad_()
    cx, cw = r(1, 2, 5, 5, grad=True), r(3, 2, 2, 2, grad=True)
    cl = lambda t: t.detach().to(memory_format=torch.channels_last).requires_grad_(t.requires_grad)
    s = ss.ops.superpose(bank, a.detach(), n)
    sign = ss.pack_bits(torch.rand(out, n, generator=g) < 0.5).to(device)
    return {
        "pack_bits": (bits_ops.pack_bits_op, (masks,)),
        "unpack_bits": (bits_ops.unpack_bits_op, (bank, n)),
        "superpose": (bank_ops.superpose_op, (bank, a, n)),
        "mask_dot": (bank_ops.mask_dot_op, (bank, r(out, n, grad=True))),
        "mask_dot_batched": (bank_ops.mask_dot_batched_op, (bank, r(5, out, n))),
        "mask_dot_outer": (bank_ops.mask_dot_outer_op, (bank, r(5, out), r(5, n), w.detach())),
        "mask_dot_outer_with_copy": (bank_ops.mask_dot_outer_op, (bank, r(5, out), r(5, n), w.detach(),
                                                                 ss.ops.interleave_tasks(bank))),
        "mask_dot_outer_interleaved": (bank_ops.mask_dot_outer_interleaved_op, (ss.ops.interleave_tasks(bank), k, r(5, out),
                                                                               r(5, n), w.detach())),
        "interleave_tasks": (bank_ops.interleave_tasks_op, (bank,)),
        "transpose_masks": (bits_ops.transpose_masks_op, (bank, n)),
        "bank_linear": (bank_ops.bank_linear_op, (r(2, n), w.detach(), bank)),
        "bank_linear_with_copy": (bank_ops.bank_linear_op, (r(n), w.detach(), bank, ss.ops.interleave_tasks(bank))),
        "masked_linear": (masked_ops.masked_linear_op, (x, w, bank[0], b)),
        "masked_linear_nobias": (masked_ops.masked_linear_op, (x, w, bank[0], None)),
        "masked_conv2d": (masked_ops.masked_conv2d_op, (cx, cw, cbank[0], None, [1, 1], [1, 1], [1, 1], 1)),
        "superposed_linear": (superposed_ops.superposed_linear_op, (x, w, bank, a, b)),
        "superposed_conv2d": (superposed_ops.superposed_conv2d_op, (cx, cw, cbank, a, None, [2, 2], [0, 0], [1, 1], 1)),
        "superposed_given_s": (superposed_ops.superposed_given_s_op, (x, w, bank, a, s, None, None)),
        "superposed_given_s_with_copy": (superposed_ops.superposed_given_s_op,
                                         (r(1, n, grad=True), w, bank, a, s, b, None, ss.ops.interleave_tasks(bank))),
        "mask_dot_with_copy": (bank_ops.mask_dot_op, (bank, r(out, n), ss.ops.interleave_tasks(bank))),
        "superpose_with_copy": (bank_ops.superpose_op, (bank, a, n, ss.ops.interleave_weights(bank, n))),
        "interleave_weights": (bank_ops.interleave_weights_op, (bank, n)),
        "superposed_backward_with_copy": (superposed_ops.superposed_backward_op,
                                          (r(1, out), r(1, n), w.detach(), bank, a.detach(), s, None, True, True, False,
                                           ss.ops.interleave_tasks(bank))),
        "masked_backward": (masked_ops.masked_backward_op, (r(2, out), x.detach(), w.detach(), bank[0], None, True, True)),
        "superposed_backward": (superposed_ops.superposed_backward_op, (r(2, out), x.detach(), w.detach(), bank, a.detach(),
                                                             None, None, True, True, False)),
        # other memory formats: the output (and dx) are contiguous, as the fakes say (a compiled graph
        # checks; a channels_last input gave a channels_last output, a transposed x a transposed dx)
        "masked_conv2d_channels_last": (masked_ops.masked_conv2d_op, (cl(cx), cw, cbank[0], None, [1, 1], [1, 1], [1, 1], 1)),
        "superposed_conv2d_channels_last": (superposed_ops.superposed_conv2d_op,
                                            (cl(cx), cw, cbank, a, None, [1, 1], [1, 1], [1, 1], 1)),
        "masked_backward_conv_channels_last": (masked_ops.masked_backward_op, (cl(r(1, 3, 6, 6)), cl(cx.detach()), cw.detach(),
                                                                              cbank[0], [1, 1, 1, 1, 1, 1, 1], True, True)),
        "masked_backward_transposed_x": (masked_ops.masked_backward_op, (r(2, 3, out), r(2, n, 3).transpose(1, 2), w.detach(),
                                                                        bank[0], None, True, True)),
        "superposed_backward_transposed_x": (superposed_ops.superposed_backward_op,
                                             (r(2, 3, out), r(2, n, 3).transpose(1, 2), w.detach(), bank, a.detach(), None,
                                              None, True, True, False)),
        "signed_masked_linear": (signed_ops.signed_masked_linear_op, (x, sign, bank[0], 0.25, b)),
        "signed_masked_linear_small": (signed_ops.signed_masked_linear_op, (r(1, n, grad=True), sign, bank[1], 0.5, None, n)),
    }


CASES = sorted(opcheck_cases(torch.device("cpu")))


def test_every_backend_is_covered():
    names = {name for name, _ in PAIRS}
    assert {"reference", "cpu"} <= names
    assert {"triton", "cuda"} & set(ss.backends.available()) <= names


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name,device", PAIRS, ids=ids(PAIRS))
def test_opcheck(name, device, case):
    with ss.use_backend(name):
        op, args = opcheck_cases(device)[case]
        torch.library.opcheck(op, args)
