import math
import re
from dataclasses import replace

import polars as pl
import pytest
import torch

from feedpipe.feature_tensors import side_tensors
from feedpipe.model import ModelShape, SparseFeature, TwoSidedDLRM
from feedpipe.training import (
    LOSS_GROUP,
    TrainConfig,
    TrainedModel,
    TrainingDiverged,
    _EpochLosses,
    evaluate_examples,
    model_shape,
    split_examples,
    train_dlrm,
)
from feedpipe_tests.model_fixtures import CUSTOMER_SPECS, PRODUCT_SPECS, grouped_data

FAST = TrainConfig(epochs=4, batch_size=256, learning_rate=1e-2, patience=3)


@pytest.fixture(scope="module")
def data():
    return grouped_data()


def test_gather_builds_the_jagged_bags_of_the_requested_rows(data):
    _, products, vocab, _ = data
    from feedpipe.vocabularies import encode_table

    enc = encode_table(products, "product_id", PRODUCT_SPECS, vocab)
    side = side_tensors(enc, PRODUCT_SPECS)
    rows = torch.tensor([5, 0, 5, 2])
    dense, kjt = side.gather(rows)
    assert dense.shape == (4, 1)
    tags = kjt["products.tags"]
    expected = [enc.get_column("products.tags")[int(r)].to_list() for r in rows]
    assert [t.tolist() for t in torch.split(tags.values(), tags.lengths().tolist())] == expected


def test_forward_gives_one_logit_per_pair_and_checks_layer_sizes():
    shape = ModelShape((SparseFeature("c", 10),), (SparseFeature("p", 7, True),), 2, 0)
    model = TwoSidedDLRM(shape)
    assert model.num_customer_vectors == 2 and model.num_product_vectors == 1
    with pytest.raises(ValueError, match="embedding_dim"):
        TwoSidedDLRM(ModelShape((), (), 1, 1, embedding_dim=8, dense_arch_layers=(16, 4)))
    with pytest.raises(ValueError, match="logit"):
        TwoSidedDLRM(ModelShape((), (), 1, 1, over_arch_layers=(8, 2)))


@pytest.mark.parametrize("f", [2, 3, 9])
def test_pair_dots_give_the_gram_matrix_triangle_and_its_exact_gradient(f):
    from feedpipe.model import PairDots, pair_scatter

    torch.manual_seed(f)
    v = torch.randn(5, f, 4, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.triu_indices(f, f, offset=1)
    flat, scatter = rows * f + cols, pair_scatter(f).double()
    dots = PairDots.apply(v, flat, scatter)
    assert torch.allclose(dots, (v[:, rows] * v[:, cols]).sum(-1))  # pair p is <v_i, v_j>, i < j, row-major
    assert torch.autograd.gradcheck(PairDots.apply, (v, flat, scatter))
    # fp32, as training runs it: autograd's gradient of the same dots, to rounding
    v32 = v.detach().float().requires_grad_()
    g = torch.randn(5, f * (f - 1) // 2)
    PairDots.apply(v32, flat, pair_scatter(f)).backward(g)
    auto = v.detach().float().requires_grad_()
    (auto[:, rows] * auto[:, cols]).sum(-1).backward(g)
    assert torch.allclose(v32.grad, auto.grad, atol=1e-5)


def test_pair_dots_stay_fp32_under_an_outer_autocast():
    from feedpipe.model import PairDots, pair_scatter

    v = torch.randn(6, 4, 8, requires_grad=True)
    rows, cols = torch.triu_indices(4, 4, offset=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dots = PairDots.apply(v, rows * 4 + cols, pair_scatter(4))
    assert dots.dtype == torch.float32
    assert torch.allclose(dots, (v[:, rows] * v[:, cols]).sum(-1), atol=1e-5)
    dots.sum().backward()  # the gradient's and the saved input's dtypes agree
    assert v.grad is not None and v.grad.dtype == torch.float32


def test_training_learns_a_group_preference(data):
    _, _, vocab, examples = data
    train, valid = split_examples(examples, CUSTOMER_SPECS, PRODUCT_SPECS)
    shape = model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, FAST)
    result = train_dlrm(train, valid, shape, FAST)
    assert result.best.val_auc > 0.95
    assert result.history[-1].train_loss < result.history[0].train_loss
    loss, auc = evaluate_examples(result.model, valid)
    assert auc == pytest.approx(result.best.val_auc, abs=1e-6)


def test_training_is_deterministic_for_a_seed(data):
    _, _, vocab, examples = data
    train, valid = split_examples(examples, CUSTOMER_SPECS, PRODUCT_SPECS)
    shape = model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, FAST)
    cfg = TrainConfig(epochs=1, batch_size=256, seed=7)
    a = train_dlrm(train, valid, shape, cfg).model.state_dict()
    b = train_dlrm(train, valid, shape, cfg).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_training_with_a_clear_error(data):
    _, _, vocab, examples = data
    broken = examples.with_columns(pl.lit(float("nan"), pl.Float32).alias("customers.age"))
    train, valid = split_examples(broken, CUSTOMER_SPECS, PRODUCT_SPECS)
    shape = model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, FAST)
    with pytest.raises(TrainingDiverged, match="training loss became nan"):
        train_dlrm(train, valid, shape, FAST)


def test_batch_losses_are_checked_in_groups_and_name_the_first_bad_batch():
    curve = []
    losses = _EpochLosses(epoch=2, learning_rate=0.1, curve=curve)
    for i in range(LOSS_GROUP + 3):
        losses.add(torch.tensor(float(i)), rows=10)
    losses.check()  # the partial last group: counted, but not a point of the curve
    assert losses.count == 10 * (LOSS_GROUP + 3)
    assert losses.total == pytest.approx(10 * sum(range(LOSS_GROUP + 3)))
    assert curve == [pytest.approx(sum(range(LOSS_GROUP)) / LOSS_GROUP)]
    for v in (1.0, 2.0, float("inf"), float("nan")):
        losses.add(torch.tensor(v), rows=10)
    with pytest.raises(TrainingDiverged, match=f"loss became inf at epoch 2, batch {LOSS_GROUP + 5}"):
        losses.check()


def test_a_non_finite_loss_on_another_rank_stops_this_one_too():
    other_rank_diverged = _EpochLosses(epoch=0, learning_rate=0.1, curve=[], agree=lambda flag: (flag + 1.0,))
    other_rank_diverged.add(torch.tensor(0.5), rows=4)
    with pytest.raises(TrainingDiverged, match="non-finite on another rank at epoch 0"):
        other_rank_diverged.check()
    all_fine = _EpochLosses(epoch=0, learning_rate=0.1, curve=[], agree=lambda flag: (flag + 0.0,))
    all_fine.add(torch.tensor(0.5), rows=4)
    all_fine.check()
    assert all_fine.count == 4


def test_checkpoint_round_trip_reproduces_the_logits(data, tmp_path):
    _, _, vocab, examples = data
    train, valid = split_examples(examples, CUSTOMER_SPECS, PRODUCT_SPECS)
    shape = model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, FAST)
    model = train_dlrm(train, valid, shape, TrainConfig(epochs=1)).model
    TrainedModel(model, CUSTOMER_SPECS, PRODUCT_SPECS, vocab, "v1", {"auc": 0.5}).save(tmp_path)
    loaded = TrainedModel.load(tmp_path)
    assert loaded.version == "v1" and loaded.customer_specs == CUSTOMER_SPECS
    _, before = evaluate_examples(model, valid)
    _, after = evaluate_examples(loaded.model, valid)
    assert math.isclose(before, after, abs_tol=1e-7)


def test_training_config_presets_fill_unset_fields_and_reject_unknown_names():
    import pydantic

    from feedpipe.defs.modeling import TrainingConfig
    from feedpipe.training import ARTICLE_PRESET

    assert TrainingConfig().core() == TrainConfig()
    article = TrainingConfig(preset="article", epochs=2).core()
    assert article.over_arch_layers == ARTICLE_PRESET.over_arch_layers == (512, 512, 256, 1)
    assert article.optimizer == "sgd" and article.epochs == 2
    with pytest.raises(pydantic.ValidationError, match="preset must be one of"):  # when built: before any step
        TrainingConfig(preset="nope")


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": -8}, "batch_size must be >= 1"),
        ({"learning_rate": float("nan")}, "learning_rate must be a number > 0"),
        ({"embedding_weight_decay": -1e-3}, "embedding_weight_decay must be a number >= 0"),
        ({"over_arch_layers": [128, 64]}, "over_arch_layers must end in 1"),
        ({"dense_arch_layers": [64, 8]}, "dense_arch_layers must end in embedding_dim (16)"),
        ({"optimizer": "adagrad"}, "optimizer must be 'adam' or 'sgd'"),
        ({"patience": -1}, "patience must be >= 0"),
        ({"precision": "fp16"}, "precision must be one of ['auto', 'fp32', 'bf16']"),
    ],
)
def test_a_training_config_that_cannot_train_fails_before_training_and_names_the_field(overrides, named):
    import pydantic

    from feedpipe.defs.modeling import TrainingConfig

    with pytest.raises(ValueError, match=re.escape(named)):
        TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    # The Dagster config says the same when it is built: `feedpipe run` builds it before any step runs
    with pytest.raises(pydantic.ValidationError, match=re.escape(named)):
        TrainingConfig(**overrides)


def test_the_article_preset_trains_with_plain_sgd(data):
    from feedpipe.training import ARTICLE_PRESET, make_optimizers

    _, _, vocab, _ = data
    from dataclasses import replace

    cfg = replace(ARTICLE_PRESET, epochs=1)
    model = TwoSidedDLRM(model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, cfg))
    (opt,) = make_optimizers(model, cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.01


def test_flat_tables_train_exactly_like_the_embedding_bag_collection(data):
    """The default one-process path (one flat matrix per side) against TorchRec's EBC path: same
    logits before training and the same weights after two epochs of Adam + RowWiseAdagrad."""
    from feedpipe.training import InProcess

    _, _, vocab, examples = data
    train, valid = split_examples(examples, CUSTOMER_SPECS, PRODUCT_SPECS)
    shape = model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, FAST)
    # fp32: the two paths' lookups agree to rounding, which bf16 products would swamp.
    cfg = TrainConfig(epochs=2, batch_size=128, patience=5, embedding_weight_decay=1e-3, precision="fp32")
    flat = InProcess(flat=True)
    torch.manual_seed(0)
    model, _ = flat.build(shape, cfg, torch.device("cpu"))
    rows = torch.randperm(train.num_rows)[:300]
    from feedpipe.training import forward_examples

    prepared = flat.prepare(train)
    assert torch.allclose(flat.forward(model, prepared, prepared.permuted(rows)), forward_examples(model, train, rows),
                          atol=1e-6)
    a = train_dlrm(train, valid, shape, cfg, parallel=InProcess(flat=True))
    b = train_dlrm(train, valid, shape, cfg, parallel=InProcess(flat=False))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-5), k
    assert [h.val_loss for h in a.history] == pytest.approx([h.val_loss for h in b.history], abs=1e-5)
    assert a.model.customer_ebc.embedding_bags["t_customers__customer_id"].weight.abs().sum() > 0


def test_bf16_training_multiplies_the_over_arch_in_bf16_and_still_learns(data):
    from feedpipe.training import InProcess, over_arch_dtype

    cpu = torch.device("cpu")
    assert over_arch_dtype(TrainConfig(precision="bf16"), cpu) is torch.bfloat16
    assert over_arch_dtype(TrainConfig(precision="fp32"), cpu) is None
    _, _, vocab, examples = data
    train, valid = split_examples(examples, CUSTOMER_SPECS, PRODUCT_SPECS)
    cfg = replace(FAST, precision="bf16")
    shape = model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, cfg)
    parallel = InProcess()
    torch.manual_seed(0)
    model, _ = parallel.build(shape, cfg, cpu)
    prepared = parallel.prepare(train)
    batch = prepared.permuted(torch.arange(200))
    bf16 = parallel.forward(model, prepared, batch)
    parallel.over_arch_dtype = None
    fp32 = parallel.forward(model, prepared, batch)
    assert bf16.dtype == torch.float32
    # bf16 products round the inputs to 8 bits of mantissa: close to fp32, and not equal to it.
    assert 0 < (bf16 - fp32).abs().max() < 0.05
    result = train_dlrm(train, valid, shape, cfg)
    assert result.best.val_auc > 0.95 and result.over_arch_precision == "bf16"
    assert train_dlrm(train, valid, shape, replace(cfg, epochs=1, precision="fp32")).over_arch_precision == "fp32"
    # ... and what it ships is an fp32 model
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


def test_training_threads_follow_the_over_arch_width(data):
    from dataclasses import replace

    from feedpipe.training import ARTICLE_PRESET, training_threads

    _, _, vocab, _ = data
    small = model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, TrainConfig())
    large = model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, ARTICLE_PRESET)
    assert TwoSidedDLRM.over_arch_input_width(small) == TwoSidedDLRM(small).over_in_features
    assert training_threads(TrainConfig(), small) == 1
    assert training_threads(ARTICLE_PRESET, large) == torch.get_num_threads()
    assert training_threads(replace(TrainConfig(), cpu_threads=3), small) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_and_evaluation_run_on_cuda(data):
    """The GPU path end to end in one process: buffers, flat tables and examples on the device."""
    _, _, vocab, examples = data
    train, valid = split_examples(examples, CUSTOMER_SPECS, PRODUCT_SPECS)
    shape = model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, FAST)
    result = train_dlrm(train, valid, shape, TrainConfig(epochs=1, batch_size=256), device="cuda")
    assert result.model.triu_flat.device.type == "cuda"
    assert result.best.val_auc > 0.5


def test_forced_bf16_where_it_is_emulated_is_named_in_the_log(data, monkeypatch):
    """precision "bf16" on a CPU without native bf16 trains ~11x slower: training says so first."""
    import feedpipe.scoring_runtime as runtime

    _, _, vocab, examples = data
    train, valid = split_examples(examples, CUSTOMER_SPECS, PRODUCT_SPECS)
    cfg = replace(FAST, epochs=1, precision="bf16")
    shape = model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, cfg)
    for native, warned in ((False, True), (True, False)):
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        lines: list[str] = []
        train_dlrm(train, valid, shape, cfg, log=lines.append)
        assert any("is emulated" in line for line in lines) == warned, lines


def test_validation_auc_of_one_class_is_undefined_not_zero(data):
    """No negatives (every customer bought every product): torchmetrics says 0.0, which reads as a bad model."""
    from feedpipe.training import ExampleTensors, evaluate_examples

    _, _, vocab, examples = data
    _, valid = split_examples(examples, CUSTOMER_SPECS, PRODUCT_SPECS)
    model = TwoSidedDLRM(model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, FAST))
    loss, auc = evaluate_examples(model, valid)
    assert math.isfinite(loss) and 0.0 <= auc <= 1.0
    positives = ExampleTensors(valid.customers, valid.products, torch.ones_like(valid.labels))
    loss, auc = evaluate_examples(model, positives)
    assert math.isfinite(loss) and math.isnan(auc)


def test_loss_and_auc_is_nan_for_one_class_wherever_validation_is_gathered():
    """One place for one process and for torchrun ranks: the ranks' AUC said 0.0 (a 'bad model') for one class."""
    import math

    from feedpipe.training import loss_and_auc

    logits = torch.tensor([0.3, -1.2, 2.0])
    loss, auc = loss_and_auc(logits, torch.zeros(3))
    assert math.isnan(auc) and loss > 0
    assert loss_and_auc(logits, torch.tensor([0.0, 0.0, 1.0]))[1] == 1.0
