"""Per-route "kept per request" from a window's intervals: non-negative least squares.

Each interval between two quiet points is a row: how many requests of each route it
completed, and what the worker kept over it. The normal equations ``(X'X) beta = X'y``
are accumulated by :class:`memguard.memory.tracking.RequestTracker`; this module solves
them, with estimates held non-negative ("kept" cannot be negative), and gives each
estimate's standard error.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["MAX_EXACT", "nonnegative_least_squares", "standard_errors"]

MAX_EXACT = 48  # routes solved exactly per window (the least-evidenced rest stay at 0)


def nonnegative_least_squares(xtx: Mapping[int, Mapping[int, float]], xty: Mapping[int, float],
           ) -> dict[int, float]:
    """Non-negative least squares for ``(X'X) beta = X'y``: "kept" cannot be negative.

    Exact: the normal equations are solved by Gaussian elimination on the routes seen
    in the window (a few dozen at most; beyond ``MAX_EXACT`` the routes with the least
    evidence are left at zero), and a route whose estimate comes out negative is fixed
    at zero and the rest solved again (the active-set method). A tiny ridge keeps a
    route that only ever ran beside another from making the system singular.
    """
    active = sorted(xty, key=lambda i: -xtx.get(i, {}).get(i, 0.0))[:MAX_EXACT]
    beta: dict[int, float] = {}
    while active:
        solution = _gauss(xtx, xty, active)
        negative = [i for i in active if solution[i] < 0]
        if not negative:
            beta = solution
            break
        worst = min(negative, key=lambda i: solution[i])
        active = [i for i in active if i != worst]
    return {i: beta.get(i, 0.0) for i in xty}


def standard_errors(xtx: Mapping[int, Mapping[int, float]], xty: Mapping[int, float],
                     yy: float, n: float, beta: Mapping[int, float]) -> dict[int, float]:
    """Standard error of each route's estimate: residual variance times the diagonal of
    ``(X'X)^-1`` (each column of the inverse is one more solve of the same system)."""
    active = sorted(xty, key=lambda i: -xtx.get(i, {}).get(i, 0.0))[:MAX_EXACT]
    k = len(active)
    if k == 0 or n <= k:
        return {}
    fitted = sum(beta.get(i, 0.0) * xty.get(i, 0.0) for i in active)
    quadratic = sum(beta.get(i, 0.0) * xtx.get(i, {}).get(j, 0.0) * beta.get(j, 0.0)
                    for i in active for j in active)
    variance = max(0.0, yy - 2 * fitted + quadratic) / (n - k)
    out: dict[int, float] = {}
    for i in active:
        unit = {j: (1.0 if j == i else 0.0) for j in active}
        column = _gauss(xtx, unit, active)
        out[i] = (variance * max(0.0, column[i])) ** 0.5
    return out


def _gauss(xtx: Mapping[int, Mapping[int, float]], xty: Mapping[int, float],
           active: list[int]) -> dict[int, float]:
    n = len(active)
    m = [[xtx.get(i, {}).get(j, 0.0) for j in active] + [xty.get(i, 0.0)] for i in active]
    for k in range(n):
        m[k][k] += 1e-6 * m[k][k] + 1e-9
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            continue
        m[col], m[pivot] = m[pivot], m[col]
        head = m[col]
        for r in range(n):
            if r != col and m[r][col] != 0.0:
                factor = m[r][col] / head[col]
                row = m[r]
                for c in range(col, n + 1):
                    row[c] -= factor * head[c]
    return {i: (m[k][n] / m[k][k] if abs(m[k][k]) >= 1e-12 else 0.0)
            for k, i in enumerate(active)}
