"""ssm.scan.mamba3 (Mamba-3's scan) against the official pure-PyTorch references in
float32, forward and backward, and against itself: chunked == reference, state passing,
resets, decoding."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require
from ssm.scan.mamba3 import Mamba3State, mamba3_scan, mamba3_state_update

TOL = 1e-4  # float32, relative to the largest magnitude of the compared result
BATCH, LENGTH, HEADS, GROUPS, HEAD_DIM, STATE = 2, 34, 4, 2, 8, 16  # chunks of 5 and 8 do not
# divide 34 nor its halves (prefix and suffix then share one compiled program)


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def angle_err(ours, ref):
  """Angles compared on the circle (the official step references do not wrap them)."""
  d = np.asarray(ours, np.float64) - np.asarray(ref, np.float64)
  return float(np.max(np.abs(np.remainder(d + math.pi, 2 * math.pi) - math.pi)))


def make_inputs(seed, rank=None, n_angles=STATE // 4, length=LENGTH, gate=True):
  """Fresh float32 inputs in mamba3_scan's layout; rank None: SISO. dt spans 0.01..0.5
  and the angles' tanh most of (-1, 1), so the rotations and decays both matter."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  bc = (BATCH, length, GROUPS, STATE) if rank is None else (BATCH, length, rank, GROUPS, STATE)
  bias = (HEADS, STATE) if rank is None else (HEADS, rank, STATE)
  dt = np.exp(rng.uniform(np.log(0.01), np.log(0.5), (BATCH, length, HEADS))).astype(np.float32)
  args = dict(x=r(BATCH, length, HEADS, HEAD_DIM), dt=dt,
              adt=(-rng.uniform(0.5, 4.0, dt.shape) * dt).astype(np.float32),
              trap=r(BATCH, length, HEADS), B=r(*bc), C=r(*bc),
              angles=r(BATCH, length, HEADS, n_angles), B_bias=0.5 * r(*bias),
              C_bias=0.5 * r(*bias), D=r(HEADS))
  if gate:
    args["z"] = r(BATCH, length, HEADS, HEAD_DIM)
  if rank is not None:
    args.update(mimo_x=r(HEADS, rank, HEAD_DIM) / rank, mimo_o=r(HEADS, rank, HEAD_DIM) / rank)
    if gate:
      args["mimo_z"] = r(HEADS, rank, HEAD_DIM)
  return args


def make_state(seed, rank=None, n_angles=STATE // 4):
  rng = np.random.default_rng(seed)
  r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  k = (BATCH, HEADS, STATE) if rank is None else (BATCH, rank, HEADS, STATE)
  return Mamba3State(rng.uniform(0, 2 * math.pi, (BATCH, HEADS, n_angles)).astype(np.float32),
                     r(BATCH, HEADS, HEAD_DIM, STATE), r(*k), r(BATCH, HEADS, HEAD_DIM))


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "rotate_pairwise"))
def scan_vjp(args, state, reset, cot, impl, chunk_size, rotate_pairwise):
  """mamba3_scan's (y, final state) and the gradients of <cot, (y, final state)> with
  respect to the arguments and the initial state: one compiled program, which the tests
  with the same shapes and options share (all arguments given, positionally: jit's
  cache tells an omitted static argument from one given)."""
  scan = lambda args, state: mamba3_scan(
      **args, initial_state=state, return_final_state=True, reset=reset, impl=impl,
      chunk_size=chunk_size, rotate_pairwise=rotate_pairwise)
  out, vjp = jax.vjp(scan, args, state)
  return (out, *vjp(cot))


def run(args, state, reset, impl="chunked", chunk_size=8):
  """mamba3_scan forward, called in the one form that the forward tests share."""
  return mamba3_scan(**args, initial_state=state, return_final_state=True, impl=impl,
                     reset=reset, chunk_size=chunk_size)


def no_reset(length=LENGTH):
  return np.zeros((BATCH, length), bool)


def random_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda t: jnp.asarray(rng.standard_normal(np.shape(t)), jnp.float32), tree)


# -- The official references, from state-spaces/mamba at commit
# e9594ce1c732d97440f0332fdc43170a2294dbfa (mamba_ssm itself needs CUDA to import). The
# einops calls are written as torch ops; the dtype casts (float32 here) and the varlen and
# fused-norm branches, which these tests do not use, are left out.

def _segsum(x):
  """tests/ops/triton/test_mamba3_siso.py: _segsum."""
  torch = require("torch")
  T = x.size(-1)
  x = x.unsqueeze(-1).expand(*x.shape, T)
  mask = torch.tril(torch.ones(T, T, device=x.device, dtype=bool), diagonal=-1)
  x = x.masked_fill(~mask, 0)
  x_segsum = torch.cumsum(x, dim=-2)
  mask = torch.tril(torch.ones(T, T, device=x.device, dtype=bool), diagonal=0)
  x_segsum = x_segsum.masked_fill(~mask, -torch.inf)
  return x_segsum


def mamba3_siso_fwd_ref(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None,
                        Initial_States=None):
  """tests/ops/triton/test_mamba3_siso.py: mamba3_siso_fwd_ref (batched mode). Q, K:
  (b, s, h_qk, n); V, Z: (b, s, h, p); ADT, DT, Trap: (b, h, s); Angles: (b, s, h, a)."""
  torch = require("torch")
  F = torch.nn.functional
  batch, total_seqlen, nheads_qk, headdim_qk = Q.shape
  _, _, nheads, headdim_v = V.shape
  device = Q.device
  if Initial_States is not None:
    Initial_Angle_State, Initial_SSM_State, Initial_K_State, Initial_V_State = Initial_States

  Angles = torch.tanh(Angles) * math.pi
  # Expand Q/K for GQA
  if Q.shape[2] != V.shape[2]:
    Q = Q.repeat_interleave(V.shape[2] // Q.shape[2], dim=2)
  if K.shape[2] != V.shape[2]:
    K = K.repeat_interleave(V.shape[2] // K.shape[2], dim=2)

  out_zs, Final_Angle_States, Final_SSM_States, Final_K_States, Final_V_States = [], [], [], [], []
  TWO_PI = 2 * math.pi

  def _rotary(tensor, cos, sin):
    tensor_reshaped = tensor.view(*tensor.shape[:-1], -1, 2)
    tensor_0 = tensor_reshaped[..., 0]
    tensor_1 = tensor_reshaped[..., 1]
    if cos.shape[-1] < tensor_0.shape[-1]:
      pad_size = tensor_0.shape[-1] - cos.shape[-1]
      cos = F.pad(cos, (0, pad_size), value=1.0)
      sin = F.pad(sin, (0, pad_size), value=0.0)
    rotated_0 = tensor_0 * cos - tensor_1 * sin
    rotated_1 = tensor_0 * sin + tensor_1 * cos
    return torch.stack([rotated_0, rotated_1], dim=-1).view_as(tensor)

  def compute_one_sequence(seq_idx):
    Q_curr, K_curr, V_curr = Q[seq_idx], K[seq_idx], V[seq_idx]
    ADT_curr, DT_curr, Trap_curr = ADT[seq_idx], DT[seq_idx], Trap[seq_idx]
    Angles_curr = Angles[seq_idx]
    Z_curr = Z[seq_idx] if Z is not None else None

    Trap_curr = torch.sigmoid(Trap_curr)

    Angles_scaled = Angles_curr.float() * DT_curr.transpose(0, 1).unsqueeze(-1)
    Angles_Cumsum = torch.cumsum(Angles_scaled, dim=0)
    if Initial_States is not None:
      Initial_Angle_State_curr = Initial_Angle_State[seq_idx]
      Angles_Cumsum = Angles_Cumsum + Initial_Angle_State_curr.unsqueeze(0)
    Angles_Cumsum = Angles_Cumsum - TWO_PI * torch.floor(Angles_Cumsum / TWO_PI)
    Final_Angle_States.append(Angles_Cumsum[-1])

    # Initialize acc_states
    if Initial_States is not None:
      Initial_SSM_State_curr = Initial_SSM_State[seq_idx]
      Initial_K_State_curr = Initial_K_State[seq_idx]
      Initial_V_State_curr = Initial_V_State[seq_idx]

      scalar = DT_curr[:, 0] * (1 - Trap_curr[:, 0])
      acc_states = (Initial_SSM_State_curr + Initial_V_State_curr[:, :, None]
                    * Initial_K_State_curr[:, None, :] * scalar[:, None, None])
    else:
      acc_states = torch.zeros((nheads, headdim_v, headdim_qk), device=device, dtype=torch.float32)

    # Compute shifted gamma and scale
    DT_shifted = F.pad(DT_curr[:, 1:], (0, 1))
    Trap_shifted = F.pad(Trap_curr[:, 1:], (0, 1))
    shifted_gamma = DT_shifted * (1 - Trap_shifted)
    scale = DT_curr * Trap_curr + DT_shifted * (1 - Trap_shifted)

    # Add biases
    Q_curr = Q_curr + Q_bias.unsqueeze(0)
    K_curr = K_curr + K_bias.unsqueeze(0)

    # Compute QK dot for skip connection
    QK_dot = torch.sum(K_curr * Q_curr, dim=-1) * shifted_gamma.transpose(0, 1)

    # Rotary embeddings using Angles_Cumsum
    cos_angles_curr = torch.cos(Angles_Cumsum).to(Q_curr.dtype)
    sin_angles_curr = torch.sin(Angles_Cumsum).to(Q_curr.dtype)
    Q_curr = _rotary(Q_curr, cos_angles_curr, sin_angles_curr)
    K_curr = _rotary(K_curr, cos_angles_curr, sin_angles_curr)

    Final_K_States.append(K_curr[-1])
    Final_V_States.append(V_curr[-1])

    K_curr_scaled = K_curr * scale.transpose(0, 1).unsqueeze(-1).to(K_curr.dtype)

    # Compute output via quadratic attention
    QK = torch.einsum("thd,shd->hts", Q_curr, K_curr_scaled)
    QK_causal = torch.tril(QK)
    QK_causal = (QK_causal * torch.exp(_segsum(ADT_curr))).to(QK_causal.dtype)
    out = torch.einsum("hts,shd->thd", QK_causal, V_curr)

    if Initial_States is not None:
      da_cs = torch.cumsum(ADT_curr, dim=-1)
      exp_da_cs = torch.exp(da_cs)
      out = out + torch.einsum("hDd,thd,ht->thD", acc_states.to(Q_curr.dtype), Q_curr,
                               exp_da_cs.to(Q_curr.dtype))

    if D is not None:
      out = out + D[None, :, None] * V_curr

    out = out - V_curr * QK_dot.unsqueeze(-1)

    if Z_curr is not None:
      out = out * Z_curr * torch.sigmoid(Z_curr)
    out_zs.append(out)

    # Compute final state
    da_cs_last = torch.exp(torch.sum(ADT_curr, dim=-1))
    da_cs_rev = torch.exp(torch.sum(ADT_curr, dim=-1, keepdim=True)
                          - torch.cumsum(ADT_curr, dim=-1))
    V_curr_scaled = V_curr * da_cs_rev.permute(1, 0).unsqueeze(-1).to(V_curr.dtype)
    final_acc_states = acc_states * da_cs_last.unsqueeze(-1).unsqueeze(-1) + torch.einsum(
        "thd,thD->hDd", K_curr_scaled, V_curr_scaled.to(K_curr_scaled.dtype))
    Final_SSM_States.append(final_acc_states)

  for seq_idx in range(batch):
    compute_one_sequence(seq_idx)

  return torch.stack(out_zs, dim=0), tuple(
      torch.stack(s, dim=0)
      for s in (Final_Angle_States, Final_SSM_States, Final_K_States, Final_V_States))


def mamba3_MIMO_step_ref(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, MIMO_V, MIMO_O, D=None,
                         Z=None, MIMO_Z=None, Input_States=None):
  """tests/ops/tilelang/test_mamba3_mimo.py: mamba3_MIMO_step_ref (pairwise rotations; its
  V state is the projected v, (b, h, r, p), and its K state (b, h, r, n))."""
  torch = require("torch")
  F = torch.nn.functional
  batch, seqlen, mimo_rank, nheads_qk, headdim_qk = Q.shape
  _, _, nheads, headdim_v = V.shape
  headdim_angles = Angles.shape[-1]
  device = Q.device
  assert seqlen > 0

  # Expand Q/K for GQA
  if Q.shape[3] != V.shape[2]:
    Q = Q.repeat_interleave(V.shape[2] // Q.shape[3], dim=3)
  if K.shape[3] != V.shape[2]:
    K = K.repeat_interleave(V.shape[2] // K.shape[3], dim=3)

  def apply_rotary_emb(tensor, cos, sin):
    tensor_reshaped = tensor.view(*tensor.shape[:-1], -1, 2)
    tensor_0 = tensor_reshaped[..., 0]
    tensor_1 = tensor_reshaped[..., 1]
    if cos.shape[-1] < tensor_0.shape[-1]:
      pad_size = tensor_0.shape[-1] - cos.shape[-1]
      cos = F.pad(cos, (0, pad_size), value=1.0)
      sin = F.pad(sin, (0, pad_size), value=0.0)
    rotated_0 = tensor_0 * cos - tensor_1 * sin
    rotated_1 = tensor_0 * sin + tensor_1 * cos
    rotated = torch.stack([rotated_0, rotated_1], dim=-1).view_as(tensor)
    return rotated

  q_bias = Q_bias.permute(1, 0, 2)
  k_bias = K_bias.permute(1, 0, 2)

  # Initialize states
  if Input_States is not None:
    Angle_State, SSM_State, K_State, V_State = Input_States
    Angle_State = Angle_State.clone()
    SSM_State = SSM_State.clone().to(torch.float32)
    K_State = K_State.clone()
    V_State = V_State.clone()
  else:
    Angle_State = torch.zeros((batch, nheads, headdim_angles), dtype=torch.float32, device=device)
    SSM_State = torch.zeros((batch, nheads, headdim_v, headdim_qk), dtype=torch.float32,
                            device=device)
    K_State = torch.zeros((batch, nheads, mimo_rank, headdim_qk), dtype=Q.dtype, device=device)
    V_State = torch.zeros((batch, nheads, mimo_rank, headdim_v), dtype=V.dtype, device=device)

  # MIMO up project x and z:
  v_proj = torch.einsum("bthd,hrd->btrhd", V, MIMO_V)
  if Z is not None:
    z_proj = torch.einsum("bthd,hrd->btrhd", Z, MIMO_Z)
  else:
    z_proj = None

  out_arr = []

  # Main SSM recurrence
  for idx in range(seqlen):
    q = Q[:, idx, :, :, :] + q_bias.unsqueeze(0)
    k = K[:, idx, :, :, :] + k_bias.unsqueeze(0)
    v = v_proj[:, idx, :, :, :]  # (B R H P)
    adt = ADT[:, :, idx]
    dt = DT[:, :, idx]
    trap = torch.nn.functional.sigmoid(Trap[:, :, idx])
    z = z_proj[:, idx, :, :, :] if z_proj is not None else None
    angles = Angles[:, idx, :, :]  # (B H N)

    q = q.permute(0, 2, 1, 3)  # (B H R N)
    k = k.permute(0, 2, 1, 3)
    v = v.permute(0, 2, 1, 3)
    if z is not None:
      z = z.permute(0, 2, 1, 3)

    Angle_State = Angle_State + torch.tanh(angles) * dt.unsqueeze(-1) * math.pi

    # Apply rotary embeddings to Q and K using cumulative angles
    cos_angles = torch.cos(Angle_State).unsqueeze(2)  # (B H 1 N)
    sin_angles = torch.sin(Angle_State).unsqueeze(2)
    q_rot = apply_rotary_emb(q, cos_angles, sin_angles)
    k_rot = apply_rotary_emb(k, cos_angles, sin_angles)

    alpha = torch.exp(adt)
    beta = (1 - trap) * dt * alpha
    gamma = trap * dt

    # Update SSM state using previous K_State and V_State
    prev_kv = torch.einsum("bhrd,bhrp->bhpd", K_State, V_State)
    curr_kv = torch.einsum("bhrd,bhrp->bhpd", k_rot, v)
    SSM_State = alpha.unsqueeze(-1).unsqueeze(-1) * SSM_State
    SSM_State = SSM_State + beta.unsqueeze(-1).unsqueeze(-1) * prev_kv
    SSM_State = SSM_State + gamma.unsqueeze(-1).unsqueeze(-1) * curr_kv

    # Compute output
    out = torch.einsum("bhpd,bhrd->bhrp", SSM_State, q_rot.to(SSM_State.dtype))

    if D is not None:
      out = out + D[None, :, None, None] * v

    if z is not None:
      out = out * z * torch.sigmoid(z)

    out = torch.einsum("bhrp,hrp->bhp", out, MIMO_O)
    out_arr.append(out)

    # Update K and V states for next step
    K_State = k_rot
    V_State = v

  out = torch.stack(out_arr, dim=1)
  Final_States = (Angle_State, SSM_State, K_State, V_State)
  return out, Final_States


def apply_angle_dt_reference(angle, dt):
  """tests/ops/tilelang/test_mamba3_mimo.py: apply_angle_dt_reference. angle (b, s, h, a),
  dt (b, s, h)."""
  torch = require("torch")
  base_vals = angle.to(torch.float32)
  base_vals = torch.tanh(base_vals) * dt[..., None].to(torch.float32) * torch.pi
  return torch.cumsum(base_vals, dim=1)


def _pad_zeros(t, pad_len, dim):
  """tests/ops/tilelang/test_mamba3_mimo.py: _pad_zeros."""
  torch = require("torch")
  if t is None or pad_len == 0:
    return t
  shape = list(t.shape)
  shape[dim] = pad_len
  return torch.cat([t, torch.zeros(shape, device=t.device, dtype=t.dtype)], dim=dim)


def mamba3_MIMO_chunk_ref(q, k, v, q_bias, k_bias, mimo_v, mimo_o, z, mimo_z, angles, dA_cs,
                          dA_cs_rev, dt, trap, D, chunk_size=64, rotary_dim_divisor=4,
                          rotate_pairwise=False, contract_mimo_out=True):
  """tests/ops/tilelang/test_mamba3_mimo.py: mamba3_MIMO_chunk_ref (single-sequence path,
  the TileLang kernels' rotations by default; angles cumulated, dA_cs and dA_cs_rev the
  within-chunk cumulated A dt and its complement to the chunk end, (b, h, s))."""
  torch = require("torch")
  # Pad to the next multiple of chunk_size so the chunked rearranges are valid
  # for sequences whose length is not a multiple of chunk_size.
  orig_seqlen = q.shape[1]
  pad_len = (chunk_size - orig_seqlen % chunk_size) % chunk_size
  if pad_len > 0:
    q = _pad_zeros(q, pad_len, dim=1)
    k = _pad_zeros(k, pad_len, dim=1)
    v = _pad_zeros(v, pad_len, dim=1)
    angles = _pad_zeros(angles, pad_len, dim=1)
    z = _pad_zeros(z, pad_len, dim=1)
    dA_cs = _pad_zeros(dA_cs, pad_len, dim=2)
    dA_cs_rev = _pad_zeros(dA_cs_rev, pad_len, dim=2)
    dt = _pad_zeros(dt, pad_len, dim=2)
    trap = _pad_zeros(trap, pad_len, dim=2)

  nchunks = q.shape[1] // chunk_size
  b_, h_ = dA_cs.shape[:2]
  dA_cs = dA_cs.view(b_, h_, nchunks, chunk_size)
  dA_cs_rev = dA_cs_rev.view(b_, h_, nchunks, chunk_size)

  batch, seqlen, mimo_rank, nheads_qk, dstate = q.shape
  nheads = v.shape[-2]
  if nheads_qk != nheads:
    q = q.repeat_interleave(nheads // nheads_qk, dim=3)
    k = k.repeat_interleave(nheads // nheads_qk, dim=3)

  q_bias = q_bias.permute(1, 0, 2)
  k_bias = k_bias.permute(1, 0, 2)
  q = q + q_bias[None, None, :, :, :]
  k = k + k_bias[None, None, :, :, :]

  qk_dot = torch.einsum("bsRhd,bsrhd->bsRrh", q, k)

  if angles is not None:
    angles = angles.unsqueeze(2)
    cos_angles = torch.cos(angles)
    sin_angles = torch.sin(angles)

    def apply_rotary_emb(tensor, cos, sin):
      if rotate_pairwise:
        # Pairwise convention used by mamba3_MIMO_step_ref / debug_mimo_step.py.
        tensor_reshaped = tensor.view(*tensor.shape[:-1], -1, 2)
        tensor_0 = tensor_reshaped[..., 0]
        tensor_1 = tensor_reshaped[..., 1]
        rotated_0 = tensor_0 * cos - tensor_1 * sin
        rotated_1 = tensor_0 * sin + tensor_1 * cos
        return torch.stack([rotated_0, rotated_1], dim=-1).view_as(tensor)
      # Kernel-aligned convention (kept as default for existing tests).
      tensor_reshaped = tensor.view(*tensor.shape[:-1], 2, -1)
      tensor_0 = tensor_reshaped[..., 0, :]
      tensor_1 = tensor_reshaped[..., 1, :]
      rotated_0 = tensor_0 * cos - tensor_1 * sin
      rotated_1 = tensor_0 * sin + tensor_1 * cos
      return torch.stack([rotated_0, rotated_1], dim=-2).view_as(tensor)

    def apply_rotary_emb_rotate_half(tensor, cos, sin):
      tensor_reshaped = tensor.view(*tensor.shape[:-1], 4, -1)
      tensor_0 = tensor_reshaped[..., 0, :]
      tensor_1 = tensor_reshaped[..., 2, :]
      rotated_0 = tensor_0 * cos - tensor_1 * sin
      rotated_1 = tensor_0 * sin + tensor_1 * cos
      return torch.stack(
          [rotated_0, tensor_reshaped[..., 1, :], rotated_1, tensor_reshaped[..., 3, :]],
          dim=-2,
      ).view_as(tensor)

    if rotary_dim_divisor == 4:
      q = apply_rotary_emb_rotate_half(q, cos_angles, sin_angles)
      k = apply_rotary_emb_rotate_half(k, cos_angles, sin_angles)
    elif rotary_dim_divisor == 2:
      q = apply_rotary_emb(q, cos_angles, sin_angles)
      k = apply_rotary_emb(k, cos_angles, sin_angles)
    else:
      raise ValueError(f"Invalid rotary_dim_divisor: {rotary_dim_divisor}")

  trap = torch.nn.functional.sigmoid(trap)
  gamma = dt * trap
  dt_shifted = torch.nn.functional.pad(dt[:, :, 1:], (0, 1), value=0.0)
  trap_shifted = torch.nn.functional.pad(trap[:, :, 1:], (0, 1), value=0.0)
  shifted_gamma = dt_shifted * (1 - trap_shifted)
  factor = gamma + shifted_gamma
  k = torch.einsum("bsrhn,bhs->bsrhn", k, factor)
  qk_dot = torch.einsum("bsrRh,bhs->bsrRh", qk_dot, shifted_gamma)

  v = torch.einsum("bthd,hrd->btrhd", v, mimo_v)

  def segsum_unstable(x):
    x_segsum = x[..., :, None] - x[..., None, :]
    mask = torch.tril(torch.ones(x.size(-1), x.size(-1), device=x.device, dtype=torch.bool),
                      diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)

  mimo_mask_outer = segsum_unstable(dA_cs)
  mimo_mask_inner = torch.ones(mimo_rank, mimo_rank, dtype=torch.bool, device=q.device)
  mimo_mask = torch.kron(mimo_mask_outer, mimo_mask_inner[None, None, None, :, :])

  # "b (n c) r h d -> b h n c r d" and "... c r d -> ... (c r) d"
  by_chunk = lambda t: t.view(batch, nchunks, chunk_size, mimo_rank, nheads, -1).permute(
      0, 4, 1, 2, 3, 5)
  rows = lambda t: t.reshape(batch, nheads, nchunks, chunk_size * mimo_rank, -1)
  q = rows(by_chunk(q))
  k_scaled = by_chunk(k)
  k_scaled = torch.einsum("bhncrd,bhnc->bhncrd", k_scaled, torch.exp(dA_cs_rev))
  k_scaled = rows(k_scaled)
  k = rows(by_chunk(k))
  v = rows(by_chunk(v))
  kv = k_scaled.transpose(-1, -2) @ v

  curr_state = torch.zeros_like(kv[:, :, 0, :, :])
  for n in range(nchunks):
    curr_dA_sum = dA_cs[:, :, n, -1]
    next_state = (torch.exp(curr_dA_sum[:, :, None, None]) * curr_state) + kv[:, :, n, :, :]
    kv[:, :, n, :, :] = curr_state
    curr_state = next_state

  q_inter = q * torch.exp(dA_cs.repeat_interleave(mimo_rank, dim=-1).unsqueeze(-1))
  inter = q_inter @ kv
  intra = ((q @ k.transpose(-1, -2)) * torch.exp(mimo_mask)) @ v
  o = inter + intra
  o = o.view(batch, nheads, nchunks, chunk_size, mimo_rank, -1)

  v = v.view(batch, nheads, nchunks, chunk_size, mimo_rank, -1).reshape(
      batch, nheads, nchunks * chunk_size, mimo_rank, -1)
  qk_dot = qk_dot.permute(0, 4, 1, 2, 3)
  qkv = torch.einsum("bhtRr,bhtrp->bhtRp", qk_dot, v)
  qkv = qkv.view(batch, nheads, nchunks, chunk_size, mimo_rank, -1)
  o -= qkv

  if D is not None:
    vd = torch.einsum("bhtrp,h->bhtrp", v, D)
    vd = vd.view(batch, nheads, nchunks, chunk_size, mimo_rank, -1)
    o += vd

  if z is not None:
    z = torch.einsum("bthd,hrd->btrhd", z, mimo_z)
    z = by_chunk(z)
    o = o * torch.nn.functional.silu(z)

  if contract_mimo_out:
    o = torch.einsum("bhncrd,hrd->bhncd", o, mimo_o)
    out = o.permute(0, 2, 3, 1, 4).reshape(batch, nchunks * chunk_size, nheads, -1)
    return out[:, :orig_seqlen]

  out = o.permute(0, 2, 3, 4, 1, 5).reshape(batch, nchunks * chunk_size, mimo_rank, nheads, -1)
  return out[:, :orig_seqlen]


def torch_args(args):
  """mamba3_scan's arguments as leaf tensors with gradients."""
  torch = require("torch")
  return {n: torch.tensor(np.asarray(a), requires_grad=True) for n, a in args.items()}


def heads_last(t):
  """(b, s, h) -> (b, h, s), the official layout of DT, ADT and Trap."""
  return t.permute(0, 2, 1)


# -- Parity with the official references ----------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_siso_matches_official_fwd_ref(impl):
  """mamba3_siso_fwd_ref, which the Triton kernels are tested against: output, the final
  (angle, ssm, k, v) states and every gradient, from an initial state, with groups."""
  torch = require("torch")
  args, state = make_inputs(0), make_state(1)
  t, ts = torch_args(args), torch_args(state._asdict())
  out_ref, states_ref = mamba3_siso_fwd_ref(
      t["C"], t["B"], t["x"], heads_last(t["adt"]), heads_last(t["dt"]), heads_last(t["trap"]),
      t["C_bias"], t["B_bias"], t["angles"], t["D"], t["z"],
      Initial_States=(ts["angle"], ts["ssm"], ts["k"], ts["v"]))
  out_ref = (out_ref, Mamba3State(*states_ref))
  cot = random_like(jax.tree.map(lambda t: t.detach().numpy(), out_ref), 2)
  torch.autograd.backward(jax.tree.leaves(out_ref),
                          [torch.tensor(np.asarray(c)) for c in jax.tree.leaves(cot)])
  (y, final), grads, g_state = scan_vjp(args, state, no_reset(), cot, impl,
                                        5 if impl == "chunked" else None, None)
  assert rel_err(y, out_ref[0].detach()) < TOL
  assert angle_err(final.angle, out_ref[1].angle.detach()) < TOL
  for name in ("ssm", "k", "v"):
    assert rel_err(getattr(final, name), getattr(out_ref[1], name).detach()) < TOL, name
  for name in args:
    assert rel_err(grads[name], t[name].grad) < TOL, name
  for name in Mamba3State._fields:
    assert rel_err(getattr(g_state, name), ts[name].grad) < TOL, name


@pytest.mark.parametrize("divisor,impl,reduce", [(4, "chunked", True), (2, "reference", False)])
def test_mimo_matches_official_chunk_ref(divisor, impl, reduce):
  """mamba3_MIMO_chunk_ref, which the TileLang kernels are tested against: output and
  every gradient, rank 3 and groups, the kernels' rotations of a quarter (the module's
  rope_fraction 0.5) or half of the state (1.0), with and without z and mimo_o."""
  torch = require("torch")
  rank, chunk = 3, 8
  args = make_inputs(3, rank=rank, n_angles=STATE // divisor, gate=reduce)
  if not reduce:
    del args["mimo_o"]
  t = torch_args(args)
  adt = heads_last(t["adt"])
  pad = (-LENGTH) % chunk
  dA_cs = torch.cumsum(torch.nn.functional.pad(adt, (0, pad)).view(BATCH, HEADS, -1, chunk), -1)
  dA_cs_rev = (dA_cs[..., -1:] - dA_cs).view(BATCH, HEADS, -1)[..., :LENGTH]
  dA_cs = dA_cs.view(BATCH, HEADS, -1)[..., :LENGTH]
  out_ref = mamba3_MIMO_chunk_ref(
      t["C"], t["B"], t["x"], t["C_bias"], t["B_bias"], t["mimo_x"], t.get("mimo_o"),
      t.get("z"), t.get("mimo_z"), apply_angle_dt_reference(t["angles"], t["dt"]), dA_cs,
      dA_cs_rev, heads_last(t["dt"]), heads_last(t["trap"]), t["D"], chunk_size=chunk,
      rotary_dim_divisor=divisor, contract_mimo_out=reduce)
  cot = random_like(out_ref.detach().numpy(), 4)
  out_ref.backward(torch.tensor(np.asarray(cot)))
  no_state = jax.tree.map(np.zeros_like, make_state(0, rank, STATE // divisor))
  (y, _), grads, _ = scan_vjp(args, None, no_reset(), (cot, no_state), impl,
                              5 if impl == "chunked" else None, None)
  assert y.shape == out_ref.shape
  assert rel_err(y, out_ref.detach()) < TOL
  for name in args:
    assert rel_err(grads[name], t[name].grad) < TOL, name


def test_mimo_matches_official_step_ref():
  """mamba3_MIMO_step_ref (pairwise rotations) from an initial state: the output, the
  final states (its V state is mimo_x times ours: the official module caches x) and the
  gradients."""
  torch = require("torch")
  rank = 2
  args, state = make_inputs(6, rank=rank), make_state(7, rank=rank)
  t, ts = torch_args(args), torch_args(state._asdict())
  out_ref, (angle, ssm, k, v) = mamba3_MIMO_step_ref(
      t["C"], t["B"], t["x"], heads_last(t["adt"]), heads_last(t["dt"]), heads_last(t["trap"]),
      t["C_bias"], t["B_bias"], t["angles"], t["mimo_x"], t["mimo_o"], t["D"], t["z"],
      t["mimo_z"], Input_States=(ts["angle"], ts["ssm"], ts["k"].permute(0, 2, 1, 3),
                                 torch.einsum("bhp,hrp->bhrp", ts["v"], t["mimo_x"])))
  # Cotangents on the output and the final states but v (the reference's is projected).
  cot = random_like((out_ref.detach().numpy(), state), 8)
  cot = (cot[0], cot[1]._replace(v=jnp.zeros_like(cot[1].v)))
  torch.autograd.backward([out_ref, angle, ssm, k], [
      torch.tensor(np.asarray(c)) for c in (cot[0], cot[1].angle, cot[1].ssm,
                                            jnp.swapaxes(cot[1].k, 1, 2))])
  (y, final), grads, g_state = scan_vjp(args, state, no_reset(), cot, "chunked", 5, True)
  assert rel_err(y, out_ref.detach()) < TOL
  assert angle_err(final.angle, angle.detach()) < TOL
  assert rel_err(final.ssm, ssm.detach()) < TOL
  assert rel_err(final.k, k.detach().permute(0, 2, 1, 3)) < TOL
  assert rel_err(jnp.einsum("bhp,hrp->bhrp", final.v, args["mimo_x"]), v.detach()) < TOL
  for name in args:
    assert rel_err(grads[name], t[name].grad) < TOL, name
  for name in Mamba3State._fields:
    assert rel_err(getattr(g_state, name), ts[name].grad) < TOL, name


# -- The scan against itself ----------------------------------------------------------------


SEQUENCE = ("x", "z", "dt", "adt", "trap", "B", "C", "angles")  # the arguments with a length axis


def steps(args, lo, hi):
  return {n: a[:, lo:hi] if n in SEQUENCE else a for n, a in args.items()}


def step(args, i):
  return {n: a[:, i] if n in SEQUENCE else a for n, a in args.items()}


def doc_reset(starts, length=LENGTH):
  reset = no_reset(length)
  reset[:, starts] = True
  return reset


@pytest.mark.parametrize("rank,pairwise", [(None, None), (2, True)])
def test_chunked_matches_reference(rank, pairwise):
  """Chunks of 5 steps (not dividing the length), resets (one at a chunk boundary, one
  inside a chunk, one at step 0 of one sequence), an initial state: outputs, final
  states and gradients."""
  args, state = make_inputs(10, rank=rank), make_state(11, rank=rank)
  reset = doc_reset([10, 22])
  reset[1, 0] = True
  cot = (random_like(args["x"], 12), random_like(state, 13))
  ref = scan_vjp(args, state, reset, cot, "reference", None, pairwise)
  ours = scan_vjp(args, state, reset, cot, "chunked", 5, pairwise)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
    assert rel_err(a, b) < TOL, jax.tree_util.keystr(path)


def test_chunk_sizes():
  """Chunks of one step and one chunk longer than the sequence, with resets, against chunks
  of 8 (which test_state_passing_resets_and_decoding ties to `mamba3_state_update`, the
  reference's step): outputs and final state."""
  args, state = make_inputs(14, rank=2), make_state(15, rank=2)
  reset = doc_reset([8, 30])
  expected = jax.tree.leaves(run(args, state, reset))
  for chunk in (1, 64):
    for a, b in zip(jax.tree.leaves(run(args, state, reset, chunk_size=chunk)), expected):
      assert rel_err(a, b) < TOL, chunk


@pytest.mark.parametrize("rank", [None, 2])
def test_state_passing_resets_and_decoding(rank):
  """The final state of a prefix continues the scan exactly: a second pass from it, and
  `mamba3_state_update` step by step, give the full pass's outputs and final state. A
  reset at the same step: the first document from the initial state, then the second
  from zero."""
  args, state = make_inputs(30, rank=rank), make_state(31, rank=rank)
  t = LENGTH // 2
  y, final = run(args, state, no_reset())
  y1, mid = run(steps(args, 0, t), state, no_reset(t))
  y2, final2 = run(steps(args, t, LENGTH), mid, no_reset(LENGTH - t))
  assert rel_err(y, np.concatenate([y1, y2], axis=1)) < TOL
  for a, b in zip(final, final2):
    assert rel_err(a, b) < TOL

  y_reset, final_reset = run(args, state, doc_reset([t]))
  y2, final2 = run(steps(args, t, LENGTH), jax.tree.map(np.zeros_like, state),
                   no_reset(LENGTH - t))
  assert rel_err(y_reset, np.concatenate([y1, y2], axis=1)) < TOL
  for a, b in zip(final_reset, final2):
    assert rel_err(a, b) < TOL

  outs, s = [], mid
  for i in range(t, LENGTH):
    out, s = mamba3_state_update(s, **step(args, i))
    outs.append(out)
  assert rel_err(np.stack(outs, axis=1), y[:, t:]) < TOL
  for a, b in zip(s, final):
    assert rel_err(a, b) < TOL


def test_argument_errors():
  args = make_inputs(50)
  with pytest.raises(ValueError, match="angles"):
    mamba3_scan(**{**args, "angles": args["angles"].repeat(3, axis=-1)})  # 12 > state / 2
  with pytest.raises(ValueError, match="B: expected"):
    mamba3_scan(**{**args, "B": args["B"][:, :, :, :-1], "C": args["C"][:, :, :, :-1]})
  with pytest.raises(ValueError, match="mimo_x"):
    mamba3_scan(**{**args, "mimo_x": np.ones((HEADS, 1, HEAD_DIM), np.float32)})
  with pytest.raises(ValueError, match="state.k"):
    mamba3_scan(**args, initial_state=make_state(0, rank=2))
  with pytest.raises(ValueError, match="impl"):
    mamba3_scan(**args, impl="fused")
