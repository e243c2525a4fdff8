"""One oneshot run for tests/integration/test_distributed.py, alone or under
``torchrun --nproc-per-node 2`` (gloo on CPU). Not a test module.

    python distributed_run.py DENSE_DIR OUT_DIR LOGITS.pt COPIES MODE
"""

import os
import sys

import torch
import torch.distributed as dist
from datasets import concatenate_datasets

from tests.testing_utils import FAST, make_dataset, run_oneshot
from tomoe_modifier import ToMoEModifier


def main() -> None:
    dense, out, logits_path, copies, mode = sys.argv[1:6]
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    data = make_dataset(num_samples=8, seq_len=32)
    # COPIES identical halves: under 2 ranks each shard is the whole of `data`
    dataset = concatenate_datasets([data] * int(copies))
    torch.manual_seed(0)
    modifier = ToMoEModifier(train_mode=mode, **{**FAST, "epochs": 2})
    model = run_oneshot(
        dense,
        [modifier],
        out,
        dataset=dataset,
        batch_size=2,
        num_calibration_samples=len(dataset),
        shuffle_calibration_samples=False,
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    x = torch.arange(4, 28).reshape(2, 12)
    with torch.no_grad():
        torch.save(model(x).logits, f"{logits_path}.rank{rank}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
