"""Fit the projections W_q, W_k, W_v of one attention layer by gradient descent,
with NumPy and fastattn only.

A "teacher" layer with random projections maps token embeddings X to targets
Y = attention(X W_q*, X W_k*, X W_v*) (causal). A "student" starts from other
random projections and follows the gradient of the mean squared error, which
fastattn's fused backward gives with respect to Q, K and V; the chain rule through
Q = X W_q (and so on) gives dW_q = X^T dQ summed over the batch.

    python examples/train_attention.py [--steps 200]
"""

import argparse

import numpy as np

import fastattn


def attention_layer(x, w_query, w_key, w_value):
    """Causal self-attention of ``x`` ``(B, L, d_model)``; returns out, lse and Q, K, V."""
    query, key, value = x @ w_query, x @ w_key, x @ w_value  # (B, L, d_k), (B, L, d_k), (B, L, d_v)
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, causal=True,
                                                     return_lse=True)  # (B, L, d_v), (B, L)
    return out, lse, (query, key, value)


def loss_and_gradients(x, target, weights):
    """Mean squared error of the layer's output and its gradients w.r.t. the weights."""
    out, lse, (query, key, value) = attention_layer(x, *weights)
    error = out - target  # (B, L, d_v)
    loss = float(np.mean(error ** 2))
    grad_out = 2.0 * error / error.size  # (B, L, d_v) dLoss/dOut
    grad_q, grad_k, grad_v = fastattn.scaled_dot_product_attention_backward(
        grad_out, query, key, value, out, lse, causal=True)  # like Q, K, V
    # Q = X W_q for every batch entry: dW_q = sum_b X_b^T dQ_b
    grads = [np.einsum("bld,blk->dk", x, grad) for grad in (grad_q, grad_k, grad_v)]
    return loss, grads


def train(steps=200, learning_rate=0.02, report=print):
    """Fit a student layer to a teacher's outputs; return the loss at every step."""
    rng = np.random.default_rng(0)
    batch, length, d_model, d_k, d_v = 16, 24, 8, 8, 8
    x = rng.standard_normal((batch, length, d_model))  # (B, L, d_model) token embeddings
    teacher = [rng.standard_normal(shape) / np.sqrt(d_model)
               for shape in ((d_model, d_k), (d_model, d_k), (d_model, d_v))]
    target = attention_layer(x, *teacher)[0]  # (B, L, d_v)
    student = [rng.standard_normal(w.shape) / np.sqrt(d_model) for w in teacher]

    # Adam: per-weight steps scaled by running moments of the gradient
    first = [np.zeros_like(w) for w in student]
    second = [np.zeros_like(w) for w in student]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    losses = []
    for step in range(1, steps + 1):
        loss, grads = loss_and_gradients(x, target, student)
        losses.append(loss)
        if report and (step == 1 or step % 20 == 0 or step == steps):
            report(f"step {step:4d}  loss {loss:.6f}")
        for w, g, m, v in zip(student, grads, first, second):
            m[...] = beta1 * m + (1 - beta1) * g
            v[...] = beta2 * v + (1 - beta2) * g * g
            m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
            w -= learning_rate * m_hat / (np.sqrt(v_hat) + eps)
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    args = parser.parse_args()
    train(args.steps, args.learning_rate)


if __name__ == "__main__":
    main()
