"""The reference backend: pure torch on packed bits, any device. It is the oracle every kernel
backend is tested against and the portable fallback.

Finished masks are never kept as floats: ``superpose`` and ``mask_dot`` walk the bank one bit
plane at a time (bit b of every word, for a chunk of tasks), so their transient memory is about
the size of the packed bank chunk, and there is no per-task Python loop.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...bits import BITS_PER_WORD, num_words, pack_bits_torch, unpack_bits_float, unpack_bits_torch
from ..checks import finite_unless_capturing

# Elements of one float bit plane processed at a time (bounds the transient memory to ~32 MiB).
_PLANE_CHUNK = 1 << 23


class DenseLinear:
    """y = x Wᵀ + b and its two gradients, as plain torch."""

    def forward(self, x, w, bias):
        return F.linear(x, w, bias)

    def grad_input(self, g, x, w):
        return g.matmul(w)

    def grad_weight(self, g, x, w):
        return g.reshape(-1, g.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))


class DenseConv2d:
    def __init__(self, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int):
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups

    def forward(self, x, w, bias):
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    # torch.nn.grad's conv2d_* take batched [N, C, H, W] only; F.conv2d also takes one unbatched
    # [C, H, W] image, whose gradients are those of the batch of one.
    def grad_input(self, g, x, w):
        if x.dim() == 3:
            return self.grad_input(g.unsqueeze(0), x.unsqueeze(0), w).squeeze(0)
        return torch.nn.grad.conv2d_input(x.shape, w, g, self.stride, self.padding, self.dilation, self.groups)

    def grad_weight(self, g, x, w):
        if x.dim() == 3:
            return self.grad_weight(g.unsqueeze(0), x.unsqueeze(0), w)
        return torch.nn.grad.conv2d_weight(x, w.shape, g, self.stride, self.padding, self.dilation, self.groups)


def fused_step_ready(tensors) -> bool:
    """Whether a kernel backend's fused optimiser step can take these tensors in place (float32 and
    contiguous); otherwise it falls back to the reference step."""
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def _signed_weight(sign_words: torch.Tensor, n: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The signed-constant weight scale · (sign bit ? 1 : -1) of rows of n sign bits."""
    return (unpack_bits_float(sign_words, n, dtype) * 2 - 1) * scale


def _bias_grad(g: torch.Tensor, conv: bool) -> torch.Tensor:
    return g.sum(dim=(0, 2, 3) if g.dim() == 4 else (1, 2)) if conv else g.reshape(-1, g.shape[-1]).sum(0)


class ReferenceBackend:
    name = "reference"
    # True where mask_dot_batched is a native one-pass kernel: evaluation then infers the tasks of
    # all of a task's test batches in one batched call.
    fast_batched_inference = False
    # bank_linear (every task's output of a layer) is a native one-pass kernel: superposed_linear then
    # computes a first layer's y = D α and, through autograd, its α-gradient Dᵀg from one pass.
    fast_bank_linear = False
    # mask_dot_outer reads a bank's task-interleaved copy (interleave_tasks) when given one: task
    # inference then keeps that copy (as much memory as the bank) for its one-image queries.
    reads_interleaved = False
    # Direct functions for the float32 small-batch (1-16 rows) inference of masked_linear
    # (x, weight, mask_words, bias) and signed_masked_linear (x, sign_words, mask_words, scale, bias)
    # on this backend's device: the op's output, or None where the call is not theirs to take
    # (dispatch.direct_function). None where the backend has none.
    direct_masked_linear = None
    direct_signed_masked_linear = None
    # Checks that a bank's copy given to an op (bank_t, bank_w) is the bank's, at sampled words:
    # (bank, bank_t) and (bank, bank_w, n) -> True, False, or None where the arguments are not theirs
    # to judge (checks.check_bank_t). None where the backend does not read the copies (this one
    # reads the bank alone, so a stale copy cannot change its results).
    interleaved_copy_matches = None
    weight_copy_matches = None

    def transposed_copy_matches(self, bank: torch.Tensor, copy: torch.Tensor) -> Optional[bool]:
        """The copy of the transposed masks is read alone (mask_dot_outer_interleaved), here too: on
        the CPU compared whole with the one rebuilt from the bank; None elsewhere (a GPU would rebuild
        it every call)."""
        if not (bank.is_cpu and copy.is_cpu) or bank.dim() != 3 or copy.dim() != 3 or copy.shape[0] > bank.shape[-1] * 32:
            return None
        return torch.equal(self.interleave_tasks(self.transpose_masks(bank, copy.shape[0])), copy)

    def supports(self, device: torch.device) -> bool:
        return True

    # -- bits ---------------------------------------------------------------------------------
    def pack_bits(self, mask: torch.Tensor) -> torch.Tensor:
        return pack_bits_torch(mask)

    def unpack_bits(self, words: torch.Tensor, n: int) -> torch.Tensor:
        return unpack_bits_torch(words, n)

    def compare_pack(self, values: torch.Tensor, threshold: float, absolute: bool = False) -> torch.Tensor:
        """Pack 1[v ≥ t] (or 1[|v| ≥ t]) of a [out, *rest] score tensor into words [out, W]: a
        training step's threshold mask straight to bits (fused into one kernel where a backend can)."""
        v = values.reshape(values.shape[0], -1)
        return self.pack_bits((v.abs() if absolute else v) >= threshold)

    def masked_weight(self, weight: torch.Tensor, mask_words: torch.Tensor) -> torch.Tensor:
        """W ⊙ M for one packed mask, as a dense tensor shaped like W: W where the bit is set, +0 where
        it is clear (selected, as every kernel does, so a masked-out ±inf or NaN never enters)."""
        n = math.prod(weight.shape[1:])
        return torch.where(unpack_bits_torch(mask_words, n).view_as(weight), weight, weight.new_zeros(()))

    # -- bank products ------------------------------------------------------------------------
    def _task_chunks(self, bank: torch.Tensor) -> List[Tuple[int, int]]:
        per_task = max(1, math.prod(bank.shape[1:]))
        step = max(1, _PLANE_CHUNK // per_task)
        return [(s, min(s + step, bank.shape[0])) for s in range(0, bank.shape[0], step)]

    def superpose(self, bank: torch.Tensor, alpha: torch.Tensor, n: int) -> torch.Tensor:
        """Σᵢ αᵢ Mᵢ: [k, *lead, W] x [k] -> [*lead, n] (dtype of alpha)."""
        lead, w = bank.shape[1:-1], bank.shape[-1]
        planes = torch.zeros(BITS_PER_WORD, math.prod(bank.shape[1:]), dtype=alpha.dtype, device=bank.device)
        for s, e in self._task_chunks(bank):
            chunk = bank[s:e].reshape(e - s, -1)
            a = alpha[s:e]
            for b in range(BITS_PER_WORD):
                planes[b] += a.matmul(((chunk >> b) & 1).to(alpha.dtype))
        out = planes.t().reshape(*lead, w * BITS_PER_WORD)
        return out[..., :n].contiguous()

    def mask_dot(self, bank: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(⟨Mᵢ, v⟩)ᵢ: [k, *lead, W] x [*lead, n] -> [k] (dtype of v)."""
        k, w = bank.shape[0], bank.shape[-1]
        n = v.shape[-1]
        vp = F.pad(v, (0, w * BITS_PER_WORD - n)) if w * BITS_PER_WORD != n else v
        vp = vp.reshape(-1, BITS_PER_WORD).t().contiguous()  # [32, L*W]: one contiguous vector per bit
        out = torch.zeros(k, dtype=v.dtype, device=v.device)
        for s, e in self._task_chunks(bank):
            chunk = bank[s:e].reshape(e - s, -1)
            for b in range(BITS_PER_WORD):
                plane = ((chunk >> b) & 1).to(v.dtype)
                out[s:e] += plane.matmul(vp[b])
        return out

    def bank_linear(self, x: torch.Tensor, weight: torch.Tensor, bank: torch.Tensor,
                    bank_t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every task's masked linear layer on x: out[..., r, t] = Σⱼ x[..., j] W[r, j] Mₜ[r, j];
        x [*, n], bank [k, R, W] -> [*, R, k], bit plane by bit plane (bank_t, the bank's
        task-interleaved copy, is not needed here)."""
        k, rows, w = bank.shape
        n = weight.shape[1]
        x2 = x.reshape(-1, n)
        out = torch.zeros(x2.shape[0], rows, k, dtype=torch.result_type(x2, weight), device=x.device)
        step = max(1, _PLANE_CHUNK // max(1, rows * w * BITS_PER_WORD))  # rows of x per pass: v stays bounded
        for r0 in range(0, x2.shape[0], step):
            v = x2[r0:r0 + step, None, :] * weight  # [b, R, n]
            if w * BITS_PER_WORD != n:
                v = F.pad(v, (0, w * BITS_PER_WORD - n))
            v = v.reshape(v.shape[0], rows, w, BITS_PER_WORD)
            for s, e in self._task_chunks(bank):
                chunk = bank[s:e]
                for b in range(BITS_PER_WORD):
                    out[r0:r0 + step, :, s:e] += torch.einsum("crw,brw->brc", ((chunk >> b) & 1).to(v.dtype), v[..., b])
        return out.reshape(*x.shape[:-1], rows, k)

    def mask_dot_interleaved(self, bank_t: torch.Tensor, k: int, v: torch.Tensor) -> torch.Tensor:
        """mask_dot of the k-task bank that bank_t [*lead, W, kp] interleaves."""
        return self.mask_dot(bank_t[..., :k].movedim(-1, 0).contiguous(), v)

    def mask_dot_outer(self, bank: torch.Tensor, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       bank_t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mask_dot_batched of the q products (g_j x_jᵀ) ⊙ W: [k, R, W] x g [q, R], x [q, n] -> [q, k]
        (bank_t, the bank's task-interleaved copy, is not needed here)."""
        return self.mask_dot_batched(bank, g[:, :, None] * x[:, None, :] * weight)

    def mask_dot_outer_interleaved(self, bank_t: torch.Tensor, k: int, g: torch.Tensor, x: torch.Tensor,
                                   weight: torch.Tensor) -> torch.Tensor:
        """mask_dot_outer of the k-task bank that bank_t [R, W, kp] interleaves."""
        return self.mask_dot_outer(bank_t[..., :k].permute(2, 0, 1).contiguous(), g, x, weight)

    def transpose_masks(self, words: torch.Tensor, n: int) -> torch.Tensor:
        """[*, R, ceil(n/32)] -> [*, n, ceil(R/32)], the words of the transposed masks; unpacked a
        block of matrices at a time (a byte per bit)."""
        lead, (R, W) = words.shape[:-2], words.shape[-2:]
        flat = words.reshape(math.prod(lead), R, W)
        out = flat.new_zeros(flat.shape[0], n, num_words(R))
        step = max(1, (1 << 26) // max(1, R * n))
        for m0 in range(0, flat.shape[0], step):
            mask = self.unpack_bits(flat[m0:m0 + step], n)
            out[m0:m0 + step] = self.pack_bits(mask.transpose(-1, -2).contiguous())
        return out.reshape(*lead, n, num_words(R))

    def interleave_tasks(self, bank: torch.Tensor) -> torch.Tensor:
        """[k, *lead, W] -> [*lead, W, kp]: word w of every task side by side, kp = k rounded up to 16,
        zero words for the tasks past k."""
        k = bank.shape[0]
        out = bank.movedim(0, -1)
        return F.pad(out, (0, -k % 16)).contiguous()

    def interleave_weights(self, bank: torch.Tensor, n: int) -> torch.Tensor:
        """[k, *lead, W] -> [*lead, ceil(k/32), np]: bit i of word (q, c) is weight c's bit of task
        32q + i; np = n rounded up to 16, zero for tasks past k and columns past n."""
        k, lead = bank.shape[0], bank.shape[1:-1]
        kw, np_ = -(-k // 32), -(-n // 16) * 16
        flat = bank.reshape(k, math.prod(lead), bank.shape[-1])
        out = torch.zeros(flat.shape[1], kw, np_, dtype=torch.int32, device=bank.device)
        shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=bank.device)
        for q in range(kw):
            chunk = flat[32 * q:32 * q + 32]  # [c, rows, W]
            bits = ((chunk[..., None] >> shifts) & 1).reshape(chunk.shape[0], chunk.shape[1], -1)[..., :n].to(torch.int64)
            places = torch.arange(chunk.shape[0], device=bank.device).view(-1, 1, 1)
            word = (bits << places).sum(0)  # [rows, n], in [0, 2^32)
            out[:, q, :n] = torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)
        return out.view(*lead, kw, np_)

    def superpose_interleaved(self, bank_w: torch.Tensor, k: int, alpha: torch.Tensor, n: int) -> torch.Tensor:
        """superpose of the k-task bank that bank_w [*lead, ceil(k/32), np] interleaves (interleave_weights)."""
        lead, kw = bank_w.shape[:-2], bank_w.shape[-2]
        words = bank_w.reshape(math.prod(lead), kw, bank_w.shape[-1])[..., :n]
        out = torch.zeros(words.shape[0], n, dtype=alpha.dtype, device=bank_w.device)
        shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=bank_w.device)
        for q in range(kw):
            a = alpha[32 * q:32 * q + 32]
            out += ((words[:, q, :, None] >> shifts[:a.numel()]) & 1).to(alpha.dtype) @ a
        return out.view(*lead, n)

    def mask_dot_batched(self, bank: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(⟨Mᵢ, v_j⟩): [k, *lead, W] x [q, *lead, n] -> [q, k], bit plane by bit plane."""
        k, w = bank.shape[0], bank.shape[-1]
        q, n = v.shape[0], v.shape[-1]
        if q == 0 or k == 0 or v.numel() == 0:
            return torch.zeros(q, k, dtype=v.dtype, device=v.device)
        vp = F.pad(v, (0, w * BITS_PER_WORD - n)) if w * BITS_PER_WORD != n else v
        vp = vp.reshape(q, -1, BITS_PER_WORD).permute(2, 1, 0).contiguous()  # [32, L*W, q]
        out = torch.zeros(q, k, dtype=v.dtype, device=v.device)
        for s, e in self._task_chunks(bank):
            chunk = bank[s:e].reshape(e - s, -1)
            for b in range(BITS_PER_WORD):
                out[:, s:e] += (((chunk >> b) & 1).to(v.dtype).matmul(vp[b])).t()
        return out

    # -- masked (single task) -----------------------------------------------------------------
    def masked_forward(self, dense, x, weight, mask_words, bias):
        return dense.forward(x, self.masked_weight(weight, mask_words), bias)

    def masked_backward(self, dense, grad, x, weight, mask_words, need_input: bool, need_weight: bool):
        dx = dense.grad_input(grad, x, self.masked_weight(weight, mask_words)) if need_input else grad.new_empty(0)
        if need_weight:
            # d/dW of x (W ⊙ M)ᵀ is G ⊙ M with G the gradient w.r.t. the effective weight.
            dw = self.masked_weight(dense.grad_weight(grad, x, weight).contiguous(), mask_words)
        else:
            dw = grad.new_empty(0)
        return dx, dw

    def threshold_masked_weight(self, scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W ⊙ 1[scores ≥ 0] (the training-time threshold supermask), selected as in masked_weight."""
        return torch.where(scores >= 0, weight, weight.new_zeros(()))

    def ste_rmsprop_step_(self, param: torch.Tensor, weight_grad: torch.Tensor, weight: torch.Tensor,
                          square_avg: torch.Tensor, masked_weight: torch.Tensor, lr: float, alpha: float, eps: float,
                          weight_decay: float) -> None:
        """One straight-through RMSprop step of a threshold layer's scores, in place: the score
        gradient dL/dW_eff ⊙ W, torch.optim.RMSprop's rule (no momentum, not centred), then the next
        step's masked weight W ⊙ 1[param ≥ 0]."""
        g = weight_grad * weight
        if weight_decay != 0:
            g = g.add(param, alpha=weight_decay)
        square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        param.addcdiv_(g, square_avg.sqrt().add_(eps), value=-lr)
        masked_weight.copy_(self.threshold_masked_weight(param, weight))

    def ste_adam_step_(self, param: torch.Tensor, weight_grad: torch.Tensor, weight: torch.Tensor,
                       exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, masked_weight: torch.Tensor, step: int,
                       lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
        """:meth:`ste_rmsprop_step_` with torch.optim.Adam's rule (no amsgrad); ``step`` counts
        the updates including this one."""
        g = weight_grad * weight
        if weight_decay != 0:
            g = g.add(param, alpha=weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
        masked_weight.copy_(self.threshold_masked_weight(param, weight))

    def mlp_cross_entropy_grads(self, x: torch.Tensor, y: torch.Tensor,
                                weights: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Mean cross-entropy of the chain x → linear → ReLU → … → linear (no biases) and the
        gradient of every weight, by hand (no autograd); the first layer's input gradient is not formed."""
        inputs, h = [x], x
        for i, w in enumerate(weights):
            h = h.mm(w.t())
            if i + 1 < len(weights):
                h = h.relu_()
                inputs.append(h)
        log_probs = torch.log_softmax(h, 1)
        loss = F.nll_loss(log_probs, y)
        dz = log_probs.exp()
        dz[torch.arange(len(y), device=y.device), y] -= 1
        dz /= len(y)
        grads: List[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
        for i in range(len(weights) - 1, -1, -1):
            grads[i] = dz.t().mm(inputs[i])
            if i > 0:
                dz = torch.ops.aten.threshold_backward(dz.mm(weights[i]), inputs[i], 0)
        return loss, grads

    def mlp_ste_rmsprop_step_(self, x: torch.Tensor, y: torch.Tensor, masked_weights: List[torch.Tensor],
                              weights: List[torch.Tensor], params: List[torch.Tensor], square_avgs: List[torch.Tensor],
                              lr: float, alpha: float, eps: float, weight_decay: float) -> torch.Tensor:
        """A whole straight-through RMSprop step of such an MLP: the loss at ``masked_weights`` and
        every weight gradient (``mlp_cross_entropy_grads``), then each layer's
        ``ste_rmsprop_step_``, which rewrites its masked weight. Returns the loss."""
        loss, grads = self.mlp_cross_entropy_grads(x, y, masked_weights)
        for p, g, w, sq, mw in zip(params, grads, weights, square_avgs, masked_weights):
            self.ste_rmsprop_step_(p, g, w, sq, mw, lr, alpha, eps, weight_decay)
        return loss

    def mlp_ste_rmsprop_bits_step_(self, x: torch.Tensor, y: torch.Tensor, weights: List[torch.Tensor],
                                   sign_words: List[Optional[torch.Tensor]], scales: List[float],
                                   mask_words: List[torch.Tensor], params: List[torch.Tensor],
                                   square_avgs: List[torch.Tensor], lr: float, alpha: float, eps: float,
                                   weight_decay: float) -> torch.Tensor:
        """``mlp_ste_rmsprop_step_`` for layers whose masks are kept as bits, not as a masked float
        weight: layer l's mask is ``mask_words[l]`` (rewritten to the new ``params[l] >= 0``), its
        frozen weight ``weights[l]``, or, where ``sign_words[l]`` is given, the signed-constant
        ``scales[l] · (sign bit ? 1 : -1)`` (``weights[l]`` then gives only the shape). Returns the loss."""
        frozen = [w if sw is None else _signed_weight(sw, w.shape[1], scale, w.dtype)
                  for w, sw, scale in zip(weights, sign_words, scales)]
        masked = [self.masked_weight(w, m) for w, m in zip(frozen, mask_words)]
        loss = self.mlp_ste_rmsprop_step_(x, y, masked, frozen, params, square_avgs, lr, alpha, eps, weight_decay)
        for m, p in zip(mask_words, params):
            m.copy_(self.pack_bits(p >= 0))
        return loss

    def mask_bits_training_step(self, batch: int, num_weights: int) -> bool:
        """Whether ``mlp_ste_rmsprop_bits_step_`` is this backend's faster whole-MLP step at this
        batch size, for an MLP of ``num_weights`` weights in all (else ``mlp_ste_rmsprop_step_`` on
        masked float weights). Here it is a composition of the float step, so no."""
        return False

    def signed_masked_linear(self, x, sign_words, mask_words, scale: float, bias):
        """x (W ⊙ M)ᵀ + b for signed-constant W = scale · (2·sign − 1), W given as sign bits."""
        n = x.shape[-1]
        return F.linear(x, self.masked_weight(_signed_weight(sign_words, n, scale, x.dtype), mask_words), bias)

    # -- superposed ---------------------------------------------------------------------------
    def superposed_forward(self, dense, x, weight, bank, alpha, s: Optional[torch.Tensor], bias):
        if s is None:
            s = self.superpose(bank, alpha.to(weight.dtype), math.prod(weight.shape[1:]))
        return dense.forward(x, weight * s.view_as(weight), bias)

    def superposed_backward(self, dense, grad, x, weight, bank, alpha, s: Optional[torch.Tensor],
                            need_input: bool, need_alpha: bool, need_weight: bool):
        n = math.prod(weight.shape[1:])
        if (need_input or need_weight) and s is None:
            s = self.superpose(bank, alpha.to(weight.dtype), n)
        dx = dense.grad_input(grad, x, weight * s.view_as(weight)) if need_input else grad.new_empty(0)
        dalpha, dw = grad.new_empty(0), grad.new_empty(0)
        if need_alpha or need_weight:
            g_eff = dense.grad_weight(grad, x, weight)  # ∂L/∂W_eff
            if need_alpha:
                # One pass over the bits: ∂L/∂αᵢ = ⟨Mᵢ, G ⊙ W⟩.
                dalpha = mask_dot_ieee(self, bank, (g_eff * weight).reshape(weight.shape[0], n)).to(alpha.dtype)
            if need_weight:
                dw = g_eff * s.view_as(weight)
        return dx, dalpha, dw


def mask_dot_ieee(backend: ReferenceBackend, bank: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``backend.mask_dot(bank, v)`` where v is surely finite, else the reference's sum: the kernels
    add only the set bits, while the contract's Σ Mᵢⱼ vⱼ makes 0·inf and 0·NaN NaN for the tasks
    whose bit is clear (as ``ops.mask_dot`` does for its callers). Unchecked in a CUDA-graph capture."""
    if finite_unless_capturing(v):
        return backend.mask_dot(bank, v)
    return ReferenceBackend.mask_dot(backend, bank, v)
