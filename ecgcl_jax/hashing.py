"""Counter-based random bits: a keyed integer hash of each element's position (cheap on every backend)."""
import jax.numpy as jnp


def lowbias32(v):
  """32-bit integer hash (C. Wellons' 'lowbias32'): a bijection of uint32 with near-ideal avalanche."""
  v = v ^ (v >> 16)
  v = v * jnp.uint32(0x7FEB352D)
  v = v ^ (v >> 15)
  v = v * jnp.uint32(0x846CA68B)
  return v ^ (v >> 16)
