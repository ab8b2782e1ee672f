"""Semi-convolutional operators (Novotny et al., ECCV 2018), docs/semiconv.md, in float64: the
embedding, per-instance means, the instance mean loss, affinities, seeded mask logits and the
voting ops, with the analytic gradients of the differentiable ones.

Shapes: embeddings psi (or phi) [N, D, H, W]; labels [N, H, W] (0 = background, 1..K the
instances); centers [N, K, D]; foreground [N, H, W] bool. ``coordinates=True`` reads phi and
adds the pixel coordinates (y * sy to channel 0, x * sx to channel 1) first; every gradient with
respect to psi is then the gradient with respect to phi.

Choices (pydeform's, documented in docs/semiconv.md):
- The unit vector e = v / ||v|| is 0 where v = 0 (the norm's kink).
- A center with a NaN coordinate is never the nearest; a pixel with no candidate center (or
  whose nearest one is farther than max_distance) gets label 0.
- hough_votes rounds half away from zero and ignores a vote that falls outside the map or is
  NaN; it reads channels 0 and 1.
"""

import numpy as np

REDUCTIONS = ("none", "sum", "mean")
KERNELS = ("laplacian", "gaussian")
SEED_MODES = ("argmax", "softmax")


def _spacing(spacing):
    sy, sx = (spacing, spacing) if np.ndim(spacing) == 0 else spacing
    return float(sy), float(sx)


def semiconv_embed(phi, spacing=1.0):
    """psi = phi with y * sy added to channel 0 and x * sx to channel 1."""
    psi = np.array(phi, dtype=np.float64)
    sy, sx = _spacing(spacing)
    height, width = psi.shape[2:]
    psi[:, 0] += sy * np.arange(height)[:, None]
    psi[:, 1] += sx * np.arange(width)[None, :]
    return psi


def _psi(psi, coordinates, spacing):
    return semiconv_embed(psi, spacing) if coordinates else np.asarray(psi, dtype=np.float64)


def _unit(vectors, axis):
    """vectors / ||vectors|| along ``axis``, 0 where the norm is 0; also the norms."""
    norms = np.sqrt((vectors**2).sum(axis=axis, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where(norms == 0, 0.0, vectors / norms)
    return unit, np.squeeze(norms, axis)


def instance_means(psi, labels, K, *, coordinates=False, spacing=1.0):
    """(means float64 [N, K, D], counts int64 [N, K]); means are 0 for empty instances."""
    psi = _psi(psi, coordinates, spacing)
    n, d = psi.shape[:2]
    means = np.zeros((n, K, d))
    counts = np.zeros((n, K), dtype=np.int64)
    for b in range(n):
        for k in range(1, K + 1):
            inside = labels[b] == k
            counts[b, k - 1] = inside.sum()
            if counts[b, k - 1]:
                means[b, k - 1] = psi[b][:, inside].mean(axis=1)
    return means, counts


def instance_losses(psi, labels, K, *, coordinates=False, spacing=1.0):
    """L [N, K]: the mean distance of an instance's embeddings to their mean (0 if empty)."""
    psi = _psi(psi, coordinates, spacing)
    means, counts = instance_means(psi, labels, K)
    losses = np.zeros(counts.shape)
    for b in range(psi.shape[0]):
        for k in range(1, K + 1):
            inside = labels[b] == k
            if counts[b, k - 1]:
                diffs = psi[b][:, inside] - means[b, k - 1][:, None]
                losses[b, k - 1] = np.sqrt((diffs**2).sum(axis=0)).mean()
    return losses


def _loss_weights(grad_output, counts, reduction):
    """d loss / d L[n, k] times grad_output, [N, K]."""
    if reduction == "none":
        return np.asarray(grad_output, dtype=np.float64) * np.ones(counts.shape)
    scale = float(grad_output)
    if reduction == "mean":
        scale /= max(int((counts > 0).sum()), 1)
    return np.full(counts.shape, scale)


def instance_mean_loss(psi, labels, K, reduction="mean", *, coordinates=False, spacing=1.0):
    """The instance mean loss: L [N, K] ("none"), its sum, or its mean over non-empty instances."""
    assert reduction in REDUCTIONS, reduction
    losses = instance_losses(psi, labels, K, coordinates=coordinates, spacing=spacing)
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    _, counts = instance_means(psi, labels, K, coordinates=coordinates, spacing=spacing)
    return total / max(int((counts > 0).sum()), 1)


def instance_mean_loss_backward(grad_output, psi, labels, K, reduction="mean", *, coordinates=False, spacing=1.0):
    """d loss / d psi [N, D, H, W]: (w / |S|) (e_u - mean of e over S) inside instance S."""
    psi = _psi(psi, coordinates, spacing)
    means, counts = instance_means(psi, labels, K)
    weights = _loss_weights(grad_output, counts, reduction)
    grad = np.zeros(psi.shape)
    for b in range(psi.shape[0]):
        for k in range(1, K + 1):
            inside = labels[b] == k
            if counts[b, k - 1]:
                unit, _ = _unit(psi[b][:, inside] - means[b, k - 1][:, None], axis=0)
                grad[b][:, inside] = weights[b, k - 1] / counts[b, k - 1] * (unit - unit.mean(axis=1, keepdims=True))
    return grad


def _sigma_array(sigma, shape):
    return np.broadcast_to(np.asarray(sigma, dtype=np.float64), shape)


def affinity(psi, centers, sigma, kernel="laplacian", *, coordinates=False, spacing=1.0):
    """A [N, K, H, W]: exp(-d / sigma) (laplacian) or exp(-d^2 / (2 sigma^2)) (gaussian) of the
    distance d between psi_u and center k; sigma a number or [N, K]."""
    assert kernel in KERNELS, kernel
    psi = _psi(psi, coordinates, spacing)
    centers = np.asarray(centers, dtype=np.float64)
    sigma = _sigma_array(sigma, centers.shape[:2])[:, :, None, None]
    dist = np.sqrt(((psi[:, None] - centers[:, :, :, None, None]) ** 2).sum(axis=2))
    if kernel == "laplacian":
        return np.exp(-dist / sigma)
    return np.exp(-(dist**2) / (2 * sigma**2))


def affinity_backward(grad_output, psi, centers, sigma, kernel="laplacian", *, coordinates=False, spacing=1.0):
    """(grad psi [N, D, H, W], grad centers [N, K, D], grad sigma: 0-d for a number, else [N, K])."""
    psi = _psi(psi, coordinates, spacing)
    centers = np.asarray(centers, dtype=np.float64)
    sig = _sigma_array(sigma, centers.shape[:2])[:, :, None, None]
    values = affinity(psi, centers, sigma, kernel)
    diffs = psi[:, None] - centers[:, :, :, None, None]  # [N, K, D, H, W]
    g = np.asarray(grad_output, dtype=np.float64) * values
    if kernel == "laplacian":
        unit, dist = _unit(diffs, axis=2)
        d_diffs = -(g / sig)[:, :, None] * unit
        d_sigma = (g * dist / sig**2).sum(axis=(2, 3))
    else:
        dist2 = (diffs**2).sum(axis=2)
        d_diffs = -(g / sig**2)[:, :, None] * diffs
        d_sigma = (g * dist2 / sig**3).sum(axis=(2, 3))
    grad_sigma = d_sigma if np.ndim(sigma) else np.asarray(d_sigma.sum())
    return d_diffs.sum(axis=1), -d_diffs.sum(axis=(3, 4)), grad_sigma


def _seeds(scores, psi, mode):
    """(seeds [R, D], softmax weights [R, h*w] or argmax indices [R])."""
    r = scores.shape[0]
    flat_scores = scores.reshape(r, -1)
    flat_psi = psi.reshape(r, psi.shape[1], -1)
    if mode == "argmax":
        index = np.argmax(flat_scores, axis=1)  # the first maximum: the lowest flat index
        return flat_psi[np.arange(r), :, index], index
    shifted = np.exp(flat_scores - flat_scores.max(axis=1, keepdims=True))
    weights = shifted / shifted.sum(axis=1, keepdims=True)
    return np.einsum("rdu,ru->rd", flat_psi, weights), weights


def seeded_mask_logits(scores, psi, sigma, mode="argmax", *, coordinates=False, spacing=1.0):
    """out [R, h, w] = scores - ||psi_u - seed|| / sigma, seed from the scores (sigma a number or [R])."""
    assert mode in SEED_MODES, mode
    scores = np.asarray(scores, dtype=np.float64)
    psi = _psi(psi, coordinates, spacing)
    seeds, _ = _seeds(scores, psi, mode)
    sigma = _sigma_array(sigma, scores.shape[:1])[:, None, None]
    dist = np.sqrt(((psi - seeds[:, :, None, None]) ** 2).sum(axis=1))
    return scores - dist / sigma


def seeded_mask_logits_backward(grad_output, scores, psi, sigma, mode="argmax", *, coordinates=False,
                                spacing=1.0):
    """(grad scores [R, h, w], grad psi [R, D, h, w], grad sigma: 0-d for a number, else [R])."""
    scores = np.asarray(scores, dtype=np.float64)
    psi = _psi(psi, coordinates, spacing)
    g = np.asarray(grad_output, dtype=np.float64)
    r, d = psi.shape[:2]
    seeds, choice = _seeds(scores, psi, mode)
    sig = _sigma_array(sigma, (r,))
    unit, dist = _unit(psi - seeds[:, :, None, None], axis=1)
    grad_scores = g.copy()
    grad_psi = -(g / sig[:, None, None])[:, None] * unit
    grad_seed = ((g / sig[:, None, None])[:, None] * unit).sum(axis=(2, 3))  # [R, D]
    flat_grad_psi = grad_psi.reshape(r, d, -1)
    if mode == "argmax":
        flat_grad_psi[np.arange(r), :, choice] += grad_seed
    else:
        flat_psi = psi.reshape(r, d, -1)
        flat_grad_psi += choice[:, None, :] * grad_seed[:, :, None]
        grad_scores += (choice * np.einsum("rdu,rd->ru", flat_psi - seeds[:, :, None], grad_seed)).reshape(g.shape)
    d_sigma = (g * dist).sum(axis=(1, 2)) / sig**2
    grad_sigma = d_sigma if np.ndim(sigma) else np.asarray(d_sigma.sum())
    return grad_scores, grad_psi, grad_sigma


def round_half_away(x):
    """x rounded half away from zero, exactly: floor(|x| + 0.5) would round the sum first (the
    float just below 0.5 would give 1)."""
    magnitude = np.abs(x)
    whole = np.floor(magnitude)
    return np.sign(x) * np.where(magnitude - whole >= 0.5, np.ceil(magnitude), whole)


def hough_votes(psi, foreground, shape=None, *, coordinates=False, spacing=1.0):
    """int32 [N, H', W']: each foreground pixel adds 1 at (round(psi_0), round(psi_1)) if inside."""
    psi = _psi(psi, coordinates, spacing)
    n, _, height, width = psi.shape
    out_h, out_w = (height, width) if shape is None else shape
    votes = np.zeros((n, out_h, out_w), dtype=np.int32)
    for b in range(n):
        with np.errstate(invalid="ignore"):
            ys, xs = round_half_away(psi[b, 0]), round_half_away(psi[b, 1])
            inside = foreground[b] & (ys >= 0) & (ys < out_h) & (xs >= 0) & (xs < out_w)
        np.add.at(votes[b], (ys[inside].astype(np.int64), xs[inside].astype(np.int64)), 1)
    return votes


def assign_to_centers(psi, foreground, centers, max_distance=np.inf, *, coordinates=False, spacing=1.0):
    """int32 labels [N, H, W]: 1 + the nearest center (lowest k on ties; NaN centers never), 0 off
    the foreground, without a candidate, or when the nearest is farther than max_distance."""
    psi = _psi(psi, coordinates, spacing)
    centers = np.asarray(centers, dtype=np.float64)
    n, _, height, width = psi.shape
    labels = np.zeros((n, height, width), dtype=np.int32)
    for b in range(n):
        for y in range(height):
            for x in range(width):
                if not foreground[b, y, x]:
                    continue
                best, best_k = np.inf, -1
                for k in range(centers.shape[1]):
                    dist = np.sqrt(((psi[b, :, y, x] - centers[b, k]) ** 2).sum())
                    if not np.isnan(dist) and (best_k < 0 or dist < best):
                        best, best_k = dist, k
                if best_k >= 0 and best <= max_distance:
                    labels[b, y, x] = best_k + 1
    return labels
