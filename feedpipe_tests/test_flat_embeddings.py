"""The flat per-side tables that one-process training uses, against TorchRec's EmbeddingBagCollection."""

import torch

from feedpipe.flat_embeddings import FlatTables
from feedpipe.model import ModelShape, SparseFeature, TwoSidedDLRM
from feedpipe_tests.model_fixtures import random_side


def test_lookup_equals_the_ebc_and_gradients_land_in_the_right_rows():
    g = torch.Generator().manual_seed(3)
    features = (SparseFeature("p.tags", 9, multi_valued=True), SparseFeature("p.id", 40), SparseFeature("p.kind", 5),
                SparseFeature("p.labels", 6, multi_valued=True))
    model = TwoSidedDLRM(ModelShape((SparseFeature("c.id", 4),), features, 0, 1, embedding_dim=8, dense_arch_layers=(8,)))
    side = random_side(50, features, 1, g)
    assert any(int(side.sparse["p.tags"][1][i + 1] - side.sparse["p.tags"][1][i]) == 0 for i in range(50))
    flat = FlatTables(model.product_ebc, features)
    rows = torch.tensor([7, 3, 3, 49, 0, 12])
    bags = flat.bags(side)
    got = flat.pool(bags.permuted(rows))
    _, kjt = side.gather(rows)
    want = model.product_vectors(side.dense.index_select(0, rows), kjt).sparse
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    # The EBC's weights are views: a step on the flat matrix is seen by the model at once.
    got.sum().backward()
    with torch.no_grad():
        flat.weight -= flat.weight.grad
    _, kjt = side.gather(rows)
    after = model.product_vectors(side.dense.index_select(0, rows), kjt).sparse
    torch.testing.assert_close(after, flat.pool(bags.permuted(rows)).detach(), rtol=0, atol=1e-6)
    assert not torch.allclose(after, want)
