"""DeepSpeed pipeline (PipelineModule, 1F1B "TrainSchedule") worker, optionally with data parallelism.

Launch (P*D processes):
  DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 <venv>/bin/python -m torch.distributed.run --nproc_per_node P*D \
      --master_addr 127.0.0.1 --master_port PORT deepspeed_worker.py --width 64 --samples 16 \
      --microbatches 4 --pipeline 2 --data 1 --zero 0 --repeats 3 --output out.json

Averaging: each replica runs M micro-batches of B/(M*D) samples; the loss is the mean MSE of a
micro-batch, DeepSpeed divides each micro-batch loss by gradient_accumulation_steps (= M) before
backward and its data-parallel all-reduce averages over the D replicas, so the gradient is the
mean over all B samples, i.e. the full-batch mean-loss gradient.
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import common
import model
import torch


def main():
    args = common.parse_args()
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    layers = model.stack_layers(args.width, args.blocks)
    keys = model.parameter_keys(layers)
    net = PipelineModule(
        layers=layers, num_stages=args.pipeline, loss_fn=model.loss_fn, partition_method="uniform"
    )  # 2*blocks/P layers = blocks/P pairs per stage
    micro = args.samples // (args.microbatches * args.data)
    config = {
        "train_batch_size": args.samples,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": args.microbatches,
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": args.zero},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=config)
    inputs, targets = model.make_batch(args.samples, args.width)
    replica = engine.grid.get_data_parallel_id()
    shard = slice(replica * args.samples // args.data, (replica + 1) * args.samples // args.data)
    batches = [(x, y) for x, y in zip(inputs[shard].split(micro), targets[shard].split(micro))]

    captured = {}
    optimizer_step = engine.optimizer.step

    def capturing_step(*a, **k):  # gradients after DeepSpeed's reduction, just before the update
        if not captured:
            for param in net.parameters():
                captured[keys[id(param)]] = safe_get_full_grad(param).detach().clone()
        return optimizer_step(*a, **k)

    engine.optimizer.step = capturing_step
    engine.train_batch(iter(batches))
    engine.optimizer.step = optimizer_step
    stash = common.stash(captured)
    times = common.time_steps(lambda: engine.train_batch(iter(batches)), args.repeats)
    notes = (
        f"deepspeed {deepspeed.__version__}, gloo, PipelineModule uniform, TrainSchedule (1F1B), "
        f"pp={engine.num_stages} dp={engine.dp_world_size} zero={engine.zero_optimization_stage()} "
        f"micro={micro} gas={args.microbatches}; SGD lr=0; loss/gas + dp mean all-reduce"
    )
    common.finish(args, "deepspeed", "1F1B", times, stash, notes)


if __name__ == "__main__":
    main()
