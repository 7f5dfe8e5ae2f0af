"""unmask-jax: detect and defend against adversarial attacks on image classifiers, in JAX."""
__version__ = '0.1.0'
