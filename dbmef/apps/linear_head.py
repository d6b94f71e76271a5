"""A linear classification head on frozen features: multinomial logistic regression, numpy only.

Objective (convex): mean cross-entropy of softmax(W z + b) + l2/2 ||W||^2 on standardised
features z = (x - mean) / std (the bias is not penalised: scikit-learn's LogisticRegression with
C = 1 / (l2 N) minimises the same function, which the tests use as the independent reference).
Minimised by L-BFGS with an Armijo backtracking line search to a gradient max-norm tolerance; the
standardisation is folded into the returned weights, so the head is one affine map of the raw
features: logits = x @ weight.T + bias.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dbmef.errors import ConfigError

Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclass
class LinearHead:
    weight: np.ndarray  # (C, F) float32, on the raw features
    bias: np.ndarray  # (C,) float32
    info: dict[str, Any] = field(default_factory=dict)  # l2, iterations, final loss and gradient, train accuracy

    def logits(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) @ self.weight.T.astype(np.float64) + self.bias).astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(axis=1)


def objective(z: np.ndarray, y: np.ndarray, n_classes: int, l2: float) -> Objective:
    n, f = z.shape
    onehot = np.zeros((n, n_classes))
    onehot[np.arange(n), y] = 1.0

    def value_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: n_classes * f].reshape(n_classes, f), theta[n_classes * f:]
        s = z @ w.T + b
        s -= s.max(axis=1, keepdims=True)
        lse = np.log(np.exp(s).sum(axis=1))
        loss = float((lse - (s * onehot).sum(axis=1)).mean() + 0.5 * l2 * (w * w).sum())
        p = np.exp(s - lse[:, None]) - onehot
        return loss, np.concatenate([(p.T @ z / n + l2 * w).ravel(), p.mean(axis=0)])

    return value_and_grad


def lbfgs(fun: Objective, x0: np.ndarray, tol: float = 1e-6, max_iter: int = 2000, memory: int = 10
          ) -> tuple[np.ndarray, dict[str, Any]]:
    """Minimise a smooth convex function: L-BFGS two-loop recursion, Armijo backtracking."""
    x, (f, g) = x0, fun(x0)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    iterations = 0
    while iterations < max_iter and np.abs(g).max() > tol:
        iterations += 1
        q, alphas = g.copy(), []
        for s, yv in zip(reversed(s_hist), reversed(y_hist)):
            a = (s @ q) / (yv @ s)
            alphas.append(a)
            q -= a * yv
        if s_hist:
            q *= (s_hist[-1] @ y_hist[-1]) / (y_hist[-1] @ y_hist[-1])
        for (s, yv), a in zip(zip(s_hist, y_hist), reversed(alphas)):
            q += (a - (yv @ q) / (yv @ s)) * s
        d = -q
        if g @ d >= 0:  # not a descent direction (curvature lost): restart from the gradient
            d, s_hist, y_hist = -g, [], []
        step = 1.0
        while True:
            x_new = x + step * d
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * step * (g @ d) or step < 1e-12:
                break
            step *= 0.5
        s, yv = x_new - x, g_new - g
        if s @ yv > 1e-12:
            s_hist.append(s)
            y_hist.append(yv)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        x, f, g = x_new, f_new, g_new
    return x, {"iterations": iterations, "loss": f, "grad_max": float(np.abs(g).max())}


def fit_linear_head(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-3, tol: float = 1e-6,
                    max_iter: int = 2000) -> LinearHead:
    """The minimiser of the module doc's objective on features ``x`` (N, F) and labels ``y`` (N,)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"a head needs features (N, F) and N labels, got {x.shape} and {y.shape}")
    if l2 <= 0:
        raise ConfigError(f"--l2 {l2} is invalid: the head's L2 penalty must be > 0 (it keeps the fit unique)")
    if y.min() < 0 or y.max() >= n_classes:
        raise ConfigError(f"labels must lie in 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std < 1e-8] = 1.0  # a constant feature carries nothing; keep it harmless
    z = (x - mean) / std
    theta, info = lbfgs(objective(z, y, n_classes, l2), np.zeros(n_classes * (x.shape[1] + 1)), tol, max_iter)
    w = theta[: n_classes * x.shape[1]].reshape(n_classes, -1)
    b = theta[n_classes * x.shape[1]:]
    weight = w / std
    head = LinearHead(weight.astype(np.float32), (b - weight @ mean).astype(np.float32),
                      {"l2": l2, "n_train": len(y), "n_features": int(x.shape[1]), **info})
    head.info["train_accuracy"] = float((head.predict(x) == y).mean())
    return head
