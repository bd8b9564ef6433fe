"""PNG figures for Dagster metadata (markdown with an inline data URI renders in the UI)."""

from __future__ import annotations

import base64
import io

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def png_markdown(fig, title: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _figure().close(fig)
    return f"**{title}**\n\n![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def loss_curves(history: list[dict], batch_curve: list[float]) -> str:
    plt = _figure()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    epochs = [h["epoch"] for h in history]
    a.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    a.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("log loss")
    a.legend()
    b.plot(np.arange(len(batch_curve)) * 20, batch_curve)
    b.set_xlabel("batch")
    b.set_ylabel("train loss (mean of 20 batches)")
    return png_markdown(fig, "Training and validation loss")


def score_histogram(positive: np.ndarray, negative: np.ndarray) -> str:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3))
    bins = np.linspace(0, 1, 41)
    ax.hist(negative, bins=bins, alpha=0.6, density=True, label="sampled negatives")
    ax.hist(positive, bins=bins, alpha=0.6, density=True, label="held-out purchases")
    ax.set_xlabel("predicted probability")
    ax.legend()
    return png_markdown(fig, "Held-out score distribution (the test half)")
