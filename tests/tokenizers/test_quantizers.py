"""The quantizers against hand computations and independent implementations of their published formulas:
nearest code (Euclidean and cosine), the straight-through estimator, the VQ losses and their gradient split,
the EMA codebook with Laplace smoothing, dead-code restart (also simulated over two processes), usage and
perplexity, VAR's phi indices, multi-scale residual quantisation, its teacher-forcing input and loss, and the
two discrete tokenizers' decode checks and save/load round trip."""
import math

import pytest
import torch
import torch.nn.functional as F

from genvis import load_tokenizer
from genvis.errors import GenvisError
from genvis.tokenizers.multiscale_vq import MultiScaleQuantizer, MultiScaleVQTokenizer, phi_indices
from genvis.tokenizers.vq import (
    EMA_EPS,
    Collectives,
    VQTokenizer,
    VectorQuantizer,
    assignment_fractions,
    entropy_loss,
    nearest_code,
    pick_candidates,
    usage_and_perplexity,
)


def grid(points, h, w):
    """Points [h*w, D] (row-major positions) -> one feature map [1, D, h, w]."""
    return torch.tensor(points, dtype=torch.float32).T.reshape(1, -1, h, w).contiguous()


def set_codes(quantizer, codes):
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor(codes, dtype=torch.float32))


# ----------------------------------------------------------------------------- nearest code

def test_nearest_code_on_a_hand_made_codebook():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    # squared distances to (e0, e1, e2): (0.02, 0.82, 8.42); (0.85, 0.05, 10.25); (4.04, 4.64, 1.04); (0.36, 0.16, 9.36)
    z = torch.tensor([[0.1, 0.1], [0.9, -0.2], [0.2, 2.0], [0.6, 0.0]])
    assert nearest_code(z, codebook).tolist() == [0, 1, 2, 1]


def test_l2_normalised_lookup_picks_by_cosine():
    # z = (1, 0.9) is nearest to e0 = (1, 0) in Euclidean distance, but its direction (42 degrees) is nearest
    # to e1 = (10, 10) (45 degrees); e2 = (0, 0.1) points at 90 degrees.
    codes = [[1.0, 0.0], [10.0, 10.0], [0.0, 0.1]]
    z = grid([[1.0, 0.9], [0.1, 1.0], [3.0, -0.5]], 1, 3)
    points = z[0].reshape(2, 3).T  # [3, 2]
    cos = F.normalize(points, dim=-1) @ F.normalize(torch.tensor(codes), dim=-1).T
    assert cos.argmax(dim=1).tolist() == [1, 2, 0]  # the independent answer
    assert nearest_code(points, torch.tensor(codes)).tolist()[0] == 0  # Euclidean disagrees on the first point

    vq = VectorQuantizer(3, 2, l2_norm=True).eval()
    set_codes(vq, codes)
    assert vq.ids(z).tolist() == [[[1, 2, 0]]]
    out = vq(z)
    assert out["ids"].tolist() == [[[1, 2, 0]]]
    unit = F.normalize(torch.tensor(codes), dim=-1)[[1, 2, 0]]  # [3, 2]
    torch.testing.assert_close(out["quantized"][0].reshape(2, 3).T, unit, atol=1e-6, rtol=0)
    # the commitment is measured between unit vectors
    commitment = (F.normalize(points, dim=-1) - unit).square().mean()
    assert out["log/commitment"].item() == pytest.approx(commitment.item(), abs=1e-7)


# ----------------------------------------------------------------------------- straight-through and losses

def test_straight_through_has_code_values_and_identity_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 3).eval()
    codes = torch.randn(4, 3)
    set_codes(vq, codes.tolist())
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    out = vq(z)
    points = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)  # [8, 3]
    expected_ids = torch.cdist(points.double(), codes.double()).argmin(dim=1)
    assert out["ids"].flatten().tolist() == expected_ids.tolist()
    expected = codes[expected_ids].view(2, 2, 2, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(out["quantized"], expected, atol=1e-6, rtol=0)

    w = torch.randn(2, 3, 2, 2)
    (w * out["quantized"]).sum().backward()
    assert torch.equal(z.grad, w)


def test_loss_value_and_gradient_split():
    vq = VectorQuantizer(3, 2, beta=0.25).train()
    set_codes(vq, [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # p0 = (0.8, 0.1) -> e1, p1 = (0.2, 0.7) -> e2; q - z = (0.2, -0.1), (-0.2, 0.3); sum of squares 0.18, N = 4
    z = grid([[0.8, 0.1], [0.2, 0.7]], 1, 2).requires_grad_(True)
    out = vq(z)
    assert out["ids"].tolist() == [[[1, 2]]]
    assert out["loss"].item() == pytest.approx(0.045 + 0.25 * 0.045, abs=1e-7)
    assert out["log/commitment"].item() == pytest.approx(0.045, abs=1e-7)
    out["loss"].backward()
    # codebook term only: d/de_k = 2 sum_{i in k} (e_k - z_i) / N
    expected_codes = torch.tensor([[0.0, 0.0], [2 * 0.2 / 4, 2 * -0.1 / 4], [2 * -0.2 / 4, 2 * 0.3 / 4]])
    torch.testing.assert_close(vq.embedding.weight.grad, expected_codes, atol=1e-7, rtol=0)
    # beta term only: d/dz = 2 beta (z - q) / N
    expected_z = grid([[2 * 0.25 * -0.2 / 4, 2 * 0.25 * 0.1 / 4], [2 * 0.25 * 0.2 / 4, 2 * 0.25 * -0.3 / 4]], 1, 2)
    torch.testing.assert_close(z.grad, expected_z, atol=1e-7, rtol=0)


def test_entropy_loss_against_its_formula():
    torch.manual_seed(1)
    d = torch.rand(5, 4).double() * 0.05
    p = torch.softmax(-d / 0.01, dim=-1)
    per_vector = -(p * p.log()).sum(dim=-1).mean()
    m = p.mean(dim=0)
    of_mean = -(m * m.log()).sum()
    assert entropy_loss(d, 0.01).item() == pytest.approx((per_vector - of_mean).item(), abs=1e-4)


# ----------------------------------------------------------------------------- EMA codebook

def test_ema_codebook_update_by_hand():
    torch.manual_seed(0)
    k, d = 4, 2
    vq = VectorQuantizer(k, d, ema=True, ema_decay=0.9, beta=0.25)
    assert not vq.embedding.weight.requires_grad
    torch.testing.assert_close(vq.ema_count, torch.full((k,), 0.25))
    torch.testing.assert_close(vq.ema_sum, vq.embedding.weight.detach() / k)

    # the state right after construction with these codes
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    set_codes(vq, codes.tolist())
    vq.ema_sum.copy_(codes / k)
    points = [[0.1, 0.0], [0.9, 0.1], [1.1, -0.1], [0.1, 0.8]]  # -> codes 0, 1, 1, 2; code 3 unused
    z = grid(points, 2, 2).requires_grad_(True)
    out = vq.train()(z)
    assert out["ids"].flatten().tolist() == [0, 1, 1, 2]

    n_vec, dec = 4, 0.9
    pts = torch.tensor(points, dtype=torch.float64)
    p = torch.tensor([1, 2, 1, 0], dtype=torch.float64) / n_vec
    s = torch.stack([pts[0], pts[1] + pts[2], pts[3], torch.zeros(2, dtype=torch.float64)]) / n_vec
    count = dec * 0.25 + (1 - dec) * p
    total = dec * codes.double() / k + (1 - dec) * s
    n = count.sum()
    smoothed = (count + 1e-5) / (n + k * 1e-5) * n
    assert EMA_EPS == 1e-5
    torch.testing.assert_close(vq.ema_count.double(), count, atol=1e-7, rtol=0)
    torch.testing.assert_close(vq.ema_sum.double(), total, atol=1e-7, rtol=0)
    torch.testing.assert_close(vq.embedding.weight.double(), total / smoothed[:, None], atol=1e-6, rtol=0)

    # no codebook term: the loss is the commitment term against the codes the batch was assigned to
    q = codes[[0, 1, 1, 2]].double()
    assert out["loss"].item() == pytest.approx(0.25 * (q - pts).square().mean().item(), abs=1e-7)
    out["loss"].backward()
    assert vq.embedding.weight.grad is None

    # after restarts the counts need not sum to 1, and an unused code whose count is 0 shows the smoothing:
    # count~_3 = eps / (n + K eps) * n, so e_3 = 0.9 * 2e-5 / count~_3 = 1.8 (1 + 4e-5 / n)
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    set_codes(vq, codes.tolist())
    vq.ema_count.copy_(torch.tensor([0.4, 0.2, 0.2, 0.0]))
    vq.ema_sum.copy_(torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, 0.2], [2e-5, 2e-5]]))
    assert vq(z)["ids"].flatten().tolist() == [0, 1, 1, 2]
    count = dec * torch.tensor([0.4, 0.2, 0.2, 0.0], dtype=torch.float64) + (1 - dec) * p
    total = dec * torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, 0.2], [2e-5, 2e-5]], dtype=torch.float64) + (1 - dec) * s
    n = count.sum()
    assert n.item() == pytest.approx(0.82)
    smoothed = (count + 1e-5) / (n + k * 1e-5) * n
    expected = total / smoothed[:, None]
    assert expected[3, 0].item() == pytest.approx(1.8 * (1 + 4e-5 / 0.82), rel=1e-9)
    torch.testing.assert_close(vq.embedding.weight.double(), expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- usage and dead-code restart

def test_usage_ema_and_dead_code_restart():
    k = 4
    vq = VectorQuantizer(k, 2, restart_threshold=0.5, usage_decay=0.99).train()
    codes = torch.tensor([[0.0, 0.0], [9.0, 9.0], [1.0, 1.0], [-9.0, 9.0]])
    set_codes(vq, codes.tolist())
    usage = torch.tensor([0.25, 0.01, 0.25, 0.05])  # threshold 0.5 / 4 = 0.125: codes 1 and 3 are dead
    vq.usage.copy_(usage)
    points = torch.tensor([[0.1, 0.2], [3.0, -2.0], [0.9, 1.2], [0.3, 0.1], [1.1, 0.8], [-4.0, 2.0]])
    z = grid(points.tolist(), 2, 3)
    keys = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2]])  # smallest: position 1, then position 5
    out = vq(z, keys)
    assert out["log/restarted"].item() == 2

    expected = codes.clone()
    expected[1], expected[3] = points[1], points[5]
    assert torch.equal(vq.embedding.weight.detach(), expected)

    ids = torch.cdist(points.double(), expected.double()).argmin(dim=1)
    assert out["ids"].flatten().tolist() == ids.tolist() == [0, 1, 2, 0, 2, 3]
    p = torch.bincount(ids, minlength=k).double() / 6
    reset = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)  # dead codes restart at usage 1/K
    before = torch.where(torch.tensor([False, True, False, True]), reset, usage.double())
    torch.testing.assert_close(vq.usage.double(), 0.99 * before + 0.01 * p, atol=1e-7, rtol=0)
    # fractions (2, 1, 2, 1) / 6: all 4 codes used, perplexity exp(-sum p log p)
    assert out["log/usage"].item() == 1.0
    assert out["log/perplexity"].item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)


@pytest.mark.parametrize("case", ["eval", "threshold 0", "no keys"])
def test_no_restart_in_eval_without_threshold_or_keys(case):
    vq = VectorQuantizer(4, 2, restart_threshold=0.0 if case == "threshold 0" else 0.5)
    vq.train(case != "eval")
    vq.usage.copy_(torch.tensor([0.25, 0.0, 0.25, 0.0]))
    before_codes, before_usage = vq.embedding.weight.detach().clone(), vq.usage.clone()
    z = torch.randn(1, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    out = vq(z, None if case == "no keys" else torch.rand(1, 6, generator=torch.Generator().manual_seed(1)))
    assert out["log/restarted"].item() == 0
    assert torch.equal(vq.embedding.weight.detach(), before_codes)
    if case == "eval":
        assert torch.equal(vq.usage, before_usage)


def test_restart_resets_the_ema_statistics_of_the_restarted_code():
    k, dec = 4, 0.9
    vq = VectorQuantizer(k, 2, ema=True, ema_decay=dec, restart_threshold=0.5).train()
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    set_codes(vq, codes.tolist())
    count0 = torch.tensor([0.25, 0.25, 0.25, 0.01])
    vq.ema_count.copy_(count0)
    vq.ema_sum.copy_(codes * count0[:, None])
    vq.usage.copy_(torch.tensor([0.3, 0.3, 0.3, 0.01]))  # code 3 is dead
    points = torch.tensor([[0.1, 0.0], [0.9, 0.1], [3.0, 3.0], [0.1, 0.8]], dtype=torch.float64)
    out = vq(grid(points.tolist(), 2, 2), torch.tensor([[0.4, 0.3, 0.1, 0.2]]))  # position 2 has the smallest key
    assert out["log/restarted"].item() == 1
    assert out["ids"].flatten().tolist() == [0, 1, 3, 2]
    # restart: count_3 = 1/K, sum_3 = chosen / K; then the EMA step with p = 1/4 each, s_k = point / 4
    count = count0.double().clone()
    total = codes.double() * count[:, None]
    count[3], total[3] = 1 / k, points[2] / k
    s = points[[0, 1, 3, 2]] / 4
    count = dec * count + (1 - dec) * 0.25
    total = dec * total + (1 - dec) * s
    n = count.sum()
    smoothed = (count + 1e-5) / (n + k * 1e-5) * n
    torch.testing.assert_close(vq.ema_count.double(), count, atol=1e-7, rtol=0)
    torch.testing.assert_close(vq.ema_sum.double(), total, atol=1e-7, rtol=0)
    torch.testing.assert_close(vq.embedding.weight.double(), total / smoothed[:, None], atol=1e-6, rtol=0)


def test_restart_caps_at_the_batch_size():
    vq = VectorQuantizer(8, 2, restart_threshold=1.0).train()
    vq.usage.zero_()  # all 8 dead, 3 vectors: codes 0, 1, 2 take them in key order
    points = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    before = vq.embedding.weight.detach().clone()
    out = vq(grid(points.tolist(), 1, 3), torch.tensor([[0.3, 0.2, 0.1]]))
    assert out["log/restarted"].item() == 3
    assert torch.equal(vq.embedding.weight.detach()[:3], points[[2, 1, 0]])
    assert torch.equal(vq.embedding.weight.detach()[3:], before[3:])


def two_process(fn):
    """Run fn(rank, sync) for two simulated processes. Like real collectives, the i-th gather call of each
    process meets the i-th of the other and returns both offers concatenated in rank order: a first pass
    records what each process offers, the second pass answers with both."""
    offers = [[], []]

    def recorder(rank):
        def gather(t):
            offers[rank].append(t.clone())
            return torch.cat([t, t])  # shape-correct placeholder for the recording pass
        return gather

    for rank in (0, 1):
        fn(rank, Collectives(gather=recorder(rank)))
    assert len(offers[0]) == len(offers[1])

    def answerer():
        calls = iter(range(len(offers[0])))

        def gather(t):
            i = next(calls)
            return torch.cat([offers[0][i], offers[1][i]])
        return gather

    return [fn(rank, Collectives(gather=answerer())) for rank in (0, 1)]


def test_pick_candidates_over_two_processes_equals_one_process():
    g = torch.Generator().manual_seed(0)
    z, keys = torch.randn(10, 3, generator=g), torch.rand(10, generator=g)
    expected = z[keys.argsort()[:3]]
    assert torch.equal(pick_candidates(z, keys, 3), expected)
    halves = [(z[:5], keys[:5]), (z[5:], keys[5:])]
    results = two_process(lambda rank, sync: pick_candidates(*halves[rank], 3, sync))
    for got in results:
        assert torch.equal(got, expected)


def test_restart_over_two_processes_equals_one_process_when_dead_codes_exceed_the_local_batch():
    g = torch.Generator().manual_seed(0)
    points, keys = torch.randn(6, 2, generator=g), torch.rand(6, generator=g)

    def make():
        torch.manual_seed(3)
        vq = VectorQuantizer(8, 2, restart_threshold=1.0)
        vq.usage.zero_()  # 8 dead codes, 6 vectors in the global batch, 3 per process
        return vq

    one = make()
    assert one.restart_dead(points, keys) == 6
    halves = [(points[:3], keys[:3]), (points[3:], keys[3:])]

    def run(rank, sync):
        vq = make()
        vq.restart_dead(*halves[rank], sync)
        return vq.embedding.weight.detach()

    for got in two_process(run):
        assert torch.equal(got, one.embedding.weight.detach())


def test_assignment_fractions_usage_and_perplexity_by_hand():
    fractions = assignment_fractions(torch.tensor([[0, 0], [1, 3]]), 4)
    assert fractions.tolist() == [0.5, 0.25, 0.0, 0.25]
    usage, perplexity = usage_and_perplexity(fractions)
    # entropy 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    assert usage.item() == 0.75
    assert perplexity.item() == pytest.approx(2 ** 1.5, rel=1e-6)
    usage, perplexity = usage_and_perplexity(torch.tensor([0.25, 0.25, 0.0, 0.25, 0.0, 0.0, 0.25, 0.0]))
    assert usage.item() == 0.5
    assert perplexity.item() == pytest.approx(4.0, rel=1e-6)


# ----------------------------------------------------------------------------- multi-scale (VAR)

def test_phi_indices():
    assert phi_indices(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # REFERENCE.md (numpy float64 ties)
    # 4 convs: ticks 3/36, 13/36, 23/36, 33/36; k / 3 = 0, 12/36, 24/36, 36/36
    assert phi_indices(4, 4) == [0, 1, 2, 3]
    # k / 5 = 0, 7.2/36, 14.4/36, 21.6/36, 28.8/36, 1: nearest ticks 0, 0, 1, 2, 3, 3
    assert phi_indices(6, 4) == [0, 0, 1, 2, 3, 3]
    # 3 convs: ticks linspace(1/6, 5/6, 3) = 6/36, 18/36, 30/36; k / 4 = 0, 9/36, 18/36, 27/36, 1
    assert phi_indices(5, 3) == [0, 0, 1, 2, 2]
    assert phi_indices(3, 1) == [0, 0, 0]


def make_msq(scales, phi_count, ratio=0.5, seed=0, size=16, dim=4):
    torch.manual_seed(seed)
    q = MultiScaleQuantizer(size, dim, scales, phi_count=phi_count, phi_ratio=ratio)
    with torch.no_grad():
        q.embedding.weight.normal_(0, 0.7)
        for conv in q.quant_resi.qresi_ls:
            conv.weight.normal_(0, 0.2)
            conv.bias.normal_(0, 0.1)
    return q


def reference_multiscale(q, f, scales, phi_list, ratio=0.5):
    """VAR's residual quantisation written from the formula: returns (ids per scale, h per scale)."""
    b, c, size, _ = f.shape
    codes = q.embedding.weight.detach()
    rest = f.detach().clone()
    all_ids, hs = [], []
    for k, p in enumerate(scales):
        last = k == len(scales) - 1
        z = rest if last else F.interpolate(rest, size=(p, p), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, c)  # [B*p*p, C]
        ids = ((z[:, None, :] - codes[None]) ** 2).sum(-1).argmin(dim=1)
        code_map = codes[ids].view(b, p, p, c).permute(0, 3, 1, 2)
        up = code_map if last else F.interpolate(code_map, size=(size, size), mode="bicubic", align_corners=False)
        conv = q.quant_resi.qresi_ls[phi_list[k]]
        h = (1 - ratio) * up + ratio * F.conv2d(up, conv.weight, conv.bias, padding=1)
        rest = rest - h
        all_ids.append(ids.view(b, p * p))
        hs.append(h)
    return all_ids, hs


# scales (1, 2, 3, 5) on 5x5 with 4 convs -> [0, 1, 2, 3] (VAR's ratio 0.5); (1, 2, 3, 4, 6) on 6x6 with 3 convs
# -> [0, 0, 1, 2, 2], and a ratio that tells h from conv3x3(h)
MS_CASES = [((1, 2, 3, 5), 4, [0, 1, 2, 3], 0.5), ((1, 2, 3, 4, 6), 3, [0, 0, 1, 2, 2], 0.3)]


@pytest.mark.parametrize("scales,phi_count,phi_list,ratio", MS_CASES)
def test_multiscale_ids_and_f_hat_match_an_independent_loop(scales, phi_count, phi_list, ratio):
    q = make_msq(scales, phi_count, ratio).eval()
    assert q.phi_of == phi_list
    f = torch.randn(2, 4, scales[-1], scales[-1], generator=torch.Generator().manual_seed(1))
    ref_ids, hs = reference_multiscale(q, f, scales, phi_list, ratio)
    got = q.ids(f)
    assert [t.shape for t in got] == [(2, p * p) for p in scales]
    for k in range(len(scales)):
        assert torch.equal(got[k], ref_ids[k]), f"scale {scales[k]}"
    assert len({int(i) for t in ref_ids for i in t.flatten()}) > 3  # the case exercises several codes
    with torch.no_grad():
        torch.testing.assert_close(q.f_hat(got), sum(hs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scales,phi_count,phi_list,ratio", MS_CASES)
def test_teacher_forcing_input_matches_the_partial_sums(scales, phi_count, phi_list, ratio):
    q = make_msq(scales, phi_count, ratio, seed=2).eval()
    f = torch.randn(2, 4, scales[-1], scales[-1], generator=torch.Generator().manual_seed(3))
    ref_ids, hs = reference_multiscale(q, f, scales, phi_list, ratio)
    expected = []
    for k in range(1, len(scales)):
        partial = sum(hs[:k])  # f_hat after scales 0..k-1
        down = F.interpolate(partial, size=(scales[k], scales[k]), mode="area")
        expected.append(down.permute(0, 2, 3, 1).reshape(2, scales[k] ** 2, 4))  # row-major [B, p*p, C]
    expected = torch.cat(expected, dim=1)
    assert expected.shape == (2, sum(p * p for p in scales) - scales[0] ** 2, 4)
    with torch.no_grad():
        got = q.teacher_forcing_input(ref_ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_multiscale_forward_loss_and_straight_through():
    scales, phi_list = (1, 2, 3, 5), [0, 1, 2, 3]
    q = make_msq(scales, 4, seed=4).train()
    f = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    ref_ids, hs = reference_multiscale(q, f, scales, phi_list)
    f_hats = [sum(hs[:k + 1]) for k in range(len(scales))]
    beta, n = 0.25, f.numel()
    expected = sum(beta * (fh - f.detach()).square().mean() + (fh - f.detach()).square().mean() for fh in f_hats)
    expected = expected / len(scales)

    out = q(f)
    assert [t.tolist() for t in out["ids"]] == [t.tolist() for t in ref_ids]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(out["quantized"], f_hats[-1].detach(), atol=1e-6, rtol=0)

    # the loss reaches f through the beta term only: mean_k 2 beta (f - f_hat_k) / n
    grad_f, = torch.autograd.grad(out["loss"], f, retain_graph=True)
    expected_grad = sum(2 * beta * (f.detach() - fh.detach()) / n for fh in f_hats) / len(scales)
    torch.testing.assert_close(grad_f, expected_grad, atol=1e-7, rtol=1e-5)
    w = torch.randn(2, 4, 5, 5)
    grad_f, = torch.autograd.grad((w * out["quantized"]).sum(), f)
    assert torch.equal(grad_f, w)


def test_multiscale_restart_plan_and_restart_from_each_scales_vectors():
    """Dead codes go one by one to the scale of lowest coverage (codes used / codes reachable in the usage
    window); a scale under half coverage then takes the least-used free code (1% of the codebook per step, at
    least 1); each scale restarts its codes from its own vectors, smallest keys first."""
    # phi = identity (ratio 0) so the residual after the 1x1 scale is f - mean(f) exactly
    torch.manual_seed(0)
    q = MultiScaleQuantizer(6, 2, (1, 2), phi_ratio=0.0, restart_threshold=1.0, usage_decay=0.9).train()
    before = q.embedding.weight.detach().clone()
    q.usage.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0]) / 6)  # floor 1/6: dead 1, 2, 4
    # by hand, batch 2, window 1 / (1 - 0.9) = 10: reach = [min(6, 1*2*10), min(6, 4*2*10)] = [6, 6], no code used yet;
    # capacity [2, 8]. Dead 1 -> scale 0 (tie, the coarser), 2 -> scale 1 (0/6 < 1/6), 4 -> scale 0 (tie 1/6).
    # Stealing: scale 0 has no capacity left; scale 1 needs ceil(0.5 * 6) - 1 = 2, rate 1: the least-used free
    # code not used at scale 1, in usage order [1, 2, 4, 0, 3, 5] -> 0.
    assert q.plan_restarts(2).tolist() == [1, 0, 1, -1, 0, -1]
    f = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    # keys [B, L = 1 + 4]: scale 0 takes column 0 (image 1 first), scale 1 columns 1..4 (image 0 position 2, then
    # image 1 position 3)
    keys = torch.tensor([[0.6, 0.5, 0.4, 0.05, 0.7], [0.2, 0.3, 0.8, 0.9, 0.1]])
    out = q(f, keys)
    assert out["log/restarted"].item() == 4
    w = q.embedding.weight.detach()
    means = f.mean(dim=(2, 3))  # [2, C]: the scale-0 vectors
    assert torch.allclose(w[1], means[1], atol=1e-6) and torch.allclose(w[4], means[0], atol=1e-6)
    assert [t.tolist() for t in out["ids"]][0] == [[4], [1]]
    residual = (f - means[:, :, None, None]).permute(0, 2, 3, 1).reshape(-1, 2)  # [8, C] in the order of keys[:, 1:]
    assert torch.allclose(w[0], residual[2], atol=1e-6) and torch.allclose(w[2], residual[7], atol=1e-6)
    assert torch.equal(w[[3, 5]], before[[3, 5]])
    # per-scale usage EMA of each scale's fractions
    hit = torch.zeros(2, 6)
    for k, ids in enumerate(out["ids"]):
        hit[k] = torch.bincount(ids.flatten(), minlength=6).float() / ids.numel()
    torch.testing.assert_close(q.ema_vocab_hit_SV, 0.1 * hit, atol=1e-7, rtol=0)


def test_multiscale_plan_leaves_covered_scales_alone():
    q = MultiScaleQuantizer(8, 2, (1, 2), restart_threshold=0.8, usage_decay=0.5)
    q.usage.copy_(torch.tensor([0.2, 0.05, 0.05, 0.2, 0.2, 0.15, 0.12, 0.11]))  # floor 0.1: dead 1, 2
    q.ema_vocab_hit_SV.zero_()
    q.ema_vocab_hit_SV[0, 0] = 0.5
    q.ema_vocab_hit_SV[1, 3:] = 0.2
    # batch 2, window 2: reach [4, 8], used [1, 5] -> dead 1 to scale 0 (1/4 < 5/8), dead 2 to scale 0 (2/4 < 5/8);
    # scale 0 is then out of capacity (2 vectors), scale 1 at 5/8 >= 1/2 takes nothing
    assert q.plan_restarts(2).tolist() == [-1, 0, 0, -1, -1, -1, -1, -1]
    # scale 1 uses only code 3: coverage [1/4, 1/8] -> dead 1 to scale 1, dead 2 to scale 0 (tie 2/4 = 2/8: the
    # coarser); then scale 1 needs ceil(0.5 * 8) - 2 = 2, rate 1 -> the least-used free code it does not use: 7
    q.ema_vocab_hit_SV[1, 4:] = 0.0
    assert q.plan_restarts(2).tolist() == [-1, 1, 0, -1, -1, -1, -1, 1]


# ----------------------------------------------------------------------------- tokenizers

TINY = dict(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=8, codebook_size=32)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def one_line_error(fn, *needles):
    with pytest.raises(GenvisError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_vq_tokenizer_decode_checks_and_round_trip(images, tmp_path):
    torch.manual_seed(0)
    tok = VQTokenizer(**TINY, codebook_dim=4, l2_norm=False).eval()
    ids = tok.encode(images)
    assert ids.shape == (2, 4, 4) and ids.dtype == torch.long
    assert tok.decode(ids).shape == images.shape
    one_line_error(lambda: tok.decode(torch.full((2, 4, 4), 32)), "[32, 32]", "outside the vocabulary", "[0, 31]")
    one_line_error(lambda: tok.decode(torch.full((2, 4, 4), -1)), "[-1, -1]", "outside the vocabulary")
    one_line_error(lambda: tok.decode(ids.float()), "integer", "torch.float32")
    one_line_error(lambda: tok.decode(ids.flatten(1)), "(2, 16)", "[B, h, w]")

    tok.save_pretrained(tmp_path / "vq")
    loaded = load_tokenizer(tmp_path / "vq")
    assert type(loaded) is VQTokenizer
    assert torch.equal(loaded.encode(images), ids)
    assert torch.equal(loaded.decode(ids), tok.decode(ids))


def test_multiscale_tokenizer_decode_checks_and_round_trip(images, tmp_path):
    torch.manual_seed(0)
    tok = MultiScaleVQTokenizer(**TINY, scales=(1, 2, 4)).eval()
    ids = tok.encode(images)
    assert [t.shape for t in ids] == [(2, 1), (2, 4), (2, 16)]
    image = tok.decode(ids)
    assert image.shape == images.shape
    flat = torch.cat(ids, dim=1)  # [2, 21]
    assert torch.equal(tok.decode(flat), image)
    assert torch.equal(tok.decode([ids[0], ids[1].view(2, 2, 2), ids[2].view(2, 4, 4)]), image)
    tf = tok.teacher_forcing_input(flat)
    assert tf.shape == (2, 20, 8)
    torch.testing.assert_close(tf, tok.teacher_forcing_input(ids), atol=0, rtol=0)

    one_line_error(lambda: tok.decode(ids[:2]), "ids for 2 scales", "has 3", "[1, 2, 4]")
    one_line_error(lambda: tok.decode([ids[0], ids[1][:, :3], ids[2]]), "ids of scale 1", "3 per image",
                   "2x2 = 4")
    bad = [t.clone() for t in ids]
    bad[2][1, 5] = 32
    one_line_error(lambda: tok.decode(bad), "ids of scale 2", "outside the vocabulary", "[0, 31]")
    one_line_error(lambda: tok.decode(flat.float()), "integer", "torch.float32")
    one_line_error(lambda: tok.decode(flat[:, :20]), "(2, 20)", "[B, 21]")

    tok.save_pretrained(tmp_path / "msvq")
    loaded = load_tokenizer(tmp_path / "msvq")
    assert type(loaded) is MultiScaleVQTokenizer and loaded.scales == (1, 2, 4)
    for a, b in zip(loaded.encode(images), ids):
        assert torch.equal(a, b)
