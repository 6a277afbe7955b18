"""gradcal_jax: gradient calibration for JAX training, as pure optax transforms.

Every public transform is a factory returning an ``optax.GradientTransformation``
that composes with ``optax.chain``; ``stats(opt_state)`` reads what they record.
"""

from gradcal_jax.monitoring import stats

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "stats",
]
