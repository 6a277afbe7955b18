"""What check_gradients returns: a row per leaf, the report and its table."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from gradcal_jax.checking._numerics import VERDICTS, Verdict


class GradientCheckRow(NamedTuple):
  """One checked leaf of a :class:`GradientCheckReport`.

  Attributes:
    path: the leaf's path in the checked argument, ``"layers/0/kernel"``.
    size: its number of entries.
    error: the worst relative error over its directions (see the module doc).
    reverse: reverse-mode directional derivative at that direction.
    forward: forward-mode one, or None when ``jax.jvp`` does not apply
      (a ``custom_vjp`` function).
    finite_difference: the extrapolated finite-difference one.
    uncertainty: the finite differences' estimated error, relative like
      ``error``.
    rtol: the tolerance the error was held to.
    verdict: ``"ok"``, ``"mismatch"``, ``"unreliable"`` or ``"nonfinite"``.
  """

  path: str
  size: int
  error: float
  reverse: float
  forward: float | None
  finite_difference: float
  uncertainty: float
  rtol: float
  verdict: str


class GradientCheckError(AssertionError):
  """Raised by :meth:`GradientCheckReport.raise_if_failed` for a wrong gradient."""


def _fmt(x: float | None) -> str:
  return "skipped" if x is None else f"{x: .4e}"


@dataclasses.dataclass(frozen=True)
class GradientCheckReport:
  """What :func:`check_gradients` found, one row per checked leaf.

  Attributes:
    rows: one :class:`GradientCheckRow` per floating leaf, in tree order.
    precision: ``"float64"`` or ``"input"``.
    num_directions: directions drawn per leaf.
    rounded_to: the dtype the function's values were found rounded to
      (every value the check computed is a number of it, finer than the
      outputs' dtype claims: ``fn`` computes in it and casts back), which
      then set the tolerance and the rounding floor; None when not so.
  """

  rows: tuple[GradientCheckRow, ...]
  precision: str
  num_directions: int
  rounded_to: str | None = None

  @property
  def ok(self) -> bool:
    """True when no leaf is ``mismatch`` or ``nonfinite``."""
    return not self.failures

  @property
  def failures(self) -> tuple[GradientCheckRow, ...]:
    """The ``mismatch`` and ``nonfinite`` rows, worst first."""
    failing = Verdict.MISMATCH.severity
    return tuple(r for r in self._sorted() if Verdict.of(r.verdict).severity >= failing)

  def verdicts(self) -> dict[str, str]:
    """``{path: verdict}`` for every checked leaf."""
    return {r.path: r.verdict for r in self.rows}

  def _sorted(self) -> list[GradientCheckRow]:
    return sorted(self.rows, key=lambda r: (-Verdict.of(r.verdict).severity, -r.error))

  def __str__(self) -> str:
    counts = {v: sum(r.verdict == v for r in self.rows) for v in VERDICTS}
    head = (
      f"gradient check: {len(self.rows)} leaves, "
      + ", ".join(f"{counts[v]} {v}" for v in VERDICTS)
      + f" (precision {self.precision}, "
      + (f"values rounded to {self.rounded_to}, " if self.rounded_to else "")
      + f"{self.num_directions} directions)"
    )
    table = [
      (
        "leaf",
        "size",
        "verdict",
        "error",
        "rtol",
        "reverse",
        "forward",
        "finite diff",
        "fd uncert.",
      )
    ]
    for r in self._sorted():
      table.append(
        (
          r.path or "<root>",
          str(r.size),
          r.verdict,
          f"{r.error:.2e}",
          f"{r.rtol:.1e}",
          _fmt(r.reverse),
          _fmt(r.forward),
          _fmt(r.finite_difference),
          f"{r.uncertainty:.1e}",
        )
      )
    widths = [max(len(row[k]) for row in table) for k in range(len(table[0]))]
    lines = [head]
    for n, row in enumerate(table):
      lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
      if n == 0:
        lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

  def raise_if_failed(self) -> None:
    """Raises :class:`GradientCheckError` naming every failing leaf."""
    if self.ok:
      return
    lines = [f"{len(self.failures)} of {len(self.rows)} leaves have a wrong gradient:"]
    for r in self.failures:
      lines.append(
        f"  {r.path or '<root>'} ({r.verdict}): relative error {r.error:.3e} > "
        f"rtol {r.rtol:.1e}; reverse {_fmt(r.reverse)}, forward {_fmt(r.forward)},"
        f" finite difference {_fmt(r.finite_difference)}"
        f" (uncertainty {r.uncertainty:.1e})"
      )
    lines += ["", str(self)]
    raise GradientCheckError("\n".join(lines))
