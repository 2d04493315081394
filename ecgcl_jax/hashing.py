"""Counter-based random bits: a keyed integer hash of each element's position (cheap on every backend).

Used by the model's dropout masks and by the augmentations' normals and permutations.
"""

import jax
import jax.numpy as jnp

_GOLDEN = 0x9E3779B9


def lowbias32(v):
    """32-bit integer hash (C. Wellons' 'lowbias32'): a bijection of uint32 with near-ideal avalanche."""
    v = v ^ (v >> 16)
    v = v * jnp.uint32(0x7FEB352D)
    v = v ^ (v >> 15)
    v = v * jnp.uint32(0x846CA68B)
    return v ^ (v >> 16)


def hash_bits(seed, shape) -> jax.Array:
    """uint32 random bits of `shape`: a keyed hash of each element's flat position (counter-based, like threefry).

    seed: (2,) uint32. Positions are row-major indices of the whole (global) array, so a sharded array gets the same
    bits as an unsharded one. Positions wrap at 2**32 elements.
    """
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % (1 << 32))
        stride *= shape[d]
    return lowbias32(lowbias32(idx * jnp.uint32(_GOLDEN) + seed[0]) ^ seed[1])
