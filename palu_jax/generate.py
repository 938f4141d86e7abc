"""Batched generation: prefill + decode as one jitted program.

The decode loop is a `lax.while_loop` over a `DecodeState`; prompts are
right-padded to a power-of-two bucket, so calls with similar prompt lengths
reuse one compiled program. Any model exposing `init_cache` and
`__call__(tokens, cache, num_valid=, logits_at=)` works, including
compressed ones.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from palu_jax.errors import GenerationError
from palu_jax.sampling import SamplingConfig, sample
from palu_jax.typing import Array

MIN_BUCKET = 16


def bucket_length(n: int, cap: int) -> int:
  """Next power of two >= n (at least MIN_BUCKET), clipped to cap."""
  b = MIN_BUCKET
  while b < n:
    b *= 2
  return max(min(b, cap), n)


@struct.dataclass
class DecodeState:
  cache: object        # the model's cache pytree
  tokens: Array        # [B, M] generated ids, pad after a sequence ends
  last: Array          # [B] token fed at the next step
  step: Array          # [] tokens generated so far
  done: Array          # [B] bool, EOS seen
  key: Array           # PRNG key


# Decode steps per iteration of the outer while loop. The inner loop has a
# static trip count, so XLA runs it without reading a predicate back from the
# device; only every CHUNK-th step pays that synchronisation.
CHUNK = 8


def decode_loop(graphdef, state, init: DecodeState, temperature, top_k, top_p,
                eos_ids, pad_id, *, max_new_tokens: int, greedy: bool = False,
                stream: bool = False) -> DecodeState:
  """Runs decode steps until every sequence hit EOS or M tokens exist.

  One step feeds `last` [B] through the model with the cache, samples the
  next token and appends it to `tokens` [B, M + CHUNK] at column `step`.
  Steps run in chunks of CHUNK, so up to CHUNK - 1 steps past M may run:
  `tokens` and the cache need that much slack.
  """
  def step(_, s: DecodeState) -> DecodeState:
    model = nnx.merge(graphdef, state)
    logits, cache = model(s.last[:, None], s.cache)
    key, sub = jax.random.split(s.key)
    nxt = (jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32) if greedy
           else sample(logits[:, 0], sub, temperature, top_k, top_p))
    nxt = jnp.where(s.done, pad_id, nxt)
    if stream:
      jax.debug.callback(_dispatch_stream, s.step, nxt, ordered=True)
    return DecodeState(
        cache=cache,
        tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, nxt[:, None],
                                                   s.step, axis=1),
        last=nxt, step=s.step + 1, done=s.done | jnp.isin(nxt, eos_ids),
        key=key)

  def cond(s: DecodeState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  return jax.lax.while_loop(
      cond, lambda s: jax.lax.fori_loop(0, CHUNK, step, s), init)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens",
                                             "max_len", "greedy", "stream",
                                             "mesh"))
def _generate_program(graphdef, state, prompt, lengths, key, temperature,
                      top_k, top_p, eos_ids, pad_id, *, max_new_tokens,
                      max_len, greedy, stream, mesh=None):
  """prompt [B, P] right-padded, lengths [B] -> tokens [B, M], steps [].
  With a mesh, the cache is laid out by `sharding.shard.cache_shardings`
  (batch over "data", KV heads / latent groups over "model")."""
  model = nnx.merge(graphdef, state)
  batch = prompt.shape[0]
  cache = model.init_cache(batch, max_len)
  if mesh is not None:
    from palu_jax.sharding.shard import cache_shardings
    cache = jax.lax.with_sharding_constraint(cache,
                                             cache_shardings(cache, mesh))
  logits, cache = model(prompt, cache, num_valid=lengths,
                        logits_at=lengths - 1, fresh_cache=True)
  key, sub = jax.random.split(key)
  first = (jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32) if greedy
           else sample(logits[:, 0], sub, temperature, top_k, top_p))
  if stream:
    jax.debug.callback(_dispatch_stream, jnp.int32(0), first, ordered=True)
  tokens = jnp.full((batch, max_new_tokens + CHUNK), pad_id, jnp.int32)
  init = DecodeState(cache=cache, tokens=tokens.at[:, 0].set(first),
                     last=first, step=jnp.int32(1),
                     done=jnp.isin(first, eos_ids), key=key)
  final = decode_loop(graphdef, state, init, temperature, top_k, top_p,
                      eos_ids, pad_id, max_new_tokens=max_new_tokens,
                      greedy=greedy, stream=stream)
  return (final.tokens[:, :max_new_tokens],
          jnp.minimum(final.step, max_new_tokens))


def _checked_prompts(prompts, vocab_size: int) -> list[list[int]]:
  """A list of token-id lists, each id in [0, vocab_size): a flat list of
  ids, strings or out-of-vocabulary ids are refused (they would decode
  garbage, not fail)."""
  if isinstance(prompts, (str, bytes)) or not isinstance(
      prompts, (list, tuple, np.ndarray)) or len(prompts) == 0:
    raise GenerationError("prompts must be a non-empty list of token-id "
                          "lists, e.g. [[1, 450, 7483]] (encode text with "
                          "the tokenizer first)")
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, (str, bytes)) or np.ndim(p) != 1:
      raise GenerationError(
          f"prompt {i} must be a list of token ids, got {type(p).__name__}"
          + (" (a flat list of ids? wrap it: [ids])"
             if isinstance(p, (int, np.integer)) else ""))
    arr = np.asarray(p)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
      raise GenerationError(f"prompt {i}: token ids must be integers, got "
                            f"{arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
      bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
      raise GenerationError(f"prompt {i}: token id {bad} is outside the "
                            f"vocabulary [0, {vocab_size})")
    out.append([int(t) for t in arr])
  return out


class Generator:
  """Jitted text generation for a model (plain or compressed).

  Example:
    gen = Generator(model)
    outs = gen.generate_ids([[1, 2, 3], [4, 5]], max_new_tokens=32)

  With `mesh` (`palu_jax.sharding.mesh.make_mesh("data=2,model=4")`), the
  parameters are placed on its devices by their logical axes, the prompts
  split over "data" and the cache sharded as the parameters are; the
  tokens equal those of one device.
  """

  def __init__(self, model, *, eos_ids: Sequence[int] | None = None,
               pad_id: int = 0, mesh=None):
    self.graphdef, self.state = nnx.split(model)
    self.mesh = mesh
    if mesh is not None:
      from palu_jax.sharding.shard import shard_state
      self.state = shard_state(self.state, mesh)
    self.cfg = model.cfg
    self.eos_ids = list(self.cfg.eos_ids if eos_ids is None else eos_ids)
    self.pad_id = pad_id

  def generate_ids(self, prompts: Sequence[Sequence[int]], *,
                   max_new_tokens: int = 64,
                   sampling: SamplingConfig = SamplingConfig(),
                   seed: int = 0,
                   on_token: Callable[[int, np.ndarray], None] | None = None,
                   ) -> list[list[int]]:
    """Generates up to max_new_tokens ids per prompt (EOS included, if hit).

    Args:
      prompts: token-id lists (different lengths allowed).
      on_token: optional callback(step, ids [B]) called as each token is
        produced (streaming); sequences that already stopped report pad_id.
    """
    prompts = _checked_prompts(prompts, self.cfg.vocab_size)
    if not isinstance(sampling, SamplingConfig):
      raise GenerationError(f"sampling must be a SamplingConfig, got "
                            f"{type(sampling).__name__}")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
      raise GenerationError(f"prompt {lengths.index(0)} is empty; give at "
                            "least one token (e.g. BOS)")
    if max_new_tokens < 1:
      raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ctx = self.cfg.max_seq_len
    longest = max(lengths)
    if longest + max_new_tokens > ctx:
      raise GenerationError(
          f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} "
          f"exceeds the model context of {ctx} tokens (max_seq_len)")
    width = bucket_length(longest, ctx - max_new_tokens)
    prompt = np.full((len(prompts), width), self.pad_id, np.int32)
    for i, p in enumerate(prompts):
      prompt[i, :len(p)] = p
    eos = np.asarray(self.eos_ids or [-1], np.int32)
    if on_token is not None:  # hide the slack steps past M
      user_fn = on_token
      on_token = lambda step, ids: step < max_new_tokens and user_fn(step, ids)
    _STREAM_TARGET[0] = on_token
    prompt, lengths = jnp.asarray(prompt), jnp.asarray(lengths, jnp.int32)
    if self.mesh is not None:
      from palu_jax.sharding.shard import batch_sharding
      prompt = jax.device_put(prompt, batch_sharding(
          prompt.shape, self.mesh, name="prompts"))
      lengths = jax.device_put(lengths, batch_sharding(
          lengths.shape, self.mesh, name="prompt lengths"))
    try:
      with contextlib.ExitStack() as stack:
        if self.mesh is not None:     # the kernels run per device under it
          stack.enter_context(jax.set_mesh(self.mesh))
        tokens, steps = _generate_program(
          self.graphdef, self.state, prompt, lengths, jax.random.key(seed),
          *sampling.as_arrays(), jnp.asarray(eos), jnp.int32(self.pad_id),
          max_new_tokens=max_new_tokens,
          max_len=width + max_new_tokens + CHUNK,
          greedy=sampling.temperature == 0, stream=on_token is not None,
          mesh=self.mesh)
      if self.mesh is not None:
        from palu_jax.sharding.shard import to_host
        tokens = to_host(tokens)
      tokens = np.asarray(tokens)[:, :int(steps)]
    finally:
      _STREAM_TARGET[0] = None
    outs = []
    for row in tokens:
      ids = []
      for t in row.tolist():
        ids.append(t)
        if t in self.eos_ids:
          break
      outs.append(ids)
    return outs

  def compiled_programs(self) -> int:
    """How many generation programs are compiled (for recompile checks)."""
    return _generate_program._cache_size()


# The compiled program calls this fixed function, which forwards to the
# callback of the call in flight: callbacks must not be static arguments, or
# a cached program would keep calling the first one.
_STREAM_TARGET: list = [None]


def _dispatch_stream(step, ids):
  target = _STREAM_TARGET[0]
  if target is not None:
    target(int(step), np.asarray(ids))
