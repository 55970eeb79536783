"""The continual-setting streams: fixed by their seed, non-stationary as documented."""

from __future__ import annotations

import torch

from experiments.streams import LinearTracking, PermutedDigits


def test_linear_tracking_flips_one_relevant_target_every_interval():
    stream = LinearTracking(steps=200, flip_every=20, batch_size=4, seed=3)
    # The targets are noise-free: least squares on a segment's 80 examples recovers its weights.
    segments = []
    for start in range(0, 200, 20):
        x = stream.x[start : start + 20].reshape(-1, 20)
        y = stream.y[start : start + 20].reshape(-1)
        segments.append(torch.linalg.lstsq(x, y).solution)
    for before, after in zip(segments, segments[1:]):
        changed = (before - after).abs() > 1e-3
        assert changed.sum() == 1 and changed[:5].any()  # one relevant weight flipped
        assert torch.allclose(after[changed], -before[changed], atol=1e-3)
    assert torch.allclose(segments[0][:5].abs(), torch.ones(5), atol=1e-3)
    assert segments[0][5:].abs().max() < 1e-3  # the irrelevant inputs


def test_streams_are_fixed_by_their_seed():
    for make in (lambda seed: LinearTracking(steps=50, seed=seed), lambda seed: PermutedDigits(steps=50, seed=seed)):
        first, again, other = make(0), make(0), make(1)
        assert all(torch.equal(a, b) for a, b in zip(first.batch(37), again.batch(37)))
        assert not torch.equal(first.batch(37)[0], other.batch(37)[0])


def test_permuted_digits_keeps_the_inputs_and_permutes_the_labels_every_interval():
    stream = PermutedDigits(steps=60, permute_every=20, batch_size=32, seed=0)
    mappings = []
    for t in range(0, 60, 20):
        x, y = stream.batch(t)
        assert x.shape == (32, 64) and 0 <= x.min() and x.max() <= 1
        mappings.append(stream._permutations[t // 20])
        # the label is the permuted class of the image's digit
        assert torch.equal(y, mappings[-1][stream.labels[stream._indices[t]]])
        assert sorted(mappings[-1].tolist()) == list(range(10))
    assert not torch.equal(mappings[0], mappings[1]) and not torch.equal(mappings[1], mappings[2])
    assert torch.equal(stream.batch(19)[1], mappings[0][stream.labels[stream._indices[19]]])


def test_linear_tracking_hessian_diagonal_is_exact():
    stream = LinearTracking(steps=5, batch_size=3, seed=0)
    model = stream.model()
    x, y = stream.batch(4)
    hessian = torch.autograd.functional.hessian(lambda w: stream.loss(x @ w.T, y), model.weight.detach())
    assert torch.allclose(stream.hessian_diagonal(model, 4)[model.weight], hessian.reshape(20, 20).diagonal().view(1, 20))
