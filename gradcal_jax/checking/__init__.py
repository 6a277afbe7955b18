"""Gradient checking: reverse mode and ``jax.jvp`` against finite differences.

A wrong gradient (a bad ``custom_vjp``, a misplaced ``stop_gradient``, a
broadcasting slip) trains silently and badly. :func:`check_gradients` is the
tool for tests: it checks every leaf of a pytree separately, so a failure names
the parameter that is wrong, and tells a real mismatch from finite differences
that could not be trusted. :func:`gradient_check` is the same comparison as an
optax transform that checks the training gradient every ``every_k`` steps.

For one leaf :math:`x_i` and a random unit direction :math:`v` supported on it,
three estimates of the directional derivative :math:`\\partial_v f` are
compared: reverse mode :math:`\\langle g_i, v\\rangle` (``jax.vjp``), forward
mode (``jax.jvp``), and central differences with Richardson extrapolation,

.. math::
  D(t) = \\frac{f(x + t v) - f(x - t v)}{2t}, \\qquad
  \\hat d = \\frac{4 D(t/2) - D(t)}{3}, \\qquad
  t = \\epsilon^{1/5} \\, \\lVert x_i \\rVert,

so the step follows the leaf's magnitude and dtype (``jax.test_util`` uses a
fixed absolute step, which vanishes below float32's spacing at
:math:`|x| \\sim 10^5`). Errors are relative to
:math:`s = \\max(\\lVert g_i \\rVert / \\sqrt{n_i}, |\\hat d|)`, the size of a
typical directional derivative, which does not blow up when one happens to be
near zero. The finite-difference uncertainty :math:`u` is
:math:`|D(t) - D(t/2)|` plus the fourth difference
:math:`|\\Delta^4 f| / t` (noise, or a kink such as relu at 0, where the
one-sided slopes disagree at every step) plus the rounding floor
:math:`16 \\epsilon |f| / t`. A leaf is ``ok`` when every error is within
``rtol``, ``mismatch`` when an error exceeds both ``rtol`` and
:math:`3u / s`, ``unreliable`` when only the uncertainty could explain it, and
``nonfinite`` when a value is NaN or infinite.

References:
  Richardson, "The deferred approach to the limit" (1927).
  Moré and Wild, "Estimating computational noise" (SIAM J. Sci. Comput., 2011).
  JAX issues 641 and 7742 (fixed finite-difference steps in ``jax.test_util``).
  Wellons, "Prospecting for hash functions" (2018): the ``lowbias32`` integer
  hash behind the random directions.
"""

# Layout (equinox's internal/_loop is the model): _numerics.py (stencil, step,
# tolerance, verdicts), _directions.py (hashed unit directions and the points
# along them), _chunks.py (which leaves one traced body checks), _report.py
# (rows, report, table), _check_gradients.py and _gradient_check.py (the two
# entry points, which import nothing from each other).

from gradcal_jax.checking._check_gradients import check_gradients
from gradcal_jax.checking._gradient_check import GradientCheckState, gradient_check
from gradcal_jax.checking._numerics import VERDICTS, Verdict
from gradcal_jax.checking._report import GradientCheckError, GradientCheckReport, GradientCheckRow

__all__ = [
  "VERDICTS",
  "GradientCheckError",
  "GradientCheckReport",
  "GradientCheckRow",
  "GradientCheckState",
  "Verdict",
  "check_gradients",
  "gradient_check",
]
