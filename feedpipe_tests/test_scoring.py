"""The all-pairs scorer against the model's own forward, on random models and random encoded tables."""

import numpy as np
import pytest
import torch

import feedpipe.scoring as scoring
from feedpipe.model import ModelShape, SparseFeature, TwoSidedDLRM
from feedpipe.scoring import Exclusions, forward_pairs, pair_logits, score_all_pairs
from feedpipe_tests.model_fixtures import random_side


def _random_case(seed, n_customers, n_products, customer_dense, product_dense, over_arch=(32, 16, 1), spread=0.5):
    """A random model whose logits differ by O(1) between products (as a trained one's do) and tables for it."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cs = (SparseFeature("c.id", n_customers), SparseFeature("c.seg", 5), SparseFeature("c.hist", 30, True))
    ps = (SparseFeature("p.id", n_products), SparseFeature("p.brand", 7), SparseFeature("p.tags", 11, True))
    shape = ModelShape(cs, ps, customer_dense, product_dense, embedding_dim=8, dense_arch_layers=(16, 8),
                       over_arch_layers=over_arch)
    model = TwoSidedDLRM(shape).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedding_bags" in name:
                p.normal_(0, spread, generator=g)
    return model, random_side(n_customers, cs, customer_dense, g), random_side(n_products, ps, product_dense, g)


def _all_pairs_forward(model, customers, products):
    nc, np_, device = customers.num_rows, products.num_rows, customers.dense.device
    c = torch.arange(nc, device=device).repeat_interleave(np_)
    p = torch.arange(np_, device=device).repeat(nc)
    return forward_pairs(model, customers, products, c, p).view(nc, np_)


@pytest.mark.parametrize("customer_dense", [0, 3])
@pytest.mark.parametrize("product_dense", [0, 2])
@pytest.mark.parametrize("over_arch", [(32, 16, 1), (24, 12, 6, 1)])
@pytest.mark.parametrize("customer_rows", [False, True])
def test_every_pair_logit_equals_the_forward_pass(customer_dense, product_dense, over_arch, customer_rows):
    model, customers, products = _random_case(7, 40, 90, customer_dense, product_dense, over_arch)
    ref = _all_pairs_forward(model, customers, products)
    # Products as rows: 200 pairs per tile is 2 customers x 90 products, 50 one customer x product chunks
    # of 50 (and a rest of 40), 30 one customer x 3 chunks of 30. Customers as rows: 200 and 50 are all 40
    # customers x one product, 30 two tiles of customers (30 and 10) x one product, 1030 all 40 customers
    # x chunks of 4 products (and a rest of 2).
    for tile in (200, 50, 30, 1030):
        got = pair_logits(model, customers, products, torch.arange(40), pairs_per_tile=tile,
                          layout_customer_rows=customer_rows)
        assert (got - ref).abs().max().item() <= 1e-5


def test_customers_are_rows_on_a_cpu_while_the_catalogues_columns_fit_the_memory_cap(monkeypatch):
    model, customers, products = _random_case(8, 30, 50, 2, 1)
    cpu = torch.device("cpu")
    assert scoring.customers_as_rows(model, 50, cpu) and scoring.plan_scoring(model, products).customer_rows
    # K'_c: 4 customer vectors (the dense output, c.id, c.seg, c.hist) x 8 + their 6 dots = 38
    k = scoring.customer_row_width(model, cpu)
    assert model.num_customer_vectors == 4 and k == 38
    monkeypatch.setattr(scoring, "PRODUCT_COLUMNS_MAX_BYTES", 50 * 32 * k * 4 - 1)  # one byte short for 50 products
    assert not scoring.customers_as_rows(model, 50, cpu) and scoring.customers_as_rows(model, 49, cpu)
    plan = scoring.plan_scoring(model, products)
    assert not plan.customer_rows  # and it still scores every pair exactly
    got = pair_logits(model, customers, products, torch.arange(30))
    assert (got - _all_pairs_forward(model, customers, products)).abs().max().item() <= 1e-5
    assert not scoring.customers_as_rows(model, 50, torch.device("meta"))  # a GPU keeps its measured layout


def test_bf16_on_amx_keeps_products_as_rows(monkeypatch):
    model, _, products = _random_case(8, 30, 50, 2, 1)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    monkeypatch.setattr(scoring, "has_amx", lambda: True)
    assert scoring.customers_as_rows(model, 50, cpu) and not scoring.customers_as_rows(model, 50, cpu, bf16)
    assert not scoring.plan_scoring(model, products, dtype=bf16).customer_rows
    assert scoring.plan_scoring(model, products).customer_rows
    monkeypatch.setattr(scoring, "has_amx", lambda: False)
    assert scoring.plan_scoring(model, products, dtype=bf16).customer_rows


def test_tile_shapes_of_the_default_tiles():
    """(customers, products) per tile: customer rows take pairs_per_tile / 16 customers within 256-1024."""
    assert scoring.tile_shape(2000, 8192, customer_rows=True) == (512, 16)
    assert scoring.tile_shape(2000, 32768, customer_rows=True) == (1024, 32)
    assert scoring.tile_shape(2000, 1 << 19, customer_rows=True) == (1024, 512)
    assert scoring.tile_shape(2000, 2048, customer_rows=True) == (256, 8)
    assert scoring.tile_shape(10, 32768, customer_rows=True) == (3276, 10)  # a narrow catalogue: more customers
    assert scoring.tile_shape(2000, 32768) == (16, 2000) and scoring.tile_shape(50000, 8192) == (1, 8192)


@pytest.mark.parametrize("customer_rows", [False, True])  # products as rows on F.linear is what a GPU runs
def test_the_generic_kernel_path_is_exact_too(monkeypatch, customer_rows):
    """Where oneDNN is absent (a GPU, another build) the scorer runs on F.linear."""
    monkeypatch.setattr(scoring, "onednn_available", lambda device, dtype=torch.float32: False)
    model, customers, products = _random_case(3, 30, 50, 2, 1)
    assert not scoring.plan_scoring(model, products, customer_rows=customer_rows).onednn
    got = pair_logits(model, customers, products, torch.arange(30), pairs_per_tile=128,
                      layout_customer_rows=customer_rows)
    assert (got - _all_pairs_forward(model, customers, products)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_is_chosen_only_for_dtypes_it_multiplies(dtype):
    """On an AVX2-only CPU oneDNN has no bf16 kernels (its op fails); where the probe says it has,
    the fused op must agree with F.linear."""
    from feedpipe.scoring_runtime import linear, onednn_available

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((64, 40), (24, 40), (24,)))
    expected = torch.relu(torch.nn.functional.linear(x.float(), w.float(), b.float()))
    if onednn_available(torch.device("cpu"), dtype):
        got = linear(x, w, b, relu=True, onednn=True).float()
        assert (got - expected).abs().max().item() <= (1e-4 if dtype == torch.float32 else 0.1)
    model, _, products = _random_case(5, 10, 20, 2, 1)
    plan = scoring.plan_scoring(model, products, dtype=dtype)
    assert plan.onednn == onednn_available(torch.device("cpu"), dtype)


def test_bf16_scores_on_f_linear_where_onednn_has_no_bf16(monkeypatch):
    """What an AVX2-only CPU runs: the bf16 plan leaves oneDNN for F.linear and still scores the model."""
    monkeypatch.setattr(scoring, "onednn_available", lambda device, dtype=torch.float32: dtype == torch.float32)
    model, customers, products = _random_case(6, 30, 50, 2, 1)
    for customer_rows in (False, True):
        plan = scoring.plan_scoring(model, products, dtype=torch.bfloat16, customer_rows=customer_rows)
        assert not plan.onednn and plan.dtype == torch.bfloat16
        assert plan.cast(torch.float32).onednn  # and back in fp32, oneDNN again
        got = pair_logits(model, customers, products, torch.arange(30), dtype=torch.bfloat16, pairs_per_tile=128,
                          layout_customer_rows=customer_rows)
        expected = _all_pairs_forward(model, customers, products)
        assert (got.float() - expected).abs().max().item() <= 0.1 * expected.abs().max().item()


def test_padding_k_to_an_alignment_changes_no_logit(monkeypatch):
    """What a GPU plan does (zero columns in E' and W_pp), checked where it runs here."""
    monkeypatch.setattr(scoring, "k_alignment", lambda device, dtype=torch.float32: 8)
    for product_dense in (0, 1):
        model, customers, products = _random_case(4, 25, 40, 2, product_dense)
        plan = scoring.plan_scoring(model, products)
        assert plan.k_dim % 8 == 0 and plan.w_pp.shape[1] == plan.k_dim - model.num_product_vectors * 8
        assert plan.columns.u.shape[1] % 8 == 0
        assert plan.u_const is not None  # n_pp + pad is a whole D-block: U' is one fused product
        for rows in (False, True):
            got = pair_logits(model, customers, products, torch.arange(25), pairs_per_tile=120, layout_customer_rows=rows)
            assert (got - _all_pairs_forward(model, customers, products)).abs().max().item() <= 1e-5


def test_u_prime_as_one_fused_product_equals_the_product_add_and_concatenation(monkeypatch):
    from dataclasses import replace

    monkeypatch.setattr(scoring, "k_alignment", lambda device, dtype=torch.float32: 8)
    model, customers, products = _random_case(8, 12, 30, 1, 2)
    plan = scoring.plan_scoring(model, products, customer_rows=False)
    with torch.inference_mode():
        v, cc_dots = scoring.customer_vectors(plan, customers, torch.arange(12))
        _, v_flat = scoring.customer_factors(plan, v, cc_dots)
        fused = scoring.u_prime(plan, v_flat)
        unfused = scoring.u_prime(replace(plan, u_rows=None, u_const=None), v_flat)
    assert plan.u_const is not None and fused.shape == unfused.shape == (12 * 32, plan.k_dim)
    assert (fused - unfused).abs().max().item() <= 1e-6


def _reference_top_n(ref, excluded_pairs, unavailable, n):
    masked = ref.clone()
    for c, p in excluded_pairs:
        masked[c, p] = float("-inf")
    masked[:, unavailable] = float("-inf")
    top = torch.topk(masked, n, dim=1)
    return top.indices, torch.sigmoid(top.values)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("customer_rows", [False, True])
def test_top_n_equals_the_forward_ranking_with_exclusions_and_unavailable_products(workers, customer_rows):
    model, customers, products = _random_case(11, 60, 120, 2, 1)
    rng = np.random.default_rng(0)
    excluded = [(int(c), int(p)) for c in range(0, 60, 3) for p in rng.choice(120, 15, replace=False)]
    unavailable = torch.tensor([0, 5, 17, 64, 119])
    ex = Exclusions.from_pairs(np.array([c for c, _ in excluded]), np.array([p for _, p in excluded]), 60)
    plan = scoring.plan_scoring(model, products, unavailable=unavailable, customer_rows=customer_rows)
    # Small tiles and units: several units per worker, product chunks, a partial last tile. Customers as
    # rows: 7 pairs is 7 customers x 1 product in units of 7 (the last one 4); 520 is one unit of 260
    # customers x chunks of 2 products.
    for tile in (7, 100, 520):
        top = score_all_pairs(model, customers, products, top_n=10, exclusions=ex, unavailable=unavailable,
                              pairs_per_tile=tile, pairs_per_unit=700, workers=workers, plan=plan)
        rows, scores = _reference_top_n(_all_pairs_forward(model, customers, products), excluded, unavailable, 10)
        assert torch.equal(top.product_rows, rows)
        assert (top.scores - scores).abs().max().item() <= 1e-5
        assert not np.isin(top.product_rows.numpy(), unavailable.numpy()).any()


def test_a_customer_with_fewer_allowed_products_than_n_gets_empty_slots():
    model, customers, products = _random_case(5, 3, 6, 1, 1)
    ex = Exclusions.from_pairs(np.array([1, 1, 1]), np.array([0, 2, 4]), 3)
    top = score_all_pairs(model, customers, products, top_n=5, exclusions=ex, unavailable=torch.tensor([5]))
    assert top.product_rows.shape == (3, 5)
    assert (top.product_rows[1, 2:] == -1).all() and top.scores[1, 2:].isnan().all()
    assert sorted(top.product_rows[1, :2].tolist()) == [1, 3]
    assert (top.product_rows[0] >= 0).all()


def test_every_product_unavailable_gives_empty_rankings_not_an_error():
    model, customers, products = _random_case(1, 5, 4, 1, 1)
    for kw in ({}, {"dtype": torch.bfloat16, "rerank": True}):
        top = score_all_pairs(model, customers, products, top_n=3, unavailable=torch.arange(4), **kw)
        assert top.product_rows.shape == (5, 0) and top.scores.shape == (5, 0)


def test_customer_rows_select_and_order_the_scored_customers():
    model, customers, products = _random_case(2, 20, 30, 2, 1)
    rows = torch.tensor([7, 3, 19])
    ex = Exclusions.from_pairs(np.array([0]), np.array([4]), 3)  # indexed by position in `rows`: customer 7
    sub = score_all_pairs(model, customers, products, top_n=30, exclusions=ex, customer_rows=rows)
    full = score_all_pairs(model, customers, products, top_n=30)
    assert torch.equal(sub.product_rows[1:], full.product_rows[[3, 19]])
    assert 4 not in sub.product_rows[0].tolist() and 4 in full.product_rows[7].tolist()


def test_exclusions_of_unscored_products_are_dropped_when_remapped():
    ex = Exclusions.from_pairs(np.array([0, 0, 2, 2, 2]), np.array([1, 3, 0, 3, 4]), 3)
    column_of_row = torch.tensor([0, 1, 2, -1, 3])  # product 3 is not scored
    got = ex.remapped(column_of_row)
    assert got.offsets.tolist() == [0, 1, 1, 3]
    assert got.values.tolist() == [1, 0, 3]


def test_bf16_ranks_nearly_like_fp32():
    model, customers, products = _random_case(13, 100, 400, 2, 1, over_arch=(64, 32, 1))
    rows = torch.arange(100)
    fp32 = pair_logits(model, customers, products, rows)
    bf16 = pair_logits(model, customers, products, rows, dtype=torch.bfloat16)
    a, b = torch.topk(fp32, 20, dim=1).indices, torch.topk(bf16, 20, dim=1).indices
    overlap = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).float().mean().item()
    assert overlap >= 0.95
    top = score_all_pairs(model, customers, products, top_n=20, dtype=torch.bfloat16, unavailable=torch.tensor([1]))
    assert not (top.product_rows == 1).any()


@pytest.mark.parametrize("workers", [1, 2])
def test_bf16_candidates_reranked_in_fp32_give_the_fp32_top_n(workers):
    """A model whose bf16 ranking differs from fp32's: the re-ranked result is fp32's, exclusions included."""
    model, customers, products = _random_case(13, 100, 400, 2, 1, over_arch=(64, 32, 1))
    rng = np.random.default_rng(3)
    excluded = [(int(c), int(p)) for c in range(0, 100, 3) for p in rng.choice(400, 30, replace=False)]
    ex = Exclusions.from_pairs(np.array([c for c, _ in excluded]), np.array([p for _, p in excluded]), 100)
    unavailable = torch.tensor([2, 50, 399])
    kw = dict(top_n=20, exclusions=ex, unavailable=unavailable, pairs_per_tile=1000, pairs_per_unit=9000,
              workers=workers)
    fp32 = score_all_pairs(model, customers, products, **kw)
    bf16 = score_all_pairs(model, customers, products, dtype=torch.bfloat16, **kw)
    reranked = score_all_pairs(model, customers, products, dtype=torch.bfloat16, rerank=True, **kw)
    assert not torch.equal(bf16.product_rows, fp32.product_rows)  # else this test would show nothing
    assert torch.equal(reranked.product_rows, fp32.product_rows)
    assert (reranked.scores - fp32.scores).abs().max().item() <= 1e-5


def test_rerank_keeps_excluded_products_out_when_few_are_allowed():
    model, customers, products = _random_case(5, 3, 6, 1, 1)
    ex = Exclusions.from_pairs(np.array([1, 1, 1]), np.array([0, 2, 4]), 3)
    top = score_all_pairs(model, customers, products, top_n=5, exclusions=ex, unavailable=torch.tensor([5]),
                          dtype=torch.bfloat16, rerank=True)
    assert (top.product_rows[1, 2:] == -1).all() and top.scores[1, 2:].isnan().all()
    assert sorted(top.product_rows[1, :2].tolist()) == [1, 3]


def test_precision_names_map_to_dtype_and_rerank():
    assert scoring.precision("bf16-rerank") == scoring.Precision(torch.bfloat16, rerank=True)
    assert scoring.precision("fp32").dtype == torch.float32 and not scoring.precision("fp32").rerank
    with pytest.raises(ValueError, match="bf16-rerank"):
        scoring.precision("fp16")


def test_chunked_top_k_equals_torch_topk_including_rows_with_few_finite_values():
    g = torch.Generator().manual_seed(0)
    for p in (997, 1000, 30):  # a partial last chunk, whole chunks, too few chunks to bother
        x = torch.randn(50, p, generator=g)
        x[3, 5:] = float("-inf")  # fewer allowed products than k
        x[4, :] = float("-inf")
        values, indices = scoring.top_k_rows(x, 20)
        ref = torch.topk(x, 20, dim=1)
        assert torch.equal(values, ref.values)
        finite = ref.values > float("-inf")
        assert torch.equal(indices[finite], ref.indices[finite])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_on_cuda_every_pair_logit_equals_the_forward_pass_and_top_n_matches_the_cpu():
    """The GPU path (cuBLASLt's fused bias+ReLU, torch.topk, device exclusions) against the forward and the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False  # exactness is asked of fp32, not of TF32
    model, customers, products = _random_case(17, 71, 130, 2, 1)
    rng = np.random.default_rng(1)
    excluded = [(int(c), int(p)) for c in range(0, 71, 2) for p in rng.choice(130, 9, replace=False)]
    ex = Exclusions.from_pairs(np.array([c for c, _ in excluded]), np.array([p for _, p in excluded]), 71)
    unavailable = torch.tensor([3, 77])
    cpu = score_all_pairs(model, customers, products, top_n=12, exclusions=ex, unavailable=unavailable)
    gpu_model, gc, gp = model.to("cuda"), customers.to("cuda"), products.to("cuda")
    ref = _all_pairs_forward(gpu_model, gc, gp)
    for tile in (256, 100):  # several customers per tile; one customer against product chunks of 100 and 30
        got = pair_logits(gpu_model, gc, gp, torch.arange(71, device="cuda"), pairs_per_tile=tile)
        assert (got - ref).abs().max().item() <= 1e-5
    # 300-pair tiles are 2 customers x 128 products, 100-pair tiles product chunks; 2000-pair units are
    # 14 or 15 customers, so there are several units, three of them in flight in HostCopies, and a partial tile
    for tile in (300, 100):
        top = score_all_pairs(gpu_model, gc, gp, top_n=12, exclusions=ex, unavailable=unavailable,
                              pairs_per_tile=tile, pairs_per_unit=2000)
        assert top.product_rows.device.type == "cpu"
        assert torch.equal(top.product_rows, cpu.product_rows)
        assert (top.scores - cpu.scores).abs().max().item() <= 1e-5


@needs_cuda
def test_on_cuda_bf16_ranks_nearly_like_fp32():
    model, customers, products = _random_case(13, 100, 400, 2, 1, over_arch=(64, 32, 1))
    model, customers, products = model.to("cuda"), customers.to("cuda"), products.to("cuda")
    rows = torch.arange(100, device="cuda")
    fp32 = pair_logits(model, customers, products, rows)
    bf16 = pair_logits(model, customers, products, rows, dtype=torch.bfloat16)
    a, b = torch.topk(fp32, 20, dim=1).indices, torch.topk(bf16, 20, dim=1).indices
    assert (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).float().mean().item() >= 0.95
    exact = score_all_pairs(model, customers, products, top_n=20)
    reranked = score_all_pairs(model, customers, products, top_n=20, dtype=torch.bfloat16, rerank=True)
    assert torch.equal(reranked.product_rows, exact.product_rows)


def test_worker_threads_flush_denormals_inside_the_block_and_not_after():
    from feedpipe.scoring_runtime import denormals_flushed, flush_denormals, run_units, single_threaded_kernels

    seen = []
    with single_threaded_kernels(), flush_denormals():
        run_units([(0, 1), (1, 2), (2, 3), (3, 4)], lambda start, stop: seen.append(denormals_flushed()), workers=2)
    assert seen == [True] * 4
    assert not denormals_flushed()
    run_units([(0, 1), (1, 2)], lambda start, stop: seen.append(denormals_flushed()), workers=2)
    assert seen[4:] == [False, False]
    if torch.get_num_threads() > 1:  # kernels on an OpenMP pool: left alone (see the next tests)
        with flush_denormals():
            assert not denormals_flushed()


def test_a_model_with_denormal_embedding_rows_scores_exactly_with_denormals_flushed(monkeypatch):
    """Never-seen rows decay to ~1e-39 in training; the scorer flushes them to zero, which moves no logit."""
    from feedpipe.scoring_runtime import denormals_flushed

    model, customers, products = _random_case(8, 30, 60, 2, 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedding_bags" in name:
                p[:3] = 1e-39  # the padding, null and OOV rows of a trained model
    customers.sparse["c.seg"][0][:10] = 1  # some customers and products use those rows
    products.sparse["p.brand"][0][:10] = 2
    modes, vectors = [], scoring.customer_vectors
    monkeypatch.setattr(scoring, "customer_vectors", lambda *a: modes.append(denormals_flushed()) or vectors(*a))
    top = score_all_pairs(model, customers, products, top_n=60, pairs_per_tile=200, pairs_per_unit=600, workers=2)
    assert modes and all(modes)  # every unit, in both worker threads
    ref = _all_pairs_forward(model, customers, products)
    assert (torch.gather(ref, 1, top.product_rows) - torch.logit(top.scores.double()).float()).abs().max() <= 1e-4
    got = pair_logits(model, customers, products, torch.arange(30))
    assert (got - ref).abs().max().item() <= 1e-5
    assert not denormals_flushed()


def test_flushing_never_reaches_threads_that_outlive_the_block():
    """An OpenMP pool first started inside the block would keep flushing for the life of the process."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from feedpipe.scoring_runtime import flush_denormals\n"
        "torch.set_num_threads(2)\n"
        "with flush_denormals():\n"
        "    torch.ones(1 << 22).mul_(2.0)\n"  # the first multi-threaded op starts the pool
        "x = torch.full((1 << 22,), 1e-39) * 1.0\n"
        "print(int((x == 0).sum()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0"


def test_emulated_bf16_is_named_so_before_it_runs_slow(monkeypatch):
    """An AVX2-only CPU runs bf16 18x slower than fp32: the scorer's callers say so; fp32 never warns."""
    import feedpipe.scoring_runtime as runtime

    cpu = torch.device("cpu")
    assert runtime.emulated_precision_warning(cpu, torch.float32) is None
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    message = runtime.emulated_precision_warning(cpu, torch.bfloat16)
    assert message is not None and "bfloat16 on this cpu is emulated" in message and "fp32" in message
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert runtime.emulated_precision_warning(cpu, torch.bfloat16) is None


def test_a_failing_unit_stops_the_other_workers_after_their_current_unit():
    import threading

    from feedpipe.scoring_runtime import run_units

    done, lock = [], threading.Lock()

    def work(start, stop):
        if start == 0:
            raise ValueError("unit 0 failed")
        with lock:
            done.append(start)

    with pytest.raises(ValueError, match="unit 0 failed"):
        run_units([(i, i + 1) for i in range(200)], work, workers=2)
    assert len(done) < 10  # not the whole queue: at most the units already taken
