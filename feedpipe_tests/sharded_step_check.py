"""Run under torchrun by test_distributed_training: one SGD step of ShardedTraining's model on each
rank's own batch, against one step of the one-process model on the union of those batches.

    torchrun --nproc_per_node 2 -m feedpipe_tests.sharded_step_check OUT.json

Rank 0 writes, per parameter, the largest difference between the two updated weights.
"""

import json
import sys

import torch
from torchrec import KeyedJaggedTensor

from feedpipe.model import ModelShape, SparseFeature, TwoSidedDLRM
from feedpipe.process_group import join_process_group, leave_process_group
from feedpipe.sharded_training import ShardedTraining, gather_full_state
from feedpipe.training import TrainConfig

SHAPE = ModelShape(
    (SparseFeature("customers.customer_id", 50), SparseFeature("customers.region", 6)),
    (SparseFeature("products.product_id", 30), SparseFeature("products.tags", 9, multi_valued=True)),
    customer_dense_in=2,
    product_dense_in=1,
)


def rank_batch(rank: int, b: int = 16):
    g = torch.Generator().manual_seed(100 + rank)
    n_tags = torch.randint(1, 4, (b,), generator=g, dtype=torch.int32)
    customers = KeyedJaggedTensor(
        keys=["customers.customer_id", "customers.region"],
        values=torch.cat([torch.randint(0, 50, (b,), generator=g), torch.randint(0, 6, (b,), generator=g)]),
        lengths=torch.ones(2 * b, dtype=torch.int32),
    )
    products = KeyedJaggedTensor(
        keys=["products.product_id", "products.tags"],
        values=torch.cat([torch.randint(0, 30, (b,), generator=g), torch.randint(0, 9, (int(n_tags.sum()),), generator=g)]),
        lengths=torch.cat([torch.ones(b, dtype=torch.int32), n_tags]),
    )
    labels = torch.randint(0, 2, (b,), generator=g).float()
    return (torch.randn(b, 2, generator=g), customers, torch.randn(b, 1, generator=g), products), labels


def bce(logits, labels):
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


def main(out: str) -> None:
    group = join_process_group("cpu")
    config = TrainConfig(optimizer="sgd", learning_rate=0.5)
    parallel = ShardedTraining(group)
    model, optimizers = parallel.build(SHAPE, config, group.device)
    before = gather_full_state(model, group)
    inputs, labels = rank_batch(group.rank)
    model.train()
    bce(model(*inputs), labels).backward()  # the tables' SGD steps inside backward
    for opt in optimizers:
        opt.step()
    after = gather_full_state(model, group)
    if group.is_leader:
        plain = TwoSidedDLRM(SHAPE)
        plain.load_state_dict(before)
        sgd = torch.optim.SGD(plain.parameters(), lr=config.learning_rate)
        batches = [rank_batch(r) for r in range(group.world_size)]
        logits = torch.cat([plain(*inp) for inp, _ in batches])
        bce(logits, torch.cat([lab for _, lab in batches])).backward()
        sgd.step()
        expected = plain.state_dict()
        diffs = {k: float((after[k] - expected[k]).abs().max()) for k in expected}
        moved = {k: float((after[k] - before[k]).abs().max()) for k in expected}
        with open(out, "w") as f:
            json.dump({"diffs": diffs, "moved": moved, "plan": parallel.plan_summary()}, f)
    leave_process_group(group)


if __name__ == "__main__":
    main(sys.argv[1])
